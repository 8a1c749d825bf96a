//! Waiting for task records without polling (R2): one subscriber connection
//! per backend client carries every `wait()` of that client.
//!
//! Each waited task id is one pub/sub channel (`NsKeys::record_done`); the
//! store script publishes on it in the same script that writes a terminal
//! record. Several waiters of one id share one entry and one subscription.
//! A single driver task owns the connection and is the only one that sends
//! `SUBSCRIBE`/`UNSUBSCRIBE`: it compares the channels waited on with the
//! channels subscribed, sends the difference in batches of at most 1,000,
//! and then tells the new entries that they are subscribed. Because one
//! task sends them in order, an unsubscribe of a channel nobody waits on
//! any more can never overtake the subscribe of a new waiter of the same
//! channel. A dispatcher task turns each message into a wake-up of the
//! channel's entry.
//!
//! A waiter subscribes, then reads the record (closing the race with a
//! write in between), then sleeps until its entry changes, a safety
//! re-check period passes, or its timeout. When the connection drops, the
//! driver reconnects (backoff 50 ms to 2 s), subscribes every waited
//! channel again and wakes every waiter, which reads its record again:
//! messages published while it was away are not lost.
//!
//! Why plain `SUBSCRIBE` and not shard channels (`SSUBSCRIBE`): redis-rs
//! 1.8.2 offers `ssubscribe` only on its cluster connection. On a
//! standalone multiplexed connection a raw `SSUBSCRIBE` of one channel
//! would work, but a raw `SUNSUBSCRIBE` is not recognised as a
//! subscription request (redis-rs issue 2533, noted in
//! `aio/multiplexed_connection.rs`): its confirmation is dropped and every
//! later reply goes to the wrong request. So the channels are ordinary
//! ones, and the store script uses `PUBLISH`.
//!
//! On a cluster the same code runs unchanged: the subscriber is a plain
//! connection to one node (the next primary on every reconnect, see
//! `Conn::subscriber`), and a `PUBLISH` on any node reaches every node
//! over the cluster bus (the channel name is not a key, so the script's
//! slot rule is unaffected). Chosen over `ClusterConnection::ssubscribe`
//! because it keeps one tested path for both modes, one subscriber
//! connection per client whatever the cluster's size, and this module's
//! own handling of a dropped connection (resubscribe, then every waiter
//! reads its record again), where the cluster connection resubscribes
//! behind our back. The price is cluster-bus traffic: every terminal
//! record's one small message goes to every node. The done channel
//! already lies in its record's slot (`stem:{<ns>:r:<id>}:done`), so
//! moving to shard channels later is `SPUBLISH` in the store script plus
//! `ssubscribe` on a cluster connection.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::conn::Conn;

/// Channels per `SUBSCRIBE` / `UNSUBSCRIBE` command.
const BATCH: usize = 1000;
/// First reconnect delay.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often an idle subscriber connection is checked with `PING`.
const PING_EVERY: Duration = Duration::from_secs(5);

/// What a waiter watches: whether its channel is subscribed, and a count
/// bumped on every message (and on every resubscription).
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    subscribed: bool,
    events: u64,
}

struct Entry {
    waiters: usize,
    signal: Arc<watch::Sender<Seen>>,
}

struct Shared {
    conn: Arc<Conn>,
    response_timeout: Duration,
    /// Channel -> its waiters.
    channels: Mutex<HashMap<String, Entry>>,
    /// The set of waited channels changed (or the client is closing).
    dirty: Notify,
    /// Set when the backend client is dropped: the driver stops.
    closed: AtomicBool,
}

impl Shared {
    fn channels(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every waiter of one backend client, on one subscriber connection.
pub(crate) struct Waiters {
    shared: Arc<Shared>,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiters")
            .field("channels", &self.shared.channels().len())
            .finish_non_exhaustive()
    }
}

impl Drop for Waiters {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.dirty.notify_one();
    }
}

impl Waiters {
    /// Waiters on `conn`; the subscriber connection opens on the first wait.
    pub(crate) fn new(conn: Arc<Conn>, response_timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                conn,
                response_timeout,
                channels: Mutex::new(HashMap::new()),
                dirty: Notify::new(),
                closed: AtomicBool::new(false),
            }),
            driver: Mutex::new(None),
        }
    }

    /// Starts waiting on `channel`: the returned [`Waiter`] is subscribed
    /// soon (see [`Waiter::subscribed`]) and stops waiting when dropped.
    pub(crate) fn join(&self, channel: String) -> Waiter {
        self.ensure_driver();
        let mut map = self.shared.channels();
        let (signal, new) = match map.get_mut(&channel) {
            Some(e) => {
                e.waiters += 1;
                (e.signal.clone(), false)
            }
            None => {
                let (tx, _) = watch::channel(Seen::default());
                let signal = Arc::new(tx);
                map.insert(
                    channel.clone(),
                    Entry {
                        waiters: 1,
                        signal: signal.clone(),
                    },
                );
                (signal, true)
            }
        };
        drop(map);
        if new {
            self.shared.dirty.notify_one();
        }
        let rx = signal.subscribe();
        Waiter {
            shared: self.shared.clone(),
            channel,
            signal,
            rx,
        }
    }

    /// Spawns the driver on the current runtime unless it runs already (a
    /// driver whose runtime ended is replaced).
    fn ensure_driver(&self) {
        let mut driver = self.driver.lock().unwrap_or_else(PoisonError::into_inner);
        if driver.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let shared = self.shared.clone();
        *driver = Some(tokio::spawn(drive(shared)));
    }
}

/// One `wait()`'s hold on its channel.
pub(crate) struct Waiter {
    shared: Arc<Shared>,
    channel: String,
    /// Keeps the entry's sender alive while this waiter watches it.
    signal: Arc<watch::Sender<Seen>>,
    rx: watch::Receiver<Seen>,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Waiter {
    /// Waits until the channel is subscribed, at most until `until`;
    /// returns whether it is.
    pub(crate) async fn subscribed(&mut self, until: Instant) -> bool {
        matches!(
            tokio::time::timeout_at(until, self.rx.wait_for(|s| s.subscribed)).await,
            Ok(Ok(_))
        )
    }

    /// Marks everything so far as seen: [`Waiter::changed`] returns for
    /// what comes after.
    pub(crate) fn mark_seen(&mut self) {
        let _ = self.rx.borrow_and_update();
    }

    /// Returns when a message arrived (or the channel was subscribed
    /// again) since [`Waiter::mark_seen`], or at `until`.
    pub(crate) async fn changed(&mut self, until: Instant) {
        let _ = tokio::time::timeout_at(until, self.rx.changed()).await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut map = self.shared.channels();
        let last = match map.get_mut(&self.channel) {
            Some(e) if Arc::ptr_eq(&e.signal, &self.signal) => {
                e.waiters = e.waiters.saturating_sub(1);
                e.waiters == 0
            }
            _ => false,
        };
        if last {
            map.remove(&self.channel);
            drop(map);
            self.shared.dirty.notify_one();
        }
    }
}

/// The driver: owns the subscriber connection, keeps its subscriptions
/// equal to the waited channels, reconnects.
async fn drive(shared: Arc<Shared>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut con = match shared.conn.subscriber(tx, shared.response_timeout).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(server = %shared.conn.describe(), error = %e, retry_in = ?backoff, "the result waiters' subscriber connection failed to open");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        let broken = Arc::new(Notify::new());
        let dispatcher = tokio::spawn(dispatch(shared.clone(), rx, broken.clone()));
        let mut actual = HashSet::new();
        let outcome = serve(&shared, &mut con, &mut actual, &broken).await;
        dispatcher.abort();
        drop(con);
        // Whatever was subscribed is gone with the connection.
        for e in shared.channels().values() {
            // No wake-up: the waiters re-read when subscribed again.
            e.signal.send_if_modified(|s| {
                s.subscribed = false;
                false
            });
        }
        match outcome {
            Served::Closed => return,
            Served::Lost(reason) => {
                tracing::warn!(server = %shared.conn.describe(), %reason, "the result waiters' subscriber connection dropped; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

enum Served {
    Closed,
    Lost(String),
}

/// Serves one connection until it breaks or the client closes.
async fn serve(
    shared: &Shared,
    con: &mut MultiplexedConnection,
    actual: &mut HashSet<String>,
    broken: &Notify,
) -> Served {
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return Served::Closed;
        }
        if let Err(e) = sync(shared, con, actual).await {
            return Served::Lost(e.to_string());
        }
        tokio::select! {
            () = shared.dirty.notified() => {}
            () = broken.notified() => return Served::Lost(String::from("the connection closed")),
            () = tokio::time::sleep(PING_EVERY) => {
                let ping: redis::RedisResult<Value> = redis::cmd("PING").query_async(con).await;
                if let Err(e) = ping {
                    return Served::Lost(format!("PING failed: {e}"));
                }
            }
        }
    }
}

/// Subscribes what is waited on and not subscribed, unsubscribes what is
/// subscribed and no longer waited on, then marks the waited entries
/// subscribed (which wakes their waiters to read their records).
async fn sync(
    shared: &Shared,
    con: &mut MultiplexedConnection,
    actual: &mut HashSet<String>,
) -> redis::RedisResult<()> {
    let (add, remove): (Vec<String>, Vec<String>) = {
        let map = shared.channels();
        (
            map.keys()
                .filter(|c| !actual.contains(*c))
                .cloned()
                .collect(),
            actual
                .iter()
                .filter(|c| !map.contains_key(*c))
                .cloned()
                .collect(),
        )
    };
    for chunk in remove.chunks(BATCH) {
        con.unsubscribe(chunk).await?;
        for c in chunk {
            actual.remove(c);
        }
    }
    for chunk in add.chunks(BATCH) {
        con.subscribe(chunk).await?;
        actual.extend(chunk.iter().cloned());
    }
    // New entries, and entries that came back between a leave and this
    // pass (still subscribed on the server), learn they are subscribed.
    let map = shared.channels();
    for (c, e) in map.iter() {
        if actual.contains(c) {
            e.signal.send_if_modified(|s| {
                if s.subscribed {
                    false
                } else {
                    s.subscribed = true;
                    s.events = s.events.wrapping_add(1);
                    true
                }
            });
        }
    }
    Ok(())
}

/// Turns pushed messages into wake-ups; notices a dropped connection.
async fn dispatch(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<PushInfo>,
    broken: Arc<Notify>,
) {
    while let Some(push) = rx.recv().await {
        match push.kind {
            PushKind::Message => {
                let Some(Value::BulkString(channel)) = push.data.first() else {
                    continue;
                };
                let Ok(channel) = std::str::from_utf8(channel) else {
                    continue;
                };
                if let Some(e) = shared.channels().get(channel) {
                    e.signal
                        .send_modify(|s| s.events = s.events.wrapping_add(1));
                }
            }
            PushKind::Disconnection => break,
            _ => {}
        }
    }
    broken.notify_one();
}
