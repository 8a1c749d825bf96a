//! The Postgres broker: the [`Broker`] contract over the namespace's
//! schema. The work is in the modules named for each part: `publish`,
//! `fetch`, `settle`, `admin`, `broadcast`, `maintain`, `tx`.

use std::any::Any;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::AssertSqlSafe;
use stem_core::broker::{Broadcast, DeadLetters, QueueAdmin};
use stem_core::{
    Broker, BrokerError, Capabilities, Delivery, Envelope, FetchRequest, Limits, Published,
    Receipt, ResultBackend, Settlement, StemError,
};

use super::client::Client;
use super::maintain::Housekeeping;
use super::{PostgresOptions, default_pool_size, fetch, maintain, publish, settle, tx};

/// The Postgres broker. Cheap to clone: clones share the pool and the
/// listener.
#[derive(Clone, Debug)]
pub struct PostgresBroker {
    pub(crate) client: Arc<Client>,
    rotate: Arc<AtomicUsize>,
    idle: Arc<Mutex<fetch::Idle>>,
    housekeeping: Arc<Housekeeping>,
}

impl PostgresBroker {
    /// Connects a pool of its own to `url` (see
    /// [`parse_url`](super::parse_url) for the options it takes) and makes
    /// the namespace's schema ready.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use stem_adapters::postgres::{PostgresBroker, PostgresOptions};
    /// let broker = PostgresBroker::connect("postgres://postgres@127.0.0.1/app?namespace=billing", PostgresOptions::default()).await?;
    /// # let _ = broker; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// A bad URL, an unreachable server, a server older than PostgreSQL 13,
    /// or a schema that belongs to another namespace.
    pub async fn connect(url: &str, opts: PostgresOptions) -> Result<Self, StemError> {
        Ok(Self::of(Client::connect(url, opts).await?))
    }

    /// Uses an existing pool, the application's own: enqueues inside its
    /// transactions and Stem's statements then share its connections.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use stem_adapters::postgres::{sqlx, PostgresBroker, PostgresOptions};
    /// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
    /// let broker = PostgresBroker::from_pool(pool, PostgresOptions::default()).await?;
    /// # let _ = broker; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// An unreachable server, or a schema that belongs to another namespace.
    pub async fn from_pool(pool: sqlx::PgPool, opts: PostgresOptions) -> Result<Self, StemError> {
        Ok(Self::of(Client::from_pool(pool, opts).await?))
    }

    fn of(client: Arc<Client>) -> Self {
        Self {
            client,
            rotate: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Mutex::new(fetch::Idle::default())),
            housekeeping: Arc::new(Housekeeping::default()),
        }
    }

    /// The schema this broker's namespace lives in.
    #[must_use]
    pub fn schema(&self) -> &str {
        &self.client.schema
    }

    /// The pool this broker runs its statements on.
    #[must_use]
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.client.pool
    }

    /// Stores `bytes` as a ready job of `queue` without checking them, as
    /// garbage from another writer would be (for tests of B16).
    ///
    /// # Errors
    /// The database's.
    pub async fn insert_raw(&self, queue: &str, bytes: &[u8]) -> Result<(), BrokerError> {
        let c = &self.client;
        sqlx::query(AssertSqlSafe(c.sql.insert_raw.clone()))
            .bind(queue)
            .bind(bytes)
            .execute(&c.pool)
            .await
            .map_err(|e| c.broker_err("insert raw bytes", e))?;
        Ok(())
    }

    /// Drops the namespace's schema and everything in it. For tests and
    /// for retiring a namespace; running workers of it fail afterwards.
    ///
    /// # Errors
    /// The database's.
    pub async fn drop_schema(&self) -> Result<(), BrokerError> {
        let c = &self.client;
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            super::schema::quote(&c.schema)
        )))
        .execute(&c.pool)
        .await
        .map_err(|e| c.broker_err("drop the schema", e))?;
        Ok(())
    }

    async fn store(&self, envelopes: &[Envelope]) -> Result<Vec<Published>, BrokerError> {
        let rows = envelopes
            .iter()
            .map(|e| publish::prepare(e, self.client.opts.max_envelope_bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let c = &self.client;
        let mut conn = c
            .pool
            .acquire()
            .await
            .map_err(|e| c.broker_err("publish", e))?;
        publish::store(c, &mut conn, rows, true).await
    }
}

#[async_trait]
impl Broker for PostgresBroker {
    fn describe(&self) -> String {
        self.client.describe.clone()
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.durable = true;
        caps.delay = true;
        caps.priority = true;
        caps.many_queues = true;
        caps.broadcast = true;
        caps.atomic_batch = true;
        caps.reconnect = true;
        caps.unique = true;
        caps.server_time = true;
        caps.limits = Limits::unbounded(self.client.opts.max_envelope_bytes);
        caps
    }

    async fn publish(&self, envelope: Envelope) -> Result<Published, BrokerError> {
        self.store(std::slice::from_ref(&envelope))
            .await?
            .pop()
            .ok_or_else(|| BrokerError::Invalid(String::from("empty publish")))
    }

    async fn publish_many(&self, envelopes: Vec<Envelope>) -> Result<Vec<Published>, BrokerError> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        self.store(&envelopes).await
    }

    async fn publish_in(
        &self,
        tx: &mut (dyn Any + Send),
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<Published>, BrokerError> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        let rows = envelopes
            .iter()
            .map(|e| publish::prepare(e, self.client.opts.max_envelope_bytes))
            .collect::<Result<Vec<_>, _>>()?;
        tx::publish_in(&self.client, tx, rows).await
    }

    async fn fetch(&self, req: &FetchRequest) -> Result<Vec<Delivery>, BrokerError> {
        fetch::fetch(&self.client, req, &self.rotate, &self.idle).await
    }

    async fn extend_leases(
        &self,
        receipts: &[Receipt],
        lease: Duration,
    ) -> Vec<Result<(), BrokerError>> {
        if receipts.is_empty() {
            return Vec::new();
        }
        settle::extend(&self.client, receipts, lease).await
    }

    async fn settle(&self, batch: &[Settlement]) -> Vec<Result<(), BrokerError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        settle::settle(&self.client, batch).await
    }

    /// True for a [`PostgresBackend`](super::PostgresBackend) of the same
    /// schema on the same database: records are then written in the
    /// settlement's statement, and only where the lease was held.
    fn stores_results_of(&self, backend: &dyn ResultBackend) -> bool {
        backend
            .as_any()
            .and_then(|b| b.downcast_ref::<super::PostgresBackend>())
            .is_some_and(|b| self.client.same_storage(&b.client))
    }

    /// A pool smaller than [`default_pool_size`] of `slots` cannot keep
    /// the worker's fetcher, completer, lease keeper and the handlers'
    /// enqueues going at once.
    fn check_capacity(&self, slots: usize) -> Option<String> {
        let have = self.client.pool.options().get_max_connections();
        let want = default_pool_size(slots);
        (have < want).then(|| {
            format!(
                "a pool of {have} connections for {slots} slots: raise it to {want} (URL `?max_connections={want}`) or lower the concurrency"
            )
        })
    }

    fn queues(&self) -> Option<&dyn QueueAdmin> {
        Some(self)
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetters> {
        Some(self)
    }

    fn broadcast(&self) -> Option<&dyn Broadcast> {
        Some(self)
    }

    async fn try_lead(&self, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        maintain::try_lead(&self.client, holder, ttl).await
    }

    async fn maintain(&self) -> Result<(), BrokerError> {
        maintain::maintain(&self.client, &self.housekeeping).await
    }
}
