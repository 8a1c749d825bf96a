//! `fetch`: one `fetch.lua` call per queue leases what is there (due
//! delayed envelopes moved first, then per level from 9 down to 0 expired
//! leases and fresh entries); when nothing is, the consumer blocks in
//! Redis on the queues' streams and timers until a write or the earliest
//! due time or lease expiry wakes it, then fetches again. Bytes that are
//! not an envelope are dead-lettered on the way (B16) and never handed out.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;
use stem_core::broker::undecodable_reason;
use stem_core::envelope::validate_queue_name;
use stem_core::{BrokerError, Delivery, Envelope, FetchRequest, Receipt, TaskId};

use super::broker::{PROMOTE_PER_FETCH, RedisBroker};
use super::keys::LEVELS;
use super::scripts;
use super::wire::{self, RedisReceipt};
use super::{ms_of, settle};

/// Extra time the client gives a blocking read before it gives up on the
/// connection.
const BLOCK_SLACK: Duration = Duration::from_secs(1);

/// What an empty fetch of one queue saw: how long until something there
/// becomes due (`None`: nothing scheduled), and the last ids of its level
/// streams and timer, from which a blocking read waits for newer entries.
struct Idle {
    queue: usize,
    bound: Option<Duration>,
    cursors: Vec<String>,
}

enum Round {
    Got(Vec<Delivery>),
    Empty(Vec<Idle>),
}

pub(crate) async fn fetch(
    b: &RedisBroker,
    req: &FetchRequest,
) -> Result<Vec<Delivery>, BrokerError> {
    if req.queues.is_empty() {
        return Err(BrokerError::Invalid(String::from(
            "fetch needs at least one queue name",
        )));
    }
    for q in &req.queues {
        validate_queue_name(q)?;
    }
    if req.max == 0 {
        return Ok(Vec::new());
    }
    if req.lease.is_zero() {
        return Err(BrokerError::Invalid(String::from(
            "a lease of zero would expire at once: ask for at least 1 ms",
        )));
    }
    let deadline = Instant::now() + req.wait;
    let consumer: Arc<str> = Arc::from(req.consumer.as_str());
    let mut backoff = Duration::from_millis(50);
    loop {
        let round = match round(b, req, &consumer).await {
            Ok(r) => r,
            // While waiting, an outage is ridden out (B15): the
            // connection manager reconnects and the next round succeeds.
            Err(e @ BrokerError::Unavailable { .. }) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(e);
                }
                tracing::debug!(error = %e, "fetch waits out an unavailable Redis");
                tokio::time::sleep(backoff.min(left)).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff = Duration::from_millis(50);
        let idle = match round {
            Round::Got(d) if !d.is_empty() => return Ok(d),
            Round::Got(_) => continue,
            Round::Empty(idle) => idle,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Vec::new());
        }
        let mut block = left.min(b.opts.max_block);
        for i in &idle {
            if let Some(bound) = i.bound {
                block = block.min(bound);
            }
        }
        if block.is_zero() {
            continue;
        }
        wait(b, req, &idle, block).await;
    }
}

/// One pass over the queues: each gets a share of `max`, starting from a
/// rotating queue so none starves (B10); what a full queue left over goes
/// to a second pass. `Got(empty)` means only garbage was found (buried):
/// look again at once.
async fn round(
    b: &RedisBroker,
    req: &FetchRequest,
    consumer: &Arc<str>,
) -> Result<Round, BrokerError> {
    let n = req.queues.len();
    let start = b.rotation.fetch_add(1, Ordering::Relaxed) % n;
    let order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
    let share = (req.max / n).max(1);
    let mut out = Vec::new();
    let mut idle = Vec::new();
    let mut full = Vec::new();
    let mut garbage = false;
    for &q in &order {
        let want = share.min(req.max - out.len());
        if want == 0 {
            break;
        }
        match one_queue(b, req, q, want, consumer).await? {
            QueueReply::Got(d, buried) => {
                garbage |= buried;
                if d.len() >= want {
                    full.push(q);
                }
                out.extend(d);
            }
            QueueReply::Empty(i) => idle.push(i),
        }
    }
    for q in full {
        let want = req.max - out.len();
        if want == 0 {
            break;
        }
        if let QueueReply::Got(d, buried) = one_queue(b, req, q, want, consumer).await? {
            garbage |= buried;
            out.extend(d);
        }
    }
    if out.is_empty() && !garbage && idle.len() == order.len() {
        return Ok(Round::Empty(idle));
    }
    if out.is_empty() && !garbage {
        // Some queue was skipped for lack of share: look again.
        return Ok(Round::Got(Vec::new()));
    }
    Ok(Round::Got(out))
}

enum QueueReply {
    /// Deliveries, and whether garbage was buried on the way.
    Got(Vec<Delivery>, bool),
    Empty(Idle),
}

async fn one_queue(
    b: &RedisBroker,
    req: &FetchRequest,
    q: usize,
    max: usize,
    consumer: &Arc<str>,
) -> Result<QueueReply, BrokerError> {
    let name = &req.queues[q];
    let keys = b.queue_keys(name);
    let mut inv = scripts::FETCH.prepare_invoke();
    for k in keys.all() {
        inv.key(k);
    }
    inv.arg(keys.unique_prefix())
        .arg(&*req.consumer)
        .arg(max)
        .arg(ms_of(req.lease).max(1))
        .arg(PROMOTE_PER_FETCH);
    let mut c = b.conn.cmd();
    let reply: Value = inv
        .invoke_async(&mut c)
        .await
        .map_err(|e| b.conn.broker_error("fetching", e))?;
    let items = wire::array(&reply).ok_or_else(|| b.conn.bad_reply("fetching", "not an array"))?;
    let kind = items.first().and_then(wire::int);
    if kind == Some(0) {
        let bound = items
            .get(1)
            .and_then(wire::int)
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis);
        let cursors: Vec<String> = items[2..].iter().filter_map(wire::text).collect();
        if cursors.len() != LEVELS + 1 {
            return Err(b.conn.bad_reply("fetching", "wrong number of cursors"));
        }
        return Ok(QueueReply::Empty(Idle {
            queue: q,
            bound,
            cursors,
        }));
    }
    let queue: Arc<str> = Arc::from(name.as_str());
    let mut out = Vec::new();
    let mut buried = false;
    for d in items[1..].chunks_exact(5) {
        let (Some(level), Some(entry), Some(fence), Some(base)) = (
            wire::int(&d[0]),
            wire::text(&d[1]),
            wire::int(&d[2]),
            wire::int(&d[3]),
        ) else {
            return Err(b
                .conn
                .bad_reply("fetching", "a delivery without its fields"));
        };
        let raw = wire::bytes(&d[4]).unwrap_or_default();
        let level = u8::try_from(level).unwrap_or(0);
        let fence = u64::try_from(fence).unwrap_or(0);
        match Envelope::decode(raw) {
            Ok(env) => {
                let envelope = Arc::new(env);
                let deliveries =
                    u32::try_from(u64::try_from(base).unwrap_or(0) + fence).unwrap_or(u32::MAX);
                let receipt = Receipt::with_opaque(
                    envelope.id,
                    queue.clone(),
                    RedisReceipt {
                        level,
                        entry,
                        fence,
                        deliveries,
                        consumer: consumer.clone(),
                        envelope: envelope.clone(),
                    },
                );
                out.push(Delivery {
                    envelope,
                    receipt,
                    deliveries,
                });
            }
            Err(e) => {
                buried = true;
                let id = id_in(raw).unwrap_or_else(TaskId::new);
                tracing::warn!(queue = %name, task_id = %id, error = %e, "dead-lettering bytes that are not an envelope");
                settle::bury(
                    b,
                    name,
                    level,
                    &entry,
                    fence,
                    id,
                    raw,
                    &undecodable_reason(&e),
                )
                .await?;
            }
        }
    }
    Ok(QueueReply::Got(out, buried))
}

/// The task id in bytes that are not a whole envelope, when one is there.
fn id_in(raw: &[u8]) -> Option<TaskId> {
    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
    v.get("id")?.as_str()?.parse().ok()
}

/// The blocking read of one idle queue: `XREAD BLOCK` on its level
/// streams and timer, from the cursors of its empty fetch.
fn read_of(b: &RedisBroker, req: &FetchRequest, idle: &[&Idle], block: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("BLOCK").arg(ms_of(block).max(1)).arg("STREAMS");
    for i in idle {
        let k = b.queue_keys(&req.queues[i.queue]);
        for l in 0..LEVELS {
            cmd.arg(k.stream(l));
        }
        cmd.arg(k.timer());
    }
    for i in idle {
        for c in &i.cursors {
            cmd.arg(c);
        }
    }
    cmd
}

/// Blocks in Redis until an entry newer than the cursors arrives on any of
/// the idle queues' streams or timers, or `block` passes. Errors only end
/// the wait early (the caller fetches again); a connection whose read did
/// not come back is dropped, never reused.
///
/// Standalone: one `XREAD` over every idle queue's keys. Cluster: those
/// keys lie in one slot per queue and an `XREAD` across slots fails
/// (CROSSSLOT), so each queue gets a read of its own on a connection to
/// its slot's node, all in flight at once; the first to return ends the
/// wait and the others are dropped with their connections (still blocked
/// in Redis, so never reused).
async fn wait(b: &RedisBroker, req: &FetchRequest, idle: &[Idle], block: Duration) {
    if b.conn.is_cluster() && idle.len() > 1 {
        let mut reads: futures::stream::FuturesUnordered<_> =
            idle.iter().map(|i| read_one(b, req, i, block)).collect();
        let _ = futures::StreamExt::next(&mut reads).await;
        return;
    }
    if let Some(first) = idle.first() {
        let all: Vec<&Idle> = idle.iter().collect();
        let cmd = read_of(b, req, &all, block);
        read(
            b,
            cmd,
            &b.queue_keys(&req.queues[first.queue]).timer(),
            block,
        )
        .await;
    }
}

async fn read_one(b: &RedisBroker, req: &FetchRequest, i: &Idle, block: Duration) {
    let cmd = read_of(b, req, &[i], block);
    read(b, cmd, &b.queue_keys(&req.queues[i.queue]).timer(), block).await;
}

/// Runs the blocking read `cmd` of keys in `key`'s slot on a blocking
/// connection of its own.
async fn read(b: &RedisBroker, cmd: redis::Cmd, key: &str, block: Duration) {
    let mut conn = match b.conn.blocker(key).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "no connection for a blocking read");
            b.conn.blocker_failed();
            tokio::time::sleep(block.min(Duration::from_millis(200))).await;
            return;
        }
    };
    match tokio::time::timeout(
        block + BLOCK_SLACK,
        cmd.query_async::<Value>(&mut conn.conn),
    )
    .await
    {
        Ok(Ok(_)) => b.conn.give_back(conn),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "blocking read failed");
            b.conn.blocker_failed();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(_) => tracing::debug!("blocking read did not return in time; connection dropped"),
    }
}
