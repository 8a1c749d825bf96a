//! The fetcher: claims deliveries in batches to keep up to `prefetch` of
//! them held (running or queued for a slot), filters revoked ones in one
//! backend call, and hands the batch to the slots (see `dispatch`). It
//! stops at shutdown, hands back what was queued and not started, and
//! never drops a leased delivery. (The leases of what waits are kept by
//! `lease`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::Runtime;
use super::completer::{Completion, Count};
use crate::backend::{TaskRecord, TaskState};
use crate::broker::{Delivery, Disposition, FetchRequest};
use crate::context::Context;

pub(crate) async fn run(rt: Arc<Runtime>) {
    fetch_loop(&rt).await;
    tracing::debug!("fetcher stopped");
}

/// Shutdown, once the fetcher and the keeper have stopped (so no renewal
/// races the requeue): slots finish what they run, then end; what waits
/// for a slot goes back to the broker without charging an attempt.
pub(crate) fn hand_back_queued(rt: &Runtime) {
    rt.dispatch.close();
    let queued = rt.dispatch.take_queued();
    if !queued.is_empty() {
        tracing::debug!(
            count = queued.len(),
            "shutdown: requeueing deliveries that had not started"
        );
    }
    for t in queued {
        rt.release(t.ctx.owned_receipt(), Duration::ZERO);
        rt.dispatch.finished();
    }
}

async fn fetch_loop(rt: &Runtime) {
    let dispatch = &rt.dispatch;
    let mut backoff = Duration::from_millis(50);
    let mut req = FetchRequest {
        queues: rt.config.queues.clone(),
        max: 1,
        lease: rt.config.lease,
        wait: rt.config.poll_interval,
        consumer: rt.config.worker_id.clone(),
    };
    // Queues paused over the control plane are left out of the claims; a
    // change drops a fetch that waits, so it takes effect at once.
    let mut paused = rt.live.watch_paused();
    let mut queues_changed = false;
    loop {
        if std::mem::take(&mut queues_changed) {
            let now_paused = paused.borrow_and_update().clone();
            req.queues = rt
                .config
                .queues
                .iter()
                .filter(|q| !now_paused.contains(*q))
                .cloned()
                .collect();
        }
        if req.queues.is_empty() {
            tokio::select! {
                biased;
                () = rt.stop.cancelled() => return,
                r = paused.changed() => {
                    if r.is_err() {
                        return;
                    }
                    queues_changed = true;
                }
            }
            continue;
        }
        let mut free = dispatch.free();
        if free == 0 {
            tokio::select! {
                biased;
                () = rt.stop.cancelled() => return,
                () = dispatch.freed() => {}
            }
            continue;
        }
        // When busy, deliveries finish one at a time; claiming each alone
        // would cost the broker a round trip per task. While every slot has
        // work (running or queued), wait for half the window to free up;
        // when a slot is idle, wait a moment at most (never when the worker
        // is idle: then the whole window is free).
        let want = dispatch.batch();
        if free < want && dispatch.slots_busy() {
            tokio::select! {
                biased;
                () = rt.stop.cancelled() => return,
                () = dispatch.freed() => {}
            }
            continue;
        }
        if free < want {
            let gather = tokio::time::sleep(GATHER);
            tokio::pin!(gather);
            while free < want {
                tokio::select! {
                    biased;
                    () = dispatch.freed() => free = dispatch.free(),
                    () = &mut gather => break,
                }
            }
            free = dispatch.free();
        }
        req.max = free;
        let leased_at = Instant::now();
        // Shutdown does not wait for an idle fetch to time out: the fetch is
        // dropped. Adapters' fetches lose nothing when dropped while they
        // wait; one dropped mid-claim leaves its claims leased until the
        // lease expires, after which they are delivered again.
        let fetched = tokio::select! {
            biased;
            r = rt.broker.fetch(&req) => r,
            () = rt.stop.cancelled() => return,
            r = paused.changed() => {
                if r.is_err() {
                    return;
                }
                queues_changed = true;
                continue;
            }
        };
        let mut deliveries = match fetched {
            Ok(d) => {
                backoff = Duration::from_millis(50);
                d
            }
            // A closed broker answers every retry the same way: stop, so
            // that a supervisor starts the worker again on a new client.
            Err(e @ crate::BrokerError::Closed) => {
                tracing::error!(error = %e, broker = %rt.broker.describe(), "fetch failed: the broker is closed; stopping the worker");
                let _ = rt
                    .fatal
                    .set(format!("{} answered: {e}", rt.broker.describe()));
                rt.stop.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "fetch failed; retrying");
                tokio::select! {
                    () = rt.stop.cancelled() => return,
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
            requeue(rt, deliveries);
            return;
        }
        if deliveries.len() > req.max {
            // The broker returned more than asked; put the rest back.
            requeue(rt, deliveries.split_off(req.max));
        }
        if rt.backend.is_some() {
            let revoked = revoked_flags(rt, &deliveries).await;
            let mut run = Vec::with_capacity(deliveries.len());
            for (delivery, is_revoked) in deliveries.into_iter().zip(revoked) {
                if is_revoked {
                    skip_revoked(rt, delivery);
                } else {
                    run.push(delivery);
                }
            }
            deliveries = run;
        }
        if let Some(p) = &rt.events {
            for d in &deliveries {
                p.emit(p.task(crate::events::EventKind::Received, &d.envelope));
            }
        }
        dispatch.push(
            deliveries
                .into_iter()
                .map(|d| Context::for_delivery(d, &rt.ctx_shared)),
            leased_at,
        );
    }
}

/// Longest the fetcher waits for more free slots before claiming.
const GATHER: Duration = Duration::from_millis(2);

fn requeue(rt: &Runtime, deliveries: Vec<Delivery>) {
    for d in deliveries {
        rt.release(d.receipt, Duration::ZERO);
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
    rt.event(|p| p.task(crate::events::EventKind::Revoked, &delivery.envelope));
    let Delivery {
        envelope, receipt, ..
    } = delivery;
    let mut rec = TaskRecord::new(envelope.id, TaskState::Revoked);
    rec.name = Some(envelope.name.clone());
    rec.attempts = envelope.attempt;
    rec.worker_id = Some(rt.worker_id.to_string());
    rec.group_id = envelope.group_id;
    rec.updated_at = Utc::now();
    rt.complete(Completion {
        settle: Some((receipt, Disposition::Ack)),
        group_id: envelope.group_id,
        record: Some(Box::new(rec)),
        count: Count::Revoked,
    });
}
