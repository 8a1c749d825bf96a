//! The completer: settles finished deliveries (ack, retry, release,
//! dead-letter) and writes their task records, in batches, fenced by each
//! delivery's lease, retrying what failed for reasons other than a lost
//! lease. It drains everything sent to it, shutdown or not.
//!
//! Two paths, chosen once per worker:
//! - **Co-located** (the broker stores the backend's records, e.g. one
//!   SQLite file): records travel with their settlements, and the broker
//!   writes both in one transaction, only where the lease is still held.
//! - **Separate** (e.g. Redis broker, Postgres results): the leases of the
//!   deliveries whose records are terminal are renewed first (a fence: a
//!   stale worker learns it lost the lease and writes nothing), then the
//!   records are written, then the deliveries settled. A crash between the
//!   two leaves a terminal record and a live delivery, which is delivered
//!   again, runs, and is acked; its late record is refused (R1), so the
//!   first terminal record stands. A terminal record that cannot be
//!   written (the backend stays unreachable through the retries) leaves
//!   its delivery unsettled: acked, the result would be lost; left, the
//!   lease runs out and the task runs again and records its result.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Counters;
use super::groups;
use crate::backend::{ResultBackend, TaskRecord};
use crate::broker::{Broker, Disposition, Receipt, Settlement};
use crate::envelope::TaskId;
use crate::error::BrokerError;

/// Most completions handled in one batch.
const BATCH: usize = 512;

/// Tries for a settlement or record write that failed for a reason other
/// than a lost lease (the server was briefly unreachable, the file busy).
const TRIES: u32 = 4;

/// Which counter a completion moves once it is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Count {
    /// None.
    Nothing,
    /// `succeeded`.
    Succeeded,
    /// `retried`.
    Retried,
    /// `failed`.
    Failed,
    /// `failed` and `dead_lettered`.
    DeadLettered,
    /// `requeued`.
    Requeued,
    /// `revoked`.
    Revoked,
}

/// One finished step of a delivery.
#[derive(Debug)]
pub(crate) struct Completion {
    /// The lease to settle, with how; `None` for a record alone (a
    /// `Started` record, or an at-most-once task acked before it ran).
    pub(crate) settle: Option<(Receipt, Disposition)>,
    /// Only when the worker has a result backend.
    pub(crate) record: Option<Box<TaskRecord>>,
    pub(crate) group_id: Option<TaskId>,
    pub(crate) count: Count,
}

impl Completion {
    /// Only a record to write.
    pub(crate) fn record(record: TaskRecord) -> Self {
        Self {
            settle: None,
            group_id: None,
            record: Some(Box::new(record)),
            count: Count::Nothing,
        }
    }

    /// Only a settlement, no record.
    pub(crate) fn settle(receipt: Receipt, disposition: Disposition, count: Count) -> Self {
        Self {
            settle: Some((receipt, disposition)),
            group_id: None,
            record: None,
            count,
        }
    }
}

/// What the completer needs; deliberately not the whole runtime, which
/// holds the sender whose drop ends the completer.
pub(crate) struct CompleterParts {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) backend: Option<Arc<dyn ResultBackend>>,
    pub(crate) counters: Arc<Counters>,
    /// The lease a fence renews to (the worker's lease).
    pub(crate) lease: Duration,
}

/// Runs until every sender is gone and the channel is empty.
pub(crate) async fn run(rt: CompleterParts, mut rx: mpsc::UnboundedReceiver<Completion>) {
    let colocated = rt
        .backend
        .as_deref()
        .is_some_and(|b| rt.broker.stores_results_of(b));
    if colocated {
        tracing::debug!("results are stored with their settlements, in one transaction");
    }
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = rx.recv_many(&mut batch, BATCH).await;
        if n == 0 {
            break;
        }
        flush(&rt, &mut batch, colocated).await;
        batch.clear();
    }
}

/// A completion being settled: its settlement and where it came from.
struct Pending {
    index: usize,
    settlement: Settlement,
}

async fn flush(rt: &CompleterParts, batch: &mut [Completion], colocated: bool) {
    // A fast task's `Started` and final record often share a batch: only
    // the last record of each task is written.
    if rt.backend.is_some() {
        let mut last: HashMap<TaskId, usize> = HashMap::with_capacity(batch.len());
        for (i, c) in batch.iter().enumerate() {
            if let Some(r) = &c.record {
                last.insert(r.id, i);
            }
        }
        for (i, c) in batch.iter_mut().enumerate() {
            if c.record
                .as_ref()
                .is_some_and(|r| last.get(&r.id) != Some(&i))
            {
                c.record = None;
            }
        }
    } else {
        for c in batch.iter_mut() {
            c.record = None;
        }
    }

    let mut loose: Vec<(usize, TaskRecord)> = Vec::new();
    let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
    for (index, c) in batch.iter_mut().enumerate() {
        if c.settle.is_none() {
            // Nothing to settle (an at-most-once task, acked before it ran).
            count(rt, c.count);
        }
        match c.settle.take() {
            Some((receipt, disposition)) => pending.push(Pending {
                index,
                settlement: Settlement {
                    receipt,
                    disposition,
                    record: c.record.take(),
                },
            }),
            None => {
                if let Some(r) = c.record.take() {
                    loose.push((index, *r));
                }
            }
        }
    }

    // Indices whose record was written (and is terminal: groups move on).
    let mut recorded: Vec<(usize, bool)> = Vec::new();
    if let Some(backend) = &rt.backend {
        if !colocated {
            fence(rt, &mut pending).await;
            for p in &mut pending {
                if let Some(r) = p.settlement.record.take() {
                    loose.push((p.index, *r));
                }
            }
        }
        if !loose.is_empty() {
            let terminal: Vec<(usize, bool)> = loose
                .iter()
                .map(|(i, r)| (*i, r.state.is_terminal()))
                .collect();
            let written = store(
                backend.as_ref(),
                loose.into_iter().map(|(_, r)| r).collect(),
            )
            .await;
            let mut unrecorded: Vec<usize> = Vec::new();
            for ((index, terminal), ok) in terminal.into_iter().zip(written) {
                if ok {
                    recorded.push((index, terminal));
                } else if terminal {
                    unrecorded.push(index);
                }
            }
            // A delivery whose terminal result could not be written is not
            // settled: acked, its result would be lost for good. Its lease
            // runs out and it is delivered again, and that run records it.
            if !unrecorded.is_empty() {
                pending.retain(|p| {
                    let keep = !unrecorded.contains(&p.index);
                    if !keep {
                        tracing::warn!(task_id = %p.settlement.receipt.task_id, "the task's result could not be recorded, so its delivery is not settled: it runs again once its lease expires");
                    }
                    keep
                });
            }
        }
    }

    // Fault suite (feature `failpoints`): a crash once a terminal record
    // of a delivery is written and before the delivery is settled. Only
    // the separate path has that moment; co-located, the point is below.
    crash_point!(
        "stem-after-record",
        !colocated
            && recorded
                .iter()
                .any(|&(i, terminal)| terminal && pending.iter().any(|p| p.index == i))
    );
    let settled = settle(rt, pending).await;
    // Co-located, the record and the settlement commit together: the
    // point fires once both are written.
    crash_point!(
        "stem-after-record",
        colocated && settled.iter().any(|&(_, terminal)| terminal)
    );
    for (index, terminal) in settled {
        let c = &batch[index];
        count(rt, c.count);
        if terminal {
            recorded.push((index, true));
        }
    }

    if let Some(backend) = &rt.backend {
        for (index, terminal) in recorded {
            if terminal && let Some(group) = batch[index].group_id {
                groups::member_finished(rt.broker.as_ref(), backend.as_ref(), group).await;
            }
        }
    }
}

/// Separate stores: renews the lease of every settlement that carries a
/// terminal record, in one call. Where the lease is lost, the record is
/// dropped (a stale worker must not record a result) and the settlement
/// stays, to fail as `LeaseLost` and change nothing.
async fn fence(rt: &CompleterParts, pending: &mut [Pending]) {
    let fenced: Vec<usize> = pending
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            p.settlement
                .record
                .as_ref()
                .is_some_and(|r| r.state.is_terminal())
        })
        .map(|(i, _)| i)
        .collect();
    if fenced.is_empty() {
        return;
    }
    let receipts: Vec<Receipt> = fenced
        .iter()
        .map(|&i| pending[i].settlement.receipt.clone())
        .collect();
    let answers = rt.broker.extend_leases(&receipts, rt.lease).await;
    for ((&i, answer), receipt) in fenced.iter().zip(answers).zip(&receipts) {
        match answer {
            Ok(()) => {}
            Err(BrokerError::LeaseLost { task_id }) => {
                tracing::warn!(%task_id, "lease lost before the result was recorded: another worker has the task; this run's result is dropped");
                pending[i].settlement.record = None;
            }
            Err(e) => {
                // Unknown: record anyway (the lease was held when the task
                // finished, and the settlement below is fenced).
                tracing::warn!(task_id = %receipt.task_id, error = %e, "could not renew the lease before recording; recording anyway");
            }
        }
    }
}

/// Settles `pending`, retrying transient failures; returns, for each
/// settled one, its batch index and whether a terminal record went with it.
async fn settle(rt: &CompleterParts, pending: Vec<Pending>) -> Vec<(usize, bool)> {
    let mut done = Vec::with_capacity(pending.len());
    let chunk = rt
        .broker
        .capabilities()
        .limits
        .max_batch
        .unwrap_or(usize::MAX)
        .max(1);
    let mut meta: Vec<(usize, bool)> = Vec::with_capacity(pending.len());
    let mut settlements: Vec<Settlement> = Vec::with_capacity(pending.len());
    for p in pending {
        let terminal = p
            .settlement
            .record
            .as_ref()
            .is_some_and(|r| r.state.is_terminal());
        meta.push((p.index, terminal));
        settlements.push(p.settlement);
    }
    for attempt in 1..=TRIES {
        if settlements.is_empty() {
            break;
        }
        let mut answers = Vec::with_capacity(settlements.len());
        for part in settlements.chunks(chunk) {
            answers.extend(rt.broker.settle(part).await);
        }
        let mut retry_meta = Vec::new();
        let mut retry = Vec::new();
        for ((s, m), answer) in settlements.into_iter().zip(meta).zip(answers) {
            match answer {
                Ok(()) => done.push(m),
                Err(BrokerError::LeaseLost { task_id }) => {
                    tracing::warn!(%task_id, "lease lost before the delivery was settled: another worker has the task now; nothing of this run was recorded");
                }
                Err(e) if attempt < TRIES && transient(&e) => {
                    tracing::debug!(task_id = %s.receipt.task_id, error = %e, "settlement failed; trying again");
                    retry.push(s);
                    retry_meta.push(m);
                }
                Err(e) => {
                    tracing::error!(task_id = %s.receipt.task_id, error = %e, "could not settle the delivery; it will be delivered again after its lease");
                }
            }
        }
        settlements = retry;
        meta = retry_meta;
        if !settlements.is_empty() {
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
        }
    }
    done
}

/// Whether trying again may help.
const fn transient(e: &BrokerError) -> bool {
    matches!(
        e,
        BrokerError::Unavailable { .. } | BrokerError::Storage { .. }
    )
}

/// Writes `records`, retrying failures; `true` for each one written.
async fn store(backend: &dyn ResultBackend, records: Vec<TaskRecord>) -> Vec<bool> {
    let mut written = vec![false; records.len()];
    let mut pending: Vec<(usize, TaskRecord)> = records.into_iter().enumerate().collect();
    for attempt in 0..TRIES {
        let results = backend
            .store_many(pending.iter().map(|(_, r)| r.clone()).collect())
            .await;
        let mut failed = Vec::new();
        for (r, (i, rec)) in results.into_iter().zip(pending) {
            match r {
                Ok(_) => written[i] = true,
                Err(e) if attempt + 1 == TRIES => {
                    tracing::error!(task_id = %rec.id, state = rec.state.name(), error = %e, "could not record task state");
                }
                Err(_) => failed.push((i, rec)),
            }
        }
        if failed.is_empty() {
            break;
        }
        pending = failed;
        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
    }
    written
}

/// Moves the counter of a settled completion.
fn count(rt: &CompleterParts, count: Count) {
    let c = &rt.counters;
    match count {
        Count::Nothing => {}
        Count::Succeeded => {
            c.succeeded.fetch_add(1, Ordering::Relaxed);
        }
        Count::Retried => {
            c.retried.fetch_add(1, Ordering::Relaxed);
        }
        Count::Failed => {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        Count::DeadLettered => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            c.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
        Count::Requeued => {
            c.requeued.fetch_add(1, Ordering::Relaxed);
        }
        Count::Revoked => {
            c.revoked.fetch_add(1, Ordering::Relaxed);
        }
    }
}
