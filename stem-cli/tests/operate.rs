//! Operating live workers with the built `stem` binary: two worker
//! processes (this test binary run again as a worker: the test
//! `worker_process` serves when `STEM_OP_WORKER` is set) on SQLite, and on
//! Redis and Postgres when their URLs are set. Drives `ping`, `enqueue
//! --wait`, `inspect active`, `revoke --terminate`, `pause`/`resume`,
//! `dlq replay`, `events --follow` and `shutdown`, and pins each `--json`
//! shape (keys and types).

mod support;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stem::TaskId;
use support::{assert_shape, say, server_url, stem_at, stem_at_env};

// ---------------------------------------------------------------- tasks

#[stem::task(queue = "op-slow", retries = 0)]
async fn op_sleep(millis: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    millis
}

#[stem::task(queue = "op-math")]
async fn op_add(a: i64, b: i64) -> i64 {
    a + b
}

#[derive(Debug, thiserror::Error)]
#[error("{0} does not exist yet")]
struct Missing(String);

/// Fails until the file `path` exists (so a dead letter replayed after it
/// is created succeeds).
#[stem::task(queue = "op-fail", retries = 0)]
async fn op_needs_file(path: String) -> Result<String, Missing> {
    if std::path::Path::new(&path).exists() {
        Ok(path)
    } else {
        Err(Missing(path))
    }
}

// ---------------------------------------------------------------- workers

const WORKER_VAR: &str = "STEM_OP_WORKER";

/// Serves as a worker when run by [`Worker::spawn`]; passes at once
/// otherwise.
#[test]
fn worker_process() {
    if std::env::var_os(WORKER_VAR).is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let url = std::env::var("STEM_BROKER_URL").expect("broker url");
        let ns = std::env::var("STEM_NAMESPACE").expect("namespace");
        let stem = stem::connect_with(&url, None, &ns).await.expect("connect");
        let report = stem::worker::Worker::builder()
            .client(&stem)
            .build()
            .await
            .expect("worker builds")
            .run()
            .await
            .expect("worker runs");
        say(&format!("worker report {report:?}"));
    });
}

/// A worker process, SIGKILLed if still running when dropped.
struct Worker {
    child: Child,
    id: String,
}

impl Worker {
    fn spawn(url: &str, ns: &str, id: &str, queues: &str) -> Self {
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["worker_process", "--exact", "--nocapture"])
            .env(WORKER_VAR, "1")
            .env("STEM_BROKER_URL", url)
            .env_remove("STEM_RESULT_BACKEND_URL")
            .env("STEM_NAMESPACE", ns)
            .env("STEM_WORKER_ID", id)
            .env("STEM_QUEUES", queues)
            .env("STEM_CONCURRENCY", "2")
            .env("STEM_PREFETCH", "2")
            .env("STEM_HEARTBEAT_INTERVAL", "200ms")
            .env("STEM_POLL_INTERVAL", "100ms")
            .env("STEM_EVENTS", "1")
            .env("STEM_SHUTDOWN_GRACE", "20s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("worker process starts");
        Self {
            child,
            id: id.to_owned(),
        }
    }

    /// Waits for the process to end by itself; its exit code.
    fn exits_within(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- helpers

/// Retries `stem ARGS --json` until `check` accepts its document.
fn until(url: &str, ns: &str, args: &[&str], what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = stem_at(url, ns, args);
        if run.code == 0
            && let Ok(doc) = serde_json::from_str::<Value>(&run.stdout)
            && check(&doc)
        {
            return doc;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still not so after 20 s; last: code {} stdout {} stderr {}",
            run.code,
            run.stdout,
            run.stderr
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const REPLY_SHAPE_HEAD: &[(&str, &str)] = &[
    ("worker_id", "string"),
    ("host", "string"),
    ("pid", "uint"),
    ("type", "string"),
];

fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = REPLY_SHAPE_HEAD.to_vec();
    v.extend_from_slice(extra);
    v
}

/// The replies of a control command's `--json`, shape-checked.
fn replies<'a>(doc: &'a Value, extra: &[(&'static str, &'static str)]) -> &'a Vec<Value> {
    assert_shape(
        doc,
        "control document",
        &[("replies", "array"), ("silent", "array")],
    );
    let replies = doc["replies"].as_array().unwrap();
    for r in replies {
        assert_shape(r, "reply", &with(extra));
    }
    replies
}

fn ids_of(replies: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = replies
        .iter()
        .map(|r| r["worker_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Runs the whole walkthrough against `url` in namespace `ns`.
fn operate(url: &str, ns: &str) {
    let started = Instant::now();
    let one = format!("{ns}-one");
    let two = format!("{ns}-two");
    let mut w1 = Worker::spawn(url, ns, &one, "op-slow,op-math,op-fail");
    let mut w2 = Worker::spawn(url, ns, &two, "op-math");
    until(url, ns, &["workers", "--json"], "two live workers", |d| {
        d.as_array()
            .is_some_and(|a| a.iter().filter(|w| w["alive"] == true).count() == 2)
    });

    // The tail starts first, so it sees what follows.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_stem"))
        .args([
            "--broker-url",
            url,
            "--namespace",
            ns,
            "events",
            "--follow",
            "--json",
        ])
        .env_remove("STEM_BROKER_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("events --follow runs");
    std::thread::sleep(Duration::from_millis(500));

    // ping: both answer.
    let doc = stem_at(url, ns, &["ping", "--json"]).ok().json();
    let pongs = replies(&doc, &[]);
    assert_eq!(ids_of(pongs), [one.clone(), two.clone()]);
    assert!(pongs.iter().all(|r| r["type"] == "pong"));
    assert_eq!(doc["silent"], Value::Array(vec![]));

    // enqueue by name (the CLI links no task: the workers advertise it),
    // --wait prints the typed result.
    // With STEM_EVENTS=1, so the CLI's own publish sends `sent`.
    let doc = stem_at_env(
        url,
        ns,
        &[("STEM_EVENTS", "1")],
        &[
            "enqueue",
            op_add::NAME,
            "--args",
            r#"{"a": 2, "b": 40}"#,
            "--wait",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_shape(
        &doc,
        "enqueue --wait",
        &[
            ("id", "string"),
            ("duplicate", "bool"),
            ("state", "string"),
            ("result", "uint"),
        ],
    );
    assert_eq!(
        (doc["state"].as_str(), doc["result"].as_u64()),
        (Some("succeeded"), Some(42))
    );
    let added: TaskId = doc["id"].as_str().unwrap().parse().unwrap();
    let run = stem_at(
        url,
        ns,
        &[
            "enqueue",
            op_add::NAME,
            "--args",
            r#"{"a": 1, "b": 2}"#,
            "--wait",
        ],
    );
    assert_eq!(run.ok().stdout.trim(), "3", "the result alone, as JSON");

    // inspect active, then revoke --terminate.
    let doc = stem_at(
        url,
        ns,
        &[
            "enqueue",
            op_sleep::NAME,
            "--args",
            r#"{"millis": 60000}"#,
            "--json",
        ],
    )
    .ok()
    .json();
    assert_shape(&doc, "enqueue", &[("id", "string"), ("duplicate", "bool")]);
    let long = doc["id"].as_str().unwrap().to_owned();
    let doc = until(
        url,
        ns,
        &["inspect", "active", "--json"],
        "the long task active",
        |d| {
            d["replies"].as_array().is_some_and(|rs| {
                rs.iter().any(|r| {
                    r["worker_id"] == one.as_str()
                        && r["tasks"]
                            .as_array()
                            .is_some_and(|ts| ts.iter().any(|t| t["id"] == long.as_str()))
                })
            })
        },
    );
    for r in replies(&doc, &[("tasks", "array")]) {
        for t in r["tasks"].as_array().unwrap() {
            assert_shape(
                t,
                "active task",
                &[
                    ("id", "string"),
                    ("name", "string"),
                    ("queue", "string"),
                    ("args_bytes", "uint"),
                    ("started_at", "string"),
                    ("attempt", "uint"),
                ],
            );
        }
    }
    let t0 = Instant::now();
    let doc = stem_at(url, ns, &["revoke", &long, "--terminate", "--json"])
        .ok()
        .json();
    let answers = replies(
        &doc,
        &[("id", "string"), ("running", "bool"), ("reserved", "bool")],
    );
    assert!(
        answers
            .iter()
            .any(|r| r["worker_id"] == one.as_str() && r["running"] == true)
    );
    let shown = until(
        url,
        ns,
        &["task", "show", &long, "--json"],
        "revoked",
        |d| d["state"] == "revoked",
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stopped at once, not at a renewal"
    );
    assert_eq!(shown["finished"], true);

    // pause one queue: it stops while another keeps flowing; resume.
    let doc = stem_at(url, ns, &["pause", "op-math", "--json"])
        .ok()
        .json();
    let answers = replies(&doc, &[("detail", "string")]);
    assert_eq!(ids_of(answers), [one.clone(), two.clone()]);
    let held = stem_at(
        url,
        ns,
        &[
            "enqueue",
            op_add::NAME,
            "--args",
            r#"{"a": 5, "b": 5}"#,
            "--json",
        ],
    )
    .ok()
    .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let flowed = stem_at(
        url,
        ns,
        &[
            "enqueue",
            op_sleep::NAME,
            "--args",
            r#"{"millis": 1}"#,
            "--wait",
            "--json",
        ],
    );
    assert_eq!(flowed.ok().json()["result"], 1, "the other queue flows");
    std::thread::sleep(Duration::from_millis(500));
    let queues = stem_at(url, ns, &["queues", "--json"]).ok().json();
    let math = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "op-math")
        .expect("op-math listed");
    assert_eq!(
        math["ready"], 1,
        "the paused queue is not consumed: {queues}"
    );
    let doc = stem_at(url, ns, &["stats", "--json"]).ok().json();
    for r in replies(
        &doc,
        &[
            ("uptime_secs", "uint"),
            ("concurrency", "uint"),
            ("active", "uint"),
            ("prefetched", "uint"),
            ("queues", "array"),
            ("paused", "array"),
            ("started", "uint"),
            ("succeeded", "uint"),
            ("retried", "uint"),
            ("failed", "uint"),
            ("dead_lettered", "uint"),
            ("revoked", "uint"),
            ("requeued", "uint"),
        ],
    ) {
        assert_eq!(r["paused"], serde_json::json!(["op-math"]));
    }
    let doc = stem_at(url, ns, &["resume", "op-math", "--json"])
        .ok()
        .json();
    let answers = replies(&doc, &[("detail", "string")]);
    assert!(answers.iter().all(|r| r["type"] == "done"), "{doc}");
    let done = until(
        url,
        ns,
        &["task", "show", &held, "--json"],
        "the held task ran",
        |d| d["state"] == "succeeded",
    );
    assert_eq!(done["result"], 10);

    // dlq replay: a dead letter comes back and runs.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ready");
    let args = serde_json::json!({ "path": marker.display().to_string() }).to_string();
    let dead = stem_at(
        url,
        ns,
        &["enqueue", op_needs_file::NAME, "--args", &args, "--json"],
    )
    .ok()
    .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    until(
        url,
        ns,
        &["dlq", "list", "op-fail", "--json"],
        "dead-lettered",
        |d| {
            d.as_array()
                .is_some_and(|a| a.iter().any(|l| l["id"] == dead.as_str()))
        },
    );
    std::fs::write(&marker, b"").unwrap();
    stem_at(url, ns, &["dlq", "replay", "op-fail", "--all", "--json"]).ok();
    until(
        url,
        ns,
        &["task", "show", &dead, "--json"],
        "the replayed task ran",
        |d| d["state"] == "succeeded",
    );

    // events: sent (from the CLI's enqueue), started, succeeded.
    std::thread::sleep(Duration::from_millis(300));
    let _ = tail.kill();
    let lines: Vec<Value> = BufReader::new(tail.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let _ = tail.wait();
    let kinds: Vec<&str> = lines
        .iter()
        .filter(|e| e["task_id"] == added.to_string().as_str())
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for k in ["sent", "started", "succeeded"] {
        assert!(kinds.contains(&k), "events of {added}: {kinds:?}");
    }
    let started_event = lines
        .iter()
        .find(|e| e["task_id"] == added.to_string().as_str() && e["type"] == "started")
        .unwrap();
    assert_shape(
        started_event,
        "event",
        &[
            ("type", "string"),
            ("at", "string"),
            ("source", "string"),
            ("task_id", "string"),
            ("name", "string"),
            ("queue", "string"),
            ("attempt", "uint"),
        ],
    );

    // shutdown: one worker stops gracefully, finishing what it runs.
    let running = stem_at(
        url,
        ns,
        &[
            "enqueue",
            op_sleep::NAME,
            "--args",
            r#"{"millis": 1500}"#,
            "--json",
        ],
    )
    .ok()
    .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    until(
        url,
        ns,
        &["inspect", "active", "--json"],
        "the 1.5 s task runs",
        |d| {
            d["replies"].as_array().is_some_and(|rs| {
                rs.iter().any(|r| {
                    r["tasks"]
                        .as_array()
                        .is_some_and(|ts| ts.iter().any(|t| t["id"] == running.as_str()))
                })
            })
        },
    );
    let doc = stem_at(url, ns, &["shutdown", &one, "--json"]).ok().json();
    let answers = replies(&doc, &[("detail", "string")]);
    assert_eq!(ids_of(answers), std::slice::from_ref(&one));
    assert_eq!(
        w1.exits_within(Duration::from_secs(20)),
        Some(0),
        "{} stops by itself",
        w1.id
    );
    let shown = stem_at(url, ns, &["task", "show", &running, "--json"])
        .ok()
        .json();
    assert_eq!(
        shown["state"], "succeeded",
        "the running task finished before the worker stopped"
    );
    let doc = stem_at(url, ns, &["ping", "--json"]).ok().json();
    assert_eq!(ids_of(replies(&doc, &[])), std::slice::from_ref(&two));
    stem_at(url, ns, &["shutdown", "--json"]).ok();
    assert_eq!(
        w2.exits_within(Duration::from_secs(20)),
        Some(0),
        "{} stops by itself",
        w2.id
    );
    say(&format!(
        "operate on {}: done in {:.1} s",
        stem::url::redact(url),
        started.elapsed().as_secs_f64()
    ));
}

fn namespace() -> String {
    format!("op{}", &TaskId::new().as_uuid().simple().to_string()[20..])
}

#[test]
fn sqlite_operate() {
    if std::env::var_os(WORKER_VAR).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("stem.db").display());
    operate(&url, &namespace());
}

#[test]
fn redis_operate() {
    if std::env::var_os(WORKER_VAR).is_some() {
        return;
    }
    let Some(url) = server_url("STEM_TEST_REDIS_URL") else {
        return;
    };
    let ns = namespace();
    let outcome = std::panic::catch_unwind(|| operate(&url, &ns));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let broker = stem::adapters::redis::RedisBroker::connect(
            &url,
            stem::adapters::redis::RedisOptions {
                namespace: ns.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("redis");
        broker.delete_namespace(&ns).await.expect("cleanup");
    });
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn postgres_operate() {
    if std::env::var_os(WORKER_VAR).is_some() {
        return;
    }
    let Some(url) = server_url("STEM_TEST_POSTGRES_URL") else {
        return;
    };
    let ns = namespace();
    let outcome = std::panic::catch_unwind(|| operate(&url, &ns));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let broker = stem::adapters::postgres::PostgresBroker::connect(
            &url,
            stem::adapters::postgres::PostgresOptions {
                namespace: ns.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("postgres");
        broker.drop_schema().await.expect("cleanup");
    });
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
}
