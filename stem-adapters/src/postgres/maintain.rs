//! Housekeeping on the leading worker: expired dead letters, unique keys
//! and broadcasts, and the vacuum of the jobs table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::AssertSqlSafe;
use stem_core::BrokerError;

use super::client::Client;
use super::{VacuumPolicy, ms_of};

/// Dead rows in the jobs table past which the leader vacuums it.
const VACUUM_AT: i64 = 20_000;
/// Dead rows past which a leader that may not vacuum says so, once.
const WARN_AT: i64 = 1_000_000;

/// What the leader remembers between runs.
#[derive(Debug, Default)]
pub(crate) struct Housekeeping {
    /// Vacuum turned itself off (no permission) or was never on.
    vacuum_off: AtomicBool,
    /// The "many dead rows" warning was given.
    warned: AtomicBool,
}

/// Takes or renews the namespace's housekeeping lease.
pub(crate) async fn try_lead(
    client: &Client,
    holder: &str,
    ttl: Duration,
) -> Result<bool, BrokerError> {
    let led: Option<String> = sqlx::query_scalar(AssertSqlSafe(client.sql.lead.clone()))
        .bind(holder)
        .bind(ms_of(ttl))
        .fetch_optional(&client.pool)
        .await
        .map_err(|e| client.broker_err("take the housekeeping lease", e))?;
    Ok(led.is_some())
}

/// One round of housekeeping, every statement bounded.
pub(crate) async fn maintain(client: &Client, state: &Housekeeping) -> Result<(), BrokerError> {
    let (dead, keys, broadcasts): (i64, i64, i64) =
        sqlx::query_as(AssertSqlSafe(client.sql.sweep.clone()))
            .fetch_one(&client.pool)
            .await
            .map_err(|e| client.broker_err("housekeeping", e))?;
    if dead + keys + broadcasts > 0 {
        tracing::debug!(dead, keys, broadcasts, "expired rows deleted");
    }
    let (dead_rows, live_rows): (i64, i64) =
        sqlx::query_as(AssertSqlSafe(client.sql.dead_tuples.clone()))
            .fetch_optional(&client.pool)
            .await
            .map_err(|e| client.broker_err("read the jobs table's statistics", e))?
            .unwrap_or((0, 0));
    let off = client.opts.vacuum == VacuumPolicy::Off || state.vacuum_off.load(Ordering::Relaxed);
    if off {
        if dead_rows > WARN_AT && !state.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                schema = %client.schema,
                dead_rows,
                "the jobs table holds over a million dead rows and Stem does not vacuum it (vacuum=off): claims slow down until autovacuum or a VACUUM runs"
            );
        }
        return Ok(());
    }
    if dead_rows > VACUUM_AT.max(live_rows / 10) {
        // Postgres skips a VACUUM by a role that does not own the table
        // with a warning only the server log shows: ask first, once.
        let may: bool = sqlx::query_scalar(AssertSqlSafe(client.sql.may_vacuum.clone()))
            .fetch_one(&client.pool)
            .await
            .map_err(|e| client.broker_err("check who owns the jobs table", e))?;
        if !may {
            state.vacuum_off.store(true, Ordering::Relaxed);
            tracing::warn!(
                schema = %client.schema,
                "this role does not own the jobs table and may not VACUUM it: leaving it to autovacuum (or connect as the owner)"
            );
            return Ok(());
        }
        let started = std::time::Instant::now();
        match sqlx::query(AssertSqlSafe(client.sql.vacuum.clone()))
            .execute(&client.pool)
            .await
        {
            Ok(_) => tracing::debug!(
                schema = %client.schema,
                dead_rows,
                took_ms = started.elapsed().as_millis(),
                "vacuumed the jobs table"
            ),
            Err(e) => return Err(client.broker_err("vacuum the jobs table", e)),
        }
    }
    Ok(())
}
