//! The built `stem` binary against real stores: tasks are published (and
//! run, and dead-lettered) by this test through the library, then read and
//! changed with the command line. SQLite files in a temp dir always; Redis
//! and Postgres with a namespace of their own when `STEM_TEST_REDIS_URL` /
//! `STEM_TEST_POSTGRES_URL` are set (a SKIP line otherwise, a failure under
//! `STEM_REQUIRE_SERVICES=1`).
//!
//! `--json` shapes are pinned as keys and JSON types, not values: a
//! renamed or retyped field breaks scripts that read it.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stem::{Disposition, Envelope, FetchRequest, Settlement, Stem, TaskId};

mod support;

use support::{assert_shape, raw, server_url, stem_at};

// ---------------------------------------------------------------- tasks

#[derive(Debug, thiserror::Error)]
#[error("cli test failure {0}")]
struct Boom(u32);

#[stem::task(queue = "cli-math")]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[stem::task(queue = "cli-fail", retries = 0)]
async fn always_fails(n: u32) -> Result<(), Boom> {
    Err(Boom(n))
}

// ---------------------------------------------------------------- helpers

/// A SQLite file in a fresh temp dir, and a namespace of its own.
struct Sqlite {
    _dir: tempfile::TempDir,
    url: String,
    ns: String,
}

fn sqlite() -> Sqlite {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("stem.db").display());
    Sqlite {
        _dir: dir,
        url,
        ns: format!("cli_{}", TaskId::new().to_string().replace('-', "")),
    }
}

const QUEUE_SHAPE: &[(&str, &str)] = &[
    ("queue", "string"),
    ("ready", "uint"),
    ("delayed", "uint"),
    ("leased", "uint"),
    ("dead", "uint"),
];

async fn client(url: &str, ns: &str) -> Stem {
    stem::connect_with(url, None, ns).await.expect("connect")
}

fn job(queue: &str, n: u64) -> Envelope {
    Envelope::new("cli::job", queue, serde_json::json!({ "n": n })).expect("envelope")
}

/// Publishes `n` jobs on `queue`, fetches them and dead-letters each
/// (charging the attempt, with an error), oldest first; their ids.
async fn dead_letters(stem: &Stem, queue: &str, n: u64) -> Vec<TaskId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut e = job(queue, i);
        e.attempt = 2;
        ids.push(e.id);
        stem.publish(e).await.expect("publish");
    }
    let broker = stem.broker();
    for id in &ids {
        let got = broker
            .fetch(&FetchRequest::new([queue], 1).lease(Duration::from_secs(30)))
            .await
            .expect("fetch");
        assert_eq!(got[0].envelope.id, *id);
        broker
            .settle_one(Settlement::new(
                got[0].receipt.clone(),
                Disposition::DeadLetter {
                    reason: String::from("cli test: gave up"),
                    error: Some(format!("boom {id}")),
                    charge: true,
                },
            ))
            .await
            .expect("dead-letter");
    }
    ids
}

fn by_queue(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .expect("an array")
        .iter()
        .map(|q| (q["queue"].as_str().expect("name").to_owned(), q.clone()))
        .collect()
}

// ---------------------------------------------------------------- SQLite

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_lists_every_queue_with_its_counts() {
    let db = sqlite();
    let stem = client(&db.url, &db.ns).await;

    let empty = stem_at(&db.url, &db.ns, &["--json", "queues"]);
    assert_eq!(empty.ok().json(), serde_json::json!([]));

    for n in 0..3 {
        stem.publish(job("emails", n)).await.expect("publish");
    }
    let mut later = job("reports", 1);
    later.not_before = Some(chrono::Utc::now() + chrono::TimeDelta::hours(1));
    stem.publish(later).await.expect("publish");
    stem.broker()
        .fetch(&FetchRequest::new(["emails"], 1).lease(Duration::from_secs(30)))
        .await
        .expect("fetch");
    dead_letters(&stem, "broken", 2).await;

    let run = stem_at(&db.url, &db.ns, &["queues", "--json"]);
    let list = run.ok().json();
    let items = list.as_array().expect("queues --json is an array");
    for q in items {
        assert_shape(q, "queue", QUEUE_SHAPE);
    }
    let names: Vec<&str> = items.iter().map(|q| q["queue"].as_str().unwrap()).collect();
    assert_eq!(names, ["broken", "emails", "reports"], "sorted by name");
    let q = by_queue(&list);
    let counts = |name: &str| {
        let v = &q[name];
        ["ready", "delayed", "leased", "dead"].map(|k| v[k].as_u64().unwrap())
    };
    assert_eq!(counts("emails"), [2, 0, 1, 0]);
    assert_eq!(counts("reports"), [0, 1, 0, 0]);
    assert_eq!(counts("broken"), [0, 0, 0, 2]);

    // Another namespace in the same file sees none of it.
    let other = stem_at(&db.url, "cli_other", &["queues", "--json"]);
    assert_eq!(other.ok().json(), serde_json::json!([]));

    let human = stem_at(&db.url, &db.ns, &["queues"]);
    let lines: Vec<&str> = human.ok().stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["QUEUE", "READY", "DELAYED", "LEASED", "DEAD"]
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["emails", "2", "0", "1", "0"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_watch_redraws_until_stopped() {
    use std::io::BufRead;

    let db = sqlite();
    let stem = client(&db.url, &db.ns).await;
    stem.publish(job("watched", 1)).await.expect("publish");
    /// Kills the watcher however the test ends.
    struct Watcher(std::process::Child);
    impl Drop for Watcher {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Watcher(
        Command::new(env!("CARGO_BIN_EXE_stem"))
            .args(["--broker-url", &db.url, "--namespace", &db.ns])
            .args(["queues", "--watch", "--json"])
            .env_remove("STEM_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    // Each redraw is one JSON line: read them as they come.
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Value)>();
    let stdout = child.0.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("a line");
            let doc = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not one JSON document a line ({e}): {line}"));
            if tx.send((Instant::now(), doc)).is_err() {
                break;
            }
        }
    });
    let next = |within: Duration| {
        rx.recv_timeout(within)
            .unwrap_or_else(|e| panic!("no redraw within {within:?}: {e}"))
    };
    let (first_at, first) = next(Duration::from_secs(15));
    assert_eq!(first[0]["queue"], "watched");
    assert_eq!(first[0]["ready"], 1);
    let (second_at, _) = next(Duration::from_secs(15));
    assert!(
        second_at - first_at >= Duration::from_millis(700),
        "redrawn every second, not in a loop: {:?}",
        second_at - first_at
    );
    stem.publish(job("watched", 2)).await.expect("publish");
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, doc) = next(until.saturating_duration_since(Instant::now()));
        if doc[0]["ready"] == 2 {
            break;
        }
    }
    drop(child);
    reader.join().expect("the reader saw only JSON lines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_replayed_and_purged() {
    let db = sqlite();
    let stem = client(&db.url, &db.ns).await;
    let ids = dead_letters(&stem, "broken", 3).await;

    // list: pages of the given size, oldest first.
    let all = stem_at(&db.url, &db.ns, &["dlq", "list", "broken", "--json"]);
    let rows = all.ok().json();
    let rows = rows.as_array().expect("dlq list --json is an array");
    assert_eq!(rows.len(), 3);
    for r in rows {
        assert_shape(
            r,
            "dead letter row",
            &[
                ("id", "string"),
                ("queue", "string"),
                ("task", "string|null"),
                ("reason", "string"),
                ("error", "string|null"),
                ("dead_at", "string"),
                ("attempt", "uint|null"),
                ("replayable", "bool"),
            ],
        );
    }
    let listed: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let want: Vec<String> = ids.iter().map(ToString::to_string).collect();
    assert_eq!(listed, want, "oldest first");
    assert_eq!(rows[0]["attempt"], 3, "the charged attempt");
    let page2 = stem_at(
        &db.url,
        &db.ns,
        &[
            "dlq",
            "list",
            "broken",
            "--page",
            "2",
            "--page-size",
            "2",
            "--json",
        ],
    );
    let page2 = page2.ok().json();
    assert_eq!(page2.as_array().unwrap().len(), 1);
    assert_eq!(page2[0]["id"], want[2]);
    let human = stem_at(
        &db.url,
        &db.ns,
        &["dlq", "list", "broken", "--page-size", "2"],
    );
    assert!(
        human.ok().stdout.contains("--page 2"),
        "says how to get the next page: {}",
        human.stdout
    );

    // show: the whole dead letter, found without naming its queue.
    let shown = stem_at(&db.url, &db.ns, &["dlq", "show", &want[1], "--json"]);
    let d = shown.ok().json();
    assert_shape(
        &d,
        "dead letter",
        &[
            ("id", "string"),
            ("queue", "string"),
            ("reason", "string"),
            ("error", "string|null"),
            ("dead_at", "string"),
            ("envelope", "object|null"),
            ("raw", "string|null"),
        ],
    );
    assert_eq!(d["id"], want[1]);
    assert_eq!(d["envelope"]["name"], "cli::job");
    assert_eq!(d["envelope"]["args"]["n"], 1);
    assert_eq!(d["error"], format!("boom {}", ids[1]));
    let human = stem_at(&db.url, &db.ns, &["dlq", "show", &want[1]]);
    assert!(human.ok().stdout.contains("cli test: gave up"));

    // Bad input: one line, the right exit code.
    let unknown = TaskId::new().to_string();
    stem_at(&db.url, &db.ns, &["dlq", "show", &unknown]).fails_with(1, &unknown);
    stem_at(&db.url, &db.ns, &["dlq", "show", "not-a-uuid"]).fails_with(2, "not-a-uuid");
    stem_at(&db.url, &db.ns, &["dlq", "replay", "broken", "nope"]).fails_with(2, "nope");

    // replay one with attempts reset; an unknown id beside it fails the
    // command after the known one moved.
    let r = stem_at(
        &db.url,
        &db.ns,
        &[
            "dlq",
            "replay",
            "broken",
            &want[0],
            &unknown,
            "--reset-attempts",
            "--json",
        ],
    );
    r.fails_with(1, &unknown);
    let doc = r.json();
    assert_shape(
        &doc,
        "replay",
        &[
            ("queue", "string"),
            ("replayed", "uint"),
            ("not_found", "array"),
        ],
    );
    assert_eq!(doc["replayed"], 1);
    assert_eq!(doc["not_found"], serde_json::json!([unknown]));
    let back = stem
        .broker()
        .fetch(&FetchRequest::new(["broken"], 10).lease(Duration::from_secs(30)))
        .await
        .expect("fetch");
    assert_eq!(back.len(), 1, "the replayed one is back on its queue");
    assert_eq!(back[0].envelope.id, ids[0]);
    assert_eq!(back[0].envelope.attempt, 0, "--reset-attempts");
    stem.broker().ack(&back[0].receipt).await.expect("ack");

    // replay --all keeps attempts.
    let r = stem_at(&db.url, &db.ns, &["dlq", "replay", "broken", "--all"]);
    assert!(
        r.ok().stdout.contains("replayed 2 dead letters"),
        "{}",
        r.stdout
    );
    let back = stem
        .broker()
        .fetch(&FetchRequest::new(["broken"], 10).lease(Duration::from_secs(30)))
        .await
        .expect("fetch");
    assert_eq!(back.len(), 2);
    assert!(
        back.iter().all(|d| d.envelope.attempt == 3),
        "attempts kept"
    );
    // clap's own usage error (neither ids nor --all): exit 2.
    assert_eq!(
        stem_at(&db.url, &db.ns, &["dlq", "replay", "broken"]).code,
        2
    );

    // purge: refused without --yes off a terminal, then done.
    for d in &back {
        stem.broker()
            .settle_one(Settlement::new(
                d.receipt.clone(),
                Disposition::DeadLetter {
                    reason: String::from("again"),
                    error: None,
                    charge: false,
                },
            ))
            .await
            .expect("dead-letter");
    }
    stem_at(&db.url, &db.ns, &["dlq", "purge", "broken"]).fails_with(2, "--yes");
    let count = || async {
        stem.broker()
            .dead_letters()
            .expect("dead letters")
            .count("broken")
            .await
            .expect("count")
    };
    assert_eq!(count().await, 2, "nothing deleted without --yes");
    let p = stem_at(
        &db.url,
        &db.ns,
        &["dlq", "purge", "broken", "--yes", "--json"],
    );
    let doc = p.ok().json();
    assert_shape(&doc, "purge", &[("queue", "string"), ("purged", "uint")]);
    assert_eq!(doc["purged"], 2);
    assert_eq!(count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_yes_off_a_terminal() {
    let db = sqlite();
    let stem = client(&db.url, &db.ns).await;
    for n in 0..5 {
        stem.publish(job("bulk", n)).await.expect("publish");
    }
    stem.publish(job("kept", 1)).await.expect("publish");

    stem_at(&db.url, &db.ns, &["purge", "bulk"]).fails_with(2, "--yes");
    assert_eq!(stem.stats("bulk").await.expect("stats").ready, 5);

    let r = stem_at(&db.url, &db.ns, &["purge", "bulk", "--yes", "--json"]);
    let doc = r.ok().json();
    assert_shape(&doc, "purge", &[("queue", "string"), ("purged", "uint")]);
    assert_eq!(doc["purged"], 5);
    assert_eq!(stem.stats("bulk").await.expect("stats").ready, 0);
    assert_eq!(
        stem.stats("kept").await.expect("stats").ready,
        1,
        "one queue only"
    );
    let r = stem_at(&db.url, &db.ns, &["purge", "bulk", "-y"]);
    assert_eq!(r.ok().stdout, "purged 0 tasks from queue `bulk`\n");
}

const TASK_SHAPE: &[(&str, &str)] = &[
    ("id", "string"),
    ("name", "string|null"),
    ("state", "string"),
    ("finished", "bool"),
    ("attempts", "uint"),
    ("worker_id", "string|null"),
    ("started_at", "string|null"),
    ("updated_at", "string"),
    ("runtime_ms", "uint|number|null"),
    ("expires_at", "string"),
    ("next_at", "string|null"),
    ("group_id", "string|null"),
    ("result", "null|bool|uint|number|string|array|object"),
    ("error", "object|null"),
    ("progress", "null|bool|uint|number|string|array|object"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_and_workers_from_a_real_worker() {
    let db = sqlite();
    let stem = client(&db.url, &db.ns).await;
    let worker = stem::worker::Worker::builder()
        .client(&stem)
        .queues(["cli-math", "cli-fail"])
        .poll_interval(Duration::from_millis(50))
        .heartbeat_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("worker builds")
        .start();
    let sum = add::enqueue_on(&stem, 2, 3).await.expect("enqueue");
    let failing = always_fails::enqueue_on(&stem, 7).await.expect("enqueue");
    assert_eq!(sum.wait(Duration::from_secs(20)).await.expect("sum"), 5);
    let sum_id = sum.id().to_string();
    let fail_id = failing.id().to_string();

    // `task wait` returns at once for a finished task; exit 0 on success.
    let r = stem_at(
        &db.url,
        &db.ns,
        &["task", "wait", &sum_id, "--timeout", "20s", "--json"],
    );
    let doc = r.ok().json();
    assert_shape(&doc, "task", TASK_SHAPE);
    assert_eq!(doc["state"], "succeeded");
    assert_eq!(doc["result"], 5);
    assert_eq!(doc["finished"], true);
    assert_eq!(doc["attempts"], 1);
    assert!(doc["worker_id"].is_string(), "the worker that ran it");
    assert!(doc["error"].is_null());

    // A failed task: exit 1 from wait, the error in show.
    let r = stem_at(
        &db.url,
        &db.ns,
        &["task", "wait", &fail_id, "--timeout", "20s", "--json"],
    );
    r.fails_with(1, "failed");
    let r = stem_at(&db.url, &db.ns, &["task", "show", &fail_id, "--json"]);
    let doc = r.ok().json();
    assert_shape(&doc, "task", TASK_SHAPE);
    assert_eq!(doc["state"], "failed");
    assert_shape(
        &doc["error"],
        "task error",
        &[
            ("message", "string"),
            ("type_name", "string"),
            ("kind", "string"),
        ],
    );
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cli test failure 7")
    );
    let human = stem_at(&db.url, &db.ns, &["task", "show", &sum_id]);
    let text = &human.ok().stdout;
    assert!(
        text.contains("succeeded") && text.contains("result:"),
        "{text}"
    );

    // The worker dead-lettered the failure: the CLI finds it.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = stem_at(&db.url, &db.ns, &["dlq", "show", &fail_id, "--json"]);
        if r.code == 0 {
            assert_eq!(r.json()["queue"], "cli-fail");
            break;
        }
        assert!(Instant::now() < until, "the failure was not dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // workers: the live worker from its heartbeats, and one that went
    // silent for more than 3 of its intervals (dead), listed after it.
    stem.backend()
        .expect("a backend")
        .heartbeat(stem::WorkerHeartbeat {
            worker_id: String::from("aaa-gone"),
            host: String::from("elsewhere"),
            pid: 1,
            queues: vec![String::from("cli-math")],
            concurrency: 4,
            active: 0,
            at: chrono::Utc::now(),
            interval: Duration::from_millis(100),
            tasks: Vec::new(),
            events: false,
        })
        .await
        .expect("heartbeat");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = stem_at(&db.url, &db.ns, &["workers", "--json"]);
    let list = r.ok().json();
    let list = list.as_array().expect("workers --json is an array");
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[1]["worker_id"], "aaa-gone", "alive first");
    assert_eq!(list[1]["alive"], false);
    assert_eq!(list[1]["interval_ms"], 100);
    assert_shape(
        &list[0],
        "worker",
        &[
            ("worker_id", "string"),
            ("host", "string"),
            ("pid", "uint"),
            ("queues", "array"),
            ("concurrency", "uint"),
            ("active", "uint"),
            ("last_seen", "string"),
            ("interval_ms", "uint"),
            ("alive", "bool"),
        ],
    );
    assert_eq!(list[0]["alive"], true);
    assert_eq!(list[0]["pid"], std::process::id());
    let human = stem_at(&db.url, &db.ns, &["workers"]);
    let lines: Vec<Vec<&str>> = human
        .ok()
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{}", human.stdout);
    assert_eq!(lines[1][1], "alive");
    assert_eq!(&lines[2][..3], ["aaa-gone", "dead", "elsewhere"]);

    // Unknown and malformed ids, and a wait that runs out.
    let unknown = TaskId::new().to_string();
    stem_at(&db.url, &db.ns, &["task", "show", &unknown]).fails_with(1, &unknown);
    stem_at(&db.url, &db.ns, &["task", "show", "12345"]).fails_with(2, "12345");
    worker.shutdown();
    worker.join().await;
    let running = TaskId::new();
    let mut record = stem::TaskRecord::new(running, stem::TaskState::Started);
    record.attempts = 1;
    stem.backend()
        .expect("a backend")
        .store(record)
        .await
        .expect("store");
    let started = Instant::now();
    stem_at(
        &db.url,
        &db.ns,
        &["task", "wait", &running.to_string(), "--timeout", "300ms"],
    )
    .fails_with(1, "did not finish within 300ms (still started)");
    assert!(started.elapsed() >= Duration::from_millis(300), "waited");
    // A valid id with no record: the wait ends with `no record`.
    stem_at(
        &db.url,
        &db.ns,
        &["task", "wait", &unknown, "--timeout", "200ms"],
    )
    .fails_with(1, "no record");
}

#[test]
fn bad_usage_and_unreachable_servers_get_one_line() {
    let db = sqlite();
    // No broker URL at all: the embedded default every Stem process uses
    // (here a SQLite file at STEM_SQLITE_PATH), as in the walkthrough.
    let embedded = db._dir.path().join("embedded.db");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stem"));
    cmd.env_remove("STEM_BROKER_URL")
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env("STEM_SQLITE_PATH", &embedded)
        .args(["queues", "--json"])
        .stdin(Stdio::null());
    assert_eq!(raw(cmd).ok().json(), serde_json::json!([]));
    assert!(embedded.exists(), "the embedded default was opened");
    // Arguments that are not a JSON object, and a name nobody runs.
    stem_at(
        &db.url,
        &db.ns,
        &["enqueue", "x::y", "--args", "[1]", "--queue", "q"],
    )
    .fails_with(2, "must be a JSON object");
    stem_at(&db.url, &db.ns, &["enqueue", "x::y", "--args", "{"]).fails_with(2, "not JSON");
    stem_at(
        &db.url,
        &db.ns,
        &["enqueue", "nobody::runs_this", "--args", "{}"],
    )
    .fails_with(1, "unknown task `nobody::runs_this`");
    // An unknown scheme.
    stem_at("nats://user:hunter2@127.0.0.1:1", &db.ns, &["queues"]).fails_with(1, "nats");
    // A server that is not there: the password never printed.
    for url in [
        "redis://user:hunter2@127.0.0.1:1",
        "postgres://user:hunter2@127.0.0.1:1/db?connect_timeout=2",
    ] {
        let r = stem_at(url, &db.ns, &["queues"]);
        r.fails_with(1, "127.0.0.1:1");
        assert!(
            !r.stderr.contains("hunter2"),
            "a secret printed: {}",
            r.stderr
        );
        assert!(r.stdout.is_empty());
    }
    // The URL from the environment is not shown by --help either.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stem"));
    cmd.env("STEM_BROKER_URL", "redis://user:hunter2@127.0.0.1:1")
        .arg("--help");
    let help = raw(cmd);
    assert_eq!(help.code, 0);
    assert!(!help.stdout.contains("hunter2"), "{}", help.stdout);
    // clap's own usage errors exit 2.
    assert_eq!(stem_at(&db.url, &db.ns, &["frobnicate"]).code, 2);
    assert_eq!(
        stem_at(&db.url, &db.ns, &["dlq", "list", "q", "--page", "0"]).code,
        2
    );
}

// ---------------------------------------------------------------- servers

/// `queues --json`, `dlq list` and `purge --yes` on a server, in a
/// namespace of the test's own.
async fn on_server(url: &str, ns: &str) {
    let stem = client(url, ns).await;
    for n in 0..2 {
        stem.publish(job("srv-ready", n)).await.expect("publish");
    }
    let ids = dead_letters(&stem, "srv-dead", 2).await;
    let list = stem_at(url, ns, &["queues", "--json"]).ok().json();
    for q in list.as_array().expect("an array") {
        assert_shape(q, "queue", QUEUE_SHAPE);
    }
    let q = by_queue(&list);
    assert_eq!(q.len(), 2, "{list}");
    assert_eq!(q["srv-ready"]["ready"], 2);
    assert_eq!(q["srv-dead"]["dead"], 2);
    let rows = stem_at(url, ns, &["dlq", "list", "srv-dead", "--json"])
        .ok()
        .json();
    let listed: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ids.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
    let shown = stem_at(url, ns, &["dlq", "show", &ids[1].to_string(), "--json"]);
    assert_eq!(shown.ok().json()["queue"], "srv-dead");
    let doc = stem_at(url, ns, &["purge", "srv-ready", "--yes", "--json"])
        .ok()
        .json();
    assert_eq!(doc["purged"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queues_and_dead_letters() {
    let Some(url) = server_url("STEM_TEST_REDIS_URL") else {
        return;
    };
    let ns = format!("cli_{}", TaskId::new().to_string().replace('-', ""));
    let cleanup = stem::adapters::redis::RedisBroker::connect(
        &url,
        stem::adapters::redis::RedisOptions {
            namespace: ns.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("redis");
    let outcome = tokio::spawn({
        let (url, ns) = (url.clone(), ns.clone());
        async move { on_server(&url, &ns).await }
    })
    .await;
    cleanup.delete_namespace(&ns).await.expect("cleanup");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_queues_and_dead_letters() {
    let Some(url) = server_url("STEM_TEST_POSTGRES_URL") else {
        return;
    };
    let ns = format!("cli_{}", TaskId::new().to_string().replace('-', ""));
    let outcome = tokio::spawn({
        let (url, ns) = (url.clone(), ns.clone());
        async move { on_server(&url, &ns).await }
    })
    .await;
    let cleanup = stem::adapters::postgres::PostgresBroker::connect(
        &url,
        stem::adapters::postgres::PostgresOptions {
            namespace: ns.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("postgres");
    cleanup.drop_schema().await.expect("cleanup");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
