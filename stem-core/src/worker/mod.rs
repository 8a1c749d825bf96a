//! The worker runtime: fetch, execute, complete, keep leases alive, retry,
//! dead-letter, shut down gracefully.
//!
//! `stem::worker::run().await` is a complete worker binary's `main`; the
//! [`Worker::builder`] is the programmatic form.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use stem_core::worker::Worker;
//! let stem = stem_core::connect("memory://worker-doc").await?;
//! let worker = Worker::builder()
//!     .client(&stem)
//!     .queues(["default"])
//!     .concurrency(4)
//!     .shutdown_grace(Duration::from_secs(5))
//!     .build()
//!     .await?;
//! let handle = worker.start();
//! handle.shutdown();
//! let report = handle.join().await;
//! println!("{} tasks succeeded", report.succeeded);
//! # Ok(()) }
//! ```
//!
//! # Linking tasks
//! Tasks are found through `inventory` at link time. A crate whose tasks
//! are never referenced from the worker binary may be dropped by the
//! linker, tasks and all: reference it (`use my_tasks as _;` is not
//! enough on every platform; call anything in it, or name one of its
//! tasks, e.g. `let _ = my_tasks::send_email::NAME;`). A worker that finds
//! no task at all refuses to start and says so.

#[macro_use]
mod failpoint;

mod completer;
mod config;
mod control;
mod dispatch;
mod executor;
mod fetcher;
mod groups;
mod lease;
mod live;
mod maintenance;
mod rate;
mod shutdown;
mod supervisor;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{
    DEFAULT_LONG_TASK_WARNING, DEFAULT_UNKNOWN_TASK_GRACE, PREFETCH_PER_SLOT, WorkerArgs,
    WorkerConfig, default_worker_id, host_name,
};

use crate::backend::ResultBackend;
use crate::broker::Broker;
use crate::client::Stem;
use crate::context::{ContextShared, StateMap};
use crate::error::{ConfigError, StemError};
use crate::registry::{RegistryError, TaskEntry};

/// Why a worker could not start. Its `Debug` is the readable message
/// chain, as [`StemError`]'s is.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The task registry is inconsistent.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The client could not be built.
    #[error(transparent)]
    Stem(#[from] StemError),
    /// No tasks are linked into this binary.
    #[error(
        "no tasks are registered in this binary: define tasks with #[stem::task] in it, or reference the crate that defines them (e.g. `let _ = my_tasks::my_task::NAME;`) so the linker keeps it"
    )]
    NoTasks,
    /// Flags could not be parsed.
    #[error("{0}")]
    Args(String),
    /// The worker stopped by itself because its broker cannot go on
    /// (e.g. its SQLite file was deleted under it); the reason is logged.
    #[error("the worker stopped: {0}; restart it so it connects again")]
    Stopped(String),
}

impl std::fmt::Debug for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::error::fmt_chain(self, f)
    }
}

/// Counters of what a worker did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Attempts started.
    pub started: u64,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed and were scheduled again.
    pub retried: u64,
    /// Tasks that failed for good.
    pub failed: u64,
    /// Deliveries moved to the dead-letter store.
    pub dead_lettered: u64,
    /// Revoked deliveries skipped.
    pub revoked: u64,
    /// Deliveries put back at shutdown without charging an attempt.
    pub requeued: u64,
}

/// On cache lines of its own: bumped by every slot.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Counters {
    started: AtomicU64,
    succeeded: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    revoked: AtomicU64,
    requeued: AtomicU64,
}

impl Runtime {
    /// Hands a finished step to the completer. The completer outlives
    /// every sender, so this fails only if it crashed; then the delivery is
    /// left to its lease (delivered again), and the loss is logged.
    pub(crate) fn complete(&self, completion: completer::Completion) {
        if let Err(e) = self.completions.send(completion) {
            let c = e.0;
            tracing::error!(
                task_id = ?c.settle.as_ref().map(|(r, _)| r.task_id),
                "the completer is gone: this delivery is not settled and will be delivered again after its lease"
            );
        }
    }

    /// Hands a delivery back without charging an attempt (shutdown, a
    /// prefetched delivery, a rate-limited task).
    pub(crate) fn release(&self, receipt: crate::broker::Receipt, after: Duration) {
        self.complete(completer::Completion::settle(
            receipt,
            crate::broker::Disposition::Release { after },
            completer::Count::Requeued,
        ));
    }
}

impl Counters {
    /// Attempts finished, whatever their outcome.
    pub(crate) fn processed(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
            + self.retried.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
            + self.dead_lettered.load(Ordering::Relaxed)
    }

    fn report(&self) -> WorkerReport {
        WorkerReport {
            started: self.started.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            revoked: self.revoked.load(Ordering::Relaxed),
            requeued: self.requeued.load(Ordering::Relaxed),
        }
    }
}

/// What every part of a running worker shares.
pub(crate) struct Runtime {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) backend: Option<Arc<dyn ResultBackend>>,
    pub(crate) config: WorkerConfig,
    /// Looked up once per delivery: with foldhash, not `SipHash` (task
    /// names come from this binary, not from outsiders).
    pub(crate) tasks: HashMap<&'static str, &'static TaskEntry, foldhash::fast::RandomState>,
    pub(crate) known_names: String,
    /// The worker id, shared by every record and context.
    pub(crate) worker_id: Arc<str>,
    /// What every task's [`crate::Context`] shares.
    pub(crate) ctx_shared: Arc<ContextShared>,
    /// The hand-off from the fetcher to the executor slots.
    pub(crate) dispatch: dispatch::Dispatch,
    /// Stop fetching.
    pub(crate) stop: CancellationToken,
    /// Grace over: drop running tasks and requeue them.
    pub(crate) abort: CancellationToken,
    /// Stop now: end the grace at once (a second SIGINT or SIGTERM, or
    /// [`WorkerHandle::force_stop`]).
    pub(crate) force: CancellationToken,
    pub(crate) completions: mpsc::UnboundedSender<completer::Completion>,
    pub(crate) tracker: TaskTracker,
    pub(crate) counters: Arc<Counters>,
    pub(crate) rates: rate::RateLimits,
    /// Why the worker stopped by itself, when it did.
    pub(crate) fatal: Arc<std::sync::OnceLock<String>>,
    /// Task names this worker does not know and has warned about once.
    pub(crate) unknown_warned: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Running tasks, revoked ids, paused queues (the control plane's).
    pub(crate) live: live::Live,
    /// Task and worker events, when on.
    pub(crate) events: Option<crate::events::Publisher>,
    /// When the worker started.
    pub(crate) started: std::time::Instant,
    /// The tasks this binary runs, as heartbeats advertise them.
    pub(crate) advertised: Vec<crate::backend::AdvertisedTask>,
}

impl Runtime {
    /// Queues an event when events are on; `make` runs only then.
    pub(crate) fn event(
        &self,
        make: impl FnOnce(&crate::events::Publisher) -> crate::events::Event,
    ) {
        if let Some(p) = &self.events {
            p.emit(make(p));
        }
    }
}

/// Builds a [`Worker`].
///
/// Settings start from the defaults with the `STEM_*` variables over them
/// (read at [`build`](WorkerBuilder::build), as [`WorkerConfig::from_env`]
/// does); each builder call wins over its variable. Every value is checked
/// at `build`, and a bad one is a [`ConfigError::BadValue`] naming the
/// variable, flag or builder method that set it.
#[derive(Debug, Default)]
pub struct WorkerBuilder {
    client: Option<Stem>,
    /// Flags (from [`builder_from_args`]) and builder calls.
    settings: config::Settings,
    states: StateMap,
}

impl WorkerBuilder {
    /// Uses `client` (default: the process's default client).
    #[must_use]
    pub fn client(mut self, client: &Stem) -> Self {
        self.client = Some(client.clone());
        self
    }

    /// Registers shared state, injected into tasks taking `State<T>`.
    #[must_use]
    pub fn state<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.states.insert(value);
        self
    }

    /// Queues to consume (default: `STEM_QUEUES`, else every registered
    /// task's queue).
    #[must_use]
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let queues = queues.into_iter().map(Into::into).collect();
        self.settings.queues = Some((queues, config::Source::Builder));
        self
    }

    /// Tasks run at once. Unless a prefetch is set here (or by a
    /// `config`), the prefetch follows: [`PREFETCH_PER_SLOT`] deliveries
    /// per slot.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = Some((n, config::Source::Builder));
        self
    }

    /// Deliveries the worker holds leased at most, running or waiting for
    /// a slot (at least the concurrency). More than the concurrency lets a
    /// slot that finishes start the next task at once and lets the worker
    /// claim in batches; fewer spreads work more evenly over many workers
    /// when tasks are slow. Equal to the concurrency: no task waits.
    #[must_use]
    pub fn prefetch(mut self, n: usize) -> Self {
        self.settings.prefetch = Some((n, config::Source::Builder));
        self
    }

    /// Time in-flight tasks get to finish after shutdown is asked.
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.settings.shutdown_grace = Some((grace, config::Source::Builder));
        self
    }

    /// How long a task this worker does not know is handed back for other
    /// workers before it is dead-lettered (`STEM_UNKNOWN_TASK_GRACE`).
    #[must_use]
    pub fn unknown_task_grace(mut self, grace: Duration) -> Self {
        self.settings.unknown_task_grace = Some((grace, config::Source::Builder));
        self
    }

    /// How long a task without a time limit runs before the worker logs a
    /// warning about it, once per run (`STEM_LONG_TASK_WARNING`).
    #[must_use]
    pub fn long_task_warning(mut self, after: Duration) -> Self {
        self.settings.long_task_warning = Some((after, config::Source::Builder));
        self
    }

    /// Lease per delivery.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = Some((lease, config::Source::Builder));
        self
    }

    /// Longest a fetch waits for work.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = Some((interval, config::Source::Builder));
        self
    }

    /// Sends task and worker events (`STEM_EVENTS`, flag `--events`).
    #[must_use]
    pub fn events(mut self, on: bool) -> Self {
        self.settings.events = Some((on, config::Source::Builder));
        self
    }

    /// Heartbeat interval.
    #[must_use]
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.settings.heartbeat_interval = Some((interval, config::Source::Builder));
        self
    }

    /// This worker's id.
    #[must_use]
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.settings.worker_id = Some((id.into(), config::Source::Builder));
        self
    }

    /// Replaces the whole configuration: the variables and every earlier
    /// call are overridden; later calls still change it.
    #[must_use]
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.settings = config::Settings::all_from(&config, config::Source::Builder);
        self
    }

    /// Reads the `STEM_*` variables under the flags and builder calls,
    /// checks the registry and configuration and builds the worker.
    ///
    /// # Errors
    /// Duplicate task names (both locations), a task needing state the
    /// worker lacks, no tasks at all, bad settings, or no client.
    pub async fn build(self) -> Result<Worker, WorkerError> {
        let mut config = config::Settings::from_env()?
            .over(self.settings)
            .resolve()?;
        let tasks = crate::registry::build_index(crate::registry::entries())?;
        if tasks.is_empty() {
            return Err(WorkerError::NoTasks);
        }
        crate::registry::check_states(tasks.values().copied(), &self.states)?;
        let client = match self.client {
            Some(c) => c,
            None => Stem::default_client().await?,
        };
        if config.events && client.broker().broadcast().is_none() {
            return Err(WorkerError::Stem(StemError::NoBroadcast {
                adapter: client.broker().describe(),
            }));
        }
        if config.queues.is_empty() {
            let set: BTreeSet<&str> = tasks.values().map(|t| t.options.queue).collect();
            config.queues = set.into_iter().map(str::to_owned).collect();
        }
        Ok(Worker {
            client,
            config,
            states: Arc::new(self.states),
            tasks,
        })
    }
}

/// A configured worker, ready to [`run`](Worker::run) or [`start`](Worker::start).
pub struct Worker {
    client: Stem,
    config: WorkerConfig,
    states: Arc<StateMap>,
    tasks: HashMap<&'static str, &'static TaskEntry>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.tasks.keys().collect();
        names.sort();
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("tasks", &names)
            .field("states", &self.states)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A builder: the defaults, under the `STEM_*` variables (read at
    /// [`WorkerBuilder::build`]), under its own calls.
    #[must_use]
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Starts the worker in the background.
    #[must_use]
    pub fn start(self) -> WorkerHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut names: Vec<&str> = self.tasks.keys().copied().collect();
        names.sort_unstable();
        let advertised = names
            .iter()
            .filter_map(|n| self.tasks.get(n))
            .map(|t| crate::backend::AdvertisedTask {
                name: t.name.to_owned(),
                queue: t.options.queue.to_owned(),
                priority: t.options.priority,
                retries: t.options.retries,
            })
            .collect();
        let events = self.config.events.then(|| {
            crate::events::Publisher::start(
                Arc::clone(self.client.broker()),
                &self.config.worker_id,
            )
        });
        let worker_id: Arc<str> = Arc::from(self.config.worker_id.as_str());
        let (concurrency, prefetch) = (self.config.concurrency, self.config.prefetch);
        let abort = CancellationToken::new();
        let ctx_shared = Arc::new(ContextShared {
            broker: Arc::clone(self.client.broker()),
            backend: self.client.backend().cloned(),
            client: Some(self.client.clone()),
            states: self.states,
            cancel: abort.clone(),
            worker_id: Arc::clone(&worker_id),
            blocking: Arc::default(),
        });
        let rt = Arc::new(Runtime {
            broker: Arc::clone(self.client.broker()),
            backend: self.client.backend().cloned(),
            rates: rate::RateLimits::new(self.tasks.values().copied()),
            config: self.config,
            tasks: self.tasks.into_iter().collect(),
            known_names: names.join(", "),
            worker_id,
            ctx_shared,
            dispatch: dispatch::Dispatch::new(concurrency, prefetch),
            stop: CancellationToken::new(),
            force: CancellationToken::new(),
            fatal: Arc::new(std::sync::OnceLock::new()),
            abort,
            completions: tx,
            tracker: TaskTracker::new(),
            counters: Arc::new(Counters::default()),
            unknown_warned: std::sync::Mutex::new(std::collections::HashSet::new()),
            live: live::Live::default(),
            events,
            started: std::time::Instant::now(),
            advertised,
        });
        // The executor slots start now, so the fetcher's first claim is
        // not held up by starting them.
        for _ in 0..concurrency {
            rt.tracker.spawn(executor::slot(Arc::clone(&rt)));
        }
        let stop = rt.stop.clone();
        let force = rt.force.clone();
        let fatal = Arc::clone(&rt.fatal);
        let join = tokio::spawn(supervisor::supervise(rt, rx));
        WorkerHandle {
            stop,
            force,
            join,
            fatal,
        }
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    ///
    /// # Errors
    /// Only if the signal handlers cannot be installed.
    ///
    /// A second SIGINT or SIGTERM during the grace stops the running tasks
    /// at once and hands them back ([`WorkerHandle::force_stop`]).
    pub async fn run(self) -> Result<WorkerReport, WorkerError> {
        self.run_signalled(shutdown::signal(), shutdown::signal)
            .await
    }

    /// Runs until `signal` resolves, then shuts down gracefully.
    ///
    /// # Errors
    /// None today; reserved for start-up failures.
    pub async fn run_until<F>(self, signal: F) -> Result<WorkerReport, WorkerError>
    where
        F: std::future::Future<Output = ()> + Send,
    {
        self.run_signalled(signal, std::future::pending::<()>).await
    }

    /// Runs until `signal`, then shuts down gracefully; the future `again`
    /// makes, if it resolves during the grace, stops at once.
    async fn run_signalled<F, G, M>(self, signal: F, again: M) -> Result<WorkerReport, WorkerError>
    where
        F: std::future::Future<Output = ()> + Send,
        G: std::future::Future<Output = ()> + Send + 'static,
        M: FnOnce() -> G,
    {
        let handle = self.start();
        let mut forcing = None;
        tokio::select! {
            () = signal => {
                tracing::info!("shutdown requested: no new tasks; waiting for running ones (signal again to stop them now)");
                handle.shutdown();
                let force = handle.force.clone();
                let again = again();
                forcing = Some(tokio::spawn(async move {
                    again.await;
                    tracing::warn!("second shutdown signal: stopping running tasks now and handing them back");
                    force.cancel();
                }));
            }
            () = handle.stopping() => {}
        }
        let fatal = handle.stopped_by_itself().map(str::to_owned);
        let report = handle.join().await;
        if let Some(f) = forcing {
            f.abort();
        }
        match fatal {
            Some(reason) => Err(WorkerError::Stopped(reason)),
            None => Ok(report),
        }
    }
}

/// Controls a started worker.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: CancellationToken,
    force: CancellationToken,
    join: tokio::task::JoinHandle<WorkerReport>,
    fatal: Arc<std::sync::OnceLock<String>>,
}

impl WorkerHandle {
    /// Asks the worker to stop: no new fetches; running tasks get the grace
    /// period; what is left is requeued.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Stops at once: like [`WorkerHandle::shutdown`], but running tasks
    /// are stopped now instead of at the end of the grace period (their
    /// futures are dropped, blocking ones see `ctx.is_cancelled()`), and
    /// handed back without an attempt charged. What a second SIGINT or
    /// SIGTERM does to [`Worker::run`].
    pub fn force_stop(&self) {
        self.stop.cancel();
        self.force.cancel();
    }

    /// Resolves when the worker is stopping: asked to, or by itself.
    pub async fn stopping(&self) {
        self.stop.cancelled().await;
    }

    /// Why the worker stopped by itself, if it did (its broker could not
    /// go on).
    #[must_use]
    pub fn stopped_by_itself(&self) -> Option<&str> {
        self.fatal.get().map(String::as_str)
    }

    /// Waits for the worker to stop and returns what it did.
    pub async fn join(self) -> WorkerReport {
        match self.join.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "worker supervisor ended abnormally");
                WorkerReport::default()
            }
        }
    }
}

/// Runs a worker configured from `STEM_*` variables and command-line flags
/// until SIGINT/SIGTERM: the whole `main` of a worker binary.
///
/// ```no_run
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     stem_core::worker::run().await?;
///     Ok(())
/// }
/// ```
///
/// Needs the `cli` feature (on in the `stem` facade by default), which
/// parses the flags with clap.
///
/// # Errors
/// Bad flags or variables, registry problems, or a connect error.
#[cfg(feature = "cli")]
pub async fn run() -> Result<WorkerReport, WorkerError> {
    use clap::Parser as _;
    let args = match WorkerArgs::try_parse_from(std::env::args_os()) {
        Ok(a) => a,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => return Err(WorkerError::Args(e.to_string())),
    };
    builder_from_args(&args).await?.build().await?.run().await
}

/// A builder configured from parsed flags, connected to the broker they
/// (or `STEM_BROKER_URL`) name, else to the default client. The worker
/// settings' variables are read under the flags at `build`.
///
/// # Errors
/// A bad flag value ([`ConfigError::BadValue`] naming the flag), or a
/// connect error.
pub async fn builder_from_args(args: &WorkerArgs) -> Result<WorkerBuilder, WorkerError> {
    let mut builder = Worker::builder();
    builder.settings = args.settings()?;
    if let Some(url) = &args.broker_url {
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(crate::client::namespace_from_env);
        let client =
            crate::client::connect_with(url, args.result_backend_url.as_deref(), &namespace)
                .await?;
        builder = builder.client(&client);
    }
    Ok(builder)
}
