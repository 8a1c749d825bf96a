//! Broadcast (B11) on one stream per channel, trimmed to the last five
//! minutes. A subscriber reads the channel's last id when it subscribes
//! and then follows the stream with blocking `XREAD`s on a connection of
//! its own, so it gets every message sent after `subscribe` returned, once,
//! and resumes after a dropped connection from where it was (B15), which
//! pub/sub cannot do (a reconnect gap drops its messages). The stream lies
//! in the namespace's slot; on a cluster the subscriber's connection goes
//! to the node serving it, found again after a failed read.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::Value;
use stem_core::BrokerError;
use stem_core::broker::{Broadcast, BroadcastMessage, BroadcastStream};

use super::broker::RedisBroker;
use super::conn::Conn;
use super::ms_of;
use super::scripts;
use super::wire;

fn check_channel(channel: &str) -> Result<(), BrokerError> {
    if channel.is_empty() {
        return Err(BrokerError::Invalid(String::from(
            "the broadcast channel name is empty",
        )));
    }
    Ok(())
}

#[async_trait]
impl Broadcast for RedisBroker {
    async fn send(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        check_channel(channel)?;
        let mut inv = scripts::BROADCAST.prepare_invoke();
        inv.key(self.keys.channel(channel)).arg(payload);
        let mut c = self.conn.cmd();
        inv.invoke_async::<Value>(&mut c)
            .await
            .map_err(|e| self.conn.broker_error("broadcasting", e))?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<BroadcastStream, BrokerError> {
        check_channel(channel)?;
        let key = self.keys.channel(channel);
        let mut c = self.conn.cmd();
        let last: Value = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.conn.broker_error("subscribing", e))?;
        let cursor = wire::array(&last)
            .and_then(|a| a.first())
            .and_then(wire::array)
            .and_then(|e| e.first())
            .and_then(wire::text)
            .unwrap_or_else(|| String::from("0-0"));
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(follow(
            self.conn.clone(),
            key,
            channel.to_owned(),
            cursor,
            self.opts.max_block,
            tx,
        ));
        Ok(tokio_stream(rx).boxed())
    }
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<BroadcastMessage>,
) -> impl futures::Stream<Item = BroadcastMessage> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Follows one channel's stream until the subscription is dropped.
async fn follow(
    conn: Arc<Conn>,
    key: String,
    channel: String,
    mut cursor: String,
    block: Duration,
    tx: tokio::sync::mpsc::Sender<BroadcastMessage>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut held = None;
    while !tx.is_closed() {
        let mut c = match held.take() {
            Some(c) => c,
            None => match conn.blocker(&key).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, channel, "broadcast subscriber reconnecting");
                    conn.blocker_failed();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
        };
        let mut read = redis::cmd("XREAD");
        read.arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(ms_of(block).max(1))
            .arg("STREAMS")
            .arg(&key)
            .arg(&cursor);
        match tokio::time::timeout(
            block + Duration::from_secs(1),
            read.query_async::<Value>(&mut c.conn),
        )
        .await
        {
            Ok(Ok(v)) => {
                backoff = Duration::from_millis(50);
                held = Some(c);
                let entries = wire::array(&v)
                    .and_then(|s| s.first())
                    .and_then(wire::array)
                    .and_then(|s| s.get(1))
                    .and_then(wire::array)
                    .unwrap_or_default();
                for e in entries {
                    let Some(e) = wire::array(e) else { continue };
                    let (Some(id), Some(flat)) = (
                        e.first().and_then(wire::text),
                        e.get(1).and_then(wire::array),
                    ) else {
                        continue;
                    };
                    cursor = id;
                    let payload = wire::field(flat, "p")
                        .and_then(wire::text)
                        .unwrap_or_default();
                    if tx
                        .send(BroadcastMessage {
                            channel: channel.clone(),
                            payload,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, channel, "broadcast read failed; resuming");
                conn.blocker_failed();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(_) => tracing::debug!(channel, "broadcast read timed out; new connection"),
        }
    }
    if let Some(c) = held {
        conn.give_back(c);
    }
}
