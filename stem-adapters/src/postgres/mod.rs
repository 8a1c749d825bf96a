//! The Postgres adapter: the `postgres://` (and `postgresql://`) broker and
//! result backend, for teams who want one durable database and SQL
//! visibility, and tasks enqueued in the same transaction as the business
//! data they belong to.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use stem_adapters::postgres::{PostgresBroker, PostgresOptions};
//! use stem_core::{Broker, Envelope, FetchRequest};
//! let broker = PostgresBroker::connect("postgres://postgres@127.0.0.1:5432/test", PostgresOptions::default()).await?;
//! broker.publish(Envelope::new("demo::hello", "default", serde_json::json!({}))?).await?;
//! let got = broker.fetch(&FetchRequest::new(["default"], 10)).await?;
//! broker.ack(&got[0].receipt).await?;
//! # Ok(()) }
//! ```
//!
//! # Storage
//! Every object of a namespace lives in a schema of its own (`stem_<ns>`,
//! see [`schema_name`]), created and upgraded by versioned migrations under
//! an advisory lock, so fifty workers starting at once cannot race. Jobs
//! are rows of `<schema>.jobs` in one of three states (ready, delayed,
//! leased) with two partial indexes: ready rows by `(queue, priority DESC,
//! id)`, delayed and leased rows by `(queue, due)`. A claim is one
//! statement: `FOR UPDATE SKIP LOCKED` over the ready index, plus the rows
//! whose delay or lease ran out (promoted in the same statement, no
//! sweeper), leased with a new fencing token. A settlement is one
//! statement per batch, fenced by each receipt's token; an ack deletes the
//! row, so finished work leaves only dead tuples, which the leading worker
//! vacuums (see [`VacuumPolicy`]). Dead letters live in `<schema>.dead`
//! for the retention window. `<schema>.jobs_v` shows the envelopes as
//! JSON, for people.
//!
//! # Time
//! Every delay end, lease deadline, unique window, expiry and liveness is
//! computed by the server's `now()` inside the statement: clients send
//! durations, never instants (CONTRACT.md B18).
//!
//! # Waiting
//! Each client holds one extra connection that `LISTEN`s on the schema's
//! channel; publishes that make work ready `NOTIFY` it (once per queue per
//! statement), so an idle worker wakes at once, sleeps to the next due
//! time otherwise, and polls only as a fallback every `poll_interval`
//! (1 s): one query per interval per worker, whatever its concurrency.
//! Result waiters and broadcast subscribers share the same connection.
//!
//! # Connections
//! A client holds its pool (sized for the worker's concurrency, see
//! [`default_pool_size`]), the listening connection, and up to two
//! connections for the claim, opened with sequential scans, bitmap scans
//! and sorts priced out (and JIT off) so the claim walks its indexes in
//! order even on a table no `ANALYZE` has seen yet. An unreachable server
//! is reported at `connect` with its cause.
//!
//! # Transactions
//! [`Broker::publish_in`](stem_core::Broker::publish_in) (and the typed
//! `my_task::with().enqueue_in(&mut *tx, ..)`) takes a
//! [`sqlx::PgConnection`] (pass `&mut *tx` for any transaction), a
//! `sqlx::Transaction<'static, Postgres>` or a pooled connection
//! (autocommit). The task and its wake-up exist if and only if that
//! transaction commits. As with any failed statement in Postgres, an error
//! inside leaves the transaction aborted: only `ROLLBACK` is possible.
//!
//! # Outages
//! The pool replaces dead connections and the listener reconnects by
//! itself, then wakes every waiter to look again (a notification sent
//! during the gap is never relied on). A call during an outage answers
//! `Unavailable`, never a false `Ok`.

mod admin;
mod backend;
mod broadcast;
mod broker;
mod client;
mod fetch;
mod listen;
mod maintain;
mod publish;
mod schema;
mod settle;
mod sql;
mod tx;

use std::time::Duration;

pub use backend::PostgresBackend;
pub use broker::PostgresBroker;
pub use schema::schema_name;
/// The sqlx this adapter links, for transactional enqueue: begin a
/// transaction on your own `sqlx::PgPool` and pass `&mut *tx`.
pub use sqlx;

use stem_core::StemError;
use stem_core::error::ConfigError;
use stem_core::url::{AdapterEntry, ConnectOptions, redact};

/// The URL scheme.
pub const SCHEME: &str = "postgres";
/// The URL scheme's other spelling.
pub const SCHEME_LONG: &str = "postgresql";

/// Whether the leading worker vacuums the jobs table itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VacuumPolicy {
    /// `VACUUM` the jobs table when it holds more than 20,000 dead rows (or
    /// 10% of its live ones): a queue table turns over thousands of rows a
    /// second, and autovacuum's defaults come minutes too late (a claim
    /// then steps over dead index entries and slows with the backlog).
    #[default]
    Auto,
    /// Leave it to autovacuum and the DBA; the leader logs once when the
    /// dead rows pass a million.
    Off,
}

/// Settings of the Postgres adapter. Every field but `clock` can also be
/// set in the URL's query string (see [`parse_url`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Namespace: the schema is derived from it (see [`schema_name`]).
    pub namespace: String,
    /// The schema to use instead of the derived one.
    pub schema: Option<String>,
    /// The connection's `application_name` (shown in `pg_stat_activity`);
    /// default `stem`.
    pub application_name: Option<String>,
    /// Connections in the pool; `None`: sized for the worker's concurrency
    /// (`STEM_CONCURRENCY`, else the worker's default: 16 on two cores) by
    /// [`default_pool_size`], 8 for 16 slots. A worker whose pool is too
    /// small for its slots says so when it starts.
    pub max_connections: Option<u32>,
    /// How long an idle consumer sleeps at most between looks when no
    /// notification arrives (the fallback behind `LISTEN`).
    pub poll_interval: Duration,
    /// Largest encoded envelope accepted.
    pub max_envelope_bytes: usize,
    /// How long dead letters are kept.
    pub dead_letter_retention: Duration,
    /// Whether the leader vacuums the jobs table.
    pub vacuum: VacuumPolicy,
    /// The clock this client reads for what it stamps itself (an
    /// envelope's `enqueued_at`, record timestamps); every deadline is the
    /// server's.
    pub clock: stem_core::clock::Clock,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            namespace: String::from(stem_core::client::DEFAULT_NAMESPACE),
            schema: None,
            application_name: None,
            max_connections: None,
            poll_interval: Duration::from_secs(1),
            max_envelope_bytes: stem_core::broker::DEFAULT_MAX_ENVELOPE_BYTES,
            dead_letter_retention: stem_core::broker::DEFAULT_DEAD_LETTER_RETENTION,
            vacuum: VacuumPolicy::Auto,
            clock: stem_core::clock::Clock::system(),
        }
    }
}

/// The pool size a worker of `concurrency` slots needs: the fetcher, the
/// completer, the lease keeper and housekeeping hold one each, and tasks
/// that enqueue from their handlers hold one for a statement, so a quarter
/// of the slots is ample. Between 5 and 32.
///
/// ```
/// assert_eq!(stem_adapters::postgres::default_pool_size(16), 8);
/// assert_eq!(stem_adapters::postgres::default_pool_size(1), 5);
/// assert_eq!(stem_adapters::postgres::default_pool_size(1000), 32);
/// ```
#[must_use]
pub const fn default_pool_size(concurrency: usize) -> u32 {
    let want = 4 + concurrency.div_ceil(4);
    if want < 5 {
        5
    } else if want > 32 {
        32
    } else {
        want as u32
    }
}

/// Parses `postgres[ql]://[user[:password]@]host[:port]/database[?option=value&…]`
/// into the URL given to the driver (Stem's options removed, the driver's
/// own, like `sslmode`, kept) and the options, starting from `base`.
///
/// Stem's options: `namespace`, `schema`, `poll` (fallback poll interval,
/// default 1s), `max_connections`, `max_envelope_bytes` (1 MiB),
/// `dead_letter_retention` (7d), `vacuum` (`auto` or `off`). Durations are
/// written `500ms`, `5s`, `10m`, `1h`, `7d`.
///
/// ```
/// use stem_adapters::postgres::{parse_url, PostgresOptions};
/// let (url, opts) = parse_url("postgres://me@db:5432/app?sslmode=require&poll=2s&max_connections=12", PostgresOptions::default()).unwrap();
/// assert_eq!(url, "postgres://me@db:5432/app?sslmode=require");
/// assert_eq!(opts.poll_interval, std::time::Duration::from_secs(2));
/// assert_eq!(opts.max_connections, Some(12));
/// assert!(parse_url("postgres://db/app?vacuum=sometimes", PostgresOptions::default()).is_err());
/// assert!(parse_url("mysql://db/app", PostgresOptions::default()).is_err());
/// ```
///
/// # Errors
/// [`ConfigError::BadUrl`] saying which part is wrong (password redacted).
pub fn parse_url(
    url: &str,
    base: PostgresOptions,
) -> Result<(String, PostgresOptions), ConfigError> {
    let bad = |reason: String| ConfigError::BadUrl {
        url: redact(url),
        reason,
    };
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| {
            bad(String::from(
                "expected `postgres://user@host:5432/database` (or `postgresql://`)",
            ))
        })?;
    let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
    let host = addr.rsplit_once('@').map_or(addr, |(_, h)| h);
    if host.split('/').next().unwrap_or("").is_empty() {
        return Err(bad(String::from(
            "no host: write `postgres://user@127.0.0.1:5432/database`",
        )));
    }
    let mut opts = base;
    let mut driver: Vec<&str> = Vec::new();
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
            "schema" => {
                schema::check_schema_name(v).map_err(|e| bad(format!("`schema`: {e}")))?;
                opts.schema = Some(v.to_owned());
            }
            "poll" => opts.poll_interval = dur(v)?,
            "max_connections" => {
                opts.max_connections = Some(
                    u32::try_from(count(v)?)
                        .map_err(|_| bad(format!("`max_connections={v}` is too large")))?,
                );
            }
            "max_envelope_bytes" => opts.max_envelope_bytes = count(v)?,
            "dead_letter_retention" => opts.dead_letter_retention = dur(v)?,
            "vacuum" => {
                opts.vacuum = match v {
                    "auto" => VacuumPolicy::Auto,
                    "off" => VacuumPolicy::Off,
                    _ => return Err(bad(format!("`vacuum={v}`: use `auto` or `off`"))),
                };
            }
            "application_name" => {
                opts.application_name = Some(v.to_owned());
            }
            _ => driver.push(pair),
        }
    }
    if opts.poll_interval.is_zero() {
        return Err(bad(String::from("`poll` must be above zero")));
    }
    let scheme_len = url.len() - rest.len();
    let mut out = format!("{}{addr}", &url[..scheme_len]);
    if !driver.is_empty() {
        out.push('?');
        out.push_str(&driver.join("&"));
    }
    Ok((out, opts))
}

fn options_for(opts: &ConnectOptions) -> PostgresOptions {
    PostgresOptions {
        namespace: opts.namespace.clone(),
        ..PostgresOptions::default()
    }
}

fn open_backend(
    opts: ConnectOptions,
) -> futures::future::BoxFuture<
    'static,
    Result<std::sync::Arc<dyn stem_core::ResultBackend>, StemError>,
> {
    Box::pin(async move {
        let b = PostgresBackend::connect(&opts.url, options_for(&opts)).await?;
        Ok(std::sync::Arc::new(b) as std::sync::Arc<dyn stem_core::ResultBackend>)
    })
}

fn open_broker(
    opts: ConnectOptions,
) -> futures::future::BoxFuture<'static, Result<std::sync::Arc<dyn stem_core::Broker>, StemError>> {
    Box::pin(async move {
        let b = PostgresBroker::connect(&opts.url, options_for(&opts)).await?;
        Ok(std::sync::Arc::new(b) as std::sync::Arc<dyn stem_core::Broker>)
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
        scheme: SCHEME_LONG,
        broker: Some(open_broker),
        backend: Some(open_backend),
    }
}

type Openers = (stem_core::url::BrokerOpener, stem_core::url::BackendOpener);

/// Milliseconds of `d` as the `int8` the statements take.
pub(crate) fn ms_of(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
            "postgresql://me:secret@h:5433/db?namespace=app&dead_letter_retention=1h&vacuum=off&application_name=x",
            PostgresOptions::default(),
        )
        .unwrap();
        assert_eq!(u, "postgresql://me:secret@h:5433/db");
        assert_eq!(o.namespace, "app");
        assert_eq!(o.dead_letter_retention, Duration::from_secs(3600));
        assert_eq!(o.vacuum, VacuumPolicy::Off);
        assert_eq!(o.application_name.as_deref(), Some("x"));
        let e = parse_url(
            "postgres://me:secret@h/db?poll=soon",
            PostgresOptions::default(),
        )
        .unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(parse_url("postgres:///db", PostgresOptions::default()).is_err());
        assert!(
            parse_url(
                "postgres://h/db?max_connections=0",
                PostgresOptions::default()
            )
            .is_err()
        );
        assert!(parse_url("postgres://h/db?poll=0s", PostgresOptions::default()).is_err());
        assert!(
            parse_url(
                "postgres://h/db?schema=Bad-Name",
                PostgresOptions::default()
            )
            .is_err()
        );
    }
}
