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
    shared: Arc<ContextShared>,
}

/// The part of a [`Context`] every task of one worker shares.
pub(crate) struct ContextShared {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) backend: Option<Arc<dyn ResultBackend>>,
    pub(crate) client: Option<Stem>,
    pub(crate) states: Arc<StateMap>,
    /// Fired when the shutdown grace ends.
    pub(crate) cancel: CancellationToken,
    pub(crate) worker_id: Arc<str>,
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
    /// Fired on revocation or when the shutdown grace ends.
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
    pub(crate) fn take_receipt(&mut self) -> Receipt {
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

    /// Whether the task was asked to stop (revoked, or shutdown grace over).
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.inner.shared.cancel.is_cancelled()
    }

    /// Resolves when the task is asked to stop.
    pub async fn cancelled(&self) {
        self.inner.shared.cancel.cancelled().await;
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
