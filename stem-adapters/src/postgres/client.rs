//! What a broker and a backend of one namespace share: the pool, the
//! schema's statements, the listener, and how driver errors become Stem's.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use stem_core::StemError;
use stem_core::error::{BackendError, BrokerError, Cause, ConfigError};
use stem_core::url::redact;

use super::listen::Hub;
use super::schema::{self, MigrateError};
use super::sql::Sql;
use super::{PostgresOptions, default_pool_size, parse_url};

/// One client's connection to a namespace.
pub(crate) struct Client {
    /// The pool every statement runs on (the user's, with `from_pool`).
    pub(crate) pool: PgPool,
    /// Connections of the claim alone (at most 2, opened on first use),
    /// with sequential scans, bitmap scans and sorts priced out (and JIT
    /// off): the claim
    /// must walk its indexes in order whatever the statistics say. Right
    /// after a bulk load, before any `ANALYZE`, the planner otherwise sorts
    /// the whole backlog for each claim (measured: 58 ms instead of 1 ms
    /// for 64 rows of 100,000).
    pub(crate) claim_pool: PgPool,
    /// The schema's name, unquoted.
    pub(crate) schema: String,
    /// Every statement, written for this schema.
    pub(crate) sql: Sql,
    /// The adapter and its redacted address, for logs and errors.
    pub(crate) describe: String,
    /// The options.
    pub(crate) opts: PostgresOptions,
    /// The `LISTEN` connection and its waiters, started on first use.
    pub(crate) hub: Hub,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("describe", &self.describe)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects a new pool to `url` and makes the namespace's schema ready.
    pub(crate) async fn connect(url: &str, opts: PostgresOptions) -> Result<Arc<Self>, StemError> {
        let (url, opts) = parse_url(url, opts)?;
        let describe = format!("postgres {}", redact(&url));
        let connect: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            StemError::from(ConfigError::BadUrl {
                url: redact(&url),
                reason: e.to_string(),
            })
        })?;
        let connect = connect
            .application_name(opts.application_name.as_deref().unwrap_or("stem"))
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(5));
        // One plain connection first: the pool would retry a refused
        // connection until its acquire timeout and then say only "timed
        // out"; this says why, at once.
        let probe = <sqlx::PgConnection as sqlx::Connection>::connect_with(&connect)
            .await
            .map_err(|e| {
                StemError::from(BrokerError::Unavailable {
                    adapter: describe.clone(),
                    reason: format!("cannot connect: {}", error_text(&e)),
                    source: Some(Cause::new(e)),
                })
            })?;
        let _ = sqlx::Connection::close(probe).await;
        let size = opts
            .max_connections
            .unwrap_or_else(|| default_pool_size(worker_concurrency()));
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(true)
            .connect_with(connect)
            .await
            .map_err(|e| {
                StemError::from(BrokerError::Unavailable {
                    adapter: describe.clone(),
                    reason: format!("cannot connect: {}", error_text(&e)),
                    source: Some(Cause::new(e)),
                })
            })?;
        Self::with_pool(pool, opts, describe).await
    }

    /// Uses the caller's pool.
    pub(crate) async fn from_pool(
        pool: PgPool,
        opts: PostgresOptions,
    ) -> Result<Arc<Self>, StemError> {
        let o = pool.connect_options();
        let describe = format!(
            "postgres postgres://{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("")
        );
        Self::with_pool(pool, opts, describe).await
    }

    async fn with_pool(
        pool: PgPool,
        opts: PostgresOptions,
        describe: String,
    ) -> Result<Arc<Self>, StemError> {
        if opts.namespace.is_empty() {
            return Err(bad_value(
                "namespace",
                "",
                "the namespace is empty: leave the default (`stem`) or name one",
            ));
        }
        let schema = match &opts.schema {
            Some(s) => {
                schema::check_schema_name(s).map_err(|why| bad_value("schema", s, &why))?;
                s.clone()
            }
            None => schema::schema_name(&opts.namespace),
        };
        let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
            .fetch_one(&pool)
            .await
            .map_err(|e| StemError::from(broker_error(&describe, "read the server version", e)))?;
        if version < 130_000 {
            return Err(bad_value(
                "PostgreSQL server version",
                &format!("{}.{}", version / 10_000, version % 10_000 / 100),
                &format!("{describe}: Stem needs PostgreSQL 13 or newer"),
            ));
        }
        schema::migrate(&pool, &schema, &opts.namespace)
            .await
            .map_err(|e| match e {
                MigrateError::Db(e) => StemError::from(broker_error(
                    &describe,
                    &format!("prepare schema {schema}"),
                    e,
                )),
                MigrateError::Refused(why) => bad_value("schema", &schema, &why),
            })?;
        let claim_pool = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(true)
            .connect_lazy_with((*pool.connect_options()).clone().options([
                ("enable_seqscan", "off"),
                ("enable_bitmapscan", "off"),
                ("enable_sort", "off"),
                // The penalties make the plan's cost look huge, which would
                // start the JIT compiler (200 ms) on every claim.
                ("jit", "off"),
            ]));
        let sql = Sql::new(&schema::quote(&schema));
        let hub = Hub::new(pool.clone(), schema.clone(), describe.clone());
        Ok(Arc::new(Self {
            pool,
            claim_pool,
            schema,
            sql,
            describe,
            opts,
            hub,
        }))
    }

    /// Whether `other` reads and writes the same tables: the same schema
    /// on the same server and database.
    pub(crate) fn same_storage(&self, other: &Self) -> bool {
        if std::ptr::eq(self, other) {
            return true;
        }
        let (a, b) = (self.pool.connect_options(), other.pool.connect_options());
        self.schema == other.schema
            && a.get_host() == b.get_host()
            && a.get_port() == b.get_port()
            && a.get_database() == b.get_database()
    }

    /// A driver error as a broker error.
    pub(crate) fn broker_err(&self, what: &str, e: sqlx::Error) -> BrokerError {
        broker_error(&self.describe, what, e)
    }

    /// A driver error as a backend error.
    pub(crate) fn backend_err(&self, what: &str, e: sqlx::Error) -> BackendError {
        match broker_error(&self.describe, what, e) {
            BrokerError::Unavailable {
                adapter,
                reason,
                source,
            } => BackendError::Unavailable {
                adapter,
                reason,
                source,
            },
            BrokerError::Storage {
                adapter,
                reason,
                source,
            } => BackendError::Storage {
                adapter,
                reason,
                source,
            },
            other => BackendError::Invalid(other.to_string()),
        }
    }
}

/// The concurrency a worker of this process will run with by default:
/// `STEM_CONCURRENCY` when set, else the worker's own default.
fn worker_concurrency() -> usize {
    std::env::var("STEM_CONCURRENCY")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| stem_core::worker::WorkerConfig::default().concurrency)
}

fn bad_value(key: &str, value: &str, reason: &str) -> StemError {
    ConfigError::BadValue {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
    .into()
}

/// Whether `e` means the server or the connection is gone (retry later),
/// rather than a statement the server refused.
pub(crate) fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 08: connection exceptions; 57P01-03: admin shutdown, crash
            // shutdown, cannot connect now; 53300: too many connections.
            c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// The driver's message, without anything that could hold a password.
pub(crate) fn error_text(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(_) => String::from("bad connection settings"),
        other => other.to_string(),
    }
}

pub(crate) fn broker_error(describe: &str, what: &str, e: sqlx::Error) -> BrokerError {
    let reason = format!("{what}: {}", error_text(&e));
    if is_unavailable(&e) {
        BrokerError::Unavailable {
            adapter: describe.to_owned(),
            reason,
            source: Some(Cause::new(e)),
        }
    } else {
        BrokerError::Storage {
            adapter: describe.to_owned(),
            reason,
            source: Some(Cause::new(e)),
        }
    }
}
