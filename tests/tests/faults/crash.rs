//! Scenario 8, a crash between success and completion: a worker process
//! (lease 1 s) runs one 100 ms task with a failpoint (stem's `failpoints`
//! feature, `FAILPOINTS=<point>=return`) that ends it at once, exit status
//! 137, with nothing graceful run; then a fresh worker serves the queue.
//! Twice, on fresh tasks and workers:
//!
//! - `stem-after-handler`: the handler returned, nothing of it is written.
//!   Pass: the task is delivered again once the lease runs out (ledger:
//!   delivery 2; the attempt stays 1, a lease re-delivery is no failed
//!   attempt) and the one terminal result is the second run's.
//! - `stem-after-record`: the result is written, the ack not yet. On Redis
//!   (results apart from the broker) that moment exists: the first run's
//!   `Succeeded` record is there at the crash and the delivery still
//!   leased; pass: the task runs again (delivery 2), its late result is
//!   refused (a terminal record is never replaced) and the one terminal
//!   result is the first run's. On SQLite and Postgres the record and the
//!   ack commit in one transaction, so the two never part: the point fires
//!   after that commit; pass: the task never runs again and the one
//!   terminal result is the first run's.
//!
//! Always: the crashed worker exits 137 right after the run (so the
//! failpoint fired where it should), nothing is dead-lettered, the queue
//! ends empty, and the fresh worker exits 0 on SIGTERM.

use std::path::Path;
use std::time::{Duration, Instant};

use stem::{TaskId, TaskState};
use stem_tests::e2e_tasks::ledger_whoami;
use stem_tests::ledger;

use crate::support::{QUEUE, Target, adapter_tests, say, spawn_worker_logged, wait_exit};

const LEASE: &str = "1s";
const LEASE_MS: u64 = 1_000;
const TASK_MS: u64 = 100;

adapter_tests!(
    sqlite_crash_after_success,
    postgres_crash_after_success,
    redis_crash_after_success,
    "faults_crash",
    run
);

/// Both failpoints on `target`; `dir` holds the ledgers and the logs.
async fn run(test: &str, target: &Target, dir: &Path) {
    let stem = stem::connect_with(&target.url, None, &target.namespace)
        .await
        .expect("client connects");
    let mut problems = Vec::new();
    for point in ["stem-after-handler", "stem-after-record"] {
        problems.extend(case(test, target, dir, &stem, point).await);
    }
    assert!(problems.is_empty(), "{test}: {problems:#?}");
}

async fn record(stem: &stem::Stem, id: TaskId) -> Option<stem::TaskRecord> {
    stem.backend()
        .expect("a result backend")
        .get(id)
        .await
        .expect("backend get")
}

/// One crash at `point`; the problems found.
#[allow(clippy::too_many_lines)]
async fn case(
    test: &str,
    target: &Target,
    dir: &Path,
    stem: &stem::Stem,
    point: &str,
) -> Vec<String> {
    // Whether the result is written apart from the ack (Redis), or in the
    // same transaction (SQLite, Postgres: `Broker::stores_results_of`).
    let separate = target.url.starts_with("redis");
    let ack_lost = point == "stem-after-handler" || separate;
    let ledger_path = dir.join(format!("ledger-{point}.txt"));
    let file = |who: &str, what: &str| dir.join(format!("{point}-{who}.{what}"));
    let key = format!("crash-{point}");
    let mut problems: Vec<String> = Vec::new();

    let handle = ledger_whoami::with()
        .on(stem)
        .enqueue_many([ledger_whoami::Args {
            key: key.clone(),
            millis: TASK_MS,
        }])
        .await
        .expect("enqueue")
        .remove(0);
    let failpoints = format!("{point}=return");
    let mut crashing = spawn_worker_logged(
        target,
        &ledger_path,
        LEASE,
        1,
        &[("FAILPOINTS", &failpoints)],
        (&file("crashing", "out"), &file("crashing", "log")),
    );
    let crashing_pid = crashing.pid();
    let begun = Instant::now();
    let status = wait_exit(&mut crashing, Duration::from_secs(15)).await;
    let crashed_after = begun.elapsed();
    let crashed_at = ledger::unix_ms();
    if status.and_then(|s| s.code()) != Some(137) {
        return vec![format!(
            "{point}: the worker with the failpoint ended with {status:?}, not exit 137; its log: \
             {:?}",
            std::fs::read_to_string(file("crashing", "log")).unwrap_or_default()
        )];
    }
    drop(crashing);
    // What the crash left.
    let at_crash = record(stem, handle.id()).await;
    let st_crash = stem.stats(QUEUE).await.expect("stats");
    let first_result = format!("{key} {crashing_pid} 1");
    let first_recorded = at_crash.as_ref().is_some_and(|r| {
        matches!(&r.state, TaskState::Succeeded { result }
            if result.get() == format!("\"{first_result}\""))
    });
    match (point, separate) {
        ("stem-after-handler", _) => {
            if at_crash.as_ref().is_some_and(|r| r.state.is_terminal()) {
                problems.push(format!(
                    "{point}: a terminal record before any write: {at_crash:?}"
                ));
            }
            if st_crash.leased != 1 {
                problems.push(format!("{point}: at the crash, not leased: {st_crash:?}"));
            }
        }
        (_, true) => {
            if !first_recorded || st_crash.leased != 1 {
                problems.push(format!(
                    "{point}: at the crash, want the first run's record and the delivery still \
                     leased: {at_crash:?} {st_crash:?}"
                ));
            }
        }
        (_, false) => {
            if !first_recorded || (st_crash.ready, st_crash.leased) != (0, 0) {
                problems.push(format!(
                    "{point}: at the crash, want the first run's record and the delivery acked \
                     (one transaction): {at_crash:?} {st_crash:?}"
                ));
            }
        }
    }

    // A fresh worker, no failpoint.
    let fresh = spawn_worker_logged(
        target,
        &ledger_path,
        LEASE,
        1,
        &[],
        (&file("fresh", "out"), &file("fresh", "log")),
    );
    let fresh_pid = fresh.pid();
    let rerun_done = stem_tests::eventually(Duration::from_secs(10), || async {
        ledger::read_runs(&ledger_path)
            .iter()
            .any(|r| r.event == "done" && r.pid == fresh_pid)
    })
    .await;
    // Long enough for a (further) re-delivery to show.
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 500)).await;
    let out = handle.wait(Duration::from_secs(5)).await;
    let end_record = record(stem, handle.id()).await;
    let end = stem.stats(QUEUE).await.expect("stats");
    fresh.terminate();
    let fresh_report = std::fs::read_to_string(file("fresh", "out")).unwrap_or_default();

    let want = if point == "stem-after-handler" {
        format!("{key} {fresh_pid} 2")
    } else {
        first_result
    };
    match &out {
        Ok(o) if *o == want => {}
        other => problems.push(format!("{point}: the result is {other:?}, want {want:?}")),
    }
    match end_record.as_ref().map(|r| (&r.state, r.attempts)) {
        Some((TaskState::Succeeded { result }, 1)) if result.get() == format!("\"{want}\"") => {}
        other => problems.push(format!(
            "{point}: the record is {other:?}, want Succeeded {want:?} after 1 attempt"
        )),
    }
    if (end.ready, end.leased, end.delayed, end.dead) != (0, 0, 0, 0) {
        problems.push(format!("{point}: the queue is not empty: {end:?}"));
    }
    let want_fresh = if ack_lost {
        "succeeded=1 "
    } else {
        "succeeded=0 "
    };
    if !fresh_report.contains(want_fresh) {
        problems.push(format!(
            "{point}: the fresh worker's report {fresh_report:?}, want {want_fresh}"
        ));
    }
    let runs: Vec<(u32, String, u32, u32)> = ledger::read_runs(&ledger_path)
        .into_iter()
        .map(|r| (r.pid, r.event, r.attempt, r.deliveries))
        .collect();
    let mut want_runs = vec![
        (crashing_pid, String::from("start"), 1, 1),
        (crashing_pid, String::from("done"), 1, 1),
    ];
    if ack_lost {
        // The ack was lost: delivered again, once.
        want_runs.push((fresh_pid, String::from("start"), 1, 2));
        want_runs.push((fresh_pid, String::from("done"), 1, 2));
        if !rerun_done {
            problems.push(format!(
                "{point}: the fresh worker did not run the task again"
            ));
        }
    }
    if runs != want_runs {
        problems.push(format!(
            "{point}: the ledger is {runs:?}, want {want_runs:?} (crashed {crashing_pid}, fresh \
             {fresh_pid})"
        ));
    }
    let rerun_after = ledger::read_runs(&ledger_path)
        .iter()
        .find(|r| r.event == "start" && r.pid == fresh_pid)
        .map(|r| r.at_ms.saturating_sub(crashed_at));
    say(&format!(
        "{test} [{point}]: separate_results={separate} crashed_pid={crashing_pid} exit=137 \
         after={:.1}s at_crash={:?} queue_at_crash={st_crash:?} rerun_after_crash_ms={rerun_after:?} \
         result={out:?} fresh_report={:?} ledger={runs:?} queue_after={end:?}",
        crashed_after.as_secs_f64(),
        at_crash.as_ref().map(|r| r.state.name()),
        fresh_report.trim(),
    ));
    problems
}
