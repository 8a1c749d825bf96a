//! The hand-off between the fetcher and the executor slots.
//!
//! The slots are a fixed set of executor loops started with the worker,
//! one per unit of concurrency. The fetcher pushes each fetched batch onto
//! one shared queue and wakes a slot per delivery; a slot pops a delivery,
//! runs it, and pops the next. Handing a delivery over is a queue push, not
//! a task spawn, and a slot that finds more work when it finishes takes it
//! without sleeping.
//!
//! The worker holds up to `window` (the prefetch) deliveries at once,
//! running or waiting here, so a slot that finishes finds its next task
//! queued instead of waiting for a claim round trip, and claims come in
//! batches of about half the window. `in_flight` counts deliveries handed
//! over and not finished (queued or running): the fetcher may claim
//! `window - in_flight` more. A finishing slot wakes the fetcher only when
//! that reaches a level the fetcher waits for (half the window free, or a
//! slot going idle), not once per task.
//!
//! Queued deliveries are leased like running ones: each carries the time
//! its lease was last renewed, the keeper (`keep_queued`) renews those that
//! wait longer than a third of the lease, a slot renews one the keeper has
//! not reached before running it, and from shutdown on whatever is still
//! queued is requeued rather than run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::broker::Receipt;
use crate::context::Context;

/// A delivery waiting for a slot.
pub(crate) struct Queued {
    pub(crate) ctx: Context,
    /// When its lease was last known good: read before the claim or the
    /// successful renewal, so never later than the broker's own reckoning.
    pub(crate) renewed: Instant,
    /// The keeper is renewing it now (`renewed` is updated only once that
    /// succeeds).
    renewing: bool,
}

/// Aligned to its own cache lines: its counters change with every task,
/// and the runtime fields next to it are read with every task.
#[repr(align(128))]
pub(crate) struct Dispatch {
    queue: Mutex<VecDeque<Queued>>,
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
    /// Executor slots.
    concurrency: usize,
    /// Deliveries held at most, running or queued (the prefetch).
    window: usize,
    /// The free count the fetcher gathers before claiming when busy.
    batch: usize,
}

impl Dispatch {
    /// `window` is raised to `concurrency` when below it.
    pub(crate) fn new(concurrency: usize, window: usize) -> Self {
        let window = window.max(concurrency);
        Self {
            queue: Mutex::new(VecDeque::with_capacity(window)),
            work: Notify::new(),
            searching: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            freed: Notify::new(),
            closed: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            concurrency,
            window,
            batch: (window / 2).max(1),
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Queued>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deliveries the worker may claim now.
    pub(crate) fn free(&self) -> usize {
        self.window
            .saturating_sub(self.in_flight.load(Ordering::Acquire))
    }

    /// Whether every slot has a task, running or queued for it.
    pub(crate) fn slots_busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) >= self.concurrency
    }

    /// Deliveries handed over and not finished (queued or running).
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Deliveries waiting for a slot.
    pub(crate) fn queued_len(&self) -> usize {
        self.queue().len()
    }

    /// The deliveries waiting for a slot, for `inspect reserved`.
    pub(crate) fn queued_infos(&self) -> Vec<crate::control::TaskInfo> {
        self.queue()
            .iter()
            .map(|q| {
                let env = q.ctx.envelope();
                super::live::info(env, None, env.attempt + 1)
            })
            .collect()
    }

    /// Whether a delivery of task `id` waits for a slot.
    pub(crate) fn holds(&self, id: crate::envelope::TaskId) -> bool {
        self.queue().iter().any(|q| q.ctx.envelope().id == id)
    }

    /// The free count worth gathering before a claim when busy.
    pub(crate) fn batch(&self) -> usize {
        self.batch
    }

    /// Resolves after a delivery finishes at a level the fetcher waits for
    /// (half the window free, or a slot idle); the caller re-reads
    /// [`Dispatch::free`].
    pub(crate) async fn freed(&self) {
        self.freed.notified().await;
    }

    /// Hands `tasks`, leased at `renewed`, to the slots. The caller claimed
    /// no more than [`Dispatch::free`] said.
    pub(crate) fn push(&self, tasks: impl ExactSizeIterator<Item = Context>, renewed: Instant) {
        let n = tasks.len();
        if n == 0 {
            return;
        }
        self.in_flight.fetch_add(n, Ordering::AcqRel);
        self.queue().extend(tasks.map(|ctx| Queued {
            ctx,
            renewed,
            renewing: false,
        }));
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
    fn pop(&self) -> Option<Queued> {
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
    pub(crate) async fn next(&self) -> Option<Queued> {
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

    /// A delivery handed over is done with (run, requeued or lost).
    pub(crate) fn finished(&self) {
        let after = self.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        if self.window.saturating_sub(after) == self.batch || after + 1 == self.concurrency {
            self.freed.notify_one();
        }
    }

    /// Receipts of queued deliveries whose lease was last renewed `period`
    /// or more ago, marked as being renewed: the caller renews each and
    /// reports with [`Dispatch::renewal_done`]. A slot that pops one
    /// meanwhile sees its old `renewed` and renews it itself.
    pub(crate) fn stale(&self, period: Duration) -> Vec<Receipt> {
        let now = Instant::now();
        let mut q = self.queue();
        q.iter_mut()
            .filter(|t| !t.renewing && now.duration_since(t.renewed) >= period)
            .map(|t| {
                t.renewing = true;
                t.ctx.receipt().clone()
            })
            .collect()
    }

    /// A renewal from [`Dispatch::stale`] ended: `Some(at)` when it
    /// succeeded (`at` read before the call), `None` when it failed (the
    /// next look tries again).
    pub(crate) fn renewal_done(&self, receipt: &Receipt, at: Option<Instant>) {
        let mut q = self.queue();
        if let Some(t) = q.iter_mut().find(|t| t.ctx.receipt() == receipt) {
            t.renewing = false;
            if let Some(at) = at {
                t.renewed = at;
            }
        }
    }

    /// Drops a queued delivery whose lease turned out lost; `true` when it
    /// was still queued (then it counts as finished).
    pub(crate) fn forget(&self, receipt: &Receipt) -> bool {
        let removed = {
            let mut q = self.queue();
            q.iter()
                .position(|t| t.ctx.receipt() == receipt)
                .and_then(|i| q.remove(i))
        };
        let found = removed.is_some();
        if found {
            self.finished();
        }
        found
    }

    /// Takes every delivery not started yet (shutdown: they are requeued,
    /// not run). The caller calls [`Dispatch::finished`] for each.
    pub(crate) fn take_queued(&self) -> Vec<Queued> {
        self.queue().drain(..).collect()
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
