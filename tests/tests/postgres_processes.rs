//! Postgres across processes: an `e2e-worker` and an `e2e-publisher`
//! process on the server at `STEM_TEST_POSTGRES_URL`, each test in a
//! namespace (so a schema) of its own, dropped at the end however the test
//! ends.
//!
//! Connection loss: while the publisher publishes 3,000 tasks one by one
//! and the worker drains them, the server ends both processes' connections
//! three times (`pg_terminate_backend` by `application_name`). Each time
//! the test first locks the jobs table against writes and waits until the
//! publisher blocks on it, so every kill lands on a publish (and on the
//! worker's claims and acks) in flight, not on idle connections the pool
//! would quietly replace. Every publish answered Ok must run; one answered
//! Err may or may not; a task may run twice only if it started in the
//! second before a kill; both processes carry on by themselves.
//!
//! SIGKILL: a worker is killed mid-task and another finishes the task
//! after its 2 s lease, as its second delivery with no attempt charged.
//!
//! Without a server each test prints one `SKIP` line and passes, except
//! under `STEM_REQUIRE_SERVICES=1`, where it fails.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stem::adapters::postgres::{schema_name, sqlx};
use stem_tests::e2e_tasks::{ledger_noop, ledger_slow};
use stem_tests::ledger::{self, LEDGER_VAR};
use stem_tests::postgres::{DropSchema, namespace, server_up, url, url_with};
use stem_tests::process::Proc;

/// Prints a line the test's reader should see even when libtest captures
/// output.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn spawn_worker(url: &str, ledger: &Path, lease: &str, id: &str) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_e2e-worker"))
        .env("STEM_BROKER_URL", url)
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env_remove("STEM_NAMESPACE")
        .env(LEDGER_VAR, ledger)
        .env("STEM_LEASE", lease)
        .env("STEM_WORKER_ID", id)
        .env("STEM_QUEUES", "e2e,e2e_slow")
        .env("STEM_CONCURRENCY", "16")
        .env("STEM_POLL_INTERVAL", "500ms")
        .env("STEM_SHUTDOWN_GRACE", "5s")
        .stdout(Stdio::null())
        .spawn()
        .expect("worker starts");
    Proc(child)
}

fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("stem-pg-{name}-"))
        .tempdir()
        .expect("temp dir")
}

/// A pool of the test's own on the server (not in the namespace), for
/// looking at and interfering with the processes' connections.
async fn admin_pool() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url())
        .await
        .expect("admin connection")
}

/// Ends every server connection whose `application_name` is one of
/// `names`; how many it ended, and whether the connection named `busy`
/// was then mid-statement. To make sure a kill lands mid-publish (not on
/// an idle connection the pool would just replace), it first locks
/// `schema`'s jobs table against writes, waits (up to 5 s) until `busy`
/// waits on that lock, kills, then lets go.
async fn terminate(
    admin: &sqlx::PgPool,
    names: &[&str],
    busy: &str,
    schema: &str,
) -> (usize, bool) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut tx = admin.begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE \"{schema}\".jobs IN SHARE ROW EXCLUSIVE MODE"
    )))
    .execute(&mut *tx)
    .await
    .expect("lock the jobs table");
    let deadline = Instant::now() + Duration::from_secs(5);
    let blocked = loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(busy)
        .fetch_one(admin)
        .await
        .expect("pg_stat_activity");
        if n > 0 || Instant::now() > deadline {
            break n > 0;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
    )
    .bind(&names)
    .fetch_all(admin)
    .await
    .expect("pg_terminate_backend");
    tx.rollback().await.expect("unlock");
    (ended.into_iter().filter(|e| *e).count(), blocked)
}

/// How many tasks the publisher publishes in the connection-loss test.
const PUBLISH: u64 = 3000;
/// How long each of them sleeps.
const TASK_MILLIS: u64 = 2;
/// The worker's lease there: a task whose ack was lost runs again after it.
const LEASE: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_ended_three_times_lose_no_ok_task() {
    let test = "postgres_connections_ended_three_times_lose_no_ok_task";
    if !server_up(test) {
        return;
    }
    let ns = namespace("pgconn");
    let _schema = DropSchema {
        namespace: ns.clone(),
    };
    let dir = temp_dir("connloss");
    let ledger_path = dir.path().join("ledger.txt");
    let answers_path = dir.path().join("answers.txt");
    let suffix = stem::TaskId::new().as_uuid().simple().to_string();
    let (worker_app, publisher_app) = (format!("stemw_{suffix}"), format!("stemp_{suffix}"));
    let worker_url = url_with(&format!("namespace={ns}&application_name={worker_app}"));
    let publisher_url = url_with(&format!("namespace={ns}&application_name={publisher_app}"));
    let lease = format!("{}s", LEASE.as_secs());

    let mut worker = spawn_worker(&worker_url, &ledger_path, &lease, "conn-worker");
    let mut publisher = Proc(
        Command::new(env!("CARGO_BIN_EXE_e2e-publisher"))
            .args([PUBLISH.to_string(), TASK_MILLIS.to_string()])
            .env("STEM_BROKER_URL", &publisher_url)
            .env_remove("STEM_RESULT_BACKEND_URL")
            .env_remove("STEM_NAMESPACE")
            .env(LEDGER_VAR, &answers_path)
            .stdout(Stdio::null())
            .spawn()
            .expect("publisher starts"),
    );
    let admin = admin_pool().await;

    // Three times, once the publisher has answered a quarter, a half and
    // three quarters of its publishes: end both processes' connections.
    // A task may run twice only if it started in the second before a kill
    // (it was in flight: its ack may be lost with the connection): the
    // worker's ledger is sampled meanwhile to know where that second began.
    let answered = |p: &Path| ledger::read(p).len() as u64;
    let mut windows: Vec<(usize, usize)> = Vec::new();
    let mut ended = Vec::new();
    let mut mid_statement = 0;
    let mut last_kill = Instant::now();
    let mut samples: Vec<(Instant, usize)> = Vec::new();
    for quarter in 1..=3u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered(&answers_path) < PUBLISH * quarter / 4 {
            samples.push((Instant::now(), ledger::read(&ledger_path).len()));
            publisher.assert_running("the publisher, before all its publishes answered");
            worker.assert_running("the worker");
            assert!(
                Instant::now() < deadline,
                "the publisher answered only {} publishes in 60 s",
                answered(&answers_path)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second_ago = Instant::now() - Duration::from_secs(1);
        let before = samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= second_ago)
            .or(samples.first())
            .map_or(0, |(_, n)| *n);
        let n = terminate(
            &admin,
            &[&worker_app, &publisher_app],
            &publisher_app,
            &schema_name(&ns),
        )
        .await;
        last_kill = Instant::now();
        let after = ledger::read(&ledger_path).len();
        windows.push((before, after));
        ended.push(n.0);
        mid_statement += usize::from(n.1);
    }

    assert_eq!(
        mid_statement, 3,
        "every kill should land on a publish in flight (ended {ended:?})"
    );

    // The publisher finishes by itself.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = publisher.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the publisher did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "the publisher exited with {status}");
    let answers = ledger::read(&answers_path);
    assert_eq!(answers.len() as u64, PUBLISH, "one answer per publish");
    let ok: HashSet<String> = answers
        .iter()
        .filter(|e| e.event == "ok")
        .map(|e| e.key.clone())
        .collect();
    let err: HashSet<String> = answers
        .iter()
        .filter(|e| e.event == "err")
        .map(|e| e.key.clone())
        .collect();

    // Every Ok task runs; then the queue empties (a task whose ack was
    // lost runs again after its lease) and the lease passes once more so
    // a duplicate, if any, shows up before judging.
    let stem = stem::connect_with(&url_with(&format!("namespace={ns}")), None, "stem")
        .await
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = stem.stats("e2e_slow").await.expect("stats");
        let quiet = last_kill.elapsed() > LEASE + Duration::from_secs(1);
        if (st.ready, st.delayed, st.leased) == (0, 0, 0) && quiet {
            break;
        }
        if Instant::now() > deadline {
            worker.assert_running("the worker");
            panic!("the worker did not empty the queue in 60 s: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.assert_running("the worker, after the run");
    // Its LISTEN connection is back too (not left to the fallback poll).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE 'LISTEN %'",
        )
        .bind(&worker_app)
        .fetch_one(&admin)
        .await
        .expect("pg_stat_activity");
        if listening > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker has no LISTEN connection after the kills"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let entries = ledger::read(&ledger_path);
    let done = ledger::counts(&entries, "done");
    let missing: Vec<&String> = ok.iter().filter(|k| !done.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} Ok-published tasks never ran (a false Ok), e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let unknown: Vec<&String> = done
        .keys()
        .filter(|k| !ok.contains(*k) && !err.contains(*k))
        .collect();
    assert!(unknown.is_empty(), "ran but never published: {unknown:?}");
    // A task ran twice only if its first start fell in a kill's window.
    let mut first_start: HashMap<&str, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if e.event == "start" {
            first_start.entry(e.key.as_str()).or_insert(i);
        }
    }
    let twice: Vec<&String> = done
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    let bad_twice: Vec<&&String> = twice
        .iter()
        .filter(|k| {
            let at = first_start[k.as_str()];
            !windows.iter().any(|(b, a)| (*b..*a).contains(&at))
        })
        .collect();
    assert!(
        bad_twice.is_empty(),
        "tasks that ran twice though not in flight at a kill: {bad_twice:?} (windows {windows:?})"
    );
    let err_ran = err.iter().filter(|k| done.contains_key(*k)).count();
    say(&format!(
        "{test}: {PUBLISH} publishes: {} ok, {} err ({err_ran} of them ran anyway); \
         connections ended {ended:?} \
         ({mid_statement} of 3 times with a publish in flight); {} tasks ran, {} ran twice (all in flight at a kill)",
        ok.len(),
        err.len(),
        done.len(),
        twice.len(),
    ));
    worker.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sigkill_worker_task_runs_again_after_its_lease() {
    let test = "postgres_sigkill_worker_task_runs_again_after_its_lease";
    if !server_up(test) {
        return;
    }
    let ns = namespace("pgkill");
    let _schema = DropSchema {
        namespace: ns.clone(),
    };
    let dir = temp_dir("sigkill");
    let ledger_path = dir.path().join("ledger.txt");
    let url = url_with(&format!("namespace={ns}"));
    let stem = stem::connect_with(&url, None, "stem").await.unwrap();
    let worker_a = spawn_worker(&url, &ledger_path, "2s", "worker-a");
    let victim = ledger_slow::enqueue_on(&stem, "victim".to_owned(), 4_000)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first_pid = loop {
        let entries = ledger::read(&ledger_path);
        if let Some(e) = entries
            .iter()
            .find(|e| e.event == "start" && e.key == "victim")
        {
            break e.pid;
        }
        assert!(Instant::now() < deadline, "the victim task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first_pid, worker_a.pid());
    drop(worker_a); // SIGKILL mid-task
    let killed = Instant::now();

    // Work enqueued while no worker runs is kept too.
    let mut others = Vec::new();
    for n in 0..20 {
        others.push(ledger_noop::enqueue_on(&stem, n).await.unwrap());
    }
    let worker_b = spawn_worker(&url, &ledger_path, "5s", "worker-b");

    // While B runs the victim, its row says it is its second delivery and
    // that the lease expiry charged no attempt.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let entries = ledger::read(&ledger_path);
        if entries
            .iter()
            .any(|e| e.event == "start" && e.key == "victim" && e.pid == worker_b.pid())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never started the victim (A was killed {:.2?} ago, its lease was 2 s)",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken_over = killed.elapsed();
    let admin = admin_pool().await;
    let row: (i32, i32, i16) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT deliveries, attempt, state FROM \"{}\".jobs WHERE task_id = $1::uuid",
        schema_name(&ns)
    )))
    .bind(victim.id().to_string())
    .fetch_one(&admin)
    .await
    .expect("the victim's row, while B runs it");
    assert_eq!(row, (2, 0, 2), "(deliveries, attempt, state=leased)");

    assert_eq!(
        victim.wait(Duration::from_secs(60)).await.unwrap(),
        "victim"
    );
    for (n, h) in others.into_iter().enumerate() {
        assert_eq!(h.wait(Duration::from_secs(30)).await.unwrap(), 2 * n as u64);
    }
    let entries = ledger::read(&ledger_path);
    let starts: Vec<u32> = entries
        .iter()
        .filter(|e| e.event == "start" && e.key == "victim")
        .map(|e| e.pid)
        .collect();
    assert_eq!(
        starts,
        vec![first_pid, worker_b.pid()],
        "ran again on the other worker"
    );
    let done: Vec<u32> = entries
        .iter()
        .filter(|e| e.event == "done" && e.key == "victim")
        .map(|e| e.pid)
        .collect();
    assert_eq!(done, vec![worker_b.pid()], "finished once, by B");
    let rec = stem
        .backend()
        .unwrap()
        .get(victim.id())
        .await
        .unwrap()
        .unwrap();
    assert!(rec.state.is_terminal(), "{rec:?}");
    assert_eq!(rec.worker_id.as_deref(), Some("worker-b"));
    // A lease expiry charges no attempt (CONTRACT.md): 2 deliveries, 1 attempt.
    assert_eq!(rec.attempts, 1, "{rec:?}");
    let gone: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".jobs",
        schema_name(&ns)
    )))
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(gone, 0, "no job row left");
    say(&format!(
        "{test}: B started the victim {taken_over:.2?} after A's SIGKILL (lease 2 s): \
         deliveries 2, attempt 0 in its row; result recorded by worker-b with 1 attempt"
    ));
    worker_b.terminate();
}
