//! `publish_in`: envelopes stored on the caller's own connection, inside
//! its open transaction, so they exist if and only if it commits.

use std::any::Any;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres, Transaction};
use stem_core::{BrokerError, Published};

use super::client::Client;
use super::publish::{self, NewRow};

/// What `publish_in` takes, in the words of its error.
const TAKES: &str = "publish_in on Postgres takes `&mut *tx` for a sqlx transaction (a `sqlx::PgConnection`), `&mut tx` for a `sqlx::Transaction<'static, Postgres>` from `pool.begin()`, or a `sqlx::pool::PoolConnection<Postgres>` (autocommit); use the sqlx that `stem::adapters::postgres::sqlx` re-exports";

/// Stores `rows` on whichever connection `tx` is.
pub(crate) async fn publish_in(
    client: &Client,
    tx: &mut (dyn Any + Send),
    rows: Vec<NewRow>,
) -> Result<Vec<Published>, BrokerError> {
    let conn: &mut PgConnection = if tx.is::<PgConnection>() {
        tx.downcast_mut::<PgConnection>()
            .ok_or_else(|| BrokerError::Invalid(String::from(TAKES)))?
    } else if tx.is::<Transaction<'static, Postgres>>() {
        tx.downcast_mut::<Transaction<'static, Postgres>>()
            .map(|t| &mut **t)
            .ok_or_else(|| BrokerError::Invalid(String::from(TAKES)))?
    } else if tx.is::<PoolConnection<Postgres>>() {
        // Autocommit: a batch of several statements gets a transaction of
        // its own, as on the pool.
        let c = tx
            .downcast_mut::<PoolConnection<Postgres>>()
            .ok_or_else(|| BrokerError::Invalid(String::from(TAKES)))?;
        return publish::store(client, c, rows, true)
            .await
            .map_err(|e| in_tx(client, e));
    } else {
        return Err(BrokerError::Invalid(String::from(TAKES)));
    };
    publish::store(client, conn, rows, false)
        .await
        .map_err(|e| in_tx(client, e))
}

/// A transaction on another database finds no jobs table: say what to do.
fn in_tx(client: &Client, e: BrokerError) -> BrokerError {
    match e {
        BrokerError::Storage {
            adapter,
            reason,
            source,
        } if reason.contains("does not exist") => BrokerError::Storage {
            adapter,
            reason: format!(
                "{reason} (publish_in needs a transaction on the database that holds schema {}; the transaction is now aborted: roll it back)",
                client.schema
            ),
            source,
        },
        other => other,
    }
}
