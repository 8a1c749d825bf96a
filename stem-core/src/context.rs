//! [`Context`], injected into a task that asks for it, and [`State`],
//! shared values registered once on the worker.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::{ResultBackend, TaskRecord, TaskState};
use crate::broker::{Broker, Delivery, Receipt};
use crate::client::Stem;
use crate::envelope::{Envelope, TaskId};
use crate::error::{BackendError, BrokerError};

/// Shared state of one type, registered on the worker with
/// `Worker::builder().state(value)` and injected into tasks that take a
/// `State<T>` parameter.
///
/// It derefs to `T` and has no public field, so `state.0` and
/// `state.field` reach the value's own fields; [`State::arc`] and
/// [`State::into_inner`] give the shared `Arc`.
///
/// ```
/// struct Pool(u32);
/// let s = stem_core::State::new(Pool(4));
/// assert_eq!(s.0, 4);
/// assert_eq!(std::sync::Arc::strong_count(s.arc()), 1);
/// ```
#[derive(Debug)]
pub struct State<T: ?Sized>(Arc<T>);

impl<T> State<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(Arc::new(value))
    }
}

impl<T: ?Sized> State<T> {
    /// The shared value's `Arc` (clone it to keep the value beyond the task).
    #[must_use]
    pub fn arc(&self) -> &Arc<T> {
        &self.0
    }

    /// The shared value's `Arc`, taking the `State` apart.
    #[must_use]
    pub fn into_inner(self) -> Arc<T> {
        self.0
    }
}

impl<T: ?Sized> From<Arc<T>> for State<T> {
    fn from(value: Arc<T>) -> Self {
        Self(value)
    }
}

impl<T: ?Sized> Clone for State<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T: ?Sized> Deref for State<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The values a worker shares with its tasks, keyed by type.
#[derive(Default, Clone)]
pub struct StateMap {
    values: HashMap<TypeId, (Arc<dyn Any + Send + Sync>, &'static str), TypeIdHasher>,
}

/// Hashes a `TypeId`, which is already a hash: taken as it is instead of
/// running `SipHash` over it on every state lookup (one per task run).
#[derive(Clone, Copy, Default)]
struct TypeIdHasher(u64);

impl std::hash::BuildHasher for TypeIdHasher {
    type Hasher = Self;
    fn build_hasher(&self) -> Self {
        Self(0)
    }
}

impl std::hash::Hasher for TypeIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // FNV-1a over whatever `TypeId` writes beyond one `u64`.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

impl StateMap {
    /// Adds (or replaces) the value of type `T`.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.values.insert(
            TypeId::of::<T>(),
            (Arc::new(value), std::any::type_name::<T>()),
        );
    }

    /// The value of type `T`, if registered.
    #[must_use]
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<State<T>> {
        let (v, _) = self.values.get(&TypeId::of::<T>())?;
        Arc::clone(v).downcast::<T>().ok().map(State)
    }

    /// Whether a value with this type id is registered.
    #[must_use]
    pub fn contains(&self, id: TypeId) -> bool {
        self.values.contains_key(&id)
    }

    /// The type names registered, for error messages.
    #[must_use]
    pub fn type_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.values.values().map(|(_, n)| *n).collect();
        v.sort_unstable();
        v
    }
}

impl std::fmt::Debug for StateMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.type_names()).finish()
    }
}

/// What a running task knows about itself and can ask of the worker:
/// id, attempt, headers, progress, lease extension, child tasks and
/// cancellation.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

/// One delivery's own part of a context; what every task of a worker
/// shares lives behind `shared`, so a worker builds a context with one
/// allocation and no copies of the envelope.
struct ContextInner {
    envelope: Arc<Envelope>,
    receipt: Receipt,
    deliveries: u32,
    /// This delivery's cancellation: a child of the worker's, so the end
    /// of the shutdown grace fires every delivery's at once; the executor
    /// fires one alone at its time limit, on revocation or a lost lease.
    cancel: CancellationToken,
    shared: Arc<ContextShared>,
}

/// The part of a [`Context`] every task of one worker shares.
pub(crate) struct ContextShared {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) backend: Option<Arc<dyn ResultBackend>>,
    pub(crate) client: Option<Stem>,
    pub(crate) states: Arc<StateMap>,
    /// Fired when the shutdown grace ends (the parent of every
    /// delivery's own token).
    pub(crate) cancel: CancellationToken,
    pub(crate) worker_id: Arc<str>,
    /// The threads of `blocking = true` tasks still running.
    pub(crate) blocking: Arc<BlockingThreads>,
}

/// The threads of `blocking = true` tasks that have not returned yet, so
/// the worker can tell at shutdown which ones it abandons (a thread cannot
/// be killed: one that ignores its cancellation runs until the process
/// exits).
#[derive(Default)]
pub(crate) struct BlockingThreads {
    running: std::sync::Mutex<Vec<(u64, TaskId, String)>>,
    next: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl BlockingThreads {
    /// Registers the thread about to run this delivery; it is listed
    /// until the guard is dropped (when the thread returns).
    pub(crate) fn register(self: &Arc<Self>, envelope: &Envelope) -> BlockingGuard {
        let key = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().push((key, envelope.id, envelope.name.clone()));
        BlockingGuard {
            threads: Arc::clone(self),
            key,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, TaskId, String)>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The tasks (id, name) whose threads still run.
    pub(crate) fn running(&self) -> Vec<(TaskId, String)> {
        self.lock()
            .iter()
            .map(|(_, id, name)| (*id, name.clone()))
            .collect()
    }

    /// Waits until no thread runs, or `limit` passes; returns whether none runs.
    pub(crate) async fn wait_idle(&self, limit: Duration) -> bool {
        let idle = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.lock().is_empty() {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(limit, idle).await.is_ok()
    }
}

/// Keeps a blocking task listed in [`BlockingThreads`] while its thread runs.
pub(crate) struct BlockingGuard {
    threads: Arc<BlockingThreads>,
    key: u64,
}

impl Drop for BlockingGuard {
    fn drop(&mut self) {
        self.threads.lock().retain(|(k, _, _)| *k != self.key);
        self.threads.changed.notify_waiters();
    }
}

std::thread_local! {
    /// The guard of the blocking task whose handler is being called on
    /// this thread: set by the executor around the call, taken by
    /// `__private::run_blocking` into the thread it starts.
    static NEXT_BLOCKING: std::cell::RefCell<Option<BlockingGuard>> =
        const { std::cell::RefCell::new(None) };
}

/// Calls `f` (a task's handler) with `guard` offered to the blocking
/// thread it may start; a guard not taken is dropped after the call.
pub(crate) fn offer_blocking_guard<R>(guard: BlockingGuard, f: impl FnOnce() -> R) -> R {
    NEXT_BLOCKING.with(|slot| *slot.borrow_mut() = Some(guard));
    let r = f();
    drop(NEXT_BLOCKING.with(|slot| slot.borrow_mut().take()));
    r
}

/// The guard offered by [`offer_blocking_guard`] on this thread, if any.
pub(crate) fn take_blocking_guard() -> Option<BlockingGuard> {
    NEXT_BLOCKING.with(|slot| slot.borrow_mut().take())
}

/// Everything a worker hands to [`Context::new`].
#[allow(missing_debug_implementations)]
pub struct ContextParts {
    /// The delivered envelope.
    pub envelope: Envelope,
    /// Its lease.
    pub receipt: Receipt,
    /// How many times the broker has handed it out.
    pub deliveries: u32,
    /// The broker it came from.
    pub broker: Arc<dyn Broker>,
    /// The result backend, if any.
    pub backend: Option<Arc<dyn ResultBackend>>,
    /// A client for child tasks.
    pub client: Option<Stem>,
    /// Shared state.
    pub states: Arc<StateMap>,
    /// The worker's cancellation: the context's own is a child of it
    /// (fired with it, or alone by the worker).
    pub cancel: CancellationToken,
    /// The worker's id.
    pub worker_id: String,
}

impl Context {
    /// Builds a context (workers do this; tests may too).
    #[must_use]
    pub fn new(parts: ContextParts) -> Self {
        let ContextParts {
            envelope,
            receipt,
            deliveries,
            broker,
            backend,
            client,
            states,
            cancel,
            worker_id,
        } = parts;
        let shared = Arc::new(ContextShared {
            broker,
            backend,
            client,
            states,
            cancel,
            worker_id: Arc::from(worker_id),
            blocking: Arc::default(),
        });
        Self::with_shared(Arc::new(envelope), receipt, deliveries, shared)
    }

    /// A delivery's context whose worker-wide parts are shared (the
    /// worker's path: one allocation per delivery, no copies).
    pub(crate) fn for_delivery(delivery: Delivery, shared: &Arc<ContextShared>) -> Self {
        let Delivery {
            envelope,
            receipt,
            deliveries,
        } = delivery;
        Self::with_shared(envelope, receipt, deliveries, Arc::clone(shared))
    }

    fn with_shared(
        envelope: Arc<Envelope>,
        receipt: Receipt,
        deliveries: u32,
        shared: Arc<ContextShared>,
    ) -> Self {
        Self {
            inner: Arc::new(ContextInner {
                envelope,
                receipt,
                deliveries,
                cancel: shared.cancel.child_token(),
                shared,
            }),
        }
    }

    /// The delivered envelope.
    pub(crate) fn envelope(&self) -> &Envelope {
        &self.inner.envelope
    }

    /// The delivery's lease.
    pub(crate) fn receipt(&self) -> &Receipt {
        &self.inner.receipt
    }

    /// The receipt, to settle the delivery with (a receipt is a few words
    /// and a shared queue name: cloning it copies no string).
    pub(crate) fn owned_receipt(&self) -> Receipt {
        self.inner.receipt.clone()
    }

    /// The task id.
    #[must_use]
    pub fn id(&self) -> TaskId {
        self.inner.envelope.id
    }

    /// The task name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.envelope.name
    }

    /// The queue it was delivered from.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.inner.envelope.queue
    }

    /// This attempt's number, starting at 1.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.inner.envelope.attempt + 1
    }

    /// Retries allowed after the first attempt.
    #[must_use]
    pub fn max_retries(&self) -> u32 {
        self.inner.envelope.max_retries
    }

    /// How many times the broker has handed this envelope out, this one
    /// included (never decremented; not the attempt count, see
    /// [`Context::attempt`]).
    #[must_use]
    pub fn deliveries(&self) -> u32 {
        self.inner.deliveries
    }

    /// All headers.
    #[must_use]
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.inner.envelope.headers
    }

    /// One header.
    #[must_use]
    pub fn header(&self, key: &str) -> Option<&str> {
        self.inner.envelope.headers.get(key).map(String::as_str)
    }

    /// The task that enqueued this one.
    #[must_use]
    pub fn parent_id(&self) -> Option<TaskId> {
        self.inner.envelope.parent_id
    }

    /// The group this task belongs to.
    #[must_use]
    pub fn group_id(&self) -> Option<TaskId> {
        self.inner.envelope.group_id
    }

    /// The worker running it.
    #[must_use]
    pub fn worker_id(&self) -> &str {
        &self.inner.shared.worker_id
    }

    /// The shared value of type `T`, if the worker has one.
    #[must_use]
    pub fn state<T: Send + Sync + 'static>(&self) -> Option<State<T>> {
        self.inner.shared.states.get::<T>()
    }

    /// A client for enqueueing child tasks (their `parent_id` is set when
    /// enqueued with `.parent(&ctx)`).
    #[must_use]
    pub fn client(&self) -> Option<&Stem> {
        self.inner.shared.client.as_ref()
    }

    /// Whether this run was asked to stop: its time limit passed, it was
    /// revoked, its lease went to another consumer, or the shutdown grace
    /// is over. Blocking code (`blocking = true`) checks it in its loops
    /// and returns: the worker cannot stop a thread, and one that ignores
    /// it runs on, abandoned, until the process exits.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Resolves when this run is asked to stop (see
    /// [`Context::is_cancelled`]); for async code that hands work to
    /// other tasks or threads and wants to tell them.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await;
    }

    /// This run's cancellation token (a clone), to pass to code that
    /// takes one.
    #[must_use]
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// Asks this run to stop (the executor, at its time limit, on
    /// revocation or on a lost lease).
    pub(crate) fn cancel(&self) {
        self.inner.cancel.cancel();
    }

    /// The threads of this worker's blocking tasks.
    pub(crate) fn blocking_threads(&self) -> &Arc<BlockingThreads> {
        &self.inner.shared.blocking
    }

    /// Pushes this delivery's lease to now + `lease`. The worker already
    /// keeps leases alive; call this only to ask for a longer one.
    ///
    /// # Errors
    /// [`BrokerError::LeaseLost`] when the lease already expired.
    pub async fn extend_lease(&self, lease: Duration) -> Result<(), BrokerError> {
        self.inner
            .shared
            .broker
            .extend_lease(&self.inner.receipt, lease)
            .await
    }

    /// Records progress (any JSON value) on the task's `Started` record.
    ///
    /// # Errors
    /// A backend error; `Ok(())` when there is no backend.
    pub async fn progress(&self, progress: serde_json::Value) -> Result<(), BackendError> {
        let Some(backend) = &self.inner.shared.backend else {
            return Ok(());
        };
        let mut rec = TaskRecord::new(self.id(), TaskState::Started);
        rec.name = Some(self.inner.envelope.name.clone());
        rec.attempts = self.attempt();
        rec.worker_id = Some(self.worker_id().to_owned());
        rec.group_id = self.group_id();
        rec.progress = Some(progress);
        backend.store(rec).await.map(|_| ())
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id())
            .field("name", &self.name())
            .field("attempt", &self.attempt())
            .finish_non_exhaustive()
    }
}
