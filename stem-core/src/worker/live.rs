//! What a running worker holds now, for the control plane: the tasks it
//! runs (each with a token that stops it), the revoked ids it has heard
//! of, and the queues it was told to pause.
//!
//! The hot path pays little for it: a task is listed only once its first
//! poll did not finish it (a task that completes at once cannot be
//! inspected or stopped anyway), and the revoked set is looked at only
//! when it is not empty (one atomic load otherwise).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control::TaskInfo;
use crate::envelope::{Envelope, TaskId};

/// Revoked ids remembered per worker (the oldest are forgotten first; the
/// result backend keeps revocations for longer).
const REVOKED_KEPT: usize = 10_000;

/// A task running on this worker.
struct Running {
    info: TaskInfo,
    /// Stops the run (`revoke --terminate`).
    stop: CancellationToken,
}

#[derive(Default)]
struct Revoked {
    order: VecDeque<TaskId>,
    set: HashSet<TaskId>,
}

/// The worker's live state (see the module docs).
pub(crate) struct Live {
    running: Mutex<HashMap<TaskId, Running>>,
    revoked: Mutex<Revoked>,
    any_revoked: AtomicBool,
    /// The paused queues; the fetcher watches it.
    paused: watch::Sender<BTreeSet<String>>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            running: Mutex::default(),
            revoked: Mutex::default(),
            any_revoked: AtomicBool::new(false),
            paused: watch::Sender::new(BTreeSet::new()),
        }
    }
}

/// Lists a running task until dropped.
pub(crate) struct RunningGuard<'a> {
    live: &'a Live,
    id: TaskId,
    /// Cancelled by `revoke --terminate`.
    pub(crate) stop: CancellationToken,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        lock(&self.live.running).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A task's description for `inspect`.
pub(crate) fn info(
    envelope: &Envelope,
    started_at: Option<DateTime<Utc>>,
    attempt: u32,
) -> TaskInfo {
    TaskInfo {
        id: envelope.id,
        name: envelope.name.clone(),
        queue: envelope.queue.clone(),
        args_bytes: envelope.args.get().len(),
        started_at,
        attempt,
    }
}

impl Live {
    /// Lists a task as running until the guard drops.
    pub(crate) fn start(&self, envelope: &Envelope, attempt: u32) -> RunningGuard<'_> {
        let stop = CancellationToken::new();
        let running = Running {
            info: info(envelope, Some(Utc::now()), attempt),
            stop: stop.clone(),
        };
        lock(&self.running).insert(envelope.id, running);
        RunningGuard {
            live: self,
            id: envelope.id,
            stop,
        }
    }

    /// The running tasks, oldest start first.
    pub(crate) fn active(&self) -> Vec<TaskInfo> {
        let mut tasks: Vec<TaskInfo> = lock(&self.running)
            .values()
            .map(|r| r.info.clone())
            .collect();
        tasks.sort_by_key(|t| t.started_at);
        tasks
    }

    /// Remembers a revoked id; with `terminate`, stops its run if it runs
    /// here. Returns whether it runs here.
    pub(crate) fn revoke(&self, id: TaskId, terminate: bool) -> bool {
        {
            let mut revoked = lock(&self.revoked);
            if revoked.set.insert(id) {
                revoked.order.push_back(id);
                if revoked.order.len() > REVOKED_KEPT
                    && let Some(old) = revoked.order.pop_front()
                {
                    revoked.set.remove(&old);
                }
            }
        }
        self.any_revoked.store(true, Ordering::Release);
        let running = lock(&self.running);
        match running.get(&id) {
            Some(r) => {
                if terminate {
                    r.stop.cancel();
                }
                true
            }
            None => false,
        }
    }

    /// Whether this worker has heard that `id` is revoked.
    pub(crate) fn is_revoked(&self, id: TaskId) -> bool {
        self.any_revoked.load(Ordering::Acquire) && lock(&self.revoked).set.contains(&id)
    }

    /// The revoked ids this worker knows, oldest first.
    pub(crate) fn revoked_ids(&self) -> Vec<TaskId> {
        lock(&self.revoked).order.iter().copied().collect()
    }

    /// Pauses `queue`; false if it already was.
    pub(crate) fn pause(&self, queue: &str) -> bool {
        self.paused.send_if_modified(|p| p.insert(queue.to_owned()))
    }

    /// Resumes `queue`; false if it was not paused.
    pub(crate) fn resume(&self, queue: &str) -> bool {
        self.paused.send_if_modified(|p| p.remove(queue))
    }

    /// The paused queues.
    pub(crate) fn paused(&self) -> BTreeSet<String> {
        self.paused.borrow().clone()
    }

    /// A receiver that sees every change of the paused set.
    pub(crate) fn watch_paused(&self) -> watch::Receiver<BTreeSet<String>> {
        self.paused.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope::new("t", "q", serde_json::json!({"a": 1})).unwrap()
    }

    #[test]
    fn a_running_task_is_listed_until_its_guard_drops() {
        let live = Live::default();
        let env = envelope();
        let guard = live.start(&env, 1);
        assert_eq!(live.active()[0].id, env.id);
        assert_eq!(live.active()[0].args_bytes, env.args.get().len());
        assert!(live.revoke(env.id, true));
        assert!(guard.stop.is_cancelled());
        drop(guard);
        assert!(live.active().is_empty());
        assert!(live.is_revoked(env.id));
    }

    #[test]
    fn revoke_without_terminate_leaves_the_run_alone() {
        let live = Live::default();
        let env = envelope();
        let guard = live.start(&env, 1);
        assert!(live.revoke(env.id, false));
        assert!(!guard.stop.is_cancelled());
        assert!(!live.revoke(envelope().id, true), "not running here");
    }

    #[test]
    fn the_revoked_set_is_bounded() {
        let live = Live::default();
        let first = TaskId::new();
        live.revoke(first, false);
        for _ in 0..REVOKED_KEPT {
            live.revoke(TaskId::new(), false);
        }
        assert!(!live.is_revoked(first));
        assert_eq!(live.revoked_ids().len(), REVOKED_KEPT);
    }

    #[test]
    fn pause_and_resume_say_whether_they_changed_anything() {
        let live = Live::default();
        let rx = live.watch_paused();
        assert!(live.pause("a"));
        assert!(!live.pause("a"));
        assert!(rx.has_changed().unwrap());
        assert!(live.resume("a"));
        assert!(!live.resume("a"));
        assert!(live.paused().is_empty());
    }
}
