//! Enqueue inside the caller's transaction, through the typed API
//! (`enqueue_in`, `enqueue_many_in`, the module shortcuts), on a real
//! SQLite file: the tasks exist, and run, if and only if the caller's
//! transaction commits.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use stem::adapters::sqlite::rusqlite::Connection;
use stem::worker::{Worker, WorkerHandle};
use stem::{BrokerError, Stem, StemError, TaskState};

const QUEUE: &str = "tx";

fn ran() -> &'static Mutex<Vec<String>> {
    static RAN: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    RAN.get_or_init(Mutex::default)
}

fn runs_of(prefix: &str) -> Vec<String> {
    ran()
        .lock()
        .unwrap()
        .iter()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect()
}

#[stem::task(queue = "tx")]
async fn double(key: String, n: u64) -> u64 {
    ran().lock().unwrap().push(key);
    n * 2
}

/// A client and a caller's connection on one SQLite file in `dir`.
struct Setup {
    stem: Stem,
    conn: Connection,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db: PathBuf = dir.path().canonicalize().unwrap().join("app.db");
    let url = format!("sqlite://{}?poll=50ms", db.display());
    let stem = stem::connect_with(&url, None, "stem").await.unwrap();
    let conn = open_conn(&db);
    conn.execute_batch("CREATE TABLE orders (key TEXT PRIMARY KEY)")
        .unwrap();
    Setup {
        stem,
        conn,
        _dir: dir,
    }
}

fn open_conn(db: &Path) -> Connection {
    let conn = Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

async fn start_worker(stem: &Stem) -> WorkerHandle {
    Worker::builder()
        .client(stem)
        .queues([QUEUE, "tx_other"])
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap()
        .start()
}

fn order_rows(conn: &Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
        .unwrap()
}

fn args(key: &str, n: u64) -> double::Args {
    double::Args {
        key: key.to_owned(),
        n,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_tasks_run_and_their_typed_results_come_back() {
    let Setup {
        stem,
        mut conn,
        _dir,
    } = setup().await;
    let worker = start_worker(&stem).await;
    let p = format!("commit-{}-", stem::TaskId::new());

    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    conn.execute("INSERT INTO orders (key) VALUES (?1)", [&p])
        .unwrap();
    let one = double::with()
        .on(&stem)
        .enqueue_in(&mut conn, format!("{p}0"), 10)
        .await
        .unwrap();
    let many = double::with()
        .on(&stem)
        .enqueue_many_in(
            &mut conn,
            [
                args(&format!("{p}1"), 11),
                args(&format!("{p}2"), 12),
                args(&format!("{p}3"), 13),
            ],
        )
        .await
        .unwrap();
    assert_eq!(many.len(), 3);
    // Invisible, and not run, before the commit.
    assert_eq!(stem.stats(QUEUE).await.unwrap().ready, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(runs_of(&p).is_empty(), "ran before the commit");
    conn.execute_batch("COMMIT").unwrap();

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
    let mut keys = runs_of(&p);
    keys.sort();
    assert_eq!(
        keys,
        (0..4).map(|i| format!("{p}{i}")).collect::<Vec<_>>(),
        "each ran once"
    );
    assert_eq!(order_rows(&conn), 1, "the caller's own row committed too");

    worker.shutdown();
    let report = worker.join().await;
    assert_eq!(report.succeeded, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_tasks_do_not_exist_and_never_run() {
    let Setup {
        stem,
        mut conn,
        _dir,
    } = setup().await;
    let worker = start_worker(&stem).await;
    let p = format!("rollback-{}-", stem::TaskId::new());

    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    conn.execute("INSERT INTO orders (key) VALUES (?1)", [&p])
        .unwrap();
    let one = double::with()
        .on(&stem)
        .enqueue_in(&mut conn, format!("{p}0"), 1)
        .await
        .unwrap();
    let many = double::with()
        .on(&stem)
        .enqueue_many_in(&mut conn, (1..4).map(|i| args(&format!("{p}{i}"), i)))
        .await
        .unwrap();
    conn.execute_batch("ROLLBACK").unwrap();

    let stats = stem.stats(QUEUE).await.unwrap();
    assert_eq!(
        (stats.ready, stats.delayed, stats.leased, stats.dead),
        (0, 0, 0, 0),
        "a rolled-back enqueue leaves nothing"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(runs_of(&p).is_empty(), "ran: {:?}", runs_of(&p));
    for h in std::iter::once(&one).chain(&many) {
        let state = h.state().await.unwrap();
        assert!(matches!(state, TaskState::Pending), "{state:?}");
    }
    assert_eq!(order_rows(&conn), 0);

    // The worker was live all along: a committed one runs.
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let control = double::with()
        .on(&stem)
        .enqueue_in(&mut conn, format!("{p}control"), 4)
        .await
        .unwrap();
    conn.execute_batch("COMMIT").unwrap();
    assert_eq!(control.wait(Duration::from_secs(10)).await.unwrap(), 8);
    assert_eq!(runs_of(&p), [format!("{p}control")]);

    worker.shutdown();
    worker.join().await;
}

/// The same with a deferred `BEGIN` whose first write is the enqueue (no
/// lock held before it): rolled back, nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_begin_rolled_back_leaves_nothing() {
    let Setup {
        stem,
        mut conn,
        _dir,
    } = setup().await;

    conn.execute_batch("BEGIN").unwrap();
    double::with()
        .on(&stem)
        .enqueue_in(&mut conn, String::from("deferred-0"), 1)
        .await
        .unwrap();
    double::with()
        .on(&stem)
        .enqueue_many_in(&mut conn, [args("deferred-1", 1), args("deferred-2", 2)])
        .await
        .unwrap();
    assert_eq!(stem.stats(QUEUE).await.unwrap().ready, 0);
    conn.execute_batch("ROLLBACK").unwrap();
    assert_eq!(stem.stats(QUEUE).await.unwrap().ready, 0);
}

/// The per-call options reach the envelope stored in the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_options_apply_inside_the_transaction() {
    let Setup {
        stem,
        mut conn,
        _dir,
    } = setup().await;

    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    double::with()
        .on(&stem)
        .delay(Duration::from_secs(600))
        .enqueue_in(&mut conn, String::from("delayed"), 1)
        .await
        .unwrap();
    double::with()
        .on(&stem)
        .queue("tx_other")
        .enqueue_many_in(&mut conn, [args("other-a", 1), args("other-b", 2)])
        .await
        .unwrap();
    conn.execute_batch("COMMIT").unwrap();

    let tx = stem.stats(QUEUE).await.unwrap();
    assert_eq!((tx.ready, tx.delayed), (0, 1));
    let other = stem.stats("tx_other").await.unwrap();
    assert_eq!((other.ready, other.delayed), (2, 0));
}

/// A unique call enqueued twice in one transaction: the second answer is
/// the holder's id, and one task is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_inside_the_transaction_answers_the_holders_id() {
    let Setup {
        stem,
        mut conn,
        _dir,
    } = setup().await;

    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let unique = || double::with().on(&stem).unique_for(Duration::from_secs(60));
    let first = unique()
        .enqueue_in(&mut conn, String::from("same"), 1)
        .await
        .unwrap();
    let again = unique()
        .enqueue_in(&mut conn, String::from("same"), 1)
        .await
        .unwrap();
    let batch = unique()
        .enqueue_many_in(&mut conn, [args("same", 1), args("different", 1)])
        .await
        .unwrap();
    conn.execute_batch("COMMIT").unwrap();

    assert_eq!(again.id(), first.id());
    assert_eq!(batch[0].id(), first.id());
    assert_ne!(batch[1].id(), first.id());
    assert_eq!(stem.stats(QUEUE).await.unwrap().ready, 2);
}

/// The module shortcuts use the default client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_shortcuts_use_the_default_client() {
    let Setup {
        stem,
        mut conn,
        _dir,
    } = setup().await;
    // The only test in this binary that uses the default client.
    stem.install_default();
    let worker = start_worker(&stem).await;
    let p = format!("default-{}-", stem::TaskId::new());

    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let one = double::enqueue_in(&mut conn, format!("{p}0"), 100)
        .await
        .unwrap();
    let many = double::enqueue_many_in(&mut conn, [args(&format!("{p}1"), 101)])
        .await
        .unwrap();
    assert_eq!(stem.stats(QUEUE).await.unwrap().ready, 0);
    conn.execute_batch("COMMIT").unwrap();

    assert_eq!(one.wait(Duration::from_secs(10)).await.unwrap(), 200);
    assert_eq!(many[0].wait(Duration::from_secs(10)).await.unwrap(), 202);

    // Rolled back through the shortcuts: nothing.
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    double::enqueue_in(&mut conn, format!("{p}gone"), 1)
        .await
        .unwrap();
    double::enqueue_many_in(&mut conn, [args(&format!("{p}gone"), 2)])
        .await
        .unwrap();
    conn.execute_batch("ROLLBACK").unwrap();
    assert_eq!(stem.stats(QUEUE).await.unwrap().ready, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(runs_of(&format!("{p}gone")).is_empty());

    worker.shutdown();
    worker.join().await;
}

fn expect_invalid(err: &StemError, needle: &str) {
    match err {
        StemError::Broker(BrokerError::Invalid(msg)) => {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        other => panic!("expected BrokerError::Invalid, got {other:?}"),
    }
}

/// A `tx` of the wrong type, or a connection outside `BEGIN`, is a typed
/// `Invalid` error that says what to pass, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_transaction_is_a_typed_invalid_error_naming_what_to_pass() {
    let Setup {
        stem,
        mut conn,
        _dir,
    } = setup().await;

    let err = double::with()
        .on(&stem)
        .enqueue_in(&mut 5_u32, String::from("x"), 1)
        .await
        .unwrap_err();
    expect_invalid(&err, "rusqlite::Connection");
    let err = double::with()
        .on(&stem)
        .enqueue_many_in(&mut String::from("tx"), [args("x", 1)])
        .await
        .unwrap_err();
    expect_invalid(&err, "rusqlite::Connection");
    // A boxed connection is another type, too: pass the connection itself.
    let err = double::with()
        .on(&stem)
        .enqueue_in(
            &mut Box::new(open_conn(Path::new(":memory:"))),
            String::from("x"),
            1,
        )
        .await
        .unwrap_err();
    expect_invalid(&err, "rusqlite::Connection");

    // The right type, but no transaction open.
    let err = double::with()
        .on(&stem)
        .enqueue_in(&mut conn, String::from("x"), 1)
        .await
        .unwrap_err();
    expect_invalid(&err, "BEGIN");

    assert_eq!(stem.stats(QUEUE).await.unwrap().ready, 0);
}

/// An adapter without transactions answers `Unsupported`.
#[tokio::test]
async fn an_adapter_without_transactions_answers_unsupported() {
    let stem = stem_tests::isolated_client("tx_unsupported").await;
    let mut conn = open_conn(Path::new(":memory:"));
    let err = double::with()
        .on(&stem)
        .enqueue_in(&mut conn, String::from("x"), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StemError::Broker(BrokerError::Unsupported { .. })),
        "{err:?}"
    );
    assert_eq!(stem.stats(QUEUE).await.unwrap().ready, 0);
}
