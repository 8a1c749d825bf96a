//! Namespaces (B12): two on one storage, colliding as prefixes and at
//! separators, never see each other's anything.

use std::time::Duration;

use chrono::{TimeDelta, Utc};

use crate::backend::{TaskRecord, TaskState};

use super::{
    LONG_LEASE, assert_nothing, fetch, fetch_n, job, n_of, next_message, publish, req, stats,
};
use crate::backend::{GroupSpec, WorkerStatus};
use crate::broker::QueueStats;
use crate::broker::Replay;
use crate::envelope::{Envelope, TaskId, Unique, UniqueRelease};
use crate::kit::backend::{heartbeat, record, succeeded};
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, guarded};

/// B12: two namespaces never see each other's envelopes, dead letters,
/// broadcasts, unique keys or results.
pub async fn b12_namespaces(f: &dyn AdapterFactory) {
    let oa = KitOptions::new(f.name(), "b12");
    let ob = oa.beside("b12_other");
    guarded(f, &[&oa, &ob], async {
        let a = f.broker(&oa).await;
        let b = f.broker(&ob).await;
        let caps = a.capabilities();

        publish(&*a, job("shared-name", 1)).await;
        publish(&*a, job("shared-name", 2)).await;
        let got = fetch(&*a, &req(&["shared-name"], 1, LONG_LEASE)).await;
        a.dead_letter(&got[0].receipt, "kit")
            .await
            .expect("dead_letter");
        assert_eq!(
            stats(&*b, "shared-name").await,
            QueueStats::default(),
            "stats leak across namespaces"
        );
        assert_nothing(
            &*b,
            &["shared-name"],
            Duration::from_millis(200),
            "envelopes leak across namespaces",
        )
        .await;
        assert_eq!(b.dead_letter_count("shared-name").await.expect("count"), 0);
        assert!(
            b.list_dead("shared-name", 10)
                .await
                .expect("list")
                .is_empty()
        );
        assert_eq!(
            b.purge("shared-name").await.expect("purge"),
            0,
            "purge reaches across namespaces"
        );
        assert_eq!(
            b.purge_dead_letters("shared-name")
                .await
                .expect("purge dead"),
            0
        );
        let s = stats(&*a, "shared-name").await;
        assert_eq!(
            (s.ready, s.dead),
            (1, 1),
            "the other namespace's calls changed this one: {s:?}"
        );

        // Both namespaces busy on the same queue name: each counts,
        // fetches, replays and purges only its own.
        let a_dead = got[0].envelope.id;
        for n in 100..103 {
            publish(&*b, job("shared-name", n)).await;
        }
        let sb = stats(&*b, "shared-name").await;
        assert_eq!(
            (sb.ready, sb.dead),
            (3, 0),
            "stats count the other namespace's envelopes: {sb:?}"
        );
        for which in [Replay::One(a_dead), Replay::All] {
            assert_eq!(
                b.replay_dead_letters("shared-name", which, false)
                    .await
                    .expect("replay"),
                0,
                "replay reaches the other namespace's dead letters"
            );
        }
        assert_eq!(a.dead_letter_count("shared-name").await.expect("count"), 1);
        let taken = fetch_n(
            &*b,
            &["shared-name"],
            4,
            LONG_LEASE,
            Duration::from_millis(600),
        )
        .await;
        let mut taken_ns: Vec<u64> = taken.iter().map(|d| n_of(&d.envelope)).collect();
        taken_ns.sort_unstable();
        assert_eq!(
            taken_ns,
            [100, 101, 102],
            "a fetch took the other namespace's envelopes"
        );
        let sa = stats(&*a, "shared-name").await;
        assert_eq!(
            (sa.ready, sa.leased, sa.dead),
            (1, 0, 1),
            "the other namespace's leases are counted here: {sa:?}"
        );
        assert_eq!(stats(&*b, "shared-name").await.leased, 3);
        for d in &taken {
            b.ack(&d.receipt).await.expect("ack");
        }
        publish(&*b, job("shared-name", 103)).await;
        assert_eq!(
            b.purge("shared-name").await.expect("purge"),
            1,
            "purge counts only its own namespace"
        );
        let sa = stats(&*a, "shared-name").await;
        assert_eq!(
            (sa.ready, sa.dead),
            (1, 1),
            "a purge in the other namespace emptied this one: {sa:?}"
        );

        if caps.unique {
            let until = Utc::now() + TimeDelta::seconds(30);
            let unique = |e: &mut Envelope| {
                e.unique = Some(Unique {
                    key: String::from("kit-key"),
                    until,
                    release: UniqueRelease::Window,
                });
            };
            let mut ea = job("uq", 1);
            unique(&mut ea);
            let mut eb = job("uq", 2);
            unique(&mut eb);
            publish(&*a, ea).await;
            publish(&*b, eb).await;
        }

        if caps.broadcast {
            let mut in_a = a.subscribe("kit-ns").await.expect("subscribe");
            let mut in_b = b.subscribe("kit-ns").await.expect("subscribe");
            a.broadcast_send("kit-ns", "only-a")
                .await
                .expect("broadcast");
            assert_eq!(
                next_message(&mut in_a, Duration::from_secs(3))
                    .await
                    .as_deref(),
                Some("only-a")
            );
            assert_eq!(
                next_message(&mut in_b, Duration::from_millis(300)).await,
                None,
                "broadcasts leak across namespaces"
            );
        }

        let ra = f.backend(&oa).await;
        let rb = f.backend(&ob).await;
        let id = TaskId::new();
        assert!(
            ra.store(TaskRecord::new(id, TaskState::Started))
                .await
                .expect("store")
        );
        assert!(
            rb.get(id).await.expect("get").is_none(),
            "results leak across namespaces"
        );
        ra.revoke(id, LONG_LEASE).await.expect("revoke");
        assert_eq!(
            rb.revoked(&[id]).await.expect("revoked"),
            [false],
            "revocations leak across namespaces"
        );

        // Groups: the other namespace neither sees nor completes one.
        let group = TaskId::new();
        let member = TaskId::new();
        let callback = Envelope::new("kit::callback", "chords", 1)
            .unwrap_or_else(|e| panic!("kit envelope: {e}"));
        ra.create_group(GroupSpec {
            id: group,
            members: vec![member],
            callback: Some(callback),
            ttl: Duration::from_secs(3600),
        })
        .await
        .expect("create_group");
        assert!(
            rb.group(group).await.expect("group").is_none(),
            "groups leak across namespaces"
        );
        assert!(
            rb.store(record(member, succeeded("1"), 1))
                .await
                .expect("store")
        );
        assert!(
            rb.member_finished(group)
                .await
                .expect("member_finished")
                .is_none(),
            "a member's record in another namespace completed a group"
        );
        assert!(
            ra.member_finished(group)
                .await
                .expect("member_finished")
                .is_none(),
            "the group's own member has not finished in its namespace"
        );

        // Heartbeats: each namespace lists its own workers only.
        ra.heartbeat(heartbeat("kit-ns-a", Duration::from_secs(3600)))
            .await
            .expect("heartbeat");
        rb.heartbeat(heartbeat("kit-ns-b", Duration::from_secs(3600)))
            .await
            .expect("heartbeat");
        let names = |ws: Vec<WorkerStatus>| -> Vec<String> {
            ws.into_iter().map(|w| w.heartbeat.worker_id).collect()
        };
        assert_eq!(
            names(ra.workers().await.expect("workers")),
            ["kit-ns-a"],
            "heartbeats leak across namespaces"
        );
        assert_eq!(names(rb.workers().await.expect("workers")), ["kit-ns-b"]);
    })
    .await;
}

/// B12 with separators: queue names holding `:` and `.` are queues of
/// their own (`jobs`, `jobs:high`, `jobs.high` never share envelopes or
/// counts), and a namespace that ends where a queue name's separator
/// begins does not meet it: (`<ns>`, `jobs:high`), (`<ns>:jobs`, `high`)
/// and (`<ns>.jobs`, `high`) are three different queues. An adapter that
/// builds keys as `<ns>:<queue>` without escaping or delimiting fails.
pub async fn b12_separators(f: &dyn AdapterFactory) {
    let oa = KitOptions::new(f.name(), "b12_sep");
    let mut oc = oa.beside("b12_sep_colon");
    oc.namespace = format!("{}:jobs", oa.namespace);
    let mut od = oa.beside("b12_sep_dot");
    od.namespace = format!("{}.jobs", oa.namespace);
    guarded(f, &[&oa, &oc, &od], async {
        let a = f.broker(&oa).await;
        let c = f.broker(&oc).await;
        let d = f.broker(&od).await;
        let names = ["jobs", "jobs:high", "jobs.high", "jobs:high:urgent", "high"];
        for (n, q) in (0..).zip(names) {
            publish(&*a, job(q, n)).await;
        }
        publish(&*c, job("high", 10)).await;
        publish(&*d, job("high", 20)).await;
        for q in names {
            assert_eq!(
                stats(&*a, q).await.ready,
                1,
                "queue {q:?} counts another queue's envelopes"
            );
        }
        for (n, q) in (0..).zip(names) {
            let got = fetch(&*a, &req(&[q], 5, LONG_LEASE)).await;
            assert_eq!(
                got.iter().map(|d| n_of(&d.envelope)).collect::<Vec<_>>(),
                [n],
                "a fetch from {q:?} took another queue's envelopes"
            );
        }
        for (client, n, ns) in [(&c, 10, &oc.namespace), (&d, 20, &od.namespace)] {
            let got = fetch(&**client, &req(&["high"], 5, LONG_LEASE)).await;
            assert_eq!(
                got.iter().map(|d| n_of(&d.envelope)).collect::<Vec<_>>(),
                [n],
                "queue \"high\" of namespace {ns:?} met another namespace's queue"
            );
        }
        publish(&*a, job("jobs", 30)).await;
        publish(&*a, job("jobs:high", 31)).await;
        assert_eq!(
            a.purge("jobs").await.expect("purge"),
            1,
            "purge of `jobs` took more"
        );
        assert_eq!(
            stats(&*a, "jobs:high").await.ready,
            1,
            "purge of `jobs` emptied `jobs:high`"
        );
    })
    .await;
}
