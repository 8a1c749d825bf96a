//! Scenario 4, poison and garbage: one worker process serves the fault
//! queue while the test puts into it, between 50 good ledger tasks, an
//! envelope whose arguments do not decode, one naming a task no binary
//! links, bytes that are not JSON, truncated JSON, an envelope of a future
//! format version (written raw), and tries to publish a 10 MiB one. The
//! unknown-task grace is short (`STEM_UNKNOWN_TASK_GRACE`).
//!
//! Pass: each bad item is dead-lettered with a reason that says what was
//! wrong; the 10 MiB one is refused at publish with `TooLarge` naming the
//! size and the limit and is stored nowhere; the 50 good ones ran exactly
//! once (ledger); the worker is alive throughout and exits cleanly on
//! SIGTERM.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use stem::adapters::postgres::{PostgresBroker, PostgresOptions};
use stem::adapters::redis::{RedisBroker, RedisOptions};
use stem::adapters::sqlite::{SqliteBroker, SqliteOptions};
use stem::{BrokerError, DeadLetter, Envelope};
use stem_tests::e2e_tasks::ledger_fault;
use stem_tests::ledger;
use stem_tests::postgres::{self, DropSchema};

use crate::support::{DeleteRedisNamespace, QUEUE, Target, say, spawn_worker_with};

const GOOD: usize = 50;
/// The unknown-task grace given to the worker.
const GRACE: &str = "1s";
/// A name no binary links.
const UNKNOWN: &str = "faults::no_such_task_anywhere";
/// The whole scenario's deadline (start to drained).
const DEADLINE: Duration = Duration::from_secs(25);
/// The size of the payload that must be refused.
const BIG: usize = 10 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_poison() {
    let dir = tempfile::Builder::new()
        .prefix("stem-faults-sqlite-")
        .tempdir()
        .expect("temp dir");
    let db = dir.path().join("stem.db");
    let target = Target {
        url: format!("sqlite://{}", db.display()),
        namespace: String::from("stem"),
    };
    let raw = Raw::Sqlite(
        SqliteBroker::open(&db, SqliteOptions::default())
            .await
            .expect("sqlite opens"),
    );
    run("sqlite_poison", &target, &raw, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_poison() {
    if !postgres::server_up("postgres_poison") {
        return;
    }
    let ns = postgres::namespace("faults_poison");
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
    let raw = Raw::Postgres(
        PostgresBroker::connect(&target.url, PostgresOptions::default())
            .await
            .expect("postgres connects"),
    );
    run("postgres_poison", &target, &raw, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_poison() {
    if !crate::support::redis_up("redis_poison") {
        return;
    }
    let ns = postgres::namespace("faults_poison");
    let _delete = DeleteRedisNamespace {
        namespace: ns.clone(),
    };
    let dir = tempfile::Builder::new()
        .prefix("stem-faults-redis-")
        .tempdir()
        .expect("temp dir");
    let target = Target {
        url: crate::support::redis_url(),
        namespace: ns.clone(),
    };
    let raw = Raw::Redis(
        RedisBroker::connect(
            &target.url,
            RedisOptions {
                namespace: ns,
                ..RedisOptions::default()
            },
        )
        .await
        .expect("redis connects"),
    );
    run("redis_poison", &target, &raw, dir.path()).await;
}

/// The adapter's hook for writing bytes straight into a queue.
enum Raw {
    Sqlite(SqliteBroker),
    Postgres(PostgresBroker),
    Redis(RedisBroker),
}

impl Raw {
    async fn insert(&self, bytes: &[u8]) {
        match self {
            Self::Sqlite(b) => b.insert_raw(QUEUE, bytes).await,
            Self::Postgres(b) => b.insert_raw(QUEUE, bytes).await,
            Self::Redis(b) => b.insert_raw(QUEUE, bytes).await,
        }
        .expect("insert_raw");
    }
}

/// What each bad item is, and how its dead letter is recognised.
#[derive(Debug)]
enum Bad {
    /// By task id; the reason must name undecodable arguments.
    WrongArgs(stem::TaskId),
    /// By task id; the reason must name the unknown task.
    Unknown(stem::TaskId),
    /// By raw bytes; the reason must say the envelope does not decode.
    Garbage(&'static str, String),
    /// By raw bytes; the reason must name the version.
    FutureVersion(String),
}

impl Bad {
    fn label(&self) -> &'static str {
        match self {
            Self::WrongArgs(_) => "wrong args",
            Self::Unknown(_) => "unknown task",
            Self::Garbage(what, _) => what,
            Self::FutureVersion(_) => "version 99",
        }
    }

    fn matches(&self, d: &DeadLetter) -> bool {
        match self {
            Self::WrongArgs(id) | Self::Unknown(id) => d.id == *id,
            Self::Garbage(_, raw) | Self::FutureVersion(raw) => d.raw.as_deref() == Some(raw),
        }
    }

    /// `None` when the reason says what was wrong, else the complaint.
    fn check_reason(&self, reason: &str) -> Option<String> {
        let ok = match self {
            Self::WrongArgs(_) => reason.contains(&format!(
                "undecodable arguments for task `{}`",
                ledger_fault::NAME
            )),
            Self::Unknown(_) => reason.contains(&format!("unknown task name `{UNKNOWN}`")),
            Self::Garbage(..) => reason.starts_with("undecodable envelope"),
            Self::FutureVersion(_) => {
                reason.starts_with("undecodable envelope") && reason.contains("v99")
            }
        };
        (!ok).then(|| {
            format!(
                "{}: reason does not say what was wrong: {reason}",
                self.label()
            )
        })
    }
}

/// The scenario on `target`; `dir` holds the ledger and the worker's
/// stdout. The worker process lives in this function, so it is gone before
/// the caller's cleanup guards run.
#[allow(clippy::too_many_lines)]
async fn run(test: &str, target: &Target, raw: &Raw, dir: &std::path::Path) {
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

    let mut worker = spawn_worker_with(
        target,
        &ledger_path,
        "30s",
        4,
        &[("STEM_UNKNOWN_TASK_GRACE", GRACE)],
        Stdio::from(std::fs::File::create(&report_path).expect("report file")),
    );

    let mut bad: Vec<Bad> = Vec::new();
    let mut good_keys: Vec<String> = Vec::new();
    let mut too_large: Option<BrokerError> = None;
    let mut big_id = None;
    // Ten good tasks, then one bad item, and so on.
    for round in 0..6 {
        if round < 5 {
            let args: Vec<ledger_fault::Args> = (0..GOOD / 5)
                .map(|i| ledger_fault::Args {
                    key: format!("k{}", round * (GOOD / 5) + i),
                    millis: 5,
                })
                .collect();
            good_keys.extend(args.iter().map(|a| a.key.clone()));
            ledger_fault::with()
                .on(&stem)
                .enqueue_many(args)
                .await
                .expect("enqueue_many");
        }
        match round {
            0 => {
                let env = Envelope::new(
                    ledger_fault::NAME,
                    QUEUE,
                    serde_json::json!({"wrong": true}),
                )
                .expect("envelope");
                bad.push(Bad::WrongArgs(env.id));
                stem.broker()
                    .publish(env)
                    .await
                    .expect("publish wrong args");
            }
            1 => {
                let env = Envelope::new(UNKNOWN, QUEUE, serde_json::json!({"key": "u"}))
                    .expect("envelope");
                bad.push(Bad::Unknown(env.id));
                stem.broker().publish(env).await.expect("publish unknown");
            }
            2 => {
                let junk = "this is not JSON \u{1} at all";
                raw.insert(junk.as_bytes()).await;
                bad.push(Bad::Garbage("not JSON", junk.to_owned()));
                let truncated = String::from_utf8(
                    Envelope::new(
                        ledger_fault::NAME,
                        QUEUE,
                        serde_json::json!({"key": "t", "millis": 1}),
                    )
                    .expect("envelope")
                    .encode()
                    .expect("encode"),
                )
                .expect("utf-8");
                let truncated = truncated[..truncated.len() / 2].to_owned();
                raw.insert(truncated.as_bytes()).await;
                bad.push(Bad::Garbage("truncated JSON", truncated));
            }
            3 => {
                let env = Envelope::new(
                    ledger_fault::NAME,
                    QUEUE,
                    serde_json::json!({"key": "v99", "millis": 1}),
                )
                .expect("envelope");
                let mut json: serde_json::Value =
                    serde_json::from_slice(&env.encode().expect("encode")).expect("json");
                json["v"] = serde_json::json!(99);
                let bytes = serde_json::to_string(&json).expect("json");
                raw.insert(bytes.as_bytes()).await;
                bad.push(Bad::FutureVersion(bytes));
            }
            4 => {
                let env = Envelope::new(
                    ledger_fault::NAME,
                    QUEUE,
                    serde_json::json!({"key": "big", "millis": 1, "pad": "x".repeat(BIG)}),
                )
                .expect("envelope");
                big_id = Some(env.id);
                too_large = stem.broker().publish(env).await.err();
            }
            _ => {}
        }
    }
    let big_id = big_id.expect("the big one was tried");

    // Drained: every good key done and every bad item dead-lettered.
    let letters: Vec<DeadLetter> = loop {
        worker.assert_running("the worker");
        let done = ledger::read_runs(&ledger_path)
            .iter()
            .filter(|r| r.event == "done")
            .count();
        let letters = dead
            .list(QUEUE, None, 100)
            .await
            .expect("list dead letters")
            .items;
        if (done >= GOOD && letters.len() >= bad.len()) || begun.elapsed() > DEADLINE {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drained = begun.elapsed();
    // Long enough for a second run of anything to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.assert_running("the worker after the poison");
    let st = stem.stats(QUEUE).await.expect("stats");
    let big_record = stem
        .backend()
        .expect("a result backend")
        .get(big_id)
        .await
        .expect("backend get");
    let worker_pid = worker.pid();
    worker.terminate();
    let report = std::fs::read_to_string(&report_path).unwrap_or_default();

    // The ledger: each good key started and finished exactly once.
    let runs = ledger::read_runs(&ledger_path);
    let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in &runs {
        let c = counts.entry(r.key.as_str()).or_default();
        match r.event.as_str() {
            "start" => c.0 += 1,
            _ => c.1 += 1,
        }
    }
    let mut problems: Vec<String> = Vec::new();
    for key in &good_keys {
        match counts.get(key.as_str()) {
            Some((1, 1)) => {}
            Some((s, d)) => problems.push(format!("{key}: started {s} times, finished {d}")),
            None => problems.push(format!("{key}: never ran")),
        }
    }
    for key in counts.keys() {
        if !good_keys.iter().any(|k| k == key) {
            problems.push(format!("{key}: ran, and is not a good task"));
        }
    }

    // The dead letters: one per bad item, each with a telling reason.
    let mut reasons = Vec::new();
    for b in &bad {
        let found: Vec<&DeadLetter> = letters.iter().filter(|d| b.matches(d)).collect();
        match found.as_slice() {
            [d] => {
                reasons.push(format!("  {}: {}", b.label(), d.reason));
                if let Some(p) = b.check_reason(&d.reason) {
                    problems.push(p);
                }
            }
            [] => problems.push(format!("{}: not dead-lettered", b.label())),
            many => problems.push(format!("{}: dead-lettered {} times", b.label(), many.len())),
        }
    }
    if letters.len() != bad.len() {
        problems.push(format!(
            "{} dead letters, expected {}: {:?}",
            letters.len(),
            bad.len(),
            letters.iter().map(|d| &d.reason).collect::<Vec<_>>()
        ));
    }

    // The 10 MiB one: refused at publish, stored nowhere.
    let refusal = too_large.as_ref().map(ToString::to_string);
    match &too_large {
        Some(BrokerError::TooLarge { size, limit, .. }) => {
            let msg = refusal.as_deref().unwrap_or_default();
            if *size <= BIG || !msg.contains(&size.to_string()) || !msg.contains(&limit.to_string())
            {
                problems.push(format!(
                    "TooLarge should name the size (> {BIG}) and the limit: {msg}"
                ));
            }
        }
        other => problems.push(format!(
            "the 10 MiB publish was not refused with TooLarge: {other:?}"
        )),
    }
    if letters.iter().any(|d| d.id == big_id) {
        problems.push(String::from("the 10 MiB one is among the dead letters"));
    }
    if big_record.is_some() {
        problems.push(format!("the 10 MiB one has a record: {big_record:?}"));
    }
    if counts.contains_key("big") {
        problems.push(String::from("the 10 MiB one ran"));
    }
    if (st.ready, st.delayed, st.leased) != (0, 0, 0) {
        problems.push(format!("the queue is not empty after the drain: {st:?}"));
    }

    say(&format!(
        "{test}: good={GOOD} runs={} bad_stored={} dead_letters={} drained_at={:.1}s \
         worker={worker_pid} queue_after={st:?} worker_stdout={:?}\n{test}: refused at publish: {}\n\
         {test}: dead-letter reasons:\n{}",
        runs.len(),
        bad.len(),
        letters.len(),
        drained.as_secs_f64(),
        report.trim(),
        refusal.as_deref().unwrap_or("(not refused)"),
        reasons.join("\n"),
    ));
    assert!(problems.is_empty(), "{test}: {problems:#?}");
}
