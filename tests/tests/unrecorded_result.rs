//! A worker whose result backend is not its broker's storage, and cannot
//! write a task's terminal result through its retries (the backend is
//! down), must not acknowledge the delivery: acked, the result would be
//! lost for good. Left unsettled, its lease runs out, the task runs again
//! and that run records the result. In-memory broker, and an in-memory
//! backend that refuses every write while switched off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use stem::memory::{InMemoryBackend, InMemoryBroker};
use stem::worker::Worker;
use stem::{
    BackendError, Envelope, GroupSpec, GroupStatus, ResultBackend, Stem, TaskId, TaskRecord,
    TaskState, WorkerHeartbeat, WorkerStatus,
};
use stem_tests::eventually;

/// Runs of [`counted`] so far.
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Returns which run this is (1, 2, ...).
#[stem::task(queue = "unrecorded")]
async fn counted() -> usize {
    RUNS.fetch_add(1, Ordering::SeqCst) + 1
}

/// An in-memory backend whose writes fail while `down` is set.
struct Flaky {
    inner: InMemoryBackend,
    down: AtomicBool,
    /// Terminal records refused.
    refused: AtomicUsize,
}

impl Flaky {
    fn refuse(&self, record: &TaskRecord) -> Result<bool, BackendError> {
        if record.state.is_terminal() {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        Err(BackendError::Unavailable {
            adapter: String::from("flaky"),
            reason: String::from("switched off by the test"),
            source: None,
        })
    }
}

#[async_trait::async_trait]
impl ResultBackend for Flaky {
    fn describe(&self) -> String {
        String::from("flaky in-memory backend")
    }

    async fn store(&self, record: TaskRecord) -> Result<bool, BackendError> {
        if self.down.load(Ordering::SeqCst) {
            return self.refuse(&record);
        }
        self.inner.store(record).await
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, BackendError> {
        self.inner.get(id).await
    }

    async fn wait(
        &self,
        id: TaskId,
        timeout: Duration,
    ) -> Result<Option<TaskRecord>, BackendError> {
        self.inner.wait(id, timeout).await
    }

    async fn create_group(&self, group: GroupSpec) -> Result<(), BackendError> {
        self.inner.create_group(group).await
    }

    async fn group(&self, id: TaskId) -> Result<Option<GroupStatus>, BackendError> {
        self.inner.group(id).await
    }

    async fn member_finished(&self, group_id: TaskId) -> Result<Option<Envelope>, BackendError> {
        self.inner.member_finished(group_id).await
    }

    async fn heartbeat(&self, heartbeat: WorkerHeartbeat) -> Result<(), BackendError> {
        self.inner.heartbeat(heartbeat).await
    }

    async fn workers(&self) -> Result<Vec<WorkerStatus>, BackendError> {
        self.inner.workers().await
    }

    async fn forget(&self, ids: &[TaskId]) -> Result<u64, BackendError> {
        self.inner.forget(ids).await
    }

    async fn revoke(&self, id: TaskId, ttl: Duration) -> Result<(), BackendError> {
        self.inner.revoke(id, ttl).await
    }

    async fn revoked(&self, ids: &[TaskId]) -> Result<Vec<bool>, BackendError> {
        self.inner.revoked(ids).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_backend_refused_is_recorded_by_a_second_run() {
    let backend = Arc::new(Flaky {
        inner: InMemoryBackend::new(),
        down: AtomicBool::new(true),
        refused: AtomicUsize::new(0),
    });
    let stem = Stem::new(
        Arc::new(InMemoryBroker::new()),
        Some(Arc::clone(&backend) as Arc<dyn ResultBackend>),
    );
    let handle = counted::enqueue_on(&stem).await.expect("enqueue");
    let worker = Worker::builder()
        .client(&stem)
        .queues(["unrecorded"])
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .expect("worker builds")
        .start();

    // The first run, with the backend down: the worker tries to write its
    // result four times (its retries), and gives up.
    assert!(
        eventually(Duration::from_secs(10), || async {
            backend.refused.load(Ordering::SeqCst) >= 4
        })
        .await,
        "the first run's result refused four times"
    );
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    backend.down.store(false, Ordering::SeqCst);

    // The delivery was not acked: after its 1 s lease the task runs again
    // and that run's result is recorded.
    let out = handle
        .wait(Duration::from_secs(10))
        .await
        .expect("the result is recorded");
    assert_eq!(out, 2, "the second run's result");
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
    let rec = backend
        .get(handle.id())
        .await
        .expect("get")
        .expect("a record");
    assert!(matches!(rec.state, TaskState::Succeeded { .. }), "{rec:?}");
    // The record is written before the delivery is acked.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let st = stem.stats("unrecorded").await.expect("stats");
            (st.ready, st.leased) == (0, 0)
        })
        .await,
        "the second delivery is acked: {:?}",
        stem.stats("unrecorded").await
    );
    worker.shutdown();
    let report = worker.join().await;
    assert_eq!(report.succeeded, 1, "one settled success: {report:?}");
}
