//! `stem`: operate a Stem deployment from a shell. Queues and their
//! counts, dead letters, purges, task records and worker heartbeats, over
//! any broker and result backend the `stem` crate opens by URL.
//!
//! Exit codes: 0 done, 1 the operation failed (not found, refused by the
//! broker, a failed task, unreachable server), 2 bad usage. Errors are one
//! `error: ...` line on stderr.

mod args;
mod connect;
mod control;
mod dlq;
mod enqueue;
mod error;
mod events;
mod output;
mod purge;
mod queues;
mod task;
mod workers;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::connect::Target;
use crate::control::Ask;
use crate::error::CliError;
use crate::output::Out;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(source) => {
            return fail(&CliError::Io {
                what: "starting the async runtime",
                source,
            });
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &CliError) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "error: {}", e.line());
    e.exit_code()
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let target = Target {
        broker_url: cli.broker_url,
        backend_url: cli.backend_url,
        namespace: cli.namespace,
    };
    let out = Out::new(cli.json);
    match &cli.command {
        Command::Queues(args) => queues::run(&target, out, args).await,
        Command::Dlq(cmd) => dlq::run(&target, out, cmd).await,
        Command::Purge(args) => purge::run(&target, out, args).await,
        Command::Task(cmd) => task::run(&target, out, cmd).await,
        Command::Workers => workers::run(&target, out).await,
        Command::Enqueue(args) => enqueue::run(&target, out, args).await,
        Command::Ping(a) => control::run(&target, out, a, Ask::Ping).await,
        Command::Stats(a) => control::run(&target, out, a, Ask::Stats).await,
        Command::Inspect { what, addressing } => {
            control::run(&target, out, addressing, Ask::Inspect(what)).await
        }
        Command::Revoke { task, addressing } => {
            control::run(&target, out, addressing, Ask::Revoke(task)).await
        }
        Command::Shutdown { which, addressing } => {
            control::run(&target, out, addressing, Ask::Shutdown(which)).await
        }
        Command::Pause { queue, addressing } => {
            control::run(&target, out, addressing, Ask::Pause(queue)).await
        }
        Command::Resume { queue, addressing } => {
            control::run(&target, out, addressing, Ask::Resume(queue)).await
        }
        Command::Events(args) => events::run(&target, out, args).await,
    }
}
