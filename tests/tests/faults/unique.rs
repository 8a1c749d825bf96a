//! Scenario 9, duplicate enqueue: 10 producer processes (`e2e-unique`),
//! each connected and holding 5 `ledger_fault` calls built with
//! `unique_for(3s)` on the same arguments (50 envelopes, one unique key),
//! wait on a start file and publish all 50 at the same instant, each
//! process its 5 concurrently.
//!
//! Pass: exactly one publish answers `Stored`, the 49 others `Duplicate`
//! with its id; the queue holds one task; a publish of the same call from
//! the test inside the window is a duplicate too, and one after the window
//! is stored under a new id (the queue then holds two).

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stem::Published;
use stem_tests::e2e_tasks::ledger_fault;
use stem_tests::ledger::unix_ms;
use stem_tests::postgres::{self, DropSchema};
use stem_tests::process::Proc;

use crate::support::{DeleteRedisNamespace, QUEUE, Target, say};

/// Producer processes in the race.
const PROCS: usize = 10;
/// Concurrent publishes per process.
const CALLS: usize = 5;
/// The unique window, in ms.
const WINDOW_MS: u64 = 3_000;
/// The unique window.
const WINDOW: Duration = Duration::from_millis(WINDOW_MS);
/// How far ahead of the start file's writing the publishes start.
const LEAD_MS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_duplicate_enqueue() {
    let dir = tempfile::Builder::new()
        .prefix("stem-faults-sqlite-")
        .tempdir()
        .expect("temp dir");
    let target = Target {
        url: format!("sqlite://{}", dir.path().join("stem.db").display()),
        namespace: String::from("stem"),
    };
    run("sqlite_duplicate_enqueue", &target, &target.url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_duplicate_enqueue() {
    if !postgres::server_up("postgres_duplicate_enqueue") {
        return;
    }
    let ns = postgres::namespace("faults_unique");
    let _drop_schema = DropSchema {
        namespace: ns.clone(),
    };
    let dir = tempfile::Builder::new()
        .prefix("stem-faults-postgres-")
        .tempdir()
        .expect("temp dir");
    let target = Target {
        url: postgres::url_with(&format!("namespace={ns}")),
        namespace: ns.clone(),
    };
    // Three connections per producer: the 10 stay well inside the server's
    // `max_connections`, shared with other tests.
    let producer_url = postgres::url_with(&format!("namespace={ns}&max_connections=3"));
    run(
        "postgres_duplicate_enqueue",
        &target,
        &producer_url,
        dir.path(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_duplicate_enqueue() {
    if !crate::support::redis_up("redis_duplicate_enqueue") {
        return;
    }
    let ns = postgres::namespace("faults_unique");
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
    run("redis_duplicate_enqueue", &target, &target.url, dir.path()).await;
}

/// One producer's answer.
#[derive(Debug)]
struct Answer {
    stored: bool,
    id: stem::TaskId,
    sent_ms: u64,
    answered_ms: u64,
}

/// Parses `stored ID SENT ANSWERED` or `duplicate ID SENT ANSWERED`.
fn parse(line: &str) -> Result<Answer, String> {
    let f: Vec<&str> = line.split(' ').collect();
    let [kind, id, sent, answered] = f.as_slice() else {
        return Err(format!("unexpected line {line:?}"));
    };
    let stored = match *kind {
        "stored" => true,
        "duplicate" => false,
        _ => return Err(format!("unexpected line {line:?}")),
    };
    Ok(Answer {
        stored,
        id: id.parse().map_err(|e| format!("{line:?}: {e}"))?,
        sent_ms: sent.parse().map_err(|e| format!("{line:?}: {e}"))?,
        answered_ms: answered.parse().map_err(|e| format!("{line:?}: {e}"))?,
    })
}

/// The scenario on `target`, the producers connecting to `producer_url`;
/// `dir` holds the start file. The producer processes live in this
/// function, so they are gone before the caller's cleanup guards run.
#[allow(clippy::too_many_lines)]
async fn run(test: &str, target: &Target, producer_url: &str, dir: &Path) {
    let begun = Instant::now();
    // Connecting first creates the schema, so the producers race on the
    // publish alone.
    let stem = stem::connect_with(&target.url, None, &target.namespace)
        .await
        .expect("client connects");
    let key = format!("u-{}", stem::TaskId::new().as_uuid().simple());
    let go = dir.join("go");
    let window_ms = WINDOW_MS.to_string();
    let calls = CALLS.to_string();

    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut procs = Vec::with_capacity(PROCS);
    for i in 0..PROCS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_e2e-unique"))
            .args([go.to_str().expect("utf-8 path"), &key, &window_ms, &calls])
            .env("STEM_BROKER_URL", producer_url)
            .env_remove("STEM_RESULT_BACKEND_URL")
            .env("STEM_NAMESPACE", &target.namespace)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("producer starts");
        let out = child.stdout.take().expect("stdout piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((i, line)).is_err() {
                    return;
                }
            }
            let _ = tx.send((i, String::from("(exited)")));
        });
        procs.push(Proc(child));
    }
    drop(tx);

    // The barrier: every producer connected and waiting.
    let mut ready = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready < PROCS {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, line)) if line == "ready" => ready += 1,
            Ok((i, line)) => panic!("{test}: producer {i} said {line:?} before the start"),
            Err(e) => panic!("{test}: {ready}/{PROCS} producers ready after 60 s: {e}"),
        }
    }
    let ready_at = begun.elapsed();
    let start_ms = unix_ms() + LEAD_MS;
    let tmp = dir.join("go.tmp");
    std::fs::write(&tmp, start_ms.to_string()).expect("write the start file");
    std::fs::rename(&tmp, &go).expect("publish the start file");

    let mut answers: Vec<Answer> = Vec::with_capacity(PROCS * CALLS);
    let mut exited = 0;
    let mut problems = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while exited < PROCS {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, line)) if line == "(exited)" => exited += 1,
            Ok((i, line)) => match parse(&line) {
                Ok(a) => answers.push(a),
                Err(e) => problems.push(format!("producer {i}: {e}")),
            },
            Err(_) => {
                problems.push(format!(
                    "{} producers still running after 30 s",
                    PROCS - exited
                ));
                break;
            }
        }
    }
    for (i, p) in procs.iter_mut().enumerate() {
        let status = p.0.wait().expect("wait");
        if !status.success() {
            problems.push(format!("producer {i} exited with {status}"));
        }
    }
    assert!(problems.is_empty(), "{test}: {problems:#?}");
    assert_eq!(
        answers.len(),
        PROCS * CALLS,
        "{test}: answers of {} publishes",
        PROCS * CALLS
    );

    let stored: Vec<&Answer> = answers.iter().filter(|a| a.stored).collect();
    let duplicates = answers.len() - stored.len();
    let (holder, holder_answered_ms) = match stored.as_slice() {
        [one] => (one.id, one.answered_ms),
        _ => panic!(
            "{test}: {} publishes answered Stored, expected exactly 1: {answers:?}",
            stored.len()
        ),
    };
    let other_ids: Vec<&Answer> = answers.iter().filter(|a| a.id != holder).collect();
    assert!(
        other_ids.is_empty(),
        "{test}: duplicates answered another id than the holder {holder}: {other_ids:?}"
    );
    let first_sent = answers.iter().map(|a| a.sent_ms).min().unwrap_or(0);
    let last_sent = answers.iter().map(|a| a.sent_ms).max().unwrap_or(0);
    let last_answered = answers.iter().map(|a| a.answered_ms).max().unwrap_or(0);
    // The most publishes in flight at one moment (sent, not answered).
    let overlap = answers
        .iter()
        .map(|a| {
            answers
                .iter()
                .filter(|b| b.sent_ms <= a.sent_ms && a.sent_ms <= b.answered_ms)
                .count()
        })
        .max()
        .unwrap_or(0);
    // The barrier worked: the publishes went out together, not one by one
    // as the processes happened to start (which takes about a second).
    assert!(
        last_sent - first_sent < 1_000 && overlap >= CALLS,
        "{test}: the publishes were sent over {} ms, at most {overlap} at once: no race",
        last_sent - first_sent
    );
    let st_race = stem.stats(QUEUE).await.expect("stats");
    assert_eq!(
        (st_race.ready, st_race.delayed, st_race.leased),
        (1, 0, 0),
        "{test}: the queue after the race"
    );

    // The same call from here, inside the window: the holder again.
    let call = ledger_fault::Args {
        key: key.clone(),
        millis: 5,
    };
    let builder = ledger_fault::with().unique_for(WINDOW);
    let inside_at = unix_ms();
    let inside = stem
        .publish(builder.build(&call).expect("envelope"))
        .await
        .expect("publish inside the window");
    assert!(
        inside_at < start_ms + WINDOW_MS - 500,
        "{test}: too slow to publish inside the window ({} ms after the start)",
        inside_at.saturating_sub(start_ms)
    );
    assert_eq!(
        inside,
        Published::Duplicate(holder),
        "{test}: a publish inside the window"
    );

    // After the window: it runs from the stored publish, by the store's
    // clock, so it ended before the holder's answer plus the window.
    let after = holder_answered_ms + WINDOW_MS + 200;
    tokio::time::sleep(Duration::from_millis(after.saturating_sub(unix_ms()))).await;
    let fresh = stem
        .publish(builder.build(&call).expect("envelope"))
        .await
        .expect("publish after the window");
    let Published::Stored(fresh_id) = fresh else {
        panic!("{test}: a publish after the window answered {fresh:?}, expected Stored");
    };
    assert_ne!(fresh_id, holder, "{test}: the new task has a new id");
    let st_after = stem.stats(QUEUE).await.expect("stats");
    assert_eq!(
        (st_after.ready, st_after.delayed, st_after.leased),
        (2, 0, 0),
        "{test}: the queue after the window"
    );

    say(&format!(
        "{test}: producers={PROCS}x{CALLS} stored=1 duplicates={duplicates} (all with the holder's id) \
         sent_spread={}ms in_flight_at_once={overlap} all_answered_within={}ms ready_at={:.1}s queue_after_race={st_race:?} \
         inside_window=Duplicate after_window=Stored(new id) queue_after_window={st_after:?} \
         took={:.1}s",
        last_sent - first_sent,
        last_answered - first_sent,
        ready_at.as_secs_f64(),
        begun.elapsed().as_secs_f64(),
    ));
}
