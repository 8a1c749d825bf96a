//! The [`ResultBackend`] trait (CONTRACT.md clauses R1..R7) and the task
//! state it stores.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::envelope::{Envelope, TaskId};
use crate::error::BackendError;

/// Default time a result is kept (R3).
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Default time a revocation is remembered (R7).
pub const DEFAULT_REVOKE_TTL: Duration = Duration::from_secs(24 * 3600);

/// What kind of failure ended an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The handler returned an error.
    Error,
    /// The handler panicked.
    Panic,
    /// The handler ran past its time limit.
    Timeout,
    /// The handler asked not to be retried.
    Fatal,
    /// The task expired before it ran.
    Expired,
    /// The arguments did not decode.
    Decode,
}

/// An error as recorded: message, Rust type name and kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailure {
    /// The error's `Display`.
    pub message: String,
    /// `std::any::type_name` of the error (or `panic`, `timeout`, ...).
    pub type_name: String,
    /// The kind.
    pub kind: FailureKind,
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.type_name)
    }
}

/// A task's state (R1).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Enqueued, not started.
    Pending,
    /// A worker is running it.
    Started,
    /// An attempt failed; another is scheduled.
    Retrying {
        /// When the next attempt may start.
        next_at: DateTime<Utc>,
        /// The failed attempt's error.
        error: TaskFailure,
    },
    /// Finished with a result.
    Succeeded {
        /// The output, as JSON.
        result: Box<RawValue>,
    },
    /// Failed for good.
    Failed {
        /// The last error.
        error: TaskFailure,
    },
    /// Revoked; it will not run.
    Revoked,
}

impl TaskState {
    /// Whether no later state may replace this one.
    #[must_use]
    pub const fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Succeeded { .. } | Self::Failed { .. } | Self::Revoked
        )
    }

    /// A short name: `pending`, `started`, `retrying`, `succeeded`, `failed`, `revoked`.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Started => "started",
            Self::Retrying { .. } => "retrying",
            Self::Succeeded { .. } => "succeeded",
            Self::Failed { .. } => "failed",
            Self::Revoked => "revoked",
        }
    }
}

/// A task's stored record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task.
    pub id: TaskId,
    /// The task name, when known.
    pub name: Option<String>,
    /// The state.
    pub state: TaskState,
    /// Attempts charged so far (the running one included).
    pub attempts: u32,
    /// The worker that wrote it.
    pub worker_id: Option<String>,
    /// When the current attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the record was written.
    pub updated_at: DateTime<Utc>,
    /// The group the task belongs to.
    pub group_id: Option<TaskId>,
    /// How long the record is kept after `updated_at`.
    pub ttl: Duration,
    /// Progress reported by the task with `Context::progress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
}

impl TaskRecord {
    /// A record in `state` written now, with the default TTL.
    #[must_use]
    pub fn new(id: TaskId, state: TaskState) -> Self {
        Self {
            id,
            name: None,
            state,
            attempts: 0,
            worker_id: None,
            started_at: None,
            updated_at: Utc::now(),
            group_id: None,
            ttl: DEFAULT_RESULT_TTL,
            progress: None,
        }
    }

    /// The monotonic rule of R1: may `self` overwrite `old`?
    ///
    /// A terminal record is never replaced; an earlier attempt never replaces
    /// a later one; `Pending` never replaces a started task.
    ///
    /// ```
    /// use stem_core::{TaskId, TaskRecord, TaskState};
    /// let id = TaskId::new();
    /// let done = TaskRecord::new(id, TaskState::Revoked);
    /// let late = TaskRecord::new(id, TaskState::Started);
    /// assert!(!late.may_replace(&done));
    /// assert!(done.may_replace(&late));
    /// ```
    #[must_use]
    pub fn may_replace(&self, old: &Self) -> bool {
        if old.state.is_terminal() {
            return false;
        }
        if self.attempts < old.attempts {
            return false;
        }
        !matches!(self.state, TaskState::Pending) || matches!(old.state, TaskState::Pending)
    }

    /// When the record expires.
    #[must_use]
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.updated_at + chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX)
    }
}

/// A group of tasks whose results are collected together (R4), with an
/// optional chord callback (R5).
#[derive(Clone, Debug)]
pub struct GroupSpec {
    /// The group id.
    pub id: TaskId,
    /// The members, in the order results come back.
    pub members: Vec<TaskId>,
    /// Enqueued exactly once when every member is terminal.
    pub callback: Option<Envelope>,
    /// How long the group is kept.
    pub ttl: Duration,
}

/// A group's current status.
#[derive(Clone, Debug)]
pub struct GroupStatus {
    /// The group id.
    pub id: TaskId,
    /// Each member's record in the order they were added (`None` while the
    /// member has no record yet).
    pub members: Vec<(TaskId, Option<TaskRecord>)>,
    /// All members are terminal.
    pub complete: bool,
}

/// What a worker reports about itself (R6).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerHeartbeat {
    /// Unique per worker process.
    pub worker_id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Queues consumed.
    pub queues: Vec<String>,
    /// Concurrency limit.
    pub concurrency: usize,
    /// Tasks running now.
    pub active: usize,
    /// When this heartbeat was sent.
    pub at: DateTime<Utc>,
    /// The interval between heartbeats.
    pub interval: Duration,
    /// The tasks this worker runs, with their declared queue and options,
    /// so a producer that does not link a task can enqueue it by name
    /// ([`Stem::enqueue_by_name`](crate::Stem::enqueue_by_name)).
    #[serde(default)]
    pub tasks: Vec<AdvertisedTask>,
    /// Whether the worker sends task events.
    #[serde(default)]
    pub events: bool,
}

/// A task a worker runs, as its heartbeat advertises it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdvertisedTask {
    /// The registered name.
    pub name: String,
    /// The declared queue.
    pub queue: String,
    /// The declared priority.
    pub priority: u8,
    /// The declared retries.
    pub retries: u32,
}

/// A worker as the backend sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerStatus {
    /// The last heartbeat.
    pub heartbeat: WorkerHeartbeat,
    /// False when silent for 3 intervals.
    pub alive: bool,
}

/// Where task states, results, groups, heartbeats and revocations live.
#[async_trait]
pub trait ResultBackend: Send + Sync + 'static {
    /// The adapter's name and redacted address, for logs.
    fn describe(&self) -> String;

    /// The backend as `Any`, so a broker on the same storage can recognise
    /// it ([`Broker::stores_results_of`](crate::Broker::stores_results_of))
    /// and write its records in its own transactions. `None` (the default)
    /// for a backend no broker shares storage with.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Writes a record unless the monotonic rule forbids it (R1); returns
    /// whether it was written.
    async fn store(&self, record: TaskRecord) -> Result<bool, BackendError>;

    /// Writes many records; one result each, in order.
    async fn store_many(&self, records: Vec<TaskRecord>) -> Vec<Result<bool, BackendError>> {
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            out.push(self.store(r).await);
        }
        out
    }

    /// Reads a record; `None` when unknown or expired (R3).
    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, BackendError>;

    /// Waits until the record is terminal or `timeout` passes, returning the
    /// latest record seen; no polling faster than one tick (R2).
    async fn wait(&self, id: TaskId, timeout: Duration)
    -> Result<Option<TaskRecord>, BackendError>;

    /// Creates a group (R4, R5). Creating a group whose id already exists
    /// leaves the existing one as it is, so a retried call can never re-arm
    /// a chord that already fired.
    async fn create_group(&self, group: GroupSpec) -> Result<(), BackendError>;

    /// Reads a group's members' records in order (R4).
    async fn group(&self, id: TaskId) -> Result<Option<GroupStatus>, BackendError>;

    /// Called after a member reached a terminal state. When every member is
    /// terminal, returns the chord callback to exactly one caller ever (R5).
    async fn member_finished(&self, group_id: TaskId) -> Result<Option<Envelope>, BackendError>;

    /// Records a heartbeat (R6).
    async fn heartbeat(&self, heartbeat: WorkerHeartbeat) -> Result<(), BackendError>;

    /// Lists known workers with liveness (R6).
    async fn workers(&self) -> Result<Vec<WorkerStatus>, BackendError>;

    /// Remembers `id` as revoked for `ttl` (R7).
    async fn revoke(&self, id: TaskId, ttl: Duration) -> Result<(), BackendError>;

    /// Deletes the records of `ids` (R8): a task whose dead letter is
    /// replayed starts a new life, and its new run's records must not be
    /// refused by the terminal record of its old one (R1). Returns how
    /// many records existed.
    async fn forget(&self, ids: &[TaskId]) -> Result<u64, BackendError>;

    /// For each id, whether it is revoked (R7); one round trip.
    async fn revoked(&self, ids: &[TaskId]) -> Result<Vec<bool>, BackendError>;

    /// Deletes expired records, groups and revocations.
    async fn maintain(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_json() {
        let raw = serde_json::value::to_raw_value(&serde_json::json!({"a": [1, 2]})).unwrap();
        let rec = TaskRecord::new(TaskId::new(), TaskState::Succeeded { result: raw });
        let bytes = serde_json::to_vec(&rec).unwrap();
        let back: TaskRecord = serde_json::from_slice(&bytes).unwrap();
        match back.state {
            TaskState::Succeeded { result } => assert_eq!(result.get(), r#"{"a":[1,2]}"#),
            other => panic!("{other:?}"),
        }
        let pending: TaskRecord = serde_json::from_slice(
            &serde_json::to_vec(&TaskRecord::new(rec.id, TaskState::Pending)).unwrap(),
        )
        .unwrap();
        assert!(matches!(pending.state, TaskState::Pending));
    }
}
