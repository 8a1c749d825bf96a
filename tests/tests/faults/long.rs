//! Scenario 6, long tasks: four tasks that each run 5 s, five times the
//! workers' 1 s lease, on two worker processes of two slots each
//! (prefetch 2, so each holds two). Each slot renews its task's lease
//! every third of it. Once all four run, a third worker with four idle
//! slots joins, ready to take any delivery whose lease lapses. Once every
//! task has run 2.5 s, one of the first two workers is killed (SIGKILL).
//!
//! Pass: no task is delivered again while its worker lives (the survivor's
//! two ran once, 5 s and more, attempt 1, delivery 1, and nothing started
//! on the killed worker's tasks before the kill, though a worker stood
//! idle); each of the killed worker's two is delivered again exactly once,
//! to the idle worker, within the lease and a margin of the kill (delivery
//! 2, attempt still 1: a lease re-delivery is no failed attempt), and runs
//! to the end; every record is `Succeeded` with its key and the queue is
//! empty.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use stem::TaskState;
use stem_tests::e2e_tasks::ledger_fault;
use stem_tests::ledger::{self, Run};

use crate::support::{QUEUE, Target, adapter_tests, say, spawn_worker_with};

const LEASE: &str = "1s";
const LEASE_MS: u64 = 1_000;
/// Five leases.
const TASK_MS: u64 = 5 * LEASE_MS;
const TASKS: usize = 4;
const CONCURRENCY: usize = 2;
/// How long the tasks have run when the worker is killed.
const KILL_AFTER: Duration = Duration::from_millis(2_500);
/// The killed worker's tasks must start again within the lease and this.
const REDELIVERY_MARGIN_MS: u64 = 2_000;

adapter_tests!(
    sqlite_long_task,
    postgres_long_task,
    redis_long_task,
    "faults_long",
    run
);

fn spawn(target: &Target, ledger_path: &Path, slots: usize) -> stem_tests::process::Proc {
    spawn_worker_with(
        target,
        ledger_path,
        LEASE,
        slots,
        &[("STEM_PREFETCH", &slots.to_string())],
        Stdio::null(),
    )
}

/// The scenario on `target`; `dir` holds the ledger.
#[allow(clippy::too_many_lines)]
async fn run(test: &str, target: &Target, dir: &Path) {
    let begun = Instant::now();
    let ledger_path = dir.join("ledger.txt");
    let stem = stem::connect_with(&target.url, None, &target.namespace)
        .await
        .expect("client connects");
    let backend = stem.backend().expect("a result backend on the adapter");
    let keys: Vec<String> = (0..TASKS).map(|n| format!("long{n}")).collect();
    let handles = ledger_fault::with()
        .on(&stem)
        .enqueue_many(
            keys.iter()
                .map(|k| ledger_fault::Args {
                    key: k.clone(),
                    millis: TASK_MS,
                })
                .collect::<Vec<_>>(),
        )
        .await
        .expect("enqueue_many");

    let mut victim = spawn(target, &ledger_path, CONCURRENCY);
    let mut survivor = spawn(target, &ledger_path, CONCURRENCY);
    let (victim_pid, survivor_pid) = (victim.pid(), survivor.pid());
    // Every task started, two on each worker.
    let deadline = Instant::now() + Duration::from_secs(20);
    let last_start = loop {
        victim.assert_running("the worker to be killed");
        survivor.assert_running("the surviving worker");
        let starts: Vec<Run> = ledger::read_runs(&ledger_path)
            .into_iter()
            .filter(|r| r.event == "start")
            .collect();
        if starts.len() >= TASKS {
            break starts.iter().map(|r| r.at_ms).max().unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "{test}: only {} of {TASKS} tasks started in 20 s",
            starts.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let started_at = begun.elapsed();
    // Idle, it takes at once whatever delivery's lease lapses.
    let mut idle = spawn(target, &ledger_path, TASKS);
    let idle_pid = idle.pid();
    tokio::time::sleep(KILL_AFTER).await;
    victim.assert_running("the worker to be killed");
    idle.assert_running("the idle worker");
    let killed_at = ledger::unix_ms();
    // Dropping a `Proc` is SIGKILL and a reap.
    drop(victim);

    // Every result back.
    let mut not_back = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for (key, h) in keys.iter().zip(&handles) {
        let left = deadline.saturating_duration_since(Instant::now());
        match h.wait(left.max(Duration::from_millis(1))).await {
            Ok(out) => assert_eq!(&out, key, "{test}: task {key} returned {out}"),
            Err(e) => not_back.push(format!("{key}: {e}")),
        }
    }
    let drained = begun.elapsed();
    // Long enough for a stray re-delivery to show.
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 500)).await;
    survivor.terminate();
    idle.terminate();

    let runs = ledger::read_runs(&ledger_path);
    let mut problems: Vec<String> = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for r in &runs {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let (mut on_survivor, mut rerun, mut max_redelivery_ms, mut min_run_ms) = (0, 0, 0, u64::MAX);
    for key in &keys {
        let rs = by_key.get(key.as_str()).cloned().unwrap_or_default();
        let starts: Vec<&&Run> = rs.iter().filter(|r| r.event == "start").collect();
        let dones: Vec<&&Run> = rs.iter().filter(|r| r.event == "done").collect();
        let shape: Vec<(u32, &str, u32, u32)> = rs
            .iter()
            .map(|r| (r.pid, r.event.as_str(), r.attempt, r.deliveries))
            .collect();
        match (starts.as_slice(), dones.as_slice()) {
            // Never delivered again while its worker lived.
            ([s], [d]) if s.pid == survivor_pid && d.pid == survivor_pid => {
                on_survivor += 1;
                if (s.attempt, s.deliveries) != (1, 1) {
                    problems.push(format!("{key}: {shape:?}, want attempt 1, delivery 1"));
                }
                let ran = d.at_ms.saturating_sub(s.at_ms);
                min_run_ms = min_run_ms.min(ran);
                if ran < TASK_MS {
                    problems.push(format!("{key}: ran {ran} ms, shorter than the task"));
                }
            }
            // Delivered again once, after its worker was killed.
            ([s1, s2], [d]) if s1.pid == victim_pid && s2.pid == idle_pid && d.pid == idle_pid => {
                rerun += 1;
                if (s1.attempt, s1.deliveries, s2.attempt, s2.deliveries) != (1, 1, 1, 2) {
                    problems.push(format!(
                        "{key}: {shape:?}, want attempt 1 delivery 1, then attempt 1 delivery 2"
                    ));
                }
                if s2.at_ms < killed_at {
                    problems.push(format!(
                        "{key}: delivered again {} ms before its worker was killed",
                        killed_at - s2.at_ms
                    ));
                }
                let after = s2.at_ms.saturating_sub(killed_at);
                max_redelivery_ms = max_redelivery_ms.max(after);
                if after > LEASE_MS + REDELIVERY_MARGIN_MS {
                    problems.push(format!(
                        "{key}: delivered again {after} ms after the kill, past the lease and \
                         {REDELIVERY_MARGIN_MS} ms"
                    ));
                }
                let ran = d.at_ms.saturating_sub(s2.at_ms);
                min_run_ms = min_run_ms.min(ran);
            }
            _ => problems.push(format!(
                "{key}: unexpected runs {shape:?} (killed {victim_pid}, survivor \
                 {survivor_pid}, idle {idle_pid})"
            )),
        }
    }
    if (on_survivor, rerun) != (2, 2) {
        problems.push(format!(
            "{on_survivor} tasks ran once on the survivor and {rerun} were re-run after the \
             kill; want 2 and 2"
        ));
    }
    if !not_back.is_empty() {
        problems.push(format!("results not back: {not_back:?}"));
    }
    for (key, h) in keys.iter().zip(&handles) {
        match backend.get(h.id()).await {
            Ok(Some(rec)) => match &rec.state {
                TaskState::Succeeded { result } if result.get() == format!("\"{key}\"") => {}
                other => problems.push(format!("{key}: record {other:?}")),
            },
            other => problems.push(format!("{key}: no record ({other:?})")),
        }
    }
    let end = stem.stats(QUEUE).await.expect("stats");
    if (end.ready, end.leased, end.delayed, end.dead) != (0, 0, 0, 0) {
        problems.push(format!("the queue is not empty: {end:?}"));
    }
    say(&format!(
        "{test}: tasks={TASKS} task_ms={TASK_MS} lease={LEASE} all_started_at={:.1}s \
         killed_after={}ms_of_running once_on_survivor={on_survivor} rerun_after_kill={rerun} \
         max_redelivery_after_kill={max_redelivery_ms}ms shortest_run={min_run_ms}ms runs={} \
         drained_at={:.1}s queue_after={end:?}",
        started_at.as_secs_f64(),
        killed_at.saturating_sub(last_start),
        runs.iter().filter(|r| r.event == "start").count(),
        drained.as_secs_f64(),
    ));
    assert!(problems.is_empty(), "{test}: {problems:#?}");
}
