//! The hand-off between the fetcher and the executor slots.
//!
//! The slots are a fixed set of executor loops started with the worker,
//! one per unit of concurrency. The fetcher pushes each fetched batch onto
//! one shared queue and wakes a slot per delivery; a slot pops a delivery,
//! runs it, and pops the next. Handing a delivery over is a queue push, not
//! a task spawn, and a slot that finds more work when it finishes takes it
//! without sleeping.
//!
//! Free slots are counted, not collected: `in_flight` counts deliveries
//! handed over and not yet finished (queued or running), so the fetcher
//! may claim `concurrency - in_flight` more. A finishing slot wakes the
//! fetcher only when the free count reaches a level the fetcher waits for
//! (one free slot, or half a batch), not once per task.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::broker::Delivery;

pub(crate) struct Dispatch {
    queue: Mutex<VecDeque<Delivery>>,
    /// Slots wait here for work.
    work: Notify,
    /// Deliveries handed over and not finished.
    in_flight: AtomicUsize,
    /// The fetcher waits here for free slots.
    freed: Notify,
    /// No more deliveries will come.
    closed: AtomicBool,
    /// The shutdown grace is over: what has not started is requeued.
    aborted: AtomicBool,
    concurrency: usize,
    /// The free-slot count the fetcher gathers before claiming when busy.
    batch: usize,
}

impl Dispatch {
    pub(crate) fn new(concurrency: usize, batch: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::with_capacity(concurrency)),
            work: Notify::new(),
            in_flight: AtomicUsize::new(0),
            freed: Notify::new(),
            closed: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            concurrency,
            batch: batch.clamp(1, concurrency),
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Delivery>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Slots free to take a delivery now.
    pub(crate) fn free(&self) -> usize {
        self.concurrency
            .saturating_sub(self.in_flight.load(Ordering::Acquire))
    }

    /// Deliveries handed over and not finished (queued or running).
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The free-slot count worth gathering before a claim when busy.
    pub(crate) fn batch(&self) -> usize {
        self.batch
    }

    /// Resolves after a slot frees up at a level the fetcher waits for;
    /// the caller re-reads [`Dispatch::free`].
    pub(crate) async fn freed(&self) {
        self.freed.notified().await;
    }

    /// Hands `deliveries` to the slots. The caller claimed no more than
    /// [`Dispatch::free`] said.
    pub(crate) fn push(&self, deliveries: impl ExactSizeIterator<Item = Delivery>) {
        let n = deliveries.len();
        if n == 0 {
            return;
        }
        self.in_flight.fetch_add(n, Ordering::AcqRel);
        self.queue().extend(deliveries);
        for _ in 0..n {
            self.work.notify_one();
        }
    }

    /// The next delivery for a slot; `None` once closed and drained.
    pub(crate) async fn next(&self) -> Option<Delivery> {
        loop {
            if let Some(d) = self.queue().pop_front() {
                return Some(d);
            }
            let notified = self.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after registering, so a push or close in between is
            // not missed.
            if let Some(d) = self.queue().pop_front() {
                return Some(d);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
        }
    }

    /// A slot finished a delivery.
    pub(crate) fn finished(&self) {
        let before = self.in_flight.fetch_sub(1, Ordering::AcqRel);
        let free = self.concurrency - (before - 1);
        if free == 1 || free == self.batch {
            self.freed.notify_one();
        }
    }

    /// The shutdown grace is over: deliveries not started yet are requeued,
    /// not run.
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }

    /// Whether [`Dispatch::abort`] was called.
    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// No more deliveries: slots end once the queue is empty.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.work.notify_waiters();
    }
}
