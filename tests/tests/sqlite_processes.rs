//! SQLite across processes: worker processes and a producer process
//! sharing one database file, a worker killed with SIGKILL mid-task, and
//! garbage rows in storage.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stem::Broker;
use stem::adapters::sqlite::{SqliteBroker, SqliteOptions};
use stem::worker::Worker;
use stem_tests::e2e_tasks::{ledger_noop, ledger_slow};
use stem_tests::ledger::{self, LEDGER_VAR};
use stem_tests::process::Proc;

fn url(db: &Path) -> String {
    format!("sqlite://{}", db.display())
}

fn spawn_worker(db: &Path, ledger: &Path, lease: &str) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_e2e-worker"))
        .env("STEM_BROKER_URL", url(db))
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env_remove("STEM_NAMESPACE")
        .env(LEDGER_VAR, ledger)
        .env("STEM_LEASE", lease)
        .env("STEM_QUEUES", "e2e,e2e_slow")
        .env("STEM_CONCURRENCY", "16")
        .env("STEM_POLL_INTERVAL", "50ms")
        .env("STEM_SHUTDOWN_GRACE", "5s")
        .stdout(Stdio::null())
        .spawn()
        .expect("worker starts");
    Proc(child)
}

fn setup(name: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("stem-{name}-"))
        .tempdir()
        .expect("temp dir");
    let db = dir.path().join("stem.db");
    let ledger = dir.path().join("ledger.txt");
    (dir, db, ledger)
}

/// Workers started at the same moment on a file that does not exist yet
/// race to create, switch to WAL and migrate it; none may give up.
#[test]
fn workers_started_together_on_a_new_file_all_start() {
    for round in 0..3 {
        let (_dir, db, ledger_path) = setup(&format!("together{round}"));
        let workers: Vec<Proc> = (0..4)
            .map(|_| spawn_worker(&db, &ledger_path, "10s"))
            .collect();
        std::thread::sleep(Duration::from_millis(700));
        for w in workers {
            // Exits 0 after SIGTERM only if it started.
            w.terminate();
        }
    }
}

#[test]
fn two_workers_and_a_producer_run_5000_tasks_exactly_once() {
    let (_dir, db, ledger_path) = setup("multi");
    let a = spawn_worker(&db, &ledger_path, "10s");
    let b = spawn_worker(&db, &ledger_path, "10s");
    let producer = Command::new(env!("CARGO_BIN_EXE_e2e-producer"))
        .arg("5000")
        .env("STEM_BROKER_URL", url(&db))
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env_remove("STEM_NAMESPACE")
        .output()
        .expect("producer runs");
    assert!(
        producer.status.success(),
        "producer failed: {}",
        String::from_utf8_lossy(&producer.stderr)
    );
    let (pid_a, pid_b) = (a.pid(), b.pid());
    a.terminate();
    b.terminate();
    let entries = ledger::read(&ledger_path);
    let done = ledger::counts(&entries, "done");
    assert_eq!(done.len(), 5000, "every task ran");
    let twice: Vec<_> = done.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "tasks that ran more than once: {twice:?}");
    for n in 0..5000u64 {
        assert!(done.contains_key(&n.to_string()), "task {n} never ran");
    }
    let by_a = entries.iter().filter(|e| e.pid == pid_a).count();
    let by_b = entries.iter().filter(|e| e.pid == pid_b).count();
    assert_eq!(by_a + by_b, 5000);
    assert!(
        by_a > 0 && by_b > 0,
        "both workers took work: {by_a} / {by_b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_killed_with_sigkill_runs_again_after_its_lease() {
    let (_dir, db, ledger_path) = setup("kill");
    let stem = stem::connect_with(&url(&db), None, "stem").await.unwrap();
    let mut victim_worker = Some(spawn_worker(&db, &ledger_path, "1s"));
    let victim = ledger_slow::enqueue_on(&stem, "victim".to_owned(), 3_000)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first_pid = loop {
        let entries = ledger::read(&ledger_path);
        if let Some(e) = entries
            .iter()
            .find(|e| e.event == "start" && e.key == "victim")
        {
            break e.pid;
        }
        assert!(Instant::now() < deadline, "the victim task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let worker = victim_worker.take().unwrap();
    assert_eq!(first_pid, worker.pid());
    drop(worker); // SIGKILL mid-task
    // Work enqueued while no worker runs is kept too.
    let mut others = Vec::new();
    for n in 0..20 {
        others.push(ledger_noop::enqueue_on(&stem, n).await.unwrap());
    }
    let rescuer = spawn_worker(&db, &ledger_path, "5s");
    assert_eq!(
        victim.wait(Duration::from_secs(60)).await.unwrap(),
        "victim"
    );
    for (n, h) in others.into_iter().enumerate() {
        assert_eq!(h.wait(Duration::from_secs(30)).await.unwrap(), 2 * n as u64);
    }
    let entries = ledger::read(&ledger_path);
    let starts: Vec<u32> = entries
        .iter()
        .filter(|e| e.event == "start" && e.key == "victim")
        .map(|e| e.pid)
        .collect();
    assert_eq!(
        starts,
        vec![first_pid, rescuer.pid()],
        "ran again on the other worker"
    );
    let done: Vec<u32> = entries
        .iter()
        .filter(|e| e.event == "done" && e.key == "victim")
        .map(|e| e.pid)
        .collect();
    assert_eq!(done, vec![rescuer.pid()], "finished once, by the rescuer");
    let rec = stem
        .backend()
        .unwrap()
        .get(victim.id())
        .await
        .unwrap()
        .unwrap();
    assert!(rec.state.is_terminal());
    rescuer.terminate();
}

#[stem::task(queue = "garbage")]
async fn double(n: u64) -> u64 {
    n * 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_row_is_dead_lettered_and_the_worker_keeps_running() {
    let (_dir, db, _ledger) = setup("garbage");
    let broker = SqliteBroker::open(&db, SqliteOptions::default())
        .await
        .unwrap();
    broker
        .insert_raw("garbage", b"{\"v\":1,\"this is\": not json")
        .await
        .unwrap();
    let stem = stem::connect_with(&url(&db), None, "stem").await.unwrap();
    let worker = Worker::builder()
        .client(&stem)
        .queues(["garbage"])
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap()
        .start();
    let h = double::enqueue_on(&stem, 21).await.unwrap();
    assert_eq!(h.wait(Duration::from_secs(10)).await.unwrap(), 42);
    let dead = broker
        .dead_letters()
        .expect("dead letters")
        .list("garbage", None, 10)
        .await
        .unwrap()
        .items;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("undecodable envelope"),
        "{}",
        dead[0].reason
    );
    assert!(dead[0].envelope.is_none());
    assert!(dead[0].raw.as_deref().unwrap_or("").contains("this is"));
    worker.shutdown();
    let report = worker.join().await;
    assert_eq!(report.succeeded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_a_subscriber_in_another_process() {
    use std::io::{BufRead, BufReader};
    let (_dir, db, _ledger) = setup("broadcast");
    let broker = SqliteBroker::open(&db, SqliteOptions::default())
        .await
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_e2e-subscriber"))
        .args(["control", "3"])
        .env("STEM_BROKER_URL", url(&db))
        .stdout(Stdio::piped())
        .spawn()
        .expect("subscriber starts");
    let stdout = child.stdout.take().unwrap();
    let sub = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("subscriber is ready");
    assert_eq!(first, "ready");
    let mut local = broker
        .broadcast()
        .expect("broadcast")
        .subscribe("control")
        .await
        .unwrap();
    for msg in ["ping", "inspect", "shutdown"] {
        broker
            .broadcast()
            .expect("broadcast")
            .send("control", msg)
            .await
            .unwrap();
    }
    let got: Vec<String> = (0..3)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("message arrives")
        })
        .collect();
    assert_eq!(got, ["ping", "inspect", "shutdown"]);
    use futures::StreamExt;
    for want in ["ping", "inspect", "shutdown"] {
        let m = tokio::time::timeout(Duration::from_secs(5), local.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload, want, "in-process subscribers get it too");
    }
    drop(sub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_in_another_process_is_woken_without_polling() {
    let (_dir, db, ledger_path) = setup("wake");
    // Poll every 30 s: anything faster than that is a wake-up.
    let slow_poll = format!("sqlite://{}?poll=30s", db.display());
    let stem = stem::connect_with(&slow_poll, None, "stem").await.unwrap();
    let warm_up = ledger_noop::enqueue_on(&stem, 1).await.unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_e2e-worker"))
        .env("STEM_BROKER_URL", &slow_poll)
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env_remove("STEM_NAMESPACE")
        .env(LEDGER_VAR, &ledger_path)
        .env("STEM_QUEUES", "e2e")
        .env("STEM_POLL_INTERVAL", "30s")
        .stdout(Stdio::null())
        .spawn()
        .expect("worker starts");
    let worker = Proc(child);
    // The worker claims the warm-up at start; its result wakes this process.
    assert_eq!(warm_up.wait(Duration::from_secs(20)).await.unwrap(), 2);
    // Let this process notice the worker's socket, then leave it idle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let begun = Instant::now();
    let h = ledger_noop::enqueue_on(&stem, 2).await.unwrap();
    assert_eq!(h.wait(Duration::from_secs(20)).await.unwrap(), 4);
    let took = begun.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "round trip took {took:?}: with 30 s polling only a wake-up explains a fast answer"
    );
    worker.terminate();
}
