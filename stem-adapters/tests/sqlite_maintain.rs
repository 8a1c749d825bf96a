//! `SqliteBackend::maintain` frees the rows of expired records and
//! revocations (reads already hide them, so only the file shows it) and
//! keeps live ones.
#![cfg(feature = "sqlite")]

use std::time::Duration;

use stem_adapters::sqlite::{SqliteBackend, SqliteOptions};
use stem_core::{ResultBackend, TaskId, TaskRecord, TaskState};

fn rows(path: &std::path::Path, table: &str) -> i64 {
    let c = rusqlite::Connection::open(path).expect("open");
    c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .expect("count")
}

#[tokio::test]
async fn maintain_deletes_expired_rows_and_keeps_live_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.db");
    let b = SqliteBackend::open(&path, SqliteOptions::default())
        .await
        .expect("open");
    let mut short = TaskRecord::new(TaskId::new(), TaskState::Revoked);
    short.ttl = Duration::from_millis(200);
    let mut long = TaskRecord::new(TaskId::new(), TaskState::Revoked);
    long.ttl = Duration::from_secs(3600);
    assert!(b.store(short).await.expect("store"));
    assert!(b.store(long.clone()).await.expect("store"));
    b.revoke(TaskId::new(), Duration::from_millis(200))
        .await
        .expect("revoke");
    let kept = TaskId::new();
    b.revoke(kept, Duration::from_secs(3600))
        .await
        .expect("revoke");
    assert_eq!(
        (rows(&path, "stem_results"), rows(&path, "stem_revoked")),
        (2, 2)
    );

    tokio::time::sleep(Duration::from_millis(400)).await;
    b.maintain().await.expect("maintain");
    assert_eq!(
        (rows(&path, "stem_results"), rows(&path, "stem_revoked")),
        (1, 1),
        "maintain deletes the expired record and revocation, nothing else"
    );
    assert!(b.get(long.id).await.expect("get").is_some());
    assert_eq!(b.revoked(&[kept]).await.expect("revoked"), vec![true]);
}
