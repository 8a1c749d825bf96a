//! The adapter conformance kit against the in-memory adapter.
//!
//! `cargo test -p stem-core --test conformance_memory` runs every clause;
//! `cargo test memory::b09` runs one. The clauses memory cannot meet (B1,
//! B15, B18) show as `ignored, <reason>`; `-- --ignored --nocapture` runs
//! them by hand and prints their SKIP lines.

use std::sync::Arc;

use async_trait::async_trait;
use stem_core::kit::{AdapterFactory, KitOptions};
use stem_core::memory::{InMemoryBackend, InMemoryBroker, MemoryOptions};
use stem_core::{Broker, ResultBackend};

/// The shared in-memory instance every client of a case opens.
const INSTANCE: &str = "kit";

/// Opens the shared `memory://kit` instance of a case's namespace.
struct MemoryFactory;

impl MemoryFactory {
    fn memory(opts: &KitOptions) -> InMemoryBroker {
        let options = MemoryOptions {
            max_envelope_bytes: opts.max_envelope_bytes,
            dead_letter_retention: opts.dead_letter_retention,
        };
        InMemoryBroker::shared(INSTANCE, &opts.namespace, options)
    }
}

#[async_trait]
impl AdapterFactory for MemoryFactory {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
        Arc::new(Self::memory(opts))
    }

    async fn backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        Arc::new(InMemoryBackend::shared(INSTANCE, &opts.namespace))
    }

    async fn insert_garbage(&self, opts: &KitOptions, queue: &str, bytes: &[u8]) {
        Self::memory(opts).insert_raw(queue, bytes);
    }

    async fn cleanup(&self, opts: &KitOptions) {
        stem_core::memory::forget_shared(INSTANCE, &opts.namespace);
    }

    fn tick(&self) -> std::time::Duration {
        // Memory never polls: waiters are woken directly.
        std::time::Duration::ZERO
    }

    /// A call costs a lock, not a round trip: a batch saves little (about
    /// 1.4x in a debug build, 2-5 ms per 1,000, where a busy machine's noise
    /// is of the same size), so B14 only asks it not to be pathologically
    /// slower (half the speed of singles), and a batch written as a loop of
    /// publishes cannot be told apart by time.
    fn min_batch_speedup(&self) -> f64 {
        0.5
    }

    fn why_not(&self, capability: &str) -> Option<&'static str> {
        match capability {
            "durable" => Some("data lives in process memory"),
            "reconnect" => Some("there is no connection to lose"),
            "server_time" => Some("there is no server, only the process clock"),
            _ => None,
        }
    }
}

mod conformance {
    use super::*;

    stem_core::conformance_tests!(
        memory,
        MemoryFactory,
        unsupported {
            b01_durable_publish: "memory keeps data in process memory: nothing survives a restart",
            b15_reconnect: "memory has no connection to lose",
            b18_server_time: "memory has no server clock, only the process clock",
        }
    );
}
