//! Leases: exclusive (B3), final and fenced acks (B4), extension (B5).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{
    LEASE, LONG_LEASE, assert_nothing, fetch, fetch_n, job, lease_lost, publish, req, stats,
};
use crate::broker::QueueStats;
use crate::envelope::{Envelope, TaskId};
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, guarded};

/// B3: while a lease is live no other consumer receives the envelope, even
/// with several consumers fetching at once.
pub async fn b03_exclusive_lease(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b03");
    guarded(f, &[&o], async {
        let producer = f.broker(&o).await;
        let batch: Vec<Envelope> = (0..60).map(|n| job("excl", n)).collect();
        producer.publish_many(batch).await.expect("publish_many");

        let taken = Arc::new(AtomicUsize::new(0));
        let mut consumers = Vec::new();
        for _ in 0..4 {
            let b = f.broker(&o).await;
            let taken = taken.clone();
            consumers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                let until = Instant::now() + Duration::from_secs(5);
                while taken.load(Ordering::SeqCst) < 60 && Instant::now() < until {
                    let r = req(&["excl"], 5, LONG_LEASE).wait(Duration::from_millis(50));
                    let got = fetch(&*b, &r).await;
                    taken.fetch_add(got.len(), Ordering::SeqCst);
                    ids.extend(got.into_iter().map(|d| d.envelope.id));
                }
                ids
            }));
        }
        let mut all = Vec::new();
        for c in consumers {
            all.extend(c.await.expect("consumer task"));
        }
        let distinct: HashSet<TaskId> = all.iter().copied().collect();
        assert_eq!(
            all.len(),
            distinct.len(),
            "an envelope was delivered twice under live leases"
        );
        assert_eq!(distinct.len(), 60, "every envelope was delivered once");

        let s = stats(&*producer, "excl").await;
        assert_eq!((s.ready, s.leased), (0, 60), "all 60 are leased: {s:?}");
        assert_nothing(
            &*producer,
            &["excl"],
            Duration::from_millis(300),
            "every envelope is under a live lease",
        )
        .await;
    })
    .await;
}

/// B4: an acked envelope is never delivered again, and ack/extend/nack/
/// dead-letter with a lease that expired and was re-delivered return
/// `LeaseLost` and change nothing.
pub async fn b04_ack_final_and_fenced(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b04");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;

        // Ack is final.
        let id = publish(&*b, job("ack", 1)).await;
        let got = fetch(&*b, &req(&["ack"], 1, LEASE)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].envelope.id, id);
        b.ack(&got[0].receipt).await.expect("ack a live lease");
        assert_nothing(
            &*b,
            &["ack"],
            LEASE + Duration::from_millis(400),
            "an acked envelope is never delivered again",
        )
        .await;
        assert_eq!(
            stats(&*b, "ack").await,
            QueueStats::default(),
            "nothing is left after an ack"
        );

        // Fenced: the first lease expires, the envelope is re-delivered,
        // and the first receipt is dead.
        let id2 = publish(&*b, job("fence", 2)).await;
        let stale = fetch(&*b, &req(&["fence"], 1, Duration::from_millis(300))).await;
        assert_eq!(stale.len(), 1);
        let fresh = fetch_n(&*b, &["fence"], 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(fresh.len(), 1, "re-delivered after the lease");
        assert_eq!(fresh[0].envelope.id, id2);
        assert_ne!(
            stale[0].receipt, fresh[0].receipt,
            "a new lease gets a new receipt"
        );

        let old = &stale[0].receipt;
        lease_lost(b.ack(old).await, "stale ack", id2);
        lease_lost(b.extend_lease(old, LONG_LEASE).await, "stale extend", id2);
        lease_lost(b.release(old, Duration::ZERO).await, "stale release", id2);
        lease_lost(
            b.retry(old, Duration::ZERO, "stale").await,
            "stale retry",
            id2,
        );
        lease_lost(b.dead_letter(old, "stale").await, "stale dead_letter", id2);
        let results = b.ack_many(std::slice::from_ref(old)).await;
        assert_eq!(results.len(), 1);
        lease_lost(results[0].clone(), "stale ack_many", id2);

        // ... and changed nothing: the live lease still holds.
        let s = stats(&*b, "fence").await;
        assert_eq!(
            (s.ready, s.leased, s.dead),
            (0, 1, 0),
            "stale calls changed nothing: {s:?}"
        );
        assert_eq!(b.dead_letter_count("fence").await.expect("count"), 0);
        b.extend_lease(&fresh[0].receipt, LONG_LEASE)
            .await
            .expect("the live lease extends");
        b.ack(&fresh[0].receipt).await.expect("the live lease acks");
        assert_nothing(
            &*b,
            &["fence"],
            Duration::from_millis(200),
            "acked after the fencing checks",
        )
        .await;
    })
    .await;
}

/// B5: extending pushes the deadline, so a task that keeps extending is
/// never re-delivered; once it stops, it is.
pub async fn b05_extend_lease(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b05");
    guarded(f, &[&o], async {
        let holder = f.broker(&o).await;
        let thief = f.broker(&o).await;
        let id = publish(&*holder, job("extend", 1)).await;
        let got = fetch(&*holder, &req(&["extend"], 1, LEASE)).await;
        assert_eq!(got.len(), 1);

        // A second consumer keeps trying while the holder extends for about
        // three leases.
        let watcher = tokio::spawn(async move {
            let mut seen = Vec::new();
            let until = Instant::now() + LEASE * 3;
            while Instant::now() < until {
                let r = req(&["extend"], 1, LONG_LEASE).wait(Duration::from_millis(100));
                seen.extend(fetch(&*thief, &r).await.into_iter().map(|d| d.envelope.id));
            }
            seen
        });
        let started = Instant::now();
        while started.elapsed() < LEASE * 3 {
            tokio::time::sleep(LEASE / 2).await;
            holder
                .extend_lease(&got[0].receipt, LEASE)
                .await
                .expect("extend a live lease");
        }
        let stolen = watcher.await.expect("watcher task");
        assert!(
            stolen.is_empty(),
            "delivered to another consumer while extended: {stolen:?}"
        );

        // Extend once more to 2x the lease, then stop: not back before the
        // new deadline, back after it.
        let extended_at = Instant::now();
        holder
            .extend_lease(&got[0].receipt, LEASE * 2)
            .await
            .expect("extend a live lease");
        let back = fetch_n(
            &*holder,
            &["extend"],
            1,
            LONG_LEASE,
            LEASE * 2 + Duration::from_secs(5),
        )
        .await;
        assert_eq!(back.len(), 1, "re-delivered once extending stops");
        assert!(
            extended_at.elapsed() + Duration::from_millis(20) >= LEASE * 2,
            "re-delivered {:?} after an extension to {:?}",
            extended_at.elapsed(),
            LEASE * 2
        );
        assert_eq!(back[0].envelope.id, id);
        assert_eq!(back[0].deliveries, 2);
    })
    .await;
}
