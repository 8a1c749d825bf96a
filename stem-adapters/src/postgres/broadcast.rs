//! Broadcast channels (B11): a row per message plus a notification, so
//! payloads of any size work and a subscriber whose listener reconnected
//! catches up from the table.

use std::collections::BTreeSet;

use async_trait::async_trait;
use sqlx::AssertSqlSafe;
use stem_core::BrokerError;
use stem_core::broker::{Broadcast, BroadcastMessage, BroadcastStream};

use super::broker::PostgresBroker;

/// How far below its cursor a subscriber looks again for a message whose
/// insert committed after a later one was read.
const WINDOW: i64 = 1000;

fn check_channel(channel: &str) -> Result<(), BrokerError> {
    if channel.is_empty() {
        return Err(BrokerError::Invalid(String::from(
            "the broadcast channel name is empty",
        )));
    }
    Ok(())
}

#[async_trait]
impl Broadcast for PostgresBroker {
    async fn send(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        check_channel(channel)?;
        let c = &self.client;
        sqlx::query(AssertSqlSafe(c.sql.broadcast_send.clone()))
            .bind(channel)
            .bind(payload)
            .bind(&c.schema)
            .execute(&c.pool)
            .await
            .map_err(|e| c.broker_err("send a broadcast", e))?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<BroadcastStream, BrokerError> {
        check_channel(channel)?;
        let c = &self.client;
        let mut watch = c.hub.broadcast().await;
        let floor: i64 = sqlx::query_scalar(AssertSqlSafe(c.sql.broadcast_last.clone()))
            .fetch_one(&c.pool)
            .await
            .map_err(|e| c.broker_err("subscribe", e))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<BroadcastMessage>(1024);
        let client = std::sync::Arc::clone(&self.client);
        let channel = channel.to_owned();
        tokio::spawn(async move {
            let mut cursor = floor;
            let mut seen: BTreeSet<i64> = BTreeSet::new();
            while !tx.is_closed() {
                watch.borrow_and_update();
                let recent: Vec<i64> = seen.iter().copied().collect();
                let rows: Result<Vec<(i64, String)>, _> =
                    sqlx::query_as(AssertSqlSafe(client.sql.broadcast_read.clone()))
                        .bind(&channel)
                        .bind(cursor)
                        .bind(recent)
                        .bind(floor)
                        .fetch_all(&client.pool)
                        .await;
                match rows {
                    Ok(rows) => {
                        for (id, payload) in rows {
                            cursor = cursor.max(id);
                            seen.insert(id);
                            let msg = BroadcastMessage {
                                channel: channel.clone(),
                                payload,
                            };
                            if tx.send(msg).await.is_err() {
                                return;
                            }
                        }
                        seen = seen.split_off(&(cursor - WINDOW));
                    }
                    Err(e) => {
                        tracing::warn!(error = %super::client::error_text(&e), channel, "broadcast read failed; retrying");
                    }
                }
                tokio::select! {
                    _ = watch.changed() => {}
                    () = tokio::time::sleep(client.opts.poll_interval) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        })))
    }
}
