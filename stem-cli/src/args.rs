//! The command line, as clap derive types. One variant of [`Command`] per
//! command or command group; each group's own arguments live beside its
//! variant, so a new command is a new variant and a new module.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Operate a Stem deployment: queues, dead letters, tasks, workers, the
/// control plane and events.
#[derive(Debug, Parser)]
#[command(name = "stem", version, propagate_version = true)]
pub(crate) struct Cli {
    /// The broker's URL (`sqlite://path`, `redis://host`, `postgres://...`);
    /// default: the embedded SQLite file every Stem process uses without
    /// `STEM_BROKER_URL` (`$STEM_SQLITE_PATH`, else
    /// `~/.local/share/stem/stem.db`).
    #[arg(long, env = "STEM_BROKER_URL", global = true, hide_env_values = true)]
    pub(crate) broker_url: Option<String>,

    /// The result backend's URL, when it is not the broker's own store.
    #[arg(
        long,
        env = "STEM_RESULT_BACKEND_URL",
        global = true,
        hide_env_values = true
    )]
    pub(crate) backend_url: Option<String>,

    /// The namespace the application runs in.
    #[arg(long, env = "STEM_NAMESPACE", global = true, default_value = "stem")]
    pub(crate) namespace: String,

    /// Print one JSON document instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The commands. Keep one variant per command or group, documented: clap
/// turns the doc comments into `stem --help`.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Every queue that holds something, with ready, delayed, leased and
    /// dead counts.
    Queues(QueuesArgs),
    /// Dead letters: list, show, replay, purge.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Remove a queue's ready and delayed tasks (leased ones and dead
    /// letters stay).
    Purge(PurgeArgs),
    /// One task's record from the result backend.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Workers from their heartbeats, alive and dead.
    Workers,
    /// Publish a task by name; prints its id (`--wait`: its result).
    Enqueue(crate::enqueue::EnqueueArgs),
    /// Ask every live worker to answer (control plane).
    Ping(crate::control::Addressing),
    /// Each live worker's counters: uptime, active, prefetched, outcomes.
    Stats(crate::control::Addressing),
    /// Tasks the workers run (`active`), hold (`reserved`) or know revoked.
    Inspect {
        #[command(flatten)]
        what: crate::control::InspectArgs,
        #[command(flatten)]
        addressing: crate::control::Addressing,
    },
    /// Revoke a task: skipped if not started; `--terminate` stops it if it runs.
    Revoke {
        #[command(flatten)]
        task: crate::control::RevokeArgs,
        #[command(flatten)]
        addressing: crate::control::Addressing,
    },
    /// Ask workers to shut down gracefully (one, or all).
    Shutdown {
        #[command(flatten)]
        which: crate::control::ShutdownArgs,
        #[command(flatten)]
        addressing: crate::control::Addressing,
    },
    /// Stop consuming a queue without stopping the workers.
    Pause {
        #[command(flatten)]
        queue: crate::control::QueueArg,
        #[command(flatten)]
        addressing: crate::control::Addressing,
    },
    /// Consume a paused queue again.
    Resume {
        #[command(flatten)]
        queue: crate::control::QueueArg,
        #[command(flatten)]
        addressing: crate::control::Addressing,
    },
    /// Tail task and worker events (workers need STEM_EVENTS=1).
    Events(crate::events::EventsArgs),
}

/// `stem queues`.
#[derive(Debug, Args)]
pub(crate) struct QueuesArgs {
    /// Redraw every second until Ctrl-C (with --json: one document a line).
    #[arg(long)]
    pub(crate) watch: bool,
}

/// `stem dlq ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// One page of a queue's dead letters, oldest first.
    List {
        /// The queue.
        queue: String,
        /// Which page, from 1.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        page: u64,
        /// Dead letters per page.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
        page_size: u64,
    },
    /// One dead letter, with its whole envelope, found in any queue.
    Show {
        /// The task id (a UUID).
        id: String,
    },
    /// Move dead letters back to their queue.
    Replay(ReplayArgs),
    /// Delete a queue's dead letters.
    Purge(PurgeArgs),
}

/// `stem dlq replay`.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The queue whose dead letters to replay.
    pub(crate) queue: String,
    /// The task ids to replay.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(crate) ids: Vec<String>,
    /// Replay every dead letter of the queue.
    #[arg(long)]
    pub(crate) all: bool,
    /// Start the replayed tasks' attempts from zero (and forget their
    /// last error).
    #[arg(long)]
    pub(crate) reset_attempts: bool,
}

/// `stem purge` and `stem dlq purge`.
#[derive(Debug, Args)]
pub(crate) struct PurgeArgs {
    /// The queue.
    pub(crate) queue: String,
    /// Do not ask; required when stdin is not a terminal.
    #[arg(long, short = 'y')]
    pub(crate) yes: bool,
}

/// `stem task ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum TaskCommand {
    /// State, attempts, timings, worker, and result or error.
    Show {
        /// The task id (a UUID).
        id: String,
    },
    /// Wait for the task to finish, then show it; exit 1 when it failed,
    /// was revoked, or did not finish in time.
    Wait {
        /// The task id (a UUID).
        id: String,
        /// How long to wait (`30s`, `5m`).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}
