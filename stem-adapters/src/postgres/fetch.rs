//! Handing out work (B2, B3, B8, B9, B10, B16): the claim statement per
//! queue, fair across queues, and the wait between claims: a notification,
//! the next due time, or the fallback poll, whichever comes first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgConnection};
use stem_core::broker::undecodable_reason;
use stem_core::envelope::validate_queue_name;
use stem_core::{BrokerError, Delivery, Envelope, FetchRequest, Receipt};

use super::client::Client;
use super::ms_of;
use super::settle::{self, Fenced};

/// Due rows (delays and leases that ran out) one claim promotes at most.
const PROMOTE: i64 = 256;

/// One row of the claim: the leased row's columns (all `None` for the one
/// row an empty claim returns), how many rows it promoted, and the
/// milliseconds to the queue's next due time.
type ClaimRow = (
    Option<i64>,
    Option<i16>,
    Option<i64>,
    Option<i32>,
    Option<i32>,
    Option<String>,
    Option<Vec<u8>>,
    i64,
    Option<i64>,
);

/// A leased row before decoding.
struct Claimed {
    id: i64,
    priority: i16,
    token: i64,
    deliveries: i32,
    attempt: i32,
    last_error: Option<String>,
    bytes: Vec<u8>,
    queue: usize,
}

/// What the last fetch that found nothing knew, so the next one (the
/// worker calls again at once) does not ask the server again before
/// anything can have changed: one query per poll interval when idle.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    queues: Vec<String>,
    /// When the empty look was made.
    at: Option<tokio::time::Instant>,
    /// The queue's next due time then.
    due: Option<tokio::time::Instant>,
    /// The queues' watch values just before it.
    seen: Vec<u64>,
}

/// Leases up to `req.max` envelopes, waiting up to `req.wait` for the first.
/// Cancel-safe while it waits: a dropped fetch has claimed nothing.
pub(crate) async fn fetch(
    client: &Client,
    req: &FetchRequest,
    rotate: &AtomicUsize,
    idle: &Mutex<Idle>,
) -> Result<Vec<Delivery>, BrokerError> {
    if req.queues.is_empty() || req.max == 0 {
        return Ok(Vec::new());
    }
    for q in &req.queues {
        validate_queue_name(q)?;
    }
    let deadline = tokio::time::Instant::now() + req.wait;
    // Watches first, so a notification between an empty claim and the
    // sleep is not missed.
    let mut watches = Vec::new();
    if !req.wait.is_zero() {
        for q in &req.queues {
            watches.push(client.hub.queue(q).await);
        }
    }
    let poll = client.opts.poll_interval;
    // Nothing changed since the last empty look, which is recent: wait first.
    let mut look = !watches.is_empty() && {
        let last = idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        last.queues == req.queues
            && last.at.is_some_and(|at| now < at + poll)
            && last.due.is_none_or(|d| now < d)
            && last
                .seen
                .iter()
                .zip(&watches)
                .all(|(v, w)| *v == *w.borrow())
    };
    let mut claim_next = !look;
    loop {
        let seen: Vec<u64> = watches.iter_mut().map(|w| *w.borrow_and_update()).collect();
        if claim_next {
            // Woken by the clock rather than a notification, over several
            // queues: one look over all of them before a claim per queue.
            let worth = if look && req.queues.len() > 1 {
                peek(client, &req.queues).await?
            } else {
                (true, None)
            };
            let (got, next_due) = if worth.0 {
                claim(client, req, rotate).await?
            } else {
                (Vec::new(), worth.1)
            };
            let now = tokio::time::Instant::now();
            let due = next_due.map(|ms| {
                // Due rows another consumer holds locked (ms <= 0) are
                // looked at again shortly, not in a spin.
                now + Duration::from_millis(u64::try_from(ms.max(5)).unwrap_or(5) + 1)
            });
            *idle.lock().unwrap_or_else(PoisonError::into_inner) = if got.is_empty() {
                Idle {
                    queues: req.queues.clone(),
                    at: Some(now),
                    due,
                    seen,
                }
            } else {
                Idle::default()
            };
            if !got.is_empty() || now >= deadline || watches.is_empty() {
                return Ok(got);
            }
        }
        let (at, due) = {
            let last = idle.lock().unwrap_or_else(PoisonError::into_inner);
            (last.at, last.due)
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(Vec::new());
        }
        let mut until = deadline.min(at.map_or(now, |a| a + poll).max(now));
        if let Some(d) = due {
            until = until.min(d);
        }
        let changed =
            futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        look = tokio::select! {
            _ = changed => false,
            () = tokio::time::sleep_until(until) => true,
        };
        claim_next = tokio::time::Instant::now() < deadline || !look;
        if !claim_next {
            return Ok(Vec::new());
        }
    }
}

/// One look over several queues: whether any has a ready row, and the
/// milliseconds to their earliest due row.
async fn peek(client: &Client, queues: &[String]) -> Result<(bool, Option<i64>), BrokerError> {
    sqlx::query_as(AssertSqlSafe(client.sql.peek.clone()))
        .bind(queues)
        .fetch_one(&client.claim_pool)
        .await
        .map_err(|e| client.broker_err("look for work", e))
}

/// One claim over the request's queues: each up to its share first (the
/// starting queue rotates), then what is left, as on SQLite. Returns the
/// deliveries and the milliseconds to the earliest due time among them.
async fn claim(
    client: &Client,
    req: &FetchRequest,
    rotate: &AtomicUsize,
) -> Result<(Vec<Delivery>, Option<i64>), BrokerError> {
    let n = req.queues.len();
    let start = rotate.fetch_add(1, Ordering::Relaxed) % n;
    let quota = (req.max / n).max(1);
    let lease = ms_of(req.lease);
    let mut conn = client
        .claim_pool
        .acquire()
        .await
        .map_err(|e| client.broker_err("claim", e))?;
    let mut rows: Vec<Claimed> = Vec::with_capacity(req.max);
    let mut next_due: Option<i64> = None;
    let mut exhausted = vec![false; n];
    for pass in 0..2 {
        for i in 0..n {
            let remaining = req.max - rows.len();
            if remaining == 0 {
                break;
            }
            let qi = (start + i) % n;
            if exhausted[qi] {
                continue;
            }
            let take = if pass == 0 {
                quota.min(remaining)
            } else {
                remaining
            };
            let (mut part, due) =
                claim_queue(client, &mut conn, &req.queues[qi], qi, take, lease).await?;
            if part.len() < take {
                exhausted[qi] = true;
            }
            if let Some(d) = due {
                next_due = Some(next_due.map_or(d, |x| x.min(d)));
            }
            // RETURNING gives no order: priority first, then enqueue order.
            part.sort_by_key(|r| (std::cmp::Reverse(r.priority), r.id));
            rows.extend(part);
        }
        if pass == 0 && (rows.len() == req.max || n == 1) {
            break;
        }
    }
    drop(conn);
    let names: Vec<Arc<str>> = req.queues.iter().map(|q| Arc::from(q.as_str())).collect();
    let mut out = Vec::with_capacity(rows.len());
    let mut garbage = Vec::new();
    for row in rows {
        match Envelope::decode(&row.bytes) {
            Ok(mut env) => {
                // The row's columns count attempts; the bytes are never
                // rewritten.
                env.attempt = u32::try_from(row.attempt).unwrap_or(0);
                env.last_error = row.last_error;
                out.push(Delivery {
                    receipt: Receipt::with_token(
                        env.id,
                        Arc::clone(&names[row.queue]),
                        u64::try_from(row.id).unwrap_or(0),
                        u64::try_from(row.token).unwrap_or(0),
                    ),
                    deliveries: u32::try_from(row.deliveries).unwrap_or(u32::MAX),
                    envelope: Arc::new(env),
                });
            }
            Err(e) => {
                let reason = undecodable_reason(&e);
                tracing::error!(queue = %req.queues[row.queue], row = row.id, %reason, "dead-lettering garbage");
                garbage.push(Fenced {
                    id: row.id,
                    token: row.token,
                    kind: settle::DEAD,
                    after_ms: 0,
                    error: None,
                    reason: Some(reason),
                    charge: false,
                    // Lossy text; Postgres text cannot hold NUL either.
                    raw: Some(String::from_utf8_lossy(&row.bytes).replace('\0', "\u{fffd}")),
                    record: None,
                });
            }
        }
    }
    if !garbage.is_empty()
        && let Err(e) = settle::run(client, &garbage).await
    {
        tracing::warn!(error = %e, "could not dead-letter undecodable rows; they return after their lease");
    }
    Ok((out, next_due))
}

async fn claim_queue(
    client: &Client,
    conn: &mut PgConnection,
    queue: &str,
    qi: usize,
    take: usize,
    lease_ms: i64,
) -> Result<(Vec<Claimed>, Option<i64>), BrokerError> {
    let got: Vec<ClaimRow> = sqlx::query_as(AssertSqlSafe(client.sql.claim.clone()))
        .bind(queue)
        .bind(i64::try_from(take).unwrap_or(i64::MAX))
        .bind(PROMOTE)
        .bind(lease_ms)
        .fetch_all(conn)
        .await
        .map_err(|e| client.broker_err("claim", e))?;
    let mut next_due = None;
    let mut out = Vec::with_capacity(got.len());
    for (id, priority, token, deliveries, attempt, last_error, bytes, promoted, due) in got {
        next_due = due;
        if promoted > 0 {
            // Promoted rows are ready now: look again at once.
            next_due = Some(0);
        }
        if let (
            Some(id),
            Some(priority),
            Some(token),
            Some(deliveries),
            Some(attempt),
            Some(bytes),
        ) = (id, priority, token, deliveries, attempt, bytes)
        {
            out.push(Claimed {
                id,
                priority,
                token,
                deliveries,
                attempt,
                last_error,
                bytes,
                queue: qi,
            });
        }
    }
    Ok((out, next_due))
}
