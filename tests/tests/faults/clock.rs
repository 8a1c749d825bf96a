//! Scenario 10, clock skew: a worker process whose clock is 10 minutes
//! fast, beside a worker with the right clock. The skew is real: the
//! skewed worker runs under libfaketime (`LD_PRELOAD`, `FAKETIME=+600`), so
//! every wall-clock read in it (Rust's `SystemTime`, chrono, SQLite's
//! `unixepoch()`) is 10 minutes ahead; its monotonic clock is left alone.
//! An adapter's `Clock` hook would not reach SQLite's own clock, which is
//! the point of the SQLite case.
//!
//! The timeline: worker A (right clock, 4 slots, lease 2 s) takes four
//! 4-second tasks `L*` and keeps their leases; then worker B (10 minutes
//! fast, 8 slots) starts, and the test enqueues four tasks `D*` delayed by
//! 2 s and one `F` delayed by 10 minutes and 2 s. A is busy until the
//! `L*` end, so the `D*` are B's to run once due.
//!
//! Pass, where the adapter judges time by the server's clock (Postgres:
//! `now()`; Redis: `TIME` in its scripts): no `D*` starts before it is due
//! by the true clock, B runs some of them (it was there), every `L*` runs
//! once, on A (B stole no live lease), and `F` does not run.
//!
//! SQLite has no server: each process's SQLite reads its own host clock,
//! so a fast worker judges by its fast clock. The test pins that
//! documented limit: B runs every `D*` at once (before it is due), runs `F`
//! 10 minutes early (2 s after its enqueue, early by exactly the skew), and
//! takes every `L*` from A while A's lease is live (each then starts
//! twice; A learns at its next renewal that the lease is lost and stops
//! its run). Every task still ends `Succeeded`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use stem::TaskState;
use stem_tests::e2e_tasks::ledger_fault;
use stem_tests::ledger::{self, Run, unix_ms};
use stem_tests::postgres::{self, DropSchema};

use crate::support::{DeleteRedisNamespace, QUEUE, Target, say, spawn_worker_with};

/// How far the skewed worker's clock is ahead.
const SKEW_MS: u64 = 600_000;
/// The `L*` tasks' run time (A is busy this long).
const LONG_MS: u64 = 4_000;
/// The `D*` tasks' delay.
const DELAY_MS: u64 = 2_000;
/// How many `L*` and `D*` tasks.
const EACH: usize = 4;
/// The whole scenario's deadline.
const DEADLINE: Duration = Duration::from_secs(30);

/// Who judges the time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Judge {
    /// A server's clock: the skewed worker changes nothing.
    Server,
    /// Each process's own clock (SQLite): the skewed worker runs work
    /// early and steals leases.
    Local,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_clock_skew() {
    let Some(lib) = libfaketime("sqlite_clock_skew") else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("stem-faults-sqlite-")
        .tempdir()
        .expect("temp dir");
    let target = Target {
        url: format!("sqlite://{}", dir.path().join("stem.db").display()),
        namespace: String::from("stem"),
    };
    run("sqlite_clock_skew", &target, &lib, Judge::Local, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_clock_skew() {
    if !postgres::server_up("postgres_clock_skew") {
        return;
    }
    let Some(lib) = libfaketime("postgres_clock_skew") else {
        return;
    };
    let ns = postgres::namespace("faults_clock");
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
    run(
        "postgres_clock_skew",
        &target,
        &lib,
        Judge::Server,
        dir.path(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_clock_skew() {
    if !crate::support::redis_up("redis_clock_skew") {
        return;
    }
    let Some(lib) = libfaketime("redis_clock_skew") else {
        return;
    };
    let ns = postgres::namespace("faults_clock");
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
    run("redis_clock_skew", &target, &lib, Judge::Server, dir.path()).await;
}

/// The libfaketime library: `STEM_TEST_LIBFAKETIME`, else where the
/// `libfaketime` package puts it. Without it, prints one SKIP line naming
/// `test` and returns `None`, or fails under `STEM_REQUIRE_SERVICES=1`.
fn libfaketime(test: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("STEM_TEST_LIBFAKETIME")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    for dir in [
        "/usr/lib/x86_64-linux-gnu/faketime",
        "/usr/lib/aarch64-linux-gnu/faketime",
        "/usr/lib/faketime",
        "/usr/local/lib/faketime",
        "/usr/lib64/faketime",
    ] {
        // The thread-safe build: the worker is multi-threaded.
        candidates.push(Path::new(dir).join("libfaketimeMT.so.1"));
    }
    if let Some(lib) = candidates.into_iter().find(|p| p.is_file()) {
        return Some(lib);
    }
    let msg = format!(
        "SKIP {test}: libfaketime not found (apt-get install faketime, or set STEM_TEST_LIBFAKETIME)"
    );
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{msg}, and STEM_REQUIRE_SERVICES=1 requires it"
    );
    say(&msg);
    None
}

/// The scenario on `target`; `dir` holds the ledger. The worker processes
/// live in this function, so they are gone before the caller's cleanup
/// guards run.
#[allow(clippy::too_many_lines)]
async fn run(test: &str, target: &Target, lib: &Path, judge: Judge, dir: &Path) {
    let begun = Instant::now();
    let ledger_path = dir.join("ledger.txt");
    let stem = stem::connect_with(&target.url, None, &target.namespace)
        .await
        .expect("client connects");
    let backend = stem.backend().expect("a result backend on the adapter");

    // A, with the right clock, takes the long tasks and holds their leases.
    // Holding no more than it runs: it cannot take a delayed task while
    // the long ones keep its slots.
    let prefetch = EACH.to_string();
    let mut a = spawn_worker_with(
        target,
        &ledger_path,
        "2s",
        EACH,
        &[("STEM_PREFETCH", &prefetch)],
        Stdio::null(),
    );
    let long_keys: Vec<String> = (0..EACH).map(|i| format!("L{i}")).collect();
    let long = ledger_fault::with()
        .on(&stem)
        .enqueue_many(long_keys.iter().map(|k| ledger_fault::Args {
            key: k.clone(),
            millis: LONG_MS,
        }))
        .await
        .expect("enqueue the long tasks");
    let deadline = Instant::now() + Duration::from_secs(20);
    while ledger::read_runs(&ledger_path)
        .iter()
        .filter(|r| r.event == "start")
        .count()
        < EACH
    {
        a.assert_running("worker A");
        assert!(
            Instant::now() < deadline,
            "{test}: worker A did not start the long tasks in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let a_holds_at = unix_ms();

    // B, 10 minutes fast.
    let lib = lib.to_str().expect("utf-8 path");
    let skew = format!("+{}", SKEW_MS / 1000);
    let mut b = spawn_worker_with(
        target,
        &ledger_path,
        "2s",
        2 * EACH,
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME", &skew),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
        Stdio::null(),
    );
    let (a_pid, b_pid) = (a.pid(), b.pid());

    let delayed_keys: Vec<String> = (0..EACH).map(|i| format!("D{i}")).collect();
    let mut delayed = Vec::new();
    // Each delayed task's due time by the true clock, at the latest.
    let mut due_ms: BTreeMap<String, u64> = BTreeMap::new();
    for k in &delayed_keys {
        let before = unix_ms();
        let h = ledger_fault::with()
            .delay(Duration::from_millis(DELAY_MS))
            .on(&stem)
            .enqueue(k.clone(), 10)
            .await
            .expect("enqueue a delayed task");
        due_ms.insert(k.clone(), before + DELAY_MS);
        delayed.push((k.clone(), h));
    }
    let far_before = unix_ms();
    let far = ledger_fault::with()
        .delay(Duration::from_millis(SKEW_MS + DELAY_MS))
        .on(&stem)
        .enqueue(String::from("F"), 10)
        .await
        .expect("enqueue the far task");
    let far_after = unix_ms();

    // Wait: every L and D done, and for the local judge F too; a server
    // judge's F stays delayed for 10 minutes, so past D's due time plus a
    // second is long enough to see that it did not run.
    let need_far = judge == Judge::Local;
    let quiet_until = far_after + DELAY_MS + 1_000;
    loop {
        a.assert_running("worker A");
        b.assert_running("worker B");
        let runs = ledger::read_runs(&ledger_path);
        let done = |k: &str| runs.iter().any(|r| r.event == "done" && r.key == k);
        let all = long_keys.iter().chain(&delayed_keys).all(|k| done(k))
            && (!need_far || done("F"))
            && unix_ms() >= quiet_until;
        if all || begun.elapsed() > DEADLINE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = begun.elapsed();

    // Results: every L and D task succeeded (and F, when it ran).
    let mut not_succeeded = Vec::new();
    let mut ids: Vec<(String, stem::TaskId)> = long_keys
        .iter()
        .cloned()
        .zip(long.iter().map(stem::TaskHandle::id))
        .collect();
    ids.extend(delayed.iter().map(|(k, h)| (k.clone(), h.id())));
    if need_far {
        ids.push((String::from("F"), far.id()));
    }
    for (key, id) in &ids {
        let mut rec = backend.get(*id).await.expect("backend get");
        // The last settlement may still be on its way.
        let wait = Instant::now() + Duration::from_secs(5);
        while !matches!(
            rec.as_ref().map(|r| &r.state),
            Some(TaskState::Succeeded { .. })
        ) && Instant::now() < wait
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            rec = backend.get(*id).await.expect("backend get");
        }
        match rec.map(|r| r.state) {
            Some(TaskState::Succeeded { result }) if result.get() == format!("\"{key}\"") => {}
            other => not_succeeded.push(format!("{key}: {other:?}")),
        }
    }
    let far_record = backend.get(far.id()).await.expect("backend get");
    let st = stem.stats(QUEUE).await.expect("stats");
    a.terminate();
    b.terminate();

    let runs = ledger::read_runs(&ledger_path);
    // B's wall clock is fast: its lines in true time.
    let true_ms = |r: &Run| {
        if r.pid == b_pid {
            r.at_ms.saturating_sub(SKEW_MS)
        } else {
            r.at_ms
        }
    };
    let starts = |key: &str| -> Vec<&Run> {
        runs.iter()
            .filter(|r| r.event == "start" && r.key == key)
            .collect()
    };
    let mut problems: Vec<String> = Vec::new();
    // The skew took: B's lines are 10 minutes ahead of the test's clock.
    let b_lines: Vec<&Run> = runs.iter().filter(|r| r.pid == b_pid).collect();
    if b_lines.is_empty() {
        problems.push(String::from("worker B ran nothing: nothing was tested"));
    }
    for r in &b_lines {
        if r.at_ms < a_holds_at + SKEW_MS - 1_000 {
            problems.push(format!(
                "worker B's clock is not 10 minutes fast (libfaketime did not take): {r:?}"
            ));
            break;
        }
    }
    for r in &runs {
        if r.pid != a_pid && r.pid != b_pid {
            problems.push(format!("a run by an unknown process: {r:?}"));
        }
    }

    // (key, by, how early in ms) for the delayed tasks.
    let mut early: Vec<(String, &str, i64)> = Vec::new();
    let mut d_by_b = 0;
    for k in &delayed_keys {
        let s = starts(k);
        if s.len() != 1 {
            problems.push(format!("{k}: started {} times", s.len()));
        }
        for r in s {
            let by = if r.pid == b_pid { "B" } else { "A" };
            if r.pid == b_pid {
                d_by_b += 1;
            }
            #[allow(clippy::cast_possible_wrap)]
            let ahead = due_ms[k] as i64 - true_ms(r) as i64;
            early.push((k.clone(), by, ahead));
        }
    }
    let far_starts = starts("F");
    // The long tasks: who ran them, and whether B took a live lease.
    let mut stolen = 0;
    let mut long_runs = 0;
    for k in &long_keys {
        let s = starts(k);
        long_runs += s.len();
        let a_run = s.iter().find(|r| r.pid == a_pid);
        let a_done = runs
            .iter()
            .find(|r| r.event == "done" && r.key == *k && r.pid == a_pid)
            .map(|r| r.at_ms);
        if a_run.is_none() {
            problems.push(format!("{k}: A did not run it"));
        }
        for r in s.iter().filter(|r| r.pid == b_pid) {
            // Live: A had started it and had not finished it.
            if a_done.is_none_or(|d| true_ms(r) < d) {
                stolen += 1;
            } else {
                problems.push(format!("{k}: B ran it again after A finished it"));
            }
        }
    }

    match judge {
        Judge::Server => {
            for (k, by, ahead) in &early {
                // 50 ms of rounding between the clocks' reads.
                if *ahead > 50 {
                    problems.push(format!("{k}: {by} started it {ahead} ms before it was due"));
                }
            }
            if d_by_b == 0 {
                problems.push(String::from(
                    "B ran no delayed task: it was not there to be tempted",
                ));
            }
            if stolen > 0 || long_runs != EACH {
                problems.push(format!(
                    "B took {stolen} live leases from A ({long_runs} runs of {EACH} long tasks)"
                ));
            }
            if !far_starts.is_empty() {
                problems.push(format!("F, due in 10 minutes, ran: {far_starts:?}"));
            }
            if st.delayed != 1 {
                problems.push(format!("F is not waiting in the queue: {st:?}"));
            }
        }
        Judge::Local => {
            // The documented limit, pinned: B judges by its own clock.
            for (k, by, ahead) in &early {
                if *by != "B" || *ahead < 1_000 {
                    problems.push(format!(
                        "{k}: expected B to run it at once (over 1 s early), {by} ran it {ahead} ms early"
                    ));
                }
            }
            if stolen != EACH {
                problems.push(format!(
                    "expected B to take all {EACH} live leases from A, it took {stolen}"
                ));
            }
            match far_starts.as_slice() {
                [r] if r.pid == b_pid => {
                    // Due by B's clock when B's clock reads enqueue + skew + delay.
                    let at = true_ms(r);
                    if at + 100 < far_before + DELAY_MS || at > far_after + DELAY_MS + 1_500 {
                        problems.push(format!(
                            "F: B ran it {} ms after its enqueue, expected about {DELAY_MS} \
                             (early by the skew)",
                            at.saturating_sub(far_before)
                        ));
                    }
                }
                other => problems.push(format!("F: expected one run, by B: {other:?}")),
            }
        }
    }

    say(&format!(
        "{test}: skew=+{}s judge={} runs={} delayed_started_early_ms={:?} delayed_run_by_B={d_by_b}/{EACH} \
         long_runs={long_runs} live_leases_taken_by_B={stolen} far_task_runs={} (F {} ms after enqueue) \
         records_not_succeeded={} far_record={} queue_after={st:?} took={:.1}s",
        SKEW_MS / 1000,
        match judge {
            Judge::Server => "server",
            Judge::Local => "local",
        },
        runs.iter().filter(|r| r.event == "start").count(),
        early
            .iter()
            .take(12)
            .map(|(k, by, a)| format!("{k}@{by}:{a}"))
            .collect::<Vec<_>>(),
        far_starts.len(),
        far_starts.first().map_or(String::from("-"), |r| true_ms(r)
            .saturating_sub(far_before)
            .to_string()),
        not_succeeded.len(),
        far_record.map_or("none", |r| r.state.name()),
        settled.as_secs_f64(),
    ));
    assert!(
        not_succeeded.is_empty(),
        "{test}: records not succeeded: {not_succeeded:?}"
    );
    assert!(problems.is_empty(), "{test}: {problems:#?}");
}
