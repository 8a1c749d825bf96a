//! Broker clauses B1..B18 of CONTRACT.md, one public case each.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use futures::StreamExt;

use crate::backend::{TaskRecord, TaskState};

use super::ops::BrokerOps;
use super::{AdapterFactory, KitOptions, eventually, guarded, skip};
use crate::broker::{
    BroadcastStream, Broker, Delivery, Disposition, FetchRequest, Published, QueueStats, Replay,
    Settlement,
};
use crate::envelope::{Envelope, TaskId, Unique, UniqueRelease};
use crate::error::BrokerError;

/// The lease most cases take.
pub(super) const LEASE: Duration = Duration::from_millis(400);

/// A long lease, for cases that must not see re-deliveries.
pub(super) const LONG_LEASE: Duration = Duration::from_secs(30);

/// A test envelope on `queue` carrying `{"n": n}`.
pub(super) fn job(queue: &str, n: u64) -> Envelope {
    Envelope::new("kit::job", queue, serde_json::json!({ "n": n }))
        .unwrap_or_else(|e| panic!("kit envelope is valid: {e}"))
}

/// The `n` a [`job`] carries.
pub(super) fn n_of(env: &Envelope) -> u64 {
    let v: serde_json::Value = serde_json::from_str(env.args.get())
        .unwrap_or_else(|e| panic!("delivered args are JSON: {e}"));
    v["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("delivered args lost their `n`: {}", env.args.get()))
}

pub(super) fn req(queues: &[&str], max: usize, lease: Duration) -> FetchRequest {
    FetchRequest::new(queues.iter().copied(), max).lease(lease)
}

pub(super) async fn publish(b: &dyn Broker, env: Envelope) -> TaskId {
    match b.publish(env).await {
        Ok(Published::Stored(id)) => id,
        other => panic!("publish should store the envelope, got {other:?}"),
    }
}

pub(super) async fn fetch(b: &dyn Broker, r: &FetchRequest) -> Vec<Delivery> {
    b.fetch(r)
        .await
        .unwrap_or_else(|e| panic!("fetch failed: {e}"))
}

/// Fetches until `n` deliveries arrived or `within` passed.
pub(super) async fn fetch_n(
    b: &dyn Broker,
    queues: &[&str],
    n: usize,
    lease: Duration,
    within: Duration,
) -> Vec<Delivery> {
    let until = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let r = req(queues, n - out.len(), lease).wait(left.min(Duration::from_millis(500)));
        out.extend(fetch(b, &r).await);
    }
    out
}

/// Asserts that nothing is delivered from `queues` for `during`.
async fn assert_nothing(b: &dyn Broker, queues: &[&str], during: Duration, why: &str) {
    let got = fetch(b, &req(queues, 10, LONG_LEASE).wait(during)).await;
    assert!(
        got.is_empty(),
        "{why}: expected no delivery, got {:?}",
        got.iter()
            .map(|d| (d.envelope.id, d.deliveries))
            .collect::<Vec<_>>()
    );
}

pub(super) async fn stats(b: &dyn Broker, queue: &str) -> QueueStats {
    b.stats(queue)
        .await
        .unwrap_or_else(|e| panic!("stats failed: {e}"))
}

fn lease_lost(r: Result<(), BrokerError>, what: &str, id: TaskId) {
    match r {
        Err(BrokerError::LeaseLost { task_id }) => assert_eq!(task_id, id, "{what}"),
        other => panic!("{what}: expected LeaseLost, got {other:?}"),
    }
}

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

/// B6: nack requeues now or after a delay (with an optional replacement
/// envelope); dead_letter stores the reason, time and full envelope.
pub async fn b06_nack_and_dead_letter(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b06");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        let caps = b.capabilities();

        // nack(0): deliverable again now.
        let id = publish(&*b, job("nack", 1)).await;
        let got = fetch(&*b, &req(&["nack"], 1, LONG_LEASE)).await;
        b.release(&got[0].receipt, Duration::ZERO)
            .await
            .expect("release now");
        // The nacked receipt is spent: a late renewal or ack with it
        // neither leases the envelope again nor removes it.
        assert!(
            matches!(
                b.extend_lease(&got[0].receipt, LONG_LEASE).await,
                Err(BrokerError::LeaseLost { .. })
            ),
            "extend with a nacked receipt"
        );
        assert!(
            matches!(
                b.ack(&got[0].receipt).await,
                Err(BrokerError::LeaseLost { .. })
            ),
            "ack with a nacked receipt"
        );
        let again = fetch_n(&*b, &["nack"], 1, LONG_LEASE, Duration::from_secs(2)).await;
        assert_eq!(again.len(), 1, "nack(0) makes it deliverable at once");
        assert_eq!(again[0].envelope.id, id);
        assert_eq!(again[0].deliveries, 2);

        assert_eq!(again[0].envelope.attempt, 0, "a release charges no attempt");

        // retry(delay): an attempt is charged, the error kept.
        if caps.delay {
            let delay = Duration::from_millis(500);
            let nacked = Instant::now();
            b.retry(&again[0].receipt, delay, "boom")
                .await
                .expect("retry with a delay");
            assert_eq!(
                stats(&*b, "nack").await.ready,
                0,
                "a delayed nack is not ready"
            );
            let later = fetch_n(&*b, &["nack"], 1, LONG_LEASE, Duration::from_secs(5)).await;
            assert_eq!(later.len(), 1, "delivered after the nack delay");
            assert!(
                nacked.elapsed() + Duration::from_millis(20) >= delay,
                "delivered {:?} after a nack of {delay:?}",
                nacked.elapsed()
            );
            assert!(nacked.elapsed() <= delay + f.tick() + Duration::from_secs(1));
            assert_eq!(later[0].envelope.attempt, 1, "the retry charged an attempt");
            assert_eq!(later[0].envelope.last_error.as_deref(), Some("boom"));
            b.ack(&later[0].receipt).await.expect("ack");
        } else {
            b.ack(&again[0].receipt).await.expect("ack");
        }

        // dead_letter: reason, error, time and the full envelope.
        let mut env = job("dlq", 7);
        env.headers
            .insert(String::from("trace"), String::from("t-1"));
        let id = publish(&*b, env).await;
        let got = fetch(&*b, &req(&["dlq"], 1, LONG_LEASE)).await;
        let before = Utc::now();
        let request = Disposition::DeadLetter {
            reason: String::from("kit: gave up"),
            error: Some(String::from("kit: last error")),
            charge: true,
        };
        b.settle_one(Settlement::new(got[0].receipt.clone(), request))
            .await
            .expect("dead_letter");
        let after = Utc::now();
        let dead = b.list_dead("dlq", 10).await.expect("dead_letters");
        assert_eq!(dead.len(), 1);
        let d = &dead[0];
        assert_eq!(d.id, id);
        assert_eq!(d.queue, "dlq");
        assert_eq!(d.reason, "kit: gave up");
        assert_eq!(d.error.as_deref(), Some("kit: last error"));
        assert!(
            d.dead_at >= before - TimeDelta::seconds(1)
                && d.dead_at <= after + TimeDelta::seconds(1),
            "dead_at {} is not the time of the call ({before}..{after})",
            d.dead_at
        );
        let stored = d.envelope.as_ref().expect("the full envelope is kept");
        assert_eq!(stored.id, id);
        assert_eq!(n_of(stored), 7);
        assert_eq!(stored.headers.get("trace").map(String::as_str), Some("t-1"));
        assert_eq!(
            stored.attempt, 1,
            "a charging dead letter counts the last attempt"
        );
        assert_eq!(stored.last_error.as_deref(), Some("kit: last error"));
        let s = stats(&*b, "dlq").await;
        assert_eq!((s.ready, s.leased, s.dead), (0, 0, 1), "{s:?}");
        assert_nothing(
            &*b,
            &["dlq"],
            Duration::from_millis(200),
            "a dead letter is not delivered",
        )
        .await;
    })
    .await;
}

/// B7: dead letters are listed in pages oldest first, counted, replayed one
/// or all (attempts reset or kept), purged, and expire after the retention.
pub async fn b07_dead_letters(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b07");
    let short =
        KitOptions::new(f.name(), "b07_retention").dead_letter_retention(Duration::from_secs(1));
    guarded(f, &[&o, &short], async {
        let b = f.broker(&o).await;
        let envs: Vec<Envelope> = (0..5)
            .map(|n| {
                let mut e = job("dl", n);
                e.attempt = 3;
                e.last_error = Some(format!("error {n}"));
                e
            })
            .collect();
        let ids: Vec<TaskId> = envs.iter().map(|e| e.id).collect();
        for e in envs {
            publish(&*b, e).await;
        }
        // Dead-letter them in publish order.
        for (n, id) in ids.iter().enumerate() {
            let got = fetch(&*b, &req(&["dl"], 1, LONG_LEASE)).await;
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].envelope.id, *id, "fetched in publish order");
            b.dead_letter(&got[0].receipt, &format!("reason {n}"))
                .await
                .expect("dead_letter");
        }
        assert_eq!(b.dead_letter_count("dl").await.expect("count"), 5);

        // Paged by cursor, oldest first; the last page has no cursor.
        let dl = b.dead_letters().expect("B7 needs DeadLetters");
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = dl
                .list("dl", cursor.as_deref(), 2)
                .await
                .expect("dead letters page");
            assert!(page.items.len() <= 2, "a page holds at most its limit");
            pages.push(page.items.iter().map(|d| d.id).collect::<Vec<_>>());
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
            assert!(pages.len() <= 5, "the cursor does not end");
        }
        assert_eq!(pages.concat(), ids, "every dead letter once, oldest first");
        assert_eq!(pages[0], ids[0..2]);
        assert_eq!(pages[1], ids[2..4]);
        let whole = dl.list("dl", None, 10).await.expect("one page");
        assert_eq!(whole.items.len(), 5);
        assert!(whole.next.is_none(), "no cursor after the last page");
        let page = |offset: usize, limit: usize| {
            let b = b.clone();
            async move {
                b.list_dead("dl", usize::MAX)
                    .await
                    .expect("dead_letters")
                    .into_iter()
                    .skip(offset)
                    .take(limit)
                    .map(|d| d.id)
                    .collect::<Vec<_>>()
            }
        };
        let listed = b.list_dead("dl", 10).await.expect("dead_letters");
        let reasons: Vec<&str> = listed.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(
            reasons,
            ["reason 0", "reason 1", "reason 2", "reason 3", "reason 4"]
        );

        // Replay one with attempts reset.
        assert_eq!(
            b.replay_dead_letters("dl", Replay::One(TaskId::new()), true)
                .await
                .expect("replay unknown"),
            0
        );
        assert_eq!(
            b.replay_dead_letters("dl", Replay::One(ids[1]), true)
                .await
                .expect("replay one"),
            1
        );
        assert_eq!(b.dead_letter_count("dl").await.expect("count"), 4);
        assert_eq!(page(0, 10).await, [ids[0], ids[2], ids[3], ids[4]]);
        let got = fetch_n(&*b, &["dl"], 1, LONG_LEASE, Duration::from_secs(2)).await;
        assert_eq!(got.len(), 1, "a replayed dead letter is back on its queue");
        assert_eq!(got[0].envelope.id, ids[1]);
        assert_eq!(got[0].envelope.attempt, 0, "attempts reset");
        assert_eq!(
            got[0].envelope.last_error, None,
            "the last error goes with the reset"
        );
        b.ack(&got[0].receipt).await.expect("ack");

        // Replay all with attempts kept.
        assert_eq!(
            b.replay_dead_letters("dl", Replay::All, false)
                .await
                .expect("replay all"),
            4
        );
        assert_eq!(b.dead_letter_count("dl").await.expect("count"), 0);
        let got = fetch_n(&*b, &["dl"], 4, LONG_LEASE, Duration::from_secs(2)).await;
        let mut back: Vec<TaskId> = got.iter().map(|d| d.envelope.id).collect();
        back.sort();
        let mut expected = vec![ids[0], ids[2], ids[3], ids[4]];
        expected.sort();
        assert_eq!(back, expected);
        assert!(got.iter().all(|d| d.envelope.attempt == 3), "attempts kept");
        assert!(
            got.iter().all(|d| d.envelope.last_error.is_some()),
            "last errors kept"
        );

        // Purge.
        for d in &got[..2] {
            b.dead_letter(&d.receipt, "again")
                .await
                .expect("dead_letter");
        }
        for d in &got[2..] {
            b.ack(&d.receipt).await.expect("ack");
        }
        assert_eq!(b.dead_letter_count("dl").await.expect("count"), 2);
        assert_eq!(b.purge_dead_letters("dl").await.expect("purge"), 2);
        assert_eq!(b.dead_letter_count("dl").await.expect("count"), 0);
        assert!(page(0, 10).await.is_empty());
        assert_eq!(b.purge_dead_letters("dl").await.expect("purge again"), 0);

        // Retention: with a 1 s window, a dead letter vanishes on its own.
        let s = f.broker(&short).await;
        publish(&*s, job("dl", 9)).await;
        let got = fetch(&*s, &req(&["dl"], 1, LONG_LEASE)).await;
        s.dead_letter(&got[0].receipt, "expiring")
            .await
            .expect("dead_letter");
        assert_eq!(
            s.dead_letter_count("dl").await.expect("count"),
            1,
            "kept within the window"
        );
        let dead_at = Instant::now();
        eventually(
            "the dead letter to expire",
            Duration::from_secs(1) + f.tick() + Duration::from_secs(3),
            || {
                let s = s.clone();
                async move {
                    s.maintain().await.expect("maintain");
                    s.dead_letter_count("dl").await.expect("count") == 0
                        && s.list_dead("dl", 10).await.expect("list").is_empty()
                }
            },
        )
        .await;
        assert!(
            dead_at.elapsed() + Duration::from_millis(50) >= Duration::from_secs(1),
            "expired before the retention window"
        );
        assert_eq!(stats(&*s, "dl").await.dead, 0);
    })
    .await;
}

/// B8: an envelope is not delivered before `not_before`, and is delivered
/// within a tick of it.
pub async fn b08_delay(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b08");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().delay {
            return skip(f, "B08", "no delayed delivery", "delay");
        }
        let delay = TimeDelta::milliseconds(600);
        let mut late = job("delay", 2);
        late.not_before = Some(Utc::now() + delay * 2);
        let mut soon = job("delay", 1);
        soon.not_before = Some(Utc::now() + delay);
        let mut past = job("delay", 0);
        past.not_before = Some(Utc::now() - TimeDelta::seconds(5));
        let late_at = late.not_before;
        let soon_at = soon.not_before;
        publish(&*b, late).await;
        publish(&*b, soon).await;
        publish(&*b, past).await;

        let now = fetch(&*b, &req(&["delay"], 10, LONG_LEASE)).await;
        assert_eq!(
            now.len(),
            1,
            "only the envelope whose time has passed is ready"
        );
        assert_eq!(n_of(&now[0].envelope), 0);
        let s = stats(&*b, "delay").await;
        assert_eq!((s.ready, s.delayed), (0, 2), "{s:?}");

        let slack = f.tick() + Duration::from_millis(300);
        for (n, at) in [(1, soon_at), (2, late_at)] {
            let at = at.unwrap_or_else(Utc::now);
            let got = fetch(
                &*b,
                &req(&["delay"], 10, LONG_LEASE).wait(Duration::from_secs(5)),
            )
            .await;
            let received = Utc::now();
            assert_eq!(got.len(), 1, "one delayed envelope at a time");
            assert_eq!(
                n_of(&got[0].envelope),
                n,
                "delayed envelopes come in time order"
            );
            assert!(
                received + TimeDelta::milliseconds(20) >= at,
                "delivered at {received}, before not_before {at}"
            );
            let lateness = (received - at).to_std().unwrap_or_default();
            assert!(
                lateness <= slack,
                "delivered {lateness:?} after not_before; a tick is {:?}",
                f.tick()
            );
        }
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

async fn next_message(s: &mut BroadcastStream, within: Duration) -> Option<String> {
    tokio::time::timeout(within, s.next())
        .await
        .ok()
        .flatten()
        .map(|m| m.payload)
}

/// B11: a broadcast reaches every live subscriber of the channel once,
/// and nobody else.
pub async fn b11_broadcast(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b11");
    guarded(f, &[&o], async {
        let sender = f.broker(&o).await;
        if !sender.capabilities().broadcast {
            return skip(f, "B11", "no broadcast channels", "broadcast");
        }
        let a = f.broker(&o).await;
        let c = f.broker(&o).await;
        let mut sub_a = a.subscribe("kit-control").await.expect("subscribe");
        let mut sub_b = c.subscribe("kit-control").await.expect("subscribe");
        let mut other = c.subscribe("kit-other").await.expect("subscribe");

        sender
            .broadcast_send("kit-control", "m1")
            .await
            .expect("broadcast");
        sender
            .broadcast_send("kit-control", r#"{"cmd":"m2"}"#)
            .await
            .expect("broadcast");
        let wait = Duration::from_secs(3);
        for (name, sub) in [("first", &mut sub_a), ("second", &mut sub_b)] {
            assert_eq!(
                next_message(sub, wait).await.as_deref(),
                Some("m1"),
                "{name} subscriber gets m1"
            );
            assert_eq!(
                next_message(sub, wait).await.as_deref(),
                Some(r#"{"cmd":"m2"}"#),
                "{name} subscriber gets m2, in order"
            );
            assert_eq!(
                next_message(sub, Duration::from_millis(300)).await,
                None,
                "{name}: once each"
            );
        }
        assert_eq!(
            next_message(&mut other, Duration::from_millis(200)).await,
            None,
            "other channels hear nothing"
        );

        // A late subscriber gets only what is sent after it subscribed; a
        // dropped one does not disturb the others.
        drop(sub_b);
        let mut late = a.subscribe("kit-control").await.expect("subscribe");
        sender
            .broadcast_send("kit-control", "m3")
            .await
            .expect("broadcast");
        assert_eq!(next_message(&mut late, wait).await.as_deref(), Some("m3"));
        assert_eq!(next_message(&mut sub_a, wait).await.as_deref(), Some("m3"));
        assert_eq!(
            next_message(&mut late, Duration::from_millis(200)).await,
            None
        );

        // Broadcasting with nobody listening is not an error.
        sender
            .broadcast_send("kit-nobody", "x")
            .await
            .expect("broadcast to no subscriber");
    })
    .await;
}

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

/// B14: `publish_many` keeps input order, is all-or-nothing where the
/// adapter declares `atomic_batch`, and is at least as fast per envelope as
/// `publish`.
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

        // Speed: per envelope, a batch is no slower than single publishes.
        // Rounds of 1,000 alternate (singles, batch, singles, batch, ...)
        // and the medians are compared, so one slow moment of a shared
        // machine cannot decide the outcome, while a batch written as a loop
        // of single round trips (or slower) still fails.
        const SPEED: u64 = 1_000;
        const ROUNDS: usize = 3;
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
        assert!(
            batched <= one_by_one.mul_f64(1.5) + Duration::from_millis(5),
            "publish_many of {SPEED} took {batched:?} (median of {ROUNDS}: {batches:?}), \
             {SPEED} publishes took {one_by_one:?} ({singles:?})"
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

/// B15: after the server restarts, a consumer resumes by itself and loses
/// nothing published before the drop.
///
/// Needs [`AdapterFactory::disrupt`]; "a publish during the outage returns
/// an error" needs a window the kit cannot hold open generically, so adapter
/// suites test it with their own fault injection.
pub async fn b15_reconnect(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b15");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().reconnect {
            return skip(f, "B15", "no reconnect", "reconnect");
        }
        let ids: Vec<TaskId> = (0..5).map(|_| TaskId::new()).collect();
        for (n, id) in ids.iter().enumerate() {
            let mut e = job("reconnect", n as u64);
            e.id = *id;
            publish(&*b, e).await;
        }
        assert!(
            f.disrupt(&o).await.is_some(),
            "{} declares `reconnect: true` but its factory cannot disrupt the server: \
             implement AdapterFactory::disrupt (a restart or a connection kill), or \
             declare `reconnect: false` and list b15_reconnect as unsupported",
            f.name()
        );
        // The same client resumes on its own; errors while it reconnects are
        // allowed, losing envelopes is not.
        let until = Instant::now() + Duration::from_secs(30);
        let mut got = HashSet::new();
        while got.len() < ids.len() && Instant::now() < until {
            match b
                .fetch(&req(&["reconnect"], 5, LONG_LEASE).wait(Duration::from_millis(500)))
                .await
            {
                Ok(ds) => got.extend(ds.into_iter().map(|d| d.envelope.id)),
                Err(e) => {
                    tracing::debug!("B15: fetch during reconnect: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        assert_eq!(
            got,
            ids.into_iter().collect::<HashSet<_>>(),
            "envelopes published before the drop are all delivered"
        );
        let after = publish(&*b, job("reconnect", 9)).await;
        let more = fetch_n(&*b, &["reconnect"], 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(
            more.first().map(|d| d.envelope.id),
            Some(after),
            "publishing works again"
        );
    })
    .await;
}

/// A job whose encoding is at least `bytes` long.
fn job_with_payload(queue: &str, bytes: usize) -> Envelope {
    Envelope::new(
        "kit::big",
        queue,
        serde_json::json!({ "blob": "x".repeat(bytes) }),
    )
    .unwrap_or_else(|e| panic!("kit envelope is valid: {e}"))
}

/// B16: oversized envelopes are refused at publish with a clear error;
/// garbage in storage is dead-lettered with a reason while the consumer
/// keeps going.
pub async fn b16_bad_input(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b16");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        let limit = o.max_envelope_bytes;

        // Too large: refused, typed, nothing stored.
        let big = job_with_payload("big", limit);
        let big_id = big.id;
        match b.publish(big).await {
            Err(BrokerError::TooLarge {
                task_id,
                size,
                limit: l,
            }) => {
                assert_eq!(task_id, big_id);
                assert_eq!(l, limit, "the error names the configured limit");
                assert!(size > limit, "the error names the size: {size}");
            }
            other => panic!(
                "an envelope over {limit} bytes must be refused with TooLarge, got {other:?}"
            ),
        }
        let err = b
            .publish(job_with_payload("big", limit * 2))
            .await
            .expect_err("too large");
        assert!(
            err.to_string().contains(&limit.to_string()),
            "a clear message: {err}"
        );
        // Just under the limit is fine.
        let fits = job_with_payload("big", limit - 2048);
        assert!(fits.encode().map(|v| v.len()).unwrap_or(usize::MAX) <= limit);
        publish(&*b, fits).await;
        assert_eq!(
            stats(&*b, "big").await.ready,
            1,
            "only the envelope that fits is stored"
        );

        // Garbage between good envelopes.
        let good1 = publish(&*b, job("garbage", 1)).await;
        f.insert_garbage(&o, "garbage", b"{this is not an envelope")
            .await;
        f.insert_garbage(&o, "garbage", &[0xff, 0xfe, 0x00, 0x01])
            .await;
        f.insert_garbage(&o, "garbage", br#"{"v":1,"id":"not-a-uuid"}"#)
            .await;
        let good2 = publish(&*b, job("garbage", 2)).await;
        let got = fetch_n(&*b, &["garbage"], 2, LONG_LEASE, Duration::from_secs(5)).await;
        let ids: Vec<TaskId> = got.iter().map(|d| d.envelope.id).collect();
        assert_eq!(
            ids,
            [good1, good2],
            "the consumer gets the good envelopes and never the garbage"
        );
        assert_nothing(
            &*b,
            &["garbage"],
            Duration::from_millis(200),
            "garbage is never delivered",
        )
        .await;
        let dead = b.list_dead("garbage", 10).await.expect("dead_letters");
        assert_eq!(
            dead.len(),
            3,
            "each garbage entry is dead-lettered: {dead:?}"
        );
        for d in &dead {
            assert!(d.envelope.is_none(), "garbage has no envelope");
            assert!(
                !d.reason.trim().is_empty(),
                "garbage is dead-lettered with a reason"
            );
            assert_eq!(d.queue, "garbage");
        }
        assert!(
            dead.iter().any(|d| d
                .raw
                .as_deref()
                .is_some_and(|r| r.contains("this is not an envelope"))),
            "the raw bytes are kept for inspection: {dead:?}"
        );
        let dead_ids: HashSet<TaskId> = dead.iter().map(|d| d.id).collect();
        assert_eq!(
            dead_ids.len(),
            3,
            "each dead-lettered garbage entry has its own id"
        );
        assert_eq!(stats(&*b, "garbage").await.dead, 3);
    })
    .await;
}

pub(super) fn unique_job(
    queue: &str,
    n: u64,
    key: &str,
    window: TimeDelta,
    release: UniqueRelease,
) -> Envelope {
    let mut e = job(queue, n);
    e.unique = Some(Unique {
        key: key.to_owned(),
        until: Utc::now() + window,
        release,
    });
    e
}

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
        let holder = publish(
            &*b,
            unique_job("uq", 1, "k-dup", long, UniqueRelease::OnFinish),
        )
        .await;
        let dup = b
            .publish(unique_job("uq", 2, "k-dup", long, UniqueRelease::OnFinish))
            .await
            .expect("publish");
        assert_eq!(
            dup,
            Published::Duplicate(holder),
            "a duplicate returns the holder's id"
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

/// B18: delays and leases are judged by the server's clock, so a client
/// whose clock is off neither runs delayed work early nor steals live
/// leases. Needs [`AdapterFactory::skewed_broker`] for the skewed half.
pub async fn b18_server_time(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b18");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().server_time {
            return skip(f, "B18", "no server clock", "server_time");
        }
        let mut delayed = job("clock", 1);
        delayed.not_before = Some(Utc::now() + TimeDelta::seconds(2));
        let delayed_id = publish(&*b, delayed).await;
        let leased_id = publish(&*b, job("clock-lease", 2)).await;
        let held = fetch(&*b, &req(&["clock-lease"], 1, Duration::from_secs(5))).await;
        assert_eq!(held[0].envelope.id, leased_id);

        let Some(skewed) = f.skewed_broker(&o, TimeDelta::minutes(10)).await else {
            assert_nothing(
                &*b,
                &["clock", "clock-lease"],
                Duration::from_millis(300),
                "nothing is due yet",
            )
            .await;
            return;
        };
        assert_nothing(
            &*skewed,
            &["clock"],
            Duration::from_millis(300),
            "a fast clock runs delayed work early",
        )
        .await;
        assert_nothing(
            &*skewed,
            &["clock-lease"],
            Duration::from_millis(300),
            "a fast clock steals a live lease",
        )
        .await;
        let due = fetch_n(&*skewed, &["clock"], 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(
            due.first().map(|d| d.envelope.id),
            Some(delayed_id),
            "delivered once due by the server clock"
        );
        b.ack(&held[0].receipt)
            .await
            .expect("the live lease is intact");
    })
    .await;
}

/// The median of a few durations (sorts them in place).
fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}
