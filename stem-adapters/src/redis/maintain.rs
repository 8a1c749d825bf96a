//! Housekeeping, run by the namespace's leader only (`try_lead`): pending
//! entries that lost their lease member get one back so a fetch hands
//! them out again, consumers of workers that are gone leave the consumer
//! groups, and expired dead letters go. Bounded per queue and call.

use std::time::Duration;

use redis::Value;
use stem_core::BrokerError;

use super::broker::RedisBroker;
use super::ms_of;
use super::scripts;
use super::wire;

/// The backstop never touches an entry idle less than this.
const BACKSTOP_FLOOR: Duration = Duration::from_secs(300);

pub(crate) async fn try_lead(
    b: &RedisBroker,
    holder: &str,
    ttl: Duration,
) -> Result<bool, BrokerError> {
    if holder.is_empty() {
        return Err(BrokerError::Invalid(String::from(
            "the leader's name is empty",
        )));
    }
    let mut inv = scripts::LEAD.prepare_invoke();
    inv.key(b.keys.leader()).arg(holder).arg(ms_of(ttl).max(1));
    let mut c = b.conn.cmd();
    let v: Value = inv
        .invoke_async(&mut c)
        .await
        .map_err(|e| b.conn.broker_error("taking the housekeeping lease", e))?;
    Ok(wire::int(&v) == Some(1))
}

pub(crate) async fn maintain(b: &RedisBroker) -> Result<(), BrokerError> {
    for queue in b.all_queues().await? {
        let keys = b.queue_keys(&queue);
        let mut inv = scripts::REAP.prepare_invoke();
        for k in keys.all() {
            inv.key(k);
        }
        inv.arg(keys.unique_prefix())
            .arg(ms_of(BACKSTOP_FLOOR))
            .arg(ms_of(b.opts.consumer_idle))
            .arg(ms_of(b.opts.dead_letter_retention));
        let mut c = b.conn.cmd();
        let v: Value = inv
            .invoke_async(&mut c)
            .await
            .map_err(|e| b.conn.broker_error("housekeeping", e))?;
        let counts: Vec<i64> = wire::array(&v)
            .unwrap_or_default()
            .iter()
            .filter_map(wire::int)
            .collect();
        if let [fixed, removed] = counts[..]
            && (fixed > 0 || removed > 0)
        {
            tracing::info!(
                queue,
                orphaned_entries = fixed,
                consumers_removed = removed,
                "redis housekeeping"
            );
        }
    }
    Ok(())
}
