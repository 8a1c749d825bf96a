//! Connections to Redis: a small pool of reconnecting multiplexed
//! connections for commands, dedicated connections for blocking reads, the
//! checks made at connect, and how a Redis error becomes a Stem error.
//!
//! # Cluster mode (`?cluster=true`)
//! Commands and scripts go through a pool of
//! [`ClusterConnection`]s, which route each command by its key's slot and
//! follow `MOVED`/`ASK` themselves (response timeout as standalone). Every
//! command and script Stem sends touches one slot (see `keys.rs`); the
//! few reads that span slots (a group's member records) are sent one
//! command each, concurrently ([`Conn::each`]), never as one pipeline.
//!
//! Blocking reads cannot share a multiplexed connection (Redis answers a
//! connection's commands in order, so a second `XREAD BLOCK` would wait
//! behind the first), so each gets a plain connection of its own to the
//! node that owns its key's slot ([`Conn::blocker`]): the slot is computed
//! here (`keys::slot`), its node found in a cached `CLUSTER SLOTS` map,
//! and the map dropped and asked again after any failed read (`MOVED`
//! after a resharding, a node that went away). Spare blocking connections
//! are kept per node.
//!
//! The result waiters' subscriber is a plain connection to one node,
//! rotating over the primaries on each reconnect: a classic `PUBLISH` on
//! any node reaches every node over the cluster bus (see `waiters.rs`).
//! Whole-keyspace work (`SCAN` for namespace deletion, the `INFO` checks
//! at connect) runs on every primary ([`Conn::nodes`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};
use stem_core::error::Cause;
use stem_core::url::redact;
use stem_core::{BackendError, BrokerError};

use super::RedisOptions;
use super::keys;

/// Oldest server accepted: 7.0 has what the scripts need (XAUTOCLAIM's
/// deleted ids, `XADD … MINID`, exclusive `XRANGE` ranges, effect
/// replication so `TIME` is safe in a script).
const MIN_MAJOR: u32 = 7;

/// How long establishing one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Spare blocking connections kept for the next wait (per node on a
/// cluster).
const SPARE_BLOCKERS: usize = 16;

/// Keys per `UNLINK` when a namespace is deleted.
const UNLINK_BATCH: usize = 500;

/// A node's address as the cluster announces it (`CLUSTER SLOTS`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Node {
    host: String,
    port: u16,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// One row of the slot map: slots `start..=end` are served by `node`.
#[derive(Clone, Debug)]
struct SlotRange {
    start: u16,
    end: u16,
    node: Node,
}

/// What the commands run on.
enum Mode {
    Single {
        client: redis::Client,
        pool: Vec<ConnectionManager>,
    },
    Cluster(Cluster),
}

struct Cluster {
    pool: Vec<ClusterConnection>,
    /// The first seed's settings (credentials, TLS, protocol): connections
    /// to single nodes are this with another address.
    template: ConnectionInfo,
    seeds: Vec<Node>,
    /// The slot map, asked on first use and again after a failed read.
    slots: Mutex<Option<Arc<[SlotRange]>>>,
    /// Where the next subscriber connection goes (rotates on reconnect).
    next_node: AtomicUsize,
}

/// The connections of one client.
pub(crate) struct Conn {
    mode: Mode,
    next: AtomicUsize,
    /// Spare blocking connections by node (`None`: the standalone server).
    blockers: Mutex<HashMap<Option<Node>, Vec<MultiplexedConnection>>>,
    /// `redis <url, password redacted>`, for logs and errors.
    describe: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

/// A command connection: a cheap clone of a pooled multiplexed one, or of
/// a cluster connection that routes by slot.
#[derive(Clone)]
pub(crate) enum CmdConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for CmdConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection of its own for one blocking read, and the node it is on.
pub(crate) struct Blocker {
    pub(crate) conn: MultiplexedConnection,
    node: Option<Node>,
}

fn no_timeout_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None)
}

/// `template`'s address with `node`'s host and port (TLS settings kept).
fn addr_of(template: &ConnectionAddr, node: &Node) -> ConnectionAddr {
    match template {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(node.host.clone(), node.port),
    }
}

fn client_error(reason: &'static str) -> RedisError {
    RedisError::from((ErrorKind::Client, reason))
}

/// A `host:port` seed (checked by `parse_url`).
fn seed_node(s: &str) -> Option<Node> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| Node {
        host: host.to_owned(),
        port,
    })
}

/// Parses a `CLUSTER SLOTS` reply; a node announced without a host is
/// at `fallback_host` (the one asked).
fn parse_slots(v: &Value, fallback_host: &str) -> Option<Vec<SlotRange>> {
    let Value::Array(rows) = v else { return None };
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Value::Array(parts) = row else {
            return None;
        };
        let (start, end) = (int(parts.first()?)?, int(parts.get(1)?)?);
        let Value::Array(primary) = parts.get(2)? else {
            return None;
        };
        let host = match primary.first()? {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let host = if host.is_empty() || host == "?" {
            fallback_host.to_owned()
        } else {
            host
        };
        let port = int(primary.get(1)?)?;
        out.push(SlotRange {
            start,
            end,
            node: Node { host, port },
        });
    }
    Some(out)
}

impl Conn {
    /// Connects to `url` (options already stripped) and checks the server
    /// (every primary on a cluster).
    pub(crate) async fn open(url: &str, opts: &RedisOptions) -> Result<Arc<Self>, ConnectError> {
        if url.starts_with("rediss://") {
            // Redis builds its rustls config with the process's default
            // provider; install ring unless something else already did.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let describe = if opts.cluster {
            format!("redis cluster {}", redact(url))
        } else {
            format!("redis {}", redact(url))
        };
        let bad_url = |e: RedisError| ConnectError {
            describe: describe.clone(),
            reason: format!(
                "the URL is not a Redis URL: {}",
                e.detail().unwrap_or("bad URL")
            ),
            source: Some(Cause::new(e)),
        };
        let cannot = |e: RedisError| ConnectError {
            describe: describe.clone(),
            reason: format!("cannot connect: {e}"),
            source: Some(Cause::new(e)),
        };
        let mode = if opts.cluster {
            let template = url.into_connection_info().map_err(bad_url)?;
            let first = match template.addr() {
                ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                    Node {
                        host: host.clone(),
                        port: *port,
                    }
                }
                _ => {
                    return Err(ConnectError {
                        describe,
                        reason: String::from("a cluster is reached over TCP, not a unix socket"),
                        source: None,
                    });
                }
            };
            let mut seeds = vec![first];
            seeds.extend(opts.seeds.iter().filter_map(|s| seed_node(s)));
            let infos: Vec<ConnectionInfo> = seeds
                .iter()
                .map(|n| template.clone().set_addr(addr_of(template.addr(), n)))
                .collect();
            let client = redis::cluster::ClusterClientBuilder::new(infos)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(opts.response_timeout)
                .build()
                .map_err(bad_url)?;
            let mut pool = Vec::with_capacity(opts.pool.max(1));
            for _ in 0..opts.pool.max(1) {
                pool.push(client.get_async_connection().await.map_err(cannot)?);
            }
            Mode::Cluster(Cluster {
                pool,
                template,
                seeds,
                slots: Mutex::new(None),
                next_node: AtomicUsize::new(0),
            })
        } else {
            let client = redis::Client::open(url).map_err(bad_url)?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(opts.response_timeout))
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_secs(2))
                .set_pipeline_buffer_size(1024);
            let mut pool = Vec::with_capacity(opts.pool);
            for _ in 0..opts.pool.max(1) {
                let m = ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                    .map_err(cannot)?;
                pool.push(m);
            }
            Mode::Single { client, pool }
        };
        let conn = Arc::new(Self {
            mode,
            next: AtomicUsize::new(0),
            blockers: Mutex::new(HashMap::new()),
            describe,
        });
        conn.check_server().await?;
        Ok(conn)
    }

    /// `redis <redacted url>` (`redis cluster …` on a cluster).
    pub(crate) fn describe(&self) -> &str {
        &self.describe
    }

    /// Whether this client talks to a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.mode, Mode::Cluster(_))
    }

    /// A command connection (cheap clone of a multiplexed one).
    pub(crate) fn cmd(&self) -> CmdConn {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        match &self.mode {
            Mode::Single { pool, .. } => CmdConn::Single(pool[i % pool.len()].clone()),
            Mode::Cluster(c) => CmdConn::Cluster(c.pool[i % c.pool.len()].clone()),
        }
    }

    /// Runs `cmds`, which may lie in different slots, and answers each
    /// one's result in order: one pipeline on a standalone server; on a
    /// cluster every command on its own, all in flight at once (a cluster
    /// pipeline must stay in one slot).
    ///
    /// # Errors
    /// The pipeline's error when the whole pipeline failed (standalone).
    pub(crate) async fn each(&self, cmds: &[redis::Cmd]) -> RedisResult<Vec<RedisResult<Value>>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        if self.is_cluster() {
            let calls = cmds.iter().map(|c| {
                let mut con = self.cmd();
                async move { c.query_async::<Value>(&mut con).await }
            });
            return Ok(futures::future::join_all(calls).await);
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for c in cmds {
            pipe.add_command(c.clone());
        }
        let got: Vec<RedisResult<Value>> = pipe.query_async(&mut self.cmd()).await?;
        if got.len() != cmds.len() {
            return Err(client_error(
                "a pipeline answered a different number of replies than it had commands",
            ));
        }
        Ok(got)
    }

    /// The slot map, from the cache or asked of the cluster.
    async fn slot_map(&self, c: &Cluster) -> RedisResult<Arc<[SlotRange]>> {
        if let Some(m) = c.slots.lock().ok().and_then(|s| s.clone()) {
            return Ok(m);
        }
        let mut con = c.pool[0].clone();
        let mut ask = redis::cmd("CLUSTER");
        ask.arg("SLOTS");
        let v = con
            .route_command(ask, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await?;
        let fallback = c.seeds.first().map_or("127.0.0.1", |n| n.host.as_str());
        let map: Arc<[SlotRange]> = parse_slots(&v, fallback)
            .filter(|m| !m.is_empty())
            .ok_or_else(|| {
                RedisError::from((ErrorKind::Parse, "CLUSTER SLOTS answered no slot map"))
            })?
            .into();
        if let Ok(mut s) = c.slots.lock() {
            *s = Some(map.clone());
        }
        Ok(map)
    }

    /// Drops the cached slot map: the next lookup asks the cluster.
    fn forget_slots(&self) {
        if let Mode::Cluster(c) = &self.mode
            && let Ok(mut s) = c.slots.lock()
        {
            *s = None;
        }
    }

    /// The node serving `key`'s slot.
    async fn node_of(&self, c: &Cluster, key: &str) -> RedisResult<Node> {
        let slot = keys::slot(key.as_bytes());
        self.slot_map(c)
            .await?
            .iter()
            .find(|r| r.start <= slot && slot <= r.end)
            .map(|r| r.node.clone())
            .ok_or_else(|| {
                RedisError::from((
                    ErrorKind::Server(ServerErrorKind::ClusterDown),
                    "no node serves the key's slot",
                ))
            })
    }

    /// Where a scan of the whole keyspace must look: the server, or every
    /// primary of the cluster, from a slot map asked now (a failover may
    /// have changed them; `None` stands for the standalone server).
    pub(crate) async fn nodes(&self) -> RedisResult<Vec<Option<Node>>> {
        match &self.mode {
            Mode::Single { .. } => Ok(vec![None]),
            Mode::Cluster(c) => {
                self.forget_slots();
                let mut out: Vec<Option<Node>> = Vec::new();
                for r in self.slot_map(c).await?.iter() {
                    if !out.iter().any(|n| n.as_ref() == Some(&r.node)) {
                        out.push(Some(r.node.clone()));
                    }
                }
                Ok(out)
            }
        }
    }

    /// Runs `cmd` (a command without keys) on `node` (see [`Conn::nodes`]).
    pub(crate) async fn on_node(&self, node: Option<&Node>, cmd: redis::Cmd) -> RedisResult<Value> {
        match (&self.mode, node) {
            (Mode::Cluster(c), Some(n)) => {
                let mut con = c.pool[0].clone();
                con.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: n.host.clone(),
                        port: n.port,
                    }),
                )
                .await
            }
            _ => cmd.query_async(&mut self.cmd()).await,
        }
    }

    /// Deletes every key matching one of `patterns` (`SCAN` on every
    /// primary, `UNLINK` in batches of 500); returns how many went.
    pub(crate) async fn unlink_matching(&self, patterns: &[String]) -> RedisResult<u64> {
        let mut n = 0;
        for node in self.nodes().await? {
            for pattern in patterns {
                let mut cursor: u64 = 0;
                loop {
                    let mut scan = redis::cmd("SCAN");
                    scan.arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000);
                    let (next, keys): (u64, Vec<String>) =
                        redis::from_redis_value(self.on_node(node.as_ref(), scan).await?)?;
                    for chunk in keys.chunks(UNLINK_BATCH) {
                        let _: i64 = redis::cmd("UNLINK")
                            .arg(chunk)
                            .query_async(&mut self.cmd())
                            .await?;
                        n += chunk.len() as u64;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        Ok(n)
    }

    /// A connection of its own for one blocking read of `key` (on a
    /// cluster, to the node serving `key`'s slot). Give it back with
    /// [`Conn::give_back`] when the read returned; a read that was dropped
    /// or failed must not give it back (it may still be blocked in Redis)
    /// but report [`Conn::blocker_failed`].
    pub(crate) async fn blocker(&self, key: &str) -> Result<Blocker, RedisError> {
        let node = match &self.mode {
            Mode::Single { .. } => None,
            Mode::Cluster(c) => Some(self.node_of(c, key).await?),
        };
        let spare = self
            .blockers
            .lock()
            .ok()
            .and_then(|mut m| m.get_mut(&node).and_then(Vec::pop));
        if let Some(conn) = spare {
            return Ok(Blocker { conn, node });
        }
        let conn = match (&self.mode, &node) {
            (Mode::Cluster(c), Some(n)) => {
                let info = c.template.clone().set_addr(addr_of(c.template.addr(), n));
                redis::Client::open(info)?
                    .get_multiplexed_async_connection_with_config(&no_timeout_config())
                    .await?
            }
            (Mode::Single { client, .. }, _) => {
                client
                    .get_multiplexed_async_connection_with_config(&no_timeout_config())
                    .await?
            }
            (Mode::Cluster(_), None) => return Err(client_error("no node for a blocking read")),
        };
        Ok(Blocker { conn, node })
    }

    /// Keeps a blocking connection whose read has returned for the next one.
    pub(crate) fn give_back(&self, b: Blocker) {
        if let Ok(mut m) = self.blockers.lock() {
            let spares = m.entry(b.node).or_default();
            if spares.len() < SPARE_BLOCKERS {
                spares.push(b.conn);
            }
        }
    }

    /// A blocking read failed or found no connection: on a cluster the
    /// slot may have moved or the node gone, so the slot map is asked
    /// again next time.
    pub(crate) fn blocker_failed(&self) {
        self.forget_slots();
    }

    /// A RESP3 connection of its own for pub/sub: every push it receives
    /// (messages, subscription confirmations, and the library's notice
    /// that the connection dropped) goes to `push`. On a cluster it goes to
    /// one node, the next primary on every call.
    pub(crate) async fn subscriber(
        &self,
        push: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, RedisError> {
        let info = match &self.mode {
            Mode::Single { client, .. } => client.get_connection_info().clone(),
            Mode::Cluster(c) => {
                let nodes: Vec<Node> = match self.nodes().await {
                    Ok(n) => n.into_iter().flatten().collect(),
                    Err(e) => {
                        tracing::debug!(error = %e, "no slot map; subscribing on a seed");
                        c.seeds.clone()
                    }
                };
                let i = c.next_node.fetch_add(1, Ordering::Relaxed);
                let node = nodes
                    .get(i % nodes.len().max(1))
                    .ok_or_else(|| client_error("the cluster has no node to subscribe on"))?;
                c.template
                    .clone()
                    .set_addr(addr_of(c.template.addr(), node))
            }
        };
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout))
            .set_push_sender(push);
        let result = client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        if result.is_err() {
            self.forget_slots();
        }
        result
    }

    /// `INFO <section>` of `node`.
    async fn info(&self, node: Option<&Node>, section: &str) -> RedisResult<String> {
        let mut c = redis::cmd("INFO");
        c.arg(section);
        Ok(redis::from_redis_value(self.on_node(node, c).await?)?)
    }

    async fn check_server(&self) -> Result<(), ConnectError> {
        let nodes = self
            .nodes()
            .await
            .map_err(|e| self.connect_error("CLUSTER SLOTS failed", e))?;
        for node in nodes {
            self.check_node(node.as_ref()).await?;
        }
        Ok(())
    }

    /// The version check and the persistence and eviction warnings of one
    /// server (one primary on a cluster).
    async fn check_node(&self, node: Option<&Node>) -> Result<(), ConnectError> {
        let server = node.map_or_else(
            || self.describe.clone(),
            |n| format!("{} node {n}", self.describe),
        );
        let info = self
            .info(node, "server")
            .await
            .map_err(|e| self.connect_error("INFO server failed", e))?;
        let version = info_field(&info, "redis_version").unwrap_or("0");
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < MIN_MAJOR {
            return Err(ConnectError {
                describe: self.describe.clone(),
                reason: format!(
                    "Redis {version} is too old: Stem needs Redis 7.0 or newer (streams with XAUTOCLAIM, XADD MINID)"
                ),
                source: None,
            });
        }
        if let Ok(p) = self.info(node, "persistence").await {
            let aof = info_field(&p, "aof_enabled") == Some("1");
            let rdb = info_field(&p, "rdb_last_save_time").is_some()
                && info_field(&p, "rdb_saves").is_some_and(|s| s != "0");
            if !aof && !rdb {
                tracing::warn!(
                    server = %server,
                    "Redis keeps nothing on disk (appendonly no, no snapshots): a Redis restart loses every queued task; set `appendonly yes`"
                );
            }
        }
        if let Ok(m) = self.info(node, "memory").await
            && let Some(policy) = info_field(&m, "maxmemory_policy")
            && policy != "noeviction"
        {
            tracing::warn!(
                server = %server,
                policy,
                "Redis may evict keys under memory pressure (maxmemory-policy is not noeviction): queued tasks can vanish; set `maxmemory-policy noeviction`"
            );
        }
        Ok(())
    }

    fn connect_error(&self, what: &str, e: RedisError) -> ConnectError {
        ConnectError {
            describe: self.describe.clone(),
            reason: format!("{what}: {e}"),
            source: Some(Cause::new(e)),
        }
    }

    /// A Redis error as a broker error: unreachable server or dropped
    /// connection -> `Unavailable`, anything else -> `Storage`.
    pub(crate) fn broker_error(&self, what: &str, e: RedisError) -> BrokerError {
        let reason = format!("{what}: {e}");
        if unreachable(&e) {
            BrokerError::Unavailable {
                adapter: self.describe.clone(),
                reason,
                source: Some(Cause::new(e)),
            }
        } else {
            BrokerError::Storage {
                adapter: self.describe.clone(),
                reason,
                source: Some(Cause::new(e)),
            }
        }
    }

    /// A Redis error as a backend error (see [`Conn::broker_error`]).
    pub(crate) fn backend_error(&self, what: &str, e: RedisError) -> BackendError {
        let reason = format!("{what}: {e}");
        if unreachable(&e) {
            BackendError::Unavailable {
                adapter: self.describe.clone(),
                reason,
                source: Some(Cause::new(e)),
            }
        } else {
            BackendError::Storage {
                adapter: self.describe.clone(),
                reason,
                source: Some(Cause::new(e)),
            }
        }
    }

    /// A reply that does not have the shape a script returns.
    pub(crate) fn bad_reply(&self, what: &str, detail: &str) -> BrokerError {
        BrokerError::Storage {
            adapter: self.describe.clone(),
            reason: format!("{what}: unexpected reply from Redis ({detail})"),
            source: None,
        }
    }
}

/// Whether `e` means the server could not be reached or the connection
/// dropped (the command may or may not have run); on a cluster also a
/// cluster that is down, failing over or has no connection to the node.
pub(crate) fn unreachable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::ClusterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::MasterDown
                )
        )
}

fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// Connecting failed.
#[derive(Debug)]
pub(crate) struct ConnectError {
    describe: String,
    reason: String,
    source: Option<Cause>,
}

impl From<ConnectError> for BrokerError {
    fn from(e: ConnectError) -> Self {
        Self::Unavailable {
            adapter: e.describe,
            reason: e.reason,
            source: e.source,
        }
    }
}

impl From<ConnectError> for BackendError {
    fn from(e: ConnectError) -> Self {
        Self::Unavailable {
            adapter: e.describe,
            reason: e.reason,
            source: e.source,
        }
    }
}
