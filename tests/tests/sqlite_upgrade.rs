//! Upgrades lose nothing: `fixtures/sqlite-v3.db` was written by the code
//! before the seam was reshaped (schema v3, commit 94b8ee1, through its own
//! publish / fetch / dead_letter) and holds a ready, a delayed, a leased
//! (never acked) and a dead task. Today's code opens it, migrates it, and
//! every task is still there and runs, headers and all.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use stem::worker::Worker;
use stem::{Replay, TaskState};
use stem_tests::eventually;

/// What the upgraded tasks saw: `n` and their `fixture` header.
fn seen() -> &'static Mutex<BTreeMap<u64, String>> {
    static SEEN: OnceLock<Mutex<BTreeMap<u64, String>>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// The task the fixture's envelopes name.
#[stem::task(name = "upgrade::job", queue = "upgrade")]
async fn upgrade_job(ctx: stem::Context, n: u64) -> u64 {
    let header = ctx.header("fixture").unwrap_or("missing").to_owned();
    seen()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(n, header);
    n * 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v3_file_with_ready_delayed_leased_and_dead_tasks_upgrades_and_runs_them_all() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("stem.db");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/sqlite-v3.db"),
        &db,
    )
    .expect("fixture copies");
    let stem = stem::connect_with(&format!("sqlite://{}", db.display()), None, "stem")
        .await
        .expect("the v3 file opens and migrates");

    let stats = stem.stats("upgrade").await.expect("stats");
    assert_eq!(
        stats.ready + stats.delayed + stats.leased,
        3,
        "ready, delayed and leased tasks are all there: {stats:?}"
    );
    assert_eq!(stats.dead, 1, "the dead letter is there: {stats:?}");

    let dl = stem.broker().dead_letters().expect("dead letters");
    let dead = dl.list("upgrade", None, 10).await.expect("list").items;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "fixture: dead in v3");
    assert_eq!(dead[0].error.as_deref(), Some("fixture error"));
    let env = dead[0].envelope.as_ref().expect("the v3 envelope decodes");
    assert_eq!(env.name, "upgrade::job");
    assert_eq!(env.headers.get("fixture").map(String::as_str), Some("v3-4"));
    assert_eq!(
        dl.replay("upgrade", Replay::All, true)
            .await
            .expect("replay"),
        1
    );

    let worker = Worker::builder()
        .client(&stem)
        .queues(["upgrade"])
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .expect("worker")
        .start();
    assert!(
        eventually(Duration::from_secs(20), || async {
            seen().lock().map(|s| s.len()).unwrap_or(0) == 4
        })
        .await,
        "every task of the v3 file ran: {:?}",
        seen().lock().map(|s| s.clone())
    );
    let got = seen().lock().expect("seen").clone();
    let want: BTreeMap<u64, String> = (1..=4).map(|n| (n, format!("v3-{n}"))).collect();
    assert_eq!(got, want, "each ran with its headers");
    assert!(
        eventually(Duration::from_secs(5), || async {
            let s = stem.stats("upgrade").await.expect("stats");
            s.ready + s.delayed + s.leased + s.dead == 0
        })
        .await
    );
    worker.shutdown();
    let report = worker.join().await;
    assert_eq!(report.succeeded, 4, "{report:?}");
    let rec = stem
        .backend()
        .expect("results")
        .get(dead[0].id)
        .await
        .expect("get")
        .expect("the replayed task has a record");
    assert!(matches!(rec.state, TaskState::Succeeded { .. }), "{rec:?}");
}
