//! Redis across processes: `e2e-worker` processes on a `redis-server` of
//! each test's own (a free loopback port, a temp dir, killed by a drop
//! guard), so the tests run in parallel and leave nothing behind. The
//! server is killed with SIGKILL and restarted from its AOF under a live
//! worker and a live producer; a worker is killed with SIGKILL mid-task
//! and another finishes the task after its lease; housekeeping removes the
//! dead worker's consumer once it has nothing pending.
//!
//! Without `redis-server` / `redis-cli` on `PATH` each test prints one
//! `SKIP` line and passes, except under `STEM_REQUIRE_SERVICES=1`, where it
//! fails.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stem_tests::e2e_tasks::{ledger_noop, ledger_slow};
use stem_tests::ledger::{self, LEDGER_VAR};
use stem_tests::process::Proc;
use stem_tests::redis_server::RedisServer;

/// Whether `redis-server` and `redis-cli` can run here. When they cannot,
/// prints a SKIP line to the real stderr (libtest captures `eprintln!`)
/// and returns false, or fails under `STEM_REQUIRE_SERVICES=1`.
fn redis_on_path(test: &str) -> bool {
    let runs = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if runs("redis-server") && runs("redis-cli") {
        return true;
    }
    let msg = format!("SKIP {test}: redis-server or redis-cli not on PATH");
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{msg}, and STEM_REQUIRE_SERVICES=1"
    );
    let _ = writeln!(std::io::stderr(), "{msg}");
    false
}

/// Prints a line the test's reader should see even when libtest captures
/// output.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `XINFO CONSUMERS` of the `stem` group of `stream` on `server`: each
/// consumer's fields by name.
fn consumers(server: &RedisServer, stream: &str) -> Vec<HashMap<String, String>> {
    let out = server.cli(&["XINFO", "CONSUMERS", stream, "stem"]);
    let lines: Vec<&str> = out.lines().collect();
    let mut all: Vec<HashMap<String, String>> = Vec::new();
    for pair in lines.chunks(2) {
        if let [k, v] = pair {
            if *k == "name" {
                all.push(HashMap::new());
            }
            if let Some(c) = all.last_mut() {
                c.insert((*k).to_owned(), (*v).to_owned());
            }
        }
    }
    all
}

/// The stream of priority 0 of `queue` in namespace `stem`.
fn stream_of(queue: &str) -> String {
    format!("stem:{{stem:q:{queue}}}:p0")
}

fn setup(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("stem-redis-{name}-"))
        .tempdir()
        .expect("temp dir");
    let ledger = dir.path().join("ledger.txt");
    (dir, ledger)
}

fn spawn_worker(url: &str, ledger: &Path, lease: &str, id: &str) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_e2e-worker"))
        .env("STEM_BROKER_URL", url)
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env_remove("STEM_NAMESPACE")
        .env(LEDGER_VAR, ledger)
        .env("STEM_LEASE", lease)
        .env("STEM_WORKER_ID", id)
        .env("STEM_QUEUES", "e2e,e2e_slow")
        .env("STEM_CONCURRENCY", "16")
        .env("STEM_POLL_INTERVAL", "500ms")
        .env("STEM_SHUTDOWN_GRACE", "5s")
        .stdout(Stdio::null())
        .spawn()
        .expect("worker starts");
    Proc(child)
}

/// Keys with at least one `event` in `entries`.
fn keys_with(entries: &[ledger::Entry], event: &str) -> HashSet<String> {
    entries
        .iter()
        .filter(|e| e.event == event)
        .map(|e| e.key.clone())
        .collect()
}

/// How long each task of the restart test sleeps.
const TASK_MILLIS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_aof_loses_nothing() {
    if !redis_on_path("redis_restart_with_aof_loses_nothing") {
        return;
    }
    let (dir, ledger_path) = setup("restart");
    let mut server = RedisServer::start(
        dir.path(),
        &["--appendonly", "yes", "--appendfsync", "everysec"],
    );
    // One client, one RedisBroker, across the whole outage.
    let stem = stem::connect_with(&server.url(), None, "stem")
        .await
        .unwrap();
    let mut published: Vec<String> = Vec::new();
    for n in 0..1000u64 {
        ledger_slow::enqueue_on(&stem, n.to_string(), TASK_MILLIS)
            .await
            .unwrap();
        published.push(n.to_string());
    }
    let mut worker = spawn_worker(&server.url(), &ledger_path, "5s", "restart-worker");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ledger::counts(&ledger::read(&ledger_path), "done").len() >= 200 {
            break;
        }
        assert!(Instant::now() < deadline, "200 tasks did not complete");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    let killed = Instant::now();
    let at_kill = ledger::read(&ledger_path);
    let done_at_kill = ledger::counts(&at_kill, "done").len();

    // The outage, about 3 s: every publish answers, and answers Err. They
    // start 150 ms apart without waiting for each other (one may wait out
    // the client's reconnect attempts, about 4.7 s).
    let gap = futures::future::join_all((0..20u32).map(|i| {
        let stem = stem.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(150) * i).await;
            let key = format!("gap-{i}");
            let begun = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                ledger_slow::enqueue_on(&stem, key.clone(), TASK_MILLIS),
            )
            .await
            .unwrap_or_else(|_| panic!("publish {key} hung for 15 s while Redis was down"));
            (key, r.is_ok(), begun.elapsed())
        }
    }))
    .await;
    let gap_ok: Vec<String> = gap
        .iter()
        .filter(|(_, ok, _)| *ok)
        .map(|(k, _, _)| k.clone())
        .collect();
    let gap_err = gap.len() - gap_ok.len();
    let err_times = gap.iter().filter(|(_, ok, _)| !*ok).map(|(_, _, t)| *t);
    let fastest_err = err_times.clone().min().unwrap_or_default();
    let slowest_err = err_times.max().unwrap_or_default();
    worker.assert_running("the worker, during the outage");

    server.restart();
    let ready = Instant::now();
    let outage = ready - killed;
    let at_restart = ledger::read(&ledger_path);
    let started_before_restart = keys_with(&at_restart, "start");
    let dones_at_restart = at_restart.iter().filter(|e| e.event == "done").count();

    // A watcher notes when the worker completes its first task after the
    // restart.
    let watch_path = ledger_path.clone();
    let first_done_after = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let n = ledger::read(&watch_path)
                .iter()
                .filter(|e| e.event == "done")
                .count();
            if n > dones_at_restart {
                return Some(ready.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    });

    // The same client publishes again by itself (a few Errs while it
    // reconnects are allowed, each retried).
    let mut retries = 0;
    let mut first_ok_after = None;
    for i in 0..20 {
        let key = format!("after-{i}");
        loop {
            match ledger_slow::enqueue_on(&stem, key.clone(), TASK_MILLIS).await {
                Ok(_) => break,
                Err(e) => {
                    retries += 1;
                    assert!(
                        ready.elapsed() < Duration::from_secs(30),
                        "the producer did not reconnect within 30 s: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        first_ok_after.get_or_insert_with(|| ready.elapsed());
        published.push(key);
    }
    published.extend(gap_ok.iter().cloned());

    // Every Ok-published task runs, at least once.
    let deadline = Instant::now() + Duration::from_secs(120);
    let entries = loop {
        let entries = ledger::read(&ledger_path);
        let done = keys_with(&entries, "done");
        let missing: Vec<&String> = published.iter().filter(|k| !done.contains(*k)).collect();
        if missing.is_empty() {
            break entries;
        }
        if Instant::now() > deadline {
            worker.assert_running("the worker");
            panic!(
                "{} Ok-published tasks never ran (a false Ok, or a worker that did not resume), e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let all_done = ready.elapsed();
    worker.assert_running("the worker");

    // Duplicates only for tasks the worker held when Redis died: those it
    // had started by the restart (nothing is fetched during the outage).
    let done = ledger::counts(&entries, "done");
    let twice: Vec<(&String, &usize)> = done.iter().filter(|(_, n)| **n > 1).collect();
    let bad_twice: Vec<_> = twice
        .iter()
        .filter(|(k, _)| !started_before_restart.contains(*k))
        .collect();
    assert!(
        bad_twice.is_empty(),
        "tasks that ran twice though not in flight at the kill: {bad_twice:?}"
    );
    let ran: HashSet<&String> = done.keys().collect();
    let unknown: Vec<_> = ran
        .iter()
        .filter(|k| !published.contains(k) && !k.starts_with("gap-"))
        .collect();
    assert!(unknown.is_empty(), "ran but never published: {unknown:?}");
    // An Err in the gap is allowed to have stored the task anyway (the
    // reply was lost, not the write): not a false Ok. Report it.
    let gap_err_ran = (0..20)
        .map(|i| format!("gap-{i}"))
        .filter(|k| !gap_ok.contains(k) && done.contains_key(k))
        .count();
    let first_done_after = first_done_after.join().unwrap();
    say(&format!(
        "redis_restart_with_aof_loses_nothing: {done_at_kill} done at the kill; outage {outage:.2?} \
         ({gap_err} publishes Err in {fastest_err:.2?}..{slowest_err:.2?}; {} Ok, all ran; {gap_err_ran} Err ran anyway); \
         after the restart: first Ok publish in {:.2?} ({retries} retries), first task done by the worker in {:.2?}, \
         all {} tasks done in {all_done:.2?}; {} ran twice (all in flight at the kill)",
        gap_ok.len(),
        first_ok_after.unwrap_or_default(),
        first_done_after.unwrap_or_default(),
        published.len(),
        twice.len(),
    ));
    worker.terminate();
}

/// Worker A takes a slow task with a 2 s lease and is SIGKILLed mid-task;
/// worker B finishes it after the lease. With `check_maintain`, also checks
/// that housekeeping keeps A's consumer while it has the task pending and
/// removes it once it has nothing pending.
async fn kill_a_worker_mid_task(test: &str, check_maintain: bool) {
    if !redis_on_path(test) {
        return;
    }
    let (dir, ledger_path) = setup(test);
    let server = RedisServer::start(dir.path(), &["--appendonly", "no"]);
    let url = server.url();
    let stem = stem::connect_with(&url, None, "stem").await.unwrap();
    let mut victim_worker = Some(spawn_worker(&url, &ledger_path, "2s", "worker-a"));
    let victim = ledger_slow::enqueue_on(&stem, "victim".to_owned(), 4_000)
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
    let killed = Instant::now();
    let slow = stream_of("e2e_slow");

    // Housekeeping with a 1 s idle limit, as a separate client would run it.
    let janitor = stem::client::open_broker(&format!("{url}?consumer_idle=1s"), "stem")
        .await
        .unwrap();
    if check_maintain {
        // A is idle past the limit but still holds the victim: it stays.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        janitor.maintain().await.unwrap();
        let a: Vec<_> = consumers(&server, &slow)
            .into_iter()
            .filter(|c| c.get("name").map(String::as_str) == Some("worker-a"))
            .collect();
        assert_eq!(a.len(), 1, "A's consumer is kept while it has pending");
        assert_eq!(a[0].get("pending").map(String::as_str), Some("1"), "{a:?}");
        let idle: u64 = a[0]["idle"].parse().unwrap();
        assert!(idle > 1000, "A idle {idle} ms: the check proved nothing");
    }

    // Work enqueued while no worker runs is kept too.
    let mut others = Vec::new();
    for n in 0..20 {
        others.push(ledger_noop::enqueue_on(&stem, n).await.unwrap());
    }
    let rescuer = spawn_worker(&url, &ledger_path, "5s", "worker-b");

    // While B runs the victim, the stream says it is its second delivery.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = ledger::read(&ledger_path);
        if entries
            .iter()
            .any(|e| e.event == "start" && e.key == "victim" && e.pid == rescuer.pid())
        {
            break;
        }
        assert!(Instant::now() < deadline, "B never started the victim");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken_over = killed.elapsed();
    let pending = server.cli(&["XPENDING", &slow, "stem", "-", "+", "10"]);
    let pending: Vec<&str> = pending.lines().collect();
    assert_eq!(pending.len(), 4, "one pending entry: {pending:?}");
    assert_eq!(pending[1], "worker-b", "{pending:?}");
    assert_eq!(pending[3], "2", "the victim's second delivery: {pending:?}");

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
    assert_eq!(rec.worker_id.as_deref(), Some("worker-b"));
    // A lease expiry charges no attempt (CONTRACT.md): 2 deliveries, 1 attempt.
    assert_eq!(rec.attempts, 1, "{rec:?}");
    say(&format!(
        "{test}: B started the victim {taken_over:.2?} after A's SIGKILL (lease 2 s): delivery 2, attempt 1"
    ));

    if check_maintain {
        // A has nothing pending now: the next housekeeping removes it.
        let names = |s: &RedisServer| -> Vec<String> {
            consumers(s, &slow)
                .into_iter()
                .filter_map(|c| c.get("name").cloned())
                .collect()
        };
        assert!(names(&server).contains(&String::from("worker-a")));
        let deadline = Instant::now() + Duration::from_secs(30);
        let begun = Instant::now();
        loop {
            janitor.maintain().await.unwrap();
            if !names(&server).contains(&String::from("worker-a")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "maintain never removed A's consumer: {:?}",
                consumers(&server, &slow)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        say(&format!(
            "{test}: maintain removed A's consumer {:.2?} after the victim finished",
            begun.elapsed()
        ));
    }
    rescuer.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigkill_worker_task_runs_again_after_its_lease() {
    kill_a_worker_mid_task(
        "redis_sigkill_worker_task_runs_again_after_its_lease",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_maintain_removes_a_dead_workers_consumer() {
    kill_a_worker_mid_task("redis_maintain_removes_a_dead_workers_consumer", true).await;
}
