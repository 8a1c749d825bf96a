//! The control plane, task events and enqueue by name, in process on the
//! in-memory adapter (the `stem` CLI's end-to-end tests drive the same
//! through worker processes on the durable adapters).

use std::time::Duration;

use futures::StreamExt as _;
use stem::control::{Answer, Inspect};
use stem::events::EventKind;
use stem::worker::{Worker, WorkerHandle};
use stem::{AdvertisedTask, EnqueueOptions, Stem, StemError, TaskState, WorkerHeartbeat};
use stem_tests::{eventually, isolated_client};

#[stem::task(queue = "ctl_slow", retries = 0)]
async fn ctl_sleep(ctx: stem::Context, millis: u64) -> u64 {
    let _ = ctx;
    tokio::time::sleep(Duration::from_millis(millis)).await;
    millis
}

#[stem::task(queue = "ctl_fast", retries = 0)]
async fn ctl_double(n: u64) -> u64 {
    n * 2
}

const WAIT: Duration = Duration::from_secs(10);

async fn start(stem: &Stem, id: &str, queues: &[&str]) -> WorkerHandle {
    Worker::builder()
        .client(stem)
        .worker_id(id)
        .queues(queues.iter().copied())
        .concurrency(2)
        .prefetch(2)
        .heartbeat_interval(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(50))
        .events(true)
        .build()
        .await
        .expect("worker builds")
        .start()
}

/// Waits until the backend lists `n` live workers (the control client
/// expects their replies).
async fn live_workers(stem: &Stem, n: usize) {
    let backend = stem.backend().expect("memory has a backend").clone();
    assert!(
        eventually(WAIT, || {
            let backend = backend.clone();
            async move {
                backend
                    .workers()
                    .await
                    .unwrap()
                    .iter()
                    .filter(|w| w.alive)
                    .count()
                    == n
            }
        })
        .await,
        "{n} workers heartbeat"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_stats_inspect_and_terminate() {
    let stem = isolated_client("control_ping").await.with_events(true);
    let mut events = stem.events().await.unwrap();
    let a = start(&stem, "ctl-a", &["ctl_slow", "ctl_fast"]).await;
    let b = start(&stem, "ctl-b", &["ctl_fast"]).await;
    live_workers(&stem, 2).await;
    let control = stem.control().unwrap().timeout(Duration::from_secs(5));

    let pong = control.ping().await.unwrap();
    let mut who: Vec<_> = pong.replies.iter().map(|r| r.worker_id.as_str()).collect();
    who.sort_unstable();
    assert_eq!(who, ["ctl-a", "ctl-b"]);
    assert!(pong.silent.is_empty());
    assert!(pong.replies.iter().all(|r| r.answer == Answer::Pong));

    // A long task runs on ctl-a: listed as active, then stopped.
    let long = ctl_sleep::with().on(&stem).enqueue(60_000).await.unwrap();
    let id = long.id();
    let mut listed = false;
    for _ in 0..200 {
        let replies = control.inspect(Inspect::Active).await.unwrap();
        if replies.replies.iter().any(|r| {
            r.worker_id == "ctl-a"
                && matches!(&r.answer, Answer::Tasks { tasks } if tasks.iter().any(|t| t.id == id && t.name == ctl_sleep::NAME && t.started_at.is_some() && t.attempt == 1))
        }) {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(listed, "inspect active lists the running task");

    let stats = control.clone().to(["ctl-a"]).stats().await.unwrap();
    assert_eq!(stats.replies.len(), 1);
    let Answer::Stats(s) = &stats.replies[0].answer else {
        panic!("stats answer: {:?}", stats.replies[0].answer)
    };
    assert_eq!((s.concurrency, s.active), (2, 1));
    assert_eq!(s.queues, ["ctl_slow", "ctl_fast"]);

    let revoked = control.revoke(id, true).await.unwrap();
    assert!(revoked.replies.iter().any(|r| r.worker_id == "ctl-a"
        && r.answer
            == Answer::Revoked {
                id,
                running: true,
                reserved: false
            }));
    // At once, not at the next lease renewal (10 s away with the default
    // 30 s lease).
    let record = stem
        .wait_record(id, Duration::from_secs(3))
        .await
        .unwrap()
        .expect("recorded within 3 s of `revoke --terminate`");
    assert!(
        matches!(record.state, TaskState::Revoked),
        "{:?}",
        record.state
    );
    let listed = control.inspect(Inspect::Revoked).await.unwrap();
    assert!(
        listed
            .replies
            .iter()
            .all(|r| matches!(&r.answer, Answer::RevokedIds { ids } if ids.contains(&id)))
    );

    // Events of a task that runs to the end: `sent` from the producer,
    // then `received`, `started`, `succeeded` from the worker, in that
    // order (events are ordered per source; sources interleave by batch).
    let quick = ctl_double::with().on(&stem).enqueue(21).await.unwrap();
    assert_eq!(quick.wait(WAIT).await.unwrap(), 42);
    let (mut from_producer, mut from_worker) = (Vec::new(), Vec::<(EventKind, String)>::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while from_producer.is_empty() || !from_worker.iter().any(|(k, _)| *k == EventKind::Succeeded) {
        let Ok(Some(e)) = tokio::time::timeout_at(deadline, events.next()).await else {
            break;
        };
        if e.task_id != Some(quick.id()) {
            continue;
        }
        assert_eq!(e.name.as_deref(), Some(ctl_double::NAME));
        assert_eq!(e.queue.as_deref(), Some("ctl_fast"));
        if e.source.starts_with("producer:") {
            from_producer.push(e.kind);
        } else {
            from_worker.push((e.kind, e.source));
        }
    }
    assert_eq!(from_producer, [EventKind::Sent]);
    let worker = from_worker[0].1.clone();
    assert!(worker == "ctl-a" || worker == "ctl-b", "{worker}");
    assert_eq!(
        from_worker,
        [
            (EventKind::Received, worker.clone()),
            (EventKind::Started, worker.clone()),
            (EventKind::Succeeded, worker)
        ]
    );

    a.shutdown();
    b.shutdown();
    let report = a.join().await;
    assert_eq!(report.revoked, 1);
    b.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_one_queue_and_resume_restarts_it() {
    let stem = isolated_client("control_pause").await;
    let w = start(&stem, "ctl-p", &["ctl_slow", "ctl_fast"]).await;
    live_workers(&stem, 1).await;
    let control = stem.control().unwrap().timeout(Duration::from_secs(5));

    let paused = control.pause("ctl_fast").await.unwrap();
    assert!(
        matches!(&paused.replies[0].answer, Answer::Done { detail } if detail.contains("paused"))
    );
    let not_here = control.pause("nowhere").await.unwrap();
    assert!(
        matches!(&not_here.replies[0].answer, Answer::Error { message } if message.contains("does not consume `nowhere`"))
    );

    let held = ctl_double::with().on(&stem).enqueue(1).await.unwrap();
    let flowing = ctl_sleep::with().on(&stem).enqueue(1).await.unwrap();
    assert_eq!(
        flowing.wait(WAIT).await.unwrap(),
        1,
        "the other queue flows"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stem.stats("ctl_fast").await.unwrap().ready,
        1,
        "the paused queue is not consumed"
    );
    assert!(matches!(
        stem.state(held.id()).await.unwrap(),
        TaskState::Pending
    ));

    let resumed = control.resume("ctl_fast").await.unwrap();
    assert!(
        matches!(&resumed.replies[0].answer, Answer::Done { detail } if detail.contains("resumed"))
    );
    assert_eq!(held.wait(WAIT).await.unwrap(), 2);

    let stopped = control.shutdown().await.unwrap();
    assert_eq!(stopped.replies.len(), 1);
    tokio::time::timeout(WAIT, w.join())
        .await
        .expect("the worker stops when told over the control plane");
}

#[tokio::test]
async fn enqueue_by_name_checks_linked_tasks_and_uses_advertised_ones() {
    let stem = isolated_client("control_by_name").await;
    let none = EnqueueOptions::default();

    // Linked here: checked against its Args, lands on its declared queue.
    let published = stem
        .enqueue_by_name(ctl_double::NAME, r#"{"n": 4}"#, &none)
        .await
        .unwrap();
    assert_eq!(stem.stats("ctl_fast").await.unwrap().ready, 1);
    let _ = published;
    let bad = stem
        .enqueue_by_name(ctl_double::NAME, r#"{"n": "four"}"#, &none)
        .await
        .unwrap_err();
    assert!(matches!(bad, StemError::BadArgs { .. }), "{bad}");
    assert!(
        bad.to_string().contains("invalid type: string \"four\""),
        "{bad}"
    );
    assert!(matches!(
        stem.enqueue_by_name(ctl_double::NAME, "[4]", &none).await,
        Err(StemError::BadArgs { .. })
    ));

    // Not linked, and nobody runs it: refused, unless a queue is given.
    let unknown = stem
        .enqueue_by_name("billing::charge", "{}", &none)
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, StemError::UnknownTask { .. }),
        "{unknown}"
    );

    // A live worker advertises it: its queue and options apply.
    let backend = stem.backend().unwrap();
    backend
        .heartbeat(WorkerHeartbeat {
            worker_id: String::from("billing-worker"),
            host: String::from("h"),
            pid: 1,
            queues: vec![String::from("billing")],
            concurrency: 1,
            active: 0,
            at: chrono::Utc::now(),
            interval: Duration::from_secs(60),
            tasks: vec![AdvertisedTask {
                name: String::from("billing::charge"),
                queue: String::from("billing"),
                priority: 7,
                retries: 9,
            }],
            events: false,
        })
        .await
        .unwrap();
    let envelope = stem
        .envelope_by_name("billing::charge", r#"{"cents": 5}"#, &none)
        .await
        .unwrap();
    assert_eq!(
        (
            envelope.queue.as_str(),
            envelope.priority,
            envelope.max_retries
        ),
        ("billing", 7, 9)
    );
    let with_queue = EnqueueOptions {
        queue: Some(String::from("other")),
        priority: Some(1),
        ..EnqueueOptions::default()
    };
    let envelope = stem
        .envelope_by_name("billing::charge", "{}", &with_queue)
        .await
        .unwrap();
    assert_eq!((envelope.queue.as_str(), envelope.priority), ("other", 1));
}
