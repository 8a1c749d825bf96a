//! Scenario 1, worker SIGKILL: two worker processes drain 2,000 tasks that
//! each sleep 5 to 50 ms; three times, one of them is killed with SIGKILL
//! at a random moment while it runs tasks, and a fresh worker process takes
//! its place. The lease is 2 s, so what the killed worker held comes back
//! quickly.
//!
//! Pass: every enqueued task is in the ledger as finished and its record in
//! the result backend is `Succeeded` with its key; a task ran more than
//! once only when the earlier runs were in flight on a killed worker
//! (started by it and not finished, or finished so shortly before the
//! kill that the acknowledgement may not have been written).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use stem::TaskState;
use stem_tests::e2e_tasks::ledger_fault;
use stem_tests::ledger::{self, Run};
use stem_tests::postgres::{self, DropSchema};

use crate::support::{DeleteRedisNamespace, QUEUE, Rng, Target, say, spawn_worker};

const TASKS: u64 = 2_000;
const KILLS: usize = 3;
const LEASE: &str = "2s";
/// Per worker process: low enough that the drain outlasts the kills.
const CONCURRENCY: usize = 4;
/// A run that finished at most this long before its worker was killed may
/// not have been acknowledged yet: running it again is allowed.
const ACK_WINDOW_MS: u64 = 1_000;
/// The whole scenario's deadline.
const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sigkill() {
    let dir = tempfile::Builder::new()
        .prefix("stem-faults-sqlite-")
        .tempdir()
        .expect("temp dir");
    let target = Target {
        url: format!("sqlite://{}", dir.path().join("stem.db").display()),
        namespace: String::from("stem"),
    };
    run("sqlite_sigkill", &target, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sigkill() {
    if !postgres::server_up("postgres_sigkill") {
        return;
    }
    let ns = postgres::namespace("faults_sigkill");
    let _drop_schema = DropSchema {
        namespace: ns.clone(),
    };
    let dir = tempfile::Builder::new()
        .prefix("stem-faults-postgres-")
        .tempdir()
        .expect("temp dir");
    let target = Target {
        url: postgres::url_with(&format!("namespace={ns}")),
        namespace: ns,
    };
    run("postgres_sigkill", &target, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigkill() {
    if !crate::support::redis_up("redis_sigkill") {
        return;
    }
    let ns = postgres::namespace("faults_sigkill");
    let _delete = DeleteRedisNamespace {
        namespace: ns.clone(),
    };
    let dir = tempfile::Builder::new()
        .prefix("stem-faults-redis-")
        .tempdir()
        .expect("temp dir");
    let target = Target {
        url: crate::support::redis_url(),
        namespace: ns,
    };
    run("redis_sigkill", &target, dir.path()).await;
}

/// The scenario on `target`; `dir` holds the ledger. The worker processes
/// live in this function, so they are gone before the caller's cleanup
/// guards run.
#[allow(clippy::too_many_lines)]
async fn run(test: &str, target: &Target, dir: &std::path::Path) {
    let begun = Instant::now();
    let ledger_path = dir.join("ledger.txt");
    let mut rng = Rng::new();
    let seed = rng.seed();
    let stem = stem::connect_with(&target.url, None, &target.namespace)
        .await
        .expect("client connects");
    let backend = stem.backend().expect("a result backend on the adapter");

    // The backlog, published before any worker runs.
    let mut handles = Vec::new();
    let mut expected: BTreeMap<String, stem::TaskId> = BTreeMap::new();
    let keys: Vec<u64> = (0..TASKS).collect();
    for chunk in keys.chunks(500) {
        let args: Vec<ledger_fault::Args> = chunk
            .iter()
            .map(|n| ledger_fault::Args {
                key: format!("k{n}"),
                millis: rng.range(5, 50),
            })
            .collect();
        let batch = ledger_fault::with()
            .on(&stem)
            .enqueue_many(args)
            .await
            .expect("enqueue_many");
        for (n, h) in chunk.iter().zip(batch) {
            expected.insert(format!("k{n}"), h.id());
            handles.push((format!("k{n}"), h));
        }
    }

    let mut workers = vec![
        spawn_worker(target, &ledger_path, LEASE, CONCURRENCY),
        spawn_worker(target, &ledger_path, LEASE, CONCURRENCY),
    ];
    // (pid, Unix ms just before the signal)
    let mut kills: Vec<(u32, u64)> = Vec::new();
    for k in 0..KILLS {
        let i = usize::try_from(rng.range(0, 1)).expect("index");
        let pid = workers[i].pid();
        // A random moment once the victim is running tasks.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ledger::read_runs(&ledger_path)
            .iter()
            .any(|r| r.pid == pid && r.event == "start")
        {
            workers[i].assert_running("a worker before its kill");
            assert!(
                Instant::now() < deadline,
                "{test}: worker {pid} ran nothing in 20 s (kill {k})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(200, 1500))).await;
        for w in &mut workers {
            w.assert_running("a worker");
        }
        let fresh = spawn_worker(target, &ledger_path, LEASE, CONCURRENCY);
        kills.push((pid, ledger::unix_ms()));
        // Dropping a `Proc` is SIGKILL and a reap.
        drop(std::mem::replace(&mut workers[i], fresh));
    }
    let kills_done = begun.elapsed();

    // Every result, within the scenario's deadline.
    let mut not_back = Vec::new();
    for (key, h) in &handles {
        let left = DEADLINE.saturating_sub(begun.elapsed());
        match h.wait(left.max(Duration::from_millis(1))).await {
            Ok(out) => assert_eq!(&out, key, "{test}: task {key} returned {out}"),
            Err(e) => not_back.push(format!("{key}: {e}")),
        }
    }
    let drained = begun.elapsed();
    let survivors: Vec<u32> = workers.iter().map(stem_tests::process::Proc::pid).collect();
    for w in workers {
        w.terminate();
    }

    let runs = ledger::read_runs(&ledger_path);
    let verdict = check(&runs, &expected, &kills);
    let mut not_succeeded = Vec::new();
    for (key, id) in &expected {
        match backend.get(*id).await {
            Ok(Some(rec)) => match &rec.state {
                TaskState::Succeeded { result } if result.get() == format!("\"{key}\"") => {}
                other => not_succeeded.push(format!("{key}: {other:?}")),
            },
            Ok(None) => not_succeeded.push(format!("{key}: no record")),
            Err(e) => not_succeeded.push(format!("{key}: {e}")),
        }
    }
    let st = stem.stats(QUEUE).await.expect("stats");

    say(&format!(
        "{test}: seed={seed} enqueued={TASKS} finished={} runs={} ran_twice={} ran_3plus={} \
         in_flight_at_kills={} finished_then_rerun={} (done at most {} ms before the kill) kills={} retried_attempts={} \
         max_deliveries={} results_not_back={} records_not_succeeded={} kills_done_at={:.1}s \
         drained_at={:.1}s survivors={survivors:?} killed={:?} queue_after={st:?}",
        verdict.finished,
        verdict.runs,
        verdict.ran_twice,
        verdict.ran_3plus,
        verdict.in_flight,
        verdict.finished_then_rerun,
        verdict.max_done_to_kill_ms,
        kills.len(),
        verdict.later_attempts,
        verdict.max_deliveries,
        not_back.len(),
        not_succeeded.len(),
        kills_done.as_secs_f64(),
        drained.as_secs_f64(),
        kills.iter().map(|k| k.0).collect::<Vec<_>>(),
    ));
    assert_eq!(kills.len(), KILLS);
    assert!(
        verdict.problems.is_empty(),
        "{test}: {} ledger problems, first: {:?}",
        verdict.problems.len(),
        &verdict.problems[..verdict.problems.len().min(10)]
    );
    assert!(
        not_back.is_empty(),
        "{test}: {} results not back, first: {:?}",
        not_back.len(),
        &not_back[..not_back.len().min(10)]
    );
    assert!(
        not_succeeded.is_empty(),
        "{test}: {} records not succeeded, first: {:?}",
        not_succeeded.len(),
        &not_succeeded[..not_succeeded.len().min(10)]
    );
    assert!(
        verdict.in_flight > 0,
        "{test}: no kill hit a task in flight, so nothing was tested"
    );
}

/// What the ledger says.
#[derive(Default)]
struct Verdict {
    finished: usize,
    runs: usize,
    ran_twice: usize,
    ran_3plus: usize,
    /// Runs on a killed worker that it had not finished.
    in_flight: usize,
    /// Runs a killed worker finished within [`ACK_WINDOW_MS`] before its
    /// kill, and that ran again (the acknowledgement did not make it).
    finished_then_rerun: usize,
    /// The longest time between such a run's `done` and its kill.
    max_done_to_kill_ms: u64,
    later_attempts: usize,
    max_deliveries: u32,
    problems: Vec<String>,
}

/// Checks the ledger against the enqueued keys and the kills.
fn check(runs: &[Run], expected: &BTreeMap<String, stem::TaskId>, kills: &[(u32, u64)]) -> Verdict {
    let killed: HashMap<u32, u64> = kills.iter().copied().collect();
    let mut v = Verdict::default();
    // key -> its runs, one per (pid, deliveries): (start, done time)
    type RunKey = (u32, u32);
    let mut by_key: HashMap<&str, BTreeMap<RunKey, (bool, Option<u64>)>> = HashMap::new();
    for r in runs {
        if !expected.contains_key(&r.key) {
            v.problems.push(format!("{}: not an enqueued key", r.key));
            continue;
        }
        if killed.get(&r.pid).is_some_and(|&at| r.at_ms > at + 100) {
            v.problems.push(format!(
                "{}: {} by {} after its kill",
                r.key, r.event, r.pid
            ));
        }
        v.max_deliveries = v.max_deliveries.max(r.deliveries);
        let slot = by_key
            .entry(r.key.as_str())
            .or_default()
            .entry((r.pid, r.deliveries))
            .or_default();
        match r.event.as_str() {
            "start" => {
                if slot.0 {
                    v.problems
                        .push(format!("{}: started twice in one delivery", r.key));
                }
                slot.0 = true;
                v.runs += 1;
                if r.attempt > 1 {
                    v.later_attempts += 1;
                }
            }
            "done" => {
                if slot.1.is_some() {
                    v.problems
                        .push(format!("{}: finished twice in one delivery", r.key));
                }
                slot.1 = Some(r.at_ms);
            }
            other => v.problems.push(format!("{}: unknown event {other}", r.key)),
        }
    }
    let mut seen = HashSet::new();
    for key in expected.keys() {
        let Some(key_runs) = by_key.get(key.as_str()) else {
            v.problems.push(format!("{key}: never ran"));
            continue;
        };
        seen.insert(key.as_str());
        if key_runs.values().any(|(_, done)| done.is_some()) {
            v.finished += 1;
        } else {
            v.problems.push(format!("{key}: never finished"));
        }
        if key_runs.len() >= 2 {
            v.ran_twice += 1;
        }
        if key_runs.len() >= 3 {
            v.ran_3plus += 1;
        }
        // At most one run that no kill explains.
        let mut unexplained = Vec::new();
        for (&(pid, deliveries), &(started, done)) in key_runs {
            if !started {
                v.problems
                    .push(format!("{key}: done without start by {pid}"));
            }
            let in_flight = killed.get(&pid).is_some_and(|&at| match done {
                None => true,
                Some(d) => d + ACK_WINDOW_MS >= at,
            });
            if in_flight {
                if done.is_none() {
                    v.in_flight += 1;
                } else if key_runs.len() > 1 {
                    v.finished_then_rerun += 1;
                    let gap = killed[&pid].saturating_sub(done.unwrap_or_default());
                    v.max_done_to_kill_ms = v.max_done_to_kill_ms.max(gap);
                }
            } else {
                if done.is_none() {
                    v.problems.push(format!(
                        "{key}: started by {pid} (delivery {deliveries}), which was not \
                         killed, and never finished there"
                    ));
                }
                unexplained.push((pid, deliveries));
            }
        }
        if unexplained.len() > 1 {
            v.problems.push(format!(
                "{key}: ran {} times outside a killed worker's in-flight set: {unexplained:?} \
                 (runs: {key_runs:?})",
                unexplained.len()
            ));
        }
    }
    v
}
