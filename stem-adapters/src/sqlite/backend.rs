//! The SQLite result backend.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stem_core::backend::{GroupSpec, GroupStatus, WorkerHeartbeat, WorkerStatus};
use stem_core::{BackendError, Envelope, ResultBackend, TaskId, TaskRecord};

use super::shared::{self, Shared};
use super::wake::Kind;
use super::{SqliteOptions, ms_of, now_ms};

/// A result backend on a SQLite file.
#[derive(Clone)]
pub struct SqliteBackend {
    shared: Arc<Shared>,
    opts: SqliteOptions,
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
        let shared = shared::open(path.as_ref(), &opts).await?;
        Ok(Self { shared, opts })
    }

    fn err(&self, e: &sqlx::Error) -> BackendError {
        match self.shared.classify(e) {
            Ok((adapter, reason)) => BackendError::Storage { adapter, reason },
            Err((adapter, reason)) => BackendError::Unavailable { adapter, reason },
        }
    }

    fn encode(record: &TaskRecord) -> Result<Vec<u8>, BackendError> {
        serde_json::to_vec(record).map_err(|e| {
            BackendError::Invalid(format!(
                "task record for {} does not encode: {e}",
                record.id
            ))
        })
    }

    fn decode(id: TaskId, bytes: &[u8]) -> Result<TaskRecord, BackendError> {
        serde_json::from_slice(bytes).map_err(|e| BackendError::Corrupt {
            task_id: id,
            reason: e.to_string(),
        })
    }

    async fn upsert<'e, E>(
        &self,
        exec: E,
        record: &TaskRecord,
        now: i64,
    ) -> Result<bool, BackendError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
    {
        let bytes = Self::encode(record)?;
        let expires = record.expires_at().timestamp_millis();
        let done = sqlx::query(UPSERT)
            .bind(&self.opts.namespace)
            .bind(record.id.to_string())
            .bind(record.state.name())
            .bind(i64::from(record.state.is_terminal()))
            .bind(i64::from(record.attempts))
            .bind(expires)
            .bind(bytes)
            .bind(now)
            .execute(exec)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(done.rows_affected() == 1)
    }
}

#[async_trait]
impl ResultBackend for SqliteBackend {
    fn describe(&self) -> String {
        self.shared.describe()
    }

    async fn store(&self, record: TaskRecord) -> Result<bool, BackendError> {
        let written = self.upsert(&self.shared.pool, &record, now_ms()).await?;
        if written {
            self.shared.wake.signal(Kind::Results);
        }
        Ok(written)
    }

    async fn store_many(&self, records: Vec<TaskRecord>) -> Vec<Result<bool, BackendError>> {
        let now = now_ms();
        let mut tx = match self.shared.pool.begin_with("BEGIN IMMEDIATE").await {
            Ok(tx) => tx,
            Err(e) => {
                let e = self.err(&e);
                return records.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let mut out = Vec::with_capacity(records.len());
        for r in &records {
            out.push(self.upsert(&mut *tx, r, now).await);
        }
        if let Err(e) = tx.commit().await {
            let e = self.err(&e);
            return records.iter().map(|_| Err(e.clone())).collect();
        }
        self.shared.wake.signal(Kind::Results);
        out
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, BackendError> {
        let row: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT record FROM stem_results WHERE ns = ? AND id = ? AND expires_ms > ?",
        )
        .bind(&self.opts.namespace)
        .bind(id.to_string())
        .bind(now_ms())
        .fetch_optional(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))?;
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
        let callback = group
            .callback
            .as_ref()
            .map(Envelope::encode)
            .transpose()
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        sqlx::query("INSERT OR IGNORE INTO stem_groups (ns, id, members, callback, fired, expires_ms) VALUES (?, ?, ?, ?, 0, ?)")
            .bind(&self.opts.namespace)
            .bind(group.id.to_string())
            .bind(ids_json(&group.members))
            .bind(callback)
            .bind(now_ms().saturating_add(ms_of(group.ttl)))
            .execute(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }

    async fn group(&self, id: TaskId) -> Result<Option<GroupStatus>, BackendError> {
        let now = now_ms();
        let members: Option<String> = sqlx::query_scalar(
            "SELECT members FROM stem_groups WHERE ns = ? AND id = ? AND expires_ms > ?",
        )
        .bind(&self.opts.namespace)
        .bind(id.to_string())
        .bind(now)
        .fetch_optional(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))?;
        let Some(members) = members else {
            return Ok(None);
        };
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, record FROM stem_results WHERE ns = ? AND expires_ms > ? AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(&self.opts.namespace)
        .bind(now)
        .bind(&members)
        .fetch_all(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))?;
        let mut found: HashMap<String, Vec<u8>> = rows.into_iter().collect();
        let ids: Vec<String> =
            serde_json::from_str(&members).map_err(|e| BackendError::Corrupt {
                task_id: id,
                reason: e.to_string(),
            })?;
        let mut out = Vec::with_capacity(ids.len());
        for m in ids {
            let mid: TaskId =
                m.parse()
                    .map_err(|e: stem_core::EnvelopeError| BackendError::Corrupt {
                        task_id: id,
                        reason: e.to_string(),
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
        let now = now_ms();
        let mut tx = self
            .shared
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(&e))?;
        let row: Option<(String, Option<Vec<u8>>, i64)> = sqlx::query_as(
            "SELECT members, callback, fired FROM stem_groups WHERE ns = ? AND id = ? AND expires_ms > ?",
        )
        .bind(&self.opts.namespace)
        .bind(group_id.to_string())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.err(&e))?;
        let Some((members, callback, fired)) = row else {
            return Ok(None);
        };
        if fired != 0 {
            return Ok(None);
        }
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM json_each(?)")
            .bind(&members)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(&e))?;
        let done: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM stem_results WHERE ns = ? AND terminal = 1 AND expires_ms > ? AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(&self.opts.namespace)
        .bind(now)
        .bind(&members)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.err(&e))?;
        if done < total {
            return Ok(None);
        }
        sqlx::query("UPDATE stem_groups SET fired = 1 WHERE ns = ? AND id = ?")
            .bind(&self.opts.namespace)
            .bind(group_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(&e))?;
        tx.commit().await.map_err(|e| self.err(&e))?;
        callback
            .map(|b| {
                Envelope::decode(&b).map_err(|e| BackendError::Corrupt {
                    task_id: group_id,
                    reason: format!("chord callback: {e}"),
                })
            })
            .transpose()
    }

    async fn heartbeat(&self, heartbeat: WorkerHeartbeat) -> Result<(), BackendError> {
        let bytes =
            serde_json::to_vec(&heartbeat).map_err(|e| BackendError::Invalid(e.to_string()))?;
        sqlx::query("INSERT OR REPLACE INTO stem_workers (ns, worker_id, seen_ms, heartbeat) VALUES (?, ?, ?, ?)")
            .bind(&self.opts.namespace)
            .bind(&heartbeat.worker_id)
            .bind(now_ms())
            .bind(bytes)
            .execute(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerStatus>, BackendError> {
        let now = now_ms();
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seen_ms, heartbeat FROM stem_workers WHERE ns = ? ORDER BY worker_id",
        )
        .bind(&self.opts.namespace)
        .fetch_all(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))?;
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
        sqlx::query("INSERT OR REPLACE INTO stem_revoked (ns, id, expires_ms) VALUES (?, ?, ?)")
            .bind(&self.opts.namespace)
            .bind(id.to_string())
            .bind(now_ms().saturating_add(ms_of(ttl)))
            .execute(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }

    async fn revoked(&self, ids: &[TaskId]) -> Result<Vec<bool>, BackendError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let hits: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM stem_revoked WHERE ns = ? AND expires_ms > ? AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(&self.opts.namespace)
        .bind(now_ms())
        .bind(ids_json(ids))
        .fetch_all(&self.shared.pool)
        .await
        .map_err(|e| self.err(&e))?;
        let set: HashSet<String> = hits.into_iter().collect();
        Ok(ids.iter().map(|id| set.contains(&id.to_string())).collect())
    }

    async fn maintain(&self) -> Result<(), BackendError> {
        let now = now_ms();
        for sql in [
            "DELETE FROM stem_results WHERE ns = ? AND expires_ms <= ?",
            "DELETE FROM stem_groups WHERE ns = ? AND expires_ms <= ?",
            "DELETE FROM stem_revoked WHERE ns = ? AND expires_ms <= ?",
        ] {
            sqlx::query(sql)
                .bind(&self.opts.namespace)
                .bind(now)
                .execute(&self.shared.pool)
                .await
                .map_err(|e| self.err(&e))?;
        }
        // Workers silent for a day are forgotten.
        sqlx::query("DELETE FROM stem_workers WHERE ns = ? AND seen_ms <= ?")
            .bind(&self.opts.namespace)
            .bind(now - 24 * 3600 * 1000)
            .execute(&self.shared.pool)
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }
}
