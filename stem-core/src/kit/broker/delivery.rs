//! Delivery: durable publish (B1), at-least-once (B2), priority (B9), many queues (B10).

use std::time::{Duration, Instant};

use super::{LEASE, LONG_LEASE, assert_nothing, fetch, fetch_n, job, n_of, publish, req};
use crate::envelope::Envelope;
use crate::kit::{AdapterFactory, KitOptions, guarded, skip};

/// B1: a published envelope survives the client that published it (and a
/// server restart, when the factory can cause one).
pub async fn b01_durable_publish(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b01");
    guarded(f, &[&o], async {
        if !f.broker(&o).await.capabilities().durable {
            return skip(f, "B01", "not durable", "durable");
        }
        let env = job("durable", 1);
        let id = env.id;
        let batch = vec![job("durable", 2), job("durable", 3)];
        {
            let producer = f.broker(&o).await;
            publish(&*producer, env).await;
            let ids = producer
                .publish_many(batch)
                .await
                .unwrap_or_else(|e| panic!("publish_many failed: {e}"));
            assert_eq!(ids.len(), 2);
        }
        if f.disrupt(&o).await.is_some() {
            tracing::info!("B01: server restarted");
        }
        let consumer = f.broker(&o).await;
        let got = fetch_n(&*consumer, &["durable"], 3, LEASE, Duration::from_secs(10)).await;
        assert_eq!(
            got.len(),
            3,
            "all published envelopes survive the producer client"
        );
        let first = got
            .iter()
            .find(|d| d.envelope.id == id)
            .expect("the single publish survives");
        assert_eq!(n_of(&first.envelope), 1, "the arguments survive intact");
        assert_eq!(first.envelope.name, "kit::job");
    })
    .await;
}

/// B2: a delivery neither acked nor nacked is delivered again after its
/// lease, to any consumer, with its delivery count increased; nothing is
/// dropped.
pub async fn b02_at_least_once(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b02");
    guarded(f, &[&o], async {
        let first = f.broker(&o).await;
        let second = f.broker(&o).await;
        let id = publish(&*first, job("alo", 1)).await;
        let got = fetch(&*first, &req(&["alo"], 1, LEASE)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].envelope.id, id);
        assert_eq!(got[0].deliveries, 1, "first delivery counts 1");
        let taken = Instant::now();

        // Abandoned: another consumer gets it once the lease runs out.
        let again = fetch_n(
            &*second,
            &["alo"],
            1,
            LONG_LEASE,
            LEASE + Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            again.len(),
            1,
            "an abandoned delivery comes back after its lease"
        );
        assert!(
            taken.elapsed() + Duration::from_millis(20) >= LEASE,
            "re-delivered after {:?}, before the {LEASE:?} lease ran out",
            taken.elapsed()
        );
        assert_eq!(again[0].envelope.id, id);
        assert_eq!(again[0].deliveries, 2, "the delivery count increases");
        assert_eq!(n_of(&again[0].envelope), 1);
        second
            .ack(&again[0].receipt)
            .await
            .expect("ack the re-delivery");

        // Many abandoned at once: exactly the unacked ones come back.
        let batch: Vec<Envelope> = (0..20).map(|n| job("alo-many", n)).collect();
        first.publish_many(batch).await.expect("publish_many");
        let got = fetch_n(&*first, &["alo-many"], 20, LEASE, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 20);
        for d in got.iter().filter(|d| n_of(&d.envelope).is_multiple_of(2)) {
            first.ack(&d.receipt).await.expect("ack");
        }
        let back = fetch_n(
            &*second,
            &["alo-many"],
            10,
            LONG_LEASE,
            LEASE + Duration::from_secs(5),
        )
        .await;
        let mut ns: Vec<u64> = back.iter().map(|d| n_of(&d.envelope)).collect();
        ns.sort_unstable();
        assert_eq!(
            ns,
            (0..20u64)
                .filter(|n| !n.is_multiple_of(2))
                .collect::<Vec<_>>(),
            "exactly the unacked ones return"
        );
        assert!(back.iter().all(|d| d.deliveries == 2));
        assert_nothing(
            &*second,
            &["alo-many"],
            Duration::from_millis(300),
            "acked envelopes stay acked",
        )
        .await;
    })
    .await;
}

/// B9: higher priority first within a queue; enqueue order within a
/// priority.
pub async fn b09_priority(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b09");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().priority {
            return skip(f, "B09", "no priorities", "priority");
        }
        // (n, priority) in enqueue order.
        let plan = [(0, 0), (1, 5), (2, 9), (3, 5), (4, 0), (5, 9), (6, 1)];
        let expected = [2, 5, 1, 3, 6, 0, 4];
        for (n, p) in plan {
            let mut e = job("prio", n);
            e.priority = p;
            publish(&*b, e).await;
        }
        let mut order = Vec::new();
        for _ in 0..plan.len() {
            let got = fetch(&*b, &req(&["prio"], 1, LONG_LEASE)).await;
            assert_eq!(got.len(), 1);
            order.push(n_of(&got[0].envelope));
        }
        assert_eq!(
            order, expected,
            "one at a time: priority first, then enqueue order"
        );

        // The same order inside one fetch of many, published as a batch.
        let batch: Vec<Envelope> = plan
            .iter()
            .map(|(n, p)| {
                let mut e = job("prio-batch", *n);
                e.priority = *p;
                e
            })
            .collect();
        b.publish_many(batch).await.expect("publish_many");
        let got = fetch(&*b, &req(&["prio-batch"], 10, LONG_LEASE)).await;
        let order: Vec<u64> = got.iter().map(|d| n_of(&d.envelope)).collect();
        assert_eq!(
            order, expected,
            "one fetch of many: priority first, then enqueue order"
        );
    })
    .await;
}

/// B10: one fetch consumes several queues, and a busy queue does not starve
/// the others.
pub async fn b10_many_queues(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b10");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().many_queues {
            return skip(f, "B10", "one queue per fetch", "many_queues");
        }
        let queues = ["mq-a", "mq-b", "mq-c"];
        let busy: Vec<Envelope> = (0..50).map(|n| job("mq-a", n)).collect();
        b.publish_many(busy).await.expect("publish_many");
        for n in 0..3 {
            publish(&*b, job("mq-b", 100 + n)).await;
            publish(&*b, job("mq-c", 200 + n)).await;
        }

        // Single deliveries: every non-empty queue is served within one
        // round of fetches per queue, twice over.
        let mut served = Vec::new();
        let mut delivered = Vec::new();
        for _ in 0..queues.len() * 2 {
            let got = fetch(&*b, &req(&queues, 1, LONG_LEASE)).await;
            assert_eq!(got.len(), 1);
            assert_eq!(
                &*got[0].receipt.queue, got[0].envelope.queue,
                "the receipt names the queue"
            );
            served.push(got[0].envelope.queue.clone());
            delivered.push(n_of(&got[0].envelope));
        }
        for q in queues {
            assert!(
                served.iter().any(|s| s == q),
                "queue {q} starved behind a busy queue: served {served:?}"
            );
        }

        // Everything left comes out of the same subscription.
        let rest = fetch_n(
            &*b,
            &queues,
            56 - delivered.len(),
            LONG_LEASE,
            Duration::from_secs(5),
        )
        .await;
        delivered.extend(rest.iter().map(|d| n_of(&d.envelope)));
        delivered.sort_unstable();
        let expected: Vec<u64> = (0..50).chain(100..103).chain(200..203).collect();
        assert_eq!(
            delivered, expected,
            "every envelope of every queue is delivered once"
        );
        assert_nothing(
            &*b,
            &queues,
            Duration::from_millis(200),
            "all queues drained",
        )
        .await;
    })
    .await;
}
