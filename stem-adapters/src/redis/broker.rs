//! [`RedisBroker`]: the client, its settings and the [`Broker`] impl,
//! which hands each operation to the module named for it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use async_trait::async_trait;
use stem_core::broker::{Broadcast, DeadLetters, QueueAdmin};
use stem_core::{
    Broker, BrokerError, Capabilities, Delivery, Envelope, FetchRequest, LeaseModel, Limits,
    Published, Receipt, Settlement,
};

use super::conn::Conn;
use super::keys::{NsKeys, QueueKeys};
use super::{RedisOptions, parse_url};

/// A Redis Streams broker client. Cheap to share (`Arc`); every clone of
/// the `Arc` uses the same connections.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::BrokerError> {
/// use stem_adapters::redis::{RedisBroker, RedisOptions};
/// let opts = RedisOptions { namespace: "billing".into(), ..RedisOptions::default() };
/// let broker = RedisBroker::connect("redis://127.0.0.1:6379/0?pool=2", opts).await?;
/// # let _ = broker; Ok(()) }
/// ```
pub struct RedisBroker {
    pub(crate) conn: Arc<Conn>,
    pub(crate) keys: NsKeys,
    pub(crate) opts: RedisOptions,
    /// Queues this client has registered in the namespace's queue set.
    pub(crate) known: std::sync::Mutex<HashSet<String>>,
    /// Where the next multi-queue fetch starts (B10 rotation).
    pub(crate) rotation: AtomicUsize,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("server", &self.conn.describe())
            .field("namespace", &self.opts.namespace)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Connects to `url` (`redis://` or `rediss://`; query options, see
    /// [`parse_url`], override `opts`) and checks the server: Redis 7.0 or
    /// newer is required, and a server that keeps nothing on disk or may
    /// evict keys is warned about.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] for a bad URL, [`BrokerError::Unavailable`]
    /// when the server cannot be reached or is too old.
    pub async fn connect(url: &str, opts: RedisOptions) -> Result<Self, BrokerError> {
        let (url, opts) = parse_url(url, opts).map_err(|e| BrokerError::Invalid(e.to_string()))?;
        if opts.namespace.is_empty() {
            return Err(BrokerError::Invalid(String::from(
                "the namespace is empty: name one (e.g. `default`)",
            )));
        }
        let conn = Conn::open(&url, &opts).await?;
        Ok(Self {
            conn,
            keys: NsKeys::new(&opts.namespace),
            opts,
            known: std::sync::Mutex::new(HashSet::new()),
            rotation: AtomicUsize::new(0),
        })
    }

    pub(crate) fn queue_keys(&self, queue: &str) -> QueueKeys {
        self.keys.queue(queue)
    }

    /// Adds `queue` to the namespace's queue set the first time this
    /// client uses it (maintenance walks that set).
    pub(crate) async fn register_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let new = self
            .known
            .lock()
            .map(|k| !k.contains(queue))
            .unwrap_or(true);
        if !new {
            return Ok(());
        }
        let mut c = self.conn.cmd();
        redis::cmd("SADD")
            .arg(self.keys.queues())
            .arg(queue)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.conn.broker_error("registering the queue", e))?;
        if let Ok(mut k) = self.known.lock() {
            k.insert(queue.to_owned());
        }
        Ok(())
    }

    /// The queues of this namespace, as registered by every client.
    pub(crate) async fn all_queues(&self) -> Result<Vec<String>, BrokerError> {
        let mut c = self.conn.cmd();
        redis::cmd("SMEMBERS")
            .arg(self.keys.queues())
            .query_async(&mut c)
            .await
            .map_err(|e| self.conn.broker_error("listing queues", e))
    }

    /// Writes raw bytes as a stream entry of `queue` (priority 0),
    /// bypassing `publish`: how the conformance kit plants garbage (B16).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] or `Storage` from Redis.
    #[doc(hidden)]
    pub async fn insert_raw(&self, queue: &str, bytes: &[u8]) -> Result<(), BrokerError> {
        self.register_queue(queue).await?;
        let mut c = self.conn.cmd();
        redis::cmd("XADD")
            .arg(self.queue_keys(queue).stream(0))
            .arg("*")
            .arg("e")
            .arg(bytes)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.conn.broker_error("inserting raw bytes", e))
    }

    /// Deletes every key of `namespace` on the server this client is
    /// connected to (`SCAN` + `UNLINK` in batches; on a cluster the scan
    /// runs on every primary): for tests and for retiring a namespace.
    /// Returns how many keys went.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] or `Storage` from Redis.
    #[doc(hidden)]
    pub async fn delete_namespace(&self, namespace: &str) -> Result<u64, BrokerError> {
        self.conn
            .unlink_matching(&NsKeys::new(namespace).patterns())
            .await
            .map_err(|e| self.conn.broker_error("deleting the namespace's keys", e))
    }
}

/// At most this many due delayed envelopes are moved to their streams by
/// one fetch, so a million due at once drain in bounded steps.
pub(crate) const PROMOTE_PER_FETCH: usize = 256;

#[async_trait]
impl Broker for RedisBroker {
    fn describe(&self) -> String {
        format!(
            "{} (namespace {})",
            self.conn.describe(),
            self.opts.namespace
        )
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::none();
        c.durable = true;
        c.delay = true;
        c.priority = true;
        c.many_queues = true;
        c.broadcast = true;
        // On a cluster a batch is one call per queue: atomic per queue,
        // not across queues.
        c.atomic_batch = !self.conn.is_cluster();
        c.reconnect = true;
        c.unique = true;
        c.server_time = true;
        c.lease = LeaseModel::Extendable;
        c.limits = Limits::unbounded(self.opts.max_envelope_bytes);
        c
    }

    async fn publish(&self, envelope: Envelope) -> Result<Published, BrokerError> {
        super::publish::publish(self, envelope).await
    }

    async fn publish_many(&self, envelopes: Vec<Envelope>) -> Result<Vec<Published>, BrokerError> {
        super::publish::publish_many(self, envelopes).await
    }

    async fn fetch(&self, req: &FetchRequest) -> Result<Vec<Delivery>, BrokerError> {
        super::fetch::fetch(self, req).await
    }

    async fn extend_leases(
        &self,
        receipts: &[Receipt],
        lease: Duration,
    ) -> Vec<Result<(), BrokerError>> {
        super::settle::extend(self, receipts, lease).await
    }

    async fn settle(&self, batch: &[Settlement]) -> Vec<Result<(), BrokerError>> {
        super::settle::settle(self, batch).await
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
        super::maintain::try_lead(self, holder, ttl).await
    }

    async fn maintain(&self) -> Result<(), BrokerError> {
        super::maintain::maintain(self).await
    }
}
