//! The stale-result case (seam issue): a worker stopped with SIGSTOP past
//! its lease and continued while another worker re-runs the task must
//! change nothing: exactly one terminal record, the live worker's, and the
//! stale worker counts nothing as finished.

#![cfg(unix)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stem::TaskState;
use stem_tests::e2e_tasks::ledger_outcome;
use stem_tests::ledger::{self, LEDGER_VAR};

/// A worker process, killed when the test ends however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {sig}");
    }

    /// SIGTERM, a clean exit, and the report line the worker printed.
    fn stop(mut self) -> String {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                assert!(status.success(), "worker exited with {status}");
                let mut out = String::new();
                if let Some(mut stdout) = self.0.stdout.take() {
                    stdout.read_to_string(&mut out).expect("stdout");
                }
                return out
                    .lines()
                    .find(|l| l.starts_with("report "))
                    .unwrap_or_else(|| panic!("no report line in {out:?}"))
                    .to_owned();
            }
            assert!(Instant::now() < deadline, "worker did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn worker(db: &Path, ledger: &Path, lease: &str, fail: bool) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-worker"));
    cmd.env("STEM_BROKER_URL", format!("sqlite://{}", db.display()))
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env_remove("STEM_NAMESPACE")
        .env(LEDGER_VAR, ledger)
        .env("STEM_LEASE", lease)
        .env("STEM_QUEUES", "e2e_slow")
        .env("STEM_CONCURRENCY", "2")
        .env("STEM_POLL_INTERVAL", "50ms")
        .env("STEM_SHUTDOWN_GRACE", "5s")
        .stdout(Stdio::piped());
    if fail {
        cmd.env("STEM_E2E_FAIL", "1");
    } else {
        cmd.env_remove("STEM_E2E_FAIL");
    }
    Proc(cmd.spawn().expect("worker starts"))
}

/// Waits until the ledger has `event` for `key` from `pid`.
async fn ledger_has(path: &Path, event: &str, key: &str, pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if ledger::read(path)
            .iter()
            .any(|e| e.event == event && e.key == key && e.pid == pid)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no `{event} {key}` from {pid} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_continued_after_sigstop_past_its_lease_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("stem.db");
    let ledger_path = dir.path().join("ledger.txt");
    let stem = stem::connect_with(&format!("sqlite://{}", db.display()), None, "stem")
        .await
        .expect("client");

    // The stale worker: fails the task when it gets to finish it.
    let stale = worker(&db, &ledger_path, "1s", true);
    let stale_pid = stale.0.id();
    let handle = ledger_outcome::enqueue_on(&stem, "t".to_owned(), 1_500)
        .await
        .expect("enqueue");
    ledger_has(
        &ledger_path,
        "start",
        "t",
        stale_pid,
        Duration::from_secs(30),
    )
    .await;

    // Stopped mid-task: it can neither renew nor finish; the lease runs out.
    stale.signal("-STOP");
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // The live worker takes the task over and is still running it when the
    // stale one is continued.
    let live = worker(&db, &ledger_path, "10s", false);
    let live_pid = live.0.id();
    ledger_has(
        &ledger_path,
        "start",
        "t",
        live_pid,
        Duration::from_secs(30),
    )
    .await;
    stale.signal("-CONT");
    // The stale run's timer is long past: it finishes (fails) at once.
    ledger_has(
        &ledger_path,
        "failed",
        "t",
        stale_pid,
        Duration::from_secs(10),
    )
    .await;

    assert_eq!(
        handle
            .wait(Duration::from_secs(30))
            .await
            .expect("the live run's result"),
        "t"
    );
    ledger_has(&ledger_path, "done", "t", live_pid, Duration::from_secs(5)).await;
    // Give the stale worker's completer time to try (and be refused).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let rec = stem
        .backend()
        .expect("sqlite results")
        .get(handle.id())
        .await
        .expect("get")
        .expect("a record");
    assert!(
        matches!(rec.state, TaskState::Succeeded { .. }),
        "the one terminal record is the live run's: {:?}",
        rec.state
    );
    assert_eq!(
        rec.worker_id
            .as_deref()
            .map(|w| w.contains(&live_pid.to_string())),
        Some(true),
        "recorded by the live worker: {rec:?}"
    );
    let dead = stem
        .broker()
        .dead_letters()
        .expect("dead letters")
        .count("e2e_slow")
        .await
        .expect("count");
    assert_eq!(dead, 0, "the stale failure dead-lettered nothing");
    assert_eq!(stem.stats("e2e_slow").await.expect("stats").ready, 0);

    let stale_report = stale.stop();
    assert!(
        stale_report.contains("succeeded=0 failed=0") && stale_report.contains("dead_lettered=0"),
        "the stale worker counts nothing: {stale_report}"
    );
    let live_report = live.stop();
    assert!(
        live_report.contains("succeeded=1 failed=0"),
        "the live worker counts its success: {live_report}"
    );
}
