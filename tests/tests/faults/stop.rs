//! Scenario 2, graceful stop under load: one worker process (concurrency 2,
//! prefetch 8, so two tasks run and six wait for a slot) is stopped with
//! SIGTERM while it runs long tasks.
//!
//! `<adapter>_graceful_stop`: tasks sleep 1.5 s, the grace is 5 s. Pass:
//! the running tasks finish within the grace, the waiting ones are back in
//! the queue (ready, not leased) with no attempt charged, the process exits
//! 0 by itself within the grace and a margin, and a second worker drains
//! the rest: every task started and finished exactly once, attempt 1.
//!
//! `<adapter>_second_signal`: tasks sleep 10 s, the grace is 60 s, the
//! lease 2 s; a second SIGTERM 0.5 s after the first. Pass: the process
//! exits within 5 s of the second signal, and a second worker runs every
//! task to completion exactly once (a `start` by the first worker without
//! its `done` is the only repetition allowed).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stem_tests::e2e_tasks::ledger_fault;
use stem_tests::ledger::{self, Run};
use stem_tests::postgres::{self, DropSchema};
use stem_tests::process::Proc;

use crate::support::{DeleteRedisNamespace, QUEUE, Target, say, spawn_worker_with};

const TASKS: usize = 20;
const CONCURRENCY: usize = 2;
const PREFETCH: &str = "8";

/// One of the two stops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// One SIGTERM, a grace longer than the tasks.
    Graceful,
    /// SIGTERM, then a second one: a long grace the worker must cut short.
    SecondSignal,
}

macro_rules! adapter_tests {
    ($sqlite:ident, $postgres:ident, $redis:ident, $stop:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let dir = temp_dir("sqlite");
            let target = Target {
                url: format!("sqlite://{}", dir.path().join("stem.db").display()),
                namespace: String::from("stem"),
            };
            run(stringify!($sqlite), &target, dir.path(), $stop).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            if !postgres::server_up(stringify!($postgres)) {
                return;
            }
            let ns = postgres::namespace("faults_stop");
            let _drop_schema = DropSchema {
                namespace: ns.clone(),
            };
            let dir = temp_dir("postgres");
            let target = Target {
                url: postgres::url_with(&format!("namespace={ns}")),
                namespace: ns,
            };
            run(stringify!($postgres), &target, dir.path(), $stop).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            if !crate::support::redis_up(stringify!($redis)) {
                return;
            }
            let ns = postgres::namespace("faults_stop");
            let _delete = DeleteRedisNamespace {
                namespace: ns.clone(),
            };
            let dir = temp_dir("redis");
            let target = Target {
                url: crate::support::redis_url(),
                namespace: ns,
            };
            run(stringify!($redis), &target, dir.path(), $stop).await;
        }
    };
}

adapter_tests!(
    sqlite_graceful_stop,
    postgres_graceful_stop,
    redis_graceful_stop,
    Stop::Graceful
);
adapter_tests!(
    sqlite_second_signal,
    postgres_second_signal,
    redis_second_signal,
    Stop::SecondSignal
);

fn temp_dir(adapter: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("stem-faults-{adapter}-"))
        .tempdir()
        .expect("temp dir")
}

fn signal(proc: &Proc, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &proc.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} failed");
}

/// Waits up to `limit` for `proc` to exit; its status, if it did.
async fn wait_exit(proc: &mut Proc, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = proc.0.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The scenario on `target`; `dir` holds the ledger. The worker processes
/// live in this function, so they are gone before the caller's cleanup
/// guards run.
#[allow(clippy::too_many_lines)]
async fn run(test: &str, target: &Target, dir: &Path, stop: Stop) {
    let (millis, grace, lease, margin) = match stop {
        Stop::Graceful => (1_500, "5s", "30s", Duration::from_secs(8)),
        Stop::SecondSignal => (10_000, "60s", "2s", Duration::from_secs(5)),
    };
    let ledger_path = dir.join("ledger.txt");
    let report_path = dir.join("worker-stdout.txt");
    let stem = stem::connect_with(&target.url, None, &target.namespace)
        .await
        .expect("client connects");
    let keys: Vec<String> = (0..TASKS).map(|n| format!("k{n}")).collect();
    ledger_fault::with()
        .on(&stem)
        .enqueue_many(
            keys.iter()
                .map(|k| ledger_fault::Args {
                    key: k.clone(),
                    millis,
                })
                .collect::<Vec<_>>(),
        )
        .await
        .expect("enqueue_many");

    let mut first = spawn_worker_with(
        target,
        &ledger_path,
        lease,
        CONCURRENCY,
        &[("STEM_PREFETCH", PREFETCH), ("STEM_SHUTDOWN_GRACE", grace)],
        Stdio::from(std::fs::File::create(&report_path).expect("report file")),
    );
    let pid = first.pid();
    // Both slots busy, and the prefetch buffer filled.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        first.assert_running("the first worker");
        let st = stem.stats(QUEUE).await.expect("stats");
        let started = ledger::read_runs(&ledger_path)
            .iter()
            .filter(|r| r.event == "start")
            .count();
        if started >= CONCURRENCY && st.leased >= 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: worker {pid} did not start {CONCURRENCY} tasks and hold 8 in 20 s ({st:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = stem.stats(QUEUE).await.expect("stats");
    let signalled = Instant::now();
    signal(&first, "-TERM");
    let second_at = if stop == Stop::SecondSignal {
        tokio::time::sleep(Duration::from_millis(500)).await;
        signal(&first, "-TERM");
        Some(Instant::now())
    } else {
        None
    };
    let grace_secs: u64 = grace.trim_end_matches('s').parse().expect("grace");
    let limit = match second_at {
        None => Duration::from_secs(grace_secs) + margin,
        Some(_) => Duration::from_millis(500) + margin,
    };
    let status = wait_exit(&mut first, limit).await;
    let exited_after = signalled.elapsed();
    let report = std::fs::read_to_string(&report_path).unwrap_or_default();
    let runs_first = ledger::read_runs(&ledger_path);
    let after_stop = stem.stats(QUEUE).await.expect("stats");
    let mut problems: Vec<String> = Vec::new();
    match status {
        Some(s) if s.success() => {}
        Some(s) => problems.push(format!("the first worker exited with {s}")),
        None => problems.push(format!(
            "the first worker had not exited {:.1}s after the first SIGTERM{}",
            exited_after.as_secs_f64(),
            if second_at.is_some() {
                " (and a second SIGTERM 0.5 s after it)"
            } else {
                ""
            }
        )),
    }
    let started_first: Vec<&Run> = runs_first
        .iter()
        .filter(|r| r.event == "start" && r.pid == pid)
        .collect();
    let done_first = runs_first
        .iter()
        .filter(|r| r.event == "done" && r.pid == pid)
        .count();
    if stop == Stop::Graceful {
        if done_first != started_first.len() {
            problems.push(format!(
                "the first worker started {} tasks and finished {done_first}",
                started_first.len()
            ));
        }
        // What it had not started is ready again, none leased.
        let want_ready = (TASKS - done_first) as u64;
        if (after_stop.ready, after_stop.leased, after_stop.delayed) != (want_ready, 0, 0) {
            problems.push(format!(
                "after the stop, expected {want_ready} ready and none leased or delayed: \
                 {after_stop:?}"
            ));
        }
    }
    drop(first);

    // A second worker drains the rest.
    let mut second = spawn_worker_with(
        target,
        &ledger_path,
        lease,
        TASKS,
        &[("STEM_SHUTDOWN_GRACE", "5s")],
        Stdio::null(),
    );
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        second.assert_running("the second worker");
        let runs = ledger::read_runs(&ledger_path);
        let finished = keys
            .iter()
            .filter(|k| runs.iter().any(|r| r.event == "done" && &r.key == *k))
            .count();
        if finished == TASKS || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Long enough for a second run of anything to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second_pid = second.pid();
    second.terminate();
    let end = stem.stats(QUEUE).await.expect("stats");

    let runs = ledger::read_runs(&ledger_path);
    // key -> (starts, dones, starts by the first worker without a done)
    let mut by_key: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for r in &runs {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let mut max_attempt = 0;
    let mut max_deliveries = 0;
    let mut interrupted = 0;
    for key in &keys {
        let Some(rs) = by_key.get(key.as_str()) else {
            problems.push(format!("{key}: never ran"));
            continue;
        };
        for r in rs {
            max_attempt = max_attempt.max(r.attempt);
            max_deliveries = max_deliveries.max(r.deliveries);
        }
        let starts = |p: u32| {
            rs.iter()
                .filter(|r| r.event == "start" && r.pid == p)
                .count()
        };
        let dones = |p: u32| {
            rs.iter()
                .filter(|r| r.event == "done" && r.pid == p)
                .count()
        };
        let (s1, d1, s2, d2) = (
            starts(pid),
            dones(pid),
            starts(second_pid),
            dones(second_pid),
        );
        let ok = match (s1, d1, s2, d2) {
            (1, 1, 0, 0) | (0, 0, 1, 1) => true,
            (1, 0, 1, 1) if stop == Stop::SecondSignal => {
                interrupted += 1;
                true
            }
            _ => false,
        };
        if !ok {
            problems.push(format!(
                "{key}: first worker started {s1} finished {d1}, second started {s2} \
                 finished {d2}"
            ));
        }
    }
    if by_key.len() != TASKS {
        problems.push(format!(
            "{} keys in the ledger, {TASKS} enqueued",
            by_key.len()
        ));
    }
    if max_attempt > 1 {
        problems.push(format!("an attempt was charged: max attempt {max_attempt}"));
    }
    if (end.ready, end.leased, end.delayed) != (0, 0, 0) {
        problems.push(format!("the queue is not empty after the drain: {end:?}"));
    }

    say(&format!(
        "{test}: enqueued={TASKS} task_ms={millis} grace={grace} lease={lease} \
         held_at_signal={held:?} first_started={} first_finished={done_first} \
         exited={status:?} after={:.1}s first_stdout={:?} queue_after_stop={after_stop:?} \
         interrupted_then_rerun={interrupted} runs={} max_attempt={max_attempt} \
         max_deliveries={max_deliveries} queue_after={end:?}",
        started_first.len(),
        exited_after.as_secs_f64(),
        report.trim(),
        runs.len(),
    ));
    assert!(problems.is_empty(), "{test}: {problems:#?}");
}
