//! Batches: publish_many and ack_many (B14).

use std::time::{Duration, Instant};

use super::{LONG_LEASE, fetch_n, job, job_with_payload, median, publish, stats};
use crate::broker::{Published, QueueStats};
use crate::envelope::{Envelope, TaskId};
use crate::error::BrokerError;
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, guarded, skip};

/// B14: `publish_many` keeps input order, is all-or-nothing where the
/// adapter declares `atomic_batch`, and is
/// [`min_batch_speedup`](AdapterFactory::min_batch_speedup) times faster per
/// envelope than `publish`.
pub async fn b14_batch(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b14");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        const N: u64 = 300;

        // Order: one result per envelope, in input order, delivered FIFO.
        let envs: Vec<Envelope> = (0..N).map(|n| job("batch", n)).collect();
        let ids: Vec<TaskId> = envs.iter().map(|e| e.id).collect();
        let published = b.publish_many(envs).await.expect("publish_many");
        assert_eq!(
            published,
            ids.iter()
                .map(|id| Published::Stored(*id))
                .collect::<Vec<_>>(),
            "results in input order"
        );
        assert_eq!(
            b.publish_many(Vec::new()).await.expect("empty batch").len(),
            0
        );
        let got = fetch_n(
            &*b,
            &["batch"],
            ids.len(),
            LONG_LEASE,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            got.iter().map(|d| d.envelope.id).collect::<Vec<_>>(),
            ids,
            "a batch is delivered in order"
        );
        for r in b
            .ack_many(&got.iter().map(|d| d.receipt.clone()).collect::<Vec<_>>())
            .await
        {
            r.expect("ack_many");
        }

        // Speed: per envelope, a batch is faster than single publishes by
        // the factory's `min_batch_speedup` (2x unless it says otherwise).
        // Rounds of 1,000 alternate (singles, batch, singles, batch, ...)
        // and the medians are compared, so one slow moment of a shared
        // machine cannot decide the outcome, while a batch written as a loop
        // of single round trips (about 1x) fails.
        const SPEED: u64 = 1_000;
        const ROUNDS: usize = 5;
        let mut singles = Vec::with_capacity(ROUNDS);
        let mut batches = Vec::with_capacity(ROUNDS);
        for round in 0..ROUNDS {
            let one: Vec<Envelope> = (0..SPEED).map(|n| job("speed-one", n)).collect();
            let started = Instant::now();
            for e in one {
                publish(&*b, e).await;
            }
            singles.push(started.elapsed());
            let many: Vec<Envelope> = (0..SPEED).map(|n| job("speed-many", n)).collect();
            let started = Instant::now();
            b.publish_many(many).await.expect("publish_many");
            batches.push(started.elapsed());
            assert_eq!(
                stats(&*b, "speed-many").await.ready,
                SPEED * (round as u64 + 1)
            );
        }
        let one_by_one = median(&mut singles);
        let batched = median(&mut batches);
        let speedup = f.min_batch_speedup();
        assert!(
            batched.mul_f64(speedup) <= one_by_one,
            "publish_many of {SPEED} took {batched:?} (median of {ROUNDS}: {batches:?}), \
             {SPEED} publishes took {one_by_one:?} ({singles:?}): a batch must be at least \
             {speedup}x faster per envelope (one round trip, not one per envelope)"
        );

        // Atomicity.
        if !b.capabilities().atomic_batch {
            return skip(
                f,
                "B14",
                "atomic part skipped: publish_many is not all-or-nothing",
                "atomic_batch",
            );
        }
        let mut bad_priority = job("atomic", 1);
        bad_priority.priority = 42;
        let batch = vec![job("atomic", 0), bad_priority, job("atomic", 2)];
        assert!(
            b.publish_many(batch).await.is_err(),
            "an invalid envelope fails the batch"
        );
        let huge = job_with_payload("atomic", o.max_envelope_bytes + 1);
        let batch = vec![job("atomic", 0), job("atomic", 1), huge];
        assert!(
            matches!(
                b.publish_many(batch).await,
                Err(BrokerError::TooLarge { .. })
            ),
            "an oversized envelope fails the batch"
        );
        assert_eq!(
            stats(&*b, "atomic").await,
            QueueStats::default(),
            "a failed batch stores nothing"
        );
    })
    .await;
}
