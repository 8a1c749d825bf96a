//! Cooperative cancellation: every delivery's `Context` carries a signal
//! fired by its time limit, by shutdown past the grace and by revocation;
//! a blocking thread that ignores it is abandoned, and the worker process
//! still exits.

#![cfg(unix)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stem::Stem;
use stem::worker::{Worker, WorkerHandle};
use stem_tests::e2e_tasks::ledger_spin;
use stem_tests::ledger::{self, LEDGER_VAR};
use stem_tests::{eventually, isolated_client};

/// Keys whose task saw its context cancelled, with how long it ran.
static SAW_CANCEL: Mutex<Vec<(String, Duration)>> = Mutex::new(Vec::new());

fn saw_cancel(key: &str) -> Option<Duration> {
    SAW_CANCEL
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, d)| *d)
}

/// Spins on its blocking thread until its context is cancelled (or 20 s
/// pass, so a broken build does not leave it spinning for ever).
#[stem::task(queue = "coop", blocking = true, timeout = "200ms", retries = 0)]
async fn cooperative_spin(ctx: stem::Context, key: String) {
    let start = Instant::now();
    while !ctx.is_cancelled() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    if ctx.is_cancelled() {
        SAW_CANCEL.lock().unwrap().push((key, start.elapsed()));
    }
}

/// Keys of the tasks that started.
static STARTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Like `cooperative_spin`, without a time limit: only revocation or
/// shutdown stops it.
#[stem::task(queue = "revocable", blocking = true, retries = 0)]
async fn revocable_spin(ctx: stem::Context, key: String) {
    STARTED.lock().unwrap().push(key.clone());
    let start = Instant::now();
    while !ctx.is_cancelled() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    if ctx.is_cancelled() {
        SAW_CANCEL.lock().unwrap().push((key, start.elapsed()));
    }
}

async fn start(stem: &Stem, queues: &[&str]) -> WorkerHandle {
    Worker::builder()
        .client(stem)
        .queues(queues.iter().copied())
        .poll_interval(Duration::from_millis(50))
        .lease(Duration::from_millis(300))
        .build()
        .await
        .expect("worker builds")
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_task_past_its_time_limit_sees_its_context_cancelled() {
    let stem = isolated_client("coop_timeout").await;
    let worker = start(&stem, &["coop"]).await;
    cooperative_spin::enqueue_on(&stem, "limit".to_owned())
        .await
        .expect("enqueue");
    assert!(
        eventually(Duration::from_secs(5), || async {
            saw_cancel("limit").is_some()
        })
        .await,
        "the task's context was not cancelled at its time limit"
    );
    let ran = saw_cancel("limit").expect("seen");
    assert!(
        ran >= Duration::from_millis(190) && ran < Duration::from_secs(3),
        "cancelled after {ran:?}, not at the 200 ms limit"
    );
    worker.shutdown();
    let report = worker.join().await;
    assert_eq!(
        (report.succeeded, report.dead_lettered),
        (0, 1),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_running_task_cancels_its_context() {
    let stem = isolated_client("coop_revoke").await;
    let worker = start(&stem, &["revocable"]).await;
    let handle = revocable_spin::enqueue_on(&stem, "revoked".to_owned())
        .await
        .expect("enqueue");
    assert!(
        eventually(Duration::from_secs(5), || async {
            STARTED.lock().unwrap().iter().any(|k| k == "revoked")
        })
        .await,
        "the task never started"
    );
    stem.revoke(handle.id()).await.expect("revoke");
    assert!(
        eventually(Duration::from_secs(3), || async {
            saw_cancel("revoked").is_some()
        })
        .await,
        "the running task's context was not cancelled when it was revoked"
    );
    worker.shutdown();
    let report = worker.join().await;
    assert_eq!((report.succeeded, report.revoked), (0, 1), "{report:?}");
    assert!(
        matches!(
            stem.state(handle.id()).await.expect("state"),
            stem::TaskState::Revoked
        ),
        "the revoked run left another record"
    );
}

/// A worker process, killed when the test ends however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_blocking_task_does_not_keep_the_worker_process_alive() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("stem.db");
    let ledger_path = dir.path().join("ledger.txt");
    let url = format!("sqlite://{}", db.display());
    let stem = stem::connect_with(&url, None, "stem")
        .await
        .expect("client");
    let grace = Duration::from_secs(1);
    let mut proc = Proc(
        Command::new(env!("CARGO_BIN_EXE_e2e-worker"))
            .env("STEM_BROKER_URL", &url)
            .env_remove("STEM_RESULT_BACKEND_URL")
            .env_remove("STEM_NAMESPACE")
            .env(LEDGER_VAR, &ledger_path)
            .env("STEM_QUEUES", "e2e_spin")
            .env("STEM_POLL_INTERVAL", "50ms")
            .env("STEM_SHUTDOWN_GRACE", "1s")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("worker starts"),
    );
    let handle = ledger_spin::enqueue_on(&stem, "stuck".to_owned())
        .await
        .expect("enqueue");
    assert!(
        eventually(Duration::from_secs(30), || async {
            ledger::read(&ledger_path)
                .iter()
                .any(|e| e.event == "start" && e.key == "stuck")
        })
        .await,
        "the spinning task never started"
    );
    let status = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let sent = Instant::now();
    let limit = grace + Duration::from_secs(2);
    let status = loop {
        if let Some(status) = proc.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            sent.elapsed() < limit,
            "the worker process was still running {limit:?} after SIGTERM (grace {grace:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "worker exited with {status}");
    let mut out = String::new();
    proc.0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("stdout");
    assert!(
        out.lines().any(|l| l.starts_with("report ")),
        "worker::run() did not return (no report line): {out:?}"
    );
    let mut err = String::new();
    proc.0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    let id = handle.id().to_string();
    assert!(
        err.lines()
            .any(|l| l.contains("abandoned") && l.contains(ledger_spin::NAME) && l.contains(&id)),
        "no warning naming the abandoned task ({} {id}): {err}",
        ledger_spin::NAME
    );
}
