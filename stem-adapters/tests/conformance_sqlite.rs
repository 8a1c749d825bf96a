//! The conformance kit against the SQLite adapter: every clause of
//! CONTRACT.md, each case in its own database file and namespace.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use stem_adapters::sqlite::{SqliteBackend, SqliteBroker, SqliteOptions};
use stem_core::clock::Clock;
use stem_core::kit::{AdapterFactory, KitOptions};
use stem_core::{Broker, ResultBackend};

struct SqliteFactory;

impl SqliteFactory {
    fn path(opts: &KitOptions) -> PathBuf {
        std::env::temp_dir()
            .join("stem-kit")
            .join(format!("{}.db", opts.storage))
    }

    fn options(opts: &KitOptions) -> SqliteOptions {
        SqliteOptions {
            namespace: opts.namespace.clone(),
            poll_interval: Duration::from_millis(50),
            max_envelope_bytes: opts.max_envelope_bytes,
            dead_letter_retention: opts.dead_letter_retention,
            ..SqliteOptions::default()
        }
    }

    async fn open(opts: &KitOptions) -> SqliteBroker {
        SqliteBroker::open(Self::path(opts), Self::options(opts))
            .await
            .unwrap_or_else(|e| panic!("SQLite opens: {e}"))
    }
}

#[async_trait::async_trait]
impl AdapterFactory for SqliteFactory {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
        Arc::new(Self::open(opts).await)
    }

    async fn backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        Arc::new(
            SqliteBackend::open(Self::path(opts), Self::options(opts))
                .await
                .unwrap_or_else(|e| panic!("SQLite opens: {e}")),
        )
    }

    /// A client with its own writer thread and readers, as a second
    /// process on the file would have.
    async fn peer_broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
        Arc::new(
            SqliteBroker::open_unshared(Self::path(opts), Self::options(opts))
                .await
                .unwrap_or_else(|e| panic!("SQLite opens: {e}")),
        )
    }

    async fn peer_backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        Arc::new(
            SqliteBackend::open_unshared(Self::path(opts), Self::options(opts))
                .await
                .unwrap_or_else(|e| panic!("SQLite opens: {e}")),
        )
    }

    async fn insert_garbage(&self, opts: &KitOptions, queue: &str, bytes: &[u8]) {
        Self::open(opts)
            .await
            .insert_raw(queue, bytes)
            .await
            .unwrap_or_else(|e| panic!("garbage row inserted: {e}"));
    }

    async fn cleanup(&self, opts: &KitOptions) {
        let path = Self::path(opts);
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }

    /// An outage as SQLite knows one: another process holds the database
    /// exclusively for a second; the client under test must ride it out.
    async fn disrupt(&self, opts: &KitOptions) -> Option<()> {
        let path = Self::path(opts);
        let conn = tokio::task::spawn_blocking(move || {
            let conn = rusqlite::Connection::open(path).ok()?;
            conn.execute_batch("BEGIN EXCLUSIVE").ok()?;
            Some(conn)
        })
        .await
        .ok()??;
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::task::spawn_blocking(move || conn.execute_batch("COMMIT").ok())
            .await
            .ok()?
    }

    /// A client whose own clock is off: SQLite judges delays and leases by
    /// its own clock inside each statement, so this client may not.
    async fn skewed_broker(
        &self,
        opts: &KitOptions,
        skew: chrono::TimeDelta,
    ) -> Option<Arc<dyn Broker>> {
        let options = SqliteOptions {
            clock: Clock::skewed(skew),
            ..Self::options(opts)
        };
        let broker = SqliteBroker::open_unshared(Self::path(opts), options)
            .await
            .unwrap_or_else(|e| panic!("SQLite opens: {e}"));
        Some(Arc::new(broker))
    }

    fn tick(&self) -> Duration {
        Duration::from_millis(50)
    }
}

mod conformance {
    use super::SqliteFactory;
    stem_core::conformance_tests!(sqlite, SqliteFactory);
}
