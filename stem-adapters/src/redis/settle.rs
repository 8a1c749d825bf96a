//! `settle` and `extend_leases`: one script call per queue for a whole
//! batch, each item fenced by its lease member (`<entry>|<fence>`): a
//! receipt whose member is gone (settled, or handed out again) answers
//! `LeaseLost` and changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use stem_core::broker::charged;
use stem_core::{BrokerError, Disposition, Receipt, Settlement, TaskId, UniqueRelease};

use super::keys::escape;

use super::broker::RedisBroker;
use super::ms_of;
use super::scripts;
use super::wire::{self, RedisReceipt};

/// Groups item indexes by queue, keeping each queue's items in order.
fn by_queue<T>(items: &[T], queue: impl Fn(&T) -> &Arc<str>) -> Vec<(Arc<str>, Vec<usize>)> {
    let mut groups: Vec<(Arc<str>, Vec<usize>)> = Vec::new();
    let mut at: HashMap<Arc<str>, usize> = HashMap::new();
    for (i, it) in items.iter().enumerate() {
        let q = queue(it);
        let g = *at.entry(q.clone()).or_insert_with(|| {
            groups.push((q.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    groups
}

pub(crate) async fn settle(b: &RedisBroker, batch: &[Settlement]) -> Vec<Result<(), BrokerError>> {
    let mut out: Vec<Result<(), BrokerError>> =
        batch.iter().map(|s| Err(s.receipt.lost())).collect();
    for (queue, idx) in by_queue(batch, |s| &s.receipt.queue) {
        let keys = b.queue_keys(&queue);
        let mut inv = scripts::SETTLE.prepare_invoke();
        for k in keys.all() {
            inv.key(k);
        }
        let mut sent = Vec::new();
        let mut args: Vec<Vec<Vec<u8>>> = Vec::new();
        for &i in &idx {
            let s = &batch[i];
            let Some(r) = s.receipt.opaque::<RedisReceipt>() else {
                continue; // another adapter's receipt: LeaseLost
            };
            match item(s, r) {
                Ok(a) => {
                    args.push(a);
                    sent.push(i);
                }
                Err(e) => out[i] = Err(e),
            }
        }
        if sent.is_empty() {
            continue;
        }
        inv.arg(keys.unique_prefix())
            .arg(sent.len())
            .arg(ms_of(b.opts.dead_letter_retention));
        for a in &args {
            for v in a {
                inv.arg(v.as_slice());
            }
        }
        let mut c = b.conn.cmd();
        let reply: Result<Value, _> = inv.invoke_async(&mut c).await;
        match reply {
            Ok(v) => {
                let items = wire::array(&v).unwrap_or_default();
                for (k, &i) in sent.iter().enumerate() {
                    out[i] = match items.get(k).and_then(wire::int) {
                        Some(1) => Ok(()),
                        Some(_) => Err(batch[i].receipt.lost()),
                        None => Err(b.conn.bad_reply("settling", "missing result")),
                    };
                }
            }
            Err(e) => {
                let e = b.conn.broker_error("settling", e);
                for &i in &sent {
                    out[i] = Err(e.clone());
                }
            }
        }
    }
    out
}

/// The 12 script values of one settlement.
fn item(s: &Settlement, r: &RedisReceipt) -> Result<Vec<Vec<u8>>, BrokerError> {
    let (kind, after, reason, error) = match &s.disposition {
        Disposition::Ack => ("a", Duration::ZERO, "", None),
        Disposition::Retry { after, .. } => ("r", *after, "", None),
        Disposition::Release { after } => ("l", *after, "", None),
        Disposition::DeadLetter { reason, error, .. } => {
            ("d", Duration::ZERO, reason.as_str(), error.as_deref())
        }
    };
    // What is stored next: the charged envelope (retry, charging dead
    // letter), the same one (release, other dead letters), nothing (ack).
    let payload = match (&s.disposition, charged(&r.envelope, &s.disposition)) {
        (Disposition::Ack, _) => Vec::new(),
        (_, Some(next)) => next.encode()?,
        (_, None) => r.envelope.encode()?,
    };
    let (unique, on_finish) = match &r.envelope.unique {
        Some(u) => (escape(&u.key), u.release == UniqueRelease::OnFinish),
        None => (String::new(), false),
    };
    Ok(vec![
        kind.as_bytes().to_vec(),
        r.level.to_string().into_bytes(),
        r.entry.clone().into_bytes(),
        r.fence.to_string().into_bytes(),
        ms_of(after).to_string().into_bytes(),
        payload,
        reason.as_bytes().to_vec(),
        error.unwrap_or("").as_bytes().to_vec(),
        s.receipt.task_id.to_string().into_bytes(),
        unique.into_bytes(),
        if on_finish {
            b"1".to_vec()
        } else {
            b"0".to_vec()
        },
        r.deliveries.to_string().into_bytes(),
    ])
}

/// Dead-letters a delivery whose bytes are not an envelope (B16), fenced
/// like any settlement; the bytes are kept as they were.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn bury(
    b: &RedisBroker,
    queue: &str,
    level: u8,
    entry: &str,
    fence: u64,
    id: TaskId,
    raw: &[u8],
    reason: &str,
) -> Result<(), BrokerError> {
    let keys = b.queue_keys(queue);
    let mut inv = scripts::SETTLE.prepare_invoke();
    for k in keys.all() {
        inv.key(k);
    }
    inv.arg(keys.unique_prefix())
        .arg(1)
        .arg(ms_of(b.opts.dead_letter_retention))
        .arg("g")
        .arg(level)
        .arg(entry)
        .arg(fence)
        .arg(0)
        .arg(raw)
        .arg(reason)
        .arg("")
        .arg(id.to_string())
        .arg("")
        .arg("0")
        .arg(0);
    let mut c = b.conn.cmd();
    inv.invoke_async::<Value>(&mut c)
        .await
        .map_err(|e| b.conn.broker_error("dead-lettering garbage", e))?;
    Ok(())
}

pub(crate) async fn extend(
    b: &RedisBroker,
    receipts: &[Receipt],
    lease: Duration,
) -> Vec<Result<(), BrokerError>> {
    let mut out: Vec<Result<(), BrokerError>> = receipts.iter().map(|r| Err(r.lost())).collect();
    if lease.is_zero() {
        return receipts
            .iter()
            .map(|_| {
                Err(BrokerError::Invalid(String::from(
                    "a lease of zero would expire at once: extend by at least 1 ms",
                )))
            })
            .collect();
    }
    for (queue, idx) in by_queue(receipts, |r| &r.queue) {
        let keys = b.queue_keys(&queue);
        let mut inv = scripts::EXTEND.prepare_invoke();
        for k in keys.all() {
            inv.key(k);
        }
        let sent: Vec<(usize, &RedisReceipt)> = idx
            .iter()
            .filter_map(|&i| receipts[i].opaque::<RedisReceipt>().map(|r| (i, r)))
            .collect();
        if sent.is_empty() {
            continue;
        }
        inv.arg(keys.unique_prefix())
            .arg(ms_of(lease))
            .arg(sent.len());
        for (_, r) in &sent {
            inv.arg(r.level)
                .arg(&r.entry)
                .arg(r.fence)
                .arg(&*r.consumer);
        }
        let mut c = b.conn.cmd();
        match inv.invoke_async::<Value>(&mut c).await {
            Ok(v) => {
                let items = wire::array(&v).unwrap_or_default();
                for (k, (i, _)) in sent.iter().enumerate() {
                    out[*i] = match items.get(k).and_then(wire::int) {
                        Some(1) => Ok(()),
                        Some(_) => Err(receipts[*i].lost()),
                        None => Err(b.conn.bad_reply("extending leases", "missing result")),
                    };
                }
            }
            Err(e) => {
                let e = b.conn.broker_error("extending leases", e);
                for (i, _) in &sent {
                    out[*i] = Err(e.clone());
                }
            }
        }
    }
    out
}
