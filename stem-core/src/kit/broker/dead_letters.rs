//! Dead letters: nack and dead-letter (B6), listing, replay and retention (B7).

use std::time::{Duration, Instant};

use chrono::TimeDelta;

use super::{LONG_LEASE, assert_nothing, fetch, fetch_n, job, n_of, publish, req, stats};
use crate::broker::{Disposition, Replay, Settlement};
use crate::envelope::{Envelope, TaskId};
use crate::error::BrokerError;
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, eventually, guarded};

/// B6: a `Release` requeues at once without charging an attempt, a
/// `Retry` after its delay with the attempt and error charged; a
/// `DeadLetter` stores the reason, error, time and full envelope; each
/// spends its receipt.
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
        let before = f.server_now(&o).await;
        let request = Disposition::DeadLetter {
            reason: String::from("kit: gave up"),
            error: Some(String::from("kit: last error")),
            charge: true,
        };
        b.settle_one(Settlement::new(got[0].receipt.clone(), request))
            .await
            .expect("dead_letter");
        let after = f.server_now(&o).await;
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
        let expiring = got[0].envelope.id;
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
                        && s.dead_letters()
                            .expect("B7 needs DeadLetters")
                            .get(expiring)
                            .await
                            .expect("get")
                            .is_none()
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

/// B7 `get` (new in issue 20): a dead letter is found by its task id
/// alone, whatever its queue, with what the listing shows; an unknown id,
/// a replayed or purged dead letter and another namespace's find nothing;
/// undecodable bytes are found with their raw text.
pub async fn b07_get_by_id(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b07_get");
    let other = o.beside("b07_get_other");
    guarded(f, &[&o, &other], async {
        let b = f.broker(&o).await;
        let dl = b.dead_letters().expect("B7 needs DeadLetters");
        assert!(
            dl.get(TaskId::new()).await.expect("get").is_none(),
            "an unknown id finds nothing"
        );
        // Two queues (one with a separator in its name), two dead each.
        let mut ids = Vec::new();
        for queue in ["get-a", "get:b"] {
            for n in 0..2 {
                let id = publish(&*b, job(queue, n)).await;
                let got = fetch(&*b, &req(&[queue], 1, LONG_LEASE)).await;
                assert_eq!(got[0].envelope.id, id);
                let request = Disposition::DeadLetter {
                    reason: format!("reason {queue} {n}"),
                    error: Some(format!("error {n}")),
                    charge: true,
                };
                b.settle_one(Settlement::new(got[0].receipt.clone(), request))
                    .await
                    .expect("dead_letter");
                ids.push((queue, id));
            }
        }
        for (queue, id) in &ids {
            let d = dl
                .get(*id)
                .await
                .expect("get")
                .unwrap_or_else(|| panic!("dead letter {id} of `{queue}` not found by id"));
            let listed = b
                .list_dead(queue, 10)
                .await
                .expect("list")
                .into_iter()
                .find(|l| l.id == *id)
                .expect("listed");
            assert_eq!(d.id, *id);
            assert_eq!(d.queue, *queue, "the queue it died in");
            assert_eq!(d.reason, listed.reason);
            assert_eq!(d.error, listed.error);
            assert_eq!(
                d.dead_at.timestamp_millis(),
                listed.dead_at.timestamp_millis()
            );
            let env = d.envelope.as_ref().expect("the full envelope");
            assert_eq!(env.id, *id);
            assert_eq!(env.attempt, 1, "the charged attempt");
            assert_eq!(
                env.last_error,
                listed.envelope.as_ref().and_then(|e| e.last_error.clone())
            );
            assert!(d.raw.is_none());
        }

        // Another namespace on the same storage finds none of them.
        let ob = f.broker(&other).await;
        let odl = ob.dead_letters().expect("B7 needs DeadLetters");
        for (_, id) in &ids {
            assert!(
                odl.get(*id).await.expect("get").is_none(),
                "another namespace's dead letter found"
            );
        }

        // Replayed and purged dead letters are gone.
        assert_eq!(
            b.replay_dead_letters("get-a", Replay::One(ids[0].1), false)
                .await
                .expect("replay"),
            1
        );
        assert!(dl.get(ids[0].1).await.expect("get").is_none(), "replayed");
        assert!(
            dl.get(ids[1].1).await.expect("get").is_some(),
            "the other stays"
        );
        assert_eq!(b.purge_dead_letters("get:b").await.expect("purge"), 2);
        assert!(dl.get(ids[2].1).await.expect("get").is_none(), "purged");

        // Undecodable bytes: found by the id the listing gave them.
        f.insert_garbage(&o, "get-junk", b"{not an envelope").await;
        assert_nothing(
            &*b,
            &["get-junk"],
            Duration::from_millis(300),
            "garbage is dead-lettered, not delivered",
        )
        .await;
        let junk = b.list_dead("get-junk", 10).await.expect("list");
        assert_eq!(junk.len(), 1, "the garbage was dead-lettered");
        let d = dl
            .get(junk[0].id)
            .await
            .expect("get")
            .expect("undecodable dead letter found by id");
        assert_eq!(d.queue, "get-junk");
        assert!(d.envelope.is_none());
        assert!(
            d.raw
                .as_deref()
                .is_some_and(|r| r.contains("not an envelope"))
        );
    })
    .await;
}
