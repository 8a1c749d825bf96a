//! Queue counts and purge (B13), dead letters: list, count, replay, purge
//! (B7).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Connection};
use stem_core::broker::{
    DeadLetterPage, DeadLetters, QueueAdmin, QueueStats, QueueSummary, Replay,
};
use stem_core::envelope::validate_queue_name;
use stem_core::{BrokerError, DeadLetter, Envelope, TaskId};
use uuid::Uuid;

use super::broker::PostgresBroker;

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A row of `dead` as listed.
type DeadRow = (
    i64,
    Uuid,
    String,
    Option<String>,
    DateTime<Utc>,
    Option<Vec<u8>>,
    Option<String>,
    i32,
    Option<String>,
);

/// The envelope stored with a dead letter, with the attempts and error
/// the row counted (the bytes are never rewritten).
fn envelope_of(bytes: Option<&[u8]>, attempt: i32, last_error: Option<String>) -> Option<Envelope> {
    let mut env = Envelope::decode(bytes?).ok()?;
    env.attempt = u32::try_from(attempt).unwrap_or(0);
    env.last_error = last_error;
    Some(env)
}

#[async_trait]
impl QueueAdmin for PostgresBroker {
    async fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        validate_queue_name(queue)?;
        let c = &self.client;
        let (ready, delayed, leased, dead): (i64, i64, i64, i64) =
            sqlx::query_as(AssertSqlSafe(c.sql.stats.clone()))
                .bind(queue)
                .fetch_one(&c.pool)
                .await
                .map_err(|e| c.broker_err("count a queue", e))?;
        Ok(QueueStats {
            ready: u64_of(ready),
            delayed: u64_of(delayed),
            leased: u64_of(leased),
            dead: u64_of(dead),
        })
    }

    async fn list(&self) -> Result<Vec<QueueSummary>, BrokerError> {
        let c = &self.client;
        let rows: Vec<(String, i64, i64, i64, i64)> =
            sqlx::query_as(AssertSqlSafe(c.sql.queues.clone()))
                .fetch_all(&c.pool)
                .await
                .map_err(|e| c.broker_err("list queues", e))?;
        let mut out: Vec<QueueSummary> = rows
            .into_iter()
            .map(|(queue, ready, delayed, leased, dead)| QueueSummary {
                queue,
                stats: QueueStats {
                    ready: u64_of(ready),
                    delayed: u64_of(delayed),
                    leased: u64_of(leased),
                    dead: u64_of(dead),
                },
            })
            .filter(|s| !s.stats.is_empty())
            .collect();
        // By bytes, as every adapter sorts (the server's collation may not).
        out.sort_unstable_by(|a, b| a.queue.cmp(&b.queue));
        Ok(out)
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        validate_queue_name(queue)?;
        let c = &self.client;
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(c.sql.purge.clone()))
            .bind(queue)
            .fetch_one(&c.pool)
            .await
            .map_err(|e| c.broker_err("purge a queue", e))?;
        Ok(u64_of(n))
    }
}

#[async_trait]
impl DeadLetters for PostgresBroker {
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
        let c = &self.client;
        let want = i64::try_from(limit).unwrap_or(i64::MAX - 1);
        let rows: Vec<DeadRow> = sqlx::query_as(AssertSqlSafe(c.sql.dead_list.clone()))
            .bind(queue)
            .bind(from)
            .bind(want.saturating_add(1))
            .fetch_all(&c.pool)
            .await
            .map_err(|e| c.broker_err("list dead letters", e))?;
        let next = rows.get(limit).map(|r| r.0.to_string());
        let items = rows
            .into_iter()
            .take(limit)
            .map(
                |(_, task_id, reason, error, dead_at, bytes, raw, attempt, last_error)| {
                    DeadLetter {
                        id: TaskId::from_uuid(task_id),
                        queue: queue.to_owned(),
                        reason,
                        error,
                        dead_at,
                        envelope: envelope_of(bytes.as_deref(), attempt, last_error),
                        raw,
                    }
                },
            )
            .collect();
        Ok(DeadLetterPage { items, next })
    }

    async fn get(&self, id: TaskId) -> Result<Option<DeadLetter>, BrokerError> {
        let c = &self.client;
        let row: Option<(
            i64,
            Uuid,
            String,
            Option<String>,
            DateTime<Utc>,
            Option<Vec<u8>>,
            Option<String>,
            i32,
            Option<String>,
            String,
        )> = sqlx::query_as(AssertSqlSafe(c.sql.dead_get.clone()))
            .bind(id.as_uuid())
            .fetch_optional(&c.pool)
            .await
            .map_err(|e| c.broker_err("find a dead letter", e))?;
        Ok(row.map(
            |(_, task_id, reason, error, dead_at, bytes, raw, attempt, last_error, queue)| {
                DeadLetter {
                    id: TaskId::from_uuid(task_id),
                    queue,
                    reason,
                    error,
                    dead_at,
                    envelope: envelope_of(bytes.as_deref(), attempt, last_error),
                    raw,
                }
            },
        ))
    }

    async fn count(&self, queue: &str) -> Result<u64, BrokerError> {
        let c = &self.client;
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(c.sql.dead_count.clone()))
            .bind(queue)
            .fetch_one(&c.pool)
            .await
            .map_err(|e| c.broker_err("count dead letters", e))?;
        Ok(u64_of(n))
    }

    async fn replay(
        &self,
        queue: &str,
        which: Replay,
        reset_attempts: bool,
    ) -> Result<u64, BrokerError> {
        validate_queue_name(queue)?;
        let c = &self.client;
        let err = |e| c.broker_err("replay dead letters", e);
        let mut conn = c.pool.acquire().await.map_err(err)?;
        let mut tx = conn.begin().await.map_err(err)?;
        let one = match which {
            Replay::One(id) => Some(*id.as_uuid()),
            Replay::All => None,
        };
        #[allow(clippy::type_complexity)]
        let rows: Vec<(
            i64,
            Uuid,
            Option<Vec<u8>>,
            i32,
            Option<String>,
            Option<String>,
            bool,
        )> = sqlx::query_as(AssertSqlSafe(c.sql.dead_take.clone()))
            .bind(queue)
            .bind(one)
            .bind(one.is_some())
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        let mut replayed = 0u64;
        for (_, task_id, bytes, attempt, last_error, _, _) in rows {
            let Some(env) = envelope_of(bytes.as_deref(), attempt, last_error) else {
                // Only a named replay takes garbage out: refuse it (the
                // transaction rolls back and it stays dead).
                return Err(BrokerError::Invalid(format!(
                    "dead letter {task_id} holds bytes that are not an envelope and cannot be replayed; inspect its `raw` text and purge it"
                )));
            };
            let (attempt, last_error) = if reset_attempts {
                (0, None)
            } else {
                (
                    i32::try_from(env.attempt).unwrap_or(i32::MAX),
                    env.last_error.clone(),
                )
            };
            // The unique key is taken again when it is free and its window
            // still open, as at publish (B17).
            let key = match &env.unique {
                Some(u) if u.until > Utc::now() => {
                    let took: Option<Uuid> =
                        sqlx::query_scalar(AssertSqlSafe(c.sql.take_key.clone()))
                            .bind(&u.key)
                            .bind(env.id.as_uuid())
                            .bind(u.until)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(err)?;
                    took.map(|_| {
                        (
                            u.key.clone(),
                            u.release == stem_core::envelope::UniqueRelease::OnFinish,
                        )
                    })
                }
                _ => None,
            };
            let bytes = bytes.unwrap_or_default();
            sqlx::query(AssertSqlSafe(c.sql.replay_insert.clone()))
                .bind(queue)
                .bind(i16::from(env.priority))
                .bind(env.id.as_uuid())
                .bind(bytes)
                .bind(attempt)
                .bind(last_error)
                .bind(key.as_ref().map(|k| k.0.as_str()))
                .bind(key.as_ref().is_some_and(|k| k.1))
                .execute(&mut *tx)
                .await
                .map_err(err)?;
            replayed += 1;
        }
        if replayed > 0 {
            sqlx::query("SELECT pg_notify($1, 'j ' || $2)")
                .bind(&c.schema)
                .bind(queue)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await.map_err(err)?;
        Ok(replayed)
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let c = &self.client;
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(c.sql.dead_purge.clone()))
            .bind(queue)
            .fetch_one(&c.pool)
            .await
            .map_err(|e| c.broker_err("purge dead letters", e))?;
        Ok(u64_of(n))
    }
}
