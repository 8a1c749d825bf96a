//! [`InMemoryBackend`]: task records, groups, heartbeats and revocations in
//! process memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::Notify;

use crate::backend::{
    GroupSpec, GroupStatus, ResultBackend, TaskRecord, WorkerHeartbeat, WorkerStatus,
};
use crate::envelope::{Envelope, TaskId};
use crate::error::BackendError;

/// Heartbeats of workers silent for longer than this (plus three of their
/// intervals) are dropped by `maintain`.
const WORKER_RETENTION: Duration = Duration::from_secs(3600);

/// A result backend in this process's memory.
///
/// Cheap to clone: clones share the same records.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::BackendError> {
/// use std::time::Duration;
/// use stem_core::{ResultBackend, TaskId, TaskRecord, TaskState};
/// let backend = stem_core::memory::InMemoryBackend::new();
/// let id = TaskId::new();
/// backend.store(TaskRecord::new(id, TaskState::Revoked)).await?;
/// let rec = backend.wait(id, Duration::from_secs(1)).await?.unwrap();
/// assert!(rec.state.is_terminal());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct InMemoryBackend {
    core: Arc<Core>,
}

impl std::fmt::Debug for InMemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryBackend")
            .field("instance", &self.core.label)
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryBackend {
    /// A private backend.
    #[must_use]
    pub fn new() -> Self {
        Self {
            core: Arc::new(Core::new(String::from("memory (private)"))),
        }
    }

    /// The process-wide backend `name` in `namespace`, the one
    /// `memory://name` opens.
    #[must_use]
    pub fn shared(name: &str, namespace: &str) -> Self {
        Self {
            core: super::shared_backend_core(name, namespace),
        }
    }
}

struct Group {
    members: Vec<TaskId>,
    callback: Option<Envelope>,
    /// The callback was handed out (or there was none and the group completed).
    fired: bool,
    expires: DateTime<Utc>,
}

#[derive(Default)]
struct State {
    records: HashMap<TaskId, TaskRecord>,
    groups: HashMap<TaskId, Group>,
    workers: HashMap<String, WorkerHeartbeat>,
    revoked: HashMap<TaskId, DateTime<Utc>>,
    /// One `Notify` per task id someone is waiting on.
    watchers: HashMap<TaskId, Arc<Notify>>,
}

impl State {
    fn live(&self, id: TaskId, now: DateTime<Utc>) -> Option<&TaskRecord> {
        self.records.get(&id).filter(|r| r.expires_at() > now)
    }

    fn store(&mut self, record: TaskRecord, now: DateTime<Utc>) -> bool {
        if let Some(old) = self.live(record.id, now)
            && !record.may_replace(old)
        {
            return false;
        }
        let id = record.id;
        self.records.insert(id, record);
        if let Some(n) = self.watchers.get(&id) {
            n.notify_waiters();
        }
        true
    }
}

/// One instance's storage, shared by its clients.
pub(super) struct Core {
    label: String,
    state: Mutex<State>,
}

impl Core {
    pub(super) fn new(label: String) -> Self {
        Self {
            label,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, id: TaskId) -> Option<TaskRecord> {
        self.lock().live(id, Utc::now()).cloned()
    }
}

fn after(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now.checked_add_signed(TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[async_trait]
impl ResultBackend for InMemoryBackend {
    fn describe(&self) -> String {
        self.core.label.clone()
    }

    async fn store(&self, record: TaskRecord) -> Result<bool, BackendError> {
        Ok(self.core.lock().store(record, Utc::now()))
    }

    async fn store_many(&self, records: Vec<TaskRecord>) -> Vec<Result<bool, BackendError>> {
        let now = Utc::now();
        let mut st = self.core.lock();
        records.into_iter().map(|r| Ok(st.store(r, now))).collect()
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, BackendError> {
        Ok(self.core.get(id))
    }

    async fn wait(
        &self,
        id: TaskId,
        timeout: Duration,
    ) -> Result<Option<TaskRecord>, BackendError> {
        let until = Instant::now() + timeout;
        let notify = self
            .core
            .lock()
            .watchers
            .entry(id)
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone();
        let latest = loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let rec = self.core.get(id);
            if rec.as_ref().is_some_and(|r| r.state.is_terminal()) || Instant::now() >= until {
                break rec;
            }
            if tokio::time::timeout_at(until.into(), notified)
                .await
                .is_err()
            {
                break self.core.get(id);
            }
        };
        let mut st = self.core.lock();
        drop(notify);
        if st
            .watchers
            .get(&id)
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            st.watchers.remove(&id);
        }
        Ok(latest)
    }

    async fn create_group(&self, group: GroupSpec) -> Result<(), BackendError> {
        let now = Utc::now();
        let mut st = self.core.lock();
        if st.groups.get(&group.id).is_some_and(|g| g.expires > now) {
            // Creating a group twice (a retried request) keeps the first, so
            // its callback still fires exactly once.
            return Ok(());
        }
        st.groups.insert(
            group.id,
            Group {
                members: group.members,
                callback: group.callback,
                fired: false,
                expires: after(now, group.ttl),
            },
        );
        Ok(())
    }

    async fn group(&self, id: TaskId) -> Result<Option<GroupStatus>, BackendError> {
        let now = Utc::now();
        let st = self.core.lock();
        let Some(g) = st.groups.get(&id).filter(|g| g.expires > now) else {
            return Ok(None);
        };
        let members: Vec<(TaskId, Option<TaskRecord>)> = g
            .members
            .iter()
            .map(|m| (*m, st.live(*m, now).cloned()))
            .collect();
        let complete = members
            .iter()
            .all(|(_, r)| r.as_ref().is_some_and(|r| r.state.is_terminal()));
        Ok(Some(GroupStatus {
            id,
            members,
            complete,
        }))
    }

    async fn member_finished(&self, group_id: TaskId) -> Result<Option<Envelope>, BackendError> {
        let now = Utc::now();
        let mut st = self.core.lock();
        let Some(g) = st.groups.get(&group_id).filter(|g| g.expires > now) else {
            return Ok(None);
        };
        if g.fired {
            return Ok(None);
        }
        let complete = g
            .members
            .iter()
            .all(|m| st.live(*m, now).is_some_and(|r| r.state.is_terminal()));
        if !complete {
            return Ok(None);
        }
        let g = st
            .groups
            .get_mut(&group_id)
            .unwrap_or_else(|| unreachable!("read above under the same lock"));
        g.fired = true;
        Ok(g.callback.clone())
    }

    async fn heartbeat(&self, heartbeat: WorkerHeartbeat) -> Result<(), BackendError> {
        self.core
            .lock()
            .workers
            .insert(heartbeat.worker_id.clone(), heartbeat);
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerStatus>, BackendError> {
        let now = Utc::now();
        let st = self.core.lock();
        let mut out: Vec<WorkerStatus> = st
            .workers
            .values()
            .map(|h| WorkerStatus {
                alive: now <= after(h.at, h.interval.saturating_mul(3)),
                heartbeat: h.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.heartbeat.worker_id.cmp(&b.heartbeat.worker_id));
        Ok(out)
    }

    async fn revoke(&self, id: TaskId, ttl: Duration) -> Result<(), BackendError> {
        let until = after(Utc::now(), ttl);
        self.core.lock().revoked.insert(id, until);
        Ok(())
    }

    async fn forget(&self, ids: &[TaskId]) -> Result<u64, BackendError> {
        let mut st = self.core.lock();
        Ok(ids
            .iter()
            .filter(|id| st.records.remove(id).is_some())
            .count() as u64)
    }

    async fn revoked(&self, ids: &[TaskId]) -> Result<Vec<bool>, BackendError> {
        let now = Utc::now();
        let st = self.core.lock();
        Ok(ids
            .iter()
            .map(|id| st.revoked.get(id).is_some_and(|until| *until > now))
            .collect())
    }

    async fn maintain(&self) -> Result<(), BackendError> {
        let now = Utc::now();
        let mut st = self.core.lock();
        st.records.retain(|_, r| r.expires_at() > now);
        st.groups.retain(|_, g| g.expires > now);
        st.revoked.retain(|_, until| *until > now);
        st.workers.retain(|_, h| {
            now <= after(
                h.at,
                WORKER_RETENTION.saturating_add(h.interval.saturating_mul(3)),
            )
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TaskState;

    /// Waiters leave nothing behind: the last waiter on an id removes its
    /// `Notify`, whether it timed out or saw the terminal state.
    #[tokio::test]
    async fn finished_waits_leave_no_watchers() {
        let b = InMemoryBackend::new();
        let id = TaskId::new();
        let (first, second) = tokio::join!(
            b.wait(id, Duration::from_millis(20)),
            b.wait(id, Duration::from_millis(40)),
        );
        assert!(first.unwrap().is_none() && second.unwrap().is_none());
        assert!(b.core.lock().watchers.is_empty(), "timed-out waiters leak");

        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.wait(id, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.store(TaskRecord::new(id, TaskState::Revoked))
            .await
            .unwrap();
        assert!(waiter.await.unwrap().unwrap().is_some());
        assert!(b.core.lock().watchers.is_empty(), "finished waiters leak");
    }

    /// `maintain` frees what expired (reads hide it anyway, so only the
    /// memory it holds shows whether housekeeping ran).
    #[tokio::test]
    async fn maintain_frees_expired_entries() {
        let b = InMemoryBackend::new();
        let ttl = Duration::from_millis(10);
        let mut rec = TaskRecord::new(TaskId::new(), TaskState::Revoked);
        rec.ttl = ttl;
        b.store(rec).await.unwrap();
        b.revoke(TaskId::new(), ttl).await.unwrap();
        b.create_group(GroupSpec {
            id: TaskId::new(),
            members: vec![TaskId::new()],
            callback: None,
            ttl,
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        b.maintain().await.unwrap();
        let st = b.core.lock();
        assert!(st.records.is_empty() && st.revoked.is_empty() && st.groups.is_empty());
    }
}
