//! Task events for monitors: what producers and workers did, as a stream.
//!
//! Events are off by default and cost nothing then (one flag is read).
//! Turned on (`STEM_EVENTS=1` for producers and workers,
//! [`WorkerBuilder::events`](crate::worker::WorkerBuilder::events), or
//! [`Stem::with_events`]), each event is queued in memory and a background
//! task sends them in batches (one broadcast message per batch, at most
//! every [`FLUSH_EVERY`]) on the namespace's channel [`EVENTS_CHANNEL`].
//! Events are for watching, not for bookkeeping: a batch that cannot be
//! sent is dropped with a warning, at most [`MAX_QUEUED`] events wait
//! unsent (more are dropped and counted in a warning), and a subscriber
//! hears only what is sent while it listens.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
//! use futures::StreamExt as _;
//! let stem = stem_core::connect("memory://events-doc").await?.with_events(true);
//! let mut events = stem.events().await?;
//! stem.publish(stem_core::Envelope::new("send_email", "default", serde_json::json!({}))?)
//!     .await?;
//! let event = events.next().await.unwrap();
//! assert_eq!(event.kind, stem_core::events::EventKind::Sent);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::client::Stem;
use crate::envelope::{Envelope, TaskId};
use crate::error::StemError;

/// The broadcast channel events go out on.
pub const EVENTS_CHANNEL: &str = "stem.events";

/// The event format this crate writes.
pub const EVENTS_VERSION: u32 = 1;

/// Environment variable that turns events on (`1`, `true`, `yes`, `on`).
pub const ENV_EVENTS: &str = "STEM_EVENTS";

/// Longest an event waits in memory before its batch is sent.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Most events in one broadcast message.
const MAX_BATCH: usize = 500;

/// Most events a process holds unsent; past it new events are dropped
/// (and counted in a warning) rather than growing memory without bound
/// while the broker is slow or away.
pub const MAX_QUEUED: usize = 100_000;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// A producer published the task.
    Sent,
    /// A worker leased the task.
    Received,
    /// An attempt started.
    Started,
    /// An attempt succeeded (`duration_ms`).
    Succeeded,
    /// The task failed for good (`error`).
    Failed,
    /// An attempt failed and another is scheduled (`error`, `next_at`).
    Retried,
    /// The task was revoked: skipped, or stopped while it ran.
    Revoked,
    /// The task went to the dead-letter store (`reason`).
    DeadLettered,
    /// A worker started.
    WorkerOnline,
    /// A worker is alive (`active`, `processed`).
    WorkerHeartbeat,
    /// A worker stopped.
    WorkerOffline,
}

impl EventKind {
    /// The wire name, e.g. `dead_lettered`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Received => "received",
            Self::Started => "started",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::Revoked => "revoked",
            Self::DeadLettered => "dead_lettered",
            Self::WorkerOnline => "worker_online",
            Self::WorkerHeartbeat => "worker_heartbeat",
            Self::WorkerOffline => "worker_offline",
        }
    }
}

/// One event. Task events carry the task's id, name and queue; the other
/// fields are set where the kind says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// When.
    pub at: DateTime<Utc>,
    /// Who: a worker id, or `producer:<host>:<pid>`.
    pub source: String,
    /// The task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// The task's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The task's queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The attempt (1 for the first run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How long the attempt ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the next attempt may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_at: Option<DateTime<Utc>>,
    /// Why it was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Tasks running on the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<usize>,
    /// Attempts the worker finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed: Option<u64>,
}

impl Event {
    /// An event of `kind` from `source`, now, with no task.
    #[must_use]
    pub fn new(kind: EventKind, source: &str) -> Self {
        Self {
            kind,
            at: Utc::now(),
            source: source.to_owned(),
            task_id: None,
            name: None,
            queue: None,
            attempt: None,
            duration_ms: None,
            error: None,
            next_at: None,
            reason: None,
            active: None,
            processed: None,
        }
    }

    /// An event about the task of `envelope`.
    #[must_use]
    pub fn task(kind: EventKind, source: &str, envelope: &Envelope) -> Self {
        let mut e = Self::new(kind, source);
        e.task_id = Some(envelope.id);
        e.name = Some(envelope.name.clone());
        e.queue = Some(envelope.queue.clone());
        e
    }
}

/// A batch on the wire.
#[derive(Deserialize)]
struct Batch {
    events: Vec<Event>,
}

/// A batch as written, borrowing the events.
#[derive(Serialize)]
struct BatchOut<'a> {
    v: u32,
    events: &'a [Event],
}

/// Whether `STEM_EVENTS` turns events on.
///
/// # Errors
/// A value that is not a boolean word, as a message naming the variable.
pub fn events_from_env() -> Result<bool, crate::error::ConfigError> {
    match std::env::var(ENV_EVENTS) {
        Err(_) => Ok(false),
        Ok(v) => parse_switch(&v).ok_or_else(|| crate::error::ConfigError::BadValue {
            key: ENV_EVENTS.to_owned(),
            value: v.clone(),
            reason: String::from("expected 1/true/yes/on or 0/false/no/off"),
        }),
    }
}

pub(crate) fn parse_switch(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "" | "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

enum Msg {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

/// Queues events and sends them in batches from a background task.
#[derive(Clone)]
pub(crate) struct Publisher {
    tx: mpsc::UnboundedSender<Msg>,
    source: Arc<str>,
    /// Events queued and not yet taken by the sender, and events dropped
    /// because [`MAX_QUEUED`] were.
    load: Arc<Load>,
}

#[derive(Default)]
struct Load {
    queued: AtomicUsize,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Starts the sender task (needs a Tokio runtime).
    pub(crate) fn start(broker: Arc<dyn crate::broker::Broker>, source: &str) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let load = Arc::new(Load::default());
        tokio::spawn(send_loop(broker, rx, Arc::clone(&load)));
        Self {
            tx,
            source: Arc::from(source),
            load,
        }
    }

    /// The `source` of this publisher's events.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Queues an event (never waits); drops it when [`MAX_QUEUED`] wait.
    pub(crate) fn emit(&self, event: Event) {
        if self.load.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            self.load.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.send(Msg::Event(Box::new(event))).is_err() {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// An event of this publisher without a task.
    pub(crate) fn task_free(&self, kind: EventKind) -> Event {
        Event::new(kind, &self.source)
    }

    /// A task event about `envelope` (queue it with [`Publisher::emit`]).
    pub(crate) fn task(&self, kind: EventKind, envelope: &Envelope) -> Event {
        Event::task(kind, &self.source, envelope)
    }

    /// Sends what is queued and waits until it is sent (or failed).
    pub(crate) async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn send_loop(
    broker: Arc<dyn crate::broker::Broker>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    load: Arc<Load>,
) {
    let mut batch = Vec::new();
    let mut waiters = Vec::new();
    let mut warned = false;
    let take = |m: Msg, batch: &mut Vec<Event>, waiters: &mut Vec<oneshot::Sender<()>>| match m {
        Msg::Event(e) => {
            load.queued.fetch_sub(1, Ordering::Relaxed);
            batch.push(*e);
        }
        Msg::Flush(w) => waiters.push(w),
    };
    while let Some(first) = rx.recv().await {
        take(first, &mut batch, &mut waiters);
        // Gather what comes within the flush period, unless asked to flush.
        if waiters.is_empty() {
            let gather = tokio::time::sleep(FLUSH_EVERY);
            tokio::pin!(gather);
            loop {
                tokio::select! {
                    () = &mut gather => break,
                    m = rx.recv() => match m {
                        Some(m) => {
                            take(m, &mut batch, &mut waiters);
                            if !waiters.is_empty() {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        }
        while let Ok(m) = rx.try_recv() {
            take(m, &mut batch, &mut waiters);
        }
        for chunk in batch.chunks(MAX_BATCH) {
            send(&*broker, chunk, &mut warned).await;
        }
        batch.clear();
        let dropped = load.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                limit = MAX_QUEUED,
                "task events dropped: more were waiting to be sent than the limit (the broker is slow or away; events are best effort)"
            );
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

async fn send(broker: &dyn crate::broker::Broker, events: &[Event], warned: &mut bool) {
    let Some(broadcast) = broker.broadcast() else {
        return;
    };
    let payload = match serde_json::to_string(&BatchOut {
        v: EVENTS_VERSION,
        events,
    }) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "task events do not encode; dropped");
            return;
        }
    };
    match broadcast.send(EVENTS_CHANNEL, &payload).await {
        Ok(()) => *warned = false,
        Err(e) => {
            // Once per run of failures, not once per batch.
            if !*warned {
                tracing::warn!(error = %e, count = events.len(), "could not send task events; dropped (events are best effort)");
                *warned = true;
            }
        }
    }
}

/// A live stream of events, from [`Stem::events`].
pub type EventStream = BoxStream<'static, Event>;

impl Stem {
    /// Subscribes to the namespace's events: every event producers and
    /// workers with events on send from now on.
    ///
    /// # Errors
    /// [`StemError::NoBroadcast`] when the broker has no broadcast
    /// channel, or a broker error subscribing.
    pub async fn events(&self) -> Result<EventStream, StemError> {
        let broadcast = crate::control::broadcast_of(self)?;
        let stream = broadcast.subscribe(EVENTS_CHANNEL).await?;
        Ok(stream
            .flat_map(|msg| {
                let events = match serde_json::from_str::<Batch>(&msg.payload) {
                    Ok(b) => b.events,
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable event batch ignored");
                        Vec::new()
                    }
                };
                futures::stream::iter(events)
            })
            .boxed())
    }
}

/// The `source` of a producer's events: `producer:<host>:<pid>`.
pub(crate) fn producer_source() -> String {
    format!(
        "producer:{}:{}",
        crate::worker::host_name(),
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_flat_wire_form() {
        let mut e = Event::new(EventKind::DeadLettered, "w1");
        e.reason = Some(String::from("retries exhausted"));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["type"], "dead_lettered");
        assert_eq!(json["source"], "w1");
        assert_eq!(json["reason"], "retries exhausted");
        assert!(json.get("task_id").is_none());
        assert_eq!(EventKind::DeadLettered.name(), "dead_lettered");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_publisher_holds_at_most_max_queued_events() {
        let broker: Arc<dyn crate::broker::Broker> = Arc::new(crate::memory::InMemoryBroker::new());
        let p = Publisher::start(broker, "w");
        // The sender task cannot run before this test yields.
        for _ in 0..MAX_QUEUED + 10 {
            p.emit(p.task_free(EventKind::WorkerHeartbeat));
        }
        assert_eq!(p.load.queued.load(Ordering::Relaxed), MAX_QUEUED);
        assert_eq!(p.load.dropped.load(Ordering::Relaxed), 10);
        p.flush().await;
        assert_eq!(p.load.queued.load(Ordering::Relaxed), 0, "all taken");
        assert_eq!(p.load.dropped.load(Ordering::Relaxed), 0, "reported");
    }

    #[test]
    fn switch_words() {
        assert_eq!(parse_switch("ON"), Some(true));
        assert_eq!(parse_switch("0"), Some(false));
        assert_eq!(parse_switch("maybe"), None);
    }
}
