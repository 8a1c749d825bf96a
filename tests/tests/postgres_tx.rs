//! Enqueue inside the application's own Postgres transaction, through the
//! typed API (`enqueue_in`, `enqueue_many_in`), on a real server: the app
//! has its own `sqlx::PgPool` and a business table, and the tasks exist,
//! and run, if and only if its transaction commits.
//!
//! Needs the Postgres at `STEM_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); without one each test
//! prints a SKIP line and passes, except under `STEM_REQUIRE_SERVICES=1`.
//! Each test has a namespace (so a schema) of its own, with its business
//! table inside, and drops the schema at the end, also when it fails.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use stem::adapters::postgres::schema_name;
use stem::adapters::postgres::sqlx::{self, Acquire as _, AssertSqlSafe, PgPool};
use stem::worker::{Worker, WorkerHandle};
use stem::{BrokerError, Published, Stem, StemError, TaskId, TaskState};

const QUEUE: &str = "pgtx";

fn ran() -> &'static Mutex<Vec<String>> {
    static RAN: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    RAN.get_or_init(Mutex::default)
}

fn runs_of(prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = ran()
        .lock()
        .unwrap()
        .iter()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    keys.sort();
    keys
}

#[stem::task(queue = "pgtx")]
async fn double(key: String, n: u64) -> u64 {
    ran().lock().unwrap().push(key);
    n * 2
}

fn args(key: &str, n: u64) -> double::Args {
    double::Args {
        key: key.to_owned(),
        n,
    }
}

fn url() -> String {
    std::env::var("STEM_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:5432/test"))
}

/// `url()` with `namespace=<ns>` added to its query string.
fn url_of(ns: &str) -> String {
    let u = url();
    let sep = if u.contains('?') { '&' } else { '?' };
    format!("{u}{sep}namespace={ns}")
}

fn no_server() -> bool {
    let hp = url()
        .split_once("://")
        .map(|(_, r)| {
            let h = r
                .rsplit_once('@')
                .map_or(r, |(_, h)| h)
                .split(['/', '?'])
                .next()
                .unwrap_or("")
                .to_owned();
            if h.contains(':') {
                h
            } else {
                format!("{h}:5432")
            }
        })
        .unwrap_or_default();
    let up = std::net::ToSocketAddrs::to_socket_addrs(&hp)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok()
        });
    if up {
        return false;
    }
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "no Postgres at {hp}, and STEM_REQUIRE_SERVICES=1 requires it"
    );
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP postgres tx: no Postgres at {hp} (start one, or set STEM_TEST_POSTGRES_URL)"
    );
    true
}

/// Drops a schema when dropped, so a failing test leaves nothing behind
/// either (on a thread of its own: a drop cannot await).
struct DropSchema {
    schema: String,
}

impl Drop for DropSchema {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                use sqlx::Connection as _;
                let mut c = sqlx::PgConnection::connect(&url()).await.ok()?;
                sqlx::query("SET lock_timeout = '10s'")
                    .execute(&mut c)
                    .await
                    .ok()?;
                sqlx::query(AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                )))
                .execute(&mut c)
                .await
                .ok()
            })
        })
        .join();
    }
}

/// A client on a fresh namespace, the application's own pool, and its
/// business table `orders`, in the namespace's schema.
struct Setup {
    stem: Stem,
    pool: PgPool,
    /// `"<schema>".orders`, quoted.
    orders: String,
    /// `"<schema>".jobs`, quoted.
    jobs: String,
    // Last: the schema is dropped after the client and the pool are.
    _drop: DropSchema,
}

async fn setup(case: &str) -> Setup {
    let ns = format!("pgtx{case}{}", TaskId::new().as_uuid().simple());
    let schema = schema_name(&ns);
    let drop = DropSchema {
        schema: schema.clone(),
    };
    let stem = stem::connect_with(&url_of(&ns), None, &ns)
        .await
        .expect("connect");
    assert!(stem.backend().is_some(), "the postgres backend too");
    let pool = PgPool::connect(&url()).await.expect("the app's pool");
    let orders = format!("\"{schema}\".orders");
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {orders} (key text PRIMARY KEY)"
    )))
    .execute(&pool)
    .await
    .expect("create the business table");
    Setup {
        stem,
        pool,
        orders,
        jobs: format!("\"{schema}\".jobs"),
        _drop: drop,
    }
}

impl Setup {
    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    async fn order_exists(&self, key: &str) -> bool {
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE key = $1",
            self.orders
        )))
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .expect("select order")
            == 1
    }

    fn insert_order(&self) -> String {
        format!("INSERT INTO {} (key) VALUES ($1)", self.orders)
    }
}

async fn start_worker(stem: &Stem) -> WorkerHandle {
    Worker::builder()
        .client(stem)
        .queues([QUEUE])
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap()
        .start()
}

fn expect_invalid(err: &StemError, needle: &str) {
    match err {
        StemError::Broker(BrokerError::Invalid(msg)) => {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        other => panic!("expected BrokerError::Invalid, got {other:?}"),
    }
}

/// (a) `pool.begin()`: a business row, one `enqueue_in(&mut *tx, ..)` and
/// one `enqueue_many_in(&mut tx, ..)` of three, committed: all four run,
/// their typed results come back through the handles, and the row exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_pool_transaction_runs_every_task_and_keeps_the_row() {
    if no_server() {
        return;
    }
    let s = setup("commit").await;
    let worker = start_worker(&s.stem).await;
    let p = format!("commit-{}-", TaskId::new());

    let mut tx = s.pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(s.insert_order()))
        .bind(&p)
        .execute(&mut *tx)
        .await
        .unwrap();
    let one = double::with()
        .on(&s.stem)
        .enqueue_in(&mut *tx, format!("{p}0"), 10)
        .await
        .unwrap();
    // `&mut tx` on a `Transaction<'static, Postgres>` works too.
    let many = double::with()
        .on(&s.stem)
        .enqueue_many_in(
            &mut tx,
            [
                args(&format!("{p}1"), 11),
                args(&format!("{p}2"), 12),
                args(&format!("{p}3"), 13),
            ],
        )
        .await
        .unwrap();
    assert_eq!(many.len(), 3);
    // Invisible to anyone else, and not run, before the commit.
    assert_eq!(s.count(&s.jobs).await, 0, "visible before the commit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(runs_of(&p).is_empty(), "ran before the commit");
    tx.commit().await.unwrap();

    let mut ids = vec![one.id()];
    ids.extend(many.iter().map(stem::TaskHandle::id));
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "four distinct tasks");

    assert_eq!(one.wait(Duration::from_secs(10)).await.unwrap(), 20);
    let mut outs = Vec::new();
    for h in many {
        outs.push(h.wait(Duration::from_secs(10)).await.unwrap());
    }
    assert_eq!(outs, [22, 24, 26], "handles in input order");
    assert_eq!(
        runs_of(&p),
        (0..4).map(|i| format!("{p}{i}")).collect::<Vec<_>>(),
        "each ran once"
    );
    assert!(s.order_exists(&p).await, "the app's own row committed too");

    worker.shutdown();
    let report = worker.join().await;
    assert_eq!(report.succeeded, 4);
}

/// (b) The same rolled back: the jobs table stays empty, nothing runs on a
/// live worker in 1.5 s, the handles stay `Pending`, the business row is
/// absent; then a committed control task runs on that same worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_pool_transaction_leaves_nothing_and_runs_nothing() {
    if no_server() {
        return;
    }
    let s = setup("rollback").await;
    let worker = start_worker(&s.stem).await;
    let p = format!("rollback-{}-", TaskId::new());

    let mut tx = s.pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(s.insert_order()))
        .bind(&p)
        .execute(&mut *tx)
        .await
        .unwrap();
    let one = double::with()
        .on(&s.stem)
        .enqueue_in(&mut *tx, format!("{p}0"), 1)
        .await
        .unwrap();
    let many = double::with()
        .on(&s.stem)
        .enqueue_many_in(&mut tx, (1..4).map(|i| args(&format!("{p}{i}"), i)))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(
        s.count(&s.jobs).await,
        0,
        "a rolled-back enqueue leaves no row"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(runs_of(&p).is_empty(), "ran: {:?}", runs_of(&p));
    assert_eq!(s.count(&s.jobs).await, 0);
    for h in std::iter::once(&one).chain(&many) {
        let state = h.state().await.unwrap();
        assert!(matches!(state, TaskState::Pending), "{state:?}");
    }
    assert!(!s.order_exists(&p).await, "the business row rolled back");

    // The worker was live all along: a committed one runs.
    let mut tx = s.pool.begin().await.unwrap();
    let control = double::with()
        .on(&s.stem)
        .enqueue_in(&mut *tx, format!("{p}control"), 4)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(control.wait(Duration::from_secs(10)).await.unwrap(), 8);
    assert_eq!(runs_of(&p), [format!("{p}control")]);

    worker.shutdown();
    worker.join().await;
}

/// (c) A transaction begun on a pooled connection (`conn.begin()`, not
/// `'static`): `&mut *tx` is the way to pass it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_on_a_pooled_connection_takes_deref_tx() {
    if no_server() {
        return;
    }
    let s = setup("conn").await;
    let worker = start_worker(&s.stem).await;
    let p = format!("conn-{}-", TaskId::new());

    let mut conn = s.pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(s.insert_order()))
        .bind(&p)
        .execute(&mut *tx)
        .await
        .unwrap();
    let one = double::with()
        .on(&s.stem)
        .enqueue_in(&mut *tx, format!("{p}0"), 5)
        .await
        .unwrap();
    let many = double::with()
        .on(&s.stem)
        .enqueue_many_in(&mut *tx, [args(&format!("{p}1"), 6)])
        .await
        .unwrap();
    assert_eq!(s.count(&s.jobs).await, 0, "visible before the commit");
    tx.commit().await.unwrap();
    drop(conn);

    assert_eq!(one.wait(Duration::from_secs(10)).await.unwrap(), 10);
    assert_eq!(many[0].wait(Duration::from_secs(10)).await.unwrap(), 12);
    assert_eq!(runs_of(&p), [format!("{p}0"), format!("{p}1")]);
    assert!(s.order_exists(&p).await);

    worker.shutdown();
    worker.join().await;
}

/// (d) A bare pooled connection is autocommit: the tasks are stored (and
/// run) without any commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_pooled_connection_is_autocommit() {
    if no_server() {
        return;
    }
    let s = setup("auto").await;
    let p = format!("auto-{}-", TaskId::new());

    let mut conn = s.pool.acquire().await.unwrap();
    let one = double::with()
        .on(&s.stem)
        .enqueue_in(&mut conn, format!("{p}0"), 7)
        .await
        .unwrap();
    let many = double::with()
        .on(&s.stem)
        .enqueue_many_in(
            &mut conn,
            [args(&format!("{p}1"), 8), args(&format!("{p}2"), 9)],
        )
        .await
        .unwrap();
    // Stored at once, seen from another connection, the caller's still held.
    assert_eq!(s.count(&s.jobs).await, 3);

    let worker = start_worker(&s.stem).await;
    assert_eq!(one.wait(Duration::from_secs(10)).await.unwrap(), 14);
    assert_eq!(many[0].wait(Duration::from_secs(10)).await.unwrap(), 16);
    assert_eq!(many[1].wait(Duration::from_secs(10)).await.unwrap(), 18);
    assert_eq!(runs_of(&p).len(), 3);
    drop(conn);

    worker.shutdown();
    worker.join().await;
}

/// (e) A unique key taken inside a rolled-back transaction is free
/// afterwards: the next enqueue with the same key is stored, not a
/// duplicate of the task that never existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_key_taken_in_a_rolled_back_transaction_is_free_afterwards() {
    if no_server() {
        return;
    }
    let s = setup("unique").await;
    let unique = || {
        double::with()
            .on(&s.stem)
            .unique_for(Duration::from_secs(600))
    };

    let mut tx = s.pool.begin().await.unwrap();
    let gone = unique()
        .enqueue_in(&mut *tx, String::from("same"), 1)
        .await
        .unwrap();
    // Inside the transaction the key is held: the same call answers it.
    let again = unique()
        .enqueue_in(&mut *tx, String::from("same"), 1)
        .await
        .unwrap();
    assert_eq!(again.id(), gone.id());
    tx.rollback().await.unwrap();

    // In a new transaction: stored under a new id.
    let mut tx = s.pool.begin().await.unwrap();
    let env = unique()
        .signature(String::from("same"), 1)
        .into_envelope()
        .unwrap();
    let new_id = env.id;
    let published = s.stem.publish_in(&mut *tx, vec![env]).await.unwrap();
    assert_eq!(published, [Published::Stored(new_id)], "not a duplicate");
    assert_ne!(new_id, gone.id());
    tx.commit().await.unwrap();

    // And now it is held, by the new one, outside any transaction too.
    let env = unique()
        .signature(String::from("same"), 1)
        .into_envelope()
        .unwrap();
    assert_eq!(
        s.stem.publish(env).await.unwrap(),
        Published::Duplicate(new_id)
    );
    assert_eq!(s.count(&s.jobs).await, 1);
}

/// (f) A `tx` of the wrong type is `Invalid`, naming `PgConnection`, and
/// stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_transaction_type_is_invalid_naming_pg_connection() {
    if no_server() {
        return;
    }
    let s = setup("wrong").await;

    let err = double::with()
        .on(&s.stem)
        .enqueue_in(&mut 5_u32, String::from("x"), 1)
        .await
        .unwrap_err();
    expect_invalid(&err, "PgConnection");
    let err = double::with()
        .on(&s.stem)
        .enqueue_many_in(&mut String::from("tx"), [args("x", 1)])
        .await
        .unwrap_err();
    expect_invalid(&err, "PgConnection");
    // The pool itself is not a connection either.
    let mut pool = s.pool.clone();
    let err = double::with()
        .on(&s.stem)
        .enqueue_in(&mut pool, String::from("x"), 1)
        .await
        .unwrap_err();
    expect_invalid(&err, "PgConnection");

    assert_eq!(s.count(&s.jobs).await, 0);
}
