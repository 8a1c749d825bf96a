//! Lease keeping: a delivery's lease is renewed every third of its length
//! while it waits in the queue for a slot (the queue keeper, many at once)
//! and checked again before it starts; a running task's lease is renewed by
//! its slot (`executor::run_with_lease`, every [`renew_period`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::Runtime;
use crate::broker::Receipt;
use crate::context::Context;
use crate::error::BrokerError;

/// Renews the leases of deliveries waiting in the queue for a slot, so a
/// delivery prefetched behind slow tasks is not re-delivered elsewhere
/// while it waits. Ends at shutdown (the queue is handed back then).
pub(crate) async fn keep_queued(rt: Arc<Runtime>) {
    let lease = rt.config.lease;
    let period = renew_period(lease);
    loop {
        tokio::select! {
            () = rt.stop.cancelled() => return,
            () = tokio::time::sleep(period / 2) => {}
        }
        // Several renewals at once: a full queue renews in a few round
        // trips (on SQLite, concurrent writes share one commit).
        futures::stream::iter(rt.dispatch.stale(period))
            .for_each_concurrent(RENEWALS_AT_ONCE, |receipt| renew(&rt, receipt, lease))
            .await;
    }
}

/// Renewals the keeper has in flight at most.
const RENEWALS_AT_ONCE: usize = 16;

async fn renew(rt: &Runtime, receipt: Receipt, lease: Duration) {
    if rt.stop.is_cancelled() {
        return;
    }
    let at = Instant::now();
    match rt.broker.extend_lease(&receipt, lease).await {
        Ok(()) => rt.dispatch.renewal_done(&receipt, Some(at)),
        Err(BrokerError::LeaseLost { .. }) => {
            if rt.dispatch.forget(&receipt) {
                tracing::warn!(task_id = %receipt.task_id, "lease of a queued delivery lost before it ran; dropped here (another consumer has it)");
            }
        }
        Err(e) => {
            tracing::warn!(task_id = %receipt.task_id, error = %e, "could not renew the lease of a queued delivery; will retry");
            rt.dispatch.renewal_done(&receipt, None);
        }
    }
}

/// How often a lease is renewed: every third of its length.
pub(crate) fn renew_period(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(20))
}

/// A delivery that waited in the queue a renewal period or more (the
/// keeper has not renewed it, or is doing it now) has its lease renewed
/// before it runs. `None` when it must not run here: the lease is lost
/// (another consumer has the task), or could not be renewed and has run
/// out (it is left for redelivery). Returns when the lease was last known
/// good.
pub(crate) async fn still_leased(rt: &Runtime, ctx: &Context, renewed: Instant) -> Option<Instant> {
    let lease = rt.config.lease;
    let waited = renewed.elapsed();
    if waited < renew_period(lease) {
        return Some(renewed);
    }
    let now = Instant::now();
    match rt.broker.extend_lease(ctx.receipt(), lease).await {
        Ok(()) => Some(now),
        Err(BrokerError::LeaseLost { .. }) => {
            tracing::warn!(task_id = %ctx.id(), "lease lost while the delivery waited for a slot; not run here (another consumer has it)");
            None
        }
        Err(e) if waited >= lease => {
            tracing::warn!(task_id = %ctx.id(), error = %e, "the lease of a waiting delivery ran out and could not be renewed; not run here (it will be delivered again)");
            None
        }
        Err(e) => {
            tracing::warn!(task_id = %ctx.id(), error = %e, "could not renew the lease of a waiting delivery; running it while the lease lasts");
            Some(renewed)
        }
    }
}
