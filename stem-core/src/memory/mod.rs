//! The in-memory adapter: a [`Broker`] and a [`ResultBackend`] that live in
//! the process's memory. For tests, demos and single-process apps.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
//! use stem_core::{Broker, Envelope, FetchRequest};
//! use stem_core::memory::InMemoryBroker;
//!
//! let broker = InMemoryBroker::new();
//! let env = Envelope::new("demo::hello", "default", serde_json::json!({}))?;
//! broker.publish(env).await?;
//! let got = broker.fetch(&FetchRequest::new(["default"], 10)).await?;
//! assert_eq!(got.len(), 1);
//! broker.ack(&got[0].receipt).await?;
//! # Ok(()) }
//! ```
//!
//! # URLs
//!
//! `memory://` and `memory://name` open the process-wide instance called
//! `name` (the empty name for `memory://`) in the client's namespace: every
//! client opened with the same name and namespace shares one set of queues,
//! dead letters, broadcast channels and results, so a producer and a worker
//! in one process that both `connect("memory://app")` talk to each other.
//! Different names or namespaces never see each other (contract clause B12).
//! A shared instance lives until the process exits or [`forget_shared`] is
//! called. [`InMemoryBroker::new`] and [`InMemoryBackend::new`] make private
//! instances instead.
//!
//! # Capabilities
//!
//! Everything in CONTRACT.md except the clauses that need a server:
//! `durable` (B1: the data dies with the process), `reconnect` (B15: there is
//! no connection to lose) and `server_time` (B18: there is only one clock).
//! Priority (B9) is honoured exactly, delays (B8) to the microsecond, and a
//! fetch over several queues (B10) takes one envelope from each queue in turn,
//! starting from a different queue on every fetch, so no queue starves.

mod backend;
mod broker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;

pub use backend::InMemoryBackend;
pub use broker::InMemoryBroker;

use crate::backend::ResultBackend;
use crate::broker::{Broker, DEFAULT_DEAD_LETTER_RETENTION, DEFAULT_MAX_ENVELOPE_BYTES};
use crate::error::{ConfigError, StemError};
use crate::url::{AdapterEntry, ConnectOptions, redact};

/// Options of an in-memory broker.
///
/// ```
/// use std::time::Duration;
/// use stem_core::memory::{InMemoryBroker, MemoryOptions};
/// let broker = InMemoryBroker::with_options(MemoryOptions {
///     max_envelope_bytes: 64 * 1024,
///     dead_letter_retention: Duration::from_secs(3600),
/// });
/// # drop(broker);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Envelopes whose JSON encoding is larger than this are refused at
    /// publish (B16). Default [`DEFAULT_MAX_ENVELOPE_BYTES`] (1 MiB).
    pub max_envelope_bytes: usize,
    /// Dead letters older than this vanish (B7). Default
    /// [`DEFAULT_DEAD_LETTER_RETENTION`] (7 days).
    pub dead_letter_retention: Duration,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            max_envelope_bytes: DEFAULT_MAX_ENVELOPE_BYTES,
            dead_letter_retention: DEFAULT_DEAD_LETTER_RETENTION,
        }
    }
}

/// The shared instances, by (name, namespace).
#[derive(Default)]
struct Slot {
    broker: Option<Arc<broker::Core>>,
    backend: Option<Arc<backend::Core>>,
}

type Registry = Mutex<HashMap<(String, String), Slot>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

fn shared_broker_core(name: &str, namespace: &str, options: MemoryOptions) -> Arc<broker::Core> {
    let mut map = registry().lock().unwrap_or_else(PoisonError::into_inner);
    let slot = map
        .entry((name.to_owned(), namespace.to_owned()))
        .or_default();
    slot.broker
        .get_or_insert_with(|| Arc::new(broker::Core::new(label(name, namespace), options)))
        .clone()
}

fn shared_backend_core(name: &str, namespace: &str) -> Arc<backend::Core> {
    let mut map = registry().lock().unwrap_or_else(PoisonError::into_inner);
    let slot = map
        .entry((name.to_owned(), namespace.to_owned()))
        .or_default();
    slot.backend
        .get_or_insert_with(|| Arc::new(backend::Core::new(label(name, namespace))))
        .clone()
}

fn label(name: &str, namespace: &str) -> String {
    format!("memory://{name} (namespace {namespace})")
}

/// Forgets the shared instance `name` in `namespace`: the next
/// `memory://name` client starts empty. Clients already open keep working
/// on the old storage, which is freed when the last of them is dropped.
/// Returns whether there was such an instance.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
/// let _stem = stem_core::connect_with("memory://forget-doc", None, "ns").await?;
/// assert!(stem_core::memory::forget_shared("forget-doc", "ns"));
/// assert!(!stem_core::memory::forget_shared("forget-doc", "ns"));
/// # Ok(()) }
/// ```
pub fn forget_shared(name: &str, namespace: &str) -> bool {
    registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&(name.to_owned(), namespace.to_owned()))
        .is_some()
}

/// The instance name in a `memory://name` URL.
fn name_of(url: &str) -> Result<String, ConfigError> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| ConfigError::BadUrl {
            url: redact(url),
            reason: String::from("expected `memory://` or `memory://name`"),
        })?;
    let name = rest
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/');
    if name.contains('/') {
        return Err(ConfigError::BadUrl {
            url: redact(url),
            reason: String::from("an in-memory instance name has no `/`: use `memory://name`"),
        });
    }
    Ok(name.to_owned())
}

fn open_broker(opts: ConnectOptions) -> BoxFuture<'static, Result<Arc<dyn Broker>, StemError>> {
    Box::pin(async move {
        let name = name_of(&opts.url)?;
        let broker = InMemoryBroker::shared(&name, &opts.namespace, MemoryOptions::default());
        Ok(Arc::new(broker) as Arc<dyn Broker>)
    })
}

fn open_backend(
    opts: ConnectOptions,
) -> BoxFuture<'static, Result<Arc<dyn ResultBackend>, StemError>> {
    Box::pin(async move {
        let name = name_of(&opts.url)?;
        let backend = InMemoryBackend::shared(&name, &opts.namespace);
        Ok(Arc::new(backend) as Arc<dyn ResultBackend>)
    })
}

inventory::submit! {
    AdapterEntry {
        scheme: "memory",
        broker: Some(open_broker),
        backend: Some(open_backend),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_urls() {
        assert_eq!(name_of("memory://").unwrap(), "");
        assert_eq!(name_of("memory://app").unwrap(), "app");
        assert_eq!(name_of("memory://app/?x=1").unwrap(), "app");
        assert!(name_of("memory://a/b").is_err());
    }

    #[tokio::test]
    async fn same_name_and_namespace_share_queues() {
        use crate::{Envelope, FetchRequest};
        let a = crate::connect_with("memory://share-test", None, "ns1")
            .await
            .unwrap();
        let b = crate::connect_with("memory://share-test", None, "ns1")
            .await
            .unwrap();
        let other = crate::connect_with("memory://share-test", None, "ns2")
            .await
            .unwrap();
        let env = Envelope::new("t", "q", serde_json::json!({})).unwrap();
        let id = a.publish(env).await.unwrap().id();
        let req = FetchRequest::new(["q"], 10);
        assert!(other.broker().fetch(&req).await.unwrap().is_empty());
        let got = b.broker().fetch(&req).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].envelope.id, id);
        assert!(forget_shared("share-test", "ns1"));
        assert!(forget_shared("share-test", "ns2"));
    }
}
