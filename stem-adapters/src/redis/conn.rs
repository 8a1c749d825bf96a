//! Connections to Redis: a small pool of reconnecting multiplexed
//! connections for commands, dedicated connections for blocking reads, the
//! checks made at connect, and how a Redis error becomes a Stem error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, RedisError};
use stem_core::error::Cause;
use stem_core::url::redact;
use stem_core::{BackendError, BrokerError};

use super::RedisOptions;

/// Oldest server accepted: 7.0 has what the scripts need (XAUTOCLAIM's
/// deleted ids, `XADD … MINID`, exclusive `XRANGE` ranges, effect
/// replication so `TIME` is safe in a script).
const MIN_MAJOR: u32 = 7;

/// How long establishing one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Spare blocking connections kept for the next wait.
const SPARE_BLOCKERS: usize = 16;

/// The connections of one client.
pub(crate) struct Conn {
    client: redis::Client,
    pool: Vec<ConnectionManager>,
    next: AtomicUsize,
    blockers: std::sync::Mutex<Vec<MultiplexedConnection>>,
    /// `redis <url, password redacted>`, for logs and errors.
    describe: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Conn {
    /// Connects to `url` (options already stripped) and checks the server.
    pub(crate) async fn open(url: &str, opts: &RedisOptions) -> Result<Arc<Self>, ConnectError> {
        if url.starts_with("rediss://") {
            // Redis builds its rustls config with the process's default
            // provider; install ring unless something else already did.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let describe = format!("redis {}", redact(url));
        let client = redis::Client::open(url).map_err(|e| ConnectError {
            describe: describe.clone(),
            reason: format!(
                "the URL is not a Redis URL: {}",
                e.detail().unwrap_or("bad URL")
            ),
            source: Some(Cause::new(e)),
        })?;
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
                .map_err(|e| ConnectError {
                    describe: describe.clone(),
                    reason: format!("cannot connect: {e}"),
                    source: Some(Cause::new(e)),
                })?;
            pool.push(m);
        }
        let conn = Arc::new(Self {
            client,
            pool,
            next: AtomicUsize::new(0),
            blockers: std::sync::Mutex::new(Vec::new()),
            describe,
        });
        conn.check_server().await?;
        Ok(conn)
    }

    /// `redis <redacted url>`.
    pub(crate) fn describe(&self) -> &str {
        &self.describe
    }

    /// A command connection (cheap clone of a multiplexed one).
    pub(crate) fn cmd(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        self.pool[i].clone()
    }

    /// A connection of its own for one blocking read. Give it back with
    /// [`Conn::give_back`] when the read returned; a read that was dropped
    /// or failed must not give it back (it may still be blocked in Redis).
    pub(crate) async fn blocker(&self) -> Result<MultiplexedConnection, RedisError> {
        let spare = self.blockers.lock().map_or(None, |mut v| v.pop());
        if let Some(c) = spare {
            return Ok(c);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// A RESP3 connection of its own for pub/sub: every push it receives
    /// (messages, subscription confirmations, and the library's notice
    /// that the connection dropped) goes to `push`.
    pub(crate) async fn subscriber(
        &self,
        push: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, RedisError> {
        let info = self.client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout))
            .set_push_sender(push);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Keeps a blocking connection whose read has returned for the next one.
    pub(crate) fn give_back(&self, c: MultiplexedConnection) {
        if let Ok(mut v) = self.blockers.lock()
            && v.len() < SPARE_BLOCKERS
        {
            v.push(c);
        }
    }

    async fn check_server(&self) -> Result<(), ConnectError> {
        let mut c = self.cmd();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut c)
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
        let persistence: redis::RedisResult<String> = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut c)
            .await;
        if let Ok(p) = persistence {
            let aof = info_field(&p, "aof_enabled") == Some("1");
            let rdb = info_field(&p, "rdb_last_save_time").is_some()
                && info_field(&p, "rdb_saves").is_some_and(|s| s != "0");
            if !aof && !rdb {
                tracing::warn!(
                    server = %self.describe,
                    "Redis keeps nothing on disk (appendonly no, no snapshots): a Redis restart loses every queued task; set `appendonly yes`"
                );
            }
        }
        let memory: redis::RedisResult<String> =
            redis::cmd("INFO").arg("memory").query_async(&mut c).await;
        if let Ok(m) = memory
            && let Some(policy) = info_field(&m, "maxmemory_policy")
            && policy != "noeviction"
        {
            tracing::warn!(
                server = %self.describe,
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
/// dropped (the command may or may not have run).
pub(crate) fn unreachable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
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
