//! The result backend (CONTRACT.md R1..R7) on Postgres: records, groups
//! and chords, heartbeats and revocations in the namespace's schema.
//!
//! | what | table | how |
//! |---|---|---|
//! | record | `results` (`state`, `terminal`, `attempts`, `expires_at`, `record` jsonb) | one `INSERT … ON CONFLICT DO UPDATE … WHERE <R1 rule>`; a terminal write sends `pg_notify(<schema>, 'r <id>')` in the same statement |
//! | group | `groups` (`members` uuid[], `callback` bytea, `fired`) | members read back `WITH ORDINALITY`; the chord fires in one `UPDATE … WHERE NOT fired AND <all members terminal>` |
//! | heartbeat | `workers` | upsert by `worker_id`; `alive` judged in SQL |
//! | revocation | `revoked` | upsert; many ids answered in one statement, in order |
//!
//! Every expiry and liveness is judged by the server's `now()`: the client
//! sends durations in milliseconds, never instants.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::AssertSqlSafe;
use stem_core::backend::{GroupSpec, GroupStatus, WorkerHeartbeat, WorkerStatus};
use stem_core::{BackendError, Cause, Envelope, ResultBackend, TaskId, TaskRecord};
use uuid::Uuid;

use super::client::Client;
use super::ms_of;
use super::schema::quote;

/// Longest TTL or interval sent to the server (100 years): `now()` plus
/// more overflows a timestamp.
const MAX_MS: i64 = 100 * 365 * 24 * 3600 * 1000;
/// Rows one housekeeping statement deletes at most.
const MAINTAIN_BATCH: i64 = 10_000;
/// Statements of one kind one `maintain` runs at most (so at most
/// 100,000 rows of each table per call; the next call goes on).
const MAINTAIN_ROUNDS: usize = 10;

/// The R1 monotonic rule ([`TaskRecord::may_replace`]) in SQL, for an
/// upsert into `results AS r` whose new row is `EXCLUDED`. An expired
/// record never blocks a write (R3).
const MAY_REPLACE: &str = "r.expires_at <= now() OR (NOT r.terminal \
     AND EXCLUDED.attempts >= r.attempts \
     AND (EXCLUDED.state <> 'pending' OR r.state = 'pending'))";

/// The upsert of records into `<q>.results AS r` from `source` (a
/// `VALUES` or `SELECT` giving `id, state, terminal, attempts, expires_at,
/// record`), returning `r.id, r.terminal` for each row written. The
/// broker's settle statement reuses it to write records where the lease
/// is held.
pub(crate) fn results_upsert(q: &str, source: &str) -> String {
    format!(
        "INSERT INTO {q}.results AS r (id, state, terminal, attempts, expires_at, record) {source} \
         ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, terminal = EXCLUDED.terminal, \
           attempts = EXCLUDED.attempts, expires_at = EXCLUDED.expires_at, record = EXCLUDED.record \
         WHERE {MAY_REPLACE} \
         RETURNING r.id, r.terminal"
    )
}

/// One record as the values the `results` columns take (`expires_at` as
/// the TTL in ms, added to the server's `now()` in SQL).
#[derive(Clone, Debug)]
pub(crate) struct RecordRow {
    pub(crate) id: Uuid,
    pub(crate) state: &'static str,
    pub(crate) terminal: bool,
    pub(crate) attempts: i32,
    pub(crate) ttl_ms: i64,
    /// The record's serde JSON, cast to `jsonb` in SQL.
    pub(crate) json: String,
}

/// Turns a record into its column values.
///
/// # Errors
/// [`BackendError::Invalid`] when the record does not encode, or holds a
/// NUL character (`\u0000`), which `jsonb` cannot store.
pub(crate) fn record_row(r: &TaskRecord) -> Result<RecordRow, BackendError> {
    let json = serde_json::to_string(r).map_err(|e| {
        BackendError::Invalid(format!("task record for {} does not encode: {e}", r.id))
    })?;
    if has_nul_escape(&json) {
        return Err(BackendError::Invalid(format!(
            "task record for {} holds a NUL character (\\u0000), which Postgres jsonb cannot store",
            r.id
        )));
    }
    Ok(RecordRow {
        id: *r.id.as_uuid(),
        state: r.state.name(),
        terminal: r.state.is_terminal(),
        attempts: i32::try_from(r.attempts).unwrap_or(i32::MAX),
        ttl_ms: ms_of(r.ttl).min(MAX_MS),
        json,
    })
}

/// Whether serde JSON text holds the escape `\u0000` (a backslash that is
/// itself escaped, `\\u0000`, does not count).
fn has_nul_escape(json: &str) -> bool {
    let b = json.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b[i + 1..].starts_with(b"u0000") {
                return true;
            }
            // Skip the escaped character, whatever it is.
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// The column arrays of many records, for `UNNEST($1::uuid[], $2::text[],
/// $3::bool[], $4::int4[], $5::int8[], $6::text[])`.
#[derive(Debug, Default)]
pub(crate) struct RecordColumns {
    pub(crate) ids: Vec<Uuid>,
    pub(crate) states: Vec<&'static str>,
    pub(crate) terminal: Vec<bool>,
    pub(crate) attempts: Vec<i32>,
    pub(crate) ttl_ms: Vec<i64>,
    pub(crate) json: Vec<String>,
}

impl RecordColumns {
    pub(crate) fn push(&mut self, r: RecordRow) {
        self.ids.push(r.id);
        self.states.push(r.state);
        self.terminal.push(r.terminal);
        self.attempts.push(r.attempts);
        self.ttl_ms.push(r.ttl_ms);
        self.json.push(r.json);
    }
}

/// Every statement of the backend, written once for one schema.
#[derive(Debug)]
struct Sql {
    store: String,
    store_many: String,
    get: String,
    create_group: String,
    group: String,
    finish: String,
    heartbeat: String,
    workers: String,
    revoke: String,
    revoked: String,
    forget: String,
    maintain: [String; 4],
}

impl Sql {
    fn new(schema: &str) -> Self {
        let q = quote(schema);
        // The notification of records written terminal; an uncorrelated
        // scalar subquery, so it runs once, when the first row is
        // projected (a SELECT CTE that nothing reads would not run).
        let notify = |channel: &str| {
            format!(
                ", n AS (SELECT pg_notify({channel}, 'r ' || id::text) FROM w WHERE terminal) \
                 SELECT w.id, (SELECT count(*) FROM n) AS notified FROM w"
            )
        };
        let store = format!(
            "WITH w AS ({}){}",
            results_upsert(
                &q,
                "VALUES ($1::uuid, $2::text, $3::bool, $4::int4, \
                 now() + $5::int8 * interval '1 millisecond', $6::text::jsonb)"
            ),
            notify("$7::text")
        );
        let store_many = format!(
            "WITH s AS (SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bool[], $4::int4[], $5::int8[], $6::text[]) \
               AS s(id, state, terminal, attempts, ttl_ms, record)), \
             w AS ({}){}",
            results_upsert(
                &q,
                "SELECT id, state, terminal, attempts, now() + ttl_ms * interval '1 millisecond', \
                 record::jsonb FROM s"
            ),
            notify("$7::text")
        );
        let terminal_members = format!(
            "NOT EXISTS (SELECT 1 FROM unnest(g.members) AS m(id) \
               LEFT JOIN {q}.results r ON r.id = m.id AND r.expires_at > now() \
               WHERE r.terminal IS NOT TRUE)"
        );
        Self {
            store,
            store_many,
            get: format!(
                "SELECT record::text FROM {q}.results WHERE id = $1::uuid AND expires_at > now()"
            ),
            // An existing group is kept (CONTRACT "Decided"), unless it
            // has expired: then it is gone for every reader, and a new one
            // takes its place.
            create_group: format!(
                "INSERT INTO {q}.groups AS g (id, members, callback, fired, expires_at) \
                 VALUES ($1::uuid, $2::uuid[], $3::bytea, false, now() + $4::int8 * interval '1 millisecond') \
                 ON CONFLICT (id) DO UPDATE SET members = EXCLUDED.members, callback = EXCLUDED.callback, \
                   fired = false, expires_at = EXCLUDED.expires_at \
                 WHERE g.expires_at <= now()"
            ),
            // One row per member in the order they were added; one row
            // with a NULL member for a group without members; none for an
            // unknown or expired group.
            group: format!(
                "SELECT m.id, r.record::text FROM {q}.groups g \
                 LEFT JOIN LATERAL unnest(g.members) WITH ORDINALITY AS m(id, ord) ON true \
                 LEFT JOIN {q}.results r ON r.id = m.id AND r.expires_at > now() \
                 WHERE g.id = $1::uuid AND g.expires_at > now() \
                 ORDER BY m.ord"
            ),
            // The row lock serialises finishers; a second one re-checks
            // `NOT g.fired` on the new row version and gets nothing.
            finish: format!(
                "UPDATE {q}.groups g SET fired = true \
                 WHERE g.id = $1::uuid AND NOT g.fired AND g.callback IS NOT NULL AND g.expires_at > now() \
                   AND {terminal_members} \
                 RETURNING g.callback"
            ),
            heartbeat: format!(
                "INSERT INTO {q}.workers (worker_id, seen_at, interval_ms, heartbeat) \
                 VALUES ($1::text, now(), $2::int8, $3::text::jsonb) \
                 ON CONFLICT (worker_id) DO UPDATE SET seen_at = now(), \
                   interval_ms = EXCLUDED.interval_ms, heartbeat = EXCLUDED.heartbeat"
            ),
            workers: format!(
                "SELECT heartbeat::text, seen_at > now() - 3 * interval_ms * interval '1 millisecond' \
                 FROM {q}.workers ORDER BY worker_id"
            ),
            revoke: format!(
                "INSERT INTO {q}.revoked (id, expires_at) \
                 VALUES ($1::uuid, now() + $2::int8 * interval '1 millisecond') \
                 ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at"
            ),
            forget: format!("DELETE FROM {q}.results WHERE id = ANY($1::uuid[])"),
            revoked: format!(
                "SELECT r.id IS NOT NULL FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, ord) \
                 LEFT JOIN {q}.revoked r ON r.id = u.id AND r.expires_at > now() \
                 ORDER BY u.ord"
            ),
            maintain: [
                format!(
                    "DELETE FROM {q}.results WHERE id IN \
                     (SELECT id FROM {q}.results WHERE expires_at <= now() LIMIT $1::int8)"
                ),
                format!(
                    "DELETE FROM {q}.groups WHERE id IN \
                     (SELECT id FROM {q}.groups WHERE expires_at <= now() LIMIT $1::int8)"
                ),
                format!(
                    "DELETE FROM {q}.revoked WHERE id IN \
                     (SELECT id FROM {q}.revoked WHERE expires_at <= now() LIMIT $1::int8)"
                ),
                // Workers silent for a day (or three of their intervals,
                // when longer) are forgotten.
                format!(
                    "DELETE FROM {q}.workers WHERE worker_id IN \
                     (SELECT worker_id FROM {q}.workers \
                      WHERE seen_at <= now() - greatest(interval '1 day', 3 * interval_ms * interval '1 millisecond') \
                      LIMIT $1::int8)"
                ),
            ],
        }
    }
}

/// The Postgres result backend: task records, groups and chords,
/// heartbeats and revocations in the namespace's schema (tables
/// `results`, `groups`, `workers`, `revoked`). Cheap to clone; clones
/// share the pool and the listener.
///
/// A record is one row whose `record` column is the record's JSON
/// (`jsonb`, so it can be queried); a write is one statement that applies
/// the monotonic rule of R1 in SQL. `wait` listens on the client's one
/// `LISTEN` connection for the record's terminal write and reads the row
/// again when told (or every `poll_interval` as a fallback), so ten
/// thousand waiters cost one connection and no polling.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use stem_adapters::postgres::{PostgresBackend, PostgresOptions};
/// use stem_core::{ResultBackend, TaskId, TaskRecord, TaskState};
/// let backend = PostgresBackend::connect("postgres://postgres@127.0.0.1:5432/test", PostgresOptions::default()).await?;
/// let id = TaskId::new();
/// backend.store(TaskRecord::new(id, TaskState::Revoked)).await?;
/// let rec = backend.wait(id, Duration::from_secs(1)).await?;
/// assert!(rec.is_some_and(|r| r.state.is_terminal()));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresBackend {
    pub(crate) client: Arc<Client>,
    sql: Arc<Sql>,
}

impl PostgresBackend {
    /// Connects to `url` (see [`parse_url`](super::parse_url) for the
    /// options it takes) and makes the namespace's schema ready.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use stem_adapters::postgres::{PostgresBackend, PostgresOptions};
    /// let backend = PostgresBackend::connect("postgres://postgres@127.0.0.1:5432/test?namespace=app", PostgresOptions::default()).await?;
    /// # let _ = backend; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// A bad URL, an unreachable server, or a schema of another namespace.
    pub async fn connect(
        url: &str,
        opts: super::PostgresOptions,
    ) -> Result<Self, stem_core::StemError> {
        Ok(Self::with_client(Client::connect(url, opts).await?))
    }

    /// Uses an existing pool (the application's own).
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use stem_adapters::postgres::{sqlx, PostgresBackend, PostgresOptions};
    /// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
    /// let backend = PostgresBackend::from_pool(pool, PostgresOptions::default()).await?;
    /// # let _ = backend; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// An unreachable server, or a schema of another namespace.
    pub async fn from_pool(
        pool: sqlx::PgPool,
        opts: super::PostgresOptions,
    ) -> Result<Self, stem_core::StemError> {
        Ok(Self::with_client(Client::from_pool(pool, opts).await?))
    }

    fn with_client(client: Arc<Client>) -> Self {
        let sql = Arc::new(Sql::new(&client.schema));
        Self { client, sql }
    }

    fn err(&self, what: &str, e: sqlx::Error) -> BackendError {
        self.client.backend_err(what, e)
    }

    /// Decodes a stored record of `id`.
    fn decode(id: TaskId, json: &str) -> Result<TaskRecord, BackendError> {
        let rec: TaskRecord = serde_json::from_str(json).map_err(|e| BackendError::Corrupt {
            task_id: id,
            reason: format!("the stored record does not decode: {e}"),
            source: Some(Cause::new(e)),
        })?;
        if rec.id != id {
            return Err(BackendError::Corrupt {
                task_id: id,
                reason: format!("the stored record belongs to task {}", rec.id),
                source: None,
            });
        }
        Ok(rec)
    }

    /// Stores one run of records with distinct ids in one statement;
    /// answers the ids written.
    async fn store_run<'c, E>(
        &self,
        exec: E,
        cols: RecordColumns,
    ) -> Result<HashSet<Uuid>, sqlx::Error>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(AssertSqlSafe(self.sql.store_many.as_str()))
            .bind(cols.ids)
            .bind(cols.states)
            .bind(cols.terminal)
            .bind(cols.attempts)
            .bind(cols.ttl_ms)
            .bind(cols.json)
            .bind(self.client.schema.as_str())
            .fetch_all(exec)
            .await?;
        Ok(rows.into_iter().map(|(id, _)| id).collect())
    }
}

#[async_trait]
impl ResultBackend for PostgresBackend {
    fn describe(&self) -> String {
        self.client.describe.clone()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn store(&self, record: TaskRecord) -> Result<bool, BackendError> {
        let r = record_row(&record)?;
        let row: Option<(Uuid, i64)> = sqlx::query_as(AssertSqlSafe(self.sql.store.as_str()))
            .bind(r.id)
            .bind(r.state)
            .bind(r.terminal)
            .bind(r.attempts)
            .bind(r.ttl_ms)
            .bind(r.json)
            .bind(self.client.schema.as_str())
            .fetch_optional(&self.client.pool)
            .await
            .map_err(|e| self.err("store", e))?;
        Ok(row.is_some())
    }

    async fn store_many(&self, records: Vec<TaskRecord>) -> Vec<Result<bool, BackendError>> {
        // Records that do not encode answer for themselves. The rest are
        // cut into runs without a repeated id (one statement cannot touch
        // a row twice), applied in order: one statement when nothing
        // repeats, else one transaction.
        let mut out: Vec<Option<Result<bool, BackendError>>> = Vec::with_capacity(records.len());
        let mut runs: Vec<RecordColumns> = vec![RecordColumns::default()];
        let mut seen = HashSet::new();
        for r in &records {
            match record_row(r) {
                Ok(row) => {
                    if !seen.insert(row.id) {
                        seen.clear();
                        seen.insert(row.id);
                        runs.push(RecordColumns::default());
                    }
                    if let Some(run) = runs.last_mut() {
                        run.push(row);
                    }
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        runs.retain(|r| !r.ids.is_empty());
        let sizes: Vec<usize> = runs.iter().map(|r| r.ids.len()).collect();
        let written: Result<Vec<HashSet<Uuid>>, sqlx::Error> = async {
            match runs.len() {
                0 => Ok(Vec::new()),
                1 => {
                    let run = runs.pop().unwrap_or_default();
                    Ok(vec![self.store_run(&self.client.pool, run).await?])
                }
                _ => {
                    let mut tx = self.client.pool.begin().await?;
                    let mut done = Vec::with_capacity(runs.len());
                    for run in runs {
                        done.push(self.store_run(&mut *tx, run).await?);
                    }
                    tx.commit().await?;
                    Ok(done)
                }
            }
        }
        .await;
        match written {
            Ok(sets) => {
                // Walk the runs in order, each answering for its records.
                let mut answers = Vec::with_capacity(records.len());
                for (set, size) in sets.iter().zip(&sizes) {
                    answers.extend(std::iter::repeat_n(set, *size));
                }
                let mut answers = answers.into_iter();
                let mut ids = records.iter().map(|r| *r.id.as_uuid());
                out.into_iter()
                    .map(|o| {
                        let id = ids.next();
                        o.unwrap_or_else(|| {
                            Ok(answers
                                .next()
                                .zip(id)
                                .is_some_and(|(set, id)| set.contains(&id)))
                        })
                    })
                    .collect()
            }
            Err(e) => {
                let e = self.err("store_many", e);
                out.into_iter()
                    .map(|o| o.unwrap_or_else(|| Err(e.clone())))
                    .collect()
            }
        }
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, BackendError> {
        let json: Option<String> = sqlx::query_scalar(AssertSqlSafe(self.sql.get.as_str()))
            .bind(id.as_uuid())
            .fetch_optional(&self.client.pool)
            .await
            .map_err(|e| self.err("get", e))?;
        json.map(|j| Self::decode(id, &j)).transpose()
    }

    async fn wait(
        &self,
        id: TaskId,
        timeout: Duration,
    ) -> Result<Option<TaskRecord>, BackendError> {
        let start = tokio::time::Instant::now();
        let deadline = start
            .checked_add(timeout)
            .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600));
        // Listening before the first read: a terminal write after it is
        // announced to this watch (and a listener reconnect bumps it too).
        let mut watch = self.client.hub.record(id).await;
        let mut listening = true;
        loop {
            watch.rx.borrow_and_update();
            let rec = self.get(id).await?;
            let now = tokio::time::Instant::now();
            if rec.as_ref().is_some_and(|r| r.state.is_terminal()) || now >= deadline {
                return Ok(rec);
            }
            // The fallback re-read, for a notification that never comes.
            let nap = tokio::time::sleep((deadline - now).min(self.client.opts.poll_interval));
            if listening {
                tokio::select! {
                    changed = watch.rx.changed() => listening = changed.is_ok(),
                    () = nap => {}
                }
            } else {
                nap.await;
            }
        }
    }

    async fn create_group(&self, group: GroupSpec) -> Result<(), BackendError> {
        let callback = group
            .callback
            .as_ref()
            .map(Envelope::encode)
            .transpose()
            .map_err(|e| {
                BackendError::Invalid(format!("chord callback of group {}: {e}", group.id))
            })?;
        let members: Vec<Uuid> = group.members.iter().map(|m| *m.as_uuid()).collect();
        let created = sqlx::query(AssertSqlSafe(self.sql.create_group.as_str()))
            .bind(group.id.as_uuid())
            .bind(members)
            .bind(callback)
            .bind(ms_of(group.ttl).min(MAX_MS))
            .execute(&self.client.pool)
            .await
            .map_err(|e| self.err("create_group", e))?;
        if created.rows_affected() == 0 {
            tracing::debug!(group = %group.id, "create_group: the group exists; kept as it is");
        }
        Ok(())
    }

    async fn group(&self, id: TaskId) -> Result<Option<GroupStatus>, BackendError> {
        let rows: Vec<(Option<Uuid>, Option<String>)> =
            sqlx::query_as(AssertSqlSafe(self.sql.group.as_str()))
                .bind(id.as_uuid())
                .fetch_all(&self.client.pool)
                .await
                .map_err(|e| self.err("group", e))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut members = Vec::with_capacity(rows.len());
        for (member, json) in rows {
            let Some(member) = member.map(TaskId::from_uuid) else {
                continue;
            };
            let rec = json.map(|j| Self::decode(member, &j)).transpose()?;
            members.push((member, rec));
        }
        let complete = members
            .iter()
            .all(|(_, r)| r.as_ref().is_some_and(|r| r.state.is_terminal()));
        Ok(Some(GroupStatus {
            id,
            members,
            complete,
        }))
    }

    async fn member_finished(&self, group_id: TaskId) -> Result<Option<Envelope>, BackendError> {
        let callback: Option<Option<Vec<u8>>> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.finish.as_str()))
                .bind(group_id.as_uuid())
                .fetch_optional(&self.client.pool)
                .await
                .map_err(|e| self.err("member_finished", e))?;
        callback
            .flatten()
            .map(|b| {
                Envelope::decode(&b).map_err(|e| BackendError::Corrupt {
                    task_id: group_id,
                    reason: format!("chord callback: {e}"),
                    source: Some(Cause::new(e)),
                })
            })
            .transpose()
    }

    async fn heartbeat(&self, heartbeat: WorkerHeartbeat) -> Result<(), BackendError> {
        let json = serde_json::to_string(&heartbeat).map_err(|e| {
            BackendError::Invalid(format!(
                "heartbeat of worker {} does not encode: {e}",
                heartbeat.worker_id
            ))
        })?;
        if has_nul_escape(&json) || heartbeat.worker_id.contains('\0') {
            return Err(BackendError::Invalid(format!(
                "heartbeat of worker {:?} holds a NUL character, which Postgres cannot store",
                heartbeat.worker_id
            )));
        }
        sqlx::query(AssertSqlSafe(self.sql.heartbeat.as_str()))
            .bind(heartbeat.worker_id.as_str())
            .bind(ms_of(heartbeat.interval).min(MAX_MS))
            .bind(json)
            .execute(&self.client.pool)
            .await
            .map_err(|e| self.err("heartbeat", e))?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerStatus>, BackendError> {
        let rows: Vec<(String, bool)> = sqlx::query_as(AssertSqlSafe(self.sql.workers.as_str()))
            .fetch_all(&self.client.pool)
            .await
            .map_err(|e| self.err("workers", e))?;
        let mut out = Vec::with_capacity(rows.len());
        for (json, alive) in rows {
            match serde_json::from_str::<WorkerHeartbeat>(&json) {
                Ok(heartbeat) => out.push(WorkerStatus { heartbeat, alive }),
                Err(e) => tracing::warn!(error = %e, "skipping an undecodable worker heartbeat"),
            }
        }
        Ok(out)
    }

    async fn revoke(&self, id: TaskId, ttl: Duration) -> Result<(), BackendError> {
        sqlx::query(AssertSqlSafe(self.sql.revoke.as_str()))
            .bind(id.as_uuid())
            .bind(ms_of(ttl).min(MAX_MS))
            .execute(&self.client.pool)
            .await
            .map_err(|e| self.err("revoke", e))?;
        Ok(())
    }

    async fn forget(&self, ids: &[TaskId]) -> Result<u64, BackendError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let uuids: Vec<Uuid> = ids.iter().map(|id| *id.as_uuid()).collect();
        let done = sqlx::query(AssertSqlSafe(self.sql.forget.as_str()))
            .bind(uuids)
            .execute(&self.client.pool)
            .await
            .map_err(|e| self.err("forget", e))?;
        Ok(done.rows_affected())
    }

    async fn revoked(&self, ids: &[TaskId]) -> Result<Vec<bool>, BackendError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let uuids: Vec<Uuid> = ids.iter().map(|id| *id.as_uuid()).collect();
        let hits: Vec<bool> = sqlx::query_scalar(AssertSqlSafe(self.sql.revoked.as_str()))
            .bind(uuids)
            .fetch_all(&self.client.pool)
            .await
            .map_err(|e| self.err("revoked", e))?;
        if hits.len() != ids.len() {
            return Err(BackendError::Storage {
                adapter: self.client.describe.clone(),
                reason: format!("revoked: {} answers for {} ids", hits.len(), ids.len()),
                source: None,
            });
        }
        Ok(hits)
    }

    async fn maintain(&self) -> Result<(), BackendError> {
        for sql in &self.sql.maintain {
            for _ in 0..MAINTAIN_ROUNDS {
                let done = sqlx::query(AssertSqlSafe(sql.as_str()))
                    .bind(MAINTAIN_BATCH)
                    .execute(&self.client.pool)
                    .await
                    .map_err(|e| self.err("maintain", e))?;
                if done.rows_affected() < u64::try_from(MAINTAIN_BATCH).unwrap_or(u64::MAX) {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stem_core::TaskState;

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not() {
        assert!(has_nul_escape(r#"{"a":"x\u0000y"}"#));
        assert!(!has_nul_escape(r#"{"a":"x\\u0000y"}"#));
        assert!(has_nul_escape(r#"{"a":"x\\\u0000y"}"#));
        assert!(!has_nul_escape(r#"{"a":"\u0001\n"}"#));
        let mut rec = TaskRecord::new(TaskId::new(), TaskState::Pending);
        rec.name = Some(String::from("a\0b"));
        assert!(matches!(record_row(&rec), Err(BackendError::Invalid(_))));
        rec.name = Some(String::from("a\\u0000b"));
        assert!(record_row(&rec).is_ok());
    }

    #[test]
    fn record_rows_carry_the_rule_columns() {
        let mut rec = TaskRecord::new(TaskId::new(), TaskState::Revoked);
        rec.attempts = 3;
        rec.ttl = Duration::MAX;
        let row = record_row(&rec).unwrap();
        assert_eq!(
            (row.state, row.terminal, row.attempts),
            ("revoked", true, 3)
        );
        assert_eq!(row.ttl_ms, MAX_MS);
        let back: TaskRecord = serde_json::from_str(&row.json).unwrap();
        assert_eq!(back.id, rec.id);
    }

    #[test]
    fn statements_name_the_quoted_schema() {
        let sql = Sql::new("stem_app");
        for s in [
            &sql.store,
            &sql.store_many,
            &sql.get,
            &sql.group,
            &sql.finish,
        ] {
            assert!(s.contains("\"stem_app\"."), "{s}");
        }
        assert!(sql.store.contains(MAY_REPLACE) && sql.store_many.contains(MAY_REPLACE));
    }
}
