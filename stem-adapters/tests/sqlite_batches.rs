//! SQLite batch paths beyond the kit: a batched ack fences every receipt
//! by its own lease, across chunk boundaries.

use std::time::Duration;

use stem_adapters::sqlite::{SqliteBroker, SqliteOptions};
use stem_core::{
    Broker, BrokerError, Disposition, Envelope, FetchRequest, QueueAdmin, Receipt, Settlement,
};

/// Acks for every receipt, as one settlement batch.
fn acks(receipts: &[Receipt]) -> Vec<Settlement> {
    receipts
        .iter()
        .map(|r| Settlement::new(r.clone(), Disposition::Ack))
        .collect()
}

#[tokio::test]
async fn ack_many_fences_each_receipt_across_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let b = SqliteBroker::open(dir.path().join("acks.db"), SqliteOptions::default())
        .await
        .unwrap();
    let envs: Vec<_> = (0..700)
        .map(|i| Envelope::new("t", "q", serde_json::json!({ "i": i })).unwrap())
        .collect();
    b.publish_many(envs).await.unwrap();
    let got = b
        .fetch(&FetchRequest::new(["q"], 1000).lease(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(got.len(), 700);
    // Two deliveries are handed back and claimed again: their old receipts are stale.
    for d in [&got[10], &got[650]] {
        b.settle_one(Settlement::new(
            d.receipt.clone(),
            Disposition::Release {
                after: Duration::ZERO,
            },
        ))
        .await
        .unwrap();
    }
    let again = b.fetch(&FetchRequest::new(["q"], 10)).await.unwrap();
    assert_eq!(again.len(), 2);
    let receipts: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
    let results = b.settle(&acks(&receipts)).await;
    for (i, r) in results.iter().enumerate() {
        if i == 10 || i == 650 {
            assert!(
                matches!(r, Err(BrokerError::LeaseLost { .. })),
                "{i}: {r:?}"
            );
        } else {
            assert!(r.is_ok(), "{i}: {r:?}");
        }
    }
    let stats = b.stats("q").await.unwrap();
    assert_eq!(stats.leased, 2, "only the re-claimed two are left");
    let fresh: Vec<_> = again.iter().map(|d| d.receipt.clone()).collect();
    assert!(b.settle(&acks(&fresh)).await.iter().all(Result::is_ok));
    assert_eq!(
        b.stats("q").await.unwrap(),
        stem_core::QueueStats::default()
    );
}

/// Writes queued together share one transaction, each in its own
/// savepoint: the ones that fail (stale receipts) change nothing and the
/// rest all land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_in_a_group_commit_rolls_back_alone() {
    let dir = tempfile::tempdir().unwrap();
    let b = SqliteBroker::open(dir.path().join("group.db"), SqliteOptions::default())
        .await
        .unwrap();
    let envs: Vec<_> = (0..40)
        .map(|i| Envelope::new("t", "q", serde_json::json!({ "i": i })).unwrap())
        .collect();
    b.publish_many(envs).await.unwrap();
    let got = b
        .fetch(&FetchRequest::new(["q"], 40).lease(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(got.len(), 40);
    // Every receipt goes stale: the deliveries are handed back and claimed again.
    for d in &got {
        b.settle_one(Settlement::new(
            d.receipt.clone(),
            Disposition::Release {
                after: Duration::ZERO,
            },
        ))
        .await
        .unwrap();
    }
    let live = b.fetch(&FetchRequest::new(["q"], 40)).await.unwrap();
    assert_eq!(live.len(), 40);
    // Stale dead-letters, fresh publishes and live acks, all queued at once.
    let stale = got.iter().map(|d| {
        let b = b.clone();
        let r = d.receipt.clone();
        tokio::spawn(async move {
            b.settle_one(Settlement::new(
                r.clone(),
                Disposition::DeadLetter {
                    reason: "stale".into(),
                    error: None,
                    charge: false,
                },
            ))
            .await
        })
    });
    let fresh = (0..40).map(|i| {
        let b = b.clone();
        tokio::spawn(async move {
            b.publish(Envelope::new("t", "q2", serde_json::json!({ "j": i })).unwrap())
                .await
        })
    });
    let acks = live.iter().map(|d| {
        let b = b.clone();
        let r = d.receipt.clone();
        tokio::spawn(async move { b.ack(&r).await })
    });
    let (stale, fresh, acks) = futures::join!(
        futures::future::join_all(stale),
        futures::future::join_all(fresh),
        futures::future::join_all(acks)
    );
    for r in stale {
        assert!(
            matches!(r.unwrap(), Err(BrokerError::LeaseLost { .. })),
            "a stale dead-letter is refused"
        );
    }
    assert!(fresh.into_iter().all(|r| r.unwrap().is_ok()));
    assert!(acks.into_iter().all(|r| r.unwrap().is_ok()));
    assert_eq!(
        b.stats("q").await.unwrap(),
        stem_core::QueueStats::default(),
        "acked, and nothing dead-lettered by the stale receipts"
    );
    assert_eq!(b.stats("q2").await.unwrap().ready, 40);
}

/// A batch mixing rows with and without unique keys (stored through
/// multi-row INSERTs between the unique ones) keeps its order, answers a
/// duplicate at the right position, and stores every other row once.
#[tokio::test]
async fn publish_many_keeps_order_and_unique_answers_across_multi_row_inserts() {
    let dir = tempfile::tempdir().unwrap();
    let b = SqliteBroker::open(dir.path().join("mixed.db"), SqliteOptions::default())
        .await
        .unwrap();
    let keyed = |i: u32, key: &str| {
        let mut e = Envelope::new("t", "q", serde_json::json!({ "i": i })).unwrap();
        e.unique = Some(stem_core::Unique {
            key: key.to_owned(),
            until: e.enqueued_at + chrono::Duration::minutes(5),
            release: stem_core::UniqueRelease::Window,
        });
        e
    };
    let holder = keyed(10_000, "k");
    let holder_id = holder.id;
    b.publish(holder).await.unwrap();
    // 0..150 plain, except 70 (duplicate of the held key) and 71 (a new key).
    let envs: Vec<Envelope> = (0..150)
        .map(|i| match i {
            70 => keyed(i, "k"),
            71 => keyed(i, "fresh"),
            _ => Envelope::new("t", "q", serde_json::json!({ "i": i })).unwrap(),
        })
        .collect();
    let ids: Vec<_> = envs.iter().map(|e| e.id).collect();
    let out = b.publish_many(envs).await.unwrap();
    assert_eq!(out.len(), 150);
    for (i, p) in out.iter().enumerate() {
        if i == 70 {
            assert_eq!(*p, stem_core::Published::Duplicate(holder_id));
        } else {
            assert_eq!(*p, stem_core::Published::Stored(ids[i]), "{i}");
        }
    }
    let got = b.fetch(&FetchRequest::new(["q"], 1000)).await.unwrap();
    let order: Vec<u64> = got
        .iter()
        .map(|d| {
            serde_json::from_str::<serde_json::Value>(d.envelope.args.get()).unwrap()["i"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let expected: Vec<u64> = std::iter::once(10_000)
        .chain((0..150).filter(|i| *i != 70))
        .collect();
    assert_eq!(order, expected, "stored once each, in publish order");
}

/// Errors keep what caused them: an unopenable path answers with the I/O
/// error as the `source`, and the client's `Debug` prints the chain.
#[tokio::test]
async fn an_open_error_keeps_its_io_cause_as_the_source() {
    use std::error::Error as _;
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let err = SqliteBroker::open(blocker.join("sub").join("x.db"), SqliteOptions::default())
        .await
        .expect_err("a path under a file cannot be created");
    let source = err.source().expect("the cause is kept");
    assert!(
        source.to_string().to_lowercase().contains("directory"),
        "the I/O error: {source}"
    );
    let chain = format!("{:?}", stem_core::StemError::from(err));
    assert!(chain.contains("Caused by:"), "{chain}");
}

/// `publish_in`: envelopes stored inside the caller's own transaction exist
/// if and only if it commits; a connection outside a transaction, or of
/// another type, is refused.
#[tokio::test]
async fn publish_in_is_visible_only_when_the_callers_transaction_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tx.db");
    let b = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let mut conn = rusqlite::Connection::open(&path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let job = |n: u64| Envelope::new("t", "txq", serde_json::json!({ "n": n })).unwrap();

    // Outside a transaction: refused, nothing stored.
    let err = b
        .publish_in(&mut conn, vec![job(0)])
        .await
        .expect_err("autocommit is refused");
    assert!(err.to_string().contains("BEGIN"), "{err}");
    // Another type: refused.
    let mut not_a_connection = String::from("tx");
    assert!(
        b.publish_in(&mut not_a_connection, vec![job(0)])
            .await
            .is_err()
    );

    // Rolled back: gone.
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let out = b.publish_in(&mut conn, vec![job(1), job(2)]).await.unwrap();
    assert_eq!(out.len(), 2);
    conn.execute_batch("ROLLBACK").unwrap();
    assert_eq!(
        b.stats("txq").await.unwrap().ready,
        0,
        "a rolled-back enqueue leaves nothing"
    );

    // Committed with the caller's own row: there, and it runs.
    conn.execute_batch(
        "BEGIN IMMEDIATE; CREATE TABLE orders (id INTEGER); INSERT INTO orders VALUES (7);",
    )
    .unwrap();
    let e = job(3);
    let id = e.id;
    b.publish_in(&mut conn, vec![e]).await.unwrap();
    assert_eq!(
        b.stats("txq").await.unwrap().ready,
        0,
        "not visible before the commit"
    );
    conn.execute_batch("COMMIT").unwrap();
    assert_eq!(b.stats("txq").await.unwrap().ready, 1);
    let got = b
        .fetch(&FetchRequest::new(["txq"], 5).wait(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.id, id);
}

/// `try_lead`: one holder leads the namespace's housekeeping; another
/// takes over only once the lease has run out.
#[tokio::test]
async fn one_worker_leads_housekeeping_until_its_lease_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lead.db");
    let a = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let ttl = Duration::from_millis(400);
    assert!(
        a.try_lead("w1", ttl).await.unwrap(),
        "the first holder leads"
    );
    assert!(!a.try_lead("w2", ttl).await.unwrap(), "a second does not");
    assert!(a.try_lead("w1", ttl).await.unwrap(), "the leader renews");
    let other_ns = SqliteBroker::open(
        &path,
        SqliteOptions {
            namespace: String::from("other"),
            ..SqliteOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(
        other_ns.try_lead("w2", ttl).await.unwrap(),
        "each namespace has its own leader"
    );
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(
        a.try_lead("w2", ttl).await.unwrap(),
        "taken over after the lease"
    );
    assert!(!a.try_lead("w1", ttl).await.unwrap());
}
