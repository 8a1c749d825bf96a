//! The [`Broker`] trait: what every message transport promises
//! (see CONTRACT.md, clauses B1..B18), and the types its calls use.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, TaskId};
use crate::error::BrokerError;

/// Default limit on an encoded envelope's size (contract clause B16).
pub const DEFAULT_MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// Default time dead letters are kept (contract clause B7).
pub const DEFAULT_DEAD_LETTER_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// What an adapter can do. Every field declared `true` is tested by the
/// conformance kit; a `false` field makes the kit skip exactly that clause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct Capabilities {
    /// B1: published envelopes survive the client and the process.
    pub durable: bool,
    /// B8: `not_before` is honoured.
    pub delay: bool,
    /// B9: higher priority is delivered first within a queue.
    pub priority: bool,
    /// B10: one fetch can consume several queues fairly.
    pub many_queues: bool,
    /// B11: broadcast channels.
    pub broadcast: bool,
    /// B14: `publish_many` is all-or-nothing.
    pub atomic_batch: bool,
    /// B15: consumers resume by themselves after a server restart.
    pub reconnect: bool,
    /// B17: unique keys.
    pub unique: bool,
    /// B18: delays and leases are judged by the server's clock.
    pub server_time: bool,
}

/// A lease on one delivered envelope; pass it back to ack, extend or nack.
///
/// The `token` fences the lease: after the lease expires and the envelope is
/// delivered again, calls with the old receipt return
/// [`BrokerError::LeaseLost`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The task.
    pub task_id: TaskId,
    /// The queue it was fetched from (shared: brokers hand out one name
    /// per queue instead of a copy per delivery).
    pub queue: Arc<str>,
    /// The fencing token of this lease.
    pub token: u64,
    /// Adapter-private data (e.g. a stream entry id); empty when unused.
    pub tag: String,
}

/// One envelope handed to a consumer under a lease.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The envelope, shared: a broker that keeps it for redelivery (the
    /// in-memory one) hands out the same allocation instead of a copy.
    pub envelope: Arc<Envelope>,
    /// The lease.
    pub receipt: Receipt,
    /// How many times this envelope has been delivered, this one included.
    pub delivery_count: u32,
}

/// What to fetch.
#[derive(Clone, Debug)]
pub struct FetchRequest {
    /// The queues to consume, in the order of preference for ties; the
    /// broker rotates its starting queue so none starves (B10).
    pub queues: Vec<String>,
    /// At most this many deliveries.
    pub max: usize,
    /// The lease each delivery gets.
    pub lease: Duration,
    /// How long to wait for at least one delivery before returning empty.
    pub wait: Duration,
    /// Identifies the consumer in logs and inspections.
    pub consumer: String,
}

impl FetchRequest {
    /// A request for up to `max` deliveries from `queues` with a 30 s lease
    /// and no waiting.
    ///
    /// ```
    /// let req = stem_core::FetchRequest::new(["default"], 10);
    /// assert_eq!(req.max, 10);
    /// ```
    #[must_use]
    pub fn new<I, S>(queues: I, max: usize) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            queues: queues.into_iter().map(Into::into).collect(),
            max,
            lease: Duration::from_secs(30),
            wait: Duration::ZERO,
            consumer: String::from("anonymous"),
        }
    }

    /// Sets the lease.
    #[must_use]
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets how long to wait for work.
    #[must_use]
    pub const fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

/// The outcome of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Stored under the envelope's own id.
    Stored(TaskId),
    /// A live envelope already held the unique key; nothing was stored and
    /// this is the holder's id (B17).
    Duplicate(TaskId),
}

impl Published {
    /// The id the caller should track: the new one or the existing holder.
    #[must_use]
    pub const fn id(&self) -> TaskId {
        match self {
            Self::Stored(id) | Self::Duplicate(id) => *id,
        }
    }
}

/// How to put a delivery back (B6).
#[derive(Clone, Debug, Default)]
pub struct Nack {
    /// Deliverable again after this delay (zero = now).
    pub after: Duration,
    /// Replace the stored envelope (e.g. with `attempt` increased).
    pub envelope: Option<Envelope>,
}

impl Nack {
    /// Requeue after `after`, keeping the envelope as it is.
    #[must_use]
    pub const fn after(after: Duration) -> Self {
        Self {
            after,
            envelope: None,
        }
    }

    /// Requeue with a replacement envelope (same id).
    #[must_use]
    pub fn with_envelope(mut self, envelope: Envelope) -> Self {
        self.envelope = Some(envelope);
        self
    }
}

/// Why an envelope is moved to the dead-letter store.
#[derive(Clone, Debug)]
pub struct DeadLetterRequest {
    /// A sentence a person can act on.
    pub reason: String,
    /// The last error, when a handler failed.
    pub error: Option<String>,
    /// Replace the stored envelope (e.g. with the final attempt count).
    pub envelope: Option<Envelope>,
}

impl DeadLetterRequest {
    /// A dead-letter request with a reason.
    #[must_use]
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            error: None,
            envelope: None,
        }
    }
}

/// An envelope in the dead-letter store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The task id (for garbage that had none, a fresh id).
    pub id: TaskId,
    /// The queue it came from.
    pub queue: String,
    /// Why it is here.
    pub reason: String,
    /// The last handler error, if any.
    pub error: Option<String>,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
    /// The full envelope, when it could be decoded.
    pub envelope: Option<Envelope>,
    /// The raw stored bytes, when they could not be decoded (B16).
    pub raw: Option<String>,
}

/// Which dead letters to replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// One, by task id.
    One(TaskId),
    /// All of the queue's.
    All,
}

/// A page of a listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// Items to skip.
    pub offset: u64,
    /// Items to return at most.
    pub limit: u64,
}

impl Page {
    /// The first `limit` items.
    #[must_use]
    pub const fn first(limit: u64) -> Self {
        Self { offset: 0, limit }
    }
}

/// Counts for one queue (B13).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Deliverable now.
    pub ready: u64,
    /// Waiting for `not_before`.
    pub delayed: u64,
    /// Under a live lease.
    pub leased: u64,
    /// In the dead-letter store.
    pub dead: u64,
}

/// A message received on a broadcast channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BroadcastMessage {
    /// The channel.
    pub channel: String,
    /// The payload (usually JSON).
    pub payload: String,
}

/// A live broadcast subscription; dropping it unsubscribes.
pub type BroadcastStream = BoxStream<'static, BroadcastMessage>;

/// A message transport. Object-safe: workers and clients hold
/// `Arc<dyn Broker>`. The semantics of each method are the clauses of
/// CONTRACT.md, checked for every adapter by [`crate::kit`].
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// The adapter's name and redacted address, for logs.
    fn describe(&self) -> String;

    /// What this adapter supports.
    fn capabilities(&self) -> Capabilities;

    /// Stores one envelope (B1, B16, B17).
    async fn publish(&self, envelope: Envelope) -> Result<Published, BrokerError>;

    /// Stores many envelopes in one round trip where possible (B14); the
    /// results are in input order.
    async fn publish_many(&self, envelopes: Vec<Envelope>) -> Result<Vec<Published>, BrokerError>;

    /// Leases up to `req.max` ready envelopes (B2, B3, B8, B9, B10), waiting
    /// up to `req.wait` for the first.
    ///
    /// Must be cancel-safe while it waits: a fetch dropped before it claimed
    /// anything loses nothing (workers drop an idle fetch at shutdown).
    async fn fetch(&self, req: &FetchRequest) -> Result<Vec<Delivery>, BrokerError>;

    /// Completes a delivery for good (B4).
    async fn ack(&self, receipt: &Receipt) -> Result<(), BrokerError>;

    /// Acks many; one result per receipt, in order. Adapters override this
    /// to use one round trip.
    async fn ack_many(&self, receipts: &[Receipt]) -> Vec<Result<(), BrokerError>> {
        let mut out = Vec::with_capacity(receipts.len());
        for r in receipts {
            out.push(self.ack(r).await);
        }
        out
    }

    /// Pushes the lease deadline to now + `lease` (B5).
    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<(), BrokerError>;

    /// Makes the envelope deliverable again after `nack.after` (B6).
    async fn nack(&self, receipt: &Receipt, nack: Nack) -> Result<(), BrokerError>;

    /// Moves the delivery to the dead-letter store (B6).
    async fn dead_letter(
        &self,
        receipt: &Receipt,
        request: DeadLetterRequest,
    ) -> Result<(), BrokerError>;

    /// Lists a queue's dead letters, oldest first (B7).
    async fn dead_letters(&self, queue: &str, page: Page) -> Result<Vec<DeadLetter>, BrokerError>;

    /// Counts a queue's dead letters (B7).
    async fn dead_letter_count(&self, queue: &str) -> Result<u64, BrokerError>;

    /// Moves dead letters back to their queue; returns how many (B7).
    async fn replay_dead_letters(
        &self,
        queue: &str,
        which: Replay,
        reset_attempts: bool,
    ) -> Result<u64, BrokerError>;

    /// Deletes a queue's dead letters; returns how many (B7).
    async fn purge_dead_letters(&self, queue: &str) -> Result<u64, BrokerError>;

    /// Counts ready, delayed, leased and dead envelopes (B13).
    async fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError>;

    /// Removes ready and delayed envelopes; returns how many (B13).
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;

    /// Sends `payload` to every live subscriber of `channel` (B11).
    async fn broadcast(&self, channel: &str, payload: &str) -> Result<(), BrokerError>;

    /// Subscribes to `channel`; messages sent after this returns arrive (B11).
    async fn subscribe(&self, channel: &str) -> Result<BroadcastStream, BrokerError>;

    /// Housekeeping an adapter cannot do inline (expired dead letters,
    /// expired unique keys). Workers call it every few seconds.
    async fn maintain(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}
