//! A 50,000-task backlog on Postgres: 45,000 ready across every priority
//! and 5,000 delayed by 1 to 3 s at the highest priority, published in
//! batches of 1,000 while no worker runs, then drained by one in-process
//! worker. Every task runs exactly once, no delayed task runs before it is
//! due, and the leading worker vacuums the jobs table the acks left full
//! of dead rows.
//!
//! Needs the server at `STEM_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); without one it prints a
//! SKIP line and passes, except under `STEM_REQUIRE_SERVICES=1`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use stem::adapters::postgres::{schema_name, sqlx};
use stem::worker::Worker;
use stem_tests::postgres::{DropSchema, namespace, server_up, url, url_with};

const READY: u64 = 45_000;
const DELAYED: u64 = 5_000;
const BATCH: u64 = 1_000;

/// seq -> (runs, first run in Unix ms).
fn ledger() -> &'static Mutex<HashMap<u64, (u32, i64)>> {
    static L: OnceLock<Mutex<HashMap<u64, (u32, i64)>>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Records one run of `seq`.
#[stem::task(queue = "backlog")]
async fn pg_backlog_task(seq: u64) {
    let now = now_ms();
    let mut l = ledger().lock().expect("ledger");
    let e = l.entry(seq).or_insert((0, now));
    e.0 += 1;
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn say(line: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
}

/// The jobs table's `(vacuum_count, autovacuum_count, n_dead_tup)`.
async fn vacuum_stats(admin: &sqlx::PgPool, schema: &str) -> (i64, i64, i64) {
    // A fresh snapshot each time: otherwise a transaction sees the
    // statistics as they were when it first read them.
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(admin)
        .await
        .expect("clear snapshot");
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT vacuum_count, autovacuum_count, n_dead_tup FROM pg_stat_user_tables \
         WHERE relid = '\"{schema}\".jobs'::regclass"
    )))
    .fetch_one(admin)
    .await
    .expect("pg_stat_user_tables")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backlog_of_50000_drains_exactly_once_and_never_early() {
    let test = "postgres_backlog_of_50000_drains_exactly_once_and_never_early";
    if !server_up(test) {
        return;
    }
    let ns = namespace("pgbacklog");
    let _schema = DropSchema {
        namespace: ns.clone(),
    };
    let schema = schema_name(&ns);
    let stem = stem::connect_with(&url_with(&format!("namespace={ns}")), None, &ns)
        .await
        .expect("connect");
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url())
        .await
        .expect("admin connection");

    // Publish while no worker runs: ready ones across priorities, then the
    // delayed ones, each delayed batch due at its own time in 1..3 s.
    let t0 = Instant::now();
    let mut due_ms: HashMap<u64, i64> = HashMap::new();
    let mut seq = 0;
    while seq < READY {
        let priority = u8::try_from((seq / BATCH) % 10).expect("priority");
        pg_backlog_task::with()
            .on(&stem)
            .priority(priority)
            .enqueue_many((seq..seq + BATCH).map(|s| pg_backlog_task::Args { seq: s }))
            .await
            .expect("enqueue_many");
        seq += BATCH;
    }
    while seq < READY + DELAYED {
        let delay = Duration::from_millis(1000 + (seq - READY) / BATCH * 500);
        let published = now_ms();
        // Priority 9: once due they run ahead of the ready backlog, so one
        // handed out early would also run early.
        pg_backlog_task::with()
            .on(&stem)
            .priority(9)
            .delay(delay)
            .enqueue_many((seq..seq + BATCH).map(|s| pg_backlog_task::Args { seq: s }))
            .await
            .expect("enqueue_many");
        for s in seq..seq + BATCH {
            due_ms.insert(s, published + i64::try_from(delay.as_millis()).expect("ms"));
        }
        seq += BATCH;
    }
    let published = t0.elapsed();
    let st = stem.stats("backlog").await.expect("stats");
    assert_eq!(st.ready + st.delayed, READY + DELAYED, "{st:?}");
    let (vacuums_before, _, _) = vacuum_stats(&admin, &schema).await;

    let t1 = Instant::now();
    let worker = Worker::builder()
        .client(&stem)
        .queues(["backlog"])
        .build()
        .await
        .expect("worker")
        .start();
    let total = usize::try_from(READY + DELAYED).expect("total");
    loop {
        let n = ledger().lock().expect("ledger").len();
        if n >= total {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(180),
            "only {n} of {total} tasks ran in 180 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = t1.elapsed();
    // Let a duplicate, if any, show up before judging.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let l = ledger().lock().expect("ledger").clone();
    let twice: Vec<_> = l.iter().filter(|(_, (n, _))| *n != 1).collect();
    assert!(
        twice.is_empty(),
        "tasks run more than once: {:?}",
        &twice[..twice.len().min(5)]
    );
    assert_eq!(l.len(), total, "every task ran");
    // The server judges due times by its `now()`, from the delay the
    // client sends; `due_ms` is this host's clock before the publish plus
    // that delay, so no earlier than the server's due time when the two
    // clocks agree (the server runs on this host: well under the 50 ms
    // allowed here).
    let early: Vec<_> = due_ms
        .iter()
        .filter(|(s, due)| l[*s].1 + 50 < **due)
        .map(|(s, due)| (*s, due - l[s].1))
        .collect();
    assert!(
        early.is_empty(),
        "{} delayed tasks ran early (seq, ms early): {:?}",
        early.len(),
        &early[..early.len().min(5)]
    );
    let st = stem.stats("backlog").await.expect("stats");
    assert_eq!((st.ready, st.delayed, st.leased), (0, 0, 0), "{st:?}");

    // 50,000 acks left 50,000 dead rows: the leader (this worker, the only
    // one) vacuums past 20,000 on its housekeeping round, every 5 s, once
    // the statistics (flushed about every second) show them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (vacuums, autovacuums, dead) = loop {
        let s = vacuum_stats(&admin, &schema).await;
        if s.0 > vacuums_before || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    worker.shutdown();
    worker.join().await;
    assert!(
        vacuums > vacuums_before,
        "the leader never vacuumed {schema}.jobs: vacuum_count {vacuums}, autovacuum_count {autovacuums}, n_dead_tup {dead}"
    );
    say(&format!(
        "{test}: published {total} in {published:.2?}, drained in {drained:.2?}; \
         vacuum_count {vacuums} ({:.2?} after the drain began; autovacuum_count {autovacuums}, n_dead_tup now {dead})",
        t1.elapsed()
    ));
}
