//! Namespaces (B12).

use std::time::Duration;

use chrono::{TimeDelta, Utc};

use crate::backend::{TaskRecord, TaskState};

use super::{LONG_LEASE, assert_nothing, fetch, job, next_message, publish, req, stats};
use crate::broker::QueueStats;
use crate::envelope::{Envelope, TaskId, Unique, UniqueRelease};
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
    })
    .await;
}
