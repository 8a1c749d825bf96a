//! The [`Stem`] client: a broker plus an optional result backend, and the
//! process-wide default client that generated `enqueue` functions use.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use crate::backend::{DEFAULT_REVOKE_TTL, ResultBackend, TaskRecord, TaskState};
use crate::broker::{Broker, Published, QueueStats};
use crate::envelope::{Envelope, TaskId};
use crate::error::{BrokerError, ConfigError, StemError};
use crate::events::{Event, EventKind, Publisher};
use crate::url::{ConnectOptions, adapter_for, redact};

/// Environment variable naming the broker URL.
pub const ENV_BROKER_URL: &str = "STEM_BROKER_URL";
/// Environment variable naming the result backend URL.
pub const ENV_RESULT_BACKEND_URL: &str = "STEM_RESULT_BACKEND_URL";
/// Environment variable naming the namespace.
pub const ENV_NAMESPACE: &str = "STEM_NAMESPACE";
/// The namespace used when none is set.
pub const DEFAULT_NAMESPACE: &str = "stem";

/// A client: where tasks are published and results read.
///
/// Cheap to clone (one `Arc`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
/// let stem = stem_core::connect("memory://doc-client").await?;
/// assert!(stem.backend().is_some());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Stem {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Arc<dyn Broker>,
    backend: Option<Arc<dyn ResultBackend>>,
    namespace: String,
    /// `Some` when events are on: the publisher, started at the first
    /// event (inside the runtime that publishes).
    events: Option<OnceLock<Publisher>>,
}

impl std::fmt::Debug for Stem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stem")
            .field("broker", &self.inner.broker.describe())
            .field(
                "backend",
                &self.inner.backend.as_ref().map(|b| b.describe()),
            )
            .field("namespace", &self.inner.namespace)
            .field("events", &self.inner.events.is_some())
            .finish()
    }
}

static DEFAULT_CLIENT: RwLock<Option<Stem>> = RwLock::new(None);
static DEFAULT_INIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Stem {
    /// A client over an explicit broker and optional result backend.
    /// Events are on when `STEM_EVENTS` says so (a value that is not a
    /// switch word is logged and counts as off).
    #[must_use]
    pub fn new(broker: Arc<dyn Broker>, backend: Option<Arc<dyn ResultBackend>>) -> Self {
        let events = crate::events::events_from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "task events stay off");
            false
        });
        Self {
            inner: Arc::new(Inner {
                broker,
                backend,
                namespace: namespace_from_env(),
                events: events.then(OnceLock::new),
            }),
        }
    }

    /// This client with task events on or off (`sent` for every task it
    /// publishes outside a transaction; see [`crate::events`]).
    #[must_use]
    pub fn with_events(self, on: bool) -> Self {
        if on == self.inner.events.is_some() {
            return self;
        }
        Self {
            inner: Arc::new(Inner {
                broker: Arc::clone(&self.inner.broker),
                backend: self.inner.backend.clone(),
                namespace: self.inner.namespace.clone(),
                events: on.then(OnceLock::new),
            }),
        }
    }

    /// Whether this client sends task events.
    #[must_use]
    pub fn events_on(&self) -> bool {
        self.inner.events.is_some()
    }

    /// The event publisher, when events are on.
    fn publisher(&self) -> Option<&Publisher> {
        let cell = self.inner.events.as_ref()?;
        Some(cell.get_or_init(|| {
            Publisher::start(
                Arc::clone(&self.inner.broker),
                &crate::events::producer_source(),
            )
        }))
    }

    /// Sends the events this client has queued and waits until they are
    /// out (call it before a short-lived producer exits). Does nothing
    /// when events are off.
    pub async fn flush_events(&self) {
        if let Some(cell) = &self.inner.events
            && let Some(p) = cell.get()
        {
            p.flush().await;
        }
    }

    /// `sent` events for the envelopes stored (not for duplicates).
    fn announce(&self, sent: Vec<Event>, published: &[Published]) {
        let Some(publisher) = self.publisher() else {
            return;
        };
        for (event, p) in sent.into_iter().zip(published) {
            if matches!(p, Published::Stored(_)) {
                publisher.emit(event);
            }
        }
    }

    /// The `sent` events to announce after a publish, when events are on.
    fn sent_events(&self, envelopes: &[Envelope]) -> Vec<Event> {
        if self.inner.events.is_none() {
            return Vec::new();
        }
        let source = self.publisher().map_or("", Publisher::source);
        envelopes
            .iter()
            .map(|e| Event::task(EventKind::Sent, source, e))
            .collect()
    }

    /// The broker.
    #[must_use]
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// The result backend, if any.
    #[must_use]
    pub fn backend(&self) -> Option<&Arc<dyn ResultBackend>> {
        self.inner.backend.as_ref()
    }

    /// The namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Makes this the client that `my_task::enqueue(..)` uses; replaces any
    /// earlier default.
    pub fn install_default(&self) {
        let mut slot = DEFAULT_CLIENT
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(self.clone());
    }

    /// The installed default client; else one connected to
    /// `STEM_BROKER_URL`; else, when that is unset or blank, one on the
    /// embedded default broker (with the `stem` crate's default `sqlite`
    /// feature: a SQLite file at `$STEM_SQLITE_PATH`, else
    /// `$XDG_DATA_HOME/stem/stem.db`, else `~/.local/share/stem/stem.db`).
    /// The client built is installed as the default.
    ///
    /// # Errors
    /// [`StemError::NoDefaultClient`] only when nothing is installed,
    /// `STEM_BROKER_URL` is unset and no embedded adapter is linked (e.g.
    /// `stem` without its `sqlite` feature); a connect error otherwise.
    pub async fn default_client() -> Result<Self, StemError> {
        if let Some(c) = installed_default() {
            return Ok(c);
        }
        let _guard = DEFAULT_INIT.lock().await;
        if let Some(c) = installed_default() {
            return Ok(c);
        }
        let url = match std::env::var(ENV_BROKER_URL) {
            Ok(u) if !u.trim().is_empty() => u,
            _ => match default_broker_url() {
                Some(u) => u,
                None => return Err(StemError::NoDefaultClient),
            },
        };
        let client = connect(&url).await?;
        client.install_default();
        Ok(client)
    }

    /// Publishes one envelope; returns the id to track (the holder's id
    /// when a unique key was already taken).
    ///
    /// # Errors
    /// A validation or broker error (the broker validates: once, where the
    /// envelope is stored).
    pub async fn publish(&self, envelope: Envelope) -> Result<Published, StemError> {
        if self.inner.events.is_none() {
            return Ok(self.inner.broker.publish(envelope).await?);
        }
        let sent = self.sent_events(std::slice::from_ref(&envelope));
        let published = self.inner.broker.publish(envelope).await?;
        self.announce(sent, std::slice::from_ref(&published));
        Ok(published)
    }

    /// Publishes many envelopes in one broker call.
    ///
    /// # Errors
    /// A validation or broker error.
    pub async fn publish_many(
        &self,
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<Published>, StemError> {
        let sent = self.sent_events(&envelopes);
        let published = self.inner.broker.publish_many(envelopes).await?;
        self.announce(sent, &published);
        Ok(published)
    }

    /// Publishes envelopes inside the caller's own open transaction, so
    /// they exist if and only if it commits ([`Broker::publish_in`]).
    ///
    /// # Errors
    /// `Unsupported` on an adapter without transactions, `Invalid` for a
    /// transaction of the wrong type or not begun, or a validation error.
    pub async fn publish_in(
        &self,
        tx: &mut (dyn std::any::Any + Send),
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<Published>, StemError> {
        Ok(self.inner.broker.publish_in(tx, envelopes).await?)
    }

    /// Ready, delayed, leased and dead counts of `queue` (B13).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
    /// let stem = stem_core::connect("memory://client-stats-doc").await?;
    /// assert_eq!(stem.stats("default").await?.ready, 0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `Unsupported` when the adapter cannot inspect queues, or a broker
    /// error.
    pub async fn stats(&self, queue: &str) -> Result<QueueStats, StemError> {
        let admin = self.inner.broker.queues().ok_or(BrokerError::Unsupported {
            adapter: "this broker",
            operation: "queue stats",
            hint: "use an adapter with QueueAdmin (memory, sqlite)",
        })?;
        Ok(admin.stats(queue).await?)
    }

    /// Revokes a task: a worker that receives it acks it without running it
    /// and records `Revoked`.
    ///
    /// # Errors
    /// [`StemError::NoResultBackend`], or a backend error.
    pub async fn revoke(&self, id: TaskId) -> Result<(), StemError> {
        let backend = self.backend().ok_or(StemError::NoResultBackend)?;
        backend.revoke(id, DEFAULT_REVOKE_TTL).await?;
        let mut rec = TaskRecord::new(id, TaskState::Revoked);
        rec.ttl = DEFAULT_REVOKE_TTL;
        backend.store(rec).await?;
        Ok(())
    }

    /// Moves dead letters of `queue` back to it (B7) after forgetting
    /// their tasks' records (R8), so each replayed task records its new
    /// run instead of keeping the terminal record of its old one. Use this
    /// rather than [`DeadLetters::replay`](crate::DeadLetters::replay)
    /// alone whenever the client has a result backend. (With
    /// [`Replay::All`](crate::broker::Replay::All), a task dead-lettered between the listing and the
    /// replay is replayed with its old record kept.)
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
    /// let stem = stem_core::connect("memory://replay-doc").await?;
    /// assert_eq!(stem.replay_dead_letters("default", stem_core::Replay::All, false).await?, 0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `Unsupported` when the broker has no dead-letter administration, or
    /// a broker or backend error (nothing is replayed when forgetting
    /// fails).
    pub async fn replay_dead_letters(
        &self,
        queue: &str,
        which: crate::broker::Replay,
        reset_attempts: bool,
    ) -> Result<u64, StemError> {
        let dead = self
            .inner
            .broker
            .dead_letters()
            .ok_or(BrokerError::Unsupported {
                adapter: "this broker",
                operation: "dead-letter replay",
                hint: "use an adapter with DeadLetters (memory, sqlite, redis, postgres)",
            })?;
        if let Some(backend) = self.backend() {
            let ids = match which {
                crate::broker::Replay::One(id) => vec![id],
                crate::broker::Replay::All => {
                    let mut ids = Vec::new();
                    let mut cursor: Option<String> = None;
                    loop {
                        let page = dead.list(queue, cursor.as_deref(), 500).await?;
                        ids.extend(
                            page.items
                                .iter()
                                .filter(|d| d.envelope.is_some())
                                .map(|d| d.id),
                        );
                        match page.next {
                            Some(next) => cursor = Some(next),
                            None => break,
                        }
                    }
                    ids
                }
            };
            for chunk in ids.chunks(1000) {
                backend.forget(chunk).await?;
            }
        }
        Ok(dead.replay(queue, which, reset_attempts).await?)
    }

    /// A task's current state; `Pending` when nothing is recorded yet.
    ///
    /// # Errors
    /// [`StemError::NoResultBackend`], or a backend error.
    pub async fn state(&self, id: TaskId) -> Result<TaskState, StemError> {
        let backend = self.backend().ok_or(StemError::NoResultBackend)?;
        Ok(backend
            .get(id)
            .await?
            .map_or(TaskState::Pending, |r| r.state))
    }

    /// Waits for a task's record to be terminal.
    ///
    /// # Errors
    /// [`StemError::NoResultBackend`], or a backend error.
    pub async fn wait_record(
        &self,
        id: TaskId,
        timeout: Duration,
    ) -> Result<Option<TaskRecord>, StemError> {
        let backend = self.backend().ok_or(StemError::NoResultBackend)?;
        Ok(backend.wait(id, timeout).await?)
    }
}

fn installed_default() -> Option<Stem> {
    DEFAULT_CLIENT
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// The URL used when `STEM_BROKER_URL` is unset: the embedded adapter's
/// default (a SQLite file, when the `sqlite` feature is on).
fn default_broker_url() -> Option<String> {
    crate::url::embedded_default_url()
}

/// The namespace from `STEM_NAMESPACE`, or `stem`.
#[must_use]
pub fn namespace_from_env() -> String {
    std::env::var(ENV_NAMESPACE)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
}

/// Connects a client: the broker named by `url`, and a result backend from
/// `STEM_RESULT_BACKEND_URL`, or from the same URL when its adapter stores
/// results too.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let err = stem_core::connect("nope://user:secret@host").await.unwrap_err();
/// assert!(!err.to_string().contains("secret"));
/// # }
/// ```
///
/// # Errors
/// [`ConfigError::UnknownScheme`] / [`ConfigError::BadUrl`], or the
/// adapter's connect error.
pub async fn connect(url: &str) -> Result<Stem, StemError> {
    let namespace = namespace_from_env();
    let backend_url = std::env::var(ENV_RESULT_BACKEND_URL)
        .ok()
        .filter(|s| !s.trim().is_empty());
    connect_with(url, backend_url.as_deref(), &namespace).await
}

/// Opens only the broker named by `url` (no result backend), in `namespace`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
/// let broker = stem_core::client::open_broker("memory://open-broker-doc", "stem").await?;
/// let stem = stem_core::Stem::new(broker, None); // a client that writes no results
/// assert!(stem.backend().is_none());
/// # Ok(()) }
/// ```
///
/// # Errors
/// An unknown scheme, a URL whose adapter is not a broker, or a connect error.
pub async fn open_broker(url: &str, namespace: &str) -> Result<Arc<dyn Broker>, StemError> {
    let adapter = adapter_for(url)?;
    let open = adapter.broker.ok_or_else(|| ConfigError::BadUrl {
        url: redact(url),
        reason: format!("the `{}` adapter is not a broker", adapter.scheme),
    })?;
    open(ConnectOptions {
        url: url.to_owned(),
        namespace: namespace.to_owned(),
    })
    .await
}

/// Opens only the result backend named by `url`, in `namespace`.
///
/// # Errors
/// An unknown scheme, a URL whose adapter stores no results, or a connect error.
pub async fn open_backend(url: &str, namespace: &str) -> Result<Arc<dyn ResultBackend>, StemError> {
    let adapter = adapter_for(url)?;
    let open = adapter.backend.ok_or_else(|| ConfigError::BadUrl {
        url: redact(url),
        reason: format!("the `{}` adapter is not a result backend", adapter.scheme),
    })?;
    open(ConnectOptions {
        url: url.to_owned(),
        namespace: namespace.to_owned(),
    })
    .await
}

/// Like [`connect`] with an explicit backend URL (`None`: the broker's own
/// when it has one) and namespace.
///
/// # Errors
/// As [`connect`].
pub async fn connect_with(
    broker_url: &str,
    backend_url: Option<&str>,
    namespace: &str,
) -> Result<Stem, StemError> {
    let broker = open_broker(broker_url, namespace).await?;
    let backend = match backend_url {
        Some(u) => Some(open_backend(u, namespace).await?),
        None if adapter_for(broker_url)?.backend.is_some() => {
            Some(open_backend(broker_url, namespace).await?)
        }
        None => None,
    };
    let events = crate::events::events_from_env()?;
    Ok(Stem {
        inner: Arc::new(Inner {
            broker,
            backend,
            namespace: namespace.to_owned(),
            events: events.then(OnceLock::new),
        }),
    })
}
