//! The worker loop, end to end, on the in-memory adapter: retries with
//! backoff, dead letters, panics, time limits, at-most-once, lease
//! extension, graceful shutdown, bad deliveries and revocation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use stem::worker::{Worker, WorkerHandle};
use stem::{Envelope, FetchRequest, Stem, TaskError, TaskState};
use stem_tests::{eventually, isolated_client};

/// A value every task in this binary can read through `State<Marker>`.
#[derive(Debug)]
struct Marker(&'static str);

fn log() -> &'static Mutex<HashMap<String, Vec<Instant>>> {
    static LOG: OnceLock<Mutex<HashMap<String, Vec<Instant>>>> = OnceLock::new();
    LOG.get_or_init(Mutex::default)
}

fn record_run(key: &str) -> usize {
    let mut map = log().lock().unwrap();
    let runs = map.entry(key.to_owned()).or_default();
    runs.push(Instant::now());
    runs.len()
}

fn runs(key: &str) -> Vec<Instant> {
    log().lock().unwrap().get(key).cloned().unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
#[error("flaky failure #{0}")]
struct FlakyError(usize);

#[stem::task(
    queue = "retry",
    retries = 3,
    backoff = "exponential",
    backoff_base = "200ms"
)]
async fn flaky(key: String, succeed_on: usize) -> Result<usize, FlakyError> {
    let n = record_run(&key);
    if n >= succeed_on {
        Ok(n)
    } else {
        Err(FlakyError(n))
    }
}

#[stem::task(queue = "dead", retries = 1, backoff = "none")]
async fn always_fails(key: String) -> Result<(), FlakyError> {
    Err(FlakyError(record_run(&key)))
}

#[stem::task(queue = "panics", retries = 0)]
async fn panics(key: String) -> u32 {
    record_run(&key);
    panic!("boom in {key}");
}

#[stem::task(queue = "panics")]
async fn fine(x: u32) -> u32 {
    x * 2
}

static DROPPED: AtomicBool = AtomicBool::new(false);

struct DropFlag;
impl Drop for DropFlag {
    fn drop(&mut self) {
        DROPPED.store(true, Ordering::SeqCst);
    }
}

#[stem::task(queue = "slowpoke", timeout = "200ms", retries = 0)]
async fn too_slow() {
    let _flag = DropFlag;
    tokio::time::sleep(Duration::from_secs(30)).await;
}

#[stem::task(queue = "amo", delivery = "at_most_once", retries = 3)]
async fn at_most_once(ctx: stem::Context, key: String) -> Result<u32, FlakyError> {
    record_run(&key);
    // The delivery was acked before the body ran: nothing is leased.
    let stats = ctx
        .client()
        .expect("worker passes a client")
        .stats(ctx.queue())
        .await
        .expect("stats");
    Err(FlakyError(
        usize::try_from(stats.leased).unwrap_or(usize::MAX),
    ))
}

#[stem::task(queue = "long")]
async fn long_runner(key: String, millis: u64) -> usize {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    record_run(&key)
}

#[stem::task(queue = "uses_state")]
async fn uses_state(marker: stem::State<Marker>, suffix: String) -> String {
    format!("{}{suffix}", marker.0)
}

async fn start(
    stem: &Stem,
    queues: &[&str],
    configure: impl FnOnce(stem::worker::WorkerBuilder) -> stem::worker::WorkerBuilder,
) -> WorkerHandle {
    let builder = Worker::builder()
        .client(stem)
        .state(Marker("state:"))
        .queues(queues.iter().copied())
        .poll_interval(Duration::from_millis(50))
        .heartbeat_interval(Duration::from_millis(200));
    configure(builder)
        .build()
        .await
        .expect("worker builds")
        .start()
}

/// A consumer that keeps asking `queue` for work for `how_long` (taking
/// what it gets under a 5 s lease); resolves to how many it got.
fn rival_consumer(
    stem: &Stem,
    queue: &'static str,
    how_long: Duration,
) -> tokio::task::JoinHandle<usize> {
    let broker = Arc::clone(stem.broker());
    tokio::spawn(async move {
        let mut stolen = 0;
        let until = Instant::now() + how_long;
        while Instant::now() < until {
            stolen += broker
                .fetch(&FetchRequest::new([queue], 10).lease(Duration::from_secs(5)))
                .await
                .unwrap()
                .len();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        stolen
    })
}

async fn stop(worker: WorkerHandle) -> stem::worker::WorkerReport {
    worker.shutdown();
    worker.join().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_exponential_backoff() {
    let stem = isolated_client("retry").await;
    let worker = start(&stem, &["retry"], |b| b).await;
    let key = format!("retry-{}", stem::TaskId::new());
    let handle = flaky::enqueue_on(&stem, key.clone(), 3).await.unwrap();
    let out = handle
        .wait(Duration::from_secs(10))
        .await
        .expect("third attempt succeeds");
    assert_eq!(out, 3);
    let times = runs(&key);
    assert_eq!(times.len(), 3);
    let gap1 = times[1] - times[0];
    let gap2 = times[2] - times[1];
    // Exponential with equal jitter: retry 1 waits 100..=200 ms, retry 2 waits 200..=400 ms.
    assert!(
        gap1 >= Duration::from_millis(100),
        "first retry too early: {gap1:?}"
    );
    assert!(
        gap1 < Duration::from_millis(200 + 300),
        "first retry too late: {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(200),
        "second retry too early: {gap2:?}"
    );
    assert!(
        gap2 < Duration::from_millis(400 + 300),
        "second retry too late: {gap2:?}"
    );
    let rec = stem
        .backend()
        .unwrap()
        .get(handle.id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.attempts, 3);
    let report = stop(worker).await;
    assert_eq!(report.retried, 2);
    assert_eq!(report.succeeded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_after_last_attempt_with_last_error() {
    let stem = isolated_client("dead").await;
    let worker = start(&stem, &["dead"], |b| b).await;
    let key = format!("dead-{}", stem::TaskId::new());
    let handle = always_fails::enqueue_on(&stem, key.clone()).await.unwrap();
    let err = handle.wait(Duration::from_secs(10)).await.unwrap_err();
    match err {
        TaskError::Failed {
            message, type_name, ..
        } => {
            assert_eq!(message, "flaky failure #2");
            assert!(type_name.ends_with("FlakyError"), "{type_name}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(runs(&key).len(), 2, "one attempt plus one retry");
    let broker = stem.broker();
    assert!(
        eventually(Duration::from_secs(5), || async {
            broker
                .dead_letters()
                .expect("dead letters")
                .count("dead")
                .await
                .unwrap()
                == 1
        })
        .await
    );
    let dead = broker
        .dead_letters()
        .expect("dead letters")
        .list("dead", None, 10)
        .await
        .unwrap()
        .items;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("retries exhausted"),
        "{}",
        dead[0].reason
    );
    assert!(
        dead[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("flaky failure #2")
    );
    let env = dead[0].envelope.as_ref().expect("full envelope kept");
    assert_eq!(env.id, handle.id());
    assert_eq!(env.attempt, 2);
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_a_failure_not_a_crash() {
    let stem = isolated_client("panic").await;
    let worker = start(&stem, &["panics"], |b| b).await;
    let key = format!("panic-{}", stem::TaskId::new());
    let bad = panics::enqueue_on(&stem, key.clone()).await.unwrap();
    match bad.wait(Duration::from_secs(10)).await.unwrap_err() {
        TaskError::Failed {
            message, type_name, ..
        } => {
            assert_eq!(type_name, "panic");
            assert!(message.contains("boom in"), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // The worker is still alive and runs the next task.
    let good = fine::enqueue_on(&stem, 21).await.unwrap();
    assert_eq!(good.wait(Duration::from_secs(10)).await.unwrap(), 42);
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_limit_drops_the_future() {
    let stem = isolated_client("timeout").await;
    let worker = start(&stem, &["slowpoke"], |b| b).await;
    let begun = Instant::now();
    let handle = too_slow::enqueue_on(&stem).await.unwrap();
    match handle.wait(Duration::from_secs(10)).await.unwrap_err() {
        TaskError::Failed { message, .. } => assert!(message.contains("time limit"), "{message}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(begun.elapsed() < Duration::from_secs(5));
    assert!(
        DROPPED.load(Ordering::SeqCst),
        "the task's future was dropped"
    );
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_acks_before_running_and_never_retries() {
    let stem = isolated_client("amo").await;
    let worker = start(&stem, &["amo"], |b| b).await;
    let key = format!("amo-{}", stem::TaskId::new());
    let handle = at_most_once::enqueue_on(&stem, key.clone()).await.unwrap();
    match handle.wait(Duration::from_secs(10)).await.unwrap_err() {
        // The body reports the leased count it saw while running.
        TaskError::Failed { message, .. } => assert_eq!(message, "flaky failure #0"),
        other => panic!("expected Failed, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runs(&key).len(), 1, "never retried");
    assert_eq!(
        stem.broker()
            .dead_letters()
            .expect("dead letters")
            .count("amo")
            .await
            .unwrap(),
        0
    );
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_extension_keeps_a_long_task_from_redelivery() {
    let stem = isolated_client("lease").await;
    let worker = start(&stem, &["long"], |b| b.lease(Duration::from_millis(300))).await;
    let key = format!("lease-{}", stem::TaskId::new());
    let handle = long_runner::enqueue_on(&stem, key.clone(), 1500)
        .await
        .unwrap();
    // Once the worker runs it (before, the rival could simply win the
    // first fetch), a rival consumer keeps asking for work on the queue.
    let seen_start = Instant::now();
    while !matches!(handle.state().await.unwrap(), TaskState::Started) {
        assert!(
            seen_start.elapsed() < Duration::from_secs(5),
            "the worker never started the task"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rival = rival_consumer(&stem, "long", Duration::from_millis(1200));
    assert_eq!(handle.wait(Duration::from_secs(10)).await.unwrap(), 1);
    assert_eq!(
        rival.await.unwrap(),
        0,
        "the rival never received the leased task"
    );
    assert_eq!(runs(&key).len(), 1);
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_requeues_unfinished_work_and_loses_nothing() {
    let stem = isolated_client("shutdown").await;
    let worker = start(&stem, &["long"], |b| {
        b.concurrency(2).shutdown_grace(Duration::from_millis(300))
    })
    .await;
    let key = format!("shutdown-{}", stem::TaskId::new());
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(
            long_runner::enqueue_on(&stem, key.clone(), 100)
                .await
                .unwrap(),
        );
    }
    for _ in 0..4 {
        handles.push(
            long_runner::enqueue_on(&stem, key.clone(), 5_000)
                .await
                .unwrap(),
        );
    }
    // Let the short ones finish and two long ones start.
    assert!(eventually(Duration::from_secs(5), || async { runs(&key).len() == 3 }).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = stop(worker).await;
    assert_eq!(report.succeeded, 3);
    assert!(
        report.requeued >= 2,
        "running long tasks were requeued: {report:?}"
    );
    let stats = stem.stats("long").await.unwrap();
    assert_eq!(
        stats.ready, 4,
        "all four long tasks are back in the queue: {stats:?}"
    );
    assert_eq!(stats.leased, 0);
    // No attempt was charged for the interruption.
    let broker = stem.broker();
    let back = broker
        .fetch(&FetchRequest::new(["long"], 10))
        .await
        .unwrap();
    assert_eq!(back.len(), 4);
    for d in &back {
        assert_eq!(d.envelope.attempt, 0);
        broker
            .settle_one(stem::Settlement::new(
                d.receipt.clone(),
                stem::Disposition::Release {
                    after: Duration::ZERO,
                },
            ))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_deliveries_keep_their_leases_while_they_wait() {
    let stem = isolated_client("prefetch-lease").await;
    // One slot, four held: three tasks of 400 ms each, so the last waits
    // 800 ms in the worker's queue: well past its 300 ms lease.
    let worker = start(&stem, &["long"], |b| {
        b.concurrency(1)
            .prefetch(4)
            .lease(Duration::from_millis(300))
    })
    .await;
    let key = format!("prefetch-lease-{}", stem::TaskId::new());
    let handles = long_runner::with()
        .on(&stem)
        .enqueue_many((0..3).map(|_| long_runner::Args {
            key: key.clone(),
            millis: 400,
        }))
        .await
        .unwrap();
    // Once the worker holds all three, a rival polls the queue.
    assert!(
        eventually(Duration::from_secs(5), || async {
            stem.stats("long").await.unwrap().leased == 3
        })
        .await,
        "the worker prefetched all three"
    );
    let rival = rival_consumer(&stem, "long", Duration::from_millis(1000));
    for h in handles {
        h.wait(Duration::from_secs(10)).await.unwrap();
    }
    assert_eq!(
        rival.await.unwrap(),
        0,
        "no waiting delivery's lease lapsed"
    );
    assert_eq!(runs(&key).len(), 3, "each ran once");
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_requeues_prefetched_deliveries_without_running_them() {
    let stem = isolated_client("prefetch-stop").await;
    let worker = start(&stem, &["long"], |b| {
        b.concurrency(1)
            .prefetch(4)
            .shutdown_grace(Duration::from_secs(5))
    })
    .await;
    let key = format!("prefetch-stop-{}", stem::TaskId::new());
    // In one publish, so the idle worker claims all four at once (sent one
    // by one, it may claim three and then, with a slot busy, wait for half
    // its window to free before claiming again).
    long_runner::with()
        .on(&stem)
        .enqueue_many((0..4).map(|_| long_runner::Args {
            key: key.clone(),
            millis: 300,
        }))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            stem.stats("long").await.unwrap().leased == 4
        })
        .await,
        "the worker holds all four"
    );
    let report = stop(worker).await;
    // The running one finishes within the grace; the three waiting are
    // handed back untouched.
    assert_eq!(report.succeeded, 1, "{report:?}");
    assert_eq!(report.requeued, 3, "{report:?}");
    assert_eq!(runs(&key).len(), 1);
    let stats = stem.stats("long").await.unwrap();
    assert_eq!((stats.ready, stats.leased), (3, 0), "{stats:?}");
    let back = stem
        .broker()
        .fetch(&FetchRequest::new(["long"], 10))
        .await
        .unwrap();
    assert_eq!(back.len(), 3);
    for d in &back {
        assert_eq!(d.envelope.attempt, 0, "no attempt charged");
        stem.broker().ack(&d.receipt).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_below_the_concurrency_is_refused() {
    let stem = isolated_client("prefetch-bad").await;
    let err = Worker::builder()
        .client(&stem)
        .queues(["long"])
        .concurrency(8)
        .prefetch(4)
        .build()
        .await
        .expect_err("prefetch 4 < concurrency 8");
    let text = err.to_string();
    assert!(
        text.contains("WorkerBuilder::prefetch") && text.contains("at least the concurrency (8)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_past_the_grace_and_bad_args_are_dead_lettered_with_a_reason() {
    let stem = isolated_client("garbage").await;
    let worker = start(&stem, &["panics"], |b| b.unknown_task_grace(Duration::ZERO)).await;
    let unknown = Envelope::new("no::such::task", "panics", serde_json::json!({})).unwrap();
    stem.publish(unknown).await.unwrap();
    let bad_args = Envelope::new(
        fine::NAME,
        "panics",
        serde_json::json!({"x": "not a number"}),
    )
    .unwrap();
    stem.publish(bad_args).await.unwrap();
    let broker = stem.broker();
    assert!(
        eventually(Duration::from_secs(5), || async {
            broker
                .dead_letters()
                .expect("dead letters")
                .count("panics")
                .await
                .unwrap()
                == 2
        })
        .await
    );
    let dead = broker
        .dead_letters()
        .expect("dead letters")
        .list("panics", None, 10)
        .await
        .unwrap()
        .items;
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown task name `no::such::task`")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("undecodable arguments") && r.contains("invalid type")),
        "{reasons:?}"
    );
    // The worker keeps running.
    let good = fine::enqueue_on(&stem, 2).await.unwrap();
    assert_eq!(good.wait(Duration::from_secs(10)).await.unwrap(), 4);
    stop(worker).await;
}

/// A rolling deploy: the old build's worker receives a task only the new
/// build knows. It hands it back (no attempt charged, a short delay), so
/// the new build's worker, consuming the same queue, runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_task_is_handed_back_for_another_build_during_a_rolling_deploy() {
    let stem = isolated_client("rolling").await;
    let old_build = start(&stem, &["deploy"], |b| b).await;
    let new_task = Envelope::new(
        "new_build::send_invoice",
        "deploy",
        serde_json::json!({"n": 1}),
    )
    .unwrap();
    let id = stem.publish(new_task).await.unwrap().id();
    // The old build has seen it and handed it back.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let s = stem.stats("deploy").await.unwrap();
            s.delayed == 1 && s.leased == 0
        })
        .await,
        "handed back with a delay, not run and not dead-lettered: {:?}",
        stem.stats("deploy").await.unwrap()
    );
    stop(old_build).await;
    // The new build's worker (here: a consumer that knows the name).
    let deadline = Instant::now() + Duration::from_secs(15);
    let got = loop {
        let got = stem
            .broker()
            .fetch(&FetchRequest::new(["deploy"], 1).wait(Duration::from_millis(200)))
            .await
            .unwrap();
        if !got.is_empty() {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "the handed-back task never came back"
        );
    };
    assert_eq!(got[0].envelope.id, id);
    assert_eq!(got[0].envelope.attempt, 0, "no attempt was charged");
    assert!(
        got[0].deliveries >= 2,
        "it was delivered to the old build first"
    );
    stem.broker().ack(&got[0].receipt).await.unwrap();
    let dead = stem
        .broker()
        .dead_letters()
        .expect("dead letters")
        .count("deploy")
        .await
        .unwrap();
    assert_eq!(dead, 0, "nothing was dead-lettered");
}

/// A task no worker knows is dead-lettered once the grace has passed, with
/// a reason that names the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_task_is_dead_lettered_after_the_grace() {
    let stem = isolated_client("grace").await;
    let worker = start(&stem, &["graced"], |b| {
        b.unknown_task_grace(Duration::from_millis(1500))
    })
    .await;
    let started = Instant::now();
    stem.publish(Envelope::new("nobody::knows", "graced", serde_json::json!({})).unwrap())
        .await
        .unwrap();
    let dl = stem.broker().dead_letters().expect("dead letters");
    assert!(
        eventually(Duration::from_secs(15), || async {
            dl.count("graced").await.unwrap() == 1
        })
        .await
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "dead-lettered before the grace ended ({:?})",
        started.elapsed()
    );
    let dead = dl.list("graced", None, 10).await.unwrap().items;
    assert!(
        dead[0].reason.contains("within the grace of 1s 500ms"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].envelope.as_ref().map(|e| e.attempt), Some(0));
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tasks_are_skipped() {
    let stem = isolated_client("revoke").await;
    let key = format!("revoke-{}", stem::TaskId::new());
    let handle = long_runner::enqueue_on(&stem, key.clone(), 1)
        .await
        .unwrap();
    stem.revoke(handle.id()).await.unwrap();
    let worker = start(&stem, &["long"], |b| b).await;
    assert_eq!(
        handle.wait(Duration::from_secs(10)).await.unwrap_err(),
        TaskError::Revoked {
            task_id: handle.id()
        }
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            stem.stats("long").await.unwrap() == stem::QueueStats::default()
        })
        .await,
        "the revoked delivery was acked"
    );
    assert!(runs(&key).is_empty(), "a revoked task never runs");
    let report = stop(worker).await;
    assert_eq!(report.revoked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_injected_and_results_are_recorded() {
    let stem = isolated_client("state").await;
    let worker = start(&stem, &["uses_state"], |b| b).await;
    let h = uses_state::enqueue_on(&stem, "ok".into()).await.unwrap();
    assert_eq!(h.wait(Duration::from_secs(10)).await.unwrap(), "state:ok");
    assert!(matches!(
        h.state().await.unwrap(),
        TaskState::Succeeded { .. }
    ));
    let backend = stem.backend().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            let workers = backend.workers().await.unwrap();
            workers
                .iter()
                .any(|w| w.alive && w.heartbeat.queues == ["uses_state"])
        })
        .await,
        "the worker's heartbeat is recorded"
    );
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_required_state_refuses_to_start() {
    let stem = isolated_client("nostate").await;
    let err = Worker::builder().client(&stem).build().await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("uses_state") && msg.contains("Marker"),
        "{msg}"
    );
}
