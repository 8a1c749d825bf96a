//! Stats and purge (B13).

use std::time::Duration;

use chrono::{TimeDelta, Utc};

use super::{LONG_LEASE, assert_nothing, fetch, job, publish, req, stats};
use crate::broker::QueueStats;
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, guarded};

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
