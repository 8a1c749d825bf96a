//! The points CONTRACT.md decided where the clause text was silent
//! ("Decided where the first adapters found the text silent"), one case
//! each, named for the clause they belong to.

use std::time::Duration;

use super::backend::{record, succeeded};
use super::broker::{LONG_LEASE, fetch, fetch_n, job, publish, req, stats};
use super::ops::BrokerOps;
use super::{AdapterFactory, KitOptions, guarded};
use crate::backend::GroupSpec;
use crate::broker::{QueueStats, Replay};
use crate::envelope::{Envelope, TaskId};

/// A lease this short expires while the case sleeps.
const SHORT: Duration = Duration::from_millis(300);

/// B4 (decided): an ack or extend after the lease expired, but before
/// anyone fetched the envelope again, succeeds; the acked envelope is gone.
pub async fn b04_late_ack_before_redelivery_succeeds(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b04_late");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;

        let id = publish(&*b, job("late-ack", 1)).await;
        let got = fetch(&*b, &req(&["late-ack"], 1, SHORT)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].envelope.id, id);
        tokio::time::sleep(SHORT * 2).await;
        b.ack(&got[0].receipt)
            .await
            .expect("an ack after expiry, before any re-delivery, succeeds");
        tokio::time::sleep(SHORT).await;
        let again = fetch(
            &*b,
            &req(&["late-ack"], 1, LONG_LEASE).wait(Duration::from_millis(300)),
        )
        .await;
        assert!(again.is_empty(), "a late-acked envelope is gone: {again:?}");
        assert_eq!(stats(&*b, "late-ack").await, QueueStats::default());

        let id = publish(&*b, job("late-extend", 2)).await;
        let got = fetch(&*b, &req(&["late-extend"], 1, SHORT)).await;
        assert_eq!(got[0].envelope.id, id);
        tokio::time::sleep(SHORT * 2).await;
        b.extend_lease(&got[0].receipt, LONG_LEASE)
            .await
            .expect("an extend after expiry, before any re-delivery, succeeds");
        let again = fetch(
            &*b,
            &req(&["late-extend"], 1, LONG_LEASE).wait(Duration::from_millis(300)),
        )
        .await;
        assert!(
            again.is_empty(),
            "the extended lease holds again: {again:?}"
        );
        b.ack(&got[0].receipt)
            .await
            .expect("the extended lease acks");
    })
    .await;
}

/// B7 (decided): an undecodable dead letter is never replayed: replaying
/// it by id fails and says so, replaying all leaves it where it is.
pub async fn b07_undecodable_is_never_replayed(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b07_undecodable");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        f.insert_garbage(&o, "garbled", b"{not an envelope").await;
        let good = publish(&*b, job("garbled", 1)).await;
        let got = fetch_n(&*b, &["garbled"], 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(got[0].envelope.id, good);
        b.dead_letter(&got[0].receipt, "kit")
            .await
            .expect("dead_letter");
        let dead = b.list_dead("garbled", 10).await.expect("list");
        assert_eq!(dead.len(), 2, "the garbage and the good one: {dead:?}");
        let garbage = dead
            .iter()
            .find(|d| d.envelope.is_none())
            .unwrap_or_else(|| panic!("the garbage is a dead letter: {dead:?}"));

        let one = b
            .replay_dead_letters("garbled", Replay::One(garbage.id), true)
            .await;
        let err = one.expect_err("replaying an undecodable dead letter is refused");
        assert!(
            err.to_string().contains(&garbage.id.to_string()) && err.to_string().contains("replay"),
            "the refusal names the dead letter and says it cannot be replayed: {err}"
        );
        assert_eq!(
            b.replay_dead_letters("garbled", Replay::All, true)
                .await
                .expect("replay all"),
            1,
            "replay all brings back the good one only"
        );
        let left = b.list_dead("garbled", 10).await.expect("list");
        assert_eq!(
            left.iter().map(|d| d.id).collect::<Vec<_>>(),
            [garbage.id],
            "the undecodable one stays dead"
        );
        let back = fetch_n(&*b, &["garbled"], 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(back[0].envelope.id, good);
        let more = fetch(
            &*b,
            &req(&["garbled"], 1, LONG_LEASE).wait(Duration::from_millis(300)),
        )
        .await;
        assert!(more.is_empty(), "the garbage was not replayed: {more:?}");
    })
    .await;
}

/// R4 (decided): `create_group` on an existing id keeps the existing group
/// (its members and its callback), so a retried call cannot replace it.
pub async fn r4_create_group_keeps_existing(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r4_keep");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let group = TaskId::new();
        let first = [TaskId::new(), TaskId::new()];
        b.create_group(GroupSpec {
            id: group,
            members: first.to_vec(),
            callback: None,
            ttl: Duration::from_secs(3600),
        })
        .await
        .expect("create_group");
        let callback = Envelope::new("kit::callback", "chords", serde_json::json!({}))
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = b
            .create_group(GroupSpec {
                id: group,
                members: vec![TaskId::new()],
                callback: Some(callback),
                ttl: Duration::from_secs(3600),
            })
            .await;
        let status = b
            .group(group)
            .await
            .expect("group")
            .unwrap_or_else(|| panic!("the group exists"));
        assert_eq!(
            status.members.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            first,
            "the existing members are kept"
        );
        for id in first {
            b.store(record(id, succeeded("0"), 1)).await.expect("store");
            assert!(
                b.member_finished(group)
                    .await
                    .expect("member_finished")
                    .is_none(),
                "the kept group has no callback, so none fires"
            );
        }
    })
    .await;
}
