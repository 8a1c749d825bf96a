//! The SQLite broker.
//!
//! Every write runs on the file's writer thread (see `db.rs`), grouped
//! with whatever else is queued into one transaction; reads run on reader
//! connections. A claim returns raw rows: envelopes are decoded here, off
//! the writer thread, and a row that does not decode is dead-lettered by a
//! second, fenced write.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use stem_core::broker::{
    Broadcast, BroadcastMessage, BroadcastStream, Capabilities, DeadLetter, DeadLetterPage,
    DeadLetters, Delivery, Disposition, FetchRequest, Limits, Published, QueueAdmin, QueueStats,
    QueueSummary, Receipt, Replay, Settlement, charged, check_encoded_size, undecodable_reason,
};
use stem_core::envelope::validate_queue_name;
use stem_core::{
    Broker, BrokerError, Envelope, EnvelopeError, ResultBackend, TaskId, UniqueRelease,
};

use super::backend::{Encoded, SqliteBackend, upsert};

use super::db::Fail;
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

/// A job's `stem_jobs.state`, named once. SQL text uses the macros (the
/// values stay literals in the statements, so SQLite matches them against
/// the partial indexes `WHERE state = 0` / `WHERE state > 0` of the schema);
/// Rust uses the constants.
macro_rules! ready {
    () => {
        "0"
    };
}
/// Waiting for `due_ms` (`not_before`, or a retry's delay).
macro_rules! delayed {
    () => {
        "1"
    };
}
/// Under a lease until `due_ms`.
macro_rules! leased {
    () => {
        "2"
    };
}
/// The states a live lease can be in: leased, or ready again after its
/// lease ran out but before anyone re-claimed it (then the token fences).
macro_rules! lease_live {
    () => {
        concat!("state IN (", ready!(), ", ", leased!(), ")")
    };
}

/// Broadcast messages older than this are deleted by `maintain`.
const BROADCAST_KEEP_MS: i64 = 5 * 60 * 1000;

/// Rows per multi-row INSERT, largest first; a run of rows without unique
/// keys is stored in statements of these sizes (each cached once).
const MULTI_ROWS: [usize; 3] = [64, 16, 4];

/// `INSERT` of `MULTI_ROWS[size]` rows without unique keys: seven values
/// per row, in [`INSERT_JOB`]'s order without the unique columns.
fn multi_insert_sql(size: usize) -> &'static str {
    static SQL: std::sync::OnceLock<[String; 3]> = std::sync::OnceLock::new();
    SQL.get_or_init(|| MULTI_ROWS.map(build_multi_insert))[size].as_str()
}

fn build_multi_insert(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO stem_jobs (ns, id, queue, priority, state, due_ms, payload) VALUES ",
    );
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        let k = i * 7;
        sql.push_str(&format!(
            "(?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{})",
            k + 1,
            k + 2,
            k + 3,
            k + 4,
            k + 5,
            k + 6,
            k + 7
        ));
    }
    sql
}

/// A new row; the unique key is NULL for envelopes without one.
const INSERT_JOB: &str = "INSERT INTO stem_jobs (ns, id, queue, priority, state, due_ms, unique_key, unique_on_finish, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// The claim of up to `limit` ready rows of one queue, with the namespace,
/// queue and limit written into the SQL as literals and only the lease
/// deadline bound (`?1`). With `ORDER BY`, SQLite's planner reads the
/// values of bound equality and `LIMIT` parameters, so a statement that
/// rebinds them is prepared again on every run (its re-prepare counter
/// went up once per claim; 5% of the writer thread in a drain profile).
/// One cached statement per (queue, limit) in use instead, limits being
/// powers of two (see the claim); both strings are quoted as SQL literals.
fn claim_sql(ns: &str, queue: &str, limit: usize) -> String {
    format!(
        concat!(
            "UPDATE stem_jobs SET state = ",
            leased!(),
            ", due_ms = ?1, token = token + 1, deliveries = deliveries + 1 \
             WHERE seq IN (SELECT seq FROM stem_jobs WHERE ns = {} AND queue = {} AND state = ",
            ready!(),
            " ORDER BY priority DESC, seq LIMIT {limit}) \
             RETURNING seq, id, priority, token, deliveries, payload"
        ),
        sql_literal(ns),
        sql_literal(queue),
        limit = limit
    )
}

/// `n` as powers of two, largest first (`13` -> `8, 4, 1`).
fn power_of_two_pieces(n: usize) -> impl Iterator<Item = usize> {
    (0..usize::BITS)
        .rev()
        .map(|b| 1usize << b)
        .filter(move |p| n & p != 0)
}

/// `s` as an SQL string literal: in single quotes, each quote doubled
/// (SQLite string literals have no other escapes).
fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Deletes one leased (or expired, not yet re-claimed) row, fenced by its
/// lease token.
const TAKE: &str = concat!(
    "DELETE FROM stem_jobs WHERE seq = ?1 AND ns = ?2 AND token = ?3 AND ",
    lease_live!(),
    " RETURNING id, queue, payload, unique_key, unique_on_finish"
);

/// [`TAKE`] for an ack: returns the unique key to release with the row
/// (only when it goes on finish), not the payload.
const ACK: &str = concat!(
    "DELETE FROM stem_jobs WHERE seq = ?1 AND ns = ?2 AND token = ?3 AND ",
    lease_live!(),
    " RETURNING id, CASE WHEN unique_on_finish <> 0 THEN unique_key END"
);

/// Job states, as stored in `stem_jobs.state`.
const READY: i64 = 0;
const _: () = assert!(READY == 0 && DELAYED == 1, "the macros above say the same");
/// Waiting for `due_ms`.
const DELAYED: i64 = 1;

/// The payload of a live lease (fenced like [`TAKE`]).
const LEASED_PAYLOAD: &str = concat!(
    "SELECT payload FROM stem_jobs WHERE seq = ?1 AND ns = ?2 AND token = ?3 AND ",
    lease_live!()
);

const RELEASE_UNIQUE: &str = "DELETE FROM stem_unique WHERE ns = ?1 AND key = ?2 AND holder = ?3";

const INSERT_DEAD: &str = "INSERT INTO stem_dead (ns, queue, id, reason, error, dead_ms, expires_ms, envelope, raw) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// A broker on a SQLite file. Cheap to clone; clients on one file in one
/// process share its connections.
#[derive(Clone)]
pub struct SqliteBroker {
    shared: Arc<Shared>,
    opts: SqliteOptions,
    ns: Arc<str>,
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

/// The state and delay (ms) a newly stored envelope gets: the delay is
/// taken relative to the producer's own `enqueued_at`, so a producer clock
/// that is off cannot shorten or stretch it.
fn initial_state(env: &Envelope) -> (i64, i64) {
    match env.not_before {
        Some(nb) => {
            let delay = (nb - env.enqueued_at).num_milliseconds();
            if delay > 0 {
                (DELAYED, delay)
            } else {
                (READY, 0)
            }
        }
        None => (READY, 0),
    }
}

/// SQLite's clock, read on the connection in use.
fn db_now(c: &Connection) -> rusqlite::Result<i64> {
    c.prepare_cached(concat!("SELECT ", now_sql!()))?
        .query_row([], |r| r.get(0))
}

/// A unique key to take with a row.
struct UniqueClaim {
    key: String,
    /// How long the key is held, from the publish.
    window_ms: i64,
    on_finish: bool,
}

/// An envelope ready to store: everything computed before it reaches the
/// writer thread.
struct NewRow {
    id: TaskId,
    id_text: String,
    queue: String,
    priority: i64,
    state: i64,
    delay: i64,
    payload: Vec<u8>,
    unique: Option<UniqueClaim>,
}

/// A claimed row, not yet decoded.
struct Claimed {
    seq: i64,
    id: String,
    queue: usize,
    token: i64,
    deliveries: i64,
    payload: Vec<u8>,
}

/// A receipt's row and lease token; `None` when the receipt is not one of
/// this adapter's (then its lease cannot be ours).
fn lease_of(r: &Receipt) -> Option<(i64, i64)> {
    let (seq, token) = r.token()?;
    Some((i64::try_from(seq).ok()?, i64::try_from(token).ok()?))
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A deleted row: id, queue, payload, unique key, whether the key goes
/// with the row.
type Taken = (String, String, Vec<u8>, Option<String>, i64);

/// Deletes the leased row `(seq, token)`, releasing an on-finish unique key;
/// returns its queue and payload, or `None` when the lease is not live.
fn take_row(
    c: &Connection,
    ns: &str,
    seq: i64,
    token: i64,
) -> rusqlite::Result<Option<(String, Vec<u8>)>> {
    let row: Option<Taken> = c
        .prepare_cached(TAKE)?
        .query_row(params![seq, ns, token], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((id, queue, payload, unique_key, on_finish)) = row else {
        return Ok(None);
    };
    if on_finish != 0
        && let Some(key) = unique_key
    {
        c.prepare_cached(RELEASE_UNIQUE)?
            .execute(params![ns, key, id])?;
    }
    Ok(Some((queue, payload)))
}

/// Stores `rows` on `c` in order (inside whatever transaction `c` is in);
/// a unique row whose key is held stores nothing and answers with the
/// holder. Shared by publishes (on the writer thread) and `publish_in` (on
/// the caller's connection).
fn insert_rows(
    c: &Connection,
    ns: &str,
    adapter: &str,
    rows: &[NewRow],
) -> Result<Vec<Published>, Fail<BrokerError>> {
    let now = db_now(c)?;
    let mut out = Vec::with_capacity(rows.len());
    let mut insert = c.prepare_cached(INSERT_JOB)?;
    let mut i = 0;
    while i < rows.len() {
        // Runs of rows without a unique key go in multi-row INSERTs: one
        // statement step per 64 rows instead of per row (batched enqueue
        // measured 1.2-1.3x faster).
        let plain = rows[i..].iter().take_while(|r| r.unique.is_none()).count();
        if let Some(size) = MULTI_ROWS.iter().position(|&n| n <= plain) {
            let n = MULTI_ROWS[size];
            let batch = &rows[i..i + n];
            let mut stmt = c.prepare_cached(multi_insert_sql(size))?;
            let mut k = 1;
            for r in batch {
                stmt.raw_bind_parameter(k, ns)?;
                stmt.raw_bind_parameter(k + 1, &r.id_text)?;
                stmt.raw_bind_parameter(k + 2, &r.queue)?;
                stmt.raw_bind_parameter(k + 3, r.priority)?;
                stmt.raw_bind_parameter(k + 4, r.state)?;
                stmt.raw_bind_parameter(k + 5, now.saturating_add(r.delay))?;
                stmt.raw_bind_parameter(k + 6, &r.payload)?;
                k += 7;
            }
            stmt.raw_execute()?;
            out.extend(batch.iter().map(|r| Published::Stored(r.id)));
            i += n;
            continue;
        }
        let r = &rows[i];
        i += 1;
        if let Some(u) = &r.unique {
            let holder: Option<(String, i64)> = c
                .prepare_cached(
                    "SELECT holder, until_ms FROM stem_unique WHERE ns = ?1 AND key = ?2",
                )?
                .query_row(params![ns, u.key], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            if let Some((holder, until)) = holder
                && until > now
            {
                let id = holder.parse::<TaskId>().map_err(|e| BrokerError::Storage {
                    adapter: adapter.to_owned(),
                    reason: format!("corrupt unique key holder: {e}"),
                    source: Some(stem_core::Cause::new(e)),
                })?;
                out.push(Published::Duplicate(id));
                continue;
            }
            c.prepare_cached(
                "INSERT OR REPLACE INTO stem_unique (ns, key, holder, until_ms) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![ns, u.key, r.id_text, now.saturating_add(u.window_ms)])?;
        }
        insert.execute(params![
            ns,
            r.id_text,
            r.queue,
            r.priority,
            r.state,
            now.saturating_add(r.delay),
            r.unique.as_ref().map(|u| &u.key),
            r.unique.as_ref().is_some_and(|u| u.on_finish),
            r.payload
        ])?;
        out.push(Published::Stored(r.id));
    }
    Ok(out)
}

/// One settlement, prepared off the writer thread.
struct SettleJob {
    lease: Option<(i64, i64)>,
    disposition: Disposition,
    /// The record to store with it (co-located results only).
    record: Option<Encoded>,
}

/// `(state, delay ms)` of a row handed back after `after`.
fn requeue_state(after: Duration) -> (i64, i64) {
    if after.is_zero() {
        (READY, 0)
    } else {
        (DELAYED, ms_of(after))
    }
}

/// Settles one delivery on the writer thread; `false` when its lease is
/// not live (nothing changed).
fn settle_row(
    c: &Connection,
    ns: &str,
    retention_ms: i64,
    id: TaskId,
    (seq, token): (i64, i64),
    disposition: &Disposition,
) -> Result<bool, Fail<BrokerError>> {
    match disposition {
        Disposition::Ack => {
            let row: Option<(String, Option<String>)> = c
                .prepare_cached(ACK)?
                .query_row(params![seq, ns, token], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((id, Some(key))) = &row {
                c.prepare_cached(RELEASE_UNIQUE)?
                    .execute(params![ns, key, id])?;
            }
            Ok(row.is_some())
        }
        Disposition::Retry { after, .. } | Disposition::Release { after } => {
            let (state, delay) = requeue_state(*after);
            // A retry charges the attempt in the stored envelope; a
            // release leaves it as it is.
            let payload = if matches!(disposition, Disposition::Retry { .. }) {
                let stored: Option<Vec<u8>> = c
                    .prepare_cached(LEASED_PAYLOAD)?
                    .query_row(params![seq, ns, token], |r| r.get(0))
                    .optional()?;
                let Some(stored) = stored else {
                    return Ok(false);
                };
                recharged(&stored, disposition)
            } else {
                None
            };
            // The token moves on: the settled receipt is spent, so a late
            // extend or ack with it cannot lease the row again.
            let changed = c
                .prepare_cached(concat!(
                    "UPDATE stem_jobs SET state = ?1, due_ms = ",
                    now_sql!(),
                    " + ?2, token = token + 1, payload = COALESCE(?3, payload) \
                     WHERE seq = ?4 AND ns = ?5 AND token = ?6 AND ",
                    lease_live!()
                ))?
                .execute(params![state, delay, payload, seq, ns, token])?;
            Ok(changed == 1)
        }
        Disposition::DeadLetter { reason, error, .. } => {
            let now = db_now(c)?;
            let Some((queue, payload)) = take_row(c, ns, seq, token)? else {
                return Ok(false);
            };
            let payload = recharged(&payload, disposition).unwrap_or(payload);
            c.prepare_cached(INSERT_DEAD)?.execute(params![
                ns,
                queue,
                id.to_string(),
                reason,
                error,
                now,
                now.saturating_add(retention_ms),
                payload,
                Option::<String>::None
            ])?;
            Ok(true)
        }
    }
}

/// The stored envelope with the attempt `disposition` charges, re-encoded;
/// `None` when nothing is charged or the payload does not decode (then it
/// is kept as it is).
fn recharged(payload: &[u8], disposition: &Disposition) -> Option<Vec<u8>> {
    let env = Envelope::decode(payload).ok()?;
    charged(&env, disposition)?.encode().ok()
}

impl SqliteBroker {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the file cannot be opened or migrated.
    pub async fn open(path: impl AsRef<Path>, opts: SqliteOptions) -> Result<Self, BrokerError> {
        Self::open_with(path.as_ref(), opts, shared::Sharing::Process).await
    }

    /// Opens the database with connections of its own (its own writer
    /// thread, readers and wake-up socket) instead of the set every client
    /// of the file in this process shares: the client a second process
    /// would have. For tests of what happens between processes (the
    /// conformance kit's races); in an application [`Self::open`] is right.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use stem_adapters::sqlite::{SqliteBroker, SqliteOptions};
    /// use stem_core::{Broker, Envelope, FetchRequest};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("jobs.db");
    /// let one = SqliteBroker::open(&path, SqliteOptions::default()).await?;
    /// let other = SqliteBroker::open_unshared(&path, SqliteOptions::default()).await?;
    /// one.publish(Envelope::new("t", "default", 1)?).await?;
    /// assert_eq!(other.fetch(&FetchRequest::new(["default"], 1)).await?.len(), 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the file cannot be opened or migrated.
    pub async fn open_unshared(
        path: impl AsRef<Path>,
        opts: SqliteOptions,
    ) -> Result<Self, BrokerError> {
        Self::open_with(path.as_ref(), opts, shared::Sharing::Own).await
    }

    async fn open_with(
        path: &Path,
        opts: SqliteOptions,
        sharing: shared::Sharing,
    ) -> Result<Self, BrokerError> {
        let shared = shared::open(path, &opts, sharing).await?;
        Ok(Self {
            shared,
            ns: Arc::from(opts.namespace.as_str()),
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
        let (ns, queue, bytes) = (self.ns.clone(), queue.to_owned(), bytes.to_vec());
        self.write(move |c| {
            c.prepare_cached(INSERT_JOB)?.execute(params![
                ns,
                TaskId::new().to_string(),
                queue,
                0,
                0,
                0,
                Option::<String>::None,
                0,
                bytes
            ])?;
            Ok(())
        })
        .await?;
        self.shared.wake.signal(Kind::Jobs);
        Ok(())
    }

    fn fail(&self, f: Fail<BrokerError>) -> BrokerError {
        match f {
            Fail::Other(e) => e,
            Fail::Db(e) => match self.shared.classify(&e) {
                Ok((adapter, reason, source)) => BrokerError::Storage {
                    adapter,
                    reason,
                    source,
                },
                Err((adapter, reason, source)) => BrokerError::Unavailable {
                    adapter,
                    reason,
                    source,
                },
            },
        }
    }

    async fn write<F, T>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(&Connection) -> Result<T, Fail<BrokerError>> + Send + 'static,
        T: Send + 'static,
    {
        self.shared.db.write(f).await.map_err(|e| self.fail(e))
    }

    async fn read<F, T>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(&Connection) -> Result<T, Fail<BrokerError>> + Send + 'static,
        T: Send + 'static,
    {
        self.shared.db.read(f).await.map_err(|e| self.fail(e))
    }

    fn prepare(&self, env: &Envelope) -> Result<NewRow, BrokerError> {
        env.validate()?;
        let payload = env.encode()?;
        check_encoded_size(env, payload.len(), self.opts.max_envelope_bytes)?;
        let (state, delay) = initial_state(env);
        Ok(NewRow {
            id: env.id,
            id_text: env.id.to_string(),
            queue: env.queue.clone(),
            priority: i64::from(env.priority),
            state,
            delay,
            payload,
            unique: env.unique.as_ref().map(|u| UniqueClaim {
                key: u.key.clone(),
                window_ms: (u.until - env.enqueued_at).num_milliseconds().max(0),
                on_finish: u.release == UniqueRelease::OnFinish,
            }),
        })
    }

    /// Stores `rows` in one transaction, in order; a unique row whose key
    /// is held stores nothing and answers with the holder.
    async fn store(&self, rows: Vec<NewRow>) -> Result<Vec<Published>, BrokerError> {
        self.shared.check_file()?;
        let ns = self.ns.clone();
        let adapter = self.shared.describe();
        let ready = rows.iter().any(|r| r.state == READY);
        let out = self
            .write(move |c| insert_rows(c, &ns, &adapter, &rows))
            .await?;
        if ready {
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
        let ns = self.ns.clone();
        self.read(move |c| {
            Ok(c.prepare_cached(concat!(
                "SELECT EXISTS (SELECT 1 FROM stem_jobs WHERE ns = ?1 AND state > ",
                ready!(),
                " AND due_ms <= ",
                now_sql!(),
                ") OR EXISTS (SELECT 1 FROM stem_jobs WHERE ns = ?1 AND state = ",
                ready!(),
                " AND queue IN (SELECT value FROM json_each(?2)))"
            ))?
            .query_row(params![ns, queues], |r| r.get(0))?)
        })
        .await
    }

    /// One claim transaction: promote due rows, then lease up to `req.max`
    /// ready rows across the queues, fairly. Decoding happens afterwards,
    /// off the writer thread.
    async fn claim(&self, req: &FetchRequest) -> Result<Vec<Delivery>, BrokerError> {
        let ns = self.ns.clone();
        let queues = req.queues.clone();
        let max = req.max;
        let lease_ms = ms_of(req.lease);
        let start = self.rotate.fetch_add(1, Ordering::Relaxed) % queues.len().max(1);
        let (rows, queues) = self
            .write(move |c| {
                let now = db_now(c)?;
                let lease_until = now.saturating_add(lease_ms);
                c.prepare_cached(concat!(
                    "UPDATE stem_jobs SET state = ",
                    ready!(),
                    " WHERE ns = ?1 AND state > ",
                    ready!(),
                    " AND due_ms <= ?2"
                ))?
                .execute(params![ns, now])?;
                let n = queues.len();
                let quota = (max / n.max(1)).max(1);
                let mut out: Vec<Claimed> = Vec::with_capacity(max);
                // First pass: each queue up to its share; second: fill what is left.
                for pass in 0..2 {
                    for i in 0..n {
                        let remaining = max - out.len();
                        if remaining == 0 {
                            break;
                        }
                        let take = if pass == 0 {
                            quota.min(remaining)
                        } else {
                            remaining
                        };
                        let qi = (start + i) % n;
                        let mut part = Vec::with_capacity(take);
                        // A power-of-two piece at a time, largest first, so
                        // a queue has a claim statement per power of two in
                        // use (a handful), not one per count; the usual
                        // claim (half the prefetch) is one piece. Each
                        // piece takes the best rows left, so the whole is
                        // still the best `take` rows.
                        for piece in power_of_two_pieces(take) {
                            let mut claim =
                                c.prepare_cached(&claim_sql(&ns, &queues[qi], piece))?;
                            let mut rows = claim.query(params![lease_until])?;
                            let mut got = 0;
                            while let Some(r) = rows.next()? {
                                got += 1;
                                let priority: i64 = r.get(2)?;
                                part.push((
                                    std::cmp::Reverse(priority),
                                    Claimed {
                                        seq: r.get(0)?,
                                        id: r.get(1)?,
                                        queue: qi,
                                        token: r.get(3)?,
                                        deliveries: r.get(4)?,
                                        payload: r.get(5)?,
                                    },
                                ));
                            }
                            if got < piece {
                                break; // the queue has no more ready rows
                            }
                        }
                        // RETURNING gives no order: restore priority, then enqueue order.
                        part.sort_by_key(|(p, row)| (*p, row.seq));
                        out.extend(part.into_iter().map(|(_, row)| row));
                    }
                    if pass == 0 && (out.len() == max || n == 1) {
                        break;
                    }
                }
                Ok((out, queues))
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut garbage = Vec::new();
        let names: Vec<Arc<str>> = queues.iter().map(|q| Arc::from(q.as_str())).collect();
        for row in rows {
            match Envelope::decode(&row.payload) {
                Ok(envelope) => out.push(Delivery {
                    receipt: Receipt::with_token(
                        envelope.id,
                        Arc::clone(&names[row.queue]),
                        u64_of(row.seq),
                        u64_of(row.token),
                    ),
                    deliveries: u32::try_from(row.deliveries).unwrap_or(u32::MAX),
                    envelope: Arc::new(envelope),
                }),
                Err(e) => garbage.push((row, e)),
            }
        }
        if !garbage.is_empty() {
            self.bury_garbage(&queues, garbage).await;
        }
        Ok(out)
    }

    /// Dead-letters claimed rows whose payload is not an envelope, fenced by
    /// the claim's token. If this fails the rows come back after their lease
    /// and are tried again.
    async fn bury_garbage(&self, queues: &[String], rows: Vec<(Claimed, EnvelopeError)>) {
        let ns = self.ns.clone();
        let retention = ms_of(self.opts.dead_letter_retention);
        let rows: Vec<(Claimed, String, String)> = rows
            .into_iter()
            .map(|(row, err)| {
                let reason = undecodable_reason(&err);
                tracing::error!(queue = %queues[row.queue], row_id = %row.id, %reason, "dead-lettering garbage");
                let queue = queues[row.queue].clone();
                (row, queue, reason)
            })
            .collect();
        let done = self
            .write(move |c| {
                let now = db_now(c)?;
                for (row, queue, reason) in &rows {
                    if take_row(c, &ns, row.seq, row.token)?.is_none() {
                        continue;
                    }
                    // Garbage may have no usable id: the dead letter gets a
                    // fresh one, said so in its `raw` text being kept.
                    let dead_id = row.id.parse::<TaskId>().unwrap_or_else(|_| TaskId::new());
                    c.prepare_cached(INSERT_DEAD)?.execute(params![
                        ns,
                        queue,
                        dead_id.to_string(),
                        reason,
                        Option::<String>::None,
                        now,
                        now.saturating_add(retention),
                        Option::<Vec<u8>>::None,
                        String::from_utf8_lossy(&row.payload).into_owned()
                    ])?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not dead-letter undecodable rows; they return after their lease");
        }
    }

    fn dead_letter_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
        let id: String = r.get(0)?;
        let id: TaskId = id.parse().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?;
        let envelope: Option<Vec<u8>> = r.get(5)?;
        Ok(DeadLetter {
            id,
            queue: r.get(1)?,
            reason: r.get(2)?,
            error: r.get(3)?,
            dead_at: Utc
                .timestamp_millis_opt(r.get(4)?)
                .single()
                .unwrap_or_default(),
            envelope: envelope.and_then(|b| Envelope::decode(&b).ok()),
            raw: r.get(6)?,
        })
    }
}

#[async_trait]
impl Broker for SqliteBroker {
    fn describe(&self) -> String {
        self.shared.describe()
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.durable = true;
        caps.delay = true;
        caps.priority = true;
        caps.many_queues = true;
        caps.broadcast = true;
        caps.atomic_batch = true;
        caps.reconnect = true;
        caps.unique = true;
        caps.server_time = true;
        caps.limits = Limits::unbounded(self.opts.max_envelope_bytes);
        caps
    }

    async fn publish(&self, envelope: Envelope) -> Result<Published, BrokerError> {
        let row = self.prepare(&envelope)?;
        let mut v = self.store(vec![row]).await?;
        v.pop()
            .ok_or_else(|| BrokerError::Invalid(String::from("empty publish")))
    }

    async fn publish_many(&self, envelopes: Vec<Envelope>) -> Result<Vec<Published>, BrokerError> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        let rows = envelopes
            .iter()
            .map(|e| self.prepare(e))
            .collect::<Result<Vec<_>, _>>()?;
        self.store(rows).await
    }

    async fn publish_in(
        &self,
        tx: &mut (dyn Any + Send),
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<Published>, BrokerError> {
        let Some(conn) = tx.downcast_mut::<Connection>() else {
            return Err(BrokerError::Invalid(String::from(
                "publish_in on SQLite takes a `rusqlite::Connection` (stem::adapters::sqlite::rusqlite) open on the broker's file, inside BEGIN",
            )));
        };
        if conn.is_autocommit() {
            return Err(BrokerError::Invalid(String::from(
                "publish_in needs an open transaction: run BEGIN (or BEGIN IMMEDIATE) on the connection first, then COMMIT after",
            )));
        }
        let rows = envelopes
            .iter()
            .map(|e| self.prepare(e))
            .collect::<Result<Vec<_>, _>>()?;
        let adapter = self.shared.describe();
        insert_rows(conn, &self.ns, &adapter, &rows).map_err(|f| match f {
            Fail::Other(e) => e,
            Fail::Db(e) => BrokerError::Storage {
                adapter: adapter.clone(),
                reason: e.reason,
                source: e.cause,
            },
        })
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
            self.shared.check_file_for_fetch()?;
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

    async fn extend_leases(
        &self,
        receipts: &[Receipt],
        lease: Duration,
    ) -> Vec<Result<(), BrokerError>> {
        if receipts.is_empty() {
            return Vec::new();
        }
        let ns = self.ns.clone();
        let leases: Vec<Option<(i64, i64)>> = receipts.iter().map(lease_of).collect();
        let changed = self
            .write(move |c| {
                let mut st = c.prepare_cached(concat!(
                    "UPDATE stem_jobs SET state = ",
                    leased!(),
                    ", due_ms = ",
                    now_sql!(),
                    " + ?1 WHERE seq = ?2 AND ns = ?3 AND token = ?4 AND ",
                    lease_live!()
                ))?;
                let mut out = Vec::with_capacity(leases.len());
                for held in leases {
                    out.push(match held {
                        Some((seq, token)) => {
                            st.execute(params![ms_of(lease), seq, ns, token])? == 1
                        }
                        None => false,
                    });
                }
                Ok(out)
            })
            .await;
        answers(receipts.iter(), changed)
    }

    async fn settle(&self, batch: &[Settlement]) -> Vec<Result<(), BrokerError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        let mut records = false;
        let mut ready = false;
        let jobs: Vec<(TaskId, SettleJob)> = batch
            .iter()
            .map(|s| {
                let record = s.record.as_deref().and_then(|r| match SqliteBackend::encode(r) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::error!(task_id = %r.id, error = %e, "task record does not encode; settling without it");
                        None
                    }
                });
                records |= record.is_some();
                ready |= matches!(
                    s.disposition,
                    Disposition::Retry { after, .. } | Disposition::Release { after } if after.is_zero()
                );
                (
                    s.receipt.task_id,
                    SettleJob {
                        lease: lease_of(&s.receipt),
                        disposition: s.disposition.clone(),
                        record,
                    },
                )
            })
            .collect();
        let ns = self.ns.clone();
        let retention = ms_of(self.opts.dead_letter_retention);
        let clock = self.opts.clock;
        let done = self
            .write(move |c| {
                let mut out = Vec::with_capacity(jobs.len());
                let now = clock.now_ms();
                for (id, job) in &jobs {
                    let Some(lease) = job.lease else {
                        out.push(false);
                        continue;
                    };
                    let ok = settle_row(c, &ns, retention, *id, lease, &job.disposition)?;
                    if ok && let Some(rec) = &job.record {
                        upsert(c, &ns, rec, now)?;
                    }
                    out.push(ok);
                }
                Ok(out)
            })
            .await;
        if ready {
            self.shared.wake.signal(Kind::Jobs);
        }
        if records {
            self.shared.wake.signal(Kind::Results);
        }
        answers(batch.iter().map(|s| &s.receipt), done)
    }

    fn stores_results_of(&self, backend: &dyn ResultBackend) -> bool {
        backend
            .as_any()
            .and_then(|b| b.downcast_ref::<SqliteBackend>())
            .is_some_and(|b| Arc::ptr_eq(&b.shared, &self.shared) && b.ns == self.ns)
    }

    fn queues(&self) -> Option<&dyn QueueAdmin> {
        Some(self)
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetters> {
        Some(self)
    }

    fn broadcast(&self) -> Option<&dyn Broadcast> {
        Some(self)
    }

    async fn try_lead(&self, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let (ns, holder) = (self.ns.clone(), holder.to_owned());
        self.write(move |c| {
            let led: Option<String> = c
                .prepare_cached(concat!(
                    "INSERT INTO stem_leader (ns, holder, until_ms) VALUES (?1, ?2, ",
                    now_sql!(),
                    " + ?3) ON CONFLICT (ns) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
                     WHERE stem_leader.holder = excluded.holder OR stem_leader.until_ms <= ",
                    now_sql!(),
                    " RETURNING holder"
                ))?
                .query_row(params![ns, holder, ms_of(ttl)], |r| r.get(0))
                .optional()?;
            Ok(led.is_some())
        })
        .await
    }

    async fn maintain(&self) -> Result<(), BrokerError> {
        self.shared.check_file_now()?;
        let ns = self.ns.clone();
        self.write(move |c| {
            let now = db_now(c)?;
            c.prepare_cached("DELETE FROM stem_dead WHERE ns = ?1 AND expires_ms <= ?2")?
                .execute(params![ns, now])?;
            c.prepare_cached("DELETE FROM stem_unique WHERE ns = ?1 AND until_ms <= ?2")?
                .execute(params![ns, now])?;
            c.prepare_cached("DELETE FROM stem_broadcast WHERE ns = ?1 AND sent_ms <= ?2")?
                .execute(params![ns, now - BROADCAST_KEEP_MS])?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl QueueAdmin for SqliteBroker {
    async fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        let (ns, q) = (self.ns.clone(), queue.to_owned());
        // Ready rows are counted from the ready index alone; only the (few)
        // delayed and leased rows are read to compare their due time.
        let (ready, delayed, leased) = self
            .read(move |c| {
                let now = db_now(c)?;
                Ok(c.prepare_cached(concat!(
                    "SELECT (SELECT COUNT(*) FROM stem_jobs WHERE ns = ?2 AND queue = ?3 AND state = ",
                    ready!(),
                    ") + COALESCE(SUM(CASE WHEN due_ms <= ?1 THEN 1 ELSE 0 END), 0), \
                       COALESCE(SUM(CASE WHEN state = ",
                    delayed!(),
                    " AND due_ms > ?1 THEN 1 ELSE 0 END), 0), \
                       COALESCE(SUM(CASE WHEN state = ",
                    leased!(),
                    " AND due_ms > ?1 THEN 1 ELSE 0 END), 0) \
                     FROM stem_jobs WHERE ns = ?2 AND state > ",
                    ready!(),
                    " AND queue = ?3"
                ))?
                .query_row(params![now, ns, q], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?)
            })
            .await?;
        let dead = DeadLetters::count(self, queue).await?;
        Ok(QueueStats {
            ready: u64_of(ready),
            delayed: u64_of(delayed),
            leased: u64_of(leased),
            dead,
        })
    }

    async fn list(&self) -> Result<Vec<QueueSummary>, BrokerError> {
        let ns = self.ns.clone();
        // Three grouped counts in one read, each on an index: ready rows
        // from the ready index, delayed and leased rows (few) compared with
        // one `now`, live dead letters; merged by queue name.
        let rows = self
            .read(move |c| {
                let now = db_now(c)?;
                let mut by_queue: std::collections::BTreeMap<String, QueueStats> =
                    std::collections::BTreeMap::new();
                let mut ready = c.prepare_cached(concat!(
                    "SELECT queue, COUNT(*) FROM stem_jobs WHERE ns = ?1 AND state = ",
                    ready!(),
                    " GROUP BY queue"
                ))?;
                for row in ready.query_map(params![ns], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })? {
                    let (q, n) = row?;
                    by_queue.entry(q).or_default().ready += u64_of(n);
                }
                let mut later = c.prepare_cached(concat!(
                    "SELECT queue, COALESCE(SUM(CASE WHEN due_ms <= ?1 THEN 1 ELSE 0 END), 0), \
                       COALESCE(SUM(CASE WHEN state = ",
                    delayed!(),
                    " AND due_ms > ?1 THEN 1 ELSE 0 END), 0), \
                       COALESCE(SUM(CASE WHEN state = ",
                    leased!(),
                    " AND due_ms > ?1 THEN 1 ELSE 0 END), 0) \
                     FROM stem_jobs WHERE ns = ?2 AND state > ",
                    ready!(),
                    " GROUP BY queue"
                ))?;
                for row in later.query_map(params![now, ns], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })? {
                    let (q, due, delayed, leased) = row?;
                    let s = by_queue.entry(q).or_default();
                    s.ready += u64_of(due);
                    s.delayed += u64_of(delayed);
                    s.leased += u64_of(leased);
                }
                let mut dead = c.prepare_cached(
                    "SELECT queue, COUNT(*) FROM stem_dead WHERE ns = ?1 AND expires_ms > ?2 GROUP BY queue",
                )?;
                for row in dead.query_map(params![ns, now], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })? {
                    let (q, n) = row?;
                    by_queue.entry(q).or_default().dead += u64_of(n);
                }
                Ok(by_queue)
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter(|(_, stats)| !stats.is_empty())
            .map(|(queue, stats)| QueueSummary { queue, stats })
            .collect())
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let (ns, queue) = (self.ns.clone(), queue.to_owned());
        self.write(move |c| {
            let now = db_now(c)?;
            let mut removed: Vec<(String, Option<String>)> = Vec::new();
            {
                let mut ready = c.prepare_cached(concat!(
                    "DELETE FROM stem_jobs WHERE ns = ?1 AND queue = ?2 AND state = ",
                    ready!(),
                    " RETURNING id, unique_key"
                ))?;
                for row in ready.query_map(params![ns, queue], |r| Ok((r.get(0)?, r.get(1)?)))? {
                    removed.push(row?);
                }
                let mut later = c.prepare_cached(concat!(
                    "DELETE FROM stem_jobs WHERE ns = ?1 AND state > ",
                    ready!(),
                    " AND queue = ?2 AND (state = ",
                    delayed!(),
                    " OR due_ms <= ?3) RETURNING id, unique_key"
                ))?;
                for row in
                    later.query_map(params![ns, queue, now], |r| Ok((r.get(0)?, r.get(1)?)))?
                {
                    removed.push(row?);
                }
            }
            for (id, key) in &removed {
                if let Some(key) = key {
                    c.prepare_cached(RELEASE_UNIQUE)?
                        .execute(params![ns, key, id])?;
                }
            }
            Ok(removed.len() as u64)
        })
        .await
    }
}

#[async_trait]
impl DeadLetters for SqliteBroker {
    async fn list(
        &self,
        queue: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterPage, BrokerError> {
        let from: i64 = match cursor {
            None => 0,
            Some(c) => c.parse().map_err(|_| {
                BrokerError::Invalid(format!(
                    "dead-letter cursor `{c}` is not one this broker handed out; pass back `next` unchanged"
                ))
            })?,
        };
        let (ns, queue) = (self.ns.clone(), queue.to_owned());
        let want = i64::try_from(limit).unwrap_or(i64::MAX - 1);
        let mut rows: Vec<(i64, DeadLetter)> = self
            .read(move |c| {
                let mut st = c.prepare_cached(concat!(
                    "SELECT id, queue, reason, error, dead_ms, envelope, raw, seq FROM stem_dead \
                     WHERE ns = ?1 AND queue = ?2 AND seq >= ?3 AND expires_ms > ",
                    now_sql!(),
                    " ORDER BY seq LIMIT ?4"
                ))?;
                let rows = st.query_map(params![ns, queue, from, want.saturating_add(1)], |r| {
                    Ok((r.get(7)?, Self::dead_letter_of(r)?))
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?;
        let next = (rows.len() > limit).then(|| rows[limit].0.to_string());
        rows.truncate(limit);
        Ok(DeadLetterPage {
            items: rows.into_iter().map(|(_, d)| d).collect(),
            next,
        })
    }

    async fn get(&self, id: TaskId) -> Result<Option<DeadLetter>, BrokerError> {
        let (ns, id) = (self.ns.clone(), id.to_string());
        // No index on the task id (dead letters are few, and an index
        // would be one more b-tree written per dead letter): a scan of the
        // namespace's dead letters, inside SQLite, in one read.
        self.read(move |c| {
            let mut st = c.prepare_cached(concat!(
                "SELECT id, queue, reason, error, dead_ms, envelope, raw, seq FROM stem_dead \
                 WHERE ns = ?1 AND id = ?2 AND expires_ms > ",
                now_sql!(),
                " ORDER BY seq DESC LIMIT 1"
            ))?;
            Ok(st
                .query_row(params![ns, id], Self::dead_letter_of)
                .optional()?)
        })
        .await
    }

    async fn count(&self, queue: &str) -> Result<u64, BrokerError> {
        let (ns, queue) = (self.ns.clone(), queue.to_owned());
        self.read(move |c| {
            let n: i64 = c
                .prepare_cached(concat!(
                    "SELECT COUNT(*) FROM stem_dead WHERE ns = ?1 AND queue = ?2 AND expires_ms > ",
                    now_sql!()
                ))?
                .query_row(params![ns, queue], |r| r.get(0))?;
            Ok(u64_of(n))
        })
        .await
    }

    async fn replay(
        &self,
        queue: &str,
        which: Replay,
        reset_attempts: bool,
    ) -> Result<u64, BrokerError> {
        let (ns, queue) = (self.ns.clone(), queue.to_owned());
        let replayed = self
            .write(move |c| {
                let now = db_now(c)?;
                let rows: Vec<(i64, Option<Vec<u8>>)> = match which {
                    Replay::One(id) => c
                        .prepare_cached("SELECT seq, envelope FROM stem_dead WHERE ns = ?1 AND queue = ?2 AND id = ?3 AND expires_ms > ?4 ORDER BY seq")?
                        .query_map(params![ns, queue, id.to_string(), now], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?,
                    Replay::All => c
                        .prepare_cached("SELECT seq, envelope FROM stem_dead WHERE ns = ?1 AND queue = ?2 AND expires_ms > ?3 ORDER BY seq")?
                        .query_map(params![ns, queue, now], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?,
                };
                let mut replayed = 0u64;
                for (seq, envelope) in rows {
                    let Some(mut env) = envelope.and_then(|b| Envelope::decode(&b).ok()) else {
                        if let Replay::One(id) = which {
                            return Err(Fail::Other(BrokerError::Invalid(format!(
                                "dead letter {id} holds bytes that are not an envelope and cannot be replayed; inspect its `raw` text and purge it"
                            ))));
                        }
                        continue; // garbage stays dead: there is nothing to run
                    };
                    if reset_attempts {
                        env.attempt = 0;
                        env.last_error = None;
                    }
                    let payload = env.encode().map_err(|e| Fail::Other(e.into()))?;
                    // The unique key is taken again when it is free and its
                    // window still open, as at publish (B17).
                    let id_text = env.id.to_string();
                    let key = match &env.unique {
                        Some(u) if u.until.timestamp_millis() > now => {
                            let taken = c
                                .prepare_cached(
                                    "INSERT INTO stem_unique (ns, key, holder, until_ms) VALUES (?1, ?2, ?3, ?4) \
                                     ON CONFLICT (ns, key) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
                                     WHERE stem_unique.until_ms <= ?5 OR stem_unique.holder = excluded.holder",
                                )?
                                .execute(params![ns, u.key, id_text, u.until.timestamp_millis(), now])?;
                            (taken == 1).then(|| (u.key.clone(), u.release == UniqueRelease::OnFinish))
                        }
                        _ => None,
                    };
                    c.prepare_cached(concat!(
                        "INSERT INTO stem_jobs (ns, id, queue, priority, state, due_ms, unique_key, unique_on_finish, payload) VALUES (?1, ?2, ?3, ?4, ",
                        ready!(),
                        ", 0, ?5, ?6, ?7)"
                    ))?
                        .execute(params![
                            ns,
                            id_text,
                            env.queue,
                            i64::from(env.priority),
                            key.as_ref().map(|k| &k.0),
                            key.as_ref().is_some_and(|k| k.1),
                            payload
                        ])?;
                    c.prepare_cached("DELETE FROM stem_dead WHERE seq = ?1")?
                        .execute(params![seq])?;
                    replayed += 1;
                }
                Ok(replayed)
            })
            .await?;
        if replayed > 0 {
            self.shared.wake.signal(Kind::Jobs);
        }
        Ok(replayed)
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let (ns, queue) = (self.ns.clone(), queue.to_owned());
        self.write(move |c| {
            let n = c
                .prepare_cached("DELETE FROM stem_dead WHERE ns = ?1 AND queue = ?2")?
                .execute(params![ns, queue])?;
            Ok(n as u64)
        })
        .await
    }
}

#[async_trait]
impl Broadcast for SqliteBroker {
    async fn send(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        if channel.is_empty() {
            return Err(BrokerError::Invalid(String::from(
                "the broadcast channel name is empty",
            )));
        }
        let (ns, channel, payload) = (self.ns.clone(), channel.to_owned(), payload.to_owned());
        self.write(move |c| {
            c.prepare_cached(concat!(
                "INSERT INTO stem_broadcast (ns, channel, payload, sent_ms) VALUES (?1, ?2, ?3, ",
                now_sql!(),
                ")"
            ))?
            .execute(params![ns, channel, payload])?;
            Ok(())
        })
        .await?;
        self.shared.wake.signal(Kind::Broadcast);
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<BroadcastStream, BrokerError> {
        if channel.is_empty() {
            return Err(BrokerError::Invalid(String::from(
                "the broadcast channel name is empty",
            )));
        }
        let mut cursor: i64 = self
            .read(|c| {
                Ok(
                    c.prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM stem_broadcast")?
                        .query_row([], |r| r.get(0))?,
                )
            })
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<BroadcastMessage>(1024);
        let this = self.clone();
        let channel = channel.to_owned();
        let poll = self.opts.poll_interval;
        tokio::spawn(async move {
            while !tx.is_closed() {
                let notified = this.shared.wake.signals.broadcast.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let (ns, ch) = (this.ns.clone(), channel.clone());
                let rows = this
                    .read(move |c| {
                        let mut st = c.prepare_cached(
                            "SELECT seq, payload FROM stem_broadcast WHERE ns = ?1 AND channel = ?2 AND seq > ?3 ORDER BY seq",
                        )?;
                        let rows = st.query_map(params![ns, ch, cursor], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                        })?;
                        Ok(rows.collect::<Result<Vec<_>, _>>()?)
                    })
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
}

/// One answer per receipt from a batch of fenced writes.
fn answers<'a>(
    receipts: impl Iterator<Item = &'a Receipt>,
    done: Result<Vec<bool>, BrokerError>,
) -> Vec<Result<(), BrokerError>> {
    match done {
        Ok(done) => done
            .into_iter()
            .zip(receipts)
            .map(|(ok, r)| if ok { Ok(()) } else { Err(r.lost()) })
            .collect(),
        Err(e) => receipts.map(|_| Err(e.clone())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_split_into_powers_of_two_largest_first() {
        assert_eq!(power_of_two_pieces(13).collect::<Vec<_>>(), [8, 4, 1]);
        assert_eq!(power_of_two_pieces(32).collect::<Vec<_>>(), [32]);
        assert_eq!(power_of_two_pieces(0).count(), 0);
    }

    #[test]
    fn sql_literals_double_quotes() {
        assert_eq!(sql_literal("plain"), "'plain'");
        assert_eq!(sql_literal("it's"), "'it''s'");
    }

    /// Why the claim's namespace, queue and limit are literals: run again
    /// with a new lease deadline, the statement is not prepared again.
    #[test]
    fn a_claim_statement_is_not_prepared_again_when_rerun() {
        let mut c = Connection::open_in_memory().expect("database");
        super::super::schema::migrate(&mut c).expect("schema");
        for i in 0..20 {
            c.execute(
                INSERT_JOB,
                params![
                    "stem",
                    format!("id{i}"),
                    "q'x",
                    0,
                    0,
                    0,
                    None::<String>,
                    0,
                    b"{}".to_vec()
                ],
            )
            .expect("row");
        }
        let sql = claim_sql("stem", "q'x", 5);
        for lease in [1_000_i64, 2_000, 3_000] {
            let mut stmt = c.prepare_cached(&sql).expect("claim");
            let mut rows = stmt.query(params![lease]).expect("run");
            let mut n = 0;
            while rows.next().expect("row").is_some() {
                n += 1;
            }
            drop(rows);
            assert_eq!(n, 5);
            assert_eq!(
                stmt.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "re-prepared"
            );
        }
    }
}
