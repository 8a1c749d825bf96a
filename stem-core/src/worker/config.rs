//! Worker configuration: defaults, `STEM_*` environment variables,
//! command-line flags of the same names and builder calls, in that order
//! of precedence, every value checked the same way whichever set it.

use std::time::Duration;

#[cfg(feature = "cli")]
use clap::Parser;

/// How a worker runs. [`Worker::builder`](super::Worker::builder) starts
/// from the defaults and the `STEM_*` variables
/// ([`WorkerConfig::from_env`]); its calls win over both.
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
    /// How long a task this worker does not know is handed back for
    /// another worker (another app on the same namespace, a newer or older
    /// build during a rolling deploy) before it is dead-lettered, counted
    /// from its enqueue time. Default 5 minutes.
    pub unknown_task_grace: Duration,
    /// How long a task without a time limit runs before the worker logs a
    /// warning about it (once per run). Default 10 minutes.
    pub long_task_warning: Duration,
    /// Send task events (`started`, `succeeded`, ...) and worker events
    /// on the namespace's event channel (`STEM_EVENTS`; default off).
    pub events: bool,
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
            unknown_task_grace: DEFAULT_UNKNOWN_TASK_GRACE,
            long_task_warning: DEFAULT_LONG_TASK_WARNING,
            events: false,
        }
    }
}

/// How long an unknown task is handed back before it is dead-lettered.
pub const DEFAULT_UNKNOWN_TASK_GRACE: Duration = Duration::from_secs(5 * 60);

/// How long a task without a time limit runs before a warning is logged.
pub const DEFAULT_LONG_TASK_WARNING: Duration = Duration::from_secs(10 * 60);

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

/// The worker's flags. The client flags also read their `STEM_*`
/// variable here; the worker settings' variables are read by every
/// [`WorkerBuilder::build`](super::WorkerBuilder::build), and a flag wins
/// over its variable.
#[derive(Debug, Default)]
#[cfg_attr(feature = "cli", derive(Parser))]
#[cfg_attr(
    feature = "cli",
    command(
        name = "stem-worker",
        about = "Runs every Stem task linked into this binary."
    )
)]
pub struct WorkerArgs {
    /// Broker URL (e.g. `memory://`, `sqlite://stem.db`).
    #[cfg_attr(feature = "cli", arg(long, env = "STEM_BROKER_URL"))]
    pub broker_url: Option<String>,
    /// Result backend URL (default: the broker's own, when it has one).
    #[cfg_attr(feature = "cli", arg(long, env = "STEM_RESULT_BACKEND_URL"))]
    pub result_backend_url: Option<String>,
    /// Namespace of keys, tables and channels.
    #[cfg_attr(feature = "cli", arg(long, env = "STEM_NAMESPACE"))]
    pub namespace: Option<String>,
    /// Queues to consume, comma-separated (default: every task's queue;
    /// variable `STEM_QUEUES`).
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    pub queues: Vec<String>,
    /// Tasks run at once (variable `STEM_CONCURRENCY`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub concurrency: Option<String>,
    /// Deliveries held at most, running or waiting (default: 4 per slot;
    /// variable `STEM_PREFETCH`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub prefetch: Option<String>,
    /// Time in-flight tasks get after SIGINT/SIGTERM, e.g. `30s`
    /// (variable `STEM_SHUTDOWN_GRACE`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub shutdown_grace: Option<String>,
    /// Lease per delivery, e.g. `30s` (variable `STEM_LEASE`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub lease: Option<String>,
    /// Longest wait per fetch, e.g. `1s` (variable `STEM_POLL_INTERVAL`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub poll_interval: Option<String>,
    /// Heartbeat interval, e.g. `10s` (variable `STEM_HEARTBEAT_INTERVAL`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub heartbeat_interval: Option<String>,
    /// Worker id (default `host-pid-random`; variable `STEM_WORKER_ID`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub worker_id: Option<String>,
    /// How long a task this worker does not know is handed back for other
    /// workers before it is dead-lettered, e.g. `5m` (variable
    /// `STEM_UNKNOWN_TASK_GRACE`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub unknown_task_grace: Option<String>,
    /// How long a task without a time limit runs before the worker logs a
    /// warning about it, e.g. `10m` (variable `STEM_LONG_TASK_WARNING`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub long_task_warning: Option<String>,
    /// Send task and worker events for monitors such as `stem events`
    /// (variable `STEM_EVENTS=1`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub events: bool,
}

impl WorkerArgs {
    /// Applies the flags that were given on top of `config`, checked as
    /// every setting is.
    ///
    /// # Errors
    /// A [`crate::ConfigError::BadValue`] naming the flag.
    pub fn apply(&self, config: &mut WorkerConfig) -> Result<(), crate::ConfigError> {
        let given = self.settings()?;
        let resolved = Settings::all_from(config, Source::Env).over(given);
        *config = resolved.resolve()?;
        Ok(())
    }

    /// The flags given, parsed and checked (no environment, no defaults).
    pub(crate) fn settings(&self) -> Result<Settings, crate::ConfigError> {
        let queues = (!self.queues.is_empty()).then(|| self.queues.join(","));
        Settings::parse(Source::Flag, |key| match key.env {
            "STEM_QUEUES" => queues.clone(),
            "STEM_CONCURRENCY" => self.concurrency.clone(),
            "STEM_PREFETCH" => self.prefetch.clone(),
            "STEM_SHUTDOWN_GRACE" => self.shutdown_grace.clone(),
            "STEM_LEASE" => self.lease.clone(),
            "STEM_POLL_INTERVAL" => self.poll_interval.clone(),
            "STEM_HEARTBEAT_INTERVAL" => self.heartbeat_interval.clone(),
            "STEM_WORKER_ID" => self.worker_id.clone(),
            "STEM_UNKNOWN_TASK_GRACE" => self.unknown_task_grace.clone(),
            "STEM_LONG_TASK_WARNING" => self.long_task_warning.clone(),
            "STEM_EVENTS" => self.events.then(|| String::from("1")),
            _ => None,
        })
    }
}

/// Where a setting's value came from, lowest precedence first. An error
/// names the setting as its source spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Source {
    /// A `STEM_*` variable.
    Env,
    /// A command-line flag.
    Flag,
    /// A [`WorkerBuilder`](super::WorkerBuilder) call.
    Builder,
}

/// One worker setting: its variable, its flag and its builder method.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Key {
    env: &'static str,
    flag: &'static str,
    method: &'static str,
}

impl Key {
    fn name(self, source: Source) -> String {
        match source {
            Source::Env => self.env.to_owned(),
            Source::Flag => self.flag.to_owned(),
            Source::Builder => format!("WorkerBuilder::{}", self.method),
        }
    }

    fn bad(self, source: Source, value: String, reason: &str) -> crate::ConfigError {
        crate::ConfigError::BadValue {
            key: self.name(source),
            value,
            reason: reason.to_owned(),
        }
    }
}

const fn key(env: &'static str, flag: &'static str, method: &'static str) -> Key {
    Key { env, flag, method }
}

pub(crate) const QUEUES: Key = key("STEM_QUEUES", "--queues", "queues");
pub(crate) const CONCURRENCY: Key = key("STEM_CONCURRENCY", "--concurrency", "concurrency");
pub(crate) const PREFETCH: Key = key("STEM_PREFETCH", "--prefetch", "prefetch");
pub(crate) const SHUTDOWN_GRACE: Key =
    key("STEM_SHUTDOWN_GRACE", "--shutdown-grace", "shutdown_grace");
pub(crate) const LEASE: Key = key("STEM_LEASE", "--lease", "lease");
pub(crate) const POLL_INTERVAL: Key = key("STEM_POLL_INTERVAL", "--poll-interval", "poll_interval");
pub(crate) const HEARTBEAT_INTERVAL: Key = key(
    "STEM_HEARTBEAT_INTERVAL",
    "--heartbeat-interval",
    "heartbeat_interval",
);
pub(crate) const WORKER_ID: Key = key("STEM_WORKER_ID", "--worker-id", "worker_id");
pub(crate) const UNKNOWN_TASK_GRACE: Key = key(
    "STEM_UNKNOWN_TASK_GRACE",
    "--unknown-task-grace",
    "unknown_task_grace",
);
pub(crate) const LONG_TASK_WARNING: Key = key(
    "STEM_LONG_TASK_WARNING",
    "--long-task-warning",
    "long_task_warning",
);
pub(crate) const EVENTS: Key = key("STEM_EVENTS", "--events", "events");

/// Every setting, in the order they are read.
const KEYS: [Key; 11] = [
    QUEUES,
    CONCURRENCY,
    PREFETCH,
    SHUTDOWN_GRACE,
    LEASE,
    POLL_INTERVAL,
    HEARTBEAT_INTERVAL,
    WORKER_ID,
    UNKNOWN_TASK_GRACE,
    LONG_TASK_WARNING,
    EVENTS,
];

/// A value and where it came from; `None` when not given.
type Given<T> = Option<(T, Source)>;

/// The worker settings given explicitly, each with its source. Layers
/// stack with [`Settings::over`]; [`Settings::resolve`] fills the rest
/// with defaults and checks the result.
#[derive(Clone, Debug, Default)]
pub(crate) struct Settings {
    pub(crate) queues: Given<Vec<String>>,
    pub(crate) concurrency: Given<usize>,
    pub(crate) prefetch: Given<usize>,
    pub(crate) shutdown_grace: Given<Duration>,
    pub(crate) lease: Given<Duration>,
    pub(crate) poll_interval: Given<Duration>,
    pub(crate) heartbeat_interval: Given<Duration>,
    pub(crate) worker_id: Given<String>,
    pub(crate) unknown_task_grace: Given<Duration>,
    pub(crate) long_task_warning: Given<Duration>,
    pub(crate) events: Given<bool>,
}

impl Settings {
    /// Every field of `config`, as given by `source`.
    pub(crate) fn all_from(config: &WorkerConfig, source: Source) -> Self {
        Self {
            queues: Some((config.queues.clone(), source)),
            concurrency: Some((config.concurrency, source)),
            prefetch: Some((config.prefetch, source)),
            shutdown_grace: Some((config.shutdown_grace, source)),
            lease: Some((config.lease, source)),
            poll_interval: Some((config.poll_interval, source)),
            heartbeat_interval: Some((config.heartbeat_interval, source)),
            worker_id: Some((config.worker_id.clone(), source)),
            unknown_task_grace: Some((config.unknown_task_grace, source)),
            long_task_warning: Some((config.long_task_warning, source)),
            events: Some((config.events, source)),
        }
    }

    /// The settings `lookup` gives by variable name (blank = not given),
    /// parsed and checked.
    pub(crate) fn parse(
        source: Source,
        mut lookup: impl FnMut(Key) -> Option<String>,
    ) -> Result<Self, crate::ConfigError> {
        let mut out = Self::default();
        for key in KEYS {
            let Some(raw) = lookup(key).filter(|v| !v.trim().is_empty()) else {
                continue;
            };
            let raw = raw.trim();
            let count = || {
                raw.parse::<usize>()
                    .map(|n| Some((n, source)))
                    .map_err(|e| {
                        key.bad(source, raw.to_owned(), &format!("{e}; use a whole number"))
                    })
            };
            let duration = || {
                crate::duration::parse_duration(raw)
                    .map(|d| Some((d, source)))
                    .map_err(|e| key.bad(source, raw.to_owned(), &e))
            };
            match key.env {
                "STEM_QUEUES" => {
                    let queues: Vec<String> = raw
                        .split(',')
                        .map(|q| q.trim().to_owned())
                        .filter(|q| !q.is_empty())
                        .collect();
                    if !queues.is_empty() {
                        out.queues = Some((queues, source));
                    }
                }
                "STEM_CONCURRENCY" => out.concurrency = count()?,
                "STEM_PREFETCH" => out.prefetch = count()?,
                "STEM_SHUTDOWN_GRACE" => out.shutdown_grace = duration()?,
                "STEM_LEASE" => out.lease = duration()?,
                "STEM_POLL_INTERVAL" => out.poll_interval = duration()?,
                "STEM_HEARTBEAT_INTERVAL" => out.heartbeat_interval = duration()?,
                "STEM_UNKNOWN_TASK_GRACE" => out.unknown_task_grace = duration()?,
                "STEM_LONG_TASK_WARNING" => out.long_task_warning = duration()?,
                "STEM_EVENTS" => {
                    let on = crate::events::parse_switch(raw).ok_or_else(|| {
                        key.bad(
                            source,
                            raw.to_owned(),
                            "expected 1/true/yes/on or 0/false/no/off",
                        )
                    })?;
                    out.events = Some((on, source));
                }
                _ => out.worker_id = Some((raw.to_owned(), source)),
            }
        }
        out.check()?;
        Ok(out)
    }

    /// The `STEM_*` variables of this process.
    pub(crate) fn from_env() -> Result<Self, crate::ConfigError> {
        Self::parse(Source::Env, |key| match std::env::var(key.env) {
            Ok(v) => Some(v),
            Err(std::env::VarError::NotPresent) => None,
            // Not UTF-8: passed on lossily, so it fails to parse (or, for
            // the worker id, is at least shown) instead of being ignored.
            Err(std::env::VarError::NotUnicode(v)) => Some(v.to_string_lossy().into_owned()),
        })
    }

    /// `top` over `self`: each setting `top` gives wins.
    #[must_use]
    pub(crate) fn over(self, top: Self) -> Self {
        Self {
            queues: top.queues.or(self.queues),
            concurrency: top.concurrency.or(self.concurrency),
            prefetch: top.prefetch.or(self.prefetch),
            shutdown_grace: top.shutdown_grace.or(self.shutdown_grace),
            lease: top.lease.or(self.lease),
            poll_interval: top.poll_interval.or(self.poll_interval),
            heartbeat_interval: top.heartbeat_interval.or(self.heartbeat_interval),
            worker_id: top.worker_id.or(self.worker_id),
            unknown_task_grace: top.unknown_task_grace.or(self.unknown_task_grace),
            long_task_warning: top.long_task_warning.or(self.long_task_warning),
            events: top.events.or(self.events),
        }
    }

    /// Checks each given value on its own, naming it as its source does.
    fn check(&self) -> Result<(), crate::ConfigError> {
        if let Some((0, src)) = self.concurrency {
            return Err(CONCURRENCY.bad(src, "0".into(), "use at least 1"));
        }
        if let Some((0, src)) = self.prefetch {
            return Err(PREFETCH.bad(src, "0".into(), "use at least 1"));
        }
        if let Some((d, src)) = self.lease
            && d < MIN_LEASE
        {
            return Err(LEASE.bad(
                src,
                format!("{d:?}"),
                "use at least 100ms; leases are renewed every third of their length",
            ));
        }
        for (key, given) in [
            (POLL_INTERVAL, self.poll_interval),
            (HEARTBEAT_INTERVAL, self.heartbeat_interval),
        ] {
            if let Some((d, src)) = given
                && d.is_zero()
            {
                return Err(key.bad(src, "0".into(), "use at least 1ms"));
            }
        }
        if let Some((id, src)) = &self.worker_id
            && id.trim().is_empty()
        {
            return Err(WORKER_ID.bad(*src, id.clone(), "use a non-empty id"));
        }
        if let Some((queues, src)) = &self.queues {
            for q in queues {
                crate::envelope::validate_queue_name(q)
                    .map_err(|e| QUEUES.bad(*src, q.clone(), &e.to_string()))?;
            }
        }
        Ok(())
    }

    /// The configuration: each given value over the defaults, checked.
    /// The prefetch follows the concurrency ([`PREFETCH_PER_SLOT`] per
    /// slot) unless it was given at the same or a higher precedence.
    pub(crate) fn resolve(&self) -> Result<WorkerConfig, crate::ConfigError> {
        self.check()?;
        let mut config = WorkerConfig::default();
        if let Some((q, _)) = &self.queues {
            config.queues.clone_from(q);
        }
        if let Some((c, _)) = self.concurrency {
            config.concurrency = c;
        }
        config.prefetch = match (self.prefetch, self.concurrency) {
            (Some((p, ps)), Some((_, cs))) if ps >= cs => p,
            (_, Some((c, _))) => c.saturating_mul(PREFETCH_PER_SLOT),
            (Some((p, _)), None) => p,
            (None, None) => config.prefetch,
        };
        if let Some((d, _)) = self.shutdown_grace {
            config.shutdown_grace = d;
        }
        if let Some((d, _)) = self.lease {
            config.lease = d;
        }
        if let Some((d, _)) = self.poll_interval {
            config.poll_interval = d;
        }
        if let Some((d, _)) = self.heartbeat_interval {
            config.heartbeat_interval = d;
        }
        if let Some((id, _)) = &self.worker_id {
            config.worker_id.clone_from(id);
        }
        if let Some((d, _)) = self.unknown_task_grace {
            config.unknown_task_grace = d;
        }
        if let Some((d, _)) = self.long_task_warning {
            config.long_task_warning = d;
        }
        if let Some((on, _)) = self.events {
            config.events = on;
        }
        if config.prefetch < config.concurrency {
            let src = self
                .prefetch
                .filter(|&(p, _)| p == config.prefetch)
                .map_or(Source::Builder, |(_, s)| s);
            return Err(PREFETCH.bad(
                src,
                config.prefetch.to_string(),
                &format!(
                    "the prefetch counts running deliveries too: use at least the concurrency ({})",
                    config.concurrency
                ),
            ));
        }
        Ok(config)
    }
}

/// The shortest lease a worker takes.
const MIN_LEASE: Duration = Duration::from_millis(100);

impl WorkerConfig {
    /// The defaults with this process's `STEM_*` variables over them
    /// (`STEM_QUEUES`, `STEM_CONCURRENCY`, `STEM_PREFETCH`,
    /// `STEM_SHUTDOWN_GRACE`, `STEM_LEASE`, `STEM_POLL_INTERVAL`,
    /// `STEM_HEARTBEAT_INTERVAL`, `STEM_WORKER_ID`; blank = unset), checked.
    ///
    /// # Errors
    /// A [`crate::ConfigError::BadValue`] naming the variable.
    pub fn from_env() -> Result<Self, crate::ConfigError> {
        Settings::from_env()?.resolve()
    }

    /// As [`WorkerConfig::from_env`], reading the variables from `vars`
    /// instead of the process environment (for tests and embedding).
    ///
    /// ```
    /// use stem_core::worker::WorkerConfig;
    /// let c = WorkerConfig::from_env_map([("STEM_CONCURRENCY", "3"), ("STEM_WORKER_ID", "w1")]).unwrap();
    /// assert_eq!((c.concurrency, c.prefetch, c.worker_id.as_str()), (3, 12, "w1"));
    /// let err = WorkerConfig::from_env_map([("STEM_CONCURRENCY", "0")]).unwrap_err();
    /// assert!(err.to_string().contains("STEM_CONCURRENCY"), "{err}");
    /// ```
    ///
    /// # Errors
    /// A [`crate::ConfigError::BadValue`] naming the variable.
    pub fn from_env_map<I, K, V>(vars: I) -> Result<Self, crate::ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let vars: std::collections::HashMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.into()))
            .collect();
        Settings::parse(Source::Env, |key| vars.get(key.env).cloned())?.resolve()
    }

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
        if self.lease < MIN_LEASE {
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
        if self.worker_id.trim().is_empty() {
            return Err(bad(
                "STEM_WORKER_ID",
                self.worker_id.clone(),
                "use a non-empty id",
            ));
        }
        for q in &self.queues {
            crate::envelope::validate_queue_name(q)
                .map_err(|e| bad("STEM_QUEUES", q.clone(), &e.to_string()))?;
        }
        Ok(())
    }
}
