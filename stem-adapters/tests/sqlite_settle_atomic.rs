//! A completion crash between result and ack cannot happen on SQLite with
//! its result backend in the same file: both are one transaction. Proven
//! by making the result write fail inside the settlement (a trigger that
//! aborts it, as a crash would): the ack is rolled back with it, the
//! delivery stays leased, and the next delivery settles correctly with one
//! terminal record.

use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use stem_adapters::sqlite::{SqliteBackend, SqliteBroker, SqliteOptions};
use stem_core::{
    Broker, Disposition, Envelope, FetchRequest, QueueAdmin, ResultBackend, Settlement, TaskRecord,
    TaskState,
};

fn succeeded(id: stem_core::TaskId, value: &str) -> Box<TaskRecord> {
    let result = RawValue::from_string(value.to_owned()).expect("json");
    let mut rec = TaskRecord::new(id, TaskState::Succeeded { result });
    rec.attempts = 1;
    Box::new(rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_result_write_rolls_back_its_ack_and_the_next_delivery_settles() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("atomic.db");
    let opts = SqliteOptions {
        namespace: String::from("atomic"),
        ..SqliteOptions::default()
    };
    let broker = SqliteBroker::open(&path, opts.clone())
        .await
        .expect("broker");
    let backend = SqliteBackend::open(&path, opts).await.expect("backend");
    assert!(
        broker.stores_results_of(&backend),
        "one file and namespace: results go with settlements"
    );

    let env = Envelope::new("t::job", "q", serde_json::json!({"n": 1})).expect("envelope");
    let id = env.id;
    broker.publish(env).await.expect("publish");
    let first = broker
        .fetch(&FetchRequest::new(["q"], 1).lease(Duration::from_millis(300)))
        .await
        .expect("fetch");
    assert_eq!(first.len(), 1);

    // The "crash": the result write fails inside the settlement.
    let side = rusqlite::Connection::open(&path).expect("side connection");
    side.execute_batch(&format!(
        "CREATE TRIGGER crash_results BEFORE INSERT ON stem_results WHEN NEW.id = '{id}' \
         BEGIN SELECT RAISE(ABORT, 'injected crash between result and ack'); END;"
    ))
    .expect("trigger");
    let mut s = Settlement::new(first[0].receipt.clone(), Disposition::Ack);
    s.record = Some(succeeded(id, "1"));
    let answer = broker.settle(std::slice::from_ref(&s)).await;
    assert!(answer[0].is_err(), "the failed write fails the settlement");
    assert!(
        backend.get(id).await.expect("get").is_none(),
        "no record was written"
    );
    let st = QueueAdmin::stats(&broker, "q").await.expect("stats");
    assert_eq!(
        st.ready + st.leased,
        1,
        "the ack was rolled back with the record: the task is still there ({st:?})"
    );

    // The next delivery settles it, once, with one terminal record.
    side.execute_batch("DROP TRIGGER crash_results;")
        .expect("drop trigger");
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        let got = broker
            .fetch(&FetchRequest::new(["q"], 1).wait(Duration::from_millis(200)))
            .await
            .expect("fetch");
        if !got.is_empty() {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "the task was not delivered again"
        );
    };
    assert_eq!(again[0].envelope.id, id);
    assert_eq!(again[0].deliveries, 2);
    let mut s = Settlement::new(again[0].receipt.clone(), Disposition::Ack);
    s.record = Some(succeeded(id, "2"));
    broker
        .settle(std::slice::from_ref(&s))
        .await
        .pop()
        .expect("one answer")
        .expect("the live delivery settles");
    let rec = backend.get(id).await.expect("get").expect("a record");
    match rec.state {
        TaskState::Succeeded { result } => assert_eq!(result.get(), "2"),
        other => panic!("want the live delivery's result, got {other:?}"),
    }
    let st = QueueAdmin::stats(&broker, "q").await.expect("stats");
    assert_eq!(st.ready + st.leased + st.delayed, 0, "acked: {st:?}");
    // The stale first receipt changes nothing.
    let mut stale = Settlement::new(first[0].receipt.clone(), Disposition::Ack);
    stale.record = Some(succeeded(id, "3"));
    assert!(broker.settle(std::slice::from_ref(&stale)).await[0].is_err());
    let rec = backend.get(id).await.expect("get").expect("a record");
    match rec.state {
        TaskState::Succeeded { result } => assert_eq!(result.get(), "2"),
        other => panic!("the stale receipt overwrote the record: {other:?}"),
    }
}
