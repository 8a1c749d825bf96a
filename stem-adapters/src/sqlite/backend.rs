//! The SQLite result backend. Writes run on the file's writer thread,
//! grouped with the broker's (a worker's acks and results often share one
//! commit); reads run on reader connections.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use stem_core::backend::{GroupSpec, GroupStatus, WorkerHeartbeat, WorkerStatus};
use stem_core::{BackendError, Cause, Envelope, ResultBackend, TaskId, TaskRecord};

use super::db::Fail;
use super::shared::{self, Shared};
use super::wake::Kind;
use super::{SqliteOptions, ms_of};

/// A result backend on a SQLite file.
#[derive(Clone)]
pub struct SqliteBackend {
    pub(crate) shared: Arc<Shared>,
    opts: SqliteOptions,
    pub(crate) ns: Arc<str>,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.shared.path)
            .field("namespace", &self.opts.namespace)
            .finish_non_exhaustive()
    }
}

const UPSERT: &str = "INSERT INTO stem_results (ns, id, state, terminal, attempts, expires_ms, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
    ON CONFLICT (ns, id) DO UPDATE SET state = excluded.state, terminal = excluded.terminal, attempts = excluded.attempts, \
      expires_ms = excluded.expires_ms, record = excluded.record \
    WHERE stem_results.expires_ms <= ?8 OR (stem_results.terminal = 0 AND excluded.attempts >= stem_results.attempts \
      AND (excluded.state <> 'pending' OR stem_results.state = 'pending'))";

fn ids_json(ids: &[TaskId]) -> String {
    let v: Vec<String> = ids.iter().map(ToString::to_string).collect();
    serde_json::to_string(&v).unwrap_or_else(|_| String::from("[]"))
}

/// A record ready to write: encoded before it reaches the writer thread.
pub(crate) struct Encoded {
    id: String,
    state: &'static str,
    terminal: bool,
    attempts: u32,
    expires_ms: i64,
    bytes: Vec<u8>,
}

pub(crate) fn upsert(c: &Connection, ns: &str, r: &Encoded, now: i64) -> rusqlite::Result<bool> {
    let n = c.prepare_cached(UPSERT)?.execute(params![
        ns,
        r.id,
        r.state,
        i64::from(r.terminal),
        i64::from(r.attempts),
        r.expires_ms,
        r.bytes,
        now
    ])?;
    Ok(n == 1)
}

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use stem_adapters::sqlite::{SqliteBackend, SqliteOptions};
    /// use stem_core::{ResultBackend, TaskId, TaskRecord, TaskState};
    /// let dir = tempfile::tempdir()?;
    /// let backend = SqliteBackend::open(dir.path().join("r.db"), SqliteOptions::default()).await?;
    /// let id = TaskId::new();
    /// backend.store(TaskRecord::new(id, TaskState::Revoked)).await?;
    /// assert!(backend.get(id).await?.unwrap().state.is_terminal());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] when the file cannot be opened.
    pub async fn open(path: impl AsRef<Path>, opts: SqliteOptions) -> Result<Self, BackendError> {
        Self::open_with(path.as_ref(), opts, shared::Sharing::Process).await
    }

    /// Opens the database with connections of its own instead of the set
    /// every client of the file in this process shares: the client a second
    /// process would have (see [`SqliteBroker::open_unshared`](super::SqliteBroker::open_unshared)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use stem_adapters::sqlite::{SqliteBackend, SqliteOptions};
    /// use stem_core::{ResultBackend, TaskId, TaskRecord, TaskState};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("r.db");
    /// let one = SqliteBackend::open(&path, SqliteOptions::default()).await?;
    /// let other = SqliteBackend::open_unshared(&path, SqliteOptions::default()).await?;
    /// let id = TaskId::new();
    /// one.store(TaskRecord::new(id, TaskState::Revoked)).await?;
    /// assert!(other.get(id).await?.is_some());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] when the file cannot be opened.
    pub async fn open_unshared(
        path: impl AsRef<Path>,
        opts: SqliteOptions,
    ) -> Result<Self, BackendError> {
        Self::open_with(path.as_ref(), opts, shared::Sharing::Own).await
    }

    async fn open_with(
        path: &Path,
        opts: SqliteOptions,
        sharing: shared::Sharing,
    ) -> Result<Self, BackendError> {
        let shared = shared::open(path, &opts, sharing).await?;
        Ok(Self {
            shared,
            ns: Arc::from(opts.namespace.as_str()),
            opts,
        })
    }

    fn fail(&self, f: Fail<BackendError>) -> BackendError {
        match f {
            Fail::Other(e) => e,
            Fail::Db(e) => match self.shared.classify(&e) {
                Ok((adapter, reason, source)) => BackendError::Storage {
                    adapter,
                    reason,
                    source,
                },
                Err((adapter, reason, source)) => BackendError::Unavailable {
                    adapter,
                    reason,
                    source,
                },
            },
        }
    }

    async fn write<F, T>(&self, f: F) -> Result<T, BackendError>
    where
        F: FnOnce(&Connection) -> Result<T, Fail<BackendError>> + Send + 'static,
        T: Send + 'static,
    {
        self.shared.db.write(f).await.map_err(|e| self.fail(e))
    }

    async fn read<F, T>(&self, f: F) -> Result<T, BackendError>
    where
        F: FnOnce(&Connection) -> Result<T, Fail<BackendError>> + Send + 'static,
        T: Send + 'static,
    {
        self.shared.db.read(f).await.map_err(|e| self.fail(e))
    }

    pub(crate) fn encode(record: &TaskRecord) -> Result<Encoded, BackendError> {
        let bytes = serde_json::to_vec(record).map_err(|e| {
            BackendError::Invalid(format!(
                "task record for {} does not encode: {e}",
                record.id
            ))
        })?;
        Ok(Encoded {
            id: record.id.to_string(),
            state: record.state.name(),
            terminal: record.state.is_terminal(),
            attempts: record.attempts,
            expires_ms: record.expires_at().timestamp_millis(),
            bytes,
        })
    }

    fn decode(id: TaskId, bytes: &[u8]) -> Result<TaskRecord, BackendError> {
        serde_json::from_slice(bytes).map_err(|e| BackendError::Corrupt {
            task_id: id,
            reason: e.to_string(),
            source: Some(Cause::new(e)),
        })
    }
}

#[async_trait]
impl ResultBackend for SqliteBackend {
    fn describe(&self) -> String {
        self.shared.describe()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn store(&self, record: TaskRecord) -> Result<bool, BackendError> {
        let clock = self.opts.clock;
        let rec = Self::encode(&record)?;
        let ns = self.ns.clone();
        let written = self
            .write(move |c| Ok(upsert(c, &ns, &rec, clock.now_ms())?))
            .await?;
        if written {
            self.shared.wake.signal(Kind::Results);
        }
        Ok(written)
    }

    async fn store_many(&self, records: Vec<TaskRecord>) -> Vec<Result<bool, BackendError>> {
        let clock = self.opts.clock;
        // Records that do not encode answer for themselves; the rest share
        // one write.
        let mut out: Vec<Option<Result<bool, BackendError>>> = Vec::with_capacity(records.len());
        let mut encoded = Vec::with_capacity(records.len());
        for r in &records {
            match Self::encode(r) {
                Ok(e) => {
                    encoded.push(e);
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let ns = self.ns.clone();
        let written = self
            .write(move |c| {
                let now = clock.now_ms();
                let mut done = Vec::with_capacity(encoded.len());
                for r in &encoded {
                    done.push(upsert(c, &ns, r, now)?);
                }
                Ok(done)
            })
            .await;
        match written {
            Ok(done) => {
                self.shared.wake.signal(Kind::Results);
                let mut done = done.into_iter();
                out.into_iter()
                    .map(|o| o.unwrap_or_else(|| Ok(done.next().unwrap_or(false))))
                    .collect()
            }
            Err(e) => out
                .into_iter()
                .map(|o| o.unwrap_or_else(|| Err(e.clone())))
                .collect(),
        }
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, BackendError> {
        let clock = self.opts.clock;
        let ns = self.ns.clone();
        let row: Option<Vec<u8>> = self
            .read(move |c| {
                Ok(c.prepare_cached(
                    "SELECT record FROM stem_results WHERE ns = ?1 AND id = ?2 AND expires_ms > ?3",
                )?
                .query_row(params![ns, id.to_string(), clock.now_ms()], |r| r.get(0))
                .optional()?)
            })
            .await?;
        row.map(|b| Self::decode(id, &b)).transpose()
    }

    async fn wait(
        &self,
        id: TaskId,
        timeout: Duration,
    ) -> Result<Option<TaskRecord>, BackendError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.wake.signals.results.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let rec = self.get(id).await?;
            let now = tokio::time::Instant::now();
            if rec.as_ref().is_some_and(|r| r.state.is_terminal()) || now >= deadline {
                return Ok(rec);
            }
            let nap = (deadline - now).min(self.opts.poll_interval);
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    async fn create_group(&self, group: GroupSpec) -> Result<(), BackendError> {
        let clock = self.opts.clock;
        let callback = group
            .callback
            .as_ref()
            .map(Envelope::encode)
            .transpose()
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        let ns = self.ns.clone();
        let (id, members) = (group.id.to_string(), ids_json(&group.members));
        let expires = clock.now_ms().saturating_add(ms_of(group.ttl));
        self.write(move |c| {
            c.prepare_cached("INSERT OR IGNORE INTO stem_groups (ns, id, members, callback, fired, expires_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5)")?
                .execute(params![ns, id, members, callback, expires])?;
            Ok(())
        })
        .await
    }

    async fn group(&self, id: TaskId) -> Result<Option<GroupStatus>, BackendError> {
        let clock = self.opts.clock;
        let ns = self.ns.clone();
        let found = self
            .read(move |c| {
                let now = clock.now_ms();
                let members: Option<String> = c
                    .prepare_cached(
                        "SELECT members FROM stem_groups WHERE ns = ?1 AND id = ?2 AND expires_ms > ?3",
                    )?
                    .query_row(params![ns, id.to_string(), now], |r| r.get(0))
                    .optional()?;
                let Some(members) = members else {
                    return Ok(None);
                };
                let mut st = c.prepare_cached(
                    "SELECT id, record FROM stem_results WHERE ns = ?1 AND expires_ms > ?2 AND id IN (SELECT value FROM json_each(?3))",
                )?;
                let rows = st.query_map(params![ns, now, members], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?;
                let found: HashMap<String, Vec<u8>> = rows.collect::<Result<_, _>>()?;
                Ok(Some((members, found)))
            })
            .await?;
        let Some((members, mut found)) = found else {
            return Ok(None);
        };
        let ids: Vec<String> =
            serde_json::from_str(&members).map_err(|e| BackendError::Corrupt {
                task_id: id,
                reason: e.to_string(),
                source: Some(Cause::new(e)),
            })?;
        let mut out = Vec::with_capacity(ids.len());
        for m in ids {
            let mid: TaskId =
                m.parse()
                    .map_err(|e: stem_core::EnvelopeError| BackendError::Corrupt {
                        task_id: id,
                        reason: e.to_string(),
                        source: Some(Cause::new(e)),
                    })?;
            let rec = found
                .remove(&m)
                .map(|b| Self::decode(mid, &b))
                .transpose()?;
            out.push((mid, rec));
        }
        let complete = out
            .iter()
            .all(|(_, r)| r.as_ref().is_some_and(|r| r.state.is_terminal()));
        Ok(Some(GroupStatus {
            id,
            members: out,
            complete,
        }))
    }

    async fn member_finished(&self, group_id: TaskId) -> Result<Option<Envelope>, BackendError> {
        let clock = self.opts.clock;
        let ns = self.ns.clone();
        let callback = self
            .write(move |c| {
                let now = clock.now_ms();
                let gid = group_id.to_string();
                let row: Option<(String, Option<Vec<u8>>, i64)> = c
                    .prepare_cached(
                        "SELECT members, callback, fired FROM stem_groups WHERE ns = ?1 AND id = ?2 AND expires_ms > ?3",
                    )?
                    .query_row(params![ns, gid, now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?;
                let Some((members, callback, fired)) = row else {
                    return Ok(None);
                };
                if fired != 0 {
                    return Ok(None);
                }
                let total: i64 = c
                    .prepare_cached("SELECT COUNT(*) FROM json_each(?1)")?
                    .query_row(params![members], |r| r.get(0))?;
                let done: i64 = c
                    .prepare_cached(
                        "SELECT COUNT(*) FROM stem_results WHERE ns = ?1 AND terminal = 1 AND expires_ms > ?2 AND id IN (SELECT value FROM json_each(?3))",
                    )?
                    .query_row(params![ns, now, members], |r| r.get(0))?;
                if done < total {
                    return Ok(None);
                }
                c.prepare_cached("UPDATE stem_groups SET fired = 1 WHERE ns = ?1 AND id = ?2")?
                    .execute(params![ns, gid])?;
                Ok(callback)
            })
            .await?;
        callback
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
        let clock = self.opts.clock;
        let bytes =
            serde_json::to_vec(&heartbeat).map_err(|e| BackendError::Invalid(e.to_string()))?;
        let ns = self.ns.clone();
        let worker = heartbeat.worker_id.clone();
        self.write(move |c| {
            c.prepare_cached("INSERT OR REPLACE INTO stem_workers (ns, worker_id, seen_ms, heartbeat) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![ns, worker, clock.now_ms(), bytes])?;
            Ok(())
        })
        .await
    }

    async fn workers(&self) -> Result<Vec<WorkerStatus>, BackendError> {
        let clock = self.opts.clock;
        let ns = self.ns.clone();
        let rows: Vec<(i64, Vec<u8>)> = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT seen_ms, heartbeat FROM stem_workers WHERE ns = ?1 ORDER BY worker_id",
                )?;
                let rows = st.query_map(params![ns], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await?;
        let now = clock.now_ms();
        let mut out = Vec::with_capacity(rows.len());
        for (seen, bytes) in rows {
            let Ok(heartbeat) = serde_json::from_slice::<WorkerHeartbeat>(&bytes) else {
                tracing::warn!("skipping an undecodable worker heartbeat");
                continue;
            };
            let alive = now - seen <= ms_of(heartbeat.interval).saturating_mul(3);
            out.push(WorkerStatus { heartbeat, alive });
        }
        Ok(out)
    }

    async fn revoke(&self, id: TaskId, ttl: Duration) -> Result<(), BackendError> {
        let clock = self.opts.clock;
        let ns = self.ns.clone();
        let expires = clock.now_ms().saturating_add(ms_of(ttl));
        self.write(move |c| {
            c.prepare_cached(
                "INSERT OR REPLACE INTO stem_revoked (ns, id, expires_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![ns, id.to_string(), expires])?;
            Ok(())
        })
        .await
    }

    async fn forget(&self, ids: &[TaskId]) -> Result<u64, BackendError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ns = self.ns.clone();
        let json = ids_json(ids);
        self.write(move |c| {
            let n = c
                .prepare_cached(
                    "DELETE FROM stem_results WHERE ns = ?1 AND id IN (SELECT value FROM json_each(?2))",
                )?
                .execute(params![ns, json])?;
            Ok(n as u64)
        })
        .await
    }

    async fn revoked(&self, ids: &[TaskId]) -> Result<Vec<bool>, BackendError> {
        let clock = self.opts.clock;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ns = self.ns.clone();
        let json = ids_json(ids);
        let hits: HashSet<String> = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT id FROM stem_revoked WHERE ns = ?1 AND expires_ms > ?2 AND id IN (SELECT value FROM json_each(?3))",
                )?;
                let rows = st.query_map(params![ns, clock.now_ms(), json], |r| r.get::<_, String>(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await?;
        if hits.is_empty() {
            return Ok(vec![false; ids.len()]);
        }
        Ok(ids
            .iter()
            .map(|id| hits.contains(&id.to_string()))
            .collect())
    }

    async fn maintain(&self) -> Result<(), BackendError> {
        let clock = self.opts.clock;
        let ns = self.ns.clone();
        self.write(move |c| {
            let now = clock.now_ms();
            for sql in [
                "DELETE FROM stem_results WHERE ns = ?1 AND expires_ms <= ?2",
                "DELETE FROM stem_groups WHERE ns = ?1 AND expires_ms <= ?2",
                "DELETE FROM stem_revoked WHERE ns = ?1 AND expires_ms <= ?2",
            ] {
                c.prepare_cached(sql)?.execute(params![ns, now])?;
            }
            // Workers silent for a day are forgotten.
            c.prepare_cached("DELETE FROM stem_workers WHERE ns = ?1 AND seen_ms <= ?2")?
                .execute(params![ns, now - 24 * 3600 * 1000])?;
            Ok(())
        })
        .await
    }
}
