//! The SQLite broker.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};
use stem_core::broker::{
    BroadcastMessage, BroadcastStream, Capabilities, DeadLetter, DeadLetterRequest, Delivery,
    FetchRequest, Nack, Page, Published, QueueStats, Receipt, Replay,
};
use stem_core::envelope::validate_queue_name;
use stem_core::{Broker, BrokerError, Envelope, TaskId, UniqueRelease};

use super::shared::{self, Shared};
use super::wake::Kind;
use super::{SqliteOptions, ms_of};

/// SQLite's clock in milliseconds: every judgment of time (due, lease,
/// expiry) uses it, never the process's clock (contract clause B18).
macro_rules! now_sql {
    () => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
}

/// Receipts per batched ack statement (3 parameters each).
const ACK_CHUNK: usize = 300;

/// Rows per multi-row INSERT (8 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 500;

/// Broadcast messages older than this are deleted by `maintain`.
const BROADCAST_KEEP_MS: i64 = 5 * 60 * 1000;

/// A broker on a SQLite file. Cheap to clone; clients on one file in one
/// process share a connection pool.
#[derive(Clone)]
pub struct SqliteBroker {
    shared: Arc<Shared>,
    opts: SqliteOptions,
    rotate: Arc<AtomicUsize>,
}

impl std::fmt::Debug for SqliteBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBroker")
            .field("path", &self.shared.path)
            .field("namespace", &self.opts.namespace)
            .finish_non_exhaustive()
    }
}

pub(crate) fn map_err(shared: &Shared, e: &sqlx::Error) -> BrokerError {
    match shared.classify(e) {
        Ok((adapter, reason)) => BrokerError::Storage { adapter, reason },
        Err((adapter, reason)) => BrokerError::Unavailable { adapter, reason },
    }
}

/// The state and delay (ms) a newly stored envelope gets: the delay is
/// taken relative to the producer's own `enqueued_at`, so a producer clock
/// that is off cannot shorten or stretch it.
fn initial_state(env: &Envelope) -> (i64, i64) {
    match env.not_before {
        Some(nb) => {
            let delay = (nb - env.enqueued_at).num_milliseconds();
            if delay > 0 { (1, delay) } else { (0, 0) }
        }
        None => (0, 0),
    }
}

/// SQLite's clock, read inside the caller's transaction or connection.
async fn db_now<'e, E>(exec: E) -> Result<i64, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    sqlx::query_scalar(concat!("SELECT ", now_sql!()))
        .fetch_one(exec)
        .await
}

struct Prepared {
    env: Envelope,
    payload: Vec<u8>,
    state: i64,
    delay: i64,
}

impl SqliteBroker {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the file cannot be opened or migrated.
    pub async fn open(path: impl AsRef<Path>, opts: SqliteOptions) -> Result<Self, BrokerError> {
        let shared = shared::open(path.as_ref(), &opts).await?;
        Ok(Self {
            shared,
            opts,
            rotate: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The options in force.
    #[must_use]
    pub fn options(&self) -> &SqliteOptions {
        &self.opts
    }

    /// Writes bytes that are not an envelope straight into `queue`, as
    /// hand-edited or corrupt storage would hold. A test hook for the
    /// "garbage in storage is dead-lettered" promise.
    ///
    /// # Errors
    /// A storage error.
    pub async fn insert_raw(&self, queue: &str, bytes: &[u8]) -> Result<(), BrokerError> {
        validate_queue_name(queue)?;
        sqlx::query("INSERT INTO stem_jobs (ns, id, queue, priority, state, due_ms, payload) VALUES (?, ?, ?, 0, 0, 0, ?)")
            .bind(&self.opts.namespace)
            .bind(TaskId::new().to_string())
            .bind(queue)
            .bind(bytes)
            .execute(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        self.shared.wake.signal(Kind::Jobs);
        Ok(())
    }

    fn err(&self, e: &sqlx::Error) -> BrokerError {
        map_err(&self.shared, e)
    }

    fn prepare(&self, env: Envelope) -> Result<Prepared, BrokerError> {
        env.validate()?;
        let payload = env.encode()?;
        if payload.len() > self.opts.max_envelope_bytes {
            return Err(BrokerError::TooLarge {
                task_id: env.id,
                size: payload.len(),
                limit: self.opts.max_envelope_bytes,
            });
        }
        let (state, delay) = initial_state(&env);
        Ok(Prepared {
            env,
            payload,
            state,
            delay,
        })
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, BrokerError> {
        self.shared
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(&e))
    }

    /// Stores `items` in one transaction: unique ones row by row (they
    /// check the key), the rest in multi-row INSERTs.
    async fn store(&self, items: Vec<Prepared>) -> Result<Vec<Published>, BrokerError> {
        let mut tx = self.begin().await?;
        let now = db_now(&mut *tx).await.map_err(|e| self.err(&e))?;
        let mut out = Vec::with_capacity(items.len());
        let mut plain: Vec<&Prepared> = Vec::new();
        for p in &items {
            if let Some(u) = &p.env.unique {
                let holder: Option<(String, i64)> = sqlx::query_as(
                    "SELECT holder, until_ms FROM stem_unique WHERE ns = ? AND key = ?",
                )
                .bind(&self.opts.namespace)
                .bind(&u.key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.err(&e))?;
                if let Some((holder, until)) = holder
                    && until > now
                {
                    let id = holder.parse::<TaskId>().map_err(|e| BrokerError::Storage {
                        adapter: self.shared.describe(),
                        reason: format!("corrupt unique key holder: {e}"),
                    })?;
                    out.push(Published::Duplicate(id));
                    continue;
                }
                sqlx::query("INSERT OR REPLACE INTO stem_unique (ns, key, holder, until_ms) VALUES (?, ?, ?, ?)")
                    .bind(&self.opts.namespace)
                    .bind(&u.key)
                    .bind(p.env.id.to_string())
                                        .bind(now.saturating_add((u.until - p.env.enqueued_at).num_milliseconds().max(0)))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(&e))?;
                sqlx::query("INSERT INTO stem_jobs (ns, id, queue, priority, state, due_ms, unique_key, unique_on_finish, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
                    .bind(&self.opts.namespace)
                    .bind(p.env.id.to_string())
                    .bind(&p.env.queue)
                    .bind(i64::from(p.env.priority))
                                        .bind(p.state)
                    .bind(now.saturating_add(p.delay))
                    .bind(&u.key)
                    .bind(i64::from(u.release == UniqueRelease::OnFinish))
                    .bind(&p.payload)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(&e))?;
            } else {
                plain.push(p);
            }
            out.push(Published::Stored(p.env.id));
        }
        for chunk in plain.chunks(INSERT_CHUNK) {
            let mut sql = String::from(
                "INSERT INTO stem_jobs (ns, id, queue, priority, state, due_ms, payload) VALUES ",
            );
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 {
                    "(?, ?, ?, ?, ?, ?, ?)"
                } else {
                    ", (?, ?, ?, ?, ?, ?, ?)"
                });
            }
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for p in chunk {
                q = q
                    .bind(&self.opts.namespace)
                    .bind(p.env.id.to_string())
                    .bind(&p.env.queue)
                    .bind(i64::from(p.env.priority))
                    .bind(p.state)
                    .bind(now.saturating_add(p.delay))
                    .bind(&p.payload);
            }
            q.execute(&mut *tx).await.map_err(|e| self.err(&e))?;
        }
        tx.commit().await.map_err(|e| self.err(&e))?;
        if items.iter().any(|p| p.state == 0) {
            self.shared.wake.signal(Kind::Jobs);
        }
        Ok(out)
    }

    /// A read-only look for anything a claim could take: cheap, and it
    /// takes no write lock, so idle consumers polling it neither burn CPU
    /// nor get in the producers' way.
    async fn anything_claimable(&self, queues: &[String]) -> Result<bool, BrokerError> {
        let queues =
            serde_json::to_string(queues).map_err(|e| BrokerError::Invalid(e.to_string()))?;
        sqlx::query_scalar(concat!(
            "SELECT EXISTS (SELECT 1 FROM stem_jobs WHERE ns = ?1 AND state IN (1, 2) AND due_ms <= ",
            now_sql!(),
            ") OR EXISTS (SELECT 1 FROM stem_jobs WHERE ns = ?1 AND state = 0 AND queue IN (SELECT value FROM json_each(?2)))"
        ))
        .bind(&self.opts.namespace)
        .bind(queues)
        .fetch_one(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))
    }

    /// One claim transaction: promote due rows, then lease up to `req.max`
    /// ready rows across the queues, fairly.
    async fn claim(&self, req: &FetchRequest) -> Result<Vec<Delivery>, BrokerError> {
        let mut tx = self.begin().await?;
        let now = db_now(&mut *tx).await.map_err(|e| self.err(&e))?;
        let lease_until = now.saturating_add(ms_of(req.lease));
        sqlx::query(
            "UPDATE stem_jobs SET state = 0 WHERE ns = ? AND state IN (1, 2) AND due_ms <= ?",
        )
        .bind(&self.opts.namespace)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(&e))?;
        let n = req.queues.len();
        let start = self.rotate.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let mut out = Vec::with_capacity(req.max);
        let quota = (req.max / n.max(1)).max(1);
        // First pass: each queue up to its share; second: fill what is left.
        for pass in 0..2 {
            for i in 0..n {
                let remaining = req.max - out.len();
                if remaining == 0 {
                    break;
                }
                let take = if pass == 0 {
                    quota.min(remaining)
                } else {
                    remaining
                };
                let queue = &req.queues[(start + i) % n];
                let mut rows = sqlx::query(
                    "UPDATE stem_jobs SET state = 2, due_ms = ?, token = token + 1, deliveries = deliveries + 1 \
                     WHERE seq IN (SELECT seq FROM stem_jobs WHERE ns = ? AND queue = ? AND state = 0 ORDER BY priority DESC, seq LIMIT ?) \
                     RETURNING seq, id, priority, token, deliveries, payload",
                )
                .bind(lease_until)
                .bind(&self.opts.namespace)
                .bind(queue)
                .bind(i64::try_from(take).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| self.err(&e))?;
                rows.sort_by_key(|r| (std::cmp::Reverse(r.get::<i64, _>(2)), r.get::<i64, _>(0)));
                for row in rows {
                    if let Some(d) = self.decode_row(&mut tx, queue, &row, now).await? {
                        out.push(d);
                    }
                }
            }
            if pass == 0 && (out.len() == req.max || n == 1) {
                break;
            }
        }
        tx.commit().await.map_err(|e| self.err(&e))?;
        Ok(out)
    }

    /// Turns a claimed row into a delivery, or dead-letters it when its
    /// payload is not an envelope.
    async fn decode_row(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        queue: &str,
        row: &SqliteRow,
        now: i64,
    ) -> Result<Option<Delivery>, BrokerError> {
        let id: String = row.get(1);
        let token: i64 = row.get(3);
        let deliveries: i64 = row.get(4);
        let payload: Vec<u8> = row.get(5);
        match Envelope::decode(&payload) {
            Ok(envelope) => Ok(Some(Delivery {
                receipt: Receipt {
                    task_id: envelope.id,
                    queue: queue.to_owned(),
                    token: u64::try_from(token).unwrap_or(0),
                    tag: id,
                },
                delivery_count: u32::try_from(deliveries).unwrap_or(u32::MAX),
                envelope,
            })),
            Err(e) => {
                let reason = format!("undecodable envelope in storage: {e}");
                tracing::error!(queue, row_id = %id, %reason, "dead-lettering garbage");
                sqlx::query("DELETE FROM stem_jobs WHERE ns = ? AND id = ?")
                    .bind(&self.opts.namespace)
                    .bind(&id)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| self.err(&e))?;
                let dead_id = id.parse::<TaskId>().unwrap_or_default();
                sqlx::query("INSERT INTO stem_dead (ns, queue, id, reason, error, dead_ms, expires_ms, envelope, raw) VALUES (?, ?, ?, ?, NULL, ?, ?, NULL, ?)")
                    .bind(&self.opts.namespace)
                    .bind(queue)
                    .bind(dead_id.to_string())
                    .bind(&reason)
                    .bind(now)
                    .bind(now.saturating_add(ms_of(self.opts.dead_letter_retention)))
                    .bind(String::from_utf8_lossy(&payload).into_owned())
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| self.err(&e))?;
                Ok(None)
            }
        }
    }

    /// Deletes the leased row behind `receipt`, releasing an on-finish
    /// unique key; returns its queue and payload.
    async fn take_row(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        receipt: &Receipt,
    ) -> Result<(String, Vec<u8>), BrokerError> {
        let row: Option<(String, Vec<u8>, Option<String>, i64)> = sqlx::query_as(
            "DELETE FROM stem_jobs WHERE ns = ? AND id = ? AND token = ? AND state IN (0, 2) \
             RETURNING queue, payload, unique_key, unique_on_finish",
        )
        .bind(&self.opts.namespace)
        .bind(receipt.task_id.to_string())
        .bind(i64::try_from(receipt.token).unwrap_or(-1))
        .fetch_optional(&mut **tx)
        .await
        .map_err(|e| self.err(&e))?;
        let Some((queue, payload, unique_key, on_finish)) = row else {
            return Err(BrokerError::LeaseLost {
                task_id: receipt.task_id,
            });
        };
        if on_finish != 0
            && let Some(key) = unique_key
        {
            sqlx::query("DELETE FROM stem_unique WHERE ns = ? AND key = ? AND holder = ?")
                .bind(&self.opts.namespace)
                .bind(key)
                .bind(receipt.task_id.to_string())
                .execute(&mut **tx)
                .await
                .map_err(|e| self.err(&e))?;
        }
        Ok((queue, payload))
    }

    /// Deletes the rows behind `receipts` in one transaction, one statement
    /// per chunk, each row fenced by its own token; returns the ids acked.
    async fn ack_batch(&self, receipts: &[Receipt]) -> Result<HashSet<TaskId>, BrokerError> {
        let mut acked = HashSet::with_capacity(receipts.len());
        let mut tx = self.begin().await?;
        for chunk in receipts.chunks(ACK_CHUNK) {
            // INDEXED BY: left to itself the planner may pick the (ns, state)
            // index for `state IN (0, 2)` and scan the whole backlog per ack
            // (seen in the drain profile: the rate fell with the backlog).
            // The CASE fences each row by the token of its own lease.
            let mut sql = String::from(
                "DELETE FROM stem_jobs INDEXED BY stem_jobs_id WHERE ns = ? AND state IN (0, 2) AND id IN (",
            );
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 { "?" } else { ", ?" });
            }
            sql.push_str(") AND token = CASE id");
            for _ in chunk {
                sql.push_str(" WHEN ? THEN ?");
            }
            sql.push_str(" END RETURNING id, unique_key, unique_on_finish");
            let ids: Vec<String> = chunk.iter().map(|r| r.task_id.to_string()).collect();
            let mut q =
                sqlx::query_as::<_, (String, Option<String>, i64)>(sqlx::AssertSqlSafe(sql))
                    .bind(&self.opts.namespace);
            for id in &ids {
                q = q.bind(id);
            }
            for (id, r) in ids.iter().zip(chunk) {
                q = q.bind(id).bind(i64::try_from(r.token).unwrap_or(-1));
            }
            let rows = q.fetch_all(&mut *tx).await.map_err(|e| self.err(&e))?;
            for (id, unique_key, on_finish) in rows {
                if on_finish != 0
                    && let Some(key) = unique_key
                {
                    sqlx::query("DELETE FROM stem_unique WHERE ns = ? AND key = ? AND holder = ?")
                        .bind(&self.opts.namespace)
                        .bind(key)
                        .bind(&id)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.err(&e))?;
                }
                if let Ok(id) = id.parse::<TaskId>() {
                    acked.insert(id);
                }
            }
        }
        tx.commit().await.map_err(|e| self.err(&e))?;
        Ok(acked)
    }

    fn dead_letter_of(&self, row: &SqliteRow) -> DeadLetter {
        let id: String = row.get(0);
        let envelope: Option<Vec<u8>> = row.get(5);
        DeadLetter {
            id: id.parse().unwrap_or_default(),
            queue: row.get(1),
            reason: row.get(2),
            error: row.get(3),
            dead_at: Utc
                .timestamp_millis_opt(row.get(4))
                .single()
                .unwrap_or_default(),
            envelope: envelope.and_then(|b| Envelope::decode(&b).ok()),
            raw: row.get(6),
        }
    }
}

#[async_trait]
impl Broker for SqliteBroker {
    fn describe(&self) -> String {
        self.shared.describe()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable: true,
            delay: true,
            priority: true,
            many_queues: true,
            broadcast: true,
            atomic_batch: true,
            reconnect: true,
            unique: true,
            server_time: true,
        }
    }

    async fn publish(&self, envelope: Envelope) -> Result<Published, BrokerError> {
        let p = self.prepare(envelope)?;
        if p.env.unique.is_some() {
            let mut v = self.store(vec![p]).await?;
            return v
                .pop()
                .ok_or_else(|| BrokerError::Invalid(String::from("empty publish")));
        }
        let id = p.env.id;
        sqlx::query(concat!("INSERT INTO stem_jobs (ns, id, queue, priority, state, due_ms, payload) VALUES (?, ?, ?, ?, ?, ", now_sql!(), " + ?, ?)"))
            .bind(&self.opts.namespace)
            .bind(id.to_string())
            .bind(&p.env.queue)
            .bind(i64::from(p.env.priority))
            .bind(p.state)
            .bind(p.delay)
            .bind(&p.payload)
            .execute(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        if p.state == 0 {
            self.shared.wake.signal(Kind::Jobs);
        }
        Ok(Published::Stored(id))
    }

    async fn publish_many(&self, envelopes: Vec<Envelope>) -> Result<Vec<Published>, BrokerError> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        let items = envelopes
            .into_iter()
            .map(|e| self.prepare(e))
            .collect::<Result<Vec<_>, _>>()?;
        self.store(items).await
    }

    async fn fetch(&self, req: &FetchRequest) -> Result<Vec<Delivery>, BrokerError> {
        if req.queues.is_empty() || req.max == 0 {
            return Ok(Vec::new());
        }
        for q in &req.queues {
            validate_queue_name(q)?;
        }
        let deadline = tokio::time::Instant::now() + req.wait;
        // After a timer wake-up (nothing signalled work), look before
        // taking the write lock.
        let mut look_first = false;
        loop {
            let notified = self.shared.wake.signals.jobs.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = if look_first && !self.anything_claimable(&req.queues).await? {
                Vec::new()
            } else {
                self.claim(req).await?
            };
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let nap = (deadline - now).min(self.opts.poll_interval);
            look_first = tokio::select! {
                () = notified => false,
                () = tokio::time::sleep(nap) => true,
            };
        }
    }

    async fn ack(&self, receipt: &Receipt) -> Result<(), BrokerError> {
        let mut tx = self.begin().await?;
        self.take_row(&mut tx, receipt).await?;
        tx.commit().await.map_err(|e| self.err(&e))
    }

    async fn ack_many(&self, receipts: &[Receipt]) -> Vec<Result<(), BrokerError>> {
        match self.ack_batch(receipts).await {
            Ok(acked) => receipts
                .iter()
                .map(|r| {
                    if acked.contains(&r.task_id) {
                        Ok(())
                    } else {
                        Err(BrokerError::LeaseLost { task_id: r.task_id })
                    }
                })
                .collect(),
            Err(e) => receipts.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<(), BrokerError> {
        let done = sqlx::query(concat!(
            "UPDATE stem_jobs SET state = 2, due_ms = ",
            now_sql!(),
            " + ? WHERE ns = ? AND id = ? AND token = ? AND state IN (0, 2)"
        ))
        .bind(ms_of(lease))
        .bind(&self.opts.namespace)
        .bind(receipt.task_id.to_string())
        .bind(i64::try_from(receipt.token).unwrap_or(-1))
        .execute(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(BrokerError::LeaseLost {
                task_id: receipt.task_id,
            })
        }
    }

    async fn nack(&self, receipt: &Receipt, nack: Nack) -> Result<(), BrokerError> {
        let (state, delay) = if nack.after.is_zero() {
            (0, 0)
        } else {
            (1, ms_of(nack.after))
        };
        let (payload, priority) = match &nack.envelope {
            Some(env) => {
                if env.id != receipt.task_id {
                    return Err(BrokerError::Invalid(format!(
                        "the replacement envelope's id {} is not the delivery's {}",
                        env.id, receipt.task_id
                    )));
                }
                (Some(env.encode()?), Some(i64::from(env.priority)))
            }
            None => (None, None),
        };
        let done = sqlx::query(concat!("UPDATE stem_jobs SET state = ?, due_ms = ", now_sql!(), " + ?, payload = COALESCE(?, payload), priority = COALESCE(?, priority) WHERE ns = ? AND id = ? AND token = ? AND state IN (0, 2)"))
            .bind(state)
            .bind(delay)
            .bind(payload)
            .bind(priority)
            .bind(&self.opts.namespace)
            .bind(receipt.task_id.to_string())
            .bind(i64::try_from(receipt.token).unwrap_or(-1))
            .execute(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        if done.rows_affected() != 1 {
            return Err(BrokerError::LeaseLost {
                task_id: receipt.task_id,
            });
        }
        if state == 0 {
            self.shared.wake.signal(Kind::Jobs);
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        receipt: &Receipt,
        request: DeadLetterRequest,
    ) -> Result<(), BrokerError> {
        let mut tx = self.begin().await?;
        let now = db_now(&mut *tx).await.map_err(|e| self.err(&e))?;
        let (queue, payload) = self.take_row(&mut tx, receipt).await?;
        let envelope = match &request.envelope {
            Some(env) => env.encode()?,
            None => payload,
        };
        sqlx::query("INSERT INTO stem_dead (ns, queue, id, reason, error, dead_ms, expires_ms, envelope, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)")
            .bind(&self.opts.namespace)
            .bind(queue)
            .bind(receipt.task_id.to_string())
            .bind(&request.reason)
            .bind(&request.error)
            .bind(now)
            .bind(now.saturating_add(ms_of(self.opts.dead_letter_retention)))
            .bind(envelope)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(&e))?;
        tx.commit().await.map_err(|e| self.err(&e))
    }

    async fn dead_letters(&self, queue: &str, page: Page) -> Result<Vec<DeadLetter>, BrokerError> {
        let rows = sqlx::query(concat!("SELECT id, queue, reason, error, dead_ms, envelope, raw FROM stem_dead WHERE ns = ? AND queue = ? AND expires_ms > ", now_sql!(), " ORDER BY seq LIMIT ? OFFSET ?"))
            .bind(&self.opts.namespace)
            .bind(queue)
            .bind(i64::try_from(page.limit).unwrap_or(i64::MAX))
            .bind(i64::try_from(page.offset).unwrap_or(i64::MAX))
            .fetch_all(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(rows.iter().map(|r| self.dead_letter_of(r)).collect())
    }

    async fn dead_letter_count(&self, queue: &str) -> Result<u64, BrokerError> {
        let n: i64 = sqlx::query_scalar(concat!(
            "SELECT COUNT(*) FROM stem_dead WHERE ns = ? AND queue = ? AND expires_ms > ",
            now_sql!()
        ))
        .bind(&self.opts.namespace)
        .bind(queue)
        .fetch_one(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn replay_dead_letters(
        &self,
        queue: &str,
        which: Replay,
        reset_attempts: bool,
    ) -> Result<u64, BrokerError> {
        let mut tx = self.begin().await?;
        let now = db_now(&mut *tx).await.map_err(|e| self.err(&e))?;
        let rows: Vec<(i64, String, Option<Vec<u8>>)> = match which {
            Replay::One(id) => sqlx::query_as("SELECT seq, id, envelope FROM stem_dead WHERE ns = ? AND queue = ? AND id = ? AND expires_ms > ? ORDER BY seq")
                .bind(&self.opts.namespace)
                .bind(queue)
                .bind(id.to_string())
                .bind(now)
                .fetch_all(&mut *tx)
                .await,
            Replay::All => sqlx::query_as("SELECT seq, id, envelope FROM stem_dead WHERE ns = ? AND queue = ? AND expires_ms > ? ORDER BY seq")
                .bind(&self.opts.namespace)
                .bind(queue)
                .bind(now)
                .fetch_all(&mut *tx)
                .await,
        }
        .map_err(|e| self.err(&e))?;
        let mut replayed = 0u64;
        for (seq, _id, envelope) in rows {
            let Some(mut env) = envelope.and_then(|b| Envelope::decode(&b).ok()) else {
                continue; // garbage stays dead: there is nothing to run
            };
            if reset_attempts {
                env.attempt = 0;
                env.last_error = None;
            }
            let payload = env.encode()?;
            let inserted = sqlx::query("INSERT OR IGNORE INTO stem_jobs (ns, id, queue, priority, state, due_ms, payload) VALUES (?, ?, ?, ?, 0, 0, ?)")
                .bind(&self.opts.namespace)
                .bind(env.id.to_string())
                .bind(&env.queue)
                .bind(i64::from(env.priority))
                .bind(payload)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(&e))?;
            if inserted.rows_affected() == 1 {
                sqlx::query("DELETE FROM stem_dead WHERE seq = ?")
                    .bind(seq)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(&e))?;
                replayed += 1;
            }
        }
        tx.commit().await.map_err(|e| self.err(&e))?;
        if replayed > 0 {
            self.shared.wake.signal(Kind::Jobs);
        }
        Ok(replayed)
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64, BrokerError> {
        let done = sqlx::query("DELETE FROM stem_dead WHERE ns = ? AND queue = ?")
            .bind(&self.opts.namespace)
            .bind(queue)
            .execute(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(done.rows_affected())
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        let now = db_now(&self.shared.pool).await.map_err(|e| self.err(&e))?;
        // Ready rows are counted from the covering index alone; only the
        // (few) delayed and leased rows are read to compare their due time.
        let (ready, delayed, leased): (i64, i64, i64) = sqlx::query_as(
            "SELECT \
               (SELECT COUNT(*) FROM stem_jobs WHERE ns = ?2 AND queue = ?3 AND state = 0) \
                 + COALESCE(SUM(CASE WHEN due_ms <= ?1 THEN 1 ELSE 0 END), 0), \
               COALESCE(SUM(CASE WHEN state = 1 AND due_ms > ?1 THEN 1 ELSE 0 END), 0), \
               COALESCE(SUM(CASE WHEN state = 2 AND due_ms > ?1 THEN 1 ELSE 0 END), 0) \
             FROM stem_jobs WHERE ns = ?2 AND queue = ?3 AND state IN (1, 2)",
        )
        .bind(now)
        .bind(&self.opts.namespace)
        .bind(queue)
        .fetch_one(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))?;
        let dead = self.dead_letter_count(queue).await?;
        let u = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(QueueStats {
            ready: u(ready),
            delayed: u(delayed),
            leased: u(leased),
            dead,
        })
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut tx = self.begin().await?;
        let now = db_now(&mut *tx).await.map_err(|e| self.err(&e))?;
        let removed: Vec<(String, Option<String>)> = sqlx::query_as(
            "DELETE FROM stem_jobs WHERE ns = ? AND queue = ? AND (state IN (0, 1) OR due_ms <= ?) RETURNING id, unique_key",
        )
        .bind(&self.opts.namespace)
        .bind(queue)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(&e))?;
        for (id, key) in &removed {
            if let Some(key) = key {
                sqlx::query("DELETE FROM stem_unique WHERE ns = ? AND key = ? AND holder = ?")
                    .bind(&self.opts.namespace)
                    .bind(key)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(&e))?;
            }
        }
        tx.commit().await.map_err(|e| self.err(&e))?;
        Ok(removed.len() as u64)
    }

    async fn broadcast(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        if channel.is_empty() {
            return Err(BrokerError::Invalid(String::from(
                "the broadcast channel name is empty",
            )));
        }
        sqlx::query(concat!(
            "INSERT INTO stem_broadcast (ns, channel, payload, sent_ms) VALUES (?, ?, ?, ",
            now_sql!(),
            ")"
        ))
        .bind(&self.opts.namespace)
        .bind(channel)
        .bind(payload)
        .execute(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))?;
        self.shared.wake.signal(Kind::Broadcast);
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<BroadcastStream, BrokerError> {
        if channel.is_empty() {
            return Err(BrokerError::Invalid(String::from(
                "the broadcast channel name is empty",
            )));
        }
        let mut cursor: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM stem_broadcast")
                .fetch_one(&self.shared.pool)
                .await
                .map_err(|e| self.err(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<BroadcastMessage>(1024);
        let shared = Arc::clone(&self.shared);
        let ns = self.opts.namespace.clone();
        let channel = channel.to_owned();
        let poll = self.opts.poll_interval;
        tokio::spawn(async move {
            while !tx.is_closed() {
                let notified = shared.wake.signals.broadcast.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let rows: Result<Vec<(i64, String)>, _> = sqlx::query_as(
                    "SELECT seq, payload FROM stem_broadcast WHERE ns = ? AND channel = ? AND seq > ? ORDER BY seq",
                )
                .bind(&ns)
                .bind(&channel)
                .bind(cursor)
                .fetch_all(&shared.pool)
                .await;
                match rows {
                    Ok(rows) => {
                        for (seq, payload) in rows {
                            cursor = seq;
                            let msg = BroadcastMessage {
                                channel: channel.clone(),
                                payload,
                            };
                            if tx.send(msg).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, channel, "broadcast poll failed; retrying");
                    }
                }
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep(poll) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        })))
    }

    async fn maintain(&self) -> Result<(), BrokerError> {
        let now = db_now(&self.shared.pool).await.map_err(|e| self.err(&e))?;
        for sql in [
            "DELETE FROM stem_dead WHERE ns = ? AND expires_ms <= ?",
            "DELETE FROM stem_unique WHERE ns = ? AND until_ms <= ?",
        ] {
            sqlx::query(sql)
                .bind(&self.opts.namespace)
                .bind(now)
                .execute(&self.shared.pool)
                .await
                .map_err(|e| self.err(&e))?;
        }
        sqlx::query("DELETE FROM stem_broadcast WHERE ns = ? AND sent_ms <= ?")
            .bind(&self.opts.namespace)
            .bind(now - BROADCAST_KEEP_MS)
            .execute(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }
}
