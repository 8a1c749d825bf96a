//! Scenario 7, stalled but alive: a worker process (lease 1 s) is stopped
//! with SIGSTOP 200 ms into a task, a second worker starts 1 s later, takes
//! the task over once the lease has run out and runs it again; then the
//! first worker gets SIGCONT. Its handler's sleep is over by then, so it
//! returns at once and the worker tries to record its result and ack.
//! Twice, on fresh workers: resumed while the second worker still runs
//! the task (2 s tasks), and after the second worker finished it (1 s
//! tasks). The task returns `"<key> <pid> <deliveries>"`: whose run it was.
//!
//! Pass: the stalled worker's late writes are refused by the fencing
//! token: its log says the lease was lost (at the settlement; on Redis,
//! whose results are stored apart from the broker, also at the fence
//! before the record), it counts nothing succeeded, and they change
//! nothing: while the live run goes on, the record is still `Started` and
//! the delivery still leased; at the end there is exactly one terminal
//! result, the live worker's (its pid, delivery 2, its worker id), the
//! task ran twice (delivery 1 on the stalled worker, 2 on the live one,
//! attempt 1 both times) and the queue is empty.

use std::path::Path;
use std::time::{Duration, Instant};

use stem::{TaskId, TaskState};
use stem_tests::e2e_tasks::ledger_whoami;
use stem_tests::ledger::{self, Run};

use crate::support::{QUEUE, Target, adapter_tests, say, signal, spawn_worker_logged};

const LEASE: &str = "1s";
const LEASE_MS: u64 = 1_000;

adapter_tests!(
    sqlite_stalled,
    postgres_stalled,
    redis_stalled,
    "faults_stall",
    run
);

/// When the stalled worker gets SIGCONT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resume {
    /// While the live worker still runs the task.
    WhileLiveRuns,
    /// Once the live worker finished it (its result recorded).
    AfterLiveFinished,
}

/// Both cases on `target`; `dir` holds the ledgers and the workers' logs.
async fn run(test: &str, target: &Target, dir: &Path) {
    let stem = stem::connect_with(&target.url, None, &target.namespace)
        .await
        .expect("client connects");
    let mut problems = Vec::new();
    for resume in [Resume::WhileLiveRuns, Resume::AfterLiveFinished] {
        problems.extend(case(test, target, dir, &stem, resume).await);
    }
    assert!(problems.is_empty(), "{test}: {problems:#?}");
}

/// Polls the ledger every 10 ms for up to `limit` until `pred` holds of a
/// run; that run.
async fn ledger_wait(path: &Path, limit: Duration, pred: impl Fn(&Run) -> bool) -> Option<Run> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(r) = ledger::read_runs(path).into_iter().find(|r| pred(r)) {
            return Some(r);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the file at `path` for up to `limit` until it contains `text`.
async fn log_wait(path: &Path, limit: Duration, text: &str) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The record's state, as text for the messages.
async fn state_of(stem: &stem::Stem, id: TaskId) -> Option<stem::TaskRecord> {
    stem.backend()
        .expect("a result backend")
        .get(id)
        .await
        .expect("backend get")
}

/// One stall; the problems found.
#[allow(clippy::too_many_lines)]
async fn case(
    test: &str,
    target: &Target,
    dir: &Path,
    stem: &stem::Stem,
    resume: Resume,
) -> Vec<String> {
    let tag = match resume {
        Resume::WhileLiveRuns => "while",
        Resume::AfterLiveFinished => "after",
    };
    let millis: u64 = match resume {
        Resume::WhileLiveRuns => 2_000,
        Resume::AfterLiveFinished => 1_000,
    };
    let separate = target.url.starts_with("redis");
    let ledger_path = dir.join(format!("ledger-{tag}.txt"));
    let file = |who: &str, what: &str| dir.join(format!("{tag}-{who}.{what}"));
    let stalled_id = format!("stalled-{}", TaskId::new().as_uuid().simple());
    let live_id = format!("live-{}", TaskId::new().as_uuid().simple());
    let mut problems: Vec<String> = Vec::new();
    let key = format!("stall-{tag}");

    let mut stalled = spawn_worker_logged(
        target,
        &ledger_path,
        LEASE,
        1,
        &[("STEM_PREFETCH", "1"), ("STEM_WORKER_ID", &stalled_id)],
        (&file("stalled", "out"), &file("stalled", "log")),
    );
    let handle = ledger_whoami::with()
        .on(stem)
        .enqueue_many([ledger_whoami::Args {
            key: key.clone(),
            millis,
        }])
        .await
        .expect("enqueue")
        .remove(0);
    let stalled_pid = stalled.pid();
    let Some(first) = ledger_wait(&ledger_path, Duration::from_secs(10), |r| {
        r.event == "start" && r.pid == stalled_pid
    })
    .await
    else {
        return vec![format!(
            "{tag}: the first worker did not start the task in 10 s"
        )];
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    stalled.assert_running("the worker to be stalled");
    signal(&stalled, "-STOP");
    let stopped = Instant::now();
    // The lease runs out while it is stopped; then the live worker starts.
    tokio::time::sleep(Duration::from_millis(LEASE_MS)).await;
    let mut live = spawn_worker_logged(
        target,
        &ledger_path,
        LEASE,
        1,
        &[("STEM_PREFETCH", "1"), ("STEM_WORKER_ID", &live_id)],
        (&file("live", "out"), &file("live", "log")),
    );
    let live_pid = live.pid();
    let Some(second) = ledger_wait(&ledger_path, Duration::from_secs(10), |r| {
        r.event == "start" && r.pid == live_pid
    })
    .await
    else {
        signal(&stalled, "-CONT");
        return vec![format!(
            "{tag}: the live worker did not take the task over in 10 s"
        )];
    };
    let mut during = None;
    match resume {
        Resume::WhileLiveRuns => {
            // The stalled handler's sleep is over: it returns on SIGCONT.
            let due = first.at_ms + millis + 200;
            let now = ledger::unix_ms();
            if due > now {
                tokio::time::sleep(Duration::from_millis(due - now)).await;
            }
        }
        Resume::AfterLiveFinished => {
            let finished = stem_tests::eventually(Duration::from_secs(10), || async {
                state_of(stem, handle.id())
                    .await
                    .is_some_and(|r| r.state.is_terminal())
            })
            .await;
            if !finished {
                problems.push(format!(
                    "{tag}: the live worker's result not recorded in 10 s"
                ));
            }
        }
    }
    live.assert_running("the live worker");
    let stalled_for = stopped.elapsed();
    signal(&stalled, "-CONT");
    let resumed_at = ledger::unix_ms();
    // The stalled run ends, and its settlement is refused.
    let late_done = ledger_wait(&ledger_path, Duration::from_secs(5), |r| {
        r.event == "done" && r.pid == stalled_pid
    })
    .await;
    if late_done.is_none() {
        problems.push(format!(
            "{tag}: the stalled run did not finish after SIGCONT"
        ));
    }
    let stalled_log = file("stalled", "log");
    if !log_wait(
        &stalled_log,
        Duration::from_secs(5),
        "lease lost before the delivery was settled",
    )
    .await
    {
        problems.push(format!(
            "{tag}: the stalled worker's log does not say its settlement was refused: {:?}",
            std::fs::read_to_string(&stalled_log).unwrap_or_default()
        ));
    }
    if separate
        && !log_wait(
            &stalled_log,
            Duration::from_secs(1),
            "lease lost before the result was recorded",
        )
        .await
    {
        problems.push(format!(
            "{tag}: the stalled worker's log does not say its record was fenced off: {:?}",
            std::fs::read_to_string(&stalled_log).unwrap_or_default()
        ));
    }
    if resume == Resume::WhileLiveRuns {
        // Nothing changed: the live run goes on, leased, unrecorded.
        let rec = state_of(stem, handle.id()).await;
        let st = stem.stats(QUEUE).await.expect("stats");
        let live_done = ledger::read_runs(&ledger_path)
            .iter()
            .any(|r| r.event == "done" && r.pid == live_pid);
        if live_done {
            problems.push(format!(
                "{tag}: the live run finished before the stalled one was refused; the case \
                 tested nothing"
            ));
        }
        match rec.as_ref().map(|r| &r.state) {
            Some(TaskState::Started) => {}
            other => problems.push(format!(
                "{tag}: while the live run goes on, the record is {other:?}, not Started"
            )),
        }
        if (st.ready, st.leased, st.delayed) != (0, 1, 0) {
            problems.push(format!(
                "{tag}: while the live run goes on, want it leased only: {st:?}"
            ));
        }
        during = Some((rec.map(|r| r.state.name()), st));
    }

    // The one terminal result is the live run's.
    let out = handle.wait(Duration::from_secs(10)).await;
    let want = format!("{key} {live_pid} 2");
    match &out {
        Ok(o) if *o == want => {}
        other => problems.push(format!("{tag}: the result is {other:?}, want {want:?}")),
    }
    // Long enough for a stray re-delivery to show.
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 500)).await;
    let rec = state_of(stem, handle.id()).await;
    match &rec {
        Some(r)
            if matches!(&r.state, TaskState::Succeeded { result }
                if result.get() == format!("\"{want}\""))
                && r.worker_id.as_deref() == Some(live_id.as_str())
                && r.attempts == 1 => {}
        other => problems.push(format!(
            "{tag}: the record is {other:?}, want Succeeded {want:?} by {live_id}, 1 attempt"
        )),
    }
    let end = stem.stats(QUEUE).await.expect("stats");
    if (end.ready, end.leased, end.delayed, end.dead) != (0, 0, 0, 0) {
        problems.push(format!("{tag}: the queue is not empty: {end:?}"));
    }
    stalled.assert_running("the stalled worker after SIGCONT");
    let stalled_log_text = std::fs::read_to_string(&stalled_log).unwrap_or_default();
    stalled.terminate();
    live.terminate();
    let report = |who: &str| std::fs::read_to_string(file(who, "out")).unwrap_or_default();
    let (stalled_report, live_report) = (report("stalled"), report("live"));
    if !stalled_report.contains("succeeded=0 ") {
        problems.push(format!(
            "{tag}: the stalled worker counted a success: {stalled_report:?}"
        ));
    }
    if !live_report.contains("succeeded=1 ") {
        problems.push(format!(
            "{tag}: the live worker did not count its success: {live_report:?}"
        ));
    }

    let runs: Vec<(u32, String, u32, u32)> = ledger::read_runs(&ledger_path)
        .into_iter()
        .map(|r| (r.pid, r.event, r.attempt, r.deliveries))
        .collect();
    let mut got = runs.clone();
    got.sort();
    let mut want_runs = vec![
        (stalled_pid, String::from("start"), 1, 1),
        (stalled_pid, String::from("done"), 1, 1),
        (live_pid, String::from("start"), 1, 2),
        (live_pid, String::from("done"), 1, 2),
    ];
    want_runs.sort();
    if got != want_runs {
        problems.push(format!(
            "{tag}: the ledger is {runs:?}, want one run on each worker (stalled {stalled_pid}, \
             live {live_pid})"
        ));
    }
    let refusals: Vec<&str> = stalled_log_text
        .lines()
        .filter(|l| l.contains("lease lost"))
        .map(|l| l.split_once("lease lost").map_or(l, |(_, r)| r))
        .collect();
    say(&format!(
        "{test} [{tag}]: task_ms={millis} lease={LEASE} stalled_pid={stalled_pid} \
         stalled_for={:.1}s live_pid={live_pid} live_took_over_after_stop={}ms \
         resumed_after_live_start={}ms during={during:?} result={out:?} \
         stalled_refusals={refusals:?} stalled_report={:?} live_report={:?} \
         ledger={runs:?} queue_after={end:?}",
        stalled_for.as_secs_f64(),
        second.at_ms.saturating_sub(first.at_ms + 200),
        resumed_at.saturating_sub(second.at_ms),
        stalled_report.trim(),
        live_report.trim(),
    ));
    problems
}
