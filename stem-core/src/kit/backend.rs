//! Result backend clauses R1..R7 of CONTRACT.md, one public case each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::value::RawValue;

use super::{AdapterFactory, KitOptions, eventually, guarded};
use crate::backend::{
    FailureKind, GroupSpec, ResultBackend, TaskFailure, TaskRecord, TaskState, WorkerHeartbeat,
};
use crate::envelope::{Envelope, TaskId};

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap_or_else(|e| panic!("kit JSON is valid: {e}"))
}

fn failure(message: &str, kind: FailureKind) -> TaskFailure {
    TaskFailure {
        message: message.to_owned(),
        type_name: String::from("kit::KitError"),
        kind,
    }
}

pub(super) fn record(id: TaskId, state: TaskState, attempts: u32) -> TaskRecord {
    let mut r = TaskRecord::new(id, state);
    r.attempts = attempts;
    r.name = Some(String::from("kit::job"));
    r.worker_id = Some(String::from("kit-worker-1"));
    r
}

pub(super) fn succeeded(json: &str) -> TaskState {
    TaskState::Succeeded { result: raw(json) }
}

async fn store(b: &dyn ResultBackend, r: TaskRecord) -> bool {
    b.store(r)
        .await
        .unwrap_or_else(|e| panic!("store failed: {e}"))
}

async fn get(b: &dyn ResultBackend, id: TaskId) -> Option<TaskRecord> {
    b.get(id)
        .await
        .unwrap_or_else(|e| panic!("get failed: {e}"))
}

async fn state_of(b: &dyn ResultBackend, id: TaskId) -> &'static str {
    get(b, id).await.map_or("none", |r| r.state.name())
}

/// Times written by one clock and read back through another store lose at
/// most a little precision (Postgres keeps microseconds).
fn close(a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
    (a - b).abs() <= TimeDelta::milliseconds(1)
}

fn json_eq(a: &RawValue, b: &str) -> bool {
    let a: serde_json::Value = serde_json::from_str(a.get()).unwrap_or_default();
    let b: serde_json::Value = serde_json::from_str(b).unwrap_or_default();
    a == b
}

/// R1: every state round-trips with attempts, timestamps and worker id, and
/// transitions are monotonic: late writes never overwrite terminal states,
/// earlier attempts never overwrite later ones, `Pending` never overwrites
/// a started task.
pub async fn r1_states(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r1");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let id = TaskId::new();
        assert!(get(&*b, id).await.is_none(), "an unknown id has no record");

        // The normal walk, each step allowed.
        assert!(store(&*b, record(id, TaskState::Pending, 0)).await);
        assert_eq!(state_of(&*b, id).await, "pending");
        let mut started = record(id, TaskState::Started, 1);
        let started_at = Utc::now();
        started.started_at = Some(started_at);
        started.progress = Some(serde_json::json!({"done": 3, "of": 10}));
        assert!(store(&*b, started).await, "Started replaces Pending");
        let r = get(&*b, id).await.expect("record");
        assert_eq!(r.state.name(), "started");
        assert_eq!(r.attempts, 1);
        assert_eq!(r.worker_id.as_deref(), Some("kit-worker-1"));
        assert_eq!(r.name.as_deref(), Some("kit::job"));
        assert!(
            r.started_at.is_some_and(|t| close(t, started_at)),
            "started_at round-trips"
        );
        assert_eq!(
            r.progress,
            Some(serde_json::json!({"done": 3, "of": 10})),
            "progress round-trips"
        );

        assert!(
            !store(&*b, record(id, TaskState::Pending, 1)).await,
            "Pending never replaces a started task"
        );
        let next_at = Utc::now() + TimeDelta::seconds(30);
        let retrying = TaskState::Retrying {
            next_at,
            error: failure("first try failed", FailureKind::Error),
        };
        assert!(
            store(&*b, record(id, retrying, 1)).await,
            "Retrying replaces Started"
        );
        match get(&*b, id).await.map(|r| r.state) {
            Some(TaskState::Retrying { next_at: n, error }) => {
                assert!(close(n, next_at), "next_at round-trips");
                assert_eq!(error, failure("first try failed", FailureKind::Error));
            }
            other => panic!("expected Retrying, got {other:?}"),
        }
        assert!(
            store(&*b, record(id, TaskState::Started, 2)).await,
            "the next attempt starts"
        );
        assert!(
            !store(&*b, record(id, TaskState::Started, 1)).await,
            "an earlier attempt never replaces a later one"
        );
        assert_eq!(get(&*b, id).await.map(|r| r.attempts), Some(2));
        assert!(store(&*b, record(id, succeeded(r#"{"sent": true, "n": 2}"#), 2)).await);

        // Terminal: every late write is refused and changes nothing.
        for late in [
            record(id, TaskState::Pending, 0),
            record(id, TaskState::Started, 2),
            record(id, TaskState::Started, 3),
            record(
                id,
                TaskState::Failed {
                    error: failure("late", FailureKind::Timeout),
                },
                2,
            ),
            record(id, TaskState::Revoked, 3),
            record(id, succeeded("0"), 9),
        ] {
            let what = late.state.name();
            assert!(
                !store(&*b, late).await,
                "a late {what} overwrote a terminal record"
            );
        }
        let r = get(&*b, id).await.expect("record");
        match &r.state {
            TaskState::Succeeded { result } => assert!(
                json_eq(result, r#"{"n": 2, "sent": true}"#),
                "result: {}",
                result.get()
            ),
            other => panic!("expected Succeeded, got {other:?}"),
        }
        assert_eq!(r.attempts, 2);

        // The other terminal states round-trip and are terminal too.
        let failed = TaskId::new();
        let error = failure("no such mailbox", FailureKind::Fatal);
        assert!(
            store(
                &*b,
                record(
                    failed,
                    TaskState::Failed {
                        error: error.clone()
                    },
                    3
                )
            )
            .await
        );
        match get(&*b, failed).await.map(|r| r.state) {
            Some(TaskState::Failed { error: e }) => assert_eq!(e, error),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(
            !store(&*b, record(failed, TaskState::Started, 4)).await,
            "Failed is terminal"
        );
        let revoked = TaskId::new();
        assert!(store(&*b, record(revoked, TaskState::Revoked, 0)).await);
        assert!(
            !store(&*b, record(revoked, TaskState::Started, 1)).await,
            "Revoked is terminal"
        );
        assert_eq!(state_of(&*b, revoked).await, "revoked");

        // store_many: one result each, in order, same rule.
        let fresh = TaskId::new();
        let results = b
            .store_many(vec![
                record(fresh, TaskState::Started, 1),
                record(fresh, TaskState::Pending, 0),
                record(fresh, succeeded("1"), 1),
                record(revoked, TaskState::Started, 1),
            ])
            .await;
        let results: Vec<bool> = results
            .into_iter()
            .map(|r| r.expect("store_many"))
            .collect();
        assert_eq!(results, [true, false, true, false]);
        assert_eq!(state_of(&*b, fresh).await, "succeeded");
    })
    .await;
}

/// R2: `wait` returns as soon as the record is terminal, or the latest
/// record when the timeout passes.
pub async fn r2_wait(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r2");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let slack = f.tick() + Duration::from_millis(400);

        // Unknown: None after the timeout.
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let r = b.wait(TaskId::new(), timeout).await.expect("wait");
        assert!(r.is_none());
        let took = started.elapsed();
        assert!(
            took + Duration::from_millis(20) >= timeout && took <= timeout + slack,
            "wait took {took:?} for a {timeout:?} timeout"
        );

        // Not terminal: the latest record after the timeout.
        let running = TaskId::new();
        assert!(store(&*b, record(running, TaskState::Started, 1)).await);
        let r = b.wait(running, timeout).await.expect("wait");
        assert_eq!(
            r.map(|r| r.state.name()),
            Some("started"),
            "the latest record comes back on timeout"
        );

        // Already terminal: at once.
        let done = TaskId::new();
        assert!(store(&*b, record(done, succeeded("42"), 1)).await);
        let started = Instant::now();
        let r = b.wait(done, Duration::from_secs(10)).await.expect("wait");
        assert_eq!(r.map(|r| r.state.name()), Some("succeeded"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waiting on a finished task returns at once"
        );

        // Finishes while waited on (through another client): woken within a tick.
        let later = TaskId::new();
        assert!(store(&*b, record(later, TaskState::Started, 1)).await);
        let writer = f.backend(&o).await;
        let finish_after = Duration::from_millis(300);
        let finisher = tokio::spawn(async move {
            tokio::time::sleep(finish_after).await;
            writer
                .store(record(
                    later,
                    TaskState::Failed {
                        error: failure("boom", FailureKind::Panic),
                    },
                    1,
                ))
                .await
                .expect("store")
        });
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let r = b.wait(later, Duration::from_secs(10)).await.expect("wait");
                    (r, started.elapsed())
                })
            })
            .collect();
        assert!(finisher.await.expect("finisher"));
        for w in waiters {
            let (r, took) = w.await.expect("waiter");
            assert_eq!(
                r.map(|r| r.state.name()),
                Some("failed"),
                "every waiter sees the terminal record"
            );
            assert!(
                took + Duration::from_millis(20) >= finish_after,
                "returned before the task finished ({took:?})"
            );
            assert!(
                took <= finish_after + slack,
                "woken {took:?} after waiting, the task finished after {finish_after:?}"
            );
        }
    })
    .await;
}

/// R3 housekeeping: `maintain` drops only what has expired. A live record,
/// group, revocation and worker heartbeat are all still there after it,
/// and an expired record stays gone.
pub async fn r3_maintain_keeps_live_data(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r3_maintain");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let live = TaskId::new();
        let mut rec = record(live, succeeded("1"), 1);
        rec.ttl = Duration::from_secs(3600);
        assert!(store(&*b, rec).await);
        let short = TaskId::new();
        let mut rec = record(short, succeeded("2"), 1);
        rec.ttl = Duration::from_secs(1);
        assert!(store(&*b, rec).await);
        let group = TaskId::new();
        b.create_group(GroupSpec {
            id: group,
            members: vec![TaskId::new()],
            callback: None,
            ttl: Duration::from_secs(3600),
        })
        .await
        .expect("create_group");
        let revoked = TaskId::new();
        b.revoke(revoked, Duration::from_secs(3600))
            .await
            .expect("revoke");
        b.heartbeat(heartbeat("kit-maintain", Duration::from_secs(60)))
            .await
            .expect("heartbeat");

        tokio::time::sleep(Duration::from_millis(1_300)).await;
        b.maintain().await.expect("maintain");

        assert!(
            get(&*b, live).await.is_some(),
            "maintain dropped a live record"
        );
        assert!(
            get(&*b, short).await.is_none(),
            "an expired record came back"
        );
        assert!(
            b.group(group).await.expect("group").is_some(),
            "maintain dropped a live group"
        );
        assert_eq!(
            b.revoked(&[revoked]).await.expect("revoked"),
            [true],
            "maintain dropped a live revocation"
        );
        assert_eq!(
            alive(&*b, "kit-maintain").await,
            Some(true),
            "maintain dropped a live worker's heartbeat"
        );
    })
    .await;
}

/// R3: records expire after their TTL, each with its own.
pub async fn r3_expiry(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r3");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let short = TaskId::new();
        let long = TaskId::new();
        let default_ttl = TaskId::new();
        let mut r = record(short, succeeded("1"), 1);
        r.ttl = Duration::from_secs(1);
        assert!(store(&*b, r).await);
        let mut r = record(long, succeeded("2"), 1);
        r.ttl = Duration::from_secs(3600);
        assert!(store(&*b, r).await);
        assert!(store(&*b, record(default_ttl, succeeded("3"), 1)).await);
        let stored = Instant::now();
        assert!(get(&*b, short).await.is_some(), "kept within its TTL");

        eventually(
            "the 1 s record to expire",
            Duration::from_secs(1) + f.tick() + Duration::from_secs(3),
            || {
                let b = b.clone();
                // Reads hide expired records by themselves; `maintain`
                // only reclaims the space.
                async move { get(&*b, short).await.is_none() }
            },
        )
        .await;
        assert!(
            stored.elapsed() + Duration::from_millis(50) >= Duration::from_secs(1),
            "expired before its TTL"
        );
        b.maintain().await.expect("maintain");
        assert!(get(&*b, short).await.is_none(), "maintain keeps it gone");
        assert!(
            b.wait(short, Duration::from_millis(100))
                .await
                .expect("wait")
                .is_none(),
            "wait sees the expiry"
        );
        assert!(
            get(&*b, long).await.is_some(),
            "a record with a long TTL stays"
        );
        assert!(
            get(&*b, default_ttl).await.is_some(),
            "a record with the default TTL stays"
        );

        // An expired terminal record no longer blocks a new one.
        assert!(
            store(&*b, record(short, TaskState::Pending, 0)).await,
            "an expired record does not block writes"
        );
        assert_eq!(state_of(&*b, short).await, "pending");
    })
    .await;
}

/// R4: a group of N reports its members in the order they were added and
/// completes when all N are terminal.
pub async fn r4_groups(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r4");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        assert!(
            b.group(TaskId::new()).await.expect("group").is_none(),
            "an unknown group is None"
        );
        // Members in an order that is neither id order nor creation order.
        let ids: Vec<TaskId> = (0..4).map(|_| TaskId::new()).collect();
        let members = vec![ids[2], ids[0], ids[3], ids[1]];
        let group = TaskId::new();
        b.create_group(GroupSpec {
            id: group,
            members: members.clone(),
            callback: None,
            ttl: Duration::from_secs(3600),
        })
        .await
        .expect("create_group");

        let status = b
            .group(group)
            .await
            .expect("group")
            .expect("the group exists");
        assert_eq!(status.id, group);
        assert_eq!(
            status.members.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            members
        );
        assert!(
            status.members.iter().all(|(_, r)| r.is_none()),
            "no member has a record yet"
        );
        assert!(!status.complete);

        let results = ["\"two\"", "\"zero\"", "\"three\""];
        assert!(store(&*b, record(ids[2], succeeded(results[0]), 1)).await);
        assert!(store(&*b, record(ids[0], succeeded(results[1]), 1)).await);
        assert!(
            store(
                &*b,
                record(
                    ids[3],
                    TaskState::Failed {
                        error: failure("bad", FailureKind::Error)
                    },
                    2
                )
            )
            .await
        );
        assert!(store(&*b, record(ids[1], TaskState::Started, 1)).await);
        let status = b.group(group).await.expect("group").expect("group");
        assert!(!status.complete, "a started member keeps the group open");

        assert!(store(&*b, record(ids[1], succeeded("\"one\""), 1)).await);
        let status = b.group(group).await.expect("group").expect("group");
        assert!(status.complete, "all members terminal completes the group");
        let order: Vec<TaskId> = status.members.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            order, members,
            "results come back in the order the members were added"
        );
        let states: Vec<&str> = status
            .members
            .iter()
            .map(|(_, r)| r.as_ref().map_or("none", |r| r.state.name()))
            .collect();
        assert_eq!(states, ["succeeded", "succeeded", "failed", "succeeded"]);
        match status.members[1].1.as_ref().map(|r| &r.state) {
            Some(TaskState::Succeeded { result }) => assert!(json_eq(result, "\"zero\"")),
            other => panic!("member 1 should hold its result, got {other:?}"),
        }
        assert!(
            b.member_finished(group)
                .await
                .expect("member_finished")
                .is_none(),
            "no callback, nothing to enqueue"
        );
    })
    .await;
}

/// R5: when a group completes its chord callback is handed out exactly
/// once, even to concurrent finishers and re-delivered members.
pub async fn r5_chords(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r5");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        assert!(
            b.member_finished(TaskId::new())
                .await
                .expect("member_finished")
                .is_none(),
            "an unknown group hands out nothing"
        );

        for round in 0..10 {
            let members: Vec<TaskId> = (0..3).map(|_| TaskId::new()).collect();
            let group = TaskId::new();
            let callback = Envelope::new(
                "kit::callback",
                "chords",
                serde_json::json!({ "round": round }),
            )
            .unwrap_or_else(|e| panic!("kit envelope: {e}"));
            b.create_group(GroupSpec {
                id: group,
                members: members.clone(),
                callback: Some(callback.clone()),
                ttl: Duration::from_secs(3600),
            })
            .await
            .expect("create_group");

            assert!(store(&*b, record(members[0], succeeded("0"), 1)).await);
            assert!(
                b.member_finished(group)
                    .await
                    .expect("member_finished")
                    .is_none(),
                "not complete yet"
            );

            // The last two members finish at the same moment on two workers,
            // and stragglers (re-deliveries) call in too.
            let barrier = Arc::new(tokio::sync::Barrier::new(6));
            let mut finishers = Vec::new();
            for k in 0..6 {
                let client = f.backend(&o).await;
                let barrier = barrier.clone();
                let member = members[1 + k % 2];
                finishers.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let _ = client
                        .store(record(member, succeeded("1"), 1))
                        .await
                        .expect("store");
                    client
                        .member_finished(group)
                        .await
                        .expect("member_finished")
                }));
            }
            let mut handed = Vec::new();
            for t in finishers {
                if let Some(env) = t.await.expect("finisher") {
                    handed.push(env);
                }
            }
            assert_eq!(
                handed.len(),
                1,
                "round {round}: the callback must be handed out exactly once, got {}",
                handed.len()
            );
            assert_eq!(handed[0].id, callback.id, "the stored callback comes back");
            assert_eq!(handed[0].args.get(), callback.args.get());

            // A member that runs again later changes nothing.
            let _ = store(&*b, record(members[2], succeeded("2"), 2)).await;
            assert!(
                b.member_finished(group)
                    .await
                    .expect("member_finished")
                    .is_none(),
                "never twice"
            );
        }

        // Creating the same group again (a retried request) must not re-arm it.
        let member = TaskId::new();
        let group = TaskId::new();
        let callback = Envelope::new("kit::callback", "chords", serde_json::json!({}))
            .unwrap_or_else(|e| panic!("{e}"));
        let spec = GroupSpec {
            id: group,
            members: vec![member],
            callback: Some(callback),
            ttl: Duration::from_secs(3600),
        };
        b.create_group(spec.clone()).await.expect("create_group");
        assert!(store(&*b, record(member, succeeded("0"), 1)).await);
        assert!(
            b.member_finished(group)
                .await
                .expect("member_finished")
                .is_some()
        );
        let _ = b.create_group(spec).await;
        assert!(
            b.member_finished(group)
                .await
                .expect("member_finished")
                .is_none(),
            "a re-created group fires again"
        );
    })
    .await;
}

pub(super) fn heartbeat(worker: &str, interval: Duration) -> WorkerHeartbeat {
    WorkerHeartbeat {
        worker_id: worker.to_owned(),
        host: String::from("kit-host"),
        pid: 4242,
        queues: vec![String::from("default"), String::from("emails")],
        concurrency: 8,
        active: 3,
        at: Utc::now(),
        interval,
        tasks: vec![crate::backend::AdvertisedTask {
            name: String::from("kit::send_email"),
            queue: String::from("emails"),
            priority: 3,
            retries: 5,
        }],
        events: true,
    }
}

async fn alive(b: &dyn ResultBackend, worker: &str) -> Option<bool> {
    b.workers()
        .await
        .unwrap_or_else(|e| panic!("workers failed: {e}"))
        .into_iter()
        .find(|w| w.heartbeat.worker_id == worker)
        .map(|w| w.alive)
}

/// R5: a chord completes when every member has a *terminal* record: a
/// member that is Started or Retrying keeps the callback back; once it
/// fails or succeeds the callback is handed out.
pub async fn r5_chord_waits_for_terminal_members(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r5_terminal");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let members = [TaskId::new(), TaskId::new()];
        let group = TaskId::new();
        let callback = Envelope::new("kit::callback", "chords", 1)
            .unwrap_or_else(|e| panic!("kit envelope: {e}"));
        b.create_group(GroupSpec {
            id: group,
            members: members.to_vec(),
            callback: Some(callback.clone()),
            ttl: Duration::from_secs(3600),
        })
        .await
        .expect("create_group");
        assert!(store(&*b, record(members[0], succeeded("0"), 1)).await);
        let running = [
            TaskState::Started,
            TaskState::Retrying {
                next_at: Utc::now() + TimeDelta::seconds(30),
                error: failure("first try failed", FailureKind::Error),
            },
        ];
        for state in running {
            let what = state.name();
            assert!(store(&*b, record(members[1], state, 1)).await);
            assert!(
                b.member_finished(group)
                    .await
                    .expect("member_finished")
                    .is_none(),
                "the callback was handed out while a member is {what}"
            );
        }
        let failed = TaskState::Failed {
            error: failure("gave up", FailureKind::Error),
        };
        assert!(store(&*b, record(members[1], failed, 2)).await);
        let handed = b.member_finished(group).await.expect("member_finished");
        assert_eq!(
            handed.map(|e| e.id),
            Some(callback.id),
            "every member is terminal (one failed): the callback is handed out"
        );
    })
    .await;
}

/// R6: heartbeats record a worker's details and last-seen time; a worker
/// silent for 3 intervals is reported dead.
pub async fn r6_heartbeats(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r6");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let interval = Duration::from_millis(200);
        let sent = heartbeat("kit-w1", interval);
        b.heartbeat(sent.clone()).await.expect("heartbeat");
        b.heartbeat(heartbeat("kit-w2", Duration::from_secs(3600)))
            .await
            .expect("heartbeat");

        let workers = b.workers().await.expect("workers");
        let w1 = workers
            .iter()
            .find(|w| w.heartbeat.worker_id == "kit-w1")
            .expect("worker 1 is listed");
        assert!(w1.alive, "a worker that just reported is alive");
        let h = &w1.heartbeat;
        assert_eq!(
            (h.host.as_str(), h.pid, h.concurrency, h.active),
            ("kit-host", 4242, 8, 3)
        );
        assert_eq!(h.queues, sent.queues);
        assert_eq!(h.interval, interval);
        assert!(close(h.at, sent.at), "last-seen round-trips");

        // Newer heartbeats replace older ones.
        let mut busier = heartbeat("kit-w1", interval);
        busier.active = 7;
        let last_seen = busier.at;
        let beat_at = Instant::now();
        b.heartbeat(busier).await.expect("heartbeat");
        let workers = b.workers().await.expect("workers");
        assert_eq!(
            workers
                .iter()
                .filter(|w| w.heartbeat.worker_id == "kit-w1")
                .count(),
            1,
            "one entry per worker"
        );
        assert_eq!(
            workers
                .iter()
                .find(|w| w.heartbeat.worker_id == "kit-w1")
                .map(|w| w.heartbeat.active),
            Some(7)
        );

        // Silent for two and a half intervals: still alive (dead means three).
        tokio::time::sleep(interval * 5 / 2).await;
        let silent = (Utc::now() - last_seen).to_std().unwrap_or_default();
        let still = alive(&*b, "kit-w1").await;
        if silent + Duration::from_millis(20) < interval * 3 {
            assert_eq!(
                still,
                Some(true),
                "reported dead after {silent:?} of silence, under 3 intervals of {interval:?}"
            );
        }
        eventually(
            "a silent worker to be reported dead",
            interval * 3 + f.tick() + Duration::from_secs(3),
            || {
                let b = b.clone();
                async move { alive(&*b, "kit-w1").await == Some(false) }
            },
        )
        .await;
        assert!(
            beat_at.elapsed() + Duration::from_millis(50) >= interval * 3,
            "reported dead after {:?}, sooner than 3 intervals of {interval:?}",
            beat_at.elapsed()
        );
        assert_eq!(
            alive(&*b, "kit-w2").await,
            Some(true),
            "a worker with a long interval is still alive"
        );
        b.heartbeat(heartbeat("kit-w1", interval))
            .await
            .expect("heartbeat");
        assert_eq!(
            alive(&*b, "kit-w1").await,
            Some(true),
            "a worker that reports again is alive again"
        );
    })
    .await;
}

/// R7: a revoked id is remembered, with expiry; `revoked` answers for many
/// ids in order. (Acking a revoked delivery without running it is the
/// worker's half of R7, tested with the worker.)
pub async fn r7_revocation(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r7");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let other = f.backend(&o).await;
        let ids: Vec<TaskId> = (0..20).map(|_| TaskId::new()).collect();
        for id in ids.iter().step_by(3) {
            b.revoke(*id, Duration::from_secs(3600))
                .await
                .expect("revoke");
        }
        let expected: Vec<bool> = (0..20u32).map(|i| i.is_multiple_of(3)).collect();
        assert_eq!(
            other.revoked(&ids).await.expect("revoked"),
            expected,
            "one answer per id, in order, seen by every client"
        );
        assert!(b.revoked(&[]).await.expect("revoked").is_empty());
        b.revoke(ids[0], Duration::from_secs(3600))
            .await
            .expect("revoking twice is fine");

        let short = TaskId::new();
        b.revoke(short, Duration::from_secs(1))
            .await
            .expect("revoke");
        let revoked_at = Instant::now();
        assert_eq!(
            b.revoked(&[short, ids[0]]).await.expect("revoked"),
            [true, true]
        );
        eventually(
            "a revocation to expire",
            Duration::from_secs(1) + f.tick() + Duration::from_secs(3),
            || {
                let b = b.clone();
                // Reads ignore expired revocations by themselves.
                async move { b.revoked(&[short]).await.expect("revoked") == [false] }
            },
        )
        .await;
        assert!(
            revoked_at.elapsed() + Duration::from_millis(50) >= Duration::from_secs(1),
            "forgotten before its TTL"
        );
        b.maintain().await.expect("maintain");
        assert_eq!(
            b.revoked(&[ids[0]]).await.expect("revoked"),
            [true],
            "a long revocation is still remembered"
        );
    })
    .await;
}

/// R8: `forget` deletes the records of the ids given (and only those),
/// answers how many existed, and lets a forgotten task record again from
/// the start, as a replayed dead letter's new run must.
pub async fn r8_forget(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r8");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let other = f.backend(&o).await;
        let failed = TaskState::Failed {
            error: failure("kit failure", FailureKind::Error),
        };
        let ids: Vec<TaskId> = (0..5).map(|_| TaskId::new()).collect();
        for id in &ids {
            assert!(store(&*b, record(*id, failed.clone(), 1)).await);
        }
        let never = TaskId::new();
        assert_eq!(
            other
                .forget(&[ids[0], ids[2], never])
                .await
                .expect("forget"),
            2,
            "how many records existed"
        );
        assert!(get(&*b, ids[0]).await.is_none(), "forgotten");
        assert!(get(&*b, ids[2]).await.is_none(), "forgotten");
        assert!(get(&*b, ids[1]).await.is_some(), "the others stay");
        assert_eq!(b.forget(&[]).await.expect("forget nothing"), 0);
        // A forgotten task starts again: its new run's records are taken,
        // where the terminal record refused them before (R1).
        assert!(
            !store(&*b, record(ids[1], TaskState::Started, 2)).await,
            "a terminal record refuses a later run's"
        );
        assert!(store(&*b, record(ids[0], TaskState::Started, 1)).await);
        assert!(store(&*b, record(ids[0], succeeded("7"), 1)).await);
        let rec = get(&*b, ids[0]).await.expect("recorded again");
        assert!(
            matches!(rec.state, TaskState::Succeeded { .. }),
            "{:?}",
            rec.state
        );
    })
    .await;
}
