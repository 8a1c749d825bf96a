//! The Redis adapter: the `redis://` and `rediss://` broker on Redis
//! Streams, the production default, and the result backend beside it. Many
//! workers on many machines
//! share one Redis; every decision about time (delays, leases, expiry) is
//! made inside Redis by its own clock (`TIME` in a script), never by a
//! client's.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use stem_adapters::redis::{RedisBroker, RedisOptions};
//! use stem_core::{Broker, Envelope, FetchRequest};
//! let broker = RedisBroker::connect("redis://127.0.0.1:6379/0", RedisOptions::default()).await?;
//! broker.publish(Envelope::new("demo::hello", "default", serde_json::json!({}))?).await?;
//! let got = broker.fetch(&FetchRequest::new(["default"], 10)).await?;
//! broker.ack(&got[0].receipt).await?;
//! # Ok(()) }
//! ```
//!
//! # Storage
//! Each queue is ten streams, one per priority level, read through one
//! consumer group; a delivery is a pending entry of that group plus a
//! member of the level's lease set (`level|entry id|fence`) scored by its
//! deadline. Extending a lease re-scores the same member: the same entry
//! stays leased, nothing is copied. The fence is the member itself, so an
//! ack, extend, nack or dead letter from a delivery whose entry was handed
//! out again finds no member and answers `LeaseLost`, changing nothing.
//! Delayed envelopes wait in a sorted set scored by their due time and are
//! moved to their stream by the fetch script when Redis's clock says so.
//!
//! Every key of one queue carries the queue's hash tag
//! (`stem:{<namespace>:q:<queue>}:…`), so each script touches one slot;
//! names are percent-encoded, so `app` and `app2`, or names holding `:` or
//! `{`, never collide. See `docs/plans/redis-streams.md` for the whole
//! layout.
//!
//! # Redis Cluster
//! `?cluster=true` (with `seeds=host:port,…` for more seed nodes; the
//! database must be 0) talks to a Redis Cluster; everything else is the
//! same. Every command and script touches one slot: a queue's keys share
//! the queue's slot (scripts that build unique-key names from the queue's
//! prefix stay in it, which Redis 7 accepts for undeclared keys of the
//! script's slot), the namespace's shared keys (queue set, leader,
//! heartbeats, revocations, broadcast streams) share the namespace's slot,
//! and each task record and group has a slot of its own, so the cluster
//! spreads them. What differs:
//! - `publish_many` is one call per queue, so a batch is atomic per queue,
//!   not across queues (`atomic_batch` is false on a cluster): an error
//!   can leave the envelopes of other queues stored.
//! - An idle `fetch` over several queues blocks with one `XREAD` per queue,
//!   each on a connection of its own to the node serving that queue's
//!   slot, instead of one `XREAD` over all of them; the first to return
//!   wins and the others' connections are discarded.
//! - `wait` subscribes on one node (classic pub/sub reaches every node).
//! - Namespace deletion scans every primary.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use stem_adapters::redis::{RedisBroker, RedisOptions};
//! let url = "redis://10.0.0.1:7000?cluster=true&seeds=10.0.0.2:7000,10.0.0.3:7000";
//! let broker = RedisBroker::connect(url, RedisOptions::default()).await?;
//! # let _ = broker; Ok(()) }
//! ```
//!
//! # Durability
//! An envelope is stored when `publish` returns `Ok`. Whether it survives a
//! Redis restart is Redis's persistence setting: with `appendonly yes`
//! (`appendfsync everysec`) a process crash of Redis loses nothing
//! acknowledged and a power loss up to about a second; without persistence
//! a restart loses everything. The broker warns at connect when the server
//! keeps nothing on disk or may evict keys (`maxmemory-policy` other than
//! `noeviction`).
//!
//! # Outages
//! Connections reconnect by themselves. While Redis is unreachable a call
//! answers `Unavailable` (within about `response_timeout`, 5 s by default:
//! one that arrives while the client is reconnecting waits for that
//! attempt), never a false `Ok`; a blocking fetch or a broadcast
//! subscription in progress rides the outage out and resumes.
//!
//! # Waiting
//! An idle consumer blocks in Redis (`XREAD BLOCK` on the queue's streams
//! and a timer stream, on a connection of its own; one per queue on a
//! cluster) and wakes on the next write; delayed work and lease expiries
//! bound the block. Nothing polls.

mod admin;
mod backend;
mod broadcast;
mod broker;
mod conn;
mod fetch;
mod keys;
mod maintain;
mod publish;
mod scripts;
mod settle;
mod waiters;
mod wire;

use std::time::Duration;

pub use backend::RedisBackend;
pub use broker::RedisBroker;

use stem_core::StemError;
use stem_core::error::ConfigError;
use stem_core::url::{AdapterEntry, ConnectOptions, redact};

/// The URL scheme of a plain connection.
pub const SCHEME: &str = "redis";
/// The URL scheme of a TLS connection (rustls).
pub const TLS_SCHEME: &str = "rediss";

/// Settings of the Redis adapter. Every field can also be set in the URL's
/// query string (see [`parse_url`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisOptions {
    /// Namespace of every key this client reads and writes.
    pub namespace: String,
    /// Multiplexed connections for commands, used round-robin (each one
    /// pipelines every request in flight on it).
    pub pool: usize,
    /// Largest encoded envelope accepted.
    pub max_envelope_bytes: usize,
    /// How long dead letters are kept.
    pub dead_letter_retention: Duration,
    /// How long one command may take before it fails as unavailable.
    pub response_timeout: Duration,
    /// The longest one blocking read waits before it re-checks (a fetch's
    /// `wait` longer than this is several reads).
    pub max_block: Duration,
    /// A consumer (worker) with nothing pending and idle this long is
    /// removed from its consumer groups by `maintain`. A live worker that
    /// sits idle that long is removed too (its blocking waits do not touch
    /// the group); that is harmless, its next fetch joins again.
    pub consumer_idle: Duration,
    /// The clock this client reads for what it stamps itself (record
    /// timestamps when the worker gave none). Delays, leases and expiry are
    /// judged by Redis's own clock inside each script (CONTRACT.md B18).
    pub clock: stem_core::clock::Clock,
    /// Talk to a Redis Cluster (`cluster=true`): the URL's host is a seed
    /// node, commands are routed by slot, and `publish_many` is atomic per
    /// queue instead of per call (see the module docs).
    pub cluster: bool,
    /// More seed nodes of the cluster, `host:port` each (`seeds=h:p,h:p`),
    /// tried when the URL's host is down. Same credentials and TLS as the
    /// URL.
    pub seeds: Vec<String>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            namespace: String::from(stem_core::client::DEFAULT_NAMESPACE),
            pool: 1,
            max_envelope_bytes: stem_core::broker::DEFAULT_MAX_ENVELOPE_BYTES,
            dead_letter_retention: stem_core::broker::DEFAULT_DEAD_LETTER_RETENTION,
            response_timeout: Duration::from_secs(5),
            max_block: Duration::from_secs(5),
            consumer_idle: Duration::from_secs(3600),
            clock: stem_core::clock::Clock::system(),
            cluster: false,
            seeds: Vec::new(),
        }
    }
}

/// Parses `redis[s]://[user[:password]@]host[:port][/db][?option=value&…]`
/// into the URL Redis is connected with (options removed) and the options,
/// starting from `base`.
///
/// Options: `namespace`, `pool` (connections, default 1),
/// `max_envelope_bytes` (default 1 MiB), `dead_letter_retention` (7d),
/// `response_timeout` (5s), `max_block` (5s), `consumer_idle` (1h),
/// `cluster` (`true`/`false`, default false: the URL's host is a seed of a
/// Redis Cluster; the database must then be 0) and `seeds`
/// (`host:port,host:port`, more seed nodes; needs `cluster=true`).
/// Durations are written `500ms`, `5s`, `10m`, `1h`, `7d`.
///
/// ```
/// use stem_adapters::redis::{parse_url, RedisOptions};
/// let (url, opts) = parse_url("redis://127.0.0.1:6379/2?pool=4&max_block=1s", RedisOptions::default()).unwrap();
/// assert_eq!(url, "redis://127.0.0.1:6379/2");
/// assert_eq!(opts.pool, 4);
/// assert_eq!(opts.max_block, std::time::Duration::from_secs(1));
/// assert!(parse_url("redis://h?colour=blue", RedisOptions::default()).is_err());
/// assert!(parse_url("http://h", RedisOptions::default()).is_err());
/// let (_, opts) = parse_url("redis://10.0.0.1:7000?cluster=true&seeds=10.0.0.2:7000,10.0.0.3:7000", RedisOptions::default()).unwrap();
/// assert!(opts.cluster);
/// assert_eq!(opts.seeds, ["10.0.0.2:7000", "10.0.0.3:7000"]);
/// assert!(parse_url("redis://h:7000/1?cluster=true", RedisOptions::default()).is_err());
/// ```
///
/// # Errors
/// [`ConfigError::BadUrl`] saying which part is wrong (password redacted).
pub fn parse_url(url: &str, base: RedisOptions) -> Result<(String, RedisOptions), ConfigError> {
    let bad = |reason: String| ConfigError::BadUrl {
        url: redact(url),
        reason,
    };
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or_else(|| {
            bad(String::from(
                "expected `redis://host:6379/0` or `rediss://…` for TLS",
            ))
        })?;
    let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
    let host_and_db = addr.rsplit_once('@').map_or(addr, |(_, h)| h);
    let host = host_and_db.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(bad(String::from(
            "no host: write `redis://127.0.0.1:6379` (or `redis://user:password@host:port/db`)",
        )));
    }
    let db = host_and_db.split_once('/').map_or("", |(_, db)| db);
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(bad(format!(
            "database `{db}` is not a number: write `/0` .. `/15`"
        )));
    }
    let mut opts = base;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dur = |v: &str| {
            stem_core::duration::parse_duration(v).map_err(|e| bad(format!("`{k}`: {e}")))
        };
        let count = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad(format!("`{k}={v}`: use a whole number >= 1")))
        };
        match k {
            "namespace" => {
                if v.is_empty() {
                    return Err(bad(String::from("`namespace` is empty")));
                }
                v.clone_into(&mut opts.namespace);
            }
            "pool" => opts.pool = count(v)?,
            "max_envelope_bytes" => opts.max_envelope_bytes = count(v)?,
            "dead_letter_retention" => opts.dead_letter_retention = dur(v)?,
            "response_timeout" => opts.response_timeout = dur(v)?,
            "max_block" => opts.max_block = dur(v)?,
            "consumer_idle" => opts.consumer_idle = dur(v)?,
            "cluster" => {
                opts.cluster = match v {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => return Err(bad(format!("`cluster={v}`: use `true` or `false`"))),
                };
            }
            "seeds" => {
                opts.seeds = Vec::new();
                for seed in v.split(',').filter(|s| !s.is_empty()) {
                    let ok = seed.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && !h.contains(['/', '@']) && p.parse::<u16>().is_ok()
                    });
                    if !ok {
                        return Err(bad(format!(
                            "`seeds`: `{seed}` is not `host:port` (write `seeds=10.0.0.2:7000,10.0.0.3:7000`)"
                        )));
                    }
                    opts.seeds.push(seed.to_owned());
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown option `{other}`: known are namespace, pool, max_envelope_bytes, dead_letter_retention, response_timeout, max_block, consumer_idle, cluster, seeds"
                )));
            }
        }
    }
    if !opts.seeds.is_empty() && !opts.cluster {
        return Err(bad(String::from(
            "`seeds` names more nodes of a cluster: add `cluster=true`",
        )));
    }
    if opts.cluster && !db.is_empty() && db != "0" {
        return Err(bad(format!(
            "database `{db}` on a cluster: a Redis Cluster has only database 0"
        )));
    }
    if opts.response_timeout.is_zero() || opts.max_block.is_zero() {
        return Err(bad(String::from(
            "`response_timeout` and `max_block` must be above zero",
        )));
    }
    let scheme_len = url.len() - rest.len();
    Ok((format!("{}{addr}", &url[..scheme_len]), opts))
}

fn options_for(opts: &ConnectOptions) -> RedisOptions {
    RedisOptions {
        namespace: opts.namespace.clone(),
        ..RedisOptions::default()
    }
}

fn open_broker(
    opts: ConnectOptions,
) -> futures::future::BoxFuture<'static, Result<std::sync::Arc<dyn stem_core::Broker>, StemError>> {
    Box::pin(async move {
        let b = RedisBroker::connect(&opts.url, options_for(&opts)).await?;
        Ok(std::sync::Arc::new(b) as std::sync::Arc<dyn stem_core::Broker>)
    })
}

fn open_backend(
    opts: ConnectOptions,
) -> futures::future::BoxFuture<
    'static,
    Result<std::sync::Arc<dyn stem_core::ResultBackend>, StemError>,
> {
    Box::pin(async move {
        let b = RedisBackend::connect(&opts.url, options_for(&opts)).await?;
        Ok(std::sync::Arc::new(b) as std::sync::Arc<dyn stem_core::ResultBackend>)
    })
}

inventory::submit! {
    AdapterEntry {
        scheme: SCHEME,
        broker: Some(open_broker),
        backend: Some(open_backend),
    }
}

inventory::submit! {
    AdapterEntry {
        scheme: TLS_SCHEME,
        broker: Some(open_broker),
        backend: Some(open_backend),
    }
}

type Openers = (stem_core::url::BrokerOpener, stem_core::url::BackendOpener);

pub(crate) fn ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Referenced from [`crate::link`]: keeps this module's URL registrations
/// in the binary.
#[inline(never)]
pub(crate) fn link() -> usize {
    let openers: [Openers; 1] = [(open_broker, open_backend)];
    std::hint::black_box(&openers).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_and_errors() {
        let (u, o) = parse_url(
            "rediss://me:secret@h:7000/3?namespace=app&response_timeout=2s&consumer_idle=10m",
            RedisOptions::default(),
        )
        .unwrap();
        assert_eq!(u, "rediss://me:secret@h:7000/3");
        assert_eq!(o.namespace, "app");
        assert_eq!(o.response_timeout, Duration::from_secs(2));
        assert_eq!(o.consumer_idle, Duration::from_secs(600));
        let e = parse_url("redis://me:secret@h/x", RedisOptions::default()).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.to_string().contains("not a number"), "{e}");
        assert!(parse_url("redis://?pool=2", RedisOptions::default()).is_err());
        assert!(parse_url("redis://h?pool=0", RedisOptions::default()).is_err());
        assert!(parse_url("redis://h?max_block=0s", RedisOptions::default()).is_err());
    }

    #[test]
    fn cluster_options() {
        let (u, o) = parse_url(
            "redis://u:p@h:7000/0?cluster=true&seeds=h2:7001,[::1]:7002",
            RedisOptions::default(),
        )
        .unwrap();
        assert_eq!(u, "redis://u:p@h:7000/0");
        assert!(o.cluster);
        assert_eq!(o.seeds, ["h2:7001", "[::1]:7002"]);
        let o = parse_url("redis://h?cluster=false", RedisOptions::default())
            .unwrap()
            .1;
        assert!(!o.cluster);
        for bad in [
            "redis://h?cluster=maybe",
            "redis://h?seeds=h2:7001",
            "redis://h?cluster=true&seeds=h2",
            "redis://h?cluster=true&seeds=h2:port",
            "redis://h?cluster=true&seeds=:7001",
            "redis://h/3?cluster=true",
        ] {
            assert!(parse_url(bad, RedisOptions::default()).is_err(), "{bad}");
        }
    }
}
