//! [`RedisBackend`]: task records, groups and chords, heartbeats and
//! revocations in Redis (CONTRACT.md R1..R7).
//!
//! | what | key (see `keys.rs`) | how |
//! |---|---|---|
//! | record | `stem:{<ns>:r:<id>}` hash `s t a j`, PEXPIRE = the record's TTL | `backend_store.lua`: the monotonic rule and the write in one script; a terminal write publishes on the task's done channel |
//! | group | `stem:{<ns>:g:<gid>}:meta` / `:members` / `:done` | `backend_group_create.lua` (nothing if it exists), `backend_group_finish.lua` (fires once) |
//! | heartbeats | `stem:{<ns>}:workers` hash, `:seen` zset by server `TIME` | `backend_heartbeat.lua`, `backend_workers.lua`, `backend_maintain.lua` |
//! | revocations | `stem:{<ns>}:rv:<id>` string, PX = its TTL | `SET … PX`, one `MGET` |

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::{RedisError, RedisResult, Script, Value};
use stem_core::backend::{GroupSpec, GroupStatus, WorkerHeartbeat, WorkerStatus};
use stem_core::{BackendError, Cause, Envelope, ResultBackend, TaskId, TaskRecord};
use tokio::time::Instant;

use super::conn::Conn;
use super::keys::NsKeys;
use super::waiters::Waiters;
use super::{RedisOptions, ms_of};

static STORE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/backend_store.lua")));
static GROUP_CREATE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/backend_group_create.lua")));
static GROUP_FINISH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/backend_group_finish.lua")));
static HEARTBEAT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/backend_heartbeat.lua")));
static WORKERS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/backend_workers.lua")));
static MAINTAIN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/backend_maintain.lua")));

/// Items per pipeline, per `LRANGE` page and per script call on a list.
const CHUNK: usize = 1000;

/// Records per `backend_store.lua` call (standalone Redis).
const STORE_BATCH: usize = 500;
/// Longest TTL sent to Redis (100 years): `PEXPIRE` refuses one that
/// overflows its clock.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// Workers silent this long are forgotten by `maintain`.
const WORKER_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Most workers one `maintain` forgets (in calls of [`CHUNK`]).
const MAINTAIN_MAX_WORKERS: usize = 10 * CHUNK;
/// A waiter reads its record at least this often even without a message
/// (a lost message, a silently dead subscriber connection).
const RECHECK: Duration = Duration::from_secs(5);

/// A result backend on Redis: records, groups and chords, heartbeats and
/// revocations. Cheap to clone; clones share connections and waiters.
///
/// Every record has a slot of its own (`stem:{<ns>:r:<id>}`), so a cluster
/// spreads them; every transition is one script on that slot. `wait`
/// subscribes to the task's done channel on one subscriber connection per
/// client, shared by all its waiters, and never polls faster than every
/// 5 s.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use stem_adapters::redis::{RedisBackend, RedisOptions};
/// use stem_core::{ResultBackend, TaskId, TaskRecord, TaskState};
/// let backend = RedisBackend::connect("redis://127.0.0.1:6379/0", RedisOptions::default()).await?;
/// let id = TaskId::new();
/// backend.store(TaskRecord::new(id, TaskState::Revoked)).await?;
/// let rec = backend.wait(id, Duration::from_secs(1)).await?;
/// assert!(rec.is_some_and(|r| r.state.is_terminal()));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    conn: Arc<Conn>,
    keys: NsKeys,
    waiters: Arc<Waiters>,
    response_timeout: Duration,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("server", &self.conn.describe())
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// The `HMGET s j` reply of a record: its state name and its JSON.
type RecordFields = (Option<Vec<u8>>, Option<Vec<u8>>);

/// A record ready for the store script.
struct Encoded {
    key: String,
    channel: String,
    state: &'static str,
    terminal: bool,
    attempts: u32,
    json: Vec<u8>,
    ttl_ms: u64,
}

fn ttl_ms(d: Duration) -> u64 {
    ms_of(d).clamp(1, MAX_TTL_MS)
}

fn evalsha(script: &Script, keys: &[&str], args: &[&[u8]]) -> redis::Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(script.get_hash()).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    for a in args {
        c.arg(*a);
    }
    c
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

fn is_wrongtype(e: &RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
}

fn corrupt(task_id: TaskId, reason: impl Into<String>) -> BackendError {
    BackendError::Corrupt {
        task_id,
        reason: reason.into(),
        source: None,
    }
}

impl RedisBackend {
    /// Connects to Redis at `url` (`redis[s]://[user[:password]@]host[:port][/db][?option=value&…]`,
    /// see [`parse_url`](super::parse_url)); options in the URL override
    /// those in `opts`. Checks the server version (7.0 or newer).
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use stem_adapters::redis::{RedisBackend, RedisOptions};
    /// let backend = RedisBackend::connect("redis://127.0.0.1:6379/0?namespace=app", RedisOptions::default()).await?;
    /// # let _ = backend; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`BackendError::Invalid`] for a malformed URL or option,
    /// [`BackendError::Unavailable`] when Redis cannot be reached or is
    /// too old.
    pub async fn connect(url: &str, opts: RedisOptions) -> Result<Self, BackendError> {
        let (url, opts) =
            super::parse_url(url, opts).map_err(|e| BackendError::Invalid(e.to_string()))?;
        let conn = Conn::open(&url, &opts).await?;
        Ok(Self {
            waiters: Arc::new(Waiters::new(conn.clone(), opts.response_timeout)),
            keys: NsKeys::new(&opts.namespace),
            response_timeout: opts.response_timeout,
            conn,
        })
    }

    /// Deletes every key of `namespace` on the server this client is
    /// connected to (`SCAN` of the namespace's two patterns, on every
    /// primary of a cluster, `UNLINK` in batches); for test harnesses.
    /// Keys of other namespaces, `<ns>2` included, are untouched.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use stem_adapters::redis::{RedisBackend, RedisOptions};
    /// let backend = RedisBackend::connect("redis://127.0.0.1:6379", RedisOptions::default()).await?;
    /// backend.cleanup_namespace("kit_redis_r1_0000").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] or [`BackendError::Storage`] when a
    /// command fails.
    #[doc(hidden)]
    pub async fn cleanup_namespace(&self, namespace: &str) -> Result<(), BackendError> {
        self.conn
            .unlink_matching(&NsKeys::new(namespace).patterns())
            .await
            .map_err(|e| self.err("deleting the namespace's keys", e))?;
        Ok(())
    }

    fn err(&self, what: &str, e: RedisError) -> BackendError {
        self.conn.backend_error(what, e)
    }

    fn bad_reply(&self, what: &str, detail: impl std::fmt::Display) -> BackendError {
        BackendError::Storage {
            adapter: self.conn.describe().to_owned(),
            reason: format!("{what}: unexpected reply from Redis ({detail})"),
            source: None,
        }
    }

    fn encode(&self, record: &TaskRecord) -> Result<Encoded, BackendError> {
        let json = serde_json::to_vec(record).map_err(|e| {
            BackendError::Invalid(format!(
                "task record for {} does not encode as JSON: {e}",
                record.id
            ))
        })?;
        Ok(Encoded {
            key: self.keys.record(record.id),
            channel: self.keys.record_done(record.id),
            state: record.state.name(),
            terminal: record.state.is_terminal(),
            attempts: record.attempts,
            json,
            ttl_ms: ttl_ms(record.ttl),
        })
    }

    fn store_cmd(e: &Encoded) -> redis::Cmd {
        let attempts = e.attempts.to_string();
        let ttl = e.ttl_ms.to_string();
        evalsha(
            &STORE,
            &[&e.key],
            &[
                e.state.as_bytes(),
                if e.terminal { b"1" } else { b"0" },
                attempts.as_bytes(),
                &e.json,
                ttl.as_bytes(),
                e.channel.as_bytes(),
            ],
        )
    }

    /// Runs `cmds` (each an `EVALSHA` of `script`, on any slots) in
    /// chunks of [`CHUNK`] (see [`Conn::each`]), answers in order;
    /// commands refused with NOSCRIPT are sent again once after `SCRIPT
    /// LOAD` (they did not run; on a cluster the load goes to every node).
    /// A chunk that fails as a whole answers its error for each of its
    /// commands; the others keep their answers.
    async fn pipelined(&self, script: &Script, cmds: &[redis::Cmd]) -> Vec<RedisResult<Value>> {
        let mut out = Vec::with_capacity(cmds.len());
        for chunk in cmds.chunks(CHUNK) {
            match self.pipeline_chunk(script, chunk).await {
                Ok(got) => out.extend(got),
                Err(e) => out.extend(chunk.iter().map(|_| Err(e.clone()))),
            }
        }
        out
    }

    async fn pipeline_chunk(
        &self,
        script: &Script,
        chunk: &[redis::Cmd],
    ) -> Result<Vec<RedisResult<Value>>, RedisError> {
        let mut got = self.conn.each(chunk).await?;
        if got.iter().any(|r| r.as_ref().is_err_and(is_noscript)) {
            script.load_async(&mut self.conn.cmd()).await?;
            let again: Vec<usize> = (0..got.len())
                .filter(|i| got[*i].as_ref().is_err_and(is_noscript))
                .collect();
            let resend: Vec<redis::Cmd> = again.iter().map(|i| chunk[*i].clone()).collect();
            let retried = self.conn.each(&resend).await?;
            for (i, r) in again.into_iter().zip(retried) {
                got[i] = r;
            }
        }
        Ok(got)
    }

    /// Standalone Redis: `backend_store.lua` once per [`STORE_BATCH`]
    /// records, one answer per record in order (a failed call answers its
    /// error for each of its records).
    async fn store_batches(&self, encoded: &[Encoded]) -> Vec<RedisResult<Value>> {
        let mut out = Vec::with_capacity(encoded.len());
        for chunk in encoded.chunks(STORE_BATCH) {
            let mut inv = STORE.prepare_invoke();
            for e in chunk {
                inv.key(&e.key)
                    .arg(e.state.as_bytes())
                    .arg(if e.terminal { "1" } else { "0" })
                    .arg(e.attempts)
                    .arg(e.json.as_slice())
                    .arg(e.ttl_ms)
                    .arg(e.channel.as_bytes());
            }
            let mut con = self.conn.cmd();
            match inv.invoke_async::<Vec<Value>>(&mut con).await {
                Ok(answers) if answers.len() == chunk.len() => {
                    out.extend(answers.into_iter().map(Ok))
                }
                Ok(_) => out.extend(chunk.iter().map(|_| {
                    Err(RedisError::from((
                        redis::ErrorKind::Client,
                        "backend_store answered the wrong number of results",
                    )))
                })),
                Err(e) => out.extend(chunk.iter().map(|_| Err(e.clone()))),
            }
        }
        out
    }

    fn store_reply(&self, id: TaskId, r: RedisResult<Value>) -> Result<bool, BackendError> {
        // One record per call answers a one-element array.
        let r = r.map(|v| match v {
            Value::Array(mut a) if a.len() == 1 => a.swap_remove(0),
            other => other,
        });
        match r {
            Ok(Value::Int(1)) => Ok(true),
            Ok(Value::Int(0)) => Ok(false),
            Ok(Value::Int(-1)) => Err(corrupt(
                id,
                "the stored record is not one Stem wrote (wrong type or missing fields); nothing was written",
            )),
            Ok(other) => Err(self.bad_reply("store", format!("{other:?}"))),
            Err(e) => Err(self.err("store", e)),
        }
    }

    fn decode_record(id: TaskId, json: &[u8]) -> Result<TaskRecord, BackendError> {
        let rec: TaskRecord = serde_json::from_slice(json).map_err(|e| BackendError::Corrupt {
            task_id: id,
            reason: format!("the stored record does not decode: {e}"),
            source: Some(Cause::new(e)),
        })?;
        if rec.id != id {
            return Err(corrupt(
                id,
                format!("the stored record belongs to task {}", rec.id),
            ));
        }
        Ok(rec)
    }

    /// A record from its `HMGET s j` reply.
    fn record_from(id: TaskId, fields: RecordFields) -> Result<Option<TaskRecord>, BackendError> {
        match fields {
            (None, None) => Ok(None),
            (_, Some(json)) => Self::decode_record(id, &json).map(Some),
            (Some(_), None) => Err(corrupt(id, "the stored record has no JSON field `j`")),
        }
    }

    fn record_error(&self, id: TaskId, what: &str, e: RedisError) -> BackendError {
        if is_wrongtype(&e) {
            corrupt(id, format!("the record key holds another type: {e}"))
        } else {
            self.err(what, e)
        }
    }

    /// The records of `ids` (any slots), in order, pipelined (one command
    /// each on a cluster, see [`Conn::each`]).
    async fn records(&self, ids: &[TaskId]) -> Result<Vec<Option<TaskRecord>>, BackendError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let cmds: Vec<redis::Cmd> = chunk
                .iter()
                .map(|id| {
                    let mut c = redis::cmd("HMGET");
                    c.arg(self.keys.record(*id)).arg("s").arg("j");
                    c
                })
                .collect();
            let got = self
                .conn
                .each(&cmds)
                .await
                .map_err(|e| self.err("reading records", e))?;
            for (id, r) in chunk.iter().zip(got) {
                let fields: RecordFields = r
                    .and_then(|v| Ok(redis::from_redis_value(v)?))
                    .map_err(|e| self.record_error(*id, "reading a record", e))?;
                out.push(Self::record_from(*id, fields)?);
            }
        }
        Ok(out)
    }

    /// A group's meta fields (`n`, `fired`) and its member ids in order;
    /// `None` when unknown or expired.
    async fn read_group(
        &self,
        id: TaskId,
    ) -> Result<Option<(Option<String>, Vec<TaskId>)>, BackendError> {
        let [meta, members, _] = self.keys.group(id);
        let mut con = self.conn.cmd();
        let first: RedisResult<(i64, Option<String>, Vec<String>)> = redis::pipe()
            .cmd("EXISTS")
            .arg(&meta)
            .cmd("HGET")
            .arg(&meta)
            .arg("fired")
            .cmd("LRANGE")
            .arg(&members)
            .arg(0)
            .arg(CHUNK - 1)
            .query_async(&mut con)
            .await;
        let (exists, fired, mut page) = first.map_err(|e| {
            if is_wrongtype(&e) {
                corrupt(id, format!("a key of the group holds another type: {e}"))
            } else {
                self.err("reading a group", e)
            }
        })?;
        if exists == 0 {
            return Ok(None);
        }
        let mut ids = Vec::new();
        let mut start = 0;
        loop {
            let full = page.len() == CHUNK;
            for m in page {
                let mid: TaskId =
                    m.parse()
                        .map_err(|e: stem_core::EnvelopeError| BackendError::Corrupt {
                            task_id: id,
                            reason: format!("group member `{m}` is not a task id: {e}"),
                            source: Some(Cause::new(e)),
                        })?;
                ids.push(mid);
            }
            if !full {
                break;
            }
            start += CHUNK;
            page = redis::cmd("LRANGE")
                .arg(&members)
                .arg(start)
                .arg(start + CHUNK - 1)
                .query_async(&mut con)
                .await
                .map_err(|e| self.err("reading a group's members", e))?;
        }
        Ok(Some((fired, ids)))
    }

    /// One call of the finish script with `seen` (at most [`CHUNK`] ids).
    async fn finish(
        &self,
        group_id: TaskId,
        seen: &[String],
    ) -> Result<Option<Option<Envelope>>, BackendError> {
        let [meta, _, done] = self.keys.group(group_id);
        let mut con = self.conn.cmd();
        let reply: Value = GROUP_FINISH
            .key(&meta)
            .key(&done)
            .arg(seen)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err("member_finished", e))?;
        match reply {
            Value::Int(0) => Ok(None),
            Value::Int(-1) => Err(corrupt(
                group_id,
                "the group's meta hash is not one Stem wrote",
            )),
            Value::Array(v) => match v.as_slice() {
                [Value::Int(1)] => Ok(Some(None)),
                [Value::Int(1), Value::BulkString(cb)] => Envelope::decode(cb)
                    .map(|e| Some(Some(e)))
                    .map_err(|e| BackendError::Corrupt {
                        task_id: group_id,
                        reason: format!("chord callback: {e}"),
                        source: Some(Cause::new(e)),
                    }),
                other => Err(self.bad_reply("member_finished", format!("{other:?}"))),
            },
            other => Err(self.bad_reply("member_finished", format!("{other:?}"))),
        }
    }
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => bytes_of(other)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|f| f.is_finite())
            // Scores are whole milliseconds, far inside i64.
            .map(|f| f as i64),
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    fn describe(&self) -> String {
        self.conn.describe().to_owned()
    }

    async fn store(&self, record: TaskRecord) -> Result<bool, BackendError> {
        let id = record.id;
        let e = self.encode(&record)?;
        let attempts = e.attempts.to_string();
        let ttl = e.ttl_ms.to_string();
        let mut con = self.conn.cmd();
        let r: RedisResult<Value> = STORE
            .key(&e.key)
            .arg(e.state)
            .arg(if e.terminal { "1" } else { "0" })
            .arg(attempts)
            .arg(&e.json)
            .arg(ttl)
            .arg(&e.channel)
            .invoke_async(&mut con)
            .await;
        self.store_reply(id, r)
    }

    async fn store_many(&self, records: Vec<TaskRecord>) -> Vec<Result<bool, BackendError>> {
        // Records that do not encode answer for themselves; the rest share
        // one pipeline.
        let mut out: Vec<Option<Result<bool, BackendError>>> = Vec::with_capacity(records.len());
        let mut ids = Vec::with_capacity(records.len());
        let mut cmds = Vec::new();
        let mut encoded = Vec::with_capacity(records.len());
        for r in &records {
            match self.encode(r) {
                Ok(e) => {
                    if self.conn.is_cluster() {
                        cmds.push(Self::store_cmd(&e));
                    }
                    encoded.push(e);
                    ids.push(r.id);
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let answers = if self.conn.is_cluster() {
            self.pipelined(&STORE, &cmds).await
        } else {
            self.store_batches(&encoded).await
        };
        let mut replies = ids.into_iter().zip(answers);
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| match replies.next() {
                    Some((id, r)) => self.store_reply(id, r),
                    None => Err(self.bad_reply("store_many", "too few replies")),
                })
            })
            .collect()
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, BackendError> {
        let mut con = self.conn.cmd();
        let fields: RecordFields = redis::cmd("HMGET")
            .arg(self.keys.record(id))
            .arg("s")
            .arg("j")
            .query_async(&mut con)
            .await
            .map_err(|e| self.record_error(id, "get", e))?;
        Self::record_from(id, fields)
    }

    async fn wait(
        &self,
        id: TaskId,
        timeout: Duration,
    ) -> Result<Option<TaskRecord>, BackendError> {
        let start = Instant::now();
        let deadline = start
            .checked_add(timeout)
            .unwrap_or(start + RECHECK * 1_000_000);
        let mut waiter = self.waiters.join(self.keys.record_done(id));
        // Subscribed before the first read: a terminal write after it is
        // announced to us. Without a subscription (Redis unreachable) the
        // reads below still run, every RECHECK.
        let _ = waiter
            .subscribed(deadline.min(start + self.response_timeout))
            .await;
        loop {
            waiter.mark_seen();
            let rec = self.get(id).await?;
            let now = Instant::now();
            if rec.as_ref().is_some_and(|r| r.state.is_terminal()) || now >= deadline {
                return Ok(rec);
            }
            waiter.changed(deadline.min(now + RECHECK)).await;
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
        let distinct = group.members.iter().collect::<HashSet<_>>().len();
        let [meta, members, done] = self.keys.group(group.id);
        let mut inv = GROUP_CREATE.key(&meta);
        inv.key(&members)
            .key(&done)
            .arg(ttl_ms(group.ttl))
            .arg(distinct)
            .arg(if callback.is_some() { "1" } else { "0" })
            .arg(callback.as_deref().unwrap_or_default());
        for m in &group.members {
            inv.arg(m.to_string());
        }
        let mut con = self.conn.cmd();
        let created: i64 = inv
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err("create_group", e))?;
        if created == 0 {
            tracing::debug!(group = %group.id, "create_group: the group exists; kept as it is");
        }
        Ok(())
    }

    async fn group(&self, id: TaskId) -> Result<Option<GroupStatus>, BackendError> {
        let Some((_, ids)) = self.read_group(id).await? else {
            return Ok(None);
        };
        let records = self.records(&ids).await?;
        let members: Vec<(TaskId, Option<TaskRecord>)> = ids.into_iter().zip(records).collect();
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
        let Some((fired, ids)) = self.read_group(group_id).await? else {
            return Ok(None);
        };
        if fired.as_deref() == Some("1") {
            return Ok(None);
        }
        let [_, _, done] = self.keys.group(group_id);
        let mut con = self.conn.cmd();
        let done: HashSet<String> = redis::cmd("SMEMBERS")
            .arg(&done)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err("reading a group's done set", e))?;
        // The members not yet seen terminal, each once; a pipelined read of
        // their terminal flags (their records lie in other slots).
        let mut pending: Vec<TaskId> = Vec::new();
        let mut asked = HashSet::new();
        for m in ids {
            if !done.contains(&m.to_string()) && asked.insert(m) {
                pending.push(m);
            }
        }
        let mut seen = Vec::new();
        for chunk in pending.chunks(CHUNK) {
            let cmds: Vec<redis::Cmd> = chunk
                .iter()
                .map(|m| {
                    let mut c = redis::cmd("HGET");
                    c.arg(self.keys.record(*m)).arg("t");
                    c
                })
                .collect();
            let flags = self
                .conn
                .each(&cmds)
                .await
                .map_err(|e| self.err("reading members' states", e))?
                .into_iter()
                .map(|r| r.and_then(|v| Ok(redis::from_redis_value::<Option<String>>(v)?)))
                .collect::<RedisResult<Vec<_>>>()
                .map_err(|e| self.err("reading members' states", e))?;
            seen.extend(
                chunk
                    .iter()
                    .zip(flags)
                    .filter(|(_, t)| t.as_deref() == Some("1"))
                    .map(|(m, _)| m.to_string()),
            );
        }
        // The script records what was seen (later calls ask less) and
        // fires only when the done set holds every distinct member.
        let mut chunks = seen.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            return Ok(self.finish(group_id, &[]).await?.flatten());
        }
        for chunk in chunks {
            if let Some(fired) = self.finish(group_id, chunk).await? {
                return Ok(fired);
            }
        }
        Ok(None)
    }

    async fn heartbeat(&self, heartbeat: WorkerHeartbeat) -> Result<(), BackendError> {
        let json = serde_json::to_vec(&heartbeat).map_err(|e| {
            BackendError::Invalid(format!(
                "heartbeat of worker {} does not encode: {e}",
                heartbeat.worker_id
            ))
        })?;
        let mut con = self.conn.cmd();
        let _: i64 = HEARTBEAT
            .key(self.keys.workers())
            .key(self.keys.seen())
            .arg(&heartbeat.worker_id)
            .arg(json)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err("heartbeat", e))?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerStatus>, BackendError> {
        let mut con = self.conn.cmd();
        let reply: Value = WORKERS
            .key(self.keys.workers())
            .key(self.keys.seen())
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err("workers", e))?;
        let Value::Array(parts) = reply else {
            return Err(self.bad_reply("workers", format!("{reply:?}")));
        };
        let [now, Value::Array(beats), Value::Array(seen)] = parts.as_slice() else {
            return Err(self.bad_reply("workers", "expected {now, heartbeats, seen}"));
        };
        let now = int_of(now).ok_or_else(|| self.bad_reply("workers", "TIME is not a number"))?;
        let mut last_seen = std::collections::HashMap::with_capacity(seen.len() / 2);
        for pair in seen.chunks_exact(2) {
            if let (Some(id), Some(at)) = (bytes_of(&pair[0]), int_of(&pair[1])) {
                last_seen.insert(id.to_vec(), at);
            }
        }
        let mut out = Vec::with_capacity(beats.len() / 2);
        for pair in beats.chunks_exact(2) {
            let (Some(id), Some(json)) = (bytes_of(&pair[0]), bytes_of(&pair[1])) else {
                continue;
            };
            let Ok(heartbeat) = serde_json::from_slice::<WorkerHeartbeat>(json) else {
                tracing::warn!(
                    worker = %String::from_utf8_lossy(id),
                    "skipping an undecodable worker heartbeat"
                );
                continue;
            };
            // Alive: seen by Redis within 3 intervals, by Redis's clock.
            let limit =
                i64::try_from(ms_of(heartbeat.interval).saturating_mul(3)).unwrap_or(i64::MAX);
            let alive = last_seen
                .get(id)
                .is_some_and(|at| now.saturating_sub(*at) <= limit);
            out.push(WorkerStatus { heartbeat, alive });
        }
        out.sort_by(|a, b| a.heartbeat.worker_id.cmp(&b.heartbeat.worker_id));
        Ok(out)
    }

    async fn revoke(&self, id: TaskId, ttl: Duration) -> Result<(), BackendError> {
        let mut con = self.conn.cmd();
        let () = redis::cmd("SET")
            .arg(self.keys.revoked(id))
            .arg(1)
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async(&mut con)
            .await
            .map_err(|e| self.err("revoke", e))?;
        Ok(())
    }

    async fn forget(&self, ids: &[TaskId]) -> Result<u64, BackendError> {
        let mut forgotten = 0;
        for chunk in ids.chunks(CHUNK) {
            // One key per command: records of a cluster live in many slots.
            let cmds: Vec<redis::Cmd> = chunk
                .iter()
                .map(|id| {
                    let mut c = redis::cmd("DEL");
                    c.arg(self.keys.record(*id));
                    c
                })
                .collect();
            let got = self
                .conn
                .each(&cmds)
                .await
                .map_err(|e| self.err("forgetting records", e))?;
            for r in got {
                let n: u64 = r
                    .and_then(|v| Ok(redis::from_redis_value(v)?))
                    .map_err(|e| self.err("forgetting records", e))?;
                forgotten += n;
            }
        }
        Ok(forgotten)
    }

    async fn revoked(&self, ids: &[TaskId]) -> Result<Vec<bool>, BackendError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.revoked(*id)).collect();
        let mut con = self.conn.cmd();
        let hits: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err("revoked", e))?;
        if hits.len() != ids.len() {
            return Err(self.bad_reply("revoked", "MGET answered a different number of values"));
        }
        Ok(hits.into_iter().map(|h| h.is_some()).collect())
    }

    async fn maintain(&self) -> Result<(), BackendError> {
        // Records, groups and revocations expire by themselves (PEXPIRE,
        // PX); only heartbeats need forgetting.
        let mut con = self.conn.cmd();
        let mut dropped = 0;
        while dropped < MAINTAIN_MAX_WORKERS {
            let n: usize = MAINTAIN
                .key(self.keys.workers())
                .key(self.keys.seen())
                .arg(ms_of(WORKER_RETENTION))
                .arg(CHUNK)
                .invoke_async(&mut con)
                .await
                .map_err(|e| self.err("maintain", e))?;
            dropped += n;
            if n < CHUNK {
                break;
            }
        }
        if dropped > 0 {
            tracing::debug!(dropped, "maintain forgot workers silent for a day");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_clamped_to_what_pexpire_accepts() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(ttl_ms(Duration::MAX), MAX_TTL_MS);
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let id = TaskId::new();
        assert!(matches!(
            RedisBackend::record_from(id, (Some(b"started".to_vec()), Some(b"{not json".to_vec()))),
            Err(BackendError::Corrupt { .. })
        ));
        assert!(matches!(
            RedisBackend::record_from(id, (Some(b"started".to_vec()), None)),
            Err(BackendError::Corrupt { .. })
        ));
        assert!(matches!(
            RedisBackend::record_from(id, (None, None)),
            Ok(None)
        ));
        let other = TaskRecord::new(TaskId::new(), stem_core::TaskState::Pending);
        let json = serde_json::to_vec(&other).unwrap();
        assert!(matches!(
            RedisBackend::record_from(id, (Some(b"pending".to_vec()), Some(json))),
            Err(BackendError::Corrupt { .. })
        ));
    }
}
