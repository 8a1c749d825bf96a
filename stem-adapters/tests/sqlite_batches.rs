//! SQLite batch paths beyond the kit: a batched ack fences every receipt
//! by its own lease, across chunk boundaries.

use std::time::Duration;

use stem_adapters::sqlite::{SqliteBroker, SqliteOptions};
use stem_core::{Broker, BrokerError, Envelope, FetchRequest, Nack};

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
        b.nack(&d.receipt, Nack::after(Duration::ZERO))
            .await
            .unwrap();
    }
    let again = b.fetch(&FetchRequest::new(["q"], 10)).await.unwrap();
    assert_eq!(again.len(), 2);
    let receipts: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
    let results = b.ack_many(&receipts).await;
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
    assert!(b.ack_many(&fresh).await.iter().all(Result::is_ok));
    assert_eq!(
        b.stats("q").await.unwrap(),
        stem_core::QueueStats::default()
    );
}
