//! The adapter conformance kit: CONTRACT.md as tests.
//!
//! Every clause of the contract (B1..B18 for brokers, R1..R7 for result
//! backends) is one or more public async functions taking an
//! [`AdapterFactory`]: the clauses themselves in [`broker`] and
//! [`backend`], settlements and round trips in [`settle`], the contract's
//! decided points in [`decided`], and races between clients in [`races`]. An adapter's test file implements the
//! factory and expands [`conformance_tests!`](crate::conformance_tests),
//! which writes one `#[test]` per clause:
//!
//! ```
//! use std::sync::Arc;
//! use stem_core::kit::{AdapterFactory, KitOptions};
//! use stem_core::memory::{InMemoryBackend, InMemoryBroker, MemoryOptions};
//! use stem_core::{Broker, ResultBackend};
//!
//! struct MemoryFactory;
//!
//! #[async_trait::async_trait]
//! impl AdapterFactory for MemoryFactory {
//!     fn name(&self) -> &'static str {
//!         "memory"
//!     }
//!     async fn broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
//!         Arc::new(self.memory(opts))
//!     }
//!     async fn backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
//!         Arc::new(InMemoryBackend::shared("kit", &opts.namespace))
//!     }
//!     async fn insert_garbage(&self, opts: &KitOptions, queue: &str, bytes: &[u8]) {
//!         self.memory(opts).insert_raw(queue, bytes);
//!     }
//!     async fn cleanup(&self, opts: &KitOptions) {
//!         stem_core::memory::forget_shared("kit", &opts.namespace);
//!     }
//! }
//!
//! impl MemoryFactory {
//!     fn memory(&self, opts: &KitOptions) -> InMemoryBroker {
//!         let options = MemoryOptions {
//!             max_envelope_bytes: opts.max_envelope_bytes,
//!             dead_letter_retention: opts.dead_letter_retention,
//!         };
//!         InMemoryBroker::shared("kit", &opts.namespace, options)
//!     }
//! }
//!
//! // In a test file: one #[test] per clause, named conformance::memory::b09_priority etc.
//! mod conformance {
//!     use super::*;
//!     stem_core::conformance_tests!(memory, MemoryFactory);
//! }
//!
//! // Or run one clause by hand:
//! stem_core::kit::run(async { stem_core::kit::broker::b09_priority(&MemoryFactory).await });
//! ```
//!
//! `cargo test memory::b09` then runs one clause on one adapter.
//!
//! # Rules the cases follow
//!
//! - Each case makes its own namespace (`kit_<adapter>_<clause>_<random>`),
//!   so cases run in parallel, and calls [`AdapterFactory::cleanup`] at the
//!   end, even when it fails.
//! - Durations are short and real (leases of 300-500 ms, retention and TTLs
//!   of 1 s); cases wait for conditions with a deadline rather than sleeping
//!   a fixed time where the contract allows it.
//! - A clause whose capability the adapter declares false (only those in
//!   [`OPTIONAL_CLAUSES`]: B1 durable, B8 delay, B9 priority, B10 many
//!   queues, B11 broadcast, B15 reconnect, B17 unique, B18 server time) is
//!   listed in the test file's `unsupported { clause: "reason" }` and runs
//!   as an `#[ignore = "reason"]` test: a plain `cargo test` prints
//!   `ignored, <reason>` on its line. `unsupported_clauses_match_capabilities`
//!   fails when that list and the broker's capabilities disagree. Run by
//!   hand (`--ignored`), such a clause prints `SKIP <adapter> <clause>:
//!   <what is missing>: <why_not>` (e.g. `SKIP memory B01: not durable:
//!   data lives in process memory`) and passes.
//! - Parts of clauses that need another clause's capability run only where
//!   the adapter has it, silently otherwise (that clause's own ignored test
//!   shows the reason): the delay parts of B6, B13 and B17, the unique parts
//!   of B12 and B13, the broadcast parts of B12 and B15. B06's priority
//!   and unique parts and `b17_race_unique_publish` print a SKIP line, and
//!   so does B14's atomicity half (which has no clause of its own) when
//!   `atomic_batch` is false. B14
//!   always checks order and that a
//!   batch is [`min_batch_speedup`](AdapterFactory::min_batch_speedup)
//!   times faster per envelope than single publishes (medians of five
//!   rounds of 1,000).
//! - A clause the adapter declares supported must really run: B15 fails when
//!   the factory cannot [`disrupt`](AdapterFactory::disrupt), B18 when it
//!   offers no [`skewed_broker`](AdapterFactory::skewed_broker).
//! - Races ([`races`]) run their contenders on
//!   [`peer_broker`](AdapterFactory::peer_broker) and
//!   [`peer_backend`](AdapterFactory::peer_backend) clients, as separate
//!   processes would have them.
//! - Test harness output is captured by `cargo test`; pass `--nocapture` to
//!   see the SKIP lines.

pub mod backend;
pub mod broker;
pub mod decided;
mod ops;
pub mod races;
pub mod settle;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;

use crate::backend::ResultBackend;
use crate::broker::{Broker, DEFAULT_DEAD_LETTER_RETENTION};

/// How long one conformance case may run before [`run`] fails it.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a case asks its factory for: where the adapter should keep its
/// data and the limits to open it with.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct KitOptions {
    /// The adapter's name ([`AdapterFactory::name`]).
    pub adapter: &'static str,
    /// The case, e.g. `b09` (or `b07_retention` for a case's second namespace).
    pub case: String,
    /// Unique per case: `kit_<adapter>_<case>_<random>`. Every key, table,
    /// channel and result of the case lives under it.
    pub namespace: String,
    /// Where the case's data lives: one file, database or server key space
    /// that every namespace of the case shares (B12 is only a test when two
    /// namespaces share storage). Factories key their storage by this, not
    /// by the namespace.
    pub storage: String,
    /// The envelope size limit to open the broker with (B16). 64 KiB.
    pub max_envelope_bytes: usize,
    /// How long dead letters are kept (B7): 7 days, 1 s in the retention case.
    pub dead_letter_retention: Duration,
}

impl KitOptions {
    /// Options for `case` on `adapter` with a fresh random namespace.
    ///
    /// ```
    /// let a = stem_core::kit::KitOptions::new("memory", "b02");
    /// let b = stem_core::kit::KitOptions::new("memory", "b02");
    /// assert!(a.namespace.starts_with("kit_memory_b02_"));
    /// assert_ne!(a.namespace, b.namespace);
    /// ```
    #[must_use]
    pub fn new(adapter: &'static str, case: &str) -> Self {
        let namespace = format!("kit_{adapter}_{case}_{:08x}", rand::random::<u32>());
        Self {
            adapter,
            case: case.to_owned(),
            storage: namespace.clone(),
            namespace,
            max_envelope_bytes: 64 * 1024,
            dead_letter_retention: DEFAULT_DEAD_LETTER_RETENTION,
        }
    }

    /// A second namespace of the same case on the same storage, named so
    /// the two collide as prefixes (`<ns>` and `<ns>2`): an adapter that
    /// matches namespaces by prefix, or ignores them, fails B12.
    ///
    /// ```
    /// let a = stem_core::kit::KitOptions::new("sqlite", "b12");
    /// let b = a.beside("b12_other");
    /// assert_eq!(a.storage, b.storage);
    /// assert!(b.namespace.starts_with(&a.namespace));
    /// ```
    #[must_use]
    pub fn beside(&self, case: &str) -> Self {
        let mut other = self.clone();
        other.case = case.to_owned();
        other.namespace = format!("{}2", self.namespace);
        other
    }

    /// Sets the dead-letter retention.
    #[must_use]
    pub const fn dead_letter_retention(mut self, retention: Duration) -> Self {
        self.dead_letter_retention = retention;
        self
    }
}

/// Builds an adapter's clients for the kit. Object-safe, so the cases take
/// `&dyn AdapterFactory`; see the [module docs](self) for an implementation.
#[async_trait]
pub trait AdapterFactory: Send + Sync + 'static {
    /// The adapter's name used in SKIP lines and test names, e.g. `memory`.
    fn name(&self) -> &'static str;

    /// A broker client on the storage of `opts.namespace`. Two calls with
    /// the same namespace must see the same queues (for a server adapter:
    /// two connections; for memory: the shared instance).
    async fn broker(&self, opts: &KitOptions) -> Arc<dyn Broker>;

    /// A result backend client on the storage of `opts.namespace`; two calls
    /// see the same records.
    async fn backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend>;

    /// A broker client as another process would open it on the same
    /// storage: its own connections and, for an embedded adapter, its own
    /// writer (SQLite: [`open_unshared`]). The race cases ([`races`]) run
    /// their contenders on such peers, so a lock that only holds inside
    /// one client's process fails them. The default is [`Self::broker`],
    /// right when every client already has its own connection (a server
    /// adapter) or when there is no other process to be (memory).
    ///
    /// [`open_unshared`]: https://docs.rs/stem-adapters/latest/stem_adapters/sqlite/struct.SqliteBroker.html#method.open_unshared
    async fn peer_broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
        self.broker(opts).await
    }

    /// A result backend client as another process would open it; see
    /// [`Self::peer_broker`]. The default is [`Self::backend`].
    async fn peer_backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        self.backend(opts).await
    }

    /// Writes bytes that are not an envelope straight into `queue`'s
    /// storage, bypassing `publish` (B16).
    async fn insert_garbage(&self, opts: &KitOptions, queue: &str, bytes: &[u8]);

    /// Drops everything the namespace left behind; called at the end of
    /// every case, passed or failed.
    async fn cleanup(&self, opts: &KitOptions) {
        let _ = opts;
    }

    /// B15 (and B1, for a restart): restarts the server (or drops every
    /// connection) and
    /// returns once it is reachable again. `None`: this factory cannot; B15
    /// then fails unless the adapter declares `reconnect: false` and lists
    /// `b15_reconnect` as unsupported.
    async fn disrupt(&self, opts: &KitOptions) -> Option<()> {
        let _ = opts;
        None
    }

    /// B18 only: a broker client on `opts.namespace` whose own clock (the
    /// [`Clock`](crate::clock::Clock) it reads for what it computes itself)
    /// is off by `skew`, e.g. the adapter opened with
    /// `clock: Clock::skewed(skew)`. `None`: the factory cannot; B18 then
    /// fails unless the adapter declares `server_time: false` and lists
    /// `b18_server_time` as unsupported.
    async fn skewed_broker(
        &self,
        opts: &KitOptions,
        skew: chrono::TimeDelta,
    ) -> Option<Arc<dyn Broker>> {
        let _ = (opts, skew);
        None
    }

    /// Now by the server's clock, for the cases that judge a time the
    /// server stamped (a dead letter's `dead_at`). The default is the test
    /// host's clock, right for embedded adapters and for servers on the
    /// same host; a server adapter reads the server (Redis `TIME`,
    /// Postgres `now()`).
    async fn server_now(&self, opts: &KitOptions) -> chrono::DateTime<chrono::Utc> {
        let _ = opts;
        chrono::Utc::now()
    }

    /// The adapter's poll interval (CONTRACT.md "tick"); 0 for adapters
    /// that never poll. Delays and waits are allowed this much lateness.
    fn tick(&self) -> Duration {
        Duration::from_millis(100)
    }

    /// How many times faster per envelope B14 requires `publish_many` of
    /// 1,000 to be than 1,000 single publishes (medians of five rounds).
    /// 2 by default: with a round trip (or a transaction) per call, a real
    /// batch is several times faster (SQLite measured 4-5x), and a batch
    /// written as a loop of single publishes is about 1x. An adapter whose
    /// calls cost no round trip (memory) may lower it (memory: 0.5).
    fn min_batch_speedup(&self) -> f64 {
        2.0
    }

    /// Why a capability is missing, appended to the SKIP line, e.g.
    /// `data lives in process memory` for `durable`. `capability` is the
    /// [`Capabilities`](crate::Capabilities) field name.
    fn why_not(&self, capability: &str) -> Option<&'static str> {
        let _ = capability;
        None
    }

    /// Why this factory cannot run here, e.g. `no Redis at 127.0.0.1:6379
    /// (set STEM_TEST_REDIS_URL)`; `None` (the default) when it can. Every
    /// case of a factory that answers `Some` prints one `SKIP` line and
    /// passes, unless `STEM_REQUIRE_SERVICES=1` is set (CI), where it fails:
    /// a missing server never hides a failing adapter there. Sync and cheap
    /// (a TCP connect with a short timeout), since every case asks.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// Whether the case `case` must not run because the factory's server is
/// missing ([`AdapterFactory::unavailable`]): prints the SKIP line and
/// answers `true`, or panics when `STEM_REQUIRE_SERVICES=1`. Called by
/// [`conformance_tests!`](crate::conformance_tests) before every case.
///
/// # Panics
/// When the server is missing and `STEM_REQUIRE_SERVICES=1`.
#[must_use]
pub fn server_missing(f: &dyn AdapterFactory, case: &str) -> bool {
    let Some(why) = f.unavailable() else {
        return false;
    };
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{} {case}: {why}, and STEM_REQUIRE_SERVICES=1 requires it",
        f.name()
    );
    // Once per test binary, and past libtest's capture (a passing test's
    // captured output is never shown): written to the real stderr.
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {} (every case, {case} first): {why}",
            f.name()
        );
    });
    true
}

/// Runs one case on a fresh multi-threaded tokio runtime, failing it after
/// [`CASE_TIMEOUT`]. The expansion of
/// [`conformance_tests!`](crate::conformance_tests) calls this, so adapter
/// crates need no tokio dev-dependency.
///
/// # Panics
/// When the case fails or times out, or a runtime cannot be built.
pub fn run<F: Future<Output = ()>>(case: F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build a tokio runtime for the conformance case: {e}"));
    rt.block_on(async {
        if tokio::time::timeout(CASE_TIMEOUT, case).await.is_err() {
            panic!("conformance case timed out after {CASE_TIMEOUT:?}");
        }
    });
}

/// Prints the one SKIP line of a clause.
fn skip(f: &dyn AdapterFactory, clause: &str, missing: &str, capability: &str) {
    match f.why_not(capability) {
        Some(why) => eprintln!("SKIP {} {clause}: {missing}: {why}", f.name()),
        None => eprintln!(
            "SKIP {} {clause}: {missing} (the adapter declares `{capability}: false`)",
            f.name()
        ),
    }
}

/// Runs a case body, then cleans up its namespaces whatever happened.
async fn guarded(
    f: &dyn AdapterFactory,
    namespaces: &[&KitOptions],
    body: impl Future<Output = ()>,
) {
    let outcome = AssertUnwindSafe(body).catch_unwind().await;
    for opts in namespaces {
        f.cleanup(opts).await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Polls `check` until it returns true, panicking with `what` after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The clauses an adapter may declare unsupported, each with the
/// [`Capabilities`](crate::Capabilities) field that says so. Every other
/// clause (B2..B7, B12..B14, B16, R1..R7) must pass on every adapter.
pub const OPTIONAL_CLAUSES: &[(&str, &str)] = &[
    ("b01_durable_publish", "durable"),
    ("b08_delay", "delay"),
    ("b09_priority", "priority"),
    ("b10_many_queues", "many_queues"),
    ("b11_broadcast", "broadcast"),
    ("b15_reconnect", "reconnect"),
    ("b17_unique", "unique"),
    ("b18_server_time", "server_time"),
];

/// Whether `caps` has the capability named by its field name.
fn has(caps: &crate::Capabilities, capability: &str) -> bool {
    match capability {
        "durable" => caps.durable,
        "delay" => caps.delay,
        "priority" => caps.priority,
        "many_queues" => caps.many_queues,
        "broadcast" => caps.broadcast,
        "reconnect" => caps.reconnect,
        "unique" => caps.unique,
        "server_time" => caps.server_time,
        other => panic!("the kit knows no capability `{other}`"),
    }
}

/// Checks that the clauses an adapter's test file lists as unsupported
/// (and so emits as `#[ignore]`d tests) are exactly those whose capability
/// its broker declares false. The expansion of
/// [`conformance_tests!`](crate::conformance_tests) runs this as
/// `<adapter>::unsupported_clauses_match_capabilities`.
///
/// # Panics
/// When a listed clause is not optional, or the list and the capabilities
/// disagree either way.
pub async fn check_unsupported(f: &dyn AdapterFactory, listed: &[&str]) {
    let o = KitOptions::new(f.name(), "capabilities");
    guarded(f, &[&o], async {
        let caps = f.broker(&o).await.capabilities();
        for clause in listed {
            assert!(
                OPTIONAL_CLAUSES.iter().any(|(c, _)| c == clause),
                "{clause} is listed as unsupported by {}, but only these clauses may be: {:?}",
                f.name(),
                OPTIONAL_CLAUSES.iter().map(|(c, _)| *c).collect::<Vec<_>>()
            );
        }
        for (clause, capability) in OPTIONAL_CLAUSES {
            let declared = has(&caps, capability);
            let skipped = listed.contains(clause);
            assert!(
                !(declared && skipped),
                "{} declares `{capability}: true` but lists {clause} as unsupported: \
                 remove it from the list so the clause runs",
                f.name()
            );
            assert!(
                declared || skipped,
                "{} declares `{capability}: false` but does not list {clause} as \
                 unsupported: add `{clause}: \"<why>\"` to conformance_tests!'s \
                 `unsupported {{ .. }}` so the skip shows in `cargo test`",
                f.name()
            );
        }
    })
    .await;
}

/// Expands to one `#[test]` per contract clause for an adapter, in a module
/// named after it: `conformance_tests!(memory, MemoryFactory)` gives
/// `memory::b01_durable_publish` ... `memory::r5_race_chord_finishers`, in
/// the order of CONTRACT.md's clauses, the extra cases of a clause after it.
///
/// The second argument is an expression building the factory; it is
/// evaluated inside the generated module (which starts with `use super::*;`)
/// once per test. See the [`kit`](crate::kit) module docs for a complete
/// example.
///
/// Clauses the adapter cannot support (only those in [`OPTIONAL_CLAUSES`])
/// are listed with the reason, and become `#[ignore = "<reason>"]` tests, so
/// a plain `cargo test` shows `ignored, <reason>` on their lines:
///
/// ```ignore
/// stem_core::conformance_tests!(memory, MemoryFactory, unsupported {
///     b01_durable_publish: "data lives in process memory",
/// });
/// ```
///
/// One more test, `unsupported_clauses_match_capabilities`, fails when the
/// list and the broker's [`Capabilities`](crate::Capabilities) disagree.
#[macro_export]
macro_rules! conformance_tests {
    ($adapter:ident, $factory:expr $(,)?) => {
        $crate::conformance_tests!($adapter, $factory, unsupported {});
    };
    ($adapter:ident, $factory:expr, unsupported { $($skip:ident : $reason:literal),* $(,)? } $(,)?) => {
        $crate::conformance_tests!(@cases ($) $adapter, $factory; [$($skip : $reason),*];
            broker::b01_durable_publish,
            broker::b02_at_least_once,
            broker::b03_exclusive_lease,
            broker::b04_ack_final_and_fenced,
            settle::b04_settle_batch_settles_each,
            decided::b04_late_ack_before_redelivery_succeeds,
            broker::b05_extend_lease,
            broker::b06_nack_and_dead_letter,
            settle::b06_envelope_round_trip,
            settle::b06_settle_keeps_priority_and_unique_key,
            settle::b06_delayed_release_waits,
            broker::b07_dead_letters,
            broker::b07_get_by_id,
            decided::b07_undecodable_is_never_replayed,
            broker::b08_delay,
            broker::b08_polled_delay_is_not_early,
            broker::b09_priority,
            broker::b10_many_queues,
            broker::b11_broadcast,
            broker::b12_namespaces,
            broker::b12_separators,
            broker::b13_stats_and_purge,
            broker::b13_list_queues,
            settle::b13_purge_is_per_queue_and_stats_see_expiry,
            broker::b14_batch,
            broker::b15_reconnect,
            broker::b16_bad_input,
            broker::b17_unique,
            broker::b18_server_time,
            backend::r1_states,
            backend::r2_wait,
            backend::r3_expiry,
            backend::r3_maintain_keeps_live_data,
            backend::r4_groups,
            decided::r4_create_group_keeps_existing,
            backend::r5_chords,
            backend::r5_chord_waits_for_terminal_members,
            backend::r6_heartbeats,
            backend::r7_revocation,
            backend::r8_forget,
            races::b03_race_two_consumers,
            races::b04_race_expiry_vs_late_ack,
            races::b17_race_unique_publish,
            races::r5_race_chord_finishers,
        );
    };
    (@cases ($d:tt) $adapter:ident, $factory:expr; [$($skip:ident : $reason:literal),*];
        $($module:ident :: $case:ident),* $(,)?) => {
        mod $adapter {
            #[allow(unused_imports)]
            use super::*;

            // One arm per unsupported clause (matched by name), then the rest.
            macro_rules! __stem_kit_case {
                $( ($skip, $d($d item:tt)*) => { #[test] #[ignore = $reason] $d($d item)* }; )*
                ($d other:ident, $d($d item:tt)*) => { #[test] $d($d item)* };
            }

            $(
                __stem_kit_case!($case, fn $case() {
                    let factory = $factory;
                    if $crate::kit::server_missing(&factory, stringify!($case)) {
                        return;
                    }
                    $crate::kit::run(async move {
                        $crate::kit::$module::$case(&factory).await;
                    });
                });
            )*

            #[test]
            fn unsupported_clauses_match_capabilities() {
                let factory = $factory;
                if $crate::kit::server_missing(&factory, "unsupported_clauses_match_capabilities") {
                    return;
                }
                $crate::kit::run(async move {
                    $crate::kit::check_unsupported(&factory, &[$(stringify!($skip)),*]).await;
                });
            }
        }
    };
}
