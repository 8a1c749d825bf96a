//! Broker clauses B1..B18 of CONTRACT.md, one public case each, in files
//! by concern: [`delivery`] (B1, B2, B9, B10), [`leases`] (B3..B5),
//! [`dead_letters`] (B6, B7), [`time`] (B8, B18), [`broadcast`] (B11),
//! [`namespaces`] (B12), [`stats`] (B13), [`batch`] (B14), [`reconnect`]
//! (B15), [`input`] (B16) and [`unique`] (B17).
//!
//! Every case is re-exported here, so `kit::broker::b09_priority` names it
//! whatever file it lives in.

pub mod batch;
pub mod broadcast;
pub mod dead_letters;
pub mod delivery;
pub mod input;
pub mod leases;
pub mod namespaces;
pub mod reconnect;
pub mod stats;
pub mod time;
pub mod unique;

pub use batch::b14_batch;
pub use broadcast::b11_broadcast;
pub use dead_letters::{b06_nack_and_dead_letter, b07_dead_letters, b07_get_by_id};
pub use delivery::{b01_durable_publish, b02_at_least_once, b09_priority, b10_many_queues};
pub use input::b16_bad_input;
pub use leases::{b03_exclusive_lease, b04_ack_final_and_fenced, b05_extend_lease};
pub use namespaces::{b12_namespaces, b12_separators};
pub use reconnect::b15_reconnect;
pub use stats::{b13_list_queues, b13_stats_and_purge};
pub use time::{b08_delay, b08_polled_delay_is_not_early, b18_server_time};
pub use unique::b17_unique;

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use futures::StreamExt;

use super::ops::BrokerOps;
use crate::broker::{BroadcastStream, Broker, Delivery, FetchRequest, Published, QueueStats};
use crate::envelope::{Envelope, TaskId, Unique, UniqueRelease};
use crate::error::BrokerError;

/// The lease most cases take.
pub(super) const LEASE: Duration = Duration::from_millis(400);

/// A long lease, for cases that must not see re-deliveries.
pub(super) const LONG_LEASE: Duration = Duration::from_secs(30);

/// A test envelope on `queue` carrying `{"n": n}`.
pub(super) fn job(queue: &str, n: u64) -> Envelope {
    Envelope::new("kit::job", queue, serde_json::json!({ "n": n }))
        .unwrap_or_else(|e| panic!("kit envelope is valid: {e}"))
}

/// The `n` a [`job`] carries.
pub(super) fn n_of(env: &Envelope) -> u64 {
    let v: serde_json::Value = serde_json::from_str(env.args.get())
        .unwrap_or_else(|e| panic!("delivered args are JSON: {e}"));
    v["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("delivered args lost their `n`: {}", env.args.get()))
}

pub(super) fn req(queues: &[&str], max: usize, lease: Duration) -> FetchRequest {
    FetchRequest::new(queues.iter().copied(), max).lease(lease)
}

pub(super) async fn publish(b: &dyn Broker, env: Envelope) -> TaskId {
    match b.publish(env).await {
        Ok(Published::Stored(id)) => id,
        other => panic!("publish should store the envelope, got {other:?}"),
    }
}

pub(super) async fn fetch(b: &dyn Broker, r: &FetchRequest) -> Vec<Delivery> {
    b.fetch(r)
        .await
        .unwrap_or_else(|e| panic!("fetch failed: {e}"))
}

/// Fetches until `n` deliveries arrived or `within` passed.
pub(super) async fn fetch_n(
    b: &dyn Broker,
    queues: &[&str],
    n: usize,
    lease: Duration,
    within: Duration,
) -> Vec<Delivery> {
    let until = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let r = req(queues, n - out.len(), lease).wait(left.min(Duration::from_millis(500)));
        out.extend(fetch(b, &r).await);
    }
    out
}

/// Asserts that nothing is delivered from `queues` for `during`.
async fn assert_nothing(b: &dyn Broker, queues: &[&str], during: Duration, why: &str) {
    let got = fetch(b, &req(queues, 10, LONG_LEASE).wait(during)).await;
    assert!(
        got.is_empty(),
        "{why}: expected no delivery, got {:?}",
        got.iter()
            .map(|d| (d.envelope.id, d.deliveries))
            .collect::<Vec<_>>()
    );
}

pub(super) async fn stats(b: &dyn Broker, queue: &str) -> QueueStats {
    b.stats(queue)
        .await
        .unwrap_or_else(|e| panic!("stats failed: {e}"))
}

fn lease_lost(r: Result<(), BrokerError>, what: &str, id: TaskId) {
    match r {
        Err(BrokerError::LeaseLost { task_id }) => assert_eq!(task_id, id, "{what}"),
        other => panic!("{what}: expected LeaseLost, got {other:?}"),
    }
}
async fn next_message(s: &mut BroadcastStream, within: Duration) -> Option<String> {
    tokio::time::timeout(within, s.next())
        .await
        .ok()
        .flatten()
        .map(|m| m.payload)
}

/// A job whose encoding is at least `bytes` long.
fn job_with_payload(queue: &str, bytes: usize) -> Envelope {
    Envelope::new(
        "kit::big",
        queue,
        serde_json::json!({ "blob": "x".repeat(bytes) }),
    )
    .unwrap_or_else(|e| panic!("kit envelope is valid: {e}"))
}

pub(super) fn unique_job(
    queue: &str,
    n: u64,
    key: &str,
    window: TimeDelta,
    release: UniqueRelease,
) -> Envelope {
    let mut e = job(queue, n);
    e.unique = Some(Unique {
        key: key.to_owned(),
        until: Utc::now() + window,
        release,
    });
    e
}

/// The median of a few durations (sorts them in place).
fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}
