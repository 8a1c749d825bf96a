//! Stats and purge (B13).

use std::time::Duration;

use chrono::{TimeDelta, Utc};

use super::{LEASE, LONG_LEASE, assert_nothing, fetch, job, publish, req, stats};
use crate::broker::{Broker, QueueStats, QueueSummary};
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, eventually, guarded};

/// B13: `stats` counts ready, delayed, leased and dead; `purge` removes
/// ready and delayed envelopes and says how many.
pub async fn b13_stats_and_purge(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b13");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        let delay = b.capabilities().delay;
        assert_eq!(
            stats(&*b, "never-used").await,
            QueueStats::default(),
            "an unknown queue has zero counts"
        );
        assert_eq!(b.purge("never-used").await.expect("purge"), 0);

        for n in 0..4 {
            publish(&*b, job("st", n)).await;
        }
        let delayed = if delay {
            for n in 10..12 {
                let mut e = job("st", n);
                e.not_before = Some(Utc::now() + TimeDelta::hours(1));
                publish(&*b, e).await;
            }
            2
        } else {
            0
        };
        assert_eq!(
            stats(&*b, "st").await,
            QueueStats {
                ready: 4,
                delayed,
                leased: 0,
                dead: 0
            }
        );
        let got = fetch(&*b, &req(&["st"], 2, LONG_LEASE)).await;
        assert_eq!(got.len(), 2);
        b.dead_letter(&got[1].receipt, "kit")
            .await
            .expect("dead_letter");
        assert_eq!(
            stats(&*b, "st").await,
            QueueStats {
                ready: 2,
                delayed,
                leased: 1,
                dead: 1
            }
        );

        assert_eq!(
            b.purge("st").await.expect("purge"),
            2 + delayed,
            "purge removes ready and delayed"
        );
        assert_eq!(
            stats(&*b, "st").await,
            QueueStats {
                ready: 0,
                delayed: 0,
                leased: 1,
                dead: 1
            },
            "purge keeps leased and dead"
        );
        assert_nothing(
            &*b,
            &["st"],
            Duration::from_millis(200),
            "purged envelopes are gone",
        )
        .await;
        b.ack(&got[0].receipt)
            .await
            .expect("a leased envelope survives purge and acks");
        assert_eq!(
            stats(&*b, "st").await,
            QueueStats {
                ready: 0,
                delayed: 0,
                leased: 0,
                dead: 1
            }
        );
        assert_eq!(b.purge("st").await.expect("purge"), 0);
    })
    .await;
}

/// The namespace's queues as `list` gives them, panicking on an error.
async fn listed(b: &dyn Broker) -> Vec<QueueSummary> {
    b.list_queues()
        .await
        .unwrap_or_else(|e| panic!("list queues failed: {e}"))
}

fn summary(queue: &str, ready: u64, delayed: u64, leased: u64, dead: u64) -> QueueSummary {
    QueueSummary {
        queue: queue.to_owned(),
        stats: QueueStats {
            ready,
            delayed,
            leased,
            dead,
        },
    }
}

/// B13 `list` (new in issue 20): every queue of the namespace that holds
/// something, sorted by name, each with the counts `stats` gives it; a
/// queue with nothing in it is left out; another namespace's queues never
/// show; an expired lease counts as ready.
pub async fn b13_list_queues(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b13_list");
    let other = o.beside("b13_list_other");
    guarded(f, &[&o, &other], async {
        let b = f.broker(&o).await;
        let delay = b.capabilities().delay;
        assert_eq!(listed(&*b).await, [], "a new namespace lists no queue");

        // Another namespace on the same storage, with a queue of its own
        // and one named like ours.
        let ob = f.broker(&other).await;
        publish(&*ob, job("theirs", 1)).await;
        publish(&*ob, job("ready", 2)).await;

        // `ready`: two ready. `jobs:high.v-1_x`: separators in the name.
        publish(&*b, job("ready", 1)).await;
        publish(&*b, job("ready", 2)).await;
        publish(&*b, job("jobs:high.v-1_x", 1)).await;
        // `later`: one delayed (ready where the adapter has no delays).
        let mut e = job("later", 1);
        if delay {
            e.not_before = Some(Utc::now() + TimeDelta::hours(1));
        }
        publish(&*b, e).await;
        // `held`: one under a long lease; `lapsed`: one whose short lease
        // runs out (ready again by the time it is listed).
        publish(&*b, job("held", 1)).await;
        let held = fetch(&*b, &req(&["held"], 1, LONG_LEASE)).await;
        assert_eq!(held.len(), 1);
        publish(&*b, job("lapsed", 1)).await;
        let lapsed = fetch(&*b, &req(&["lapsed"], 1, LEASE)).await;
        assert_eq!(lapsed.len(), 1);
        // `dead`: nothing left but a dead letter.
        publish(&*b, job("dead", 1)).await;
        let got = fetch(&*b, &req(&["dead"], 1, LONG_LEASE)).await;
        b.dead_letter(&got[0].receipt, "kit")
            .await
            .expect("dead_letter");
        // `done`: used, then emptied: listed by no adapter.
        publish(&*b, job("done", 1)).await;
        let got = fetch(&*b, &req(&["done"], 1, LONG_LEASE)).await;
        b.ack(&got[0].receipt).await.expect("ack");

        let (later_ready, later_delayed) = if delay { (0, 1) } else { (1, 0) };
        let expected = vec![
            summary("dead", 0, 0, 0, 1),
            summary("held", 0, 0, 1, 0),
            summary("jobs:high.v-1_x", 1, 0, 0, 0),
            summary("lapsed", 1, 0, 0, 0),
            summary("later", later_ready, later_delayed, 0, 0),
            summary("ready", 2, 0, 0, 0),
        ];
        tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
        let all = listed(&*b).await;
        assert_eq!(
            all, expected,
            "every non-empty queue once, sorted by name, with its counts \
             (an expired lease counts as ready; another namespace's queues never show)"
        );
        for s in &all {
            assert_eq!(
                stats(&*b, &s.queue).await,
                s.stats,
                "list and stats agree on `{}`",
                s.queue
            );
        }
        assert_eq!(
            listed(&*ob).await,
            vec![summary("ready", 1, 0, 0, 0), summary("theirs", 1, 0, 0, 0)],
            "the other namespace lists only its own"
        );

        // Emptied queues drop out of the listing.
        b.ack(&held[0].receipt)
            .await
            .expect("ack the held envelope");
        b.purge_dead_letters("dead").await.expect("purge dead");
        assert_eq!(b.purge("ready").await.expect("purge"), 2);
        eventually(
            "emptied queues to leave the listing",
            Duration::from_secs(2) + f.tick(),
            || {
                let b = b.clone();
                async move {
                    let names: Vec<String> =
                        listed(&*b).await.into_iter().map(|s| s.queue).collect();
                    names == ["jobs:high.v-1_x", "lapsed", "later"]
                }
            },
        )
        .await;
    })
    .await;
}
