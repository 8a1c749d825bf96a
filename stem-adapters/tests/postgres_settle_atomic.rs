//! A completion crash between result and ack cannot happen on Postgres
//! with its result backend in the same schema: both are one statement.
//! Proven by making the result write fail inside the settlement (a trigger
//! that aborts it, as a crash would): the ack is rolled back with it, the
//! delivery stays leased, and the next delivery settles correctly with one
//! terminal record, which wakes a waiter. A stale receipt writes nothing.
#![cfg(feature = "postgres")]

use std::time::{Duration, Instant};

use std::io::Write as _;

use serde_json::value::RawValue;
use stem_adapters::postgres::{PostgresBackend, PostgresBroker, PostgresOptions, sqlx};
#[path = "support/postgres.rs"]
mod pg;
use pg::server_url;
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

/// Whether the server is missing: a SKIP line, or a failure when
/// `STEM_REQUIRE_SERVICES=1`.
fn missing() -> bool {
    let Some(why) = pg::unavailable() else {
        return false;
    };
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{why}, and STEM_REQUIRE_SERVICES=1 requires it"
    );
    // Past libtest's capture: a passing test's output is never shown.
    let _ = writeln!(std::io::stderr(), "SKIP postgres_settle_atomic: {why}");
    true
}

/// Drops the test's schema however the test ends.
struct Cleanup(PostgresBroker);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let b = self.0.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(b.drop_schema()))
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_result_write_rolls_back_its_ack_and_the_next_delivery_settles() {
    if missing() {
        return;
    }
    let opts = PostgresOptions {
        namespace: format!("atomic_{:08x}", rand_suffix()),
        ..PostgresOptions::default()
    };
    let broker = PostgresBroker::connect(&server_url(), opts.clone())
        .await
        .expect("broker");
    let _cleanup = Cleanup(broker.clone());
    let backend = PostgresBackend::connect(&server_url(), opts.clone())
        .await
        .expect("backend");
    assert!(
        broker.stores_results_of(&backend),
        "one database and schema: results go with settlements"
    );
    let other = PostgresBackend::connect(
        &server_url(),
        PostgresOptions {
            namespace: format!("{}x", opts.namespace),
            ..PostgresOptions::default()
        },
    )
    .await
    .expect("backend of another namespace");
    assert!(
        !broker.stores_results_of(&other),
        "another schema keeps its own results"
    );
    drop(other);
    let mut c = pg::admin().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{}\" CASCADE",
        stem_adapters::postgres::schema_name(&format!("{}x", opts.namespace))
    )))
    .execute(&mut c)
    .await
    .expect("drop the other schema");
    let schema = broker.schema().to_owned();

    let env = Envelope::new("t::job", "q", serde_json::json!({"n": 1})).expect("envelope");
    let id = env.id;
    broker.publish(env).await.expect("publish");
    let first = broker
        .fetch(&FetchRequest::new(["q"], 1).lease(Duration::from_millis(300)))
        .await
        .expect("fetch");
    assert_eq!(first.len(), 1);

    // The "crash": the result write fails inside the settlement.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION \"{schema}\".crash() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected crash between result and ack'; END $$; \
         CREATE TRIGGER crash_results BEFORE INSERT ON \"{schema}\".results \
         FOR EACH ROW WHEN (NEW.id = '{id}') EXECUTE FUNCTION \"{schema}\".crash();"
    )))
    .execute(&mut c)
    .await
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
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TRIGGER crash_results ON \"{schema}\".results"
    )))
    .execute(&mut c)
    .await
    .expect("drop trigger");
    // A waiter is woken by the record the settlement writes.
    let waiter = {
        let backend = backend.clone();
        tokio::spawn(async move { backend.wait(id, Duration::from_secs(30)).await })
    };
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
    let woken = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter is woken by the settlement's record, not its 30 s timeout")
        .expect("waiter task")
        .expect("wait")
        .expect("a record");
    assert!(woken.state.is_terminal());
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

fn rand_suffix() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    t ^ std::process::id().rotate_left(16)
}
