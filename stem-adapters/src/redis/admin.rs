//! Queue inspection and purge (B13) and dead-letter administration (B7):
//! bounded scripts, never a scan of an unbounded structure in one call.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use redis::Value;
use stem_core::broker::{
    DeadLetter, DeadLetterPage, DeadLetters, QueueAdmin, QueueStats, QueueSummary, Replay,
};
use stem_core::envelope::validate_queue_name;
use stem_core::{BrokerError, Envelope, TaskId, UniqueRelease};

use super::broker::RedisBroker;
use super::keys::escape;
use super::ms_of;
use super::scripts;
use super::wire;

/// Envelopes removed per purge call, and dead letters replayed per page.
const CHUNK: usize = 1000;

/// Queues counted at once by `list`: their scripts share the multiplexed
/// connection (pipelined), so a namespace of many queues costs about
/// `queues / LIST_IN_FLIGHT` round trips, not one per queue.
const LIST_IN_FLIGHT: usize = 32;

impl RedisBroker {
    fn queue_call<'a>(
        &self,
        script: &'a redis::Script,
        queue: &str,
    ) -> redis::ScriptInvocation<'a> {
        let keys = self.queue_keys(queue);
        let mut inv = script.prepare_invoke();
        for k in keys.all() {
            inv.key(k);
        }
        inv.arg(keys.unique_prefix());
        inv
    }

    async fn call(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        what: &str,
    ) -> Result<Value, BrokerError> {
        let mut c = self.conn.cmd();
        inv.invoke_async(&mut c)
            .await
            .map_err(|e| self.conn.broker_error(what, e))
    }

    fn retention_ms(&self) -> u64 {
        ms_of(self.opts.dead_letter_retention)
    }

    fn dead_letter_of(&self, queue: &str, id: &str, flat: &[Value]) -> DeadLetter {
        let get = |f: &str| {
            wire::field(flat, f)
                .and_then(wire::text)
                .unwrap_or_default()
        };
        let raw = wire::field(flat, "e")
            .and_then(wire::bytes)
            .unwrap_or_default();
        let garbage = get("g") == "1";
        let envelope = if garbage {
            None
        } else {
            Envelope::decode(raw).ok()
        };
        let task = get("i")
            .parse()
            .ok()
            .or_else(|| envelope.as_ref().map(|e| e.id));
        let error = Some(get("x")).filter(|x| !x.is_empty());
        let dead_at = wire::entry_ms(id)
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .unwrap_or_else(Utc::now);
        DeadLetter {
            id: task.unwrap_or_else(TaskId::new),
            queue: queue.to_owned(),
            reason: get("r"),
            error,
            dead_at,
            raw: if envelope.is_none() {
                Some(String::from_utf8_lossy(raw).into_owned())
            } else {
                None
            },
            envelope,
        }
    }

    /// Replays the dead entry `did` holding `flat`; `Ok(false)` when it is
    /// gone meanwhile, `Invalid` for bytes that are not an envelope.
    async fn replay_entry(
        &self,
        queue: &str,
        did: &str,
        flat: &[Value],
        reset_attempts: bool,
    ) -> Result<bool, BrokerError> {
        let dl = self.dead_letter_of(queue, did, flat);
        let Some(mut env) = dl.envelope else {
            return Err(BrokerError::Invalid(format!(
                "dead letter {} of queue `{queue}` is not an envelope (undecodable bytes) and cannot be replayed; inspect its raw bytes and purge it",
                dl.id
            )));
        };
        if reset_attempts {
            env.attempt = 0;
            env.last_error = None;
        }
        let payload = env.encode()?;
        let (u, window, o) = match &env.unique {
            Some(u) => (
                escape(&u.key),
                (u.until - self.opts.clock.now()).num_milliseconds(),
                u.release == UniqueRelease::OnFinish,
            ),
            None => (String::new(), 0, false),
        };
        let mut inv = self.queue_call(&scripts::REPLAY, queue);
        inv.arg(did)
            .arg(env.id.to_string())
            .arg(payload)
            .arg(env.priority.min(9))
            .arg(u)
            .arg(window)
            .arg(if o { "1" } else { "0" })
            .arg(self.retention_ms());
        let v = self.call(&inv, "replaying a dead letter").await?;
        Ok(wire::int(&v) == Some(1))
    }
}

#[async_trait]
impl QueueAdmin for RedisBroker {
    async fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        validate_queue_name(queue)?;
        let mut inv = self.queue_call(&scripts::STATS, queue);
        inv.arg(self.retention_ms());
        let v = self.call(&inv, "counting a queue").await?;
        let n: Vec<u64> = wire::array(&v)
            .unwrap_or_default()
            .iter()
            .map(|x| {
                wire::int(x)
                    .and_then(|i| u64::try_from(i).ok())
                    .unwrap_or(0)
            })
            .collect();
        if n.len() != 4 {
            return Err(self.conn.bad_reply("counting a queue", "not four counts"));
        }
        Ok(QueueStats {
            ready: n[0],
            delayed: n[1],
            leased: n[2],
            dead: n[3],
        })
    }

    async fn list(&self) -> Result<Vec<QueueSummary>, BrokerError> {
        // The namespace's queue set (every publish registers its queue;
        // never KEYS, never a SCAN of the key space), then each queue's
        // counts by the same script as `stats`, many in flight at once.
        let queues = self.all_queues().await?;
        let mut out: Vec<QueueSummary> = futures::stream::iter(queues)
            .map(|queue| async move {
                let stats = self.stats(&queue).await?;
                Ok::<_, BrokerError>(QueueSummary { queue, stats })
            })
            .buffer_unordered(LIST_IN_FLIGHT)
            .try_filter(|s| std::future::ready(!s.stats.is_empty()))
            .try_collect()
            .await?;
        out.sort_unstable_by(|a, b| a.queue.cmp(&b.queue));
        Ok(out)
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let before = self.stats(queue).await?;
        // Bounded by what was there when the purge began, so producers
        // publishing meanwhile cannot keep it going.
        let most = before.ready + before.delayed;
        let mut removed = 0;
        while removed < most {
            let mut inv = self.queue_call(&scripts::PURGE, queue);
            inv.arg(CHUNK);
            let v = self.call(&inv, "purging a queue").await?;
            let n = wire::int(&v)
                .and_then(|i| u64::try_from(i).ok())
                .unwrap_or(0);
            removed += n;
            if n < CHUNK as u64 {
                break;
            }
        }
        Ok(removed)
    }
}

#[async_trait]
impl DeadLetters for RedisBroker {
    async fn list(
        &self,
        queue: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterPage, BrokerError> {
        validate_queue_name(queue)?;
        if let Some(c) = cursor
            && (wire::entry_ms(c).is_none() || !c.contains('-'))
        {
            return Err(BrokerError::Invalid(format!(
                "`{c}` is not a dead-letter cursor: pass back the `next` of the previous page"
            )));
        }
        if limit == 0 {
            return Ok(DeadLetterPage::default());
        }
        let mut inv = self.queue_call(&scripts::DEAD_LIST, queue);
        inv.arg(self.retention_ms())
            .arg(cursor.unwrap_or(""))
            .arg(limit);
        let v = self.call(&inv, "listing dead letters").await?;
        let entries = wire::array(&v).unwrap_or_default();
        let mut items = Vec::new();
        let mut next = None;
        for (k, e) in entries.iter().enumerate() {
            let Some([id, flat]) = wire::array(e).and_then(|a| <&[Value; 2]>::try_from(a).ok())
            else {
                continue;
            };
            let id = wire::text(id).unwrap_or_default();
            if k == limit {
                break;
            }
            items.push(self.dead_letter_of(queue, &id, wire::array(flat).unwrap_or_default()));
            if k + 1 == limit && entries.len() > limit {
                next = Some(id);
            }
        }
        Ok(DeadLetterPage { items, next })
    }

    async fn count(&self, queue: &str) -> Result<u64, BrokerError> {
        Ok(self.stats(queue).await?.dead)
    }

    async fn get(&self, id: TaskId) -> Result<Option<DeadLetter>, BrokerError> {
        // Each queue's dead-letter index (task id -> entry) in the queue's
        // own slot: one script per queue of the namespace's queue set,
        // many in flight at once, as `QueueAdmin::list`.
        let task = id.to_string();
        let found: Vec<DeadLetter> = futures::stream::iter(self.all_queues().await?)
            .map(|queue| {
                let task = task.as_str();
                async move {
                    let mut inv = self.queue_call(&scripts::DEAD_GET, &queue);
                    inv.arg(self.retention_ms()).arg(task);
                    let v = self.call(&inv, "finding a dead letter").await?;
                    let entry = wire::array(&v)
                        .and_then(|a| a.first())
                        .and_then(wire::array)
                        .and_then(|e| <&[Value; 2]>::try_from(e).ok())
                        .map(|[did, flat]| {
                            let did = wire::text(did).unwrap_or_default();
                            self.dead_letter_of(&queue, &did, wire::array(flat).unwrap_or_default())
                        });
                    Ok::<_, BrokerError>(entry)
                }
            })
            .buffer_unordered(LIST_IN_FLIGHT)
            .try_filter_map(|d| std::future::ready(Ok(d)))
            .try_collect()
            .await?;
        // A task dead in two queues (published twice by hand): the newest.
        Ok(found.into_iter().max_by_key(|d| d.dead_at))
    }

    async fn replay(
        &self,
        queue: &str,
        which: Replay,
        reset_attempts: bool,
    ) -> Result<u64, BrokerError> {
        validate_queue_name(queue)?;
        let keys = self.queue_keys(queue);
        let mut c = self.conn.cmd();
        match which {
            Replay::One(id) => {
                let did: Option<String> = redis::cmd("HGET")
                    .arg(keys.dead_index())
                    .arg(id.to_string())
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.conn.broker_error("finding a dead letter", e))?;
                let Some(did) = did else { return Ok(0) };
                let v: Value = redis::cmd("XRANGE")
                    .arg(keys.dead())
                    .arg(&did)
                    .arg(&did)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.conn.broker_error("reading a dead letter", e))?;
                let Some(entry) = wire::array(&v)
                    .and_then(|a| a.first())
                    .and_then(wire::array)
                else {
                    return Ok(0);
                };
                let flat = entry.get(1).and_then(wire::array).unwrap_or_default();
                Ok(u64::from(
                    self.replay_entry(queue, &did, flat, reset_attempts).await?,
                ))
            }
            Replay::All => {
                let mut n = 0;
                let mut cursor: Option<String> = None;
                loop {
                    let page = {
                        let mut inv = self.queue_call(&scripts::DEAD_LIST, queue);
                        inv.arg(self.retention_ms())
                            .arg(cursor.as_deref().unwrap_or(""))
                            .arg(CHUNK);
                        self.call(&inv, "listing dead letters").await?
                    };
                    let entries = wire::array(&page).unwrap_or_default();
                    if entries.is_empty() {
                        break;
                    }
                    for e in entries {
                        let Some([id, flat]) =
                            wire::array(e).and_then(|a| <&[Value; 2]>::try_from(a).ok())
                        else {
                            continue;
                        };
                        let id = wire::text(id).unwrap_or_default();
                        let flat = wire::array(flat).unwrap_or_default();
                        cursor = Some(id.clone());
                        if wire::field(flat, "g").and_then(wire::text).as_deref() == Some("1") {
                            continue; // garbage stays (replay of all skips it)
                        }
                        match self.replay_entry(queue, &id, flat, reset_attempts).await {
                            Ok(true) => n += 1,
                            Ok(false) | Err(BrokerError::Invalid(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    if entries.len() <= CHUNK {
                        break;
                    }
                }
                Ok(n)
            }
        }
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let n = self.count(queue).await?;
        let keys = self.queue_keys(queue);
        let mut c = self.conn.cmd();
        redis::cmd("UNLINK")
            .arg(keys.dead())
            .arg(keys.dead_index())
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.conn.broker_error("purging dead letters", e))?;
        Ok(n)
    }
}
