//! The conformance kit against the Postgres adapter, on the server at
//! `STEM_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Every case uses its own namespaces, so its own schemas, in that one
//! database (B12's two namespaces share the database and the server), and
//! its clients carry an `application_name` of their own so `disrupt` can
//! terminate exactly its connections while other cases run on. Without a
//! reachable server every case prints a SKIP line (and fails under
//! `STEM_REQUIRE_SERVICES=1`).
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::Duration;

use stem_adapters::postgres::{PostgresBackend, PostgresBroker, PostgresOptions, schema_name};
use stem_core::clock::Clock;
use stem_core::kit::{AdapterFactory, KitOptions};
use stem_core::{Broker, ResultBackend};

#[path = "support/postgres.rs"]
mod pg;
use pg::{admin, server_url};

/// The `application_name` of a case's clients: `stem-kit-` and a hash of
/// its storage, so every namespace of the case shares it.
fn app_of(opts: &KitOptions) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in opts.storage.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("stem-kit-{h:016x}")
}

struct PostgresFactory;

impl PostgresFactory {
    fn options(opts: &KitOptions) -> PostgresOptions {
        PostgresOptions {
            namespace: opts.namespace.clone(),
            max_envelope_bytes: opts.max_envelope_bytes,
            dead_letter_retention: opts.dead_letter_retention,
            application_name: Some(app_of(opts)),
            poll_interval: Duration::from_millis(100),
            ..PostgresOptions::default()
        }
    }

    async fn open(options: PostgresOptions) -> PostgresBroker {
        PostgresBroker::connect(&server_url(), options)
            .await
            .unwrap_or_else(|e| panic!("Postgres connects: {e}"))
    }
}

#[async_trait::async_trait]
impl AdapterFactory for PostgresFactory {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn unavailable(&self) -> Option<String> {
        pg::unavailable()
    }

    async fn broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
        Arc::new(Self::open(Self::options(opts)).await)
    }

    async fn backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        Arc::new(
            PostgresBackend::connect(&server_url(), Self::options(opts))
                .await
                .unwrap_or_else(|e| panic!("Postgres backend connects: {e}")),
        )
    }

    async fn insert_garbage(&self, opts: &KitOptions, queue: &str, bytes: &[u8]) {
        Self::open(Self::options(opts))
            .await
            .insert_raw(queue, bytes)
            .await
            .unwrap_or_else(|e| panic!("garbage inserted: {e}"));
    }

    /// Drops the namespace's schema, then checks it is gone.
    async fn cleanup(&self, opts: &KitOptions) {
        let schema = schema_name(&opts.namespace);
        let mut c = admin().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("schema {schema} dropped: {e}"));
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = $1")
            .bind(&schema)
            .fetch_one(&mut c)
            .await
            .unwrap_or_else(|e| panic!("schemas counted: {e}"));
        assert_eq!(left, 0, "schema {schema} outlived its cleanup");
    }

    /// Terminates every server connection of this case (its
    /// `application_name`), the listening ones included.
    async fn disrupt(&self, opts: &KitOptions) -> Option<()> {
        let mut c = admin().await;
        sqlx::query(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
        )
        .bind(app_of(opts))
        .execute(&mut c)
        .await
        .ok()?;
        Some(())
    }

    async fn skewed_broker(
        &self,
        opts: &KitOptions,
        skew: chrono::TimeDelta,
    ) -> Option<Arc<dyn Broker>> {
        let options = PostgresOptions {
            clock: Clock::skewed(skew),
            ..Self::options(opts)
        };
        Some(Arc::new(Self::open(options).await))
    }

    async fn server_now(&self, _opts: &KitOptions) -> chrono::DateTime<chrono::Utc> {
        let mut c = admin().await;
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut c)
            .await
            .unwrap_or_else(|e| panic!("SELECT now(): {e}"))
    }

    fn tick(&self) -> Duration {
        Duration::from_millis(100)
    }
}

mod conformance {
    use super::PostgresFactory;
    stem_core::conformance_tests!(postgres, PostgresFactory);
}

/// A pool too small for a worker's slots is reported with what to set.
#[test]
fn a_pool_too_small_for_the_slots_is_reported() {
    if stem_core::kit::server_missing(&PostgresFactory, "pool_capacity") {
        return;
    }
    stem_core::kit::run(async {
        let opts = KitOptions::new("postgres", "pool");
        let broker = PostgresFactory::open(PostgresOptions {
            max_connections: Some(5),
            ..PostgresFactory::options(&opts)
        })
        .await;
        let warning = broker
            .check_capacity(64)
            .expect("5 connections cannot serve 64 slots");
        assert!(
            warning.contains("max_connections=20") && warning.contains("64 slots"),
            "{warning}"
        );
        assert_eq!(
            broker.check_capacity(4),
            None,
            "5 connections serve 4 slots"
        );
        broker.drop_schema().await.expect("schema dropped");
    });
}

/// Many clients creating one namespace's schema at once: the migration's
/// advisory lock makes them wait for one another, so none fails and the
/// schema is made once.
#[test]
fn concurrent_first_connects_migrate_once() {
    if stem_core::kit::server_missing(&PostgresFactory, "concurrent_migrations") {
        return;
    }
    stem_core::kit::run(async {
        let opts = KitOptions::new("postgres", "migrate");
        let connects = (0..8).map(|_| PostgresFactory::open(PostgresFactory::options(&opts)));
        let brokers = futures::future::join_all(connects).await;
        let schema = schema_name(&opts.namespace);
        let mut c = admin().await;
        let version: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT value FROM \"{schema}\".meta WHERE key = 'version'"
        )))
        .fetch_all(&mut c)
        .await
        .expect("meta read");
        assert_eq!(version, ["1"], "one version row");
        let jobs: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'jobs'",
        )
        .bind(&schema)
        .fetch_one(&mut c)
        .await
        .expect("tables counted");
        assert_eq!(jobs, 1);
        brokers[0].drop_schema().await.expect("schema dropped");
    });
}
