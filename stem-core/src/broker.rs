//! The [`Broker`] trait: what every message transport promises
//! (see CONTRACT.md, clauses B1..B18), and the types its calls use.

use std::any::Any;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::backend::{ResultBackend, TaskRecord};
use crate::envelope::{Envelope, TaskId};
use crate::error::{BrokerError, EnvelopeError};

/// Default limit on an encoded envelope's size (contract clause B16).
pub const DEFAULT_MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// Default time dead letters are kept (contract clause B7).
pub const DEFAULT_DEAD_LETTER_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How an adapter's leases behave, so the worker knows what it may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseModel {
    /// A lease is a deadline the consumer can push (`extend_leases`), judged
    /// by the server (SQLite, Postgres, Redis pending entries, SQS
    /// visibility timeouts).
    Extendable,
    /// A lease is fixed when the delivery is handed out; `extend_leases`
    /// answers `Unsupported` and long tasks need a longer lease up front.
    Fixed,
    /// A delivery is held as long as the consumer's connection or channel
    /// lives (AMQP unacked messages): nothing to extend, a dropped
    /// connection hands everything back, and a receipt is valid only on the
    /// connection that received it.
    Connection,
}

/// Limits the server imposes, which the worker and client respect instead
/// of finding them out by failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest `not_before` / retry delay the server can hold (SQS: 15
    /// minutes); `None` when unbounded. Longer delays are the adapter's to
    /// split (re-defer on delivery), never silently shortened.
    pub max_delay: Option<Duration>,
    /// Most envelopes or settlements one call may carry (SQS: 10); `None`
    /// when unbounded. The completer splits larger batches.
    pub max_batch: Option<usize>,
    /// Longest a lease can be held in total, extensions included (SQS: 12
    /// hours from the receive); `None` when unbounded. An extension past it
    /// fails with `LeaseLost` rather than silently not holding.
    pub max_lease: Option<Duration>,
    /// Largest encoded envelope accepted (B16).
    pub max_envelope_bytes: usize,
}

impl Limits {
    /// No delay or batch limit, and `max_envelope_bytes`.
    ///
    /// ```
    /// let l = stem_core::Limits::unbounded(1024);
    /// assert_eq!(l.max_batch, None);
    /// ```
    #[must_use]
    pub const fn unbounded(max_envelope_bytes: usize) -> Self {
        Self {
            max_delay: None,
            max_batch: None,
            max_lease: None,
            max_envelope_bytes,
        }
    }
}

/// What an adapter can do. Every flag declared `true` is tested by the
/// conformance kit; a `false` flag makes the kit skip exactly that clause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
#[non_exhaustive]
pub struct Capabilities {
    /// B1: published envelopes survive the client and the process.
    pub durable: bool,
    /// B8: `not_before` is honoured.
    pub delay: bool,
    /// B9: higher priority is delivered first within a queue.
    pub priority: bool,
    /// B10: one fetch can consume several queues fairly.
    pub many_queues: bool,
    /// B11: broadcast channels ([`Broker::broadcast`] is `Some`).
    pub broadcast: bool,
    /// B14: `publish_many` is all-or-nothing.
    pub atomic_batch: bool,
    /// B15: consumers resume by themselves after a server restart.
    pub reconnect: bool,
    /// B17: unique keys.
    pub unique: bool,
    /// B18: delays and leases are judged by the server's clock.
    pub server_time: bool,
    /// How leases behave.
    pub lease: LeaseModel,
    /// What the server limits.
    pub limits: Limits,
}

impl Capabilities {
    /// Everything off, extendable leases, no limits but the default
    /// envelope size: the starting point an adapter turns flags on from.
    ///
    /// ```
    /// let mut caps = stem_core::Capabilities::none();
    /// caps.delay = true;
    /// assert!(!caps.durable);
    /// ```
    #[must_use]
    pub const fn none() -> Self {
        Self {
            durable: false,
            delay: false,
            priority: false,
            many_queues: false,
            broadcast: false,
            atomic_batch: false,
            reconnect: false,
            unique: false,
            server_time: false,
            lease: LeaseModel::Extendable,
            limits: Limits::unbounded(DEFAULT_MAX_ENVELOPE_BYTES),
        }
    }
}

/// The adapter's own proof of a lease: whatever it needs to find and fence
/// the delivery. Two integers cover row-and-token stores (SQLite, Postgres:
/// row id and lease token) and AMQP (channel epoch and delivery tag);
/// anything else (a Redis stream key, entry id and fence; an SQS receipt
/// handle of up to 1 KiB) is the adapter's own type behind
/// [`ReceiptHandle::Opaque`]. See ARCHITECTURE.md for each adapter's.
#[derive(Clone)]
pub enum ReceiptHandle {
    /// Two integers the adapter chose, e.g. a row and its lease token.
    Token {
        /// Which stored item (a row id, an entry id's time part).
        key: u64,
        /// The fence (a lease token, an entry id's sequence part).
        token: u64,
    },
    /// An adapter-defined value; read it back with [`Receipt::opaque`].
    Opaque(Arc<dyn Any + Send + Sync>),
}

impl std::fmt::Debug for ReceiptHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { key, token } => write!(f, "Token({key}, {token})"),
            Self::Opaque(_) => f.write_str("Opaque(..)"),
        }
    }
}

impl PartialEq for ReceiptHandle {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Token { key: a, token: b }, Self::Token { key: c, token: d }) => {
                a == c && b == d
            }
            (Self::Opaque(a), Self::Opaque(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for ReceiptHandle {}

/// A lease on one delivered envelope; pass it back to settle or extend it.
///
/// The handle fences the lease: after the lease expires and the envelope is
/// delivered again, calls with the old receipt return
/// [`BrokerError::LeaseLost`] and change nothing.
///
/// ```
/// use stem_core::{Receipt, TaskId};
/// let r = Receipt::with_token(TaskId::new(), "default".into(), 7, 1);
/// assert_eq!(r.token(), Some((7, 1)));
/// assert!(r.opaque::<String>().is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The task.
    pub task_id: TaskId,
    /// The queue it was fetched from (shared: brokers hand out one name
    /// per queue instead of a copy per delivery).
    pub queue: Arc<str>,
    /// The adapter's proof of the lease.
    pub handle: ReceiptHandle,
}

impl Receipt {
    /// A receipt holding two integers (see [`ReceiptHandle::Token`]).
    #[must_use]
    pub const fn with_token(task_id: TaskId, queue: Arc<str>, key: u64, token: u64) -> Self {
        Self {
            task_id,
            queue,
            handle: ReceiptHandle::Token { key, token },
        }
    }

    /// A receipt holding an adapter-defined value.
    #[must_use]
    pub fn with_opaque<T: Any + Send + Sync>(task_id: TaskId, queue: Arc<str>, value: T) -> Self {
        Self {
            task_id,
            queue,
            handle: ReceiptHandle::Opaque(Arc::new(value)),
        }
    }

    /// The two integers of a [`ReceiptHandle::Token`], else `None`.
    #[must_use]
    pub const fn token(&self) -> Option<(u64, u64)> {
        match self.handle {
            ReceiptHandle::Token { key, token } => Some((key, token)),
            ReceiptHandle::Opaque(_) => None,
        }
    }

    /// The adapter's value of a [`ReceiptHandle::Opaque`] of type `T`.
    #[must_use]
    pub fn opaque<T: Any>(&self) -> Option<&T> {
        match &self.handle {
            ReceiptHandle::Opaque(v) => v.downcast_ref(),
            ReceiptHandle::Token { .. } => None,
        }
    }

    /// The error for this receipt's lease being gone.
    #[must_use]
    pub const fn lost(&self) -> BrokerError {
        BrokerError::LeaseLost {
            task_id: self.task_id,
        }
    }
}

/// One envelope handed to a consumer under a lease.
///
/// Two counts are kept apart: [`Delivery::deliveries`] counts hand-outs
/// (the broker's, never decremented, raised by every fetch and every lease
/// expiry), while `envelope.attempt` counts *charged attempts*, the only
/// number retries and dead-lettering judge: raised by
/// [`Disposition::Retry`] and a charging [`Disposition::DeadLetter`],
/// never by [`Disposition::Release`].
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The envelope, shared: a broker that keeps it for redelivery (the
    /// in-memory one) hands out the same allocation instead of a copy.
    pub envelope: Arc<Envelope>,
    /// The lease.
    pub receipt: Receipt,
    /// How many times this envelope has been handed out, this one included.
    pub deliveries: u32,
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

/// How a delivery ends (B4, B6). Settled through [`Broker::settle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Done for good: never delivered again (B4).
    Ack,
    /// A failed attempt to be tried again: the broker charges one attempt
    /// (`envelope.attempt + 1`), keeps `error` as the envelope's
    /// `last_error`, and makes it deliverable after `after` (B6).
    Retry {
        /// Delay before the next delivery (zero = now).
        after: Duration,
        /// The failed attempt's error, kept as `last_error`.
        error: String,
    },
    /// Handed back without charging an attempt: shutdown, a prefetched
    /// delivery given back, a rate-limited task, a task this worker does
    /// not know. Deliverable again after `after`; the envelope is unchanged.
    Release {
        /// Delay before the next delivery (zero = now).
        after: Duration,
    },
    /// Moved to the queue's dead letters with `reason` (B6).
    DeadLetter {
        /// A sentence a person can act on.
        reason: String,
        /// The last handler error, when one failed; kept as `last_error`.
        error: Option<String>,
        /// Whether the final attempt is charged (`attempt + 1`): true when
        /// a handler ran and failed, false when nothing ran (an unknown
        /// task, undecodable arguments).
        charge: bool,
    },
}

/// One settled delivery: the receipt, how it ends, and optionally the task
/// record that goes with it.
///
/// A broker that stores results in the same storage as the worker's result
/// backend ([`Broker::stores_results_of`]) writes `record` in the same
/// transaction as the settlement, and only when the lease was still held:
/// a stale worker can neither settle nor record. Other brokers ignore it
/// (the worker writes records itself, after checking the lease).
#[derive(Clone, Debug)]
pub struct Settlement {
    /// The lease being settled.
    pub receipt: Receipt,
    /// How it ends.
    pub disposition: Disposition,
    /// The record to store with it, when results are stored here.
    pub record: Option<Box<TaskRecord>>,
}

impl Settlement {
    /// A settlement without a record.
    ///
    /// ```
    /// use stem_core::{Disposition, Receipt, Settlement, TaskId};
    /// let r = Receipt::with_token(TaskId::new(), "q".into(), 1, 1);
    /// let s = Settlement::new(r, Disposition::Ack);
    /// assert!(s.record.is_none());
    /// ```
    #[must_use]
    pub const fn new(receipt: Receipt, disposition: Disposition) -> Self {
        Self {
            receipt,
            disposition,
            record: None,
        }
    }
}

/// The replacement an adapter stores when a settlement charges an attempt
/// (`Retry`, or a charging `DeadLetter`): `attempt + 1` and the error as
/// `last_error`. `None` when nothing changes. Written once here so every
/// adapter charges the same way.
///
/// ```
/// use stem_core::{Disposition, Envelope};
/// let env = Envelope::new("t", "q", serde_json::json!({}))?;
/// let d = Disposition::Retry { after: std::time::Duration::ZERO, error: "boom".into() };
/// let next = stem_core::broker::charged(&env, &d).expect("a retry charges");
/// assert_eq!((next.attempt, next.last_error.as_deref()), (1, Some("boom")));
/// # Ok::<(), stem_core::EnvelopeError>(())
/// ```
#[must_use]
pub fn charged(envelope: &Envelope, disposition: &Disposition) -> Option<Envelope> {
    let error = match disposition {
        Disposition::Retry { error, .. } => Some(error.clone()),
        Disposition::DeadLetter {
            charge: true,
            error,
            ..
        } => error.clone(),
        _ => return None,
    };
    let mut next = envelope.clone();
    next.attempt = next.attempt.saturating_add(1);
    if error.is_some() {
        next.last_error = error;
    }
    Some(next)
}

/// Refuses an envelope whose encoding is over `limit` bytes (B16), the
/// same rule and message for every adapter. Exact: an envelope near the
/// limit is measured by encoding it into a counting writer; one far below
/// it costs a few additions.
///
/// ```
/// let env = stem_core::Envelope::new("t", "q", serde_json::json!({"big": "x".repeat(100)}))?;
/// assert!(stem_core::broker::check_size(&env, 1 << 20).is_ok());
/// assert!(stem_core::broker::check_size(&env, 64).is_err());
/// # Ok::<(), stem_core::EnvelopeError>(())
/// ```
///
/// # Errors
/// [`BrokerError::TooLarge`] with the size and the limit.
pub fn check_size(envelope: &Envelope, limit: usize) -> Result<(), BrokerError> {
    if encoded_size_bound(envelope) <= limit {
        return Ok(());
    }
    check_encoded_size(envelope, encoded_size(envelope), limit)
}

/// Everything an adapter checks before it stores an envelope (B16): its
/// fields are valid (name, queue, priority, ...) and its encoding is within
/// `limit`. The one validation on the way in: clients and builders leave
/// it to the broker.
///
/// # Errors
/// [`BrokerError::Envelope`] for an invalid field, [`BrokerError::TooLarge`].
pub fn check_envelope(envelope: &Envelope, limit: usize) -> Result<(), BrokerError> {
    envelope.validate()?;
    check_size(envelope, limit)
}

/// [`check_size`] for an adapter that has encoded the envelope already.
///
/// # Errors
/// [`BrokerError::TooLarge`] when `size` is over `limit`.
pub const fn check_encoded_size(
    envelope: &Envelope,
    size: usize,
    limit: usize,
) -> Result<(), BrokerError> {
    if size > limit {
        return Err(BrokerError::TooLarge {
            task_id: envelope.id,
            size,
            limit,
        });
    }
    Ok(())
}

/// An upper bound on an envelope's JSON size computed without encoding:
/// the raw arguments as they are, every other string as if each byte needed
/// a six-byte escape, and a fixed allowance for the field names, ids,
/// timestamps and numbers. Only envelopes over the limit by this bound are
/// encoded (into a counting writer) to get the exact size, so the common
/// case costs a few additions instead of a serialization.
fn encoded_size_bound(env: &Envelope) -> usize {
    const FIXED: usize = 1024;
    let s = |x: &str| x.len().saturating_mul(6).saturating_add(2);
    let mut n = FIXED
        .saturating_add(env.args.get().len())
        .saturating_add(s(&env.name))
        .saturating_add(s(&env.queue));
    for (k, v) in &env.headers {
        n = n
            .saturating_add(s(k))
            .saturating_add(s(v))
            .saturating_add(2);
    }
    if let Some(u) = &env.unique {
        n = n.saturating_add(s(&u.key));
    }
    if let Some(e) = &env.last_error {
        n = n.saturating_add(s(e));
    }
    n
}

/// The exact size of `serde_json::to_vec(env)`, without the buffer.
fn encoded_size(env: &Envelope) -> usize {
    struct Counter(usize);
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    match serde_json::to_writer(&mut c, env) {
        Ok(()) => c.0,
        // Valid envelopes always encode; treat the impossible as too large.
        Err(_) => usize::MAX,
    }
}

/// The dead-letter reason for stored bytes that are not an envelope (B16),
/// the same sentence from every adapter.
#[must_use]
pub fn undecodable_reason(error: &EnvelopeError) -> String {
    format!("undecodable envelope: {error}")
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

/// One page of a dead-letter listing (B7).
#[derive(Clone, Debug, Default)]
pub struct DeadLetterPage {
    /// The dead letters, oldest first.
    pub items: Vec<DeadLetter>,
    /// Where the next page starts; `None` on the last page. Opaque: pass it
    /// back unchanged (a row id, a stream id, a queue's receive position).
    pub next: Option<String>,
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

impl QueueStats {
    /// Whether every count is zero: nothing ready, delayed, leased or dead.
    ///
    /// ```
    /// assert!(stem_core::QueueStats::default().is_empty());
    /// ```
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.ready == 0 && self.delayed == 0 && self.leased == 0 && self.dead == 0
    }
}

/// One queue and its counts: an entry of [`QueueAdmin::list`]. Serialized
/// flat: `{"queue": "emails", "ready": 3, "delayed": 0, "leased": 1, "dead": 0}`.
///
/// ```
/// let s = stem_core::QueueSummary { queue: "emails".into(), stats: Default::default() };
/// let json = serde_json::to_value(&s).unwrap();
/// assert_eq!(json["queue"], "emails");
/// assert_eq!(json["dead"], 0);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSummary {
    /// The queue's name.
    pub queue: String,
    /// Its counts, as [`QueueAdmin::stats`] gives them.
    #[serde(flatten)]
    pub stats: QueueStats,
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
/// CONTRACT.md, checked for every adapter by the conformance kit (feature
/// `kit`).
///
/// An adapter implements the low-level operations; the rules (when to
/// retry, how long to back off, when to dead-letter, what counts as an
/// attempt) are the worker's, written once in `stem-core`. Administration
/// and broadcast are optional traits reached through [`Broker::queues`],
/// [`Broker::dead_letters`] and [`Broker::broadcast`].
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

    /// Stores envelopes inside the caller's own open transaction, so they
    /// exist if and only if it commits. `tx` is the adapter's transaction
    /// or connection type (SQLite: a `rusqlite::Connection` inside
    /// `BEGIN`); any other type is refused with `Invalid`. Adapters
    /// without transactions answer `Unsupported`.
    async fn publish_in(
        &self,
        tx: &mut (dyn Any + Send),
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<Published>, BrokerError> {
        let _ = (tx, envelopes);
        Err(BrokerError::Unsupported {
            adapter: "this broker",
            operation: "publish_in (enqueue inside a caller's transaction)",
            hint: "use an adapter with transactions (sqlite, postgres), or publish after your commit",
        })
    }

    /// Leases up to `req.max` ready envelopes (B2, B3, B8, B9, B10), waiting
    /// up to `req.wait` for the first.
    ///
    /// Must be cancel-safe while it waits: a fetch dropped before it claimed
    /// anything loses nothing (workers drop an idle fetch at shutdown).
    async fn fetch(&self, req: &FetchRequest) -> Result<Vec<Delivery>, BrokerError>;

    /// Pushes each lease's deadline to now + `lease` (B5), in one round trip
    /// where possible; one result per receipt, in order. A receipt whose
    /// delivery was handed out again answers `LeaseLost`.
    async fn extend_leases(
        &self,
        receipts: &[Receipt],
        lease: Duration,
    ) -> Vec<Result<(), BrokerError>>;

    /// Settles every delivery of `batch` (B4, B6), each fenced by its own
    /// receipt, in one round trip (one transaction where the storage has
    /// them); one result per settlement, in order. A settlement whose lease
    /// is lost answers `LeaseLost` and changes nothing, its record included.
    async fn settle(&self, batch: &[Settlement]) -> Vec<Result<(), BrokerError>>;

    /// Whether [`Broker::settle`] stores the settlements' records for
    /// `backend`, in the same transaction (the two share one storage, e.g.
    /// one SQLite file and namespace). The worker then hands records to the
    /// broker instead of writing them to the backend itself.
    fn stores_results_of(&self, backend: &dyn ResultBackend) -> bool {
        let _ = backend;
        false
    }

    /// Whether this client can serve a worker running `slots` tasks at
    /// once: `None` when it can, else a sentence saying what to change (a
    /// connection pool smaller than such a worker needs). The worker logs
    /// it as a warning when it starts. The default: `None`.
    fn check_capacity(&self, slots: usize) -> Option<String> {
        let _ = slots;
        None
    }

    /// Queue inspection and purge (B13), when the adapter has them.
    fn queues(&self) -> Option<&dyn QueueAdmin> {
        None
    }

    /// Dead-letter administration (B7), when the adapter has it.
    fn dead_letters(&self) -> Option<&dyn DeadLetters> {
        None
    }

    /// Broadcast channels (B11), when the adapter has them.
    fn broadcast(&self) -> Option<&dyn Broadcast> {
        None
    }

    /// Takes or renews the namespace's housekeeping lease for `holder` for
    /// `ttl`; `true` while `holder` leads. Only the leader runs
    /// [`Broker::maintain`], so fifty workers sweep once, not fifty times.
    /// The default (one process, nothing shared) always leads.
    async fn try_lead(&self, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let _ = (holder, ttl);
        Ok(true)
    }

    /// Housekeeping an adapter cannot do inline (expired dead letters,
    /// expired unique keys). The leading worker calls it every few seconds.
    async fn maintain(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Acks one delivery: [`Broker::settle`] with [`Disposition::Ack`].
    async fn ack(&self, receipt: &Receipt) -> Result<(), BrokerError> {
        self.settle_one(Settlement::new(receipt.clone(), Disposition::Ack))
            .await
    }

    /// Settles one delivery.
    async fn settle_one(&self, settlement: Settlement) -> Result<(), BrokerError> {
        self.settle(std::slice::from_ref(&settlement))
            .await
            .pop()
            .unwrap_or(Err(BrokerError::Invalid(String::from(
                "the broker answered a settlement with no result",
            ))))
    }

    /// Extends one lease: [`Broker::extend_leases`] with one receipt.
    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<(), BrokerError> {
        self.extend_leases(std::slice::from_ref(receipt), lease)
            .await
            .pop()
            .unwrap_or(Err(receipt.lost()))
    }
}

/// Queue inspection and purge (B13).
#[async_trait]
pub trait QueueAdmin: Send + Sync {
    /// Counts ready, delayed, leased and dead envelopes; expired leases
    /// count as ready, not leased.
    async fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError>;

    /// Every queue of the namespace that holds something (ready, delayed,
    /// leased or dead: at least one count above zero), with the counts
    /// [`QueueAdmin::stats`] would give it, sorted by name (B13, new in
    /// issue 20). A queue whose counts are all zero is left out, on every
    /// adapter alike: a drained queue leaves no trace in row stores, so
    /// only "has something" can be answered the same way everywhere. One
    /// query (or a bounded number of round trips), not one call per queue
    /// from the caller.
    async fn list(&self) -> Result<Vec<QueueSummary>, BrokerError>;

    /// Removes the queue's ready and delayed envelopes, freeing their
    /// unique keys; returns how many. Other queues are untouched.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;
}

/// Dead-letter administration (B7).
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Lists up to `limit` of a queue's dead letters, oldest first, starting
    /// at `cursor` (`None`: the first page).
    async fn list(
        &self,
        queue: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterPage, BrokerError>;

    /// Counts a queue's dead letters.
    async fn count(&self, queue: &str) -> Result<u64, BrokerError>;

    /// The live dead letter of task `id`, whatever its queue (B7, new in
    /// issue 20): what an operator holding only a task id looks up. `None`
    /// when the task has no dead letter in this namespace (never had one,
    /// replayed, purged or past the retention). One indexed lookup, or a
    /// bounded number of round trips, never a listing read page by page.
    async fn get(&self, id: TaskId) -> Result<Option<DeadLetter>, BrokerError>;

    /// Moves dead letters back to their queue, taking their unique keys
    /// again; returns how many. Replaying one that is not an envelope is
    /// refused with `Invalid`; replaying all leaves those in place.
    async fn replay(
        &self,
        queue: &str,
        which: Replay,
        reset_attempts: bool,
    ) -> Result<u64, BrokerError>;

    /// Deletes a queue's dead letters; returns how many.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;
}

/// Broadcast channels (B11).
#[async_trait]
pub trait Broadcast: Send + Sync {
    /// Sends `payload` to every live subscriber of `channel`.
    async fn send(&self, channel: &str, payload: &str) -> Result<(), BrokerError>;

    /// Subscribes to `channel`; messages sent after this returns arrive.
    async fn subscribe(&self, channel: &str) -> Result<BroadcastStream, BrokerError>;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::envelope::{Unique, UniqueRelease};

    #[test]
    fn size_bound_is_an_upper_bound() {
        let mut env = Envelope::new("a::b", "q", serde_json::json!({"x": "\u{1}\"\\"})).unwrap();
        env.not_before = Some(Utc::now());
        env.expires_at = Some(Utc::now());
        env.parent_id = Some(TaskId::new());
        env.group_id = Some(TaskId::new());
        env.chord_id = Some(TaskId::new());
        env.attempt = u32::MAX;
        env.max_retries = u32::MAX;
        env.result_ttl_secs = Some(u64::MAX);
        env.last_error = Some("\u{1}\u{2}\"".repeat(10));
        env.unique = Some(Unique {
            key: "\u{0}".repeat(5),
            until: Utc::now(),
            release: UniqueRelease::OnFinish,
        });
        env.headers = BTreeMap::from([("\u{3}".repeat(4), "\n\t".repeat(8))]);
        let exact = env.encode().unwrap().len();
        assert_eq!(encoded_size(&env), exact);
        assert!(encoded_size_bound(&env) >= exact);
    }
}
