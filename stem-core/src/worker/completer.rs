//! The completer: writes task records and settles deliveries (ack, nack,
//! dead-letter) in batches, records first so a crash in between re-runs a
//! task rather than losing its result. It drains everything sent to it,
//! shutdown or not.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Counters;
use crate::backend::{ResultBackend, TaskRecord};
use crate::broker::Broker;
use crate::broker::{DeadLetterRequest, Nack, Receipt};
use crate::envelope::TaskId;

/// Most completions handled in one batch.
const BATCH: usize = 512;

/// What to do with a delivery. The rare, large cases are boxed so the
/// common one (an ack) moves through the channel as a few words.
#[derive(Debug)]
pub(crate) enum Settle {
    /// Nothing (the delivery was settled already, or lost).
    Nothing,
    /// Ack it.
    Ack,
    /// Requeue it.
    Nack(Box<Nack>),
    /// Dead-letter it.
    DeadLetter(Box<DeadLetterRequest>),
}

impl Settle {
    /// Requeue with `nack`.
    pub(crate) fn nack(nack: Nack) -> Self {
        Self::Nack(Box::new(nack))
    }

    /// Dead-letter with `request`.
    pub(crate) fn dead_letter(request: DeadLetterRequest) -> Self {
        Self::DeadLetter(Box::new(request))
    }
}

/// One finished step of a delivery.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) receipt: Option<Receipt>,
    pub(crate) settle: Settle,
    /// Only when the worker has a result backend.
    pub(crate) record: Option<Box<TaskRecord>>,
    pub(crate) group_id: Option<TaskId>,
}

impl Completion {
    /// Only a record to write.
    pub(crate) fn record(record: TaskRecord) -> Self {
        Self {
            receipt: None,
            settle: Settle::Nothing,
            group_id: None,
            record: Some(Box::new(record)),
        }
    }

    /// Only a settle, no record.
    pub(crate) fn settle(receipt: Receipt, settle: Settle) -> Self {
        Self {
            receipt: Some(receipt),
            settle,
            group_id: None,
            record: None,
        }
    }
}

/// What the completer needs; deliberately not the whole runtime, which
/// holds the sender whose drop ends the completer.
pub(crate) struct CompleterParts {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) backend: Option<Arc<dyn ResultBackend>>,
    pub(crate) counters: Arc<Counters>,
}

/// Runs until every sender is gone and the channel is empty.
pub(crate) async fn run(rt: CompleterParts, mut rx: mpsc::UnboundedReceiver<Completion>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = rx.recv_many(&mut batch, BATCH).await;
        if n == 0 {
            break;
        }
        flush(&rt, &mut batch).await;
    }
}

async fn flush(rt: &CompleterParts, batch: &mut Vec<Completion>) {
    if let Some(backend) = &rt.backend {
        // A fast task's `Started` and final record often share a batch:
        // write only the last record of each task.
        let mut last: HashMap<TaskId, usize> = HashMap::with_capacity(batch.len());
        for (i, c) in batch.iter().enumerate() {
            if let Some(r) = &c.record {
                last.insert(r.id, i);
            }
        }
        let records: Vec<TaskRecord> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.record
                    .as_deref()
                    .filter(|r| last.get(&r.id) == Some(&i))
                    .cloned()
            })
            .collect();
        if !records.is_empty() {
            store_with_retry(backend.as_ref(), records).await;
        }
    }
    let mut acks = Vec::with_capacity(batch.len());
    for c in batch.iter_mut() {
        let Some(receipt) = c.receipt.take() else {
            continue;
        };
        match std::mem::replace(&mut c.settle, Settle::Nothing) {
            Settle::Nothing => {}
            Settle::Ack => acks.push(receipt),
            Settle::Nack(nack) => {
                if let Err(e) = rt.broker.nack(&receipt, *nack).await {
                    tracing::warn!(task_id = %receipt.task_id, error = %e, "could not requeue task; it will be re-delivered after its lease");
                }
            }
            Settle::DeadLetter(req) => {
                if let Err(e) = rt.broker.dead_letter(&receipt, *req).await {
                    tracing::warn!(task_id = %receipt.task_id, error = %e, "could not dead-letter task; it will be re-delivered after its lease");
                } else {
                    rt.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    if !acks.is_empty() {
        let results = rt.broker.ack_many(&acks).await;
        for (r, receipt) in results.into_iter().zip(&acks) {
            if let Err(e) = r {
                tracing::warn!(task_id = %receipt.task_id, error = %e, "ack failed");
            }
        }
    }
    if let Some(backend) = &rt.backend {
        for c in batch.iter() {
            let (Some(group), Some(rec)) = (c.group_id, &c.record) else {
                continue;
            };
            if !rec.state.is_terminal() {
                continue;
            }
            match backend.member_finished(group).await {
                Ok(Some(callback)) => {
                    let id = callback.id;
                    if let Err(e) = rt.broker.publish(callback).await {
                        tracing::error!(group_id = %group, callback_id = %id, error = %e, "could not enqueue the chord callback");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(group_id = %group, error = %e, "could not record group progress");
                }
            }
        }
    }
    batch.clear();
}

async fn store_with_retry(backend: &dyn ResultBackend, records: Vec<TaskRecord>) {
    let mut pending = records;
    for attempt in 0..4u32 {
        let results = backend.store_many(pending.clone()).await;
        let mut failed = Vec::new();
        for (r, rec) in results.into_iter().zip(pending) {
            if let Err(e) = r {
                if attempt == 3 {
                    tracing::error!(task_id = %rec.id, state = rec.state.name(), error = %e, "could not record task state");
                } else {
                    failed.push(rec);
                }
            }
        }
        if failed.is_empty() {
            return;
        }
        pending = failed;
        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
    }
}
