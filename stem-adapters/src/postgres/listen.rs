//! The one `LISTEN` connection of a client and its fan-out: work made
//! ready in a queue (`j <queue>`), a new due time (`t <queue>`), a record
//! turned terminal (`r <task id>`) and a broadcast (`b <id>`) each bump a
//! watch that the waiters of that thing hold. After the connection was
//! lost every watch is bumped, so each waiter looks once more instead of
//! trusting that nothing was sent during the gap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use stem_core::TaskId;
use tokio::sync::{OnceCell, watch};
use tokio_util::sync::CancellationToken;

/// The listener of one client, started on first use.
pub(crate) struct Hub {
    inner: Arc<Inner>,
    started: OnceCell<()>,
    stop: CancellationToken,
    pool: PgPool,
    channel: String,
    describe: String,
}

#[derive(Default)]
struct Inner {
    queues: Mutex<HashMap<String, watch::Sender<u64>>>,
    records: Mutex<HashMap<TaskId, watch::Sender<u64>>>,
    broadcast: Mutex<Option<watch::Sender<u64>>>,
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|n| *n = n.wrapping_add(1));
}

impl Inner {
    fn dispatch(&self, payload: &str) {
        let (kind, what) = payload.split_once(' ').unwrap_or((payload, ""));
        match kind {
            "j" | "t" => {
                if let Some(tx) = self.lock_queues().get(what) {
                    bump(tx);
                }
            }
            "r" => {
                if let Ok(id) = what.parse::<TaskId>()
                    && let Some(tx) = self.lock_records().get(&id)
                {
                    bump(tx);
                }
            }
            "b" => {
                if let Some(tx) = &*self
                    .broadcast
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                {
                    bump(tx);
                }
            }
            _ => tracing::debug!(payload, "unknown notification"),
        }
    }

    /// Wakes every waiter (after a gap in which notifications may be lost).
    fn wake_all(&self) {
        self.lock_queues().values().for_each(bump);
        self.lock_records().values().for_each(bump);
        if let Some(tx) = &*self
            .broadcast
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            bump(tx);
        }
    }

    fn lock_queues(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_records(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, watch::Sender<u64>>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A waiter on one record; dropping it forgets the record when nobody
/// else waits on it.
pub(crate) struct RecordWatch {
    pub(crate) rx: watch::Receiver<u64>,
    id: TaskId,
    inner: Arc<Inner>,
}

impl Drop for RecordWatch {
    fn drop(&mut self) {
        let mut map = self.inner.lock_records();
        // This receiver is still alive here: 1 means it was the last one.
        if map.get(&self.id).is_some_and(|tx| tx.receiver_count() <= 1) {
            map.remove(&self.id);
        }
    }
}

impl Hub {
    pub(crate) fn new(pool: PgPool, channel: String, describe: String) -> Self {
        Self {
            inner: Arc::new(Inner::default()),
            started: OnceCell::new(),
            stop: CancellationToken::new(),
            pool,
            channel,
            describe,
        }
    }

    /// A watch bumped when work may be ready in `queue`.
    pub(crate) async fn queue(&self, queue: &str) -> watch::Receiver<u64> {
        self.start().await;
        let mut map = self.inner.lock_queues();
        match map.get(queue) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                map.insert(queue.to_owned(), tx);
                rx
            }
        }
    }

    /// A watch bumped when `id`'s record may have turned terminal.
    pub(crate) async fn record(&self, id: TaskId) -> RecordWatch {
        self.start().await;
        let mut map = self.inner.lock_records();
        let rx = match map.get(&id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                map.insert(id, tx);
                rx
            }
        };
        RecordWatch {
            rx,
            id,
            inner: Arc::clone(&self.inner),
        }
    }

    /// A watch bumped when a broadcast was sent in the namespace.
    pub(crate) async fn broadcast(&self) -> watch::Receiver<u64> {
        self.start().await;
        let mut slot = self
            .inner
            .broadcast
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// Starts the listener task once and waits (up to 5 s) for its first
    /// `LISTEN`; if that fails the task keeps trying and waiters fall back
    /// to polling until it succeeds.
    async fn start(&self) {
        self.started
            .get_or_init(|| async {
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let task = Listener {
                    inner: Arc::clone(&self.inner),
                    stop: self.stop.clone(),
                    pool: self.pool.clone(),
                    channel: self.channel.clone(),
                    describe: self.describe.clone(),
                };
                tokio::spawn(task.run(ready_tx));
                if tokio::time::timeout(Duration::from_secs(5), ready_rx)
                    .await
                    .is_err()
                {
                    tracing::warn!(adapter = %self.describe, "LISTEN not established within 5 s; polling until it is");
                }
            })
            .await;
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Listener {
    inner: Arc<Inner>,
    stop: CancellationToken,
    pool: PgPool,
    channel: String,
    describe: String,
}

impl Listener {
    async fn run(self, ready: tokio::sync::oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut failures = 0u32;
        while !self.stop.is_cancelled() {
            // A pool of its own, so the listening connection never takes a
            // place in the client's pool (the user's, with `from_pool`).
            let own = PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .idle_timeout(None)
                .max_lifetime(None)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with((*self.pool.connect_options()).clone());
            let listening = async {
                let mut l = PgListener::connect_with(&own).await?;
                l.ignore_pool_close_event(true);
                l.listen(&self.channel).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                () = self.stop.cancelled() => return,
                l = listening => match l {
                    Ok(l) => l,
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(30) {
                            tracing::warn!(adapter = %self.describe, error = %super::client::error_text(&e), "LISTEN failed; retrying");
                        }
                        tokio::select! {
                            () = self.stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                        continue;
                    }
                },
            };
            if failures > 0 {
                tracing::info!(adapter = %self.describe, "LISTEN re-established");
            }
            failures = 0;
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            // Whatever was sent before this LISTEN was missed.
            self.inner.wake_all();
            loop {
                let got = tokio::select! {
                    () = self.stop.cancelled() => return,
                    got = listener.try_recv() => got,
                };
                match got {
                    Ok(Some(n)) => {
                        self.inner.dispatch(n.payload());
                        while let Some(n) = listener.next_buffered() {
                            self.inner.dispatch(n.payload());
                        }
                    }
                    // The connection was lost and made again (LISTEN
                    // included): anything sent in between is lost.
                    Ok(None) => self.inner.wake_all(),
                    Err(e) => {
                        tracing::warn!(adapter = %self.describe, error = %super::client::error_text(&e), "the LISTEN connection failed; reconnecting");
                        self.inner.wake_all();
                        break;
                    }
                }
            }
        }
    }
}
