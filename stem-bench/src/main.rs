//! # stem-bench: the Stem benchmark harness
//!
//! Measures Stem's enqueue rate, batched enqueue rate, drain (burn-down)
//! rate and open-loop latency on an adapter, and checks its own answer:
//! every task sent must run exactly once, or the run exits non-zero and
//! names the lost and duplicated task numbers.
//!
//! ```sh
//! # in-memory broker, 1,000,000-task burn-down, one JSON line
//! cargo run --release -p stem-bench -- --broker memory:// --scenario drain --tasks 1000000 --json
//! # SQLite (a fresh namespace per scenario, so an old file does not matter)
//! cargo run --release -p stem-bench -- --broker sqlite:///tmp/stem-bench.db --scenario drain --tasks 100000 --json
//! # Postgres (a schema per scenario, dropped after it; sizes logged first)
//! cargo run --release -p stem-bench -- --broker postgres://postgres@127.0.0.1:5432/test --scenario drain --tasks 100000 --json
//! # all four scenarios; `sqlite://` alone uses a temp file
//! cargo run --release -p stem-bench -- --broker sqlite:// --scenario all --tasks 100000
//! # latency with two worker processes (this binary re-executed as workers)
//! cargo run --release -p stem-bench -- --broker sqlite:///tmp/stem-bench.db --scenario latency --worker-processes 2 --json
//! # CI smoke test: debug build, small sizes, both adapters, exactly-once checked
//! cargo run -p stem-bench -- --smoke
//! ```
//!
//! ## Scenarios
//! - `enqueue`: `my_task::enqueue_on(&stem, ..)` in a loop, `--tasks` times.
//! - `enqueue-batch`: `my_task::with().on(&stem).enqueue_many(..)` in
//!   batches of `--batch`.
//! - `drain`: preload `--tasks` tasks (batched), then start the worker(s)
//!   and time until all ran and the queue's ready + delayed + leased is 0.
//! - `latency`: an open-loop producer sends `--rate` tasks/s for
//!   `--duration`; each task carries its wall-clock send time and records
//!   start − send; p50/p99/p99.9/max come from an HDR histogram.
//! - `all`: the four in that order, each in a fresh namespace.
//!
//! Both enqueue scenarios drain their tasks afterwards (untimed) so that
//! exactly-once is checked for them too.
//!
//! ## Measurements
//! - `tasks_per_s`: tasks / measured wall time.
//! - `cpu_s_per_1000_tasks`: user + system CPU of every process involved
//!   (this one, plus the worker processes), from `/proc/<pid>/stat`.
//! - `peak_rss_kib`: `VmHWM` from `/proc/<pid>/status`: of the largest worker
//!   process with `--worker-processes`, of this process otherwise
//!   (`rss_scope` says which).
//! - `exactly_once`: in-process, the task increments `counts[seq]` in a
//!   shared `Vec<AtomicU32>` injected with `stem::State`; worker processes
//!   log the numbers they ran to a file each, read back after SIGTERM.
//!
//! With no `--backend` no result is written (the client is built with
//! `open_broker` and `Stem::new(broker, None)`). Logs go to stderr through
//! `tracing`, off unless `RUST_LOG` is set.

// The report is the program's output: it goes to stdout.
#![allow(clippy::print_stdout)]
// Rates and percentiles are computed in floating point from counters.
#![allow(clippy::cast_precision_loss)]

mod check;
mod report;
mod scenarios;
mod sys;
mod task;
mod workers;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::scenarios::{Bench, Scenario};
use crate::workers::WorkerSettings;

/// The error type of the harness.
pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(
    name = "stem-bench",
    about = "Benchmarks Stem on one adapter and checks every task ran exactly once."
)]
#[allow(clippy::struct_excessive_bools)]
struct Cli {
    /// Broker URL: `memory://[name]`, `sqlite:///path/file.db` (`sqlite://` alone: a temp file), `redis://host:6379` or `postgres://user@host:5432/db`.
    #[arg(long, default_value = "memory://")]
    broker: String,
    /// Result backend URL; without one no results are written.
    #[arg(long)]
    backend: Option<String>,
    /// Tasks for the enqueue, enqueue-batch and drain scenarios.
    #[arg(long, default_value_t = 10_000)]
    tasks: u64,
    /// Tasks each worker runs at once (default: the runtime's).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Deliveries a worker holds at most, running or waiting (default: the runtime's, 4 per slot).
    #[arg(long)]
    prefetch: Option<usize>,
    /// The worker's longest wait per fetch, e.g. `100ms` (default: the runtime's).
    #[arg(long, value_parser = humantime::parse_duration)]
    poll_interval: Option<Duration>,
    /// Of the drain scenario's `--tasks`, how many are published with a
    /// delay of 1 to 3 s (the rest are ready at once).
    #[arg(long, default_value_t = 0)]
    delayed: u64,
    /// Concurrent producers in the enqueue scenario, each awaiting one
    /// enqueue at a time.
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Tasks per `enqueue_many` call (enqueue-batch, and the drain preload).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Bytes of padding in each task's arguments.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Send rate of the latency scenario's open-loop producer, tasks/s.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Length of the latency scenario, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Run the worker inside this process (the default).
    #[arg(long, conflicts_with = "worker_processes")]
    workers_in_process: bool,
    /// Run drain and latency with K worker processes (SQLite only).
    #[arg(long, value_name = "K")]
    worker_processes: Option<usize>,
    /// One JSON object per scenario, one per line, instead of a table.
    #[arg(long)]
    json: bool,
    /// Turn task events on in the workers (in-process drain and latency
    /// also run one subscriber that counts them).
    #[arg(long)]
    events: bool,
    /// Longest wait for one scenario's tasks to finish.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// CI smoke test: every scenario at small sizes on memory:// and on a
    /// temp SQLite file (plus drain and latency with 2 worker processes), as JSON.
    #[arg(long, conflicts_with_all = ["scenario", "broker", "worker_processes"])]
    smoke: bool,
    /// Internal: run as a worker process writing its log to this file.
    #[arg(
        long,
        hide = true,
        value_name = "FILE",
        requires = "internal_namespace"
    )]
    internal_worker: Option<PathBuf>,
    /// Internal: the worker process's namespace.
    #[arg(long, hide = true)]
    internal_namespace: Option<String>,
    /// Internal: prove the checker fails: producers skip task 5 and send task 3 twice.
    #[arg(long, hide = true)]
    inject_fault: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stem-bench: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("stem-bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs what the flags ask; `Ok(false)` when a scenario was not exactly-once.
async fn run(cli: Cli) -> Res<bool> {
    let worker = WorkerSettings {
        concurrency: cli.concurrency,
        prefetch: cli.prefetch,
        poll_interval: cli.poll_interval,
        events: cli.events,
    };
    if let Some(out) = &cli.internal_worker {
        let ns = cli.internal_namespace.as_deref().unwrap_or_default();
        workers::worker_process_main(&cli.broker, cli.backend.as_deref(), ns, &worker, out).await?;
        return Ok(true);
    }
    let scratch = tempfile::Builder::new().prefix("stem-bench-").tempdir()?;
    if cli.smoke {
        return smoke(&cli, worker, scratch.path().to_path_buf()).await;
    }
    let k = if cli.workers_in_process {
        0
    } else {
        cli.worker_processes.unwrap_or(0)
    };
    let bench = bench_for(&cli, &cli.broker, k, worker, &scratch)?;
    run_bench(&bench, cli.scenario, cli.json).await
}

/// Builds the scenario context for `broker`, substituting a temp file for a
/// bare `sqlite://`.
fn bench_for(
    cli: &Cli,
    broker: &str,
    worker_processes: usize,
    worker: WorkerSettings,
    scratch: &tempfile::TempDir,
) -> Res<Bench> {
    let adapter = broker
        .split_once("://")
        .map(|(scheme, _)| scheme.to_owned())
        .ok_or_else(|| {
            format!("`{broker}` is not a URL (try memory:// or sqlite:///tmp/stem-bench.db)")
        })?;
    let broker = match broker.strip_prefix("sqlite://") {
        Some(rest) if rest.is_empty() || rest.starts_with('?') => format!(
            "sqlite://{}{rest}",
            scratch.path().join("stem-bench.db").display()
        ),
        _ => broker.to_owned(),
    };
    if worker_processes > 0 && adapter == "memory" {
        return Err(
            "memory:// lives inside one process: --worker-processes needs a broker that processes share (sqlite://)"
                .into(),
        );
    }
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    Ok(Bench {
        broker,
        backend: cli.backend.clone(),
        adapter,
        run_id: format!("{}_{unix_ms}", std::process::id()),
        tasks: cli.tasks,
        producers: cli.producers.max(1),
        delayed: cli.delayed.min(cli.tasks),
        batch: cli.batch.max(1),
        payload_bytes: cli.payload_bytes,
        rate: cli.rate,
        duration: cli.duration,
        worker_processes,
        worker,
        timeout: cli.timeout,
        scratch: scratch.path().to_path_buf(),
        inject_fault: cli.inject_fault,
    })
}

/// Runs `scenario` (or all four) and prints each result as it comes.
async fn run_bench(bench: &Bench, scenario: Scenario, json: bool) -> Res<bool> {
    if !json {
        println!(
            "stem-bench: broker {} ({}), backend {}, workers {}",
            stem::url::redact(&bench.broker),
            bench.adapter,
            bench
                .backend
                .as_deref()
                .map_or_else(|| String::from("none"), stem::url::redact),
            if bench.worker_processes > 0 {
                format!("{} processes (drain, latency)", bench.worker_processes)
            } else {
                String::from("in-process")
            }
        );
        println!("{}", report::table_header());
    }
    let mut all_ok = true;
    for s in scenario.expand() {
        let r = bench.run(s).await?;
        if json {
            println!("{}", r.json_line());
        } else {
            println!("{}", report::table_row(&r));
        }
        if let Some(problem) = r.check.problem() {
            all_ok = false;
            eprintln!(
                "stem-bench: {} on {}: NOT exactly once: {problem}",
                r.scenario, r.adapter
            );
        }
    }
    Ok(all_ok)
}

/// The CI smoke test: small sizes, both adapters, JSON, exactly-once checked.
async fn smoke(cli: &Cli, mut worker: WorkerSettings, scratch: PathBuf) -> Res<bool> {
    // A short fetch wait so that idle workers stop quickly between scenarios.
    worker
        .poll_interval
        .get_or_insert(Duration::from_millis(100));
    let dir = tempfile::Builder::new()
        .prefix("stem-bench-smoke-")
        .tempdir_in(&scratch)?;
    let small = Cli {
        tasks: cli.tasks.min(2_000),
        rate: cli.rate.min(200),
        duration: cli.duration.min(Duration::from_secs(1)),
        ..Cli::parse_from(["stem-bench"])
    };
    let mut ok = true;
    for (broker, k, scenario) in [
        ("memory://", 0, Scenario::All),
        ("sqlite://", 0, Scenario::All),
        ("sqlite://", 2, Scenario::Drain),
        ("sqlite://", 2, Scenario::Latency),
    ] {
        let bench = bench_for(&small, broker, k, worker.clone(), &dir)?;
        ok &= run_bench(&bench, scenario, true).await?;
    }
    Ok(ok)
}
