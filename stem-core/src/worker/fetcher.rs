//! The fetcher: claims as many deliveries as there are free slots (up to
//! the prefetch), filters revoked ones in one backend call, and hands each
//! to an executor. It stops at shutdown and never drops a leased delivery.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;

use super::Runtime;
use super::completer::{Completion, Settle};
use crate::backend::{TaskRecord, TaskState};
use crate::broker::{Delivery, FetchRequest, Nack};

pub(crate) async fn run(rt: Arc<Runtime>) {
    let mut backoff = Duration::from_millis(50);
    let mut req = FetchRequest {
        queues: rt.config.queues.clone(),
        max: 1,
        lease: rt.config.lease,
        wait: rt.config.poll_interval,
        consumer: rt.config.worker_id.clone(),
    };
    loop {
        let first = tokio::select! {
            biased;
            () = rt.stop.cancelled() => break,
            p = Arc::clone(&rt.slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let mut permits = vec![first];
        take_free(&rt, &mut permits);
        // When busy, slots free up one at a time; claiming each alone would
        // cost the broker a round trip per task. Wait a moment for half a
        // batch to gather (never when idle: then every slot is free).
        let want = (rt.config.prefetch / 2).max(1);
        if permits.len() < want {
            let gather = tokio::time::sleep(GATHER);
            tokio::pin!(gather);
            while permits.len() < want {
                tokio::select! {
                    biased;
                    p = Arc::clone(&rt.slots).acquire_owned() => match p {
                        Ok(p) => {
                            permits.push(p);
                            take_free(&rt, &mut permits);
                        }
                        Err(_) => break,
                    },
                    () = &mut gather => break,
                }
            }
        }
        req.max = permits.len();
        // Shutdown does not wait for an idle fetch to time out: the fetch is
        // dropped. Adapters' fetches lose nothing when dropped while they
        // wait; one dropped mid-claim leaves its claims leased until the
        // lease expires, after which they are delivered again.
        let fetched = tokio::select! {
            biased;
            r = rt.broker.fetch(&req) => r,
            () = rt.stop.cancelled() => break,
        };
        let deliveries = match fetched {
            Ok(d) => {
                backoff = Duration::from_millis(50);
                d
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "fetch failed; retrying");
                drop(permits);
                tokio::select! {
                    () = rt.stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if deliveries.is_empty() {
            continue;
        }
        if rt.stop.is_cancelled() {
            requeue(&rt, deliveries);
            break;
        }
        let revoked = revoked_flags(&rt, &deliveries).await;
        for (delivery, is_revoked) in deliveries.into_iter().zip(revoked) {
            let Some(permit) = permits.pop() else {
                // The broker returned more than asked; put the rest back.
                requeue(&rt, vec![delivery]);
                continue;
            };
            if is_revoked {
                skip_revoked(&rt, delivery);
                continue;
            }
            rt.tracker
                .spawn(super::executor::execute(Arc::clone(&rt), delivery, permit));
        }
    }
    tracing::debug!("fetcher stopped");
}

/// Longest the fetcher waits for more free slots before claiming.
const GATHER: Duration = Duration::from_millis(2);

fn take_free(rt: &Runtime, permits: &mut Vec<tokio::sync::OwnedSemaphorePermit>) {
    while permits.len() < rt.config.prefetch {
        match Arc::clone(&rt.slots).try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
}

fn requeue(rt: &Runtime, deliveries: Vec<Delivery>) {
    for d in deliveries {
        rt.counters.requeued.fetch_add(1, Ordering::Relaxed);
        let _ = rt.completions.send(Completion {
            receipt: Some(d.receipt),
            settle: Settle::Nack(Nack::after(Duration::ZERO)),
            record: None,
            group_id: None,
        });
    }
}

async fn revoked_flags(rt: &Runtime, deliveries: &[Delivery]) -> Vec<bool> {
    let Some(backend) = &rt.backend else {
        return vec![false; deliveries.len()];
    };
    let ids: Vec<_> = deliveries.iter().map(|d| d.envelope.id).collect();
    match backend.revoked(&ids).await {
        Ok(flags) if flags.len() == ids.len() => flags,
        Ok(_) => {
            tracing::warn!(
                "result backend answered a revocation check with the wrong count; running the tasks"
            );
            vec![false; deliveries.len()]
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not check revocations; running the tasks");
            vec![false; deliveries.len()]
        }
    }
}

fn skip_revoked(rt: &Runtime, delivery: Delivery) {
    tracing::info!(task_id = %delivery.envelope.id, task = %delivery.envelope.name, "task revoked; skipped");
    rt.counters.revoked.fetch_add(1, Ordering::Relaxed);
    let mut rec = TaskRecord::new(delivery.envelope.id, TaskState::Revoked);
    rec.name = Some(delivery.envelope.name.clone());
    rec.attempts = delivery.envelope.attempt;
    rec.worker_id = Some(rt.config.worker_id.clone());
    rec.group_id = delivery.envelope.group_id;
    rec.updated_at = Utc::now();
    let _ = rt.completions.send(Completion {
        receipt: Some(delivery.receipt),
        settle: Settle::Ack,
        group_id: delivery.envelope.group_id,
        record: Some(rec),
    });
}
