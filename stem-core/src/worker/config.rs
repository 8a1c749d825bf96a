//! Worker configuration: defaults, `STEM_*` environment variables and
//! command-line flags of the same names.

use std::time::Duration;

use clap::Parser;

use crate::duration::parse_duration;

/// How a worker runs. Build one with [`WorkerConfig::default`] and the
/// builder, or read it with [`WorkerConfig::from_env_and_args`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Queues to consume; empty = every queue a registered task declares.
    pub queues: Vec<String>,
    /// Tasks run at once.
    pub concurrency: usize,
    /// Deliveries held leased at most, running or waiting for a slot (at
    /// least `concurrency`; default [`PREFETCH_PER_SLOT`] per slot). Waiting
    /// deliveries have their leases renewed and are requeued, not run, at
    /// shutdown.
    pub prefetch: usize,
    /// Time in-flight tasks get to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Lease given to each delivery; renewed while it waits for a slot and
    /// while its task runs.
    pub lease: Duration,
    /// Longest a fetch waits for work before trying again.
    pub poll_interval: Duration,
    /// Interval of heartbeats written to the result backend.
    pub heartbeat_interval: Duration,
    /// This worker's id (`host-pid-random` by default).
    pub worker_id: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let concurrency = std::thread::available_parallelism()
            .map_or(4, std::num::NonZero::get)
            .saturating_mul(8)
            .clamp(8, 64);
        Self {
            queues: Vec::new(),
            concurrency,
            prefetch: concurrency * PREFETCH_PER_SLOT,
            shutdown_grace: Duration::from_secs(30),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(10),
            worker_id: default_worker_id(),
        }
    }
}

/// Deliveries a worker holds per executor slot unless `prefetch` is set:
/// the one running and three waiting (Celery's default multiplier is 4
/// too). Claims come in batches of about half of that.
pub const PREFETCH_PER_SLOT: usize = 4;

/// A worker id: `host-pid-xxxx`.
#[must_use]
pub fn default_worker_id() -> String {
    format!(
        "{}-{}-{:04x}",
        host_name(),
        std::process::id(),
        rand::random::<u16>()
    )
}

/// The host name, or `localhost` when it cannot be read.
#[must_use]
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| String::from("localhost"))
}

/// The worker's flags; each also reads the `STEM_*` variable of its name.
#[derive(Debug, Parser)]
#[command(
    name = "stem-worker",
    about = "Runs every Stem task linked into this binary."
)]
pub struct WorkerArgs {
    /// Broker URL (e.g. `memory://`, `sqlite://stem.db`).
    #[arg(long, env = "STEM_BROKER_URL")]
    pub broker_url: Option<String>,
    /// Result backend URL (default: the broker's own, when it has one).
    #[arg(long, env = "STEM_RESULT_BACKEND_URL")]
    pub result_backend_url: Option<String>,
    /// Namespace of keys, tables and channels.
    #[arg(long, env = "STEM_NAMESPACE")]
    pub namespace: Option<String>,
    /// Queues to consume, comma-separated (default: every task's queue).
    #[arg(long, env = "STEM_QUEUES", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Tasks run at once.
    #[arg(long, env = "STEM_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Deliveries held at most, running or waiting (default: 4 per slot).
    #[arg(long, env = "STEM_PREFETCH")]
    pub prefetch: Option<usize>,
    /// Time in-flight tasks get after SIGINT/SIGTERM, e.g. `30s`.
    #[arg(long, env = "STEM_SHUTDOWN_GRACE", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Lease per delivery, e.g. `30s`.
    #[arg(long, env = "STEM_LEASE", value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// Longest wait per fetch, e.g. `1s`.
    #[arg(long, env = "STEM_POLL_INTERVAL", value_parser = parse_duration)]
    pub poll_interval: Option<Duration>,
    /// Heartbeat interval, e.g. `10s`.
    #[arg(long, env = "STEM_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Worker id (default `host-pid-random`).
    #[arg(long, env = "STEM_WORKER_ID")]
    pub worker_id: Option<String>,
}

impl WorkerArgs {
    /// Applies the flags that were given on top of `config`.
    pub fn apply(&self, config: &mut WorkerConfig) {
        let queues: Vec<String> = self
            .queues
            .iter()
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect();
        if !queues.is_empty() {
            config.queues = queues;
        }
        if let Some(c) = self.concurrency {
            config.concurrency = c;
            if self.prefetch.is_none() {
                config.prefetch = c.saturating_mul(PREFETCH_PER_SLOT);
            }
        }
        if let Some(p) = self.prefetch {
            config.prefetch = p;
        }
        if let Some(d) = self.shutdown_grace {
            config.shutdown_grace = d;
        }
        if let Some(d) = self.lease {
            config.lease = d;
        }
        if let Some(d) = self.poll_interval {
            config.poll_interval = d;
        }
        if let Some(d) = self.heartbeat_interval {
            config.heartbeat_interval = d;
        }
        if let Some(id) = &self.worker_id {
            config.worker_id.clone_from(id);
        }
    }
}

impl WorkerConfig {
    /// Checks the values.
    ///
    /// ```
    /// let mut c = stem_core::worker::WorkerConfig::default();
    /// c.concurrency = 0;
    /// assert!(c.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// A [`crate::ConfigError::BadValue`] naming the setting.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        let bad = |key: &str, value: String, reason: &str| crate::ConfigError::BadValue {
            key: key.to_owned(),
            value,
            reason: reason.to_owned(),
        };
        if self.concurrency == 0 {
            return Err(bad("STEM_CONCURRENCY", "0".into(), "use at least 1"));
        }
        if self.prefetch < self.concurrency {
            return Err(bad(
                "STEM_PREFETCH",
                self.prefetch.to_string(),
                &format!(
                    "the prefetch counts running deliveries too: use at least the concurrency ({})",
                    self.concurrency
                ),
            ));
        }
        if self.lease < Duration::from_millis(100) {
            return Err(bad(
                "STEM_LEASE",
                format!("{:?}", self.lease),
                "use at least 100ms; leases are renewed every third of their length",
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(bad("STEM_POLL_INTERVAL", "0".into(), "use at least 1ms"));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(bad(
                "STEM_HEARTBEAT_INTERVAL",
                "0".into(),
                "use at least 1ms",
            ));
        }
        for q in &self.queues {
            crate::envelope::validate_queue_name(q)
                .map_err(|e| bad("STEM_QUEUES", q.clone(), &e.to_string()))?;
        }
        Ok(())
    }
}
