//! Settlements and round trips: what `settle`, lease expiry, dead-lettering
//! and replay must keep of an envelope, and what batch and admin calls
//! must touch (and must not). Each case is one escape a reviewer planted
//! in an adapter and the older cases let through.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeDelta, Utc};

use super::broker::{LEASE, LONG_LEASE, fetch, fetch_n, job, publish, req, stats, unique_job};
use super::ops::BrokerOps;
use super::{AdapterFactory, KitOptions, guarded, skip};
use crate::broker::{Disposition, Published, Replay, Settlement};
use crate::envelope::{Envelope, TaskId, UniqueRelease};
use crate::error::BrokerError;

/// An envelope with every field set: unicode headers, every optional id,
/// `expires_at`, priority, retries, a large payload.
fn full_envelope(queue: &str, args_bytes: usize) -> Envelope {
    let mut e = Envelope::new(
        "kit::round_trip",
        queue,
        serde_json::json!({ "pad": "ж".repeat(args_bytes / 2), "n": 1 }),
    )
    .unwrap_or_else(|err| panic!("kit envelope is valid: {err}"));
    e.priority = 7;
    e.max_retries = 11;
    e.parent_id = Some(TaskId::new());
    e.group_id = Some(TaskId::new());
    e.chord_id = Some(TaskId::new());
    e.expires_at = Some(Utc::now() + TimeDelta::hours(2));
    // Due already, so it is delivered at once but the field must survive.
    e.not_before = Some(Utc::now() - TimeDelta::seconds(1));
    e.result_ttl_secs = Some(3_600);
    e.headers = BTreeMap::from([
        (String::from("trace"), String::from("00-ab-cd-01")),
        (String::from("ключ"), String::from("värde ✓ \u{1F600}")),
        (String::new(), String::from("empty key")),
    ]);
    e
}

/// Every field of `got` equals `want`'s, except those `changes` allows.
fn assert_same(got: &Envelope, want: &Envelope, after: &str) {
    assert_eq!(got.id, want.id, "{after}: id");
    assert_eq!(got.name, want.name, "{after}: name");
    assert_eq!(got.queue, want.queue, "{after}: queue");
    assert_eq!(got.priority, want.priority, "{after}: priority");
    assert_eq!(got.args.get(), want.args.get(), "{after}: args");
    assert_eq!(got.attempt, want.attempt, "{after}: attempt");
    assert_eq!(got.max_retries, want.max_retries, "{after}: max_retries");
    assert_eq!(got.parent_id, want.parent_id, "{after}: parent_id");
    assert_eq!(got.group_id, want.group_id, "{after}: group_id");
    assert_eq!(got.chord_id, want.chord_id, "{after}: chord_id");
    assert_eq!(
        got.expires_at.map(|t| t.timestamp_millis()),
        want.expires_at.map(|t| t.timestamp_millis()),
        "{after}: expires_at"
    );
    assert_eq!(
        got.result_ttl_secs, want.result_ttl_secs,
        "{after}: result_ttl_secs"
    );
    assert_eq!(got.headers, want.headers, "{after}: headers");
    assert_eq!(got.last_error, want.last_error, "{after}: last_error");
    assert_eq!(
        got.enqueued_at.timestamp_millis(),
        want.enqueued_at.timestamp_millis(),
        "{after}: enqueued_at"
    );
}

/// `not_before` kept to the millisecond (a settlement with a delay of its
/// own may replace it, so only deliveries that were not settled check it).
fn assert_not_before(got: &Envelope, want: &Envelope, after: &str) {
    assert_eq!(
        got.not_before.map(|t| t.timestamp_millis()),
        want.not_before.map(|t| t.timestamp_millis()),
        "{after}: not_before"
    );
}

/// B2/B6/B7: every field of an envelope survives publish → fetch,
/// release → fetch, lease expiry → fetch, retry → fetch (attempt and error
/// changed, nothing else) and dead letter → replay → fetch; an empty and a
/// large payload too.
pub async fn b06_envelope_round_trip(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b06_round_trip");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        // Through publish_many too: every field of each envelope of a batch.
        let batch: Vec<Envelope> = [0, 1_000, 40_000]
            .into_iter()
            .map(|bytes| full_envelope("trip-many", bytes))
            .collect();
        b.publish_many(batch.clone()).await.expect("publish_many");
        let got = fetch_n(&*b, &["trip-many"], 3, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 3, "the whole batch is delivered");
        for d in &got {
            let want = batch
                .iter()
                .find(|e| e.id == d.envelope.id)
                .unwrap_or_else(|| panic!("publish_many delivered a stranger {}", d.envelope.id));
            assert_same(&d.envelope, want, "publish_many → fetch");
            assert_not_before(&d.envelope, want, "publish_many → fetch");
            b.ack(&d.receipt).await.expect("ack");
        }

        for bytes in [0, 40_000] {
            let want = full_envelope("trip", bytes);
            publish(&*b, want.clone()).await;
            let got = fetch_n(&*b, &["trip"], 1, LEASE, Duration::from_secs(5)).await;
            assert_same(&got[0].envelope, &want, "publish → fetch");
            assert_not_before(&got[0].envelope, &want, "publish → fetch");

            // Lease expiry: not settled, delivered again after the lease.
            let got = fetch_n(&*b, &["trip"], 1, LEASE, Duration::from_secs(10)).await;
            assert_eq!(got.len(), 1, "delivered again after the lease ran out");
            assert_same(&got[0].envelope, &want, "lease expiry → fetch");
            assert_not_before(&got[0].envelope, &want, "lease expiry → fetch");

            b.release(&got[0].receipt, Duration::ZERO)
                .await
                .expect("release");
            let got = fetch_n(&*b, &["trip"], 1, LONG_LEASE, Duration::from_secs(5)).await;
            assert_same(&got[0].envelope, &want, "release → fetch");

            b.retry(&got[0].receipt, Duration::ZERO, "kit: boom ✗")
                .await
                .expect("retry");
            let got = fetch_n(&*b, &["trip"], 1, LONG_LEASE, Duration::from_secs(5)).await;
            let mut charged = want.clone();
            charged.attempt = 1;
            charged.last_error = Some(String::from("kit: boom ✗"));
            assert_same(&got[0].envelope, &charged, "retry → fetch");

            b.dead_letter(&got[0].receipt, "kit: round trip")
                .await
                .expect("dead letter");
            assert_eq!(
                b.replay_dead_letters("trip", Replay::All, false)
                    .await
                    .expect("replay"),
                1
            );
            let got = fetch_n(&*b, &["trip"], 1, LONG_LEASE, Duration::from_secs(5)).await;
            assert_same(&got[0].envelope, &charged, "dead letter → replay → fetch");
            b.ack(&got[0].receipt).await.expect("ack");
        }
    })
    .await;
}

/// B4/B14: one settlement batch acks every receipt in it, not only the
/// first; the answers come back one per settlement, in order, and a spent
/// receipt in the middle answers `LeaseLost` without failing the others.
pub async fn b04_settle_batch_settles_each(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b04_batch");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        for n in 0..5 {
            publish(&*b, job("batch", n)).await;
        }
        let got = fetch_n(&*b, &["batch"], 5, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 5);
        b.ack(&got[2].receipt)
            .await
            .expect("ack the middle one first");
        let batch: Vec<Settlement> = got
            .iter()
            .map(|d| Settlement::new(d.receipt.clone(), Disposition::Ack))
            .collect();
        let answers = b.settle(&batch).await;
        assert_eq!(answers.len(), 5, "one answer per settlement");
        for (i, a) in answers.iter().enumerate() {
            if i == 2 {
                assert!(
                    matches!(a, Err(BrokerError::LeaseLost { .. })),
                    "the spent receipt answers LeaseLost, got {a:?}"
                );
            } else {
                assert!(a.is_ok(), "settlement {i}: {a:?}");
            }
        }
        let s = stats(&*b, "batch").await;
        assert_eq!(
            (s.ready, s.delayed, s.leased),
            (0, 0, 0),
            "every receipt of the batch was acked: {s:?}"
        );
    })
    .await;
}

/// B6/B9/B17: a release or retry keeps the envelope's priority (it is
/// delivered before lower ones again) and keeps an until-finished unique
/// key held (a duplicate is still refused while the holder waits).
pub async fn b06_settle_keeps_priority_and_unique_key(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b06_keeps");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        let caps = b.capabilities();
        if caps.priority {
            let mut high = job("prio", 1);
            high.priority = 8;
            let high_id = publish(&*b, high).await;
            let got = fetch(&*b, &req(&["prio"], 1, LONG_LEASE)).await;
            assert_eq!(got[0].envelope.id, high_id);
            publish(&*b, job("prio", 2)).await;
            b.release(&got[0].receipt, Duration::ZERO)
                .await
                .expect("release");
            let again = fetch(&*b, &req(&["prio"], 1, LONG_LEASE)).await;
            assert_eq!(again[0].envelope.id, high_id, "released at its priority");
            assert_eq!(again[0].envelope.priority, 8);
            b.retry(&again[0].receipt, Duration::ZERO, "kit")
                .await
                .expect("retry");
            let third = fetch(&*b, &req(&["prio"], 1, LONG_LEASE)).await;
            assert_eq!(third[0].envelope.id, high_id, "retried at its priority");
            assert_eq!(third[0].envelope.priority, 8);
        } else {
            skip(f, "B06", "priority part skipped", "priority");
        }
        if caps.unique {
            let holder = unique_job(
                "uniq",
                1,
                "kit-held",
                TimeDelta::minutes(10),
                UniqueRelease::OnFinish,
            );
            let holder_id = publish(&*b, holder).await;
            let got = fetch(&*b, &req(&["uniq"], 1, LONG_LEASE)).await;
            b.release(&got[0].receipt, Duration::ZERO)
                .await
                .expect("release");
            let dup = unique_job(
                "uniq",
                2,
                "kit-held",
                TimeDelta::minutes(10),
                UniqueRelease::OnFinish,
            );
            assert_eq!(
                b.publish(dup).await.expect("publish"),
                Published::Duplicate(holder_id),
                "a released holder keeps its until-finished key"
            );
            // A retried holder keeps it too.
            let got = fetch_n(&*b, &["uniq"], 1, LONG_LEASE, Duration::from_secs(5)).await;
            b.retry(&got[0].receipt, Duration::ZERO, "kit: again")
                .await
                .expect("retry");
            let dup = unique_job(
                "uniq",
                3,
                "kit-held",
                TimeDelta::minutes(10),
                UniqueRelease::OnFinish,
            );
            assert_eq!(
                b.publish(dup).await.expect("publish"),
                Published::Duplicate(holder_id),
                "a retried holder keeps its until-finished key"
            );
        } else {
            skip(f, "B06", "unique part skipped", "unique");
        }
    })
    .await;
}

/// B13: `purge` empties only its own queue and frees the unique keys of
/// what it removed; an expired lease counts as ready, not leased.
pub async fn b13_purge_is_per_queue_and_stats_see_expiry(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b13_purge");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        let caps = b.capabilities();
        publish(&*b, job("keep", 1)).await;
        publish(&*b, job("gone", 1)).await;
        if caps.unique {
            publish(
                &*b,
                unique_job(
                    "gone",
                    2,
                    "kit-purged",
                    TimeDelta::minutes(10),
                    UniqueRelease::Window,
                ),
            )
            .await;
        }
        let delayed_unique = caps.unique && caps.delay;
        if delayed_unique {
            // A delayed holder is purged too, and frees its key.
            let mut later = unique_job(
                "gone",
                4,
                "kit-purged-later",
                TimeDelta::minutes(10),
                UniqueRelease::Window,
            );
            later.not_before = Some(later.enqueued_at + TimeDelta::minutes(5));
            publish(&*b, later).await;
        }
        let removed = b.purge("gone").await.expect("purge");
        assert_eq!(
            removed,
            1 + u64::from(caps.unique) + u64::from(delayed_unique),
            "purge removes the ready and the delayed envelopes"
        );
        assert_eq!(
            stats(&*b, "keep").await.ready,
            1,
            "another queue is untouched"
        );
        if caps.unique {
            let again = unique_job(
                "gone",
                3,
                "kit-purged",
                TimeDelta::minutes(10),
                UniqueRelease::Window,
            );
            assert!(
                matches!(
                    b.publish(again).await.expect("publish"),
                    Published::Stored(_)
                ),
                "purge frees the keys of what it removed"
            );
        }
        if delayed_unique {
            let again = unique_job(
                "gone",
                5,
                "kit-purged-later",
                TimeDelta::minutes(10),
                UniqueRelease::Window,
            );
            assert!(
                matches!(
                    b.publish(again).await.expect("publish"),
                    Published::Stored(_)
                ),
                "purge frees the key of a delayed envelope it removed"
            );
        }

        // An expired lease is ready again in the counts.
        let got = fetch(&*b, &req(&["keep"], 1, Duration::from_millis(300))).await;
        assert_eq!(got.len(), 1);
        assert_eq!(stats(&*b, "keep").await.leased, 1);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let s = stats(&*b, "keep").await;
        assert_eq!(
            (s.ready, s.leased),
            (1, 0),
            "an expired lease counts as ready: {s:?}"
        );
    })
    .await;
}

/// B6: a `Release` with a delay hands the envelope back after it, not at
/// once, and charges nothing.
pub async fn b06_delayed_release_waits(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b06_release");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().delay {
            return skip(f, "B06", "delayed release skipped", "delay");
        }
        let id = publish(&*b, job("later", 1)).await;
        let got = fetch(&*b, &req(&["later"], 1, LONG_LEASE)).await;
        let released = std::time::Instant::now();
        b.release(&got[0].receipt, Duration::from_millis(600))
            .await
            .expect("release");
        let early = fetch(&*b, &req(&["later"], 1, LONG_LEASE)).await;
        assert!(early.is_empty(), "a Release of 600 ms was ready at once");
        assert_eq!(stats(&*b, "later").await.delayed, 1, "it waits as delayed");
        let back = fetch_n(&*b, &["later"], 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(back.first().map(|d| d.envelope.id), Some(id));
        assert!(
            released.elapsed() >= Duration::from_millis(550),
            "released for 600 ms, back after {:?}",
            released.elapsed()
        );
        assert_eq!(back[0].envelope.attempt, 0, "a release charges nothing");
        b.ack(&back[0].receipt).await.expect("ack");
    })
    .await;
}
