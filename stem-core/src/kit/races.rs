//! Races between clients as separate processes would open them
//! ([`AdapterFactory::peer_broker`], [`AdapterFactory::peer_backend`]),
//! run from several tokio tasks on the kit's multi-thread runtime: two
//! consumers on one queue (B3), a late ack against lease expiry (B4), 50
//! concurrent publishes of one unique key (B17) and two finishers of a
//! chord's last members (R5). A lock or check that only holds inside one
//! client (a mutex in the process, one writer thread) fails them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::TimeDelta;

use super::backend::{record, succeeded};
use super::broker::{LONG_LEASE, fetch, fetch_n, job, n_of, publish, req, stats, unique_job};
use super::{AdapterFactory, KitOptions, guarded, skip};
use crate::backend::GroupSpec;
use crate::broker::Published;
use crate::envelope::{Envelope, TaskId, UniqueRelease};
use crate::error::BrokerError;

/// B3 raced: two peer clients, three fetching tasks each, drain one queue
/// of 200; every envelope is delivered exactly once.
pub async fn b03_race_two_consumers(f: &dyn AdapterFactory) {
    const N: u64 = 200;
    let o = KitOptions::new(f.name(), "b03_race");
    guarded(f, &[&o], async {
        let producer = f.broker(&o).await;
        producer
            .publish_many((0..N).map(|n| job("race", n)).collect())
            .await
            .expect("publish_many");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let until = Instant::now() + Duration::from_secs(20);
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let peer = f.peer_broker(&o).await;
            for _ in 0..3 {
                let (peer, seen, count) = (peer.clone(), seen.clone(), count.clone());
                tasks.push(tokio::spawn(async move {
                    while count.load(Ordering::SeqCst) < N as usize && Instant::now() < until {
                        let r = req(&["race"], 5, LONG_LEASE).wait(Duration::from_millis(200));
                        for d in fetch(&*peer, &r).await {
                            seen.lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(n_of(&d.envelope));
                            count.fetch_add(1, Ordering::SeqCst);
                            peer.ack(&d.receipt).await.expect("ack of a live lease");
                        }
                    }
                }));
            }
        }
        for t in tasks {
            t.await.expect("consumer task");
        }
        let mut seen = std::mem::take(
            &mut *seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        seen.sort_unstable();
        let mut twice: Vec<u64> = seen
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        twice.dedup();
        assert!(
            twice.is_empty(),
            "two consumers received the same live envelope: {twice:?}"
        );
        assert_eq!(
            seen,
            (0..N).collect::<Vec<_>>(),
            "every envelope is delivered once"
        );
    })
    .await;
}

/// What one round of the late-ack race saw.
#[derive(Debug)]
struct LateAck {
    offset_ms: i64,
    ack: Result<(), BrokerError>,
    rival_got: bool,
}

/// B4 raced: a holder acks just before or just after its lease runs out
/// while a peer is already waiting to take the envelope over. Either the
/// ack wins (it succeeds, and the envelope is never delivered again) or the
/// take-over wins (the ack answers `LeaseLost` and the peer has it); never
/// both, never neither. Sixteen rounds at once, each acking at a different
/// moment around the deadline.
pub async fn b04_race_expiry_vs_late_ack(f: &dyn AdapterFactory) {
    const ROUNDS: i64 = 16;
    let lease = Duration::from_millis(300);
    let o = KitOptions::new(f.name(), "b04_race");
    guarded(f, &[&o], async {
        let holder = f.peer_broker(&o).await;
        let rival = f.peer_broker(&o).await;
        let mut rounds = Vec::new();
        for round in 0..ROUNDS {
            let (holder, rival) = (holder.clone(), rival.clone());
            rounds.push(tokio::spawn(async move {
                let queue = format!("late-{round}");
                let id = publish(&*holder, job(&queue, round.unsigned_abs())).await;
                let held = fetch(&*holder, &req(&[&queue], 1, lease)).await;
                assert_eq!(held.len(), 1, "round {round}: the holder gets the envelope");
                let leased_at = Instant::now();
                // From 40 ms before the deadline to 110 ms after it.
                let offset_ms = round * 10 - 40;
                let taker = {
                    let (rival, queue) = (rival.clone(), queue.clone());
                    tokio::spawn(async move {
                        let r = req(&[&queue], 1, LONG_LEASE).wait(lease * 2);
                        fetch(&*rival, &r).await
                    })
                };
                let ack_at = leased_at + lease;
                let ack_at = if offset_ms < 0 {
                    ack_at - Duration::from_millis(offset_ms.unsigned_abs())
                } else {
                    ack_at + Duration::from_millis(offset_ms.unsigned_abs())
                };
                tokio::time::sleep_until(ack_at.into()).await;
                let ack = holder.ack(&held[0].receipt).await;
                let mut taken = taker.await.expect("rival task");
                if taken.is_empty() && ack.is_err() {
                    // The take-over may just be slow; it must come.
                    taken =
                        fetch_n(&*rival, &[&queue], 1, LONG_LEASE, Duration::from_secs(3)).await;
                }
                if let Some(d) = taken.first() {
                    assert_eq!(
                        d.envelope.id, id,
                        "round {round}: the rival got another envelope"
                    );
                    rival.ack(&d.receipt).await.expect("the rival's ack");
                }
                LateAck {
                    offset_ms,
                    ack,
                    rival_got: !taken.is_empty(),
                }
            }));
        }
        let mut seen = Vec::new();
        for t in rounds {
            seen.push(t.await.expect("round task"));
        }
        for r in &seen {
            match (&r.ack, r.rival_got) {
                (Ok(()), false) | (Err(BrokerError::LeaseLost { .. }), true) => {}
                (Ok(()), true) => panic!(
                    "acked {} ms from the deadline: the ack succeeded AND a peer received the \
                     envelope again (an ack must be final, or answer LeaseLost): {seen:?}",
                    r.offset_ms
                ),
                (Err(BrokerError::LeaseLost { .. }), false) => panic!(
                    "acked {} ms from the deadline: the ack answered LeaseLost but no one \
                     received the envelope again (it is lost): {seen:?}",
                    r.offset_ms
                ),
                (Err(e), _) => panic!(
                    "acked {} ms from the deadline: a late ack must succeed or answer \
                     LeaseLost, got {e}",
                    r.offset_ms
                ),
            }
        }
        let queues: Vec<String> = (0..ROUNDS).map(|r| format!("late-{r}")).collect();
        let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
        let again = fetch(&*rival, &req(&queues, 32, LONG_LEASE).wait(lease)).await;
        assert!(
            again.is_empty(),
            "acked envelopes came back: {:?}",
            again
                .iter()
                .map(|d| d.envelope.queue.clone())
                .collect::<Vec<_>>()
        );
    })
    .await;
}

/// B17 raced: 50 tasks on two peer clients publish one unique key at once;
/// exactly one is stored and every other answer names it.
pub async fn b17_race_unique_publish(f: &dyn AdapterFactory) {
    const N: u64 = 50;
    let o = KitOptions::new(f.name(), "b17_race");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().unique {
            return skip(f, "B17", "no unique keys", "unique");
        }
        let peers = [f.peer_broker(&o).await, f.peer_broker(&o).await];
        let barrier = Arc::new(tokio::sync::Barrier::new(N as usize));
        let mut tasks = Vec::new();
        for n in 0..N {
            let client = peers[(n % 2) as usize].clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let e = unique_job(
                    "uq-peers",
                    n,
                    "k-peers",
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
            "exactly one of {N} concurrent publishes from two clients is stored: {results:?}"
        );
        assert!(
            results.iter().all(|(_, p)| p.id() == stored[0]),
            "every duplicate names the one holder: {results:?}"
        );
        assert_eq!(
            stats(&*b, "uq-peers").await.ready,
            1,
            "duplicates store nothing"
        );
    })
    .await;
}

/// R5 raced: the last two members of a chord finish at once on two peer
/// clients (each stores its record, then calls `member_finished`); the
/// callback is handed out exactly once. Ten rounds.
pub async fn r5_race_chord_finishers(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "r5_race");
    guarded(f, &[&o], async {
        let b = f.backend(&o).await;
        let peers = [f.peer_backend(&o).await, f.peer_backend(&o).await];
        let mut handed_per_round = BTreeMap::new();
        for round in 0..10_u32 {
            let members: Vec<TaskId> = (0..4).map(|_| TaskId::new()).collect();
            let group = TaskId::new();
            let callback = Envelope::new("kit::callback", "chords", round)
                .unwrap_or_else(|e| panic!("kit envelope: {e}"));
            b.create_group(GroupSpec {
                id: group,
                members: members.clone(),
                callback: Some(callback.clone()),
                ttl: Duration::from_secs(3600),
            })
            .await
            .expect("create_group");
            for m in &members[..2] {
                b.store(record(*m, succeeded("0"), 1)).await.expect("store");
                assert!(
                    b.member_finished(group)
                        .await
                        .expect("member_finished")
                        .is_none(),
                    "round {round}: not complete yet"
                );
            }
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let mut finishers = Vec::new();
            for (k, peer) in peers.iter().enumerate() {
                let (peer, barrier, member) = (peer.clone(), barrier.clone(), members[2 + k]);
                finishers.push(tokio::spawn(async move {
                    barrier.wait().await;
                    peer.store(record(member, succeeded("1"), 1))
                        .await
                        .expect("store");
                    peer.member_finished(group).await.expect("member_finished")
                }));
            }
            let mut handed = Vec::new();
            for t in finishers {
                handed.extend(t.await.expect("finisher"));
            }
            assert!(
                handed.iter().all(|e| e.id == callback.id),
                "round {round}: the stored callback comes back"
            );
            handed_per_round.insert(round, handed.len());
        }
        assert!(
            handed_per_round.values().all(|n| *n == 1),
            "the callback must be handed out exactly once per chord, by one of the two \
             finishers (round -> times handed out): {handed_per_round:?}"
        );
    })
    .await;
}
