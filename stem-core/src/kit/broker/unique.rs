//! Unique keys (B17).

use std::sync::Arc;

use chrono::{TimeDelta, Utc};

use super::{LONG_LEASE, fetch, publish, req, stats, unique_job};
use crate::broker::Published;
use crate::envelope::{TaskId, UniqueRelease};
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, guarded, skip};

/// B17: a publish whose unique key a live envelope holds stores nothing and
/// returns the holder's id; concurrent publishes store one; the key frees
/// after the window, or when the holder finishes if so chosen.
pub async fn b17_unique(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b17");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        let caps = b.capabilities();
        if !caps.unique {
            return skip(f, "B17", "no unique keys", "unique");
        }
        let long = TimeDelta::seconds(60);

        // A duplicate returns the holder.
        let first = unique_job("uq", 1, "k-dup", long, UniqueRelease::OnFinish);
        let holder = publish(&*b, first.clone()).await;
        let dup = b
            .publish(unique_job("uq", 2, "k-dup", long, UniqueRelease::OnFinish))
            .await
            .expect("publish");
        assert_eq!(
            dup,
            Published::Duplicate(holder),
            "a duplicate returns the holder's id"
        );
        let again = b.publish(first).await.expect("publish");
        assert_eq!(
            again,
            Published::Duplicate(holder),
            "the holder published again (a retried publish) is a duplicate too"
        );
        let dups = b
            .publish_many(vec![
                unique_job("uq", 3, "k-dup", long, UniqueRelease::OnFinish),
                unique_job("uq", 4, "k-batch", long, UniqueRelease::OnFinish),
                unique_job("uq", 5, "k-batch", long, UniqueRelease::OnFinish),
            ])
            .await
            .expect("publish_many");
        assert_eq!(
            dups[0],
            Published::Duplicate(holder),
            "duplicates are caught in batches"
        );
        assert!(matches!(dups[1], Published::Stored(_)));
        assert_eq!(
            dups[2],
            Published::Duplicate(dups[1].id()),
            "and within one batch"
        );
        assert_eq!(stats(&*b, "uq").await.ready, 2, "duplicates store nothing");

        // Concurrent publishes with one key store exactly one.
        let mut tasks = Vec::new();
        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        for n in 0..20 {
            let client = f.broker(&o).await;
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let e = unique_job(
                    "uq-race",
                    n,
                    "k-race",
                    TimeDelta::seconds(60),
                    UniqueRelease::Window,
                );
                let own = e.id;
                barrier.wait().await;
                (own, client.publish(e).await.expect("publish"))
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("publish task"));
        }
        let stored: Vec<TaskId> = results
            .iter()
            .filter_map(|(own, p)| matches!(p, Published::Stored(_)).then_some(*own))
            .collect();
        assert_eq!(
            stored.len(),
            1,
            "exactly one of 20 concurrent publishes is stored: {results:?}"
        );
        assert!(
            results.iter().all(|(_, p)| p.id() == stored[0]),
            "every duplicate names the one holder"
        );
        assert_eq!(stats(&*b, "uq-race").await.ready, 1);

        // Leased and delayed holders hold the key too; OnFinish frees it on ack.
        let held = publish(
            &*b,
            unique_job("uq-finish", 1, "k-ack", long, UniqueRelease::OnFinish),
        )
        .await;
        let got = fetch(&*b, &req(&["uq-finish"], 1, LONG_LEASE)).await;
        assert_eq!(got[0].envelope.id, held);
        let again = b
            .publish(unique_job(
                "uq-finish",
                2,
                "k-ack",
                long,
                UniqueRelease::OnFinish,
            ))
            .await
            .expect("publish");
        assert_eq!(
            again,
            Published::Duplicate(held),
            "a leased envelope holds its key"
        );
        b.ack(&got[0].receipt).await.expect("ack");
        let after = b
            .publish(unique_job(
                "uq-finish",
                3,
                "k-ack",
                long,
                UniqueRelease::OnFinish,
            ))
            .await
            .expect("publish");
        assert!(
            matches!(after, Published::Stored(_)),
            "OnFinish frees the key on ack: {after:?}"
        );

        // ... and on dead-letter.
        let held = publish(
            &*b,
            unique_job("uq-dead", 1, "k-dead", long, UniqueRelease::OnFinish),
        )
        .await;
        let got = fetch(&*b, &req(&["uq-dead"], 1, LONG_LEASE)).await;
        assert_eq!(got[0].envelope.id, held);
        b.dead_letter(&got[0].receipt, "kit")
            .await
            .expect("dead_letter");
        let after = b
            .publish(unique_job(
                "uq-dead",
                2,
                "k-dead",
                long,
                UniqueRelease::OnFinish,
            ))
            .await
            .expect("publish");
        assert!(
            matches!(after, Published::Stored(_)),
            "OnFinish frees the key on dead-letter: {after:?}"
        );

        if caps.delay {
            let mut e = unique_job("uq-delayed", 1, "k-delayed", long, UniqueRelease::OnFinish);
            e.not_before = Some(Utc::now() + TimeDelta::hours(1));
            let held = publish(&*b, e).await;
            let dup = b
                .publish(unique_job(
                    "uq-delayed",
                    2,
                    "k-delayed",
                    long,
                    UniqueRelease::OnFinish,
                ))
                .await
                .expect("publish");
            assert_eq!(
                dup,
                Published::Duplicate(held),
                "a delayed envelope holds its key"
            );
        }

        // Window: the key stays taken after the ack, until the window ends.
        let window = TimeDelta::milliseconds(800);
        let first = unique_job("uq-window", 1, "k-window", window, UniqueRelease::Window);
        let until = first
            .unique
            .as_ref()
            .map(|u| u.until)
            .unwrap_or_else(Utc::now);
        let held = publish(&*b, first).await;
        let got = fetch(&*b, &req(&["uq-window"], 1, LONG_LEASE)).await;
        b.ack(&got[0].receipt).await.expect("ack");
        let dup = b
            .publish(unique_job(
                "uq-window",
                2,
                "k-window",
                window,
                UniqueRelease::Window,
            ))
            .await
            .expect("publish");
        if Utc::now() < until {
            assert_eq!(
                dup,
                Published::Duplicate(held),
                "Window keeps the key after the holder finished"
            );
        }
        let wait = (until - Utc::now()).to_std().unwrap_or_default() + f.tick();
        tokio::time::sleep(wait).await;
        b.maintain().await.expect("maintain");
        let later = b
            .publish(unique_job(
                "uq-window",
                3,
                "k-window",
                long,
                UniqueRelease::Window,
            ))
            .await
            .expect("publish");
        assert!(
            matches!(later, Published::Stored(_)),
            "the key is free after its window: {later:?}"
        );
    })
    .await;
}
