//! Scenario 5, handler failures: one worker process (concurrency 4) serves
//! the fault queue while the test puts into it three each of five failing
//! tasks (`retries = 2`, a fixed 100 ms backoff): one that panics, one that
//! returns an error, one that sleeps 5 s past its 300 ms time limit, one
//! that awaits forever under a 300 ms limit, and a `blocking = true` one
//! that spins until its context is cancelled by its 300 ms limit; then ten
//! good ledger tasks, and, once every failing task is dead-lettered, ten
//! more.
//!
//! Pass: each failing task started exactly 1 + retries times (ledger,
//! attempts 1..=3) and never finished, was dead-lettered once with a
//! reason naming the attempts and an error naming the failure (the panic
//! message, the error, the time limit), and its record is `Failed` with
//! the right `FailureKind` (Panic, Error, Timeout) and 3 attempts; every
//! spinning attempt saw its cancellation; the good tasks ran exactly once,
//! and the ten enqueued after the failures finish within a few seconds
//! (the slots of timed-out attempts were released); the worker is alive
//! throughout, and exits 0 on SIGTERM within a few seconds, its report
//! counting 20 succeeded, 30 retried and 15 dead-lettered.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stem::{DeadLetter, FailureKind, TaskId, TaskState};
use stem_tests::e2e_tasks::{
    handler_error, handler_hang, handler_overrun, handler_panic, handler_spin, ledger_fault,
};
use stem_tests::ledger::{self, Run};
use stem_tests::postgres::{self, DropSchema};
use stem_tests::process::Proc;

use crate::support::{DeleteRedisNamespace, QUEUE, Target, say, spawn_worker_with};

/// Retries of each failing task (its attribute): 1 + `RETRIES` runs.
const RETRIES: u32 = 2;
/// Failing tasks of each kind.
const EACH: usize = 3;
/// Good tasks in each of the two batches.
const GOOD: usize = 10;
/// Start to every failing task dead-lettered and the first batch done.
const DEADLINE: Duration = Duration::from_secs(25);
/// How soon the second batch of good tasks must be done.
const SECOND_BATCH: Duration = Duration::from_secs(5);
/// How soon the worker must exit after SIGTERM.
const EXIT: Duration = Duration::from_secs(5);

macro_rules! adapter_tests {
    ($sqlite:ident, $postgres:ident, $redis:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let dir = temp_dir("sqlite");
            let target = Target {
                url: format!("sqlite://{}", dir.path().join("stem.db").display()),
                namespace: String::from("stem"),
            };
            run(stringify!($sqlite), &target, dir.path()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            if !postgres::server_up(stringify!($postgres)) {
                return;
            }
            let ns = postgres::namespace("faults_handlers");
            let _drop_schema = DropSchema {
                namespace: ns.clone(),
            };
            let dir = temp_dir("postgres");
            let target = Target {
                url: postgres::url_with(&format!("namespace={ns}")),
                namespace: ns,
            };
            run(stringify!($postgres), &target, dir.path()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            if !crate::support::redis_up(stringify!($redis)) {
                return;
            }
            let ns = postgres::namespace("faults_handlers");
            let _delete = DeleteRedisNamespace {
                namespace: ns.clone(),
            };
            let dir = temp_dir("redis");
            let target = Target {
                url: crate::support::redis_url(),
                namespace: ns,
            };
            run(stringify!($redis), &target, dir.path()).await;
        }
    };
}

adapter_tests!(
    sqlite_handler_failures,
    postgres_handler_failures,
    redis_handler_failures
);

fn temp_dir(adapter: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("stem-faults-{adapter}-"))
        .tempdir()
        .expect("temp dir")
}

/// The five ways a handler fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Panic,
    Error,
    Overrun,
    Hang,
    Spin,
}

impl Kind {
    const ALL: [Self; 5] = [
        Self::Panic,
        Self::Error,
        Self::Overrun,
        Self::Hang,
        Self::Spin,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Panic => "panic",
            Self::Error => "error",
            Self::Overrun => "overrun",
            Self::Hang => "hang",
            Self::Spin => "spin",
        }
    }

    /// The kind the record must carry.
    fn failure_kind(self) -> FailureKind {
        match self {
            Self::Panic => FailureKind::Panic,
            Self::Error => FailureKind::Error,
            Self::Overrun | Self::Hang | Self::Spin => FailureKind::Timeout,
        }
    }

    /// What the dead letter's error must say.
    fn error_mentions(self) -> &'static str {
        match self {
            Self::Panic => "panics on purpose",
            Self::Error => "fails on purpose",
            Self::Overrun | Self::Hang | Self::Spin => "exceeded the time limit of 300ms",
        }
    }

    async fn enqueue(self, stem: &stem::Stem, key: String) -> TaskId {
        match self {
            Self::Panic => handler_panic::with()
                .on(stem)
                .enqueue_many([handler_panic::Args { key }])
                .await
                .map(|h| h[0].id()),
            Self::Error => handler_error::with()
                .on(stem)
                .enqueue_many([handler_error::Args { key }])
                .await
                .map(|h| h[0].id()),
            Self::Overrun => handler_overrun::with()
                .on(stem)
                .enqueue_many([handler_overrun::Args { key }])
                .await
                .map(|h| h[0].id()),
            Self::Hang => handler_hang::with()
                .on(stem)
                .enqueue_many([handler_hang::Args { key }])
                .await
                .map(|h| h[0].id()),
            Self::Spin => handler_spin::with()
                .on(stem)
                .enqueue_many([handler_spin::Args { key }])
                .await
                .map(|h| h[0].id()),
        }
        .expect("enqueue a failing task")
    }
}

/// One failing task.
struct Failing {
    kind: Kind,
    key: String,
    id: TaskId,
}

async fn enqueue_good(stem: &stem::Stem, from: usize) -> Vec<String> {
    let args: Vec<ledger_fault::Args> = (from..from + GOOD)
        .map(|i| ledger_fault::Args {
            key: format!("good{i}"),
            millis: 5,
        })
        .collect();
    let keys = args.iter().map(|a| a.key.clone()).collect();
    ledger_fault::with()
        .on(stem)
        .enqueue_many(args)
        .await
        .expect("enqueue_many good");
    keys
}

/// How many of `keys` have a `done` in `runs`.
fn done_of(runs: &[Run], keys: &[String]) -> usize {
    keys.iter()
        .filter(|k| runs.iter().any(|r| r.event == "done" && &r.key == *k))
        .count()
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

/// The number after `name=` in the worker's report line.
fn report_count(report: &str, name: &str) -> Option<u64> {
    report
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|n| n.parse().ok())
}

/// The scenario on `target`; `dir` holds the ledger and the worker's
/// stdout. The worker process lives in this function, so it is gone before
/// the caller's cleanup guards run.
#[allow(clippy::too_many_lines)]
async fn run(test: &str, target: &Target, dir: &Path) {
    let begun = Instant::now();
    let ledger_path = dir.join("ledger.txt");
    let report_path = dir.join("worker-stdout.txt");
    let stem = stem::connect_with(&target.url, None, &target.namespace)
        .await
        .expect("client connects");
    let dead = stem
        .broker()
        .dead_letters()
        .expect("the adapter keeps dead letters");
    let backend = stem.backend().expect("a result backend");

    let mut worker = spawn_worker_with(
        target,
        &ledger_path,
        "30s",
        4,
        // The panics on purpose print one line each, not a backtrace.
        &[("RUST_BACKTRACE", "0")],
        Stdio::from(std::fs::File::create(&report_path).expect("report file")),
    );

    let mut failing: Vec<Failing> = Vec::new();
    for i in 0..EACH {
        for kind in Kind::ALL {
            let key = format!("{}{i}", kind.label());
            let id = kind.enqueue(&stem, key.clone()).await;
            failing.push(Failing { kind, key, id });
        }
    }
    let first_at = Instant::now();
    let first = enqueue_good(&stem, 0).await;

    // Every failing task dead-lettered and the first batch done.
    let (letters, first_done) = loop {
        worker.assert_running("the worker");
        let runs = ledger::read_runs(&ledger_path);
        let done = done_of(&runs, &first);
        let letters = dead
            .list(QUEUE, None, 100)
            .await
            .expect("list dead letters")
            .items;
        if (done == GOOD && letters.len() >= failing.len()) || begun.elapsed() > DEADLINE {
            break (letters, done);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drained = begun.elapsed();
    let first_took = runs_last_done(&ledger::read_runs(&ledger_path), &first)
        .map(|ms| ms.saturating_sub(unix_ms_at(first_at)));

    // Ten more, now that every failure is settled: the slots are free.
    let second_at = Instant::now();
    let second = enqueue_good(&stem, GOOD).await;
    let second_done = loop {
        worker.assert_running("the worker");
        let done = done_of(&ledger::read_runs(&ledger_path), &second);
        if done == GOOD || second_at.elapsed() > SECOND_BATCH {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let second_took = second_at.elapsed();

    // Long enough for a further run, or a spinning thread's line, to show.
    tokio::time::sleep(Duration::from_millis(700)).await;
    worker.assert_running("the worker after the failures");
    let st = stem.stats(QUEUE).await.expect("stats");
    let mut records = BTreeMap::new();
    for f in &failing {
        records.insert(f.key.clone(), backend.get(f.id).await.expect("backend get"));
    }

    // SIGTERM: the worker exits 0 within a few seconds.
    let worker_pid = worker.pid();
    let status = Command::new("kill")
        .args(["-TERM", &worker_pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -TERM failed");
    let signalled = Instant::now();
    let exit = wait_exit(&mut worker, EXIT).await;
    let exit_took = signalled.elapsed();
    let report = std::fs::read_to_string(&report_path).unwrap_or_default();

    let mut problems: Vec<String> = Vec::new();
    match exit {
        Some(s) if s.success() => {}
        Some(s) => problems.push(format!("the worker exited with {s} after SIGTERM")),
        None => problems.push(format!(
            "the worker had not exited {:.1}s after SIGTERM",
            exit_took.as_secs_f64()
        )),
    }

    // The ledger.
    let runs = ledger::read_runs(&ledger_path);
    let mut by_key: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for r in &runs {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let expected_attempts: Vec<u32> = (1..=RETRIES + 1).collect();
    for f in &failing {
        let lines = by_key.get(f.key.as_str()).cloned().unwrap_or_default();
        let mut starts: Vec<u32> = lines
            .iter()
            .filter(|r| r.event == "start")
            .map(|r| r.attempt)
            .collect();
        starts.sort_unstable();
        if starts != expected_attempts {
            problems.push(format!(
                "{}: started with attempts {starts:?}, expected {expected_attempts:?}",
                f.key
            ));
        }
        if lines
            .iter()
            .any(|r| r.event == "done" || r.event == "gaveup")
        {
            problems.push(format!("{}: ran to its end: {lines:?}", f.key));
        }
        if f.kind == Kind::Spin {
            let mut cancelled: Vec<u32> = lines
                .iter()
                .filter(|r| r.event == "cancelled")
                .map(|r| r.attempt)
                .collect();
            cancelled.sort_unstable();
            if cancelled != expected_attempts {
                problems.push(format!(
                    "{}: saw its cancellation on attempts {cancelled:?}, expected {expected_attempts:?}",
                    f.key
                ));
            }
        }
    }
    let good: Vec<&String> = first.iter().chain(&second).collect();
    for key in &good {
        let lines = by_key.get(key.as_str()).cloned().unwrap_or_default();
        let shape: Vec<(&str, u32)> = lines
            .iter()
            .map(|r| (r.event.as_str(), r.attempt))
            .collect();
        if shape != [("start", 1), ("done", 1)] {
            problems.push(format!(
                "{key}: ran as {shape:?}, expected one start and done"
            ));
        }
    }
    for key in by_key.keys() {
        if !good.iter().any(|k| k == key) && !failing.iter().any(|f| f.key == *key) {
            problems.push(format!("{key}: ran, and was never enqueued"));
        }
    }
    if first_done != GOOD {
        problems.push(format!(
            "only {first_done} of the {GOOD} good tasks enqueued after the failing ones finished within {DEADLINE:?}"
        ));
    }
    if second_done != GOOD {
        problems.push(format!(
            "only {second_done} of the {GOOD} good tasks enqueued after the failures settled finished within {SECOND_BATCH:?}: slots not released?"
        ));
    }

    // The dead letters and the records.
    let mut reasons = Vec::new();
    for f in &failing {
        let found: Vec<&DeadLetter> = letters.iter().filter(|d| d.id == f.id).collect();
        match found.as_slice() {
            [d] => {
                let error = d.error.as_deref().unwrap_or("");
                reasons.push(format!(
                    "  {}: reason={:?} error={error:?}",
                    f.key, d.reason
                ));
                let attempts = format!("attempt {} of {} failed", RETRIES + 1, RETRIES + 1);
                if !d.reason.contains(&attempts) {
                    problems.push(format!(
                        "{}: reason does not say {attempts:?}: {}",
                        f.key, d.reason
                    ));
                }
                if !error.contains(f.kind.error_mentions()) {
                    problems.push(format!(
                        "{}: dead letter does not name the failure ({:?}): reason={:?} error={:?}",
                        f.key,
                        f.kind.error_mentions(),
                        d.reason,
                        d.error
                    ));
                }
            }
            [] => problems.push(format!("{}: not dead-lettered", f.key)),
            many => problems.push(format!("{}: dead-lettered {} times", f.key, many.len())),
        }
        match records.get(&f.key).and_then(Option::as_ref) {
            Some(rec) => match &rec.state {
                TaskState::Failed { error } => {
                    if error.kind != f.kind.failure_kind() || rec.attempts != RETRIES + 1 {
                        problems.push(format!(
                            "{}: record Failed with {:?} after {} attempts, expected {:?} after {}: {error}",
                            f.key,
                            error.kind,
                            rec.attempts,
                            f.kind.failure_kind(),
                            RETRIES + 1
                        ));
                    }
                }
                other => problems.push(format!("{}: record is {other:?}, not Failed", f.key)),
            },
            None => problems.push(format!("{}: no record", f.key)),
        }
    }
    if letters.len() != failing.len() {
        problems.push(format!(
            "{} dead letters, expected {}",
            letters.len(),
            failing.len()
        ));
    }
    if (st.ready, st.delayed, st.leased) != (0, 0, 0) {
        problems.push(format!("the queue is not empty after the drain: {st:?}"));
    }
    let expect_report = [
        ("succeeded", 2 * GOOD as u64),
        ("retried", u64::from(RETRIES) * failing.len() as u64),
        ("dead_lettered", failing.len() as u64),
    ];
    for (name, want) in expect_report {
        let got = report_count(&report, name);
        if got != Some(want) {
            problems.push(format!(
                "worker report {name}={got:?}, expected {want}: {report:?}"
            ));
        }
    }

    let mut per_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for f in &failing {
        let c = per_kind.entry(f.kind.label()).or_default();
        c.0 += 1;
        c.1 += by_key
            .get(f.key.as_str())
            .map_or(0, |l| l.iter().filter(|r| r.event == "start").count());
    }
    say(&format!(
        "{test}: failing={} (kind: tasks, starts) {per_kind:?} good={} ledger_lines={} \
         dead_letters={} drained_at={:.1}s first_batch_took={first_took:?}ms \
         second_batch_took={:.2}s exit_after_sigterm={:.2}s ({exit:?}) worker={worker_pid} \
         queue_after={st:?} worker_stdout={:?}\n{test}: dead letters:\n{}",
        failing.len(),
        good.len(),
        runs.len(),
        letters.len(),
        drained.as_secs_f64(),
        second_took.as_secs_f64(),
        exit_took.as_secs_f64(),
        report.trim(),
        reasons.join("\n"),
    ));
    assert!(problems.is_empty(), "{test}: {problems:#?}");
}

/// The latest `done` time (Unix ms) among `keys`.
fn runs_last_done(runs: &[Run], keys: &[String]) -> Option<u64> {
    runs.iter()
        .filter(|r| r.event == "done" && keys.contains(&r.key))
        .map(|r| r.at_ms)
        .max()
}

/// `at` as Unix milliseconds.
fn unix_ms_at(at: Instant) -> u64 {
    let ago = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
    ledger::unix_ms().saturating_sub(ago)
}
