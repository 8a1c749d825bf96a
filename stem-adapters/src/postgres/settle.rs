//! Ending deliveries (B4, B6, B17) and extending leases (B5): one
//! statement per batch, every row fenced by its receipt's token.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use stem_core::{BrokerError, Disposition, Receipt, Settlement};

use super::backend::{RecordRow, record_row};
use super::client::Client;
use super::ms_of;

/// `kind` of an ack.
pub(crate) const ACK: i16 = 0;
/// `kind` of a retry (charged).
pub(crate) const RETRY: i16 = 1;
/// `kind` of a release (not charged).
pub(crate) const RELEASE: i16 = 2;
/// `kind` of a dead letter.
pub(crate) const DEAD: i16 = 3;

/// One fenced settlement, as bound.
#[derive(Debug)]
pub(crate) struct Fenced {
    pub(crate) id: i64,
    pub(crate) token: i64,
    pub(crate) kind: i16,
    pub(crate) after_ms: i64,
    pub(crate) error: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) charge: bool,
    pub(crate) raw: Option<String>,
    /// The task record written with it (results stored here).
    pub(crate) record: Option<RecordRow>,
}

/// A receipt's row and token; `None` when it is not one of this adapter's.
pub(crate) fn lease_of(r: &Receipt) -> Option<(i64, i64)> {
    let (id, token) = r.token()?;
    Some((i64::try_from(id).ok()?, i64::try_from(token).ok()?))
}

impl Fenced {
    fn of(s: &Settlement) -> Option<Self> {
        let (id, token) = lease_of(&s.receipt)?;
        let mut f = Self {
            id,
            token,
            kind: ACK,
            after_ms: 0,
            error: None,
            reason: None,
            charge: false,
            raw: None,
            record: s.record.as_deref().and_then(|r| match record_row(r) {
                Ok(row) => Some(row),
                Err(e) => {
                    tracing::error!(task_id = %r.id, error = %e, "task record cannot be stored; settling without it");
                    None
                }
            }),
        };
        match &s.disposition {
            Disposition::Ack => {}
            Disposition::Retry { after, error } => {
                f.kind = RETRY;
                f.after_ms = ms_of(*after);
                f.error = Some(error.clone());
            }
            Disposition::Release { after } => {
                f.kind = RELEASE;
                f.after_ms = ms_of(*after);
            }
            Disposition::DeadLetter {
                reason,
                error,
                charge,
            } => {
                f.kind = DEAD;
                f.reason = Some(reason.clone());
                f.error.clone_from(error);
                f.charge = *charge;
            }
        }
        Some(f)
    }
}

/// Runs `items` as one statement; returns the ids whose lease was live
/// (and are now settled, their records written by the R1 rule). Every id
/// must appear once.
pub(crate) async fn run(client: &Client, items: &[Fenced]) -> Result<HashSet<i64>, BrokerError> {
    let n = items.len();
    let mut ids = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut after = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    let mut charges = Vec::with_capacity(n);
    let mut raws = Vec::with_capacity(n);
    for f in items {
        ids.push(f.id);
        tokens.push(f.token);
        kinds.push(f.kind);
        after.push(f.after_ms);
        errors.push(f.error.as_deref());
        reasons.push(f.reason.as_deref());
        charges.push(f.charge);
        raws.push(f.raw.as_deref());
    }
    let with_records = items.iter().any(|f| f.record.is_some());
    let sql = if with_records {
        &client.sql.settle_records
    } else {
        &client.sql.settle
    };
    let mut q = sqlx::query_as::<_, (i64, i64)>(AssertSqlSafe(sql.clone()))
        .bind(ids)
        .bind(tokens)
        .bind(kinds)
        .bind(after)
        .bind(errors)
        .bind(reasons)
        .bind(charges)
        .bind(raws)
        .bind(ms_of(client.opts.dead_letter_retention))
        .bind(&client.schema);
    if with_records {
        fn r(f: &Fenced) -> Option<&RecordRow> {
            f.record.as_ref()
        }
        q = q
            .bind(items.iter().map(|f| r(f).map(|r| r.id)).collect::<Vec<_>>())
            .bind(
                items
                    .iter()
                    .map(|f| r(f).map(|r| r.state))
                    .collect::<Vec<_>>(),
            )
            .bind(
                items
                    .iter()
                    .map(|f| r(f).map(|r| r.terminal))
                    .collect::<Vec<_>>(),
            )
            .bind(
                items
                    .iter()
                    .map(|f| r(f).map(|r| r.attempts))
                    .collect::<Vec<_>>(),
            )
            .bind(
                items
                    .iter()
                    .map(|f| r(f).map(|r| r.ttl_ms))
                    .collect::<Vec<_>>(),
            )
            .bind(
                items
                    .iter()
                    .map(|f| r(f).map(|r| r.json.as_str()))
                    .collect::<Vec<_>>(),
            );
    }
    let done = q
        .fetch_all(&client.pool)
        .await
        .map_err(|e| client.broker_err("settle", e))?;
    Ok(done.into_iter().map(|(id, _)| id).collect())
}

/// Settles a batch: one answer per settlement, in order. A receipt that is
/// not this adapter's, or repeats an earlier one of the batch, answers
/// `LeaseLost`.
pub(crate) async fn settle(client: &Client, batch: &[Settlement]) -> Vec<Result<(), BrokerError>> {
    let mut seen = HashSet::with_capacity(batch.len());
    let mut items = Vec::with_capacity(batch.len());
    let mut which: Vec<Option<i64>> = Vec::with_capacity(batch.len());
    for s in batch {
        match Fenced::of(s) {
            Some(f) if seen.insert(f.id) => {
                which.push(Some(f.id));
                items.push(f);
            }
            _ => which.push(None),
        }
    }
    // One statement per run of items whose records name distinct tasks
    // (an upsert may touch a row once per statement).
    let mut done = Ok(HashSet::new());
    let mut start = 0;
    while start < items.len() {
        let mut tasks = HashSet::new();
        let end = start
            + items[start..]
                .iter()
                .take_while(|f| f.record.as_ref().is_none_or(|r| tasks.insert(r.id)))
                .count()
                .max(1);
        match run(client, &items[start..end]).await {
            Ok(ids) => {
                if let Ok(all) = &mut done {
                    all.extend(ids);
                }
            }
            Err(e) => {
                done = Err(e);
                break;
            }
        }
        start = end;
    }
    answer(batch.iter().map(|s| &s.receipt), &which, done)
}

/// Extends leases: one answer per receipt, in order.
pub(crate) async fn extend(
    client: &Client,
    receipts: &[Receipt],
    lease: Duration,
) -> Vec<Result<(), BrokerError>> {
    let mut seen = HashSet::with_capacity(receipts.len());
    let mut ids = Vec::with_capacity(receipts.len());
    let mut tokens = Vec::with_capacity(receipts.len());
    let mut which = Vec::with_capacity(receipts.len());
    // A receipt given twice is extended once and answered twice; the
    // answer is per (row, token), so a stale copy beside a live one is
    // still refused.
    for r in receipts {
        let lease = lease_of(r);
        if let Some((id, token)) = lease
            && seen.insert((id, token))
        {
            ids.push(id);
            tokens.push(token);
        }
        which.push(lease);
    }
    let done = if ids.is_empty() {
        Ok(HashSet::new())
    } else {
        sqlx::query_as::<_, (i64, i64)>(AssertSqlSafe(client.sql.extend.clone()))
            .bind(ids)
            .bind(tokens)
            .bind(ms_of(lease))
            .fetch_all(&client.pool)
            .await
            .map(|v| v.into_iter().collect::<HashSet<(i64, i64)>>())
            .map_err(|e| client.broker_err("extend leases", e))
    };
    receipts
        .iter()
        .zip(&which)
        .map(|(r, lease)| match (&done, lease) {
            (Err(e), _) => Err(e.clone()),
            (Ok(done), Some(l)) if done.contains(l) => Ok(()),
            _ => Err(r.lost()),
        })
        .collect()
}

fn answer<'a>(
    receipts: impl Iterator<Item = &'a Receipt>,
    which: &[Option<i64>],
    done: Result<HashSet<i64>, BrokerError>,
) -> Vec<Result<(), BrokerError>> {
    receipts
        .zip(which)
        .map(|(r, id)| match (&done, id) {
            (Err(e), _) => Err(e.clone()),
            (Ok(done), Some(id)) if done.contains(id) => Ok(()),
            _ => Err(r.lost()),
        })
        .collect()
}
