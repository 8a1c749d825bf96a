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

use crate::context::Context;

pub(crate) struct Dispatch {
    queue: Mutex<VecDeque<Context>>,
    /// Slots wait here for work.
    work: Notify,
    /// Slots woken for work that have not looked at the queue yet.
    searching: AtomicUsize,
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
            searching: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            freed: Notify::new(),
            closed: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            concurrency,
            batch: batch.clamp(1, concurrency),
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Context>> {
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

    /// Hands `tasks` to the slots. The caller claimed no more than
    /// [`Dispatch::free`] said.
    pub(crate) fn push(&self, tasks: impl ExactSizeIterator<Item = Context>) {
        let n = tasks.len();
        if n == 0 {
            return;
        }
        self.in_flight.fetch_add(n, Ordering::AcqRel);
        self.queue().extend(tasks);
        self.wake_one();
    }

    /// Wakes a slot unless one is already on its way to the queue.
    fn wake_one(&self) {
        if self.searching.load(Ordering::Acquire) == 0 {
            self.searching.fetch_add(1, Ordering::AcqRel);
            self.work.notify_one();
        }
    }

    /// A woken slot reached the queue.
    fn searched(&self) {
        let _ = self
            .searching
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Pops a task; wakes the next slot when more are queued.
    fn pop(&self) -> Option<Context> {
        let (task, more) = {
            let mut q = self.queue();
            let task = q.pop_front();
            (task, !q.is_empty())
        };
        if task.is_some() && more {
            self.wake_one();
        }
        task
    }

    /// The next task for a slot; `None` once closed and drained.
    pub(crate) async fn next(&self) -> Option<Context> {
        loop {
            if let Some(task) = self.pop() {
                return Some(task);
            }
            let notified = self.work.notified();
            tokio::pin!(notified);
            if notified.as_mut().enable() {
                // A wake-up was waiting for whoever came next: this slot.
                self.searched();
                continue;
            }
            // Re-check after registering, so a push or close in between is
            // not missed. (A wake-up that reaches the registration meanwhile
            // is passed on to another slot when it is dropped.)
            if let Some(task) = self.pop() {
                return Some(task);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
            self.searched();
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
