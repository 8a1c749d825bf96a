//! `publish` and `publish_many`: a plain `XADD` for an envelope with no
//! delay and no unique key (one round trip, no script), else `publish.lua`,
//! which takes the unique key and stores the envelope atomically. A batch
//! is one atomic call (`MULTI`/`EXEC` of plain `XADD`s when nothing in it
//! is delayed or unique, else one script), split only past [`MAX_BATCH`]
//! envelopes or [`MAX_BATCH_BYTES`].
//!
//! On a cluster every call must stay in one slot, and a queue is one slot:
//! a batch is one such call per queue (all queues' calls in flight at
//! once), so it is atomic per queue, not across queues — an error may
//! leave the batch's envelopes of other queues stored. Within a queue the
//! order is kept; the results come back in input order either way. Every
//! envelope is still checked before anything is sent.

use std::collections::HashMap;

use stem_core::broker::{check_encoded_size, check_envelope};
use stem_core::{BrokerError, Envelope, Published, TaskId, UniqueRelease};

use super::broker::RedisBroker;
use super::keys::{self, escape};
use super::scripts;
use super::wire;

/// Most envelopes in one script call.
pub(crate) const MAX_BATCH: usize = 2000;
/// Most payload bytes in one script call.
pub(crate) const MAX_BATCH_BYTES: usize = 16 << 20;

/// An envelope checked and encoded, with what the script needs.
pub(crate) struct Prepared {
    pub(crate) id: TaskId,
    pub(crate) queue: String,
    pub(crate) level: u8,
    pub(crate) payload: Vec<u8>,
    /// Delay relative to the publish (producer's clock on both ends).
    pub(crate) delay_ms: u64,
    /// Unique window left, relative to the publish; the key is taken only
    /// when above zero.
    pub(crate) window_ms: i64,
    pub(crate) unique: String,
    pub(crate) on_finish: bool,
}

pub(crate) fn prepare(b: &RedisBroker, env: &Envelope) -> Result<Prepared, BrokerError> {
    check_envelope(env, b.opts.max_envelope_bytes)?;
    let payload = env.encode()?;
    check_encoded_size(env, payload.len(), b.opts.max_envelope_bytes)?;
    let delay_ms = env.not_before.map_or(0, |nb| {
        u64::try_from((nb - env.enqueued_at).num_milliseconds()).unwrap_or(0)
    });
    let (unique, window_ms, on_finish) = match &env.unique {
        Some(u) => {
            let w = (u.until - env.enqueued_at).num_milliseconds();
            if w > 0 {
                (escape(&u.key), w, u.release == UniqueRelease::OnFinish)
            } else {
                (String::new(), 0, false)
            }
        }
        None => (String::new(), 0, false),
    };
    Ok(Prepared {
        id: env.id,
        queue: env.queue.clone(),
        level: env.priority.min(9),
        payload,
        delay_ms,
        window_ms,
        unique,
        on_finish,
    })
}

pub(crate) async fn publish(b: &RedisBroker, env: Envelope) -> Result<Published, BrokerError> {
    let p = prepare(b, &env)?;
    b.register_queue(&p.queue).await?;
    if p.delay_ms == 0 && p.unique.is_empty() {
        let mut c = b.conn.cmd();
        redis::cmd("XADD")
            .arg(b.queue_keys(&p.queue).stream(usize::from(p.level)))
            .arg("*")
            .arg("e")
            .arg(&p.payload)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| b.conn.broker_error("publishing", e))?;
        return Ok(Published::Stored(p.id));
    }
    let mut out = run(b, &[&p]).await?;
    out.pop()
        .ok_or_else(|| b.conn.bad_reply("publishing", "no result"))
}

pub(crate) async fn publish_many(
    b: &RedisBroker,
    envelopes: Vec<Envelope>,
) -> Result<Vec<Published>, BrokerError> {
    if envelopes.is_empty() {
        return Ok(Vec::new());
    }
    // Every envelope is checked before anything is sent: one bad envelope
    // stores nothing (B14).
    let prepared = envelopes
        .iter()
        .map(|e| prepare(b, e))
        .collect::<Result<Vec<_>, _>>()?;
    let mut queues: Vec<&str> = prepared.iter().map(|p| p.queue.as_str()).collect();
    queues.sort_unstable();
    queues.dedup();
    for q in queues {
        b.register_queue(q).await?;
    }
    if b.conn.is_cluster() {
        return per_queue(b, &prepared).await;
    }
    let all: Vec<&Prepared> = prepared.iter().collect();
    let mut out = Vec::with_capacity(prepared.len());
    for chunk in chunks(&all) {
        out.extend(run(b, chunk).await?);
    }
    Ok(out)
}

/// `batch` cut into calls of at most [`MAX_BATCH`] envelopes and
/// [`MAX_BATCH_BYTES`] (one envelope is never cut).
fn chunks<'a, 'p>(batch: &'a [&'p Prepared]) -> Vec<&'a [&'p Prepared]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < batch.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < batch.len()
            && end - start < MAX_BATCH
            && (end == start || bytes + batch[end].payload.len() <= MAX_BATCH_BYTES)
        {
            bytes += batch[end].payload.len();
            end += 1;
        }
        out.push(&batch[start..end]);
        start = end;
    }
    out
}

/// A batch on a cluster: each queue's envelopes (in input order) in calls
/// of their own, the queues concurrently; results put back in input order.
/// The first error is answered once every call has ended.
async fn per_queue(b: &RedisBroker, prepared: &[Prepared]) -> Result<Vec<Published>, BrokerError> {
    let mut groups: Vec<(Vec<usize>, Vec<&Prepared>)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (i, p) in prepared.iter().enumerate() {
        let g = *at.entry(p.queue.as_str()).or_insert_with(|| {
            groups.push((Vec::new(), Vec::new()));
            groups.len() - 1
        });
        groups[g].0.push(i);
        groups[g].1.push(p);
    }
    let calls = groups.iter().map(|(_, items)| async move {
        let mut out = Vec::with_capacity(items.len());
        for chunk in chunks(items) {
            out.extend(run(b, chunk).await?);
        }
        Ok::<_, BrokerError>(out)
    });
    let results = futures::future::join_all(calls).await;
    let mut out: Vec<Option<Published>> = vec![None; prepared.len()];
    for ((idx, _), r) in groups.iter().zip(results) {
        for (i, p) in idx.iter().zip(r?) {
            out[*i] = Some(p);
        }
    }
    out.into_iter()
        .map(|p| p.ok_or_else(|| b.conn.bad_reply("publishing", "no result")))
        .collect()
}

/// Stores `batch` (any mix of queues; one queue on a cluster) in one
/// atomic round trip: plain `XADD`s inside `MULTI`/`EXEC` when no envelope
/// has a delay or a unique key (nothing to decide), else one `publish.lua`
/// call.
async fn run(b: &RedisBroker, batch: &[&Prepared]) -> Result<Vec<Published>, BrokerError> {
    if batch.iter().all(|p| p.delay_ms == 0 && p.unique.is_empty()) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for p in batch {
            pipe.cmd("XADD")
                .arg(b.queue_keys(&p.queue).stream(usize::from(p.level)))
                .arg("*")
                .arg("e")
                .arg(&p.payload)
                .ignore();
        }
        let mut c = b.conn.cmd();
        pipe.query_async::<()>(&mut c)
            .await
            .map_err(|e| b.conn.broker_error("publishing", e))?;
        return Ok(batch.iter().map(|p| Published::Stored(p.id)).collect());
    }
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for p in batch {
        index.entry(p.queue.as_str()).or_insert_with(|| {
            order.push(p.queue.as_str());
            order.len() - 1
        });
    }
    let mut inv = scripts::PUBLISH.prepare_invoke();
    let qkeys: Vec<_> = order.iter().map(|q| b.queue_keys(q)).collect();
    for qk in &qkeys {
        for k in qk.all() {
            inv.key(k);
        }
    }
    inv.arg(order.len());
    for qk in &qkeys {
        inv.arg(qk.unique_prefix());
    }
    inv.arg(batch.len());
    for p in batch {
        inv.arg(index[p.queue.as_str()])
            .arg(&p.payload)
            .arg(p.level)
            .arg(p.delay_ms)
            .arg(p.window_ms)
            .arg(&p.unique)
            .arg(p.id.to_string())
            .arg(if p.on_finish { "1" } else { "0" });
    }
    let mut c = b.conn.cmd();
    let reply: redis::Value = inv
        .invoke_async(&mut c)
        .await
        .map_err(|e| b.conn.broker_error("publishing", e))?;
    let items =
        wire::array(&reply).ok_or_else(|| b.conn.bad_reply("publishing", "not an array"))?;
    if items.len() != batch.len() {
        return Err(b.conn.bad_reply("publishing", "wrong number of results"));
    }
    items
        .iter()
        .zip(batch)
        .map(|(v, p)| {
            let holder = wire::text(v).unwrap_or_default();
            if holder.is_empty() {
                Ok(Published::Stored(p.id))
            } else {
                holder
                    .parse::<TaskId>()
                    .map(Published::Duplicate)
                    .map_err(|_| {
                        b.conn.bad_reply(
                            "publishing",
                            "a unique key holds something that is not a task id",
                        )
                    })
            }
        })
        .collect()
}

const _: () = assert!(keys::LEVELS == 10);
