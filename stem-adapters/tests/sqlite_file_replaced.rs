//! A SQLite file deleted or replaced under an open broker: the broker
//! notices that its path no longer names the file it has open and fails
//! every later call with an error naming the path, instead of working on
//! the deleted file while new clients use a new one (a silent split).

#![cfg(unix)]

use std::path::Path;
use std::time::Duration;

use stem_adapters::sqlite::{SqliteBroker, SqliteOptions};
use stem_core::{Broker, BrokerError, Envelope, FetchRequest};

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

fn task() -> Envelope {
    Envelope::new("demo::hello", "default", serde_json::json!({})).unwrap()
}

fn fetch_now() -> FetchRequest {
    let mut req = FetchRequest::new(["default"], 10);
    req.wait = Duration::ZERO;
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_file_was_replaced_reports_it_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().canonicalize().unwrap().join("stem.db");
    let old = SqliteBroker::open(&db, SqliteOptions::default())
        .await
        .unwrap();
    old.publish(task()).await.unwrap();
    old.maintain().await.unwrap();

    remove_db(&db);
    // Another process makes a new (empty) database at the path.
    std::fs::File::create(&db).unwrap();

    let err = old.maintain().await.unwrap_err();
    let BrokerError::Unavailable { reason, .. } = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    let path = db.display().to_string();
    assert!(reason.contains(&path), "{reason}");
    assert!(reason.contains("deleted or replaced"), "{reason}");
    assert!(reason.contains("device/inode changed"), "{reason}");
    assert!(reason.contains("restart"), "{reason}");
    // Every later call fails too: publishes with the reason, fetches with
    // `Closed` (a worker's fetcher stops on it).
    let err = old.publish(task()).await.unwrap_err();
    assert!(err.to_string().contains(&path), "{err}");
    let err = old.fetch(&fetch_now()).await.unwrap_err();
    assert!(matches!(err, BrokerError::Closed), "{err:?}");

    // A new client at the same path gets the new file, not the deleted
    // one this process still has open; it holds only the new task.
    let new = SqliteBroker::open(&db, SqliteOptions::default())
        .await
        .unwrap();
    new.publish(task()).await.unwrap();
    new.maintain().await.unwrap();
    let got = new.fetch(&fetch_now()).await.unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_file_was_deleted_reports_the_path_missing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().canonicalize().unwrap().join("stem.db");
    let broker = SqliteBroker::open(&db, SqliteOptions::default())
        .await
        .unwrap();
    broker.publish(task()).await.unwrap();
    remove_db(&db);
    let err = broker.maintain().await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BrokerError::Unavailable { .. }), "{err:?}");
    assert!(msg.contains(&db.display().to_string()), "{msg}");
    assert!(msg.contains("the path is now missing"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_file_is_in_place_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("stem.db");
    let broker = SqliteBroker::open(&db, SqliteOptions::default())
        .await
        .unwrap();
    broker.publish(task()).await.unwrap();
    broker.maintain().await.unwrap();
    assert_eq!(broker.fetch(&fetch_now()).await.unwrap().len(), 1);
}
