//! [`InMemoryBroker`]: queues in process memory.
//!
//! One mutex guards an instance's queues, leases and unique keys; it is
//! never held across an `.await`, and batch calls (`publish_many`,
//! `ack_many`, a fetch of many) take it once. Waiting fetchers sleep on a
//! [`Notify`] until something is published or requeued, or until the next
//! delayed envelope or lease deadline, never polling.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use tokio::sync::{Notify, broadcast};

use super::MemoryOptions;
use crate::broker::{
    Broadcast, BroadcastMessage, BroadcastStream, Broker, Capabilities, DeadLetter, DeadLetterPage,
    DeadLetters, Delivery, Disposition, FetchRequest, Limits, Published, QueueAdmin, QueueStats,
    QueueSummary, Receipt, Replay, Settlement, charged, check_envelope, undecodable_reason,
};
use crate::envelope::{Envelope, MAX_PRIORITY, TaskId, UniqueRelease};
use crate::error::BrokerError;

/// Priority lanes per queue.
const LANES: usize = MAX_PRIORITY as usize + 1;

/// Messages a broadcast subscriber may fall behind before it skips some.
const BROADCAST_CAPACITY: usize = 1024;

/// A broker whose queues live in this process's memory.
///
/// Cheap to clone: clones share the same queues.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
/// use stem_core::{Broker, Envelope, FetchRequest};
/// let broker = stem_core::memory::InMemoryBroker::new();
/// let mut low = Envelope::new("demo::job", "jobs", serde_json::json!({"n": 1}))?;
/// low.priority = 1;
/// let mut high = Envelope::new("demo::job", "jobs", serde_json::json!({"n": 2}))?;
/// high.priority = 9;
/// broker.publish_many(vec![low, high.clone()]).await?;
/// let got = broker.fetch(&FetchRequest::new(["jobs"], 1)).await?;
/// assert_eq!(got[0].envelope.id, high.id);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct InMemoryBroker {
    core: Arc<Core>,
}

impl std::fmt::Debug for InMemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryBroker")
            .field("instance", &self.core.label)
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryBroker {
    /// A private broker with default [`MemoryOptions`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_options(MemoryOptions::default())
    }

    /// A private broker with `options`.
    #[must_use]
    pub fn with_options(options: MemoryOptions) -> Self {
        Self {
            core: Arc::new(Core::new(String::from("memory (private)"), options)),
        }
    }

    /// The process-wide broker `name` in `namespace`, the one `memory://name`
    /// opens. `options` apply only when this call creates the instance.
    ///
    /// ```
    /// use stem_core::memory::{InMemoryBroker, MemoryOptions};
    /// let a = InMemoryBroker::shared("doc-shared", "ns", MemoryOptions::default());
    /// let b = InMemoryBroker::shared("doc-shared", "ns", MemoryOptions::default());
    /// assert!(a.same_instance(&b));
    /// ```
    #[must_use]
    pub fn shared(name: &str, namespace: &str, options: MemoryOptions) -> Self {
        Self {
            core: super::shared_broker_core(name, namespace, options),
        }
    }

    /// Whether two brokers share their queues.
    #[must_use]
    pub fn same_instance(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.core, &other.core)
    }

    /// Test hook for "hand-written or corrupt storage" (contract clause
    /// B16): stores `bytes` in `queue` as if something other than Stem had
    /// written them there. When fetched, bytes that do not decode as an
    /// envelope are moved to the queue's dead letters with the reason
    /// `undecodable envelope: ...` and the raw text; bytes that do decode
    /// are delivered like any envelope.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
    /// use stem_core::{Broker, DeadLetters, FetchRequest};
    /// let broker = stem_core::memory::InMemoryBroker::new();
    /// broker.insert_raw("jobs", b"{not json".to_vec());
    /// assert!(broker.fetch(&FetchRequest::new(["jobs"], 1)).await?.is_empty());
    /// let dead = DeadLetters::list(&broker, "jobs", None, 10).await?.items;
    /// assert!(dead[0].reason.starts_with("undecodable envelope"));
    /// assert_eq!(dead[0].raw.as_deref(), Some("{not json"));
    /// # Ok(()) }
    /// ```
    pub fn insert_raw(&self, queue: &str, bytes: impl Into<Vec<u8>>) {
        let entry = Entry {
            payload: Payload::Raw(bytes.into()),
            deliveries: 0,
        };
        {
            let mut st = self.core.lock();
            let q = st.queue_mut(queue);
            q.lanes[0].push_back(entry);
            q.ready += 1;
        }
        self.core.wake();
    }

    fn capabilities_const(max_envelope_bytes: usize) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.delay = true;
        caps.priority = true;
        caps.many_queues = true;
        caps.broadcast = true;
        caps.atomic_batch = true;
        caps.unique = true;
        caps.limits = Limits::unbounded(max_envelope_bytes);
        caps
    }
}

/// What a queue slot holds: an envelope, or bytes that may not be one.
///
/// The envelope is shared (`Arc`) between the queue, the lease and the
/// delivery: a fetch hands out a reference instead of copying the envelope
/// (three allocations and their frees per task, a third of a drain's CPU
/// in profiles), and the lease keeps it for redelivery. Raw bytes only
/// appear through the B16 test hook.
enum Payload {
    Envelope(Arc<Envelope>),
    Raw(Vec<u8>),
}

struct Entry {
    payload: Payload,
    /// Deliveries so far.
    deliveries: u32,
}

impl Entry {
    fn envelope(&self) -> Option<&Envelope> {
        match &self.payload {
            Payload::Envelope(e) => Some(e),
            Payload::Raw(_) => None,
        }
    }
}

/// A delayed entry; ordered by (time, enqueue sequence).
struct Delayed {
    at: DateTime<Utc>,
    seq: u64,
    entry: Entry,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.seq == other.seq
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Queue {
    name: Arc<str>,
    /// Ready entries, one FIFO per priority.
    lanes: [VecDeque<Entry>; LANES],
    /// Entries in all lanes.
    ready: usize,
    /// Entries waiting for their time, earliest first.
    delayed: BinaryHeap<Reverse<Delayed>>,
    /// Live leases on this queue.
    leased: u64,
    /// Dead letters, oldest first, each with its listing position.
    dead: VecDeque<(u64, DeadLetter)>,
    /// The next dead letter's listing position (the cursor of B7).
    next_dead: u64,
}

impl Queue {
    /// The counts of B13, as they stand (promote and prune first).
    fn counts(&self) -> QueueStats {
        QueueStats {
            ready: self.ready as u64,
            delayed: self.delayed.len() as u64,
            leased: self.leased,
            dead: self.dead.len() as u64,
        }
    }

    fn new(name: Arc<str>) -> Self {
        Self {
            name,
            lanes: std::array::from_fn(|_| VecDeque::new()),
            ready: 0,
            delayed: BinaryHeap::new(),
            leased: 0,
            dead: VecDeque::new(),
            next_dead: 0,
        }
    }

    /// Adds a dead letter at the end of the listing.
    fn bury(&mut self, dead: DeadLetter) {
        self.dead.push_back((self.next_dead, dead));
        self.next_dead += 1;
    }

    fn push_ready(&mut self, priority: u8, entry: Entry, front: bool) {
        let lane = &mut self.lanes[usize::from(priority.min(MAX_PRIORITY))];
        if front {
            lane.push_front(entry);
        } else {
            lane.push_back(entry);
        }
        self.ready += 1;
    }

    fn pop_ready(&mut self) -> Option<Entry> {
        if self.ready == 0 {
            return None;
        }
        for lane in self.lanes.iter_mut().rev() {
            if let Some(e) = lane.pop_front() {
                self.ready -= 1;
                return Some(e);
            }
        }
        None
    }

    /// Moves delayed entries whose time has come to their lanes.
    fn promote(&mut self, now: DateTime<Utc>) {
        while let Some(Reverse(top)) = self.delayed.peek() {
            if top.at > now {
                break;
            }
            let Some(Reverse(d)) = self.delayed.pop() else {
                break;
            };
            let priority = d.entry.envelope().map_or(0, |e| e.priority);
            self.push_ready(priority, d.entry, false);
        }
    }

    /// Drops dead letters older than the retention window.
    fn prune_dead(&mut self, now: DateTime<Utc>, retention: TimeDelta) {
        while self
            .dead
            .front()
            .is_some_and(|(_, d)| d.dead_at + retention <= now)
        {
            self.dead.pop_front();
        }
    }
}

struct Lease {
    task_id: TaskId,
    deadline: Instant,
    queue: Arc<str>,
    envelope: Arc<Envelope>,
    deliveries: u32,
}

struct UniqueHold {
    holder: TaskId,
    until: DateTime<Utc>,
}

/// The hasher of the maps below: foldhash's fast one. They are keyed by
/// queue names and sequential lease tokens, which no outsider chooses, so
/// `SipHash`'s flood resistance buys nothing here and its cost showed in
/// profiles (a few lookups per task).
type FastHash = foldhash::fast::RandomState;

#[derive(Default)]
struct State {
    queues: HashMap<Arc<str>, Queue, FastHash>,
    /// Live leases by fencing token.
    leases: HashMap<u64, Lease, FastHash>,
    /// Lease deadlines, earliest first, each for a run of consecutive
    /// tokens `(deadline, first token, count)`: the deliveries of one fetch
    /// share a deadline and get one entry, not one each (the heap's
    /// sifting was two thirds of a fetch's own time in profiles). Leases
    /// acked or extended since are skipped when their entry is popped.
    expiries: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    unique: HashMap<String, UniqueHold>,
    next_token: u64,
    next_seq: u64,
    /// Where the next many-queue fetch starts.
    rotation: usize,
}

impl State {
    fn queue_mut(&mut self, name: &str) -> &mut Queue {
        if !self.queues.contains_key(name) {
            let name: Arc<str> = Arc::from(name);
            self.queues.insert(name.clone(), Queue::new(name));
        }
        self.queues
            .get_mut(name)
            .unwrap_or_else(|| unreachable!("queue inserted above"))
    }

    /// Puts an envelope in its queue: delayed when `not_before` is ahead.
    fn enqueue(&mut self, env: Arc<Envelope>, deliveries: u32, now: DateTime<Utc>) {
        self.enqueue_at(env, deliveries, None, now);
    }

    fn enqueue_at(
        &mut self,
        env: Arc<Envelope>,
        deliveries: u32,
        at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        let at = at.or(env.not_before).filter(|t| *t > now);
        let seq = self.next_seq;
        self.next_seq += 1;
        let priority = env.priority;
        let q = self.queue_mut(&env.queue);
        let entry = Entry {
            payload: Payload::Envelope(env),
            deliveries,
        };
        match at {
            Some(at) => q.delayed.push(Reverse(Delayed { at, seq, entry })),
            None => q.push_ready(priority, entry, false),
        }
    }

    /// Stores one checked envelope, honouring its unique key (B17).
    fn insert(&mut self, env: Arc<Envelope>, now: DateTime<Utc>) -> Published {
        let id = env.id;
        if let Some(u) = &env.unique {
            // The holder publishing itself again is a duplicate too, as on
            // SQLite and Redis: a retried publish stores one envelope.
            if let Some(h) = self.unique.get(&u.key)
                && h.until > now
            {
                return Published::Duplicate(h.holder);
            }
            if u.until > now {
                self.unique.insert(
                    u.key.clone(),
                    UniqueHold {
                        holder: id,
                        until: u.until,
                    },
                );
            }
        }
        self.enqueue(env, 0, now);
        Published::Stored(id)
    }

    /// Frees `env`'s unique key if it holds it and `always` or the key is
    /// released when the holder finishes.
    fn release_unique(&mut self, env: &Envelope, always: bool) {
        if let Some(u) = &env.unique
            && (always || u.release == UniqueRelease::OnFinish)
            && self.unique.get(&u.key).is_some_and(|h| h.holder == env.id)
        {
            self.unique.remove(&u.key);
        }
    }

    /// Takes the unique key again for a replayed envelope, when it is free.
    fn retake_unique(&mut self, env: &Envelope, now: DateTime<Utc>) {
        if let Some(u) = &env.unique
            && u.until > now
            && self.unique.get(&u.key).is_none_or(|h| h.until <= now)
        {
            self.unique.insert(
                u.key.clone(),
                UniqueHold {
                    holder: env.id,
                    until: u.until,
                },
            );
        }
    }

    /// Requeues every envelope whose lease has expired (B2).
    fn rescue(&mut self, now: Instant) {
        while let Some(Reverse((deadline, first, count))) = self.expiries.peek().copied() {
            if deadline > now {
                break;
            }
            self.expiries.pop();
            for token in first..first.saturating_add(count) {
                if self.leases.get(&token).is_some_and(|l| l.deadline <= now)
                    && let Some(lease) = self.leases.remove(&token)
                {
                    self.requeue_expired(lease);
                }
            }
        }
    }

    /// Puts the envelope of an expired lease back at the front of its lane.
    fn requeue_expired(&mut self, lease: Lease) {
        tracing::debug!(task_id = %lease.task_id, queue = %lease.queue, "lease expired; requeued");
        let priority = lease.envelope.priority;
        let q = self.queue_mut(&lease.queue);
        q.leased = q.leased.saturating_sub(1);
        q.push_ready(
            priority,
            Entry {
                payload: Payload::Envelope(lease.envelope),
                deliveries: lease.deliveries,
            },
            true,
        );
    }

    /// Drops the deadlines of leases that were acked or extended since:
    /// they are skipped when popped anyway, but a busy queue would pile up
    /// one per fetch until their lease time (30 s by default), a million
    /// for a fast worker.
    fn compact_expiries(&mut self) {
        if self.expiries.len() > 2 * self.leases.len() + 1024 {
            self.expiries = self
                .leases
                .iter()
                .map(|(token, l)| Reverse((l.deadline, *token, 1)))
                .collect();
        }
    }

    /// Removes the lease behind `receipt`, or says it is lost (B4).
    fn take_lease(&mut self, receipt: &Receipt) -> Result<Lease, BrokerError> {
        let token = lease_token(receipt).ok_or_else(|| receipt.lost())?;
        let lease = match self.leases.entry(token) {
            MapEntry::Occupied(l) if l.get().task_id == receipt.task_id => l.remove(),
            _ => {
                return Err(BrokerError::LeaseLost {
                    task_id: receipt.task_id,
                });
            }
        };
        if let Some(q) = self.queues.get_mut(&*lease.queue) {
            q.leased = q.leased.saturating_sub(1);
        }
        Ok(lease)
    }

    /// Puts a settled delivery back in `queue`, deliverable after `after`.
    /// A zero delay means "now", even when the envelope's own
    /// `not_before` is still ahead.
    fn requeue(
        &mut self,
        mut env: Arc<Envelope>,
        queue: &Arc<str>,
        deliveries: u32,
        after: Duration,
        now: DateTime<Utc>,
    ) {
        if env.queue != **queue {
            Arc::make_mut(&mut env).queue = queue.to_string();
        }
        let at =
            (!after.is_zero()).then(|| now + TimeDelta::from_std(after).unwrap_or(TimeDelta::MAX));
        if at.is_none() && env.not_before.is_some() {
            Arc::make_mut(&mut env).not_before = None;
        }
        self.enqueue_at(env, deliveries, at, now);
    }

    /// The earliest time something may become deliverable in `queues`.
    fn next_wake(
        &self,
        queues: &[String],
        now_u: DateTime<Utc>,
        now_i: Instant,
    ) -> Option<Instant> {
        let lease = self.expiries.peek().map(|Reverse((at, _, _))| *at);
        let delayed = queues
            .iter()
            .filter_map(|name| self.queues.get(name.as_str()))
            .filter_map(|q| q.delayed.peek().map(|Reverse(d)| d.at))
            .min()
            .map(|at| now_i + (at - now_u).to_std().unwrap_or(Duration::ZERO));
        match (lease, delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The lease token of one of this broker's receipts.
const fn lease_token(receipt: &Receipt) -> Option<u64> {
    match receipt.token() {
        Some((token, _)) => Some(token),
        None => None,
    }
}

/// One instance's storage, shared by its clients.
pub(super) struct Core {
    label: String,
    options: MemoryOptions,
    retention: TimeDelta,
    state: Mutex<State>,
    /// Woken when something may have become deliverable.
    notify: Notify,
    /// Fetchers waiting on `notify`.
    waiting: AtomicUsize,
    channels: Mutex<HashMap<String, broadcast::Sender<String>>>,
}

impl Core {
    pub(super) fn new(label: String, options: MemoryOptions) -> Self {
        Self {
            label,
            options,
            retention: TimeDelta::from_std(options.dead_letter_retention).unwrap_or(TimeDelta::MAX),
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            waiting: AtomicUsize::new(0),
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes waiting fetchers, if any.
    fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Validates and size-checks an envelope (B16).
    fn check(&self, env: &Envelope) -> Result<(), BrokerError> {
        check_envelope(env, self.options.max_envelope_bytes)
    }

    /// One pass of a fetch: leases what is ready now. Also returns when
    /// something may become ready, for a fetcher that has to wait.
    ///
    /// The lock is taken twice, briefly: once to pop the ready entries
    /// (counted as leased from then on) and once to record their leases.
    /// The allocations of the receipts and the `Vec` happen in between,
    /// outside the lock, so acks and publishes from other threads are not
    /// held up by them. Nothing else can see the popped entries in between:
    /// their tokens are not out yet.
    fn take(&self, req: &FetchRequest) -> (Vec<Delivery>, Option<Instant>) {
        let now_i = Instant::now();
        let now_u = Utc::now();
        let mut popped: Vec<(Arc<str>, Arc<Envelope>, u32)> = Vec::new();
        let first_token = {
            let mut st = self.lock();
            st.rescue(now_i);
            let n = req.queues.len();
            let start = st.rotation % n;
            st.rotation = st.rotation.wrapping_add(1);
            let queues = &mut st.queues;
            for name in &req.queues {
                if let Some(q) = queues.get_mut(name.as_str()) {
                    q.promote(now_u);
                }
            }
            'rounds: loop {
                let mut progressed = false;
                for i in 0..n {
                    if popped.len() >= req.max {
                        break 'rounds;
                    }
                    let Some(q) = queues.get_mut(req.queues[(start + i) % n].as_str()) else {
                        continue;
                    };
                    let Some(entry) = q.pop_ready() else {
                        continue;
                    };
                    progressed = true;
                    let envelope = match entry.payload {
                        Payload::Envelope(e) => e,
                        Payload::Raw(bytes) => match Envelope::decode(&bytes) {
                            Ok(e) => Arc::new(e),
                            Err(err) => {
                                let reason = undecodable_reason(&err);
                                tracing::warn!(queue = %q.name, %reason, "garbage in queue moved to dead letters");
                                q.bury(DeadLetter {
                                    id: TaskId::new(),
                                    queue: q.name.to_string(),
                                    reason,
                                    error: None,
                                    dead_at: now_u,
                                    envelope: None,
                                    raw: Some(String::from_utf8_lossy(&bytes).into_owned()),
                                });
                                continue;
                            }
                        },
                    };
                    if popped.capacity() == 0 {
                        popped.reserve_exact(req.max.min(1024));
                    }
                    q.leased += 1;
                    popped.push((
                        Arc::clone(&q.name),
                        envelope,
                        entry.deliveries.saturating_add(1),
                    ));
                }
                if !progressed {
                    break;
                }
            }
            if popped.is_empty() {
                return (Vec::new(), st.next_wake(&req.queues, now_u, now_i));
            }
            let first = st.next_token;
            st.next_token += popped.len() as u64;
            first
        };
        let out: Vec<Delivery> = popped
            .iter()
            .zip(first_token..)
            .map(|((queue, envelope, deliveries), token)| Delivery {
                envelope: Arc::clone(envelope),
                receipt: Receipt::with_token(envelope.id, Arc::clone(queue), token, 0),
                deliveries: *deliveries,
            })
            .collect();
        let deadline = now_i + req.lease;
        let woke_earlier = {
            let mut st = self.lock();
            let woke_earlier = st
                .expiries
                .peek()
                .is_none_or(|Reverse((at, _, _))| deadline < *at);
            st.expiries
                .push(Reverse((deadline, first_token, popped.len() as u64)));
            for ((queue, envelope, deliveries), token) in popped.into_iter().zip(first_token..) {
                st.leases.insert(
                    token,
                    Lease {
                        task_id: envelope.id,
                        deadline,
                        queue,
                        envelope,
                        deliveries,
                    },
                );
            }
            st.compact_expiries();
            woke_earlier
        };
        if woke_earlier {
            // A sleeping fetcher computed its wake-up from the old earliest
            // lease deadline; this lease expires sooner.
            self.wake();
        }
        (out, None)
    }
}

/// Decrements the waiting-fetcher count when a wait ends or is cancelled.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Broker for InMemoryBroker {
    fn describe(&self) -> String {
        self.core.label.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Self::capabilities_const(self.core.options.max_envelope_bytes)
    }

    async fn publish(&self, envelope: Envelope) -> Result<Published, BrokerError> {
        self.core.check(&envelope)?;
        let now = Utc::now();
        let envelope = Arc::new(envelope);
        let published = self.core.lock().insert(envelope, now);
        if matches!(published, Published::Stored(_)) {
            self.core.wake();
        }
        Ok(published)
    }

    async fn publish_many(&self, envelopes: Vec<Envelope>) -> Result<Vec<Published>, BrokerError> {
        for e in &envelopes {
            self.core.check(e)?;
        }
        let now = Utc::now();
        let envelopes: Vec<Arc<Envelope>> = envelopes.into_iter().map(Arc::new).collect();
        let out: Vec<Published> = {
            let mut st = self.core.lock();
            envelopes.into_iter().map(|e| st.insert(e, now)).collect()
        };
        if !out.is_empty() {
            self.core.wake();
        }
        Ok(out)
    }

    async fn fetch(&self, req: &FetchRequest) -> Result<Vec<Delivery>, BrokerError> {
        if req.max == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        let until = Instant::now() + req.wait;
        loop {
            self.core.waiting.fetch_add(1, Ordering::SeqCst);
            let waiting = Waiting(&self.core.waiting);
            let notified = self.core.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (out, wake) = self.core.take(req);
            if !out.is_empty() || Instant::now() >= until {
                return Ok(out);
            }
            let wake = wake.map_or(until, |w| w.min(until));
            let _ = tokio::time::timeout_at(wake.into(), notified).await;
            drop(waiting);
        }
    }

    async fn extend_leases(
        &self,
        receipts: &[Receipt],
        lease: Duration,
    ) -> Vec<Result<(), BrokerError>> {
        let deadline = Instant::now() + lease;
        let mut st = self.core.lock();
        let out = receipts
            .iter()
            .map(|r| {
                let token = lease_token(r).ok_or_else(|| r.lost())?;
                match st.leases.get_mut(&token) {
                    Some(l) if l.task_id == r.task_id => l.deadline = deadline,
                    _ => return Err(r.lost()),
                }
                st.expiries.push(Reverse((deadline, token, 1)));
                Ok(())
            })
            .collect();
        st.compact_expiries();
        out
    }

    async fn settle(&self, batch: &[Settlement]) -> Vec<Result<(), BrokerError>> {
        let now = Utc::now();
        let mut out = Vec::with_capacity(batch.len());
        let mut done = Vec::with_capacity(batch.len());
        let mut requeued = false;
        {
            let mut st = self.core.lock();
            for s in batch {
                let lease = match st.take_lease(&s.receipt) {
                    Ok(l) => l,
                    Err(e) => {
                        out.push(Err(e));
                        continue;
                    }
                };
                match &s.disposition {
                    Disposition::Ack => {
                        st.release_unique(&lease.envelope, false);
                        done.push(lease);
                    }
                    Disposition::Retry { after, .. } | Disposition::Release { after } => {
                        let env = charged(&lease.envelope, &s.disposition)
                            .map_or(lease.envelope, Arc::new);
                        st.requeue(env, &lease.queue, lease.deliveries, *after, now);
                        requeued = true;
                    }
                    Disposition::DeadLetter { reason, error, .. } => {
                        let env = charged(&lease.envelope, &s.disposition)
                            .unwrap_or_else(|| Arc::unwrap_or_clone(lease.envelope));
                        st.release_unique(&env, false);
                        tracing::debug!(task_id = %env.id, queue = %lease.queue, %reason, "dead-lettered");
                        let (reason, error) = (reason.clone(), error.clone());
                        st.queue_mut(&lease.queue).bury(DeadLetter {
                            id: s.receipt.task_id,
                            queue: lease.queue.to_string(),
                            reason,
                            error,
                            dead_at: now,
                            envelope: Some(env),
                            raw: None,
                        });
                    }
                }
                out.push(Ok(()));
            }
        }
        // Acked envelopes are freed after the lock is released.
        drop(done);
        if requeued {
            self.core.wake();
        }
        out
    }

    fn queues(&self) -> Option<&dyn QueueAdmin> {
        Some(self)
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetters> {
        Some(self)
    }

    fn broadcast(&self) -> Option<&dyn Broadcast> {
        Some(self)
    }
    async fn maintain(&self) -> Result<(), BrokerError> {
        let now_u = Utc::now();
        let retention = self.core.retention;
        {
            let mut st = self.core.lock();
            st.rescue(Instant::now());
            for q in st.queues.values_mut() {
                q.promote(now_u);
                q.prune_dead(now_u, retention);
            }
            st.unique.retain(|_, h| h.until > now_u);
        }
        self.core.wake();
        Ok(())
    }
}

#[async_trait]
impl QueueAdmin for InMemoryBroker {
    async fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        let now_u = Utc::now();
        let retention = self.core.retention;
        let mut st = self.core.lock();
        st.rescue(Instant::now());
        let Some(q) = st.queues.get_mut(queue) else {
            return Ok(QueueStats::default());
        };
        q.promote(now_u);
        q.prune_dead(now_u, retention);
        Ok(q.counts())
    }

    async fn list(&self) -> Result<Vec<QueueSummary>, BrokerError> {
        let now_u = Utc::now();
        let retention = self.core.retention;
        let mut st = self.core.lock();
        st.rescue(Instant::now());
        let mut out: Vec<QueueSummary> = st
            .queues
            .values_mut()
            .filter_map(|q| {
                q.promote(now_u);
                q.prune_dead(now_u, retention);
                let stats = q.counts();
                (!stats.is_empty()).then(|| QueueSummary {
                    queue: q.name.to_string(),
                    stats,
                })
            })
            .collect();
        out.sort_unstable_by(|a, b| a.queue.cmp(&b.queue));
        Ok(out)
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut st = self.core.lock();
        let Some(q) = st.queues.get_mut(queue) else {
            return Ok(0);
        };
        let mut removed: Vec<Entry> = Vec::with_capacity(q.ready + q.delayed.len());
        for lane in &mut q.lanes {
            removed.extend(lane.drain(..));
        }
        removed.extend(q.delayed.drain().map(|Reverse(d)| d.entry));
        q.ready = 0;
        for e in &removed {
            if let Some(env) = e.envelope() {
                // The holder is gone, so its key is free whatever it chose.
                st.release_unique(env, true);
            }
        }
        Ok(removed.len() as u64)
    }
}

#[async_trait]
impl DeadLetters for InMemoryBroker {
    async fn list(
        &self,
        queue: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterPage, BrokerError> {
        let now = Utc::now();
        let retention = self.core.retention;
        let mut st = self.core.lock();
        let from = match cursor {
            None => 0,
            Some(c) => c.parse::<u64>().map_err(|_| {
                BrokerError::Invalid(format!(
                    "dead-letter cursor `{c}` is not one this broker handed out; pass back `next` unchanged"
                ))
            })?,
        };
        let Some(q) = st.queues.get_mut(queue) else {
            return Ok(DeadLetterPage::default());
        };
        q.prune_dead(now, retention);
        let start = q.dead.partition_point(|(seq, _)| *seq < from);
        let items: Vec<DeadLetter> = q
            .dead
            .iter()
            .skip(start)
            .take(limit)
            .map(|(_, d)| d.clone())
            .collect();
        let next = q
            .dead
            .get(start + items.len())
            .map(|(seq, _)| seq.to_string());
        Ok(DeadLetterPage { items, next })
    }

    async fn get(&self, id: TaskId) -> Result<Option<DeadLetter>, BrokerError> {
        let now = Utc::now();
        let retention = self.core.retention;
        let mut st = self.core.lock();
        // The newest, should a task be dead in two queues.
        Ok(st
            .queues
            .values_mut()
            .filter_map(|q| {
                q.prune_dead(now, retention);
                q.dead
                    .iter()
                    .rev()
                    .find(|(_, d)| d.id == id)
                    .map(|(_, d)| d.clone())
            })
            .max_by_key(|d| d.dead_at))
    }

    async fn count(&self, queue: &str) -> Result<u64, BrokerError> {
        let now = Utc::now();
        let retention = self.core.retention;
        let mut st = self.core.lock();
        let Some(q) = st.queues.get_mut(queue) else {
            return Ok(0);
        };
        q.prune_dead(now, retention);
        Ok(q.dead.len() as u64)
    }

    async fn replay(
        &self,
        queue: &str,
        which: Replay,
        reset_attempts: bool,
    ) -> Result<u64, BrokerError> {
        let now = Utc::now();
        let retention = self.core.retention;
        let replayed = {
            let mut st = self.core.lock();
            let Some(q) = st.queues.get_mut(queue) else {
                return Ok(0);
            };
            q.prune_dead(now, retention);
            let taken: Vec<DeadLetter> = match which {
                Replay::One(id) => {
                    let Some(pos) = q.dead.iter().position(|(_, d)| d.id == id) else {
                        return Ok(0);
                    };
                    if q.dead[pos].1.envelope.is_none() {
                        return Err(BrokerError::Invalid(format!(
                            "dead letter {id} holds bytes that are not an envelope and cannot be replayed; inspect its `raw` text and purge it"
                        )));
                    }
                    q.dead.remove(pos).map(|(_, d)| d).into_iter().collect()
                }
                Replay::All => {
                    let (keep, take): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut q.dead)
                        .into_iter()
                        .partition(|(_, d)| d.envelope.is_none());
                    q.dead = keep;
                    take.into_iter().map(|(_, d)| d).collect()
                }
            };
            let n = taken.len() as u64;
            for d in taken {
                let Some(mut env) = d.envelope else { continue };
                if reset_attempts {
                    env.attempt = 0;
                    env.last_error = None;
                }
                queue.clone_into(&mut env.queue);
                st.retake_unique(&env, now);
                st.enqueue(Arc::new(env), 0, now);
            }
            n
        };
        if replayed > 0 {
            self.core.wake();
        }
        Ok(replayed)
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut st = self.core.lock();
        let Some(q) = st.queues.get_mut(queue) else {
            return Ok(0);
        };
        let n = q.dead.len() as u64;
        q.dead.clear();
        Ok(n)
    }
}

#[async_trait]
impl Broadcast for InMemoryBroker {
    async fn send(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        let mut channels = self
            .core
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = channels.get(channel) {
            if tx.receiver_count() == 0 {
                channels.remove(channel);
            } else {
                let _ = tx.send(payload.to_owned());
            }
        }
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<BroadcastStream, BrokerError> {
        let rx = {
            let mut channels = self
                .core
                .channels
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            channels
                .entry(channel.to_owned())
                .or_insert_with(|| broadcast::channel(BROADCAST_CAPACITY).0)
                .subscribe()
        };
        let channel = channel.to_owned();
        let stream = futures::stream::unfold((rx, channel), |(mut rx, channel)| async move {
            loop {
                match rx.recv().await {
                    Ok(payload) => {
                        let msg = BroadcastMessage {
                            channel: channel.clone(),
                            payload,
                        };
                        return Some((msg, (rx, channel)));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(%channel, skipped = n, "broadcast subscriber fell behind; messages skipped");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(stream.boxed())
    }
}
