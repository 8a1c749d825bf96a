//! The SQLite adapter: `sqlite://path` broker and result backend. Embedded,
//! durable (WAL), shared by every process on one host that opens the same
//! file.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use stem_adapters::sqlite::{SqliteBroker, SqliteOptions};
//! use stem_core::{Broker, Envelope, FetchRequest};
//! let dir = tempfile::tempdir()?;
//! let broker = SqliteBroker::open(dir.path().join("stem.db"), SqliteOptions::default()).await?;
//! broker.publish(Envelope::new("demo::hello", "default", serde_json::json!({}))?).await?;
//! let got = broker.fetch(&FetchRequest::new(["default"], 10)).await?;
//! broker.ack(&got[0].receipt).await?;
//! # Ok(()) }
//! ```
//!
//! # Storage
//! One file holds every namespace: rows carry their namespace. The schema
//! is versioned with `PRAGMA user_version` and migrated inside a
//! `BEGIN IMMEDIATE` transaction, so two processes opening a new file at
//! once cannot race. Journal mode is WAL with `synchronous=NORMAL`: a
//! publish survives a process crash; the last transactions before a power
//! loss may not (use `?synchronous=full` to trade speed for that).
//!
//! Jobs are found by their row number (receipts carry it), never by task
//! id, and the id is not a unique key: publishing the same envelope twice
//! stores it twice, as the in-memory broker does. Use a unique key
//! (`unique_for`) to deduplicate publishes.
//!
//! # Time
//! Delays are kept relative to the publish (`not_before - enqueued_at`), so
//! a producer with a wrong clock cannot make delayed work run early; leases
//! and due times are judged by this host's clock, which every process
//! sharing the file shares.

mod backend;
mod broker;
mod db;
mod schema;
mod shared;
mod wake;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use backend::SqliteBackend;
pub use broker::SqliteBroker;
/// The rusqlite this adapter links, for `Broker::publish_in`: open a
/// `rusqlite::Connection` on the same file, `BEGIN`, write your rows,
/// publish with `broker.publish_in(&mut conn, envelopes)`, then `COMMIT`;
/// the tasks exist if and only if the commit does.
pub use rusqlite;

use stem_core::StemError;
use stem_core::error::ConfigError;
use stem_core::url::{AdapterEntry, ConnectOptions, redact};

/// The URL scheme.
pub const SCHEME: &str = "sqlite";

/// Settings of the SQLite adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Namespace of every row this client reads and writes.
    pub namespace: String,
    /// How often an idle consumer or waiter looks for work written by
    /// another process (same-process writes wake it at once).
    pub poll_interval: Duration,
    /// How long a statement waits for the write lock.
    pub busy_timeout: Duration,
    /// Largest encoded envelope accepted.
    pub max_envelope_bytes: usize,
    /// How long dead letters are kept.
    pub dead_letter_retention: Duration,
    /// `synchronous=FULL` instead of `NORMAL`.
    pub synchronous_full: bool,
    /// Reader connections at most (writes go through one writer thread).
    pub max_connections: u32,
    /// The clock this client reads for what it computes itself: record
    /// timestamps, result and revocation expiry, heartbeat times. Delays
    /// and leases are judged by SQLite's own clock inside each statement
    /// (`unixepoch('subsec')`), never by this one (CONTRACT.md B18).
    pub clock: stem_core::clock::Clock,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            namespace: String::from(stem_core::client::DEFAULT_NAMESPACE),
            poll_interval: Duration::from_millis(100),
            busy_timeout: Duration::from_secs(10),
            max_envelope_bytes: stem_core::broker::DEFAULT_MAX_ENVELOPE_BYTES,
            dead_letter_retention: stem_core::broker::DEFAULT_DEAD_LETTER_RETENTION,
            synchronous_full: false,
            max_connections: 4,
            clock: stem_core::clock::Clock::system(),
        }
    }
}

/// Parses `sqlite://path[?poll=100ms&busy_timeout=10s&synchronous=full&max_connections=4]`.
///
/// `sqlite:///abs/path.db` is absolute, `sqlite://rel/path.db` is relative
/// to the working directory.
///
/// ```
/// let (path, opts) = stem_adapters::sqlite::parse_url("sqlite:///tmp/x.db?poll=50ms", "stem").unwrap();
/// assert_eq!(path, std::path::PathBuf::from("/tmp/x.db"));
/// assert_eq!(opts.poll_interval, std::time::Duration::from_millis(50));
/// assert!(stem_adapters::sqlite::parse_url("sqlite://", "stem").is_err());
/// ```
///
/// # Errors
/// [`ConfigError::BadUrl`] saying which part is wrong.
pub fn parse_url(url: &str, namespace: &str) -> Result<(PathBuf, SqliteOptions), ConfigError> {
    let bad = |reason: String| ConfigError::BadUrl {
        url: redact(url),
        reason,
    };
    let rest = url
        .strip_prefix("sqlite://")
        .ok_or_else(|| bad(String::from("expected `sqlite://path/to/file.db`")))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(bad(String::from(
            "no file path: write `sqlite://stem.db` (relative) or `sqlite:///var/lib/stem.db` (absolute)",
        )));
    }
    if path == ":memory:" {
        return Err(bad(String::from(
            "an in-memory SQLite database is private to one connection; use `memory://` for an in-process broker",
        )));
    }
    let mut opts = SqliteOptions {
        namespace: namespace.to_owned(),
        ..SqliteOptions::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dur = |v: &str| {
            stem_core::duration::parse_duration(v).map_err(|e| bad(format!("`{k}`: {e}")))
        };
        match k {
            "poll" | "poll_interval" => opts.poll_interval = dur(v)?,
            "busy_timeout" => opts.busy_timeout = dur(v)?,
            "dead_letter_retention" => opts.dead_letter_retention = dur(v)?,
            "synchronous" => {
                opts.synchronous_full = match v.to_ascii_lowercase().as_str() {
                    "full" => true,
                    "normal" => false,
                    _ => return Err(bad(format!("`synchronous={v}`: use `normal` or `full`"))),
                }
            }
            "max_connections" => {
                opts.max_connections = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    bad(format!("`max_connections={v}`: use a whole number >= 1"))
                })?;
            }
            "max_envelope_bytes" => {
                opts.max_envelope_bytes = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    bad(format!("`max_envelope_bytes={v}`: use a whole number >= 1"))
                })?;
            }
            other => {
                return Err(bad(format!(
                    "unknown option `{other}`: known are poll, busy_timeout, dead_letter_retention, synchronous, max_connections, max_envelope_bytes"
                )));
            }
        }
    }
    if opts.poll_interval.is_zero() {
        return Err(bad(String::from("`poll` must be above zero")));
    }
    Ok((PathBuf::from(path), opts))
}

/// The file used when `STEM_BROKER_URL` is unset: `STEM_SQLITE_PATH`, or
/// `stem.db` in the platform's data directory (`$XDG_DATA_HOME/stem`,
/// `~/.local/share/stem`), or in the working directory as a last resort.
#[must_use]
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("STEM_SQLITE_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|p| !p.is_empty())
                .map(|h| Path::new(&h).join(".local/share"))
        });
    match base {
        Some(b) => b.join("stem").join("stem.db"),
        None => PathBuf::from("stem.db"),
    }
}

fn open_broker(
    opts: ConnectOptions,
) -> futures::future::BoxFuture<'static, Result<std::sync::Arc<dyn stem_core::Broker>, StemError>> {
    Box::pin(async move {
        let (path, o) = parse_url(&opts.url, &opts.namespace)?;
        let b = SqliteBroker::open(path, o).await?;
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
        let (path, o) = parse_url(&opts.url, &opts.namespace)?;
        let b = SqliteBackend::open(path, o).await?;
        Ok(std::sync::Arc::new(b) as std::sync::Arc<dyn stem_core::ResultBackend>)
    })
}

fn default_url() -> String {
    format!("sqlite://{}", default_path().display())
}

inventory::submit! {
    stem_core::url::EmbeddedDefault { url: default_url }
}

inventory::submit! {
    AdapterEntry {
        scheme: SCHEME,
        broker: Some(open_broker),
        backend: Some(open_backend),
    }
}

type Openers = (stem_core::url::BrokerOpener, stem_core::url::BackendOpener);

pub(crate) fn ms_of(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Referenced from [`crate::link`]: keeps this module's URL registration in
/// the binary.
#[inline(never)]
pub(crate) fn link() -> usize {
    let openers: [crate::sqlite::Openers; 1] = [(open_broker, open_backend)];
    std::hint::black_box(&openers).len()
}
