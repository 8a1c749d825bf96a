//! Scenario 3, server outage: one worker process (4 slots, lease 3 s)
//! drains a backlog of 300 ledger tasks (5 to 40 ms each) while its server
//! goes away under it, and the test publishes during and after the outage
//! with the same client it published the backlog with.
//!
//! - `redis_outage`: a `redis-server` of the test's own (AOF on,
//!   `appendfsync always`) is killed with SIGKILL and restarted from its
//!   AOF on the same port and directory.
//! - `redis_outage_result_backend`: the worker's result backend is out
//!   while its broker is up: a Redis broker (the shared server) with
//!   results in a SQLite file that another connection holds locked for
//!   6 s, past the 1 s busy timeout of the worker and the producer (lease
//!   10 s, longer than the worker's record retries).
//! - `postgres_outage_terminated`: every connection of the worker and of
//!   the producer (found by `application_name`) is ended with
//!   `pg_terminate_backend`, three times, on the shared server, each time
//!   while the jobs table is locked against writes and three publishes
//!   and a claim or ack of the worker wait on it, so the kills land on
//!   statements in flight.
//! - `postgres_outage_restart`: a cluster of the test's own (`initdb` in a
//!   temp dir, a free port) is crashed (`pg_ctl stop -m immediate`) and
//!   started again (crash recovery from its WAL) 10-plus s later.
//! - `sqlite_outage`: another connection holds `BEGIN EXCLUSIVE` on the
//!   file for 3 s, inside the busy timeout (10 s by default) of the worker
//!   and the producer.
//! - `sqlite_outage_past_busy_timeout`: the same lock for 6 s while the
//!   worker and the producer wait 1 s at most (`?busy_timeout=1s`).
//!
//! Pass: the worker process never exits and finishes the work by itself,
//! the producer publishes again by itself; every publish made during the
//! outage answers within a bound (no hang): with Redis and with a
//! Postgres or SQLite outage longer than the client waits, an error
//! (`BrokerError::Unavailable`); within the wait, `Ok` once the server is
//! back, and then the task is stored. Every task whose publish answered
//! `Ok` is in the ledger as finished and has a `Succeeded` record with its
//! key. A task ran more than once only if the worker held it during the
//! outage (its first run started before the outage ended, or within
//! [`HELD_SLACK_MS`] after it: the prefetched deliveries start then);
//! tasks published after the outage ran exactly once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stem::adapters::postgres::sqlx;
use stem::adapters::sqlite::{SqliteBroker, SqliteOptions, rusqlite};
use stem::{BrokerError, StemError, TaskId, TaskState};
use stem_tests::e2e_tasks::ledger_fault;
use stem_tests::ledger::{self, LEDGER_VAR, Run};
use stem_tests::postgres::{self, DropSchema};
use stem_tests::process::Proc;
use stem_tests::redis_server::{RedisServer, free_port};

use crate::support::{DeleteRedisNamespace, QUEUE, Rng, Target, say};

/// The backlog.
const TASKS: u64 = 300;
/// Slots of the worker.
const CONCURRENCY: usize = 4;
/// The worker's lease: a delivery whose ack was lost runs again after it.
const LEASE: &str = "3s";
/// Keys finished before the fault is injected.
const DONE_BEFORE_FAULT: usize = 60;
/// Tasks published after the outage (each must run exactly once).
const AFTER: usize = 10;
/// How long a publish may take before the test calls it a hang.
const PUBLISH_BOUND: Duration = Duration::from_secs(20);
/// How long the producer may take to publish again after the outage.
const RECOVER_BOUND: Duration = Duration::from_secs(30);
/// From the end of the outage to every result recorded and the queue empty.
const DRAIN_BOUND: Duration = Duration::from_secs(60);
/// Deliveries the worker held when the outage ended but had not started
/// (prefetched, waiting for a slot) start within this much after it; a
/// run that started later is not one the outage could have cut.
const HELD_SLACK_MS: u64 = 1_000;

// ---------------------------------------------------------------- Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage() {
    let test = "redis_outage";
    if !on_path(test, &["redis-server", "redis-cli"]) {
        return;
    }
    let dir = temp_dir("redis");
    let server_dir = dir.path().join("redis");
    std::fs::create_dir(&server_dir).expect("redis dir");
    // Declared first: dropped (killed) after the worker.
    let mut server = RedisServer::start(
        &server_dir,
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let target = Target {
        url: server.url(),
        namespace: postgres::namespace("faults_outage"),
    };
    let mut d = Drain::start(test, &target, &target.url, dir.path()).await;
    d.wait_done(DONE_BEFORE_FAULT).await;

    server.kill();
    let fault_at = Instant::now();
    let fault_at_ms = ledger::unix_ms();
    // Publishes while Redis is down, 150 ms apart, each bounded; the
    // server stays down until every one has answered.
    let gaps = d.publish_gaps("gap", 10, Duration::from_millis(150)).await;
    d.worker.assert_running("the worker, during the outage");
    server.restart();
    let outage = fault_at.elapsed();
    let healed_ms = ledger::unix_ms();

    let mut problems = Vec::new();
    for g in &gaps {
        match &g.answer {
            Err(StemError::Broker(BrokerError::Unavailable { .. })) => {}
            Err(e) => problems.push(format!("{}: answered {e} (not Unavailable)", g.key)),
            Ok(_) => problems.push(format!(
                "{}: answered Ok while Redis was down (a false Ok)",
                g.key
            )),
        }
    }
    d.take_gaps(&gaps);
    let after = d.publish_after(AFTER).await;
    let v = d.finish(healed_ms, fault_at_ms).await;
    say(&format!(
        "{test}: outage={:.1}s (redis-server SIGKILLed with {} done, restarted from its AOF, appendfsync always) \
         gap_publishes={} all_err={} err_in={} first_err={:?} | {after} | {v}",
        outage.as_secs_f64(),
        v.done_at_fault,
        gaps.len(),
        gaps.iter().all(|g| g.answer.is_err()),
        span(&gaps),
        gaps.iter()
            .find_map(|g| g.answer.as_ref().err().map(ToString::to_string)),
    ));
    v.assert_clean(test, &problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_result_backend() {
    let test = "redis_outage_result_backend";
    if !crate::support::redis_up(test) {
        return;
    }
    let ns = postgres::namespace("faults_outage");
    let _delete = DeleteRedisNamespace {
        namespace: ns.clone(),
    };
    let dir = temp_dir("redis");
    let db = dir.path().join("results.db");
    let backend = format!("sqlite://{}?busy_timeout=1s", db.display());
    let target = Target {
        url: crate::support::redis_url(),
        namespace: ns,
    };
    let mut d = Drain::start_with(
        test,
        &target,
        Some(&backend),
        "10s",
        &target.url,
        dir.path(),
    )
    .await;
    d.wait_done(DONE_BEFORE_FAULT).await;

    // The result backend is out (locked past its busy timeout) for 6 s;
    // the broker is up: tasks run, their results cannot be written.
    let lock = Lock::take(&db, Duration::from_secs(6));
    let fault_at_ms = ledger::unix_ms();
    let gaps = d.publish_gaps("gap", 5, Duration::from_millis(500)).await;
    d.worker.assert_running("the worker, during the outage");
    let released = lock.release();
    let healed_ms = ledger::unix_ms();
    let mut problems = Vec::new();
    for g in &gaps {
        if let Err(e) = &g.answer {
            problems.push(format!("{}: answered {e} though the broker was up", g.key));
        }
    }
    d.take_gaps(&gaps);
    let after = d.publish_after(AFTER).await;
    let v = d.finish(healed_ms, fault_at_ms).await;
    say(&format!(
        "{test}: Redis broker (shared server), SQLite result backend locked (BEGIN EXCLUSIVE) {:.1}s past its busy timeout of 1s \
         with {} done; gap_publishes={} ok={} | {after} | {v}",
        released.held.as_secs_f64(),
        v.done_at_fault,
        gaps.len(),
        gaps.iter().filter(|g| g.answer.is_ok()).count(),
    ));
    v.assert_clean(test, &problems);
}

// ------------------------------------------------------------- Postgres

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_terminated() {
    let test = "postgres_outage_terminated";
    if !postgres::server_up(test) {
        return;
    }
    let ns = postgres::namespace("faults_outage");
    let _drop_schema = DropSchema {
        namespace: ns.clone(),
    };
    let dir = temp_dir("postgres");
    let suffix = TaskId::new().as_uuid().simple().to_string();
    let (worker_app, producer_app) = (format!("stemw_{suffix}"), format!("stemp_{suffix}"));
    let target = Target {
        url: postgres::url_with(&format!("namespace={ns}&application_name={worker_app}")),
        namespace: ns.clone(),
    };
    let producer_url =
        postgres::url_with(&format!("namespace={ns}&application_name={producer_app}"));
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&postgres::url())
        .await
        .expect("admin connection");
    let schema = stem::adapters::postgres::schema_name(&ns);

    let mut d = Drain::start(test, &target, &producer_url, dir.path()).await;
    let fault_at_ms = ledger::unix_ms();
    let mut kills = Vec::new();
    let mut gaps = Vec::new();
    for round in 1..=3 {
        d.wait_done(DONE_BEFORE_FAULT * round).await;
        // So that the kill lands on statements in flight (not only on
        // idle connections a pool replaces quietly): lock the jobs table
        // against writes, start three publishes, and wait until they and
        // the worker's claims or acks wait on the lock.
        let mut tx = admin.begin().await.expect("begin");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE \"{schema}\".jobs IN SHARE ROW EXCLUSIVE MODE"
        )))
        .execute(&mut *tx)
        .await
        .expect("lock the jobs table");
        let publishes = {
            let stem = d.stem.clone();
            let prefix = format!("gap{round}_");
            tokio::spawn(async move {
                publish_gaps_on(&stem, &prefix, 3, Duration::from_millis(0)).await
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let waiting = loop {
            let waiting: Vec<String> = sqlx::query_scalar(
                "SELECT application_name FROM pg_stat_activity \
                 WHERE application_name = ANY($1) AND wait_event_type = 'Lock'",
            )
            .bind([worker_app.clone(), producer_app.clone()])
            .fetch_all(&admin)
            .await
            .expect("pg_stat_activity");
            let w = waiting.iter().filter(|a| **a == worker_app).count();
            let p = waiting.len() - w;
            if (w > 0 && p >= 3) || Instant::now() > deadline {
                break (w, p);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let ended: Vec<(bool, String)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid), application_name FROM pg_stat_activity \
             WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
        )
        .bind([worker_app.clone(), producer_app.clone()])
        .fetch_all(&admin)
        .await
        .expect("pg_terminate_backend");
        tx.rollback().await.expect("unlock");
        let worker_ended = ended
            .iter()
            .filter(|(ok, a)| *ok && *a == worker_app)
            .count();
        kills.push(format!(
            "ended {} ({worker_ended} the worker's), of them waiting mid-statement: {} the worker's, {} publishes",
            ended.len(),
            waiting.0,
            waiting.1
        ));
        assert!(
            waiting.0 > 0 && waiting.1 == 3,
            "{test}: round {round}: the worker ({}) and the 3 publishes ({}) were not all caught mid-statement",
            waiting.0,
            waiting.1
        );
        gaps.extend(publishes.await.expect("publishes"));
    }
    let healed_ms = ledger::unix_ms();
    let mut problems = Vec::new();
    for g in &gaps {
        if let Err(e) = &g.answer
            && !matches!(e, StemError::Broker(BrokerError::Unavailable { .. }))
        {
            problems.push(format!("{}: answered {e} (not Unavailable)", g.key));
        }
    }
    let gap_ok = gaps.iter().filter(|g| g.answer.is_ok()).count();
    d.take_gaps(&gaps);
    let after = d.publish_after(AFTER).await;
    let v = d.finish(healed_ms, fault_at_ms).await;
    say(&format!(
        "{test}: {kills:?} \
         gap_publishes={} ok={gap_ok} err={} answered_in={} first_err={:?} | {after} | {v}",
        gaps.len(),
        gaps.len() - gap_ok,
        span(&gaps),
        gaps.iter()
            .find_map(|g| g.answer.as_ref().err().map(ToString::to_string)),
    ));
    v.assert_clean(test, &problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_restart() {
    let test = "postgres_outage_restart";
    let Some(mut cluster) = PgCluster::init(test) else {
        return;
    };
    cluster.start();
    let dir = temp_dir("postgres");
    let target = Target {
        url: cluster.url("namespace=outage"),
        namespace: String::from("outage"),
    };
    let mut d = Drain::start(test, &target, &target.url, dir.path()).await;
    d.wait_done(DONE_BEFORE_FAULT).await;

    cluster.crash();
    let fault_at = Instant::now();
    let fault_at_ms = ledger::unix_ms();
    // Publishes while the server is down: each waits for a connection
    // up to the pool's acquire timeout (10 s), then fails.
    let early = d.publish_gaps("gap", 3, Duration::from_millis(150)).await;
    d.worker.assert_running("the worker, during the outage");
    // Publishes started just before the restart wait through it.
    let late = {
        let stem = d.stem.clone();
        tokio::spawn(
            async move { publish_gaps_on(&stem, "late", 3, Duration::from_millis(50)).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.start();
    let outage = fault_at.elapsed();
    let healed_ms = ledger::unix_ms();
    let late = late.await.expect("late publishes");

    let mut problems = Vec::new();
    for g in &early {
        match &g.answer {
            Err(StemError::Broker(BrokerError::Unavailable { .. })) => {}
            Err(e) => problems.push(format!("{}: answered {e} (not Unavailable)", g.key)),
            Ok(_) => problems.push(format!(
                "{}: answered Ok though the server was down for all of it",
                g.key
            )),
        }
    }
    for g in &late {
        if let Err(e) = &g.answer {
            problems.push(format!(
                "{}: answered {e} though the server came back within its wait",
                g.key
            ));
        }
    }
    d.take_gaps(&early);
    d.take_gaps(&late);
    let after = d.publish_after(AFTER).await;
    let v = d.finish(healed_ms, fault_at_ms).await;
    say(&format!(
        "{test}: outage={:.1}s (own cluster crashed with pg_ctl stop -m immediate with {} done, restarted: crash recovery) \
         publishes_down={} err={} err_in={} first_err={:?} publishes_across_restart={} ok={} ok_in={} | {after} | {v}",
        outage.as_secs_f64(),
        v.done_at_fault,
        early.len(),
        early.iter().filter(|g| g.answer.is_err()).count(),
        span(&early),
        early
            .iter()
            .find_map(|g| g.answer.as_ref().err().map(ToString::to_string)),
        late.len(),
        late.iter().filter(|g| g.answer.is_ok()).count(),
        span(&late),
    ));
    v.assert_clean(test, &problems);
}

/// A PostgreSQL cluster of one test: `initdb` into a temp dir the
/// `postgres` user owns (initdb refuses root), trust authentication, a
/// free loopback port; stopped (immediately) when dropped.
struct PgCluster {
    /// Holds the data directory and the socket.
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `runuser -u postgres --` in front of each command when root.
    as_postgres: bool,
    running: bool,
}

impl PgCluster {
    /// `initdb`, or `None` after a SKIP line when the server binaries are
    /// missing (a failure under `STEM_REQUIRE_SERVICES=1`).
    fn init(test: &str) -> Option<Self> {
        let Some(bin) = pg_bindir().filter(|b| b.join("initdb").exists()) else {
            let msg = format!("SKIP {test}: no PostgreSQL server binaries (initdb, pg_ctl)");
            assert!(
                std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{msg}, and STEM_REQUIRE_SERVICES=1 requires them"
            );
            say(&msg);
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("stem-faults-pgcluster-")
            .tempdir()
            .expect("temp dir");
        let root = output("id", &["-u"]).trim() == "0";
        if root {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(status.success(), "chown postgres {}", dir.path().display());
        }
        let c = Self {
            dir,
            bin,
            port: free_port(),
            as_postgres: root,
            running: false,
        };
        let data = c.data();
        let out = c
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(c)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, prog: &str) -> Command {
        let path = self.bin.join(prog);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    fn start(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-o", &opts, "-w", "-t", "60", "-l"])
            .arg(self.dir.path().join("server.log"))
            .arg("start")
            .stdout(Stdio::null())
            .output()
            .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}; log: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
        self.running = true;
    }

    /// `pg_ctl stop -m immediate`: the server quits without a checkpoint,
    /// and the next start recovers from the WAL, as after a crash.
    fn crash(&mut self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }

    fn url(&self, options: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{options}",
            self.port
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Where `initdb` and `pg_ctl` are: `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/*/bin`.
fn pg_bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Some(p);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

// --------------------------------------------------------------- SQLite

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outage() {
    let test = "sqlite_outage";
    let dir = temp_dir("sqlite");
    let db = dir.path().join("stem.db");
    let target = Target {
        url: format!("sqlite://{}", db.display()),
        namespace: String::from("stem"),
    };
    let mut d = Drain::start(test, &target, &target.url, dir.path()).await;
    // A second producer on the file that waits 300 ms at most for the
    // lock, with connections of its own (as another process would have:
    // clients of one file in one process share its first opener's).
    let impatient = SqliteBroker::open_unshared(
        &db,
        SqliteOptions {
            namespace: target.namespace.clone(),
            busy_timeout: Duration::from_millis(300),
            ..SqliteOptions::default()
        },
    )
    .await
    .expect("second client");
    let impatient = stem::Stem::new(Arc::new(impatient), None);
    d.wait_done(DONE_BEFORE_FAULT).await;

    let hold = Duration::from_secs(3);
    let lock = Lock::take(&db, hold);
    let fault_at_ms = ledger::unix_ms();
    // Inside the default busy timeout (10 s): these wait for the lock.
    let patient = {
        let stem = d.stem.clone();
        tokio::spawn(
            async move { publish_gaps_on(&stem, "gap", 5, Duration::from_millis(200)).await },
        )
    };
    // Past its busy timeout: an error, typed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let impatient_gaps = publish_gaps_on(&impatient, "fast", 3, Duration::from_millis(100)).await;
    let released = lock.release();
    let healed_ms = ledger::unix_ms();
    let patient = patient.await.expect("patient publishes");

    let mut problems = Vec::new();
    for g in &patient {
        match &g.answer {
            Ok(_) if g.answered_at >= released.before_commit => {}
            Ok(_) => problems.push(format!(
                "{}: answered Ok while the file was still locked",
                g.key
            )),
            Err(e) => problems.push(format!(
                "{}: answered {e} though the lock ({hold:?}) was inside the busy timeout",
                g.key
            )),
        }
    }
    for g in &impatient_gaps {
        match &g.answer {
            Err(StemError::Broker(BrokerError::Unavailable { reason, .. }))
                if reason.contains("locked") => {}
            Err(e) => problems.push(format!("{}: answered {e} (not Unavailable, locked)", g.key)),
            Ok(_) => problems.push(format!(
                "{}: answered Ok though the file was locked past its busy timeout",
                g.key
            )),
        }
        if g.answered_at >= released.before_commit {
            problems.push(format!(
                "{}: answered only after the lock was released",
                g.key
            ));
        }
    }
    d.take_gaps(&patient);
    d.take_gaps(&impatient_gaps);
    let after = d.publish_after(AFTER).await;
    let v = d.finish(healed_ms, fault_at_ms).await;
    say(&format!(
        "{test}: BEGIN EXCLUSIVE held {:.1}s (taken in {:.2}s, with {} done) \
         publishes_busy_timeout_10s={} ok={} answered_in={} publishes_busy_timeout_300ms={} err={} err_in={} first_err={:?} | {after} | {v}",
        released.held.as_secs_f64(),
        released.waited.as_secs_f64(),
        v.done_at_fault,
        patient.len(),
        patient.iter().filter(|g| g.answer.is_ok()).count(),
        span(&patient),
        impatient_gaps.len(),
        impatient_gaps.iter().filter(|g| g.answer.is_err()).count(),
        span(&impatient_gaps),
        impatient_gaps
            .iter()
            .find_map(|g| g.answer.as_ref().err().map(ToString::to_string)),
    ));
    v.assert_clean(test, &problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outage_past_busy_timeout() {
    let test = "sqlite_outage_past_busy_timeout";
    let dir = temp_dir("sqlite");
    let db = dir.path().join("stem.db");
    let target = Target {
        url: format!("sqlite://{}?busy_timeout=1s", db.display()),
        namespace: String::from("stem"),
    };
    let mut d = Drain::start(test, &target, &target.url, dir.path()).await;
    d.wait_done(DONE_BEFORE_FAULT).await;

    let hold = Duration::from_secs(6);
    let lock = Lock::take(&db, hold);
    let fault_at_ms = ledger::unix_ms();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gaps = d.publish_gaps("gap", 5, Duration::from_millis(300)).await;
    d.worker.assert_running("the worker, during the lock");
    let released = lock.release();
    let healed_ms = ledger::unix_ms();

    let mut problems = Vec::new();
    for g in &gaps {
        match &g.answer {
            Err(StemError::Broker(BrokerError::Unavailable { reason, .. }))
                if reason.contains("locked") => {}
            Err(e) => problems.push(format!("{}: answered {e} (not Unavailable, locked)", g.key)),
            Ok(_) => problems.push(format!(
                "{}: answered Ok though the file was locked past the busy timeout",
                g.key
            )),
        }
    }
    d.take_gaps(&gaps);
    let after = d.publish_after(AFTER).await;
    let v = d.finish(healed_ms, fault_at_ms).await;
    say(&format!(
        "{test}: BEGIN EXCLUSIVE held {:.1}s (taken in {:.2}s, with {} done), worker and producer busy_timeout=1s \
         gap_publishes={} err={} err_in={} first_err={:?} | {after} | {v}",
        released.held.as_secs_f64(),
        released.waited.as_secs_f64(),
        v.done_at_fault,
        gaps.len(),
        gaps.iter().filter(|g| g.answer.is_err()).count(),
        span(&gaps),
        gaps.iter()
            .find_map(|g| g.answer.as_ref().err().map(ToString::to_string)),
    ));
    v.assert_clean(test, &problems);
}

/// Another writer on the SQLite file: a connection of the test's own that
/// holds `BEGIN EXCLUSIVE` on a thread for a while.
struct Lock {
    thread: std::thread::JoinHandle<Released>,
}

/// How the lock went.
struct Released {
    /// How long taking it took (it waits for the worker's transaction).
    waited: Duration,
    /// How long it was held.
    held: Duration,
    /// Just before `COMMIT`: nothing else could have written before this.
    before_commit: Instant,
}

impl Lock {
    /// Takes the lock (waiting up to 10 s for it), and holds it for
    /// `hold` on a thread; returns once it is taken.
    fn take(db: &Path, hold: Duration) -> Self {
        let (taken_tx, taken_rx) = std::sync::mpsc::channel();
        let db = db.to_owned();
        let thread = std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(&db).expect("lock connection");
            conn.busy_timeout(Duration::from_secs(10))
                .expect("busy timeout");
            let begun = Instant::now();
            conn.execute_batch("BEGIN EXCLUSIVE")
                .expect("BEGIN EXCLUSIVE");
            let waited = begun.elapsed();
            let taken = Instant::now();
            let _ = taken_tx.send(());
            std::thread::sleep(hold);
            let before_commit = Instant::now();
            conn.execute_batch("COMMIT").expect("COMMIT");
            Released {
                waited,
                held: taken.elapsed(),
                before_commit,
            }
        });
        taken_rx
            .recv_timeout(Duration::from_secs(15))
            .expect("the lock is taken within 15 s");
        Self { thread }
    }

    /// Waits for the release.
    fn release(self) -> Released {
        self.thread.join().expect("lock thread")
    }
}

// ------------------------------------------------------ the common drain

/// One publish made during the outage.
struct Gap {
    key: String,
    answer: Result<TaskId, StemError>,
    took: Duration,
    answered_at: Instant,
}

/// `count` publishes of `<prefix><i>` on `stem`, started `every` apart
/// without waiting for each other, each bounded by [`PUBLISH_BOUND`].
async fn publish_gaps_on(stem: &stem::Stem, prefix: &str, count: u32, every: Duration) -> Vec<Gap> {
    futures::future::join_all((0..count).map(|i| {
        let key = format!("{prefix}{i}");
        async move {
            tokio::time::sleep(every * i).await;
            let begun = Instant::now();
            let answer = tokio::time::timeout(
                PUBLISH_BOUND,
                ledger_fault::enqueue_on(stem, key.clone(), 5),
            )
            .await
            .unwrap_or_else(|_| {
                panic!("publish {key} hung for {PUBLISH_BOUND:?} during the outage")
            })
            .map(|h| h.id());
            Gap {
                key,
                answer,
                took: begun.elapsed(),
                answered_at: Instant::now(),
            }
        }
    }))
    .await
}

/// `fastest..slowest` answer time of `gaps`.
fn span(gaps: &[Gap]) -> String {
    let min = gaps.iter().map(|g| g.took).min().unwrap_or_default();
    let max = gaps.iter().map(|g| g.took).max().unwrap_or_default();
    format!("{:.2}..{:.2}s", min.as_secs_f64(), max.as_secs_f64())
}

/// A worker process draining a backlog, and what the test published.
struct Drain {
    test: String,
    seed: u64,
    stem: stem::Stem,
    ledger_path: PathBuf,
    log_path: PathBuf,
    report_path: PathBuf,
    worker: Proc,
    /// Every key whose publish answered `Ok`, with its id.
    expected: BTreeMap<String, TaskId>,
    /// Keys published after the outage: each runs exactly once.
    after: HashSet<String>,
    /// Keys whose publish answered an error.
    refused: HashSet<String>,
    /// Keys finished when the fault was injected.
    done_at_fault: usize,
}

impl Drain {
    /// Publishes the backlog on `producer_url` and starts the worker on
    /// `target`; the ledger and the worker's output go to `dir`.
    async fn start(test: &str, target: &Target, producer_url: &str, dir: &Path) -> Self {
        Self::start_with(test, target, None, LEASE, producer_url, dir).await
    }

    /// [`Self::start`] with the results in `backend` (producer and worker)
    /// and the worker's `lease`.
    async fn start_with(
        test: &str,
        target: &Target,
        backend: Option<&str>,
        lease: &str,
        producer_url: &str,
        dir: &Path,
    ) -> Self {
        let mut rng = Rng::new();
        let seed = rng.seed();
        let stem = stem::connect_with(producer_url, backend, &target.namespace)
            .await
            .expect("client connects");
        let mut expected = BTreeMap::new();
        let keys: Vec<u64> = (0..TASKS).collect();
        for chunk in keys.chunks(100) {
            let args: Vec<ledger_fault::Args> = chunk
                .iter()
                .map(|n| ledger_fault::Args {
                    key: format!("k{n}"),
                    millis: rng.range(5, 40),
                })
                .collect();
            let handles = ledger_fault::with()
                .on(&stem)
                .enqueue_many(args)
                .await
                .expect("enqueue_many");
            for (n, h) in chunk.iter().zip(handles) {
                expected.insert(format!("k{n}"), h.id());
            }
        }
        let ledger_path = dir.join("ledger.txt");
        let log_path = dir.join("worker-stderr.txt");
        let report_path = dir.join("worker-stdout.txt");
        let worker = spawn_worker_logged(
            target,
            backend,
            lease,
            &ledger_path,
            &log_path,
            &report_path,
        );
        Self {
            test: test.to_owned(),
            seed,
            stem,
            ledger_path,
            log_path,
            report_path,
            worker,
            expected,
            after: HashSet::new(),
            refused: HashSet::new(),
            done_at_fault: 0,
        }
    }

    /// Waits until `n` keys are finished in the ledger (the worker alive).
    async fn wait_done(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let done = done_keys(&ledger::read_runs(&self.ledger_path));
            if done >= n {
                if self.done_at_fault == 0 {
                    self.done_at_fault = done;
                }
                return;
            }
            self.worker.assert_running("the worker, before the fault");
            assert!(
                Instant::now() < deadline,
                "{}: only {done} of {n} tasks finished in 30 s",
                self.test
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// [`publish_gaps_on`] on the producer.
    async fn publish_gaps(&self, prefix: &str, count: u32, every: Duration) -> Vec<Gap> {
        publish_gaps_on(&self.stem, prefix, count, every).await
    }

    /// Notes what the outage publishes answered: `Ok` ones must run.
    fn take_gaps(&mut self, gaps: &[Gap]) {
        for g in gaps {
            match &g.answer {
                Ok(id) => {
                    self.expected.insert(g.key.clone(), *id);
                }
                Err(_) => {
                    self.refused.insert(g.key.clone());
                }
            }
        }
    }

    /// After the outage, `count` publishes on the same client, each tried
    /// again (50 ms apart) while it fails, for up to [`RECOVER_BOUND`]:
    /// the producer must recover by itself. Says how it went.
    async fn publish_after(&mut self, count: usize) -> String {
        let begun = Instant::now();
        let mut retries = 0;
        let mut first_ok = None;
        let mut last_err = None;
        for i in 0..count {
            let key = format!("after{i}");
            let id = loop {
                let r = tokio::time::timeout(
                    PUBLISH_BOUND,
                    ledger_fault::enqueue_on(&self.stem, key.clone(), 5),
                )
                .await
                .unwrap_or_else(|_| panic!("{}: publish {key} hung after the outage", self.test));
                match r {
                    Ok(h) => break h.id(),
                    Err(e) => {
                        retries += 1;
                        assert!(
                            begun.elapsed() < RECOVER_BOUND,
                            "{}: the producer did not publish again within {RECOVER_BOUND:?}: {e}",
                            self.test
                        );
                        last_err = Some(e.to_string());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            first_ok.get_or_insert_with(|| begun.elapsed());
            self.expected.insert(key.clone(), id);
            self.after.insert(key);
        }
        format!(
            "after: {count} published, first Ok in {:.2}s, {retries} errors before (last {last_err:?})",
            first_ok.unwrap_or_default().as_secs_f64()
        )
    }

    /// Waits until every `Ok` task finished and the queue is empty (a
    /// delivery whose ack was lost has run again), stops the worker
    /// (SIGTERM, exit 0), and checks the ledger and the records.
    /// `healed_ms`: when the outage ended; `fault_ms`: when it began.
    async fn finish(mut self, healed_ms: u64, fault_ms: u64) -> Verdict {
        let healed = Instant::now();
        loop {
            let runs = ledger::read_runs(&self.ledger_path);
            let done: HashSet<&str> = runs
                .iter()
                .filter(|r| r.event == "done")
                .map(|r| r.key.as_str())
                .collect();
            let missing = self
                .expected
                .keys()
                .filter(|k| !done.contains(k.as_str()))
                .count();
            let st = self.stem.stats(QUEUE).await;
            let empty = st
                .as_ref()
                .is_ok_and(|s| (s.ready, s.delayed, s.leased) == (0, 0, 0));
            if missing == 0 && empty {
                break;
            }
            self.worker.assert_running("the worker, after the outage");
            assert!(
                healed.elapsed() < DRAIN_BOUND,
                "{}: {missing} Ok-published tasks not finished and queue {st:?} {DRAIN_BOUND:?} after the outage \
                 (the worker did not recover, or an Ok publish was lost); worker log tail: {}",
                self.test,
                tail(&self.log_path)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drained = healed.elapsed();
        self.worker.terminate();

        let runs = ledger::read_runs(&self.ledger_path);
        let mut v = check(
            &runs,
            &self.expected,
            &self.after,
            &self.refused,
            healed_ms,
            fault_ms,
        );
        v.done_at_fault = self.done_at_fault;
        v.seed = self.seed;
        v.drained = drained;
        let backend = self.stem.backend().expect("a result backend");
        for (key, id) in &self.expected {
            // A client's first call on a connection the outage broke may
            // fail once while it reconnects: counted, and tried again.
            let mut got = backend.get(*id).await;
            for _ in 0..5 {
                let Err(e) = &got else { break };
                v.read_errors.push(e.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
                got = backend.get(*id).await;
            }
            match got {
                Ok(Some(rec)) => match &rec.state {
                    TaskState::Succeeded { result } if result.get() == format!("\"{key}\"") => {
                        v.recorded += 1;
                    }
                    other => v.problems.push(format!("{key}: record {other:?}")),
                },
                Ok(None) => v.problems.push(format!("{key}: no record")),
                Err(e) => v.problems.push(format!("{key}: record not read: {e}")),
            }
        }
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        for (what, needle) in [
            ("fetch_failed", "fetch failed"),
            ("settle_failed", "could not settle"),
            ("record_failed", "could not record"),
            ("lease_lost", "lease lost"),
        ] {
            v.log.push((what, log.matches(needle).count()));
        }
        v.report = std::fs::read_to_string(&self.report_path)
            .unwrap_or_default()
            .trim()
            .to_owned();
        v
    }
}

/// How many keys have a `done`.
fn done_keys(runs: &[Run]) -> usize {
    runs.iter()
        .filter(|r| r.event == "done")
        .map(|r| r.key.as_str())
        .collect::<HashSet<_>>()
        .len()
}

/// The last lines of the worker's log.
fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// What the ledger, the records and the worker say.
#[derive(Default)]
struct Verdict {
    /// The backlog's durations came from this seed.
    seed: u64,
    ok_published: usize,
    finished: usize,
    recorded: usize,
    runs: usize,
    ran_twice: usize,
    max_runs: usize,
    /// Publishes answered with an error whose task ran anyway (it was
    /// stored; the answer was lost).
    refused_ran: usize,
    done_at_fault: usize,
    drained: Duration,
    /// Errors reading the records back (the test's client), tried again.
    read_errors: Vec<String>,
    /// Worker log lines, by what they say.
    log: Vec<(&'static str, usize)>,
    report: String,
    problems: Vec<String>,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed={} ok_published={} finished={} recorded={} runs={} ran_twice={} max_runs={} refused_ran={} \
             record_read_errors={:?} drained_after_outage={:.1}s worker_log={:?} worker_stdout={:?}",
            self.seed,
            self.ok_published,
            self.finished,
            self.recorded,
            self.runs,
            self.ran_twice,
            self.max_runs,
            self.refused_ran,
            self.read_errors,
            self.drained.as_secs_f64(),
            self.log,
            self.report,
        )
    }
}

impl Verdict {
    /// Fails on any problem found here or by the caller.
    fn assert_clean(&self, test: &str, more: &[String]) {
        let all: Vec<&String> = more.iter().chain(&self.problems).collect();
        assert!(
            all.is_empty(),
            "{test}: {} problems, first: {:?}",
            all.len(),
            &all[..all.len().min(10)]
        );
        assert_eq!(self.finished, self.ok_published, "{test}");
        assert_eq!(self.recorded, self.ok_published, "{test}");
    }
}

/// Checks the ledger: every `Ok` key finished; nothing ran that was not
/// published; a key ran twice only if the worker held it during the
/// outage; `after` keys ran once.
fn check(
    runs: &[Run],
    expected: &BTreeMap<String, TaskId>,
    after: &HashSet<String>,
    refused: &HashSet<String>,
    healed_ms: u64,
    fault_ms: u64,
) -> Verdict {
    let mut v = Verdict {
        ok_published: expected.len(),
        ..Verdict::default()
    };
    // key -> (start times, done count)
    let mut by_key: HashMap<&str, (Vec<u64>, usize)> = HashMap::new();
    for r in runs {
        let e = by_key.entry(r.key.as_str()).or_default();
        match r.event.as_str() {
            "start" => e.0.push(r.at_ms),
            "done" => e.1 += 1,
            other => v.problems.push(format!("{}: unknown event {other}", r.key)),
        }
    }
    for (key, (starts, dones)) in &by_key {
        if !expected.contains_key(*key) {
            if refused.contains(*key) {
                v.refused_ran += 1;
            } else {
                v.problems
                    .push(format!("{key}: ran but was never published"));
            }
            continue;
        }
        v.runs += starts.len();
        v.max_runs = v.max_runs.max(starts.len());
        if *dones > starts.len() {
            v.problems
                .push(format!("{key}: {dones} done for {} starts", starts.len()));
        }
        if starts.len() > 1 {
            v.ran_twice += 1;
            let first = starts.iter().min().copied().unwrap_or_default();
            if after.contains(*key) {
                v.problems.push(format!(
                    "{key}: published after the outage, ran {} times",
                    starts.len()
                ));
            } else if first > healed_ms + HELD_SLACK_MS {
                v.problems.push(format!(
                    "{key}: ran {} times, the first {} ms after the outage ended: the outage \
                     cannot explain it (it began at {fault_ms}, ended at {healed_ms}; starts {starts:?})",
                    starts.len(),
                    first - healed_ms
                ));
            }
        }
    }
    for key in expected.keys() {
        match by_key.get(key.as_str()) {
            None => v.problems.push(format!("{key}: published Ok, never ran")),
            Some((_, 0)) => v
                .problems
                .push(format!("{key}: published Ok, never finished")),
            Some(_) => v.finished += 1,
        }
    }
    v
}

// ---------------------------------------------------------------- misc

/// An `e2e-worker` on `target`'s fault queue (4 slots, `lease`), its
/// results in `backend` (else in the broker's adapter), its warnings and
/// errors logged to `log` and its report line to `report`; killed
/// (SIGKILL) when dropped.
fn spawn_worker_logged(
    target: &Target,
    backend: Option<&str>,
    lease: &str,
    ledger: &Path,
    log: &Path,
    report: &Path,
) -> Proc {
    let id = format!("faults-{}", TaskId::new().as_uuid().simple());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-worker"));
    match backend {
        Some(url) => cmd.env("STEM_RESULT_BACKEND_URL", url),
        None => cmd.env_remove("STEM_RESULT_BACKEND_URL"),
    };
    let child = cmd
        .env("STEM_BROKER_URL", &target.url)
        .env("STEM_NAMESPACE", &target.namespace)
        .env(LEDGER_VAR, ledger)
        .env("STEM_LEASE", lease)
        .env("STEM_WORKER_ID", id)
        .env("STEM_QUEUES", QUEUE)
        .env("STEM_CONCURRENCY", CONCURRENCY.to_string())
        .env("STEM_POLL_INTERVAL", "50ms")
        .env("STEM_SHUTDOWN_GRACE", "5s")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::fs::File::create(report).expect("report file"),
        ))
        .stderr(Stdio::from(std::fs::File::create(log).expect("log file")))
        .spawn()
        .expect("worker starts");
    Proc(child)
}

fn temp_dir(adapter: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("stem-faults-outage-{adapter}-"))
        .tempdir()
        .expect("temp dir")
}

/// A command's stdout.
fn output(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether every one of `bins` runs (`--version`). When one does not,
/// prints a SKIP line and returns false, or fails under
/// `STEM_REQUIRE_SERVICES=1`.
fn on_path(test: &str, bins: &[&str]) -> bool {
    let missing: Vec<&str> = bins
        .iter()
        .copied()
        .filter(|bin| {
            !Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("SKIP {test}: {missing:?} not on PATH");
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{msg}, and STEM_REQUIRE_SERVICES=1 requires them"
    );
    say(&msg);
    false
}
