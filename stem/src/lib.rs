//! Stem: typed background tasks for Rust.
//!
//! Put `#[stem::task]` on an `async fn`, enqueue it with the generated
//! typed functions, and run every linked task with `stem::worker::run()`.
//!
//! ```
//! use std::time::Duration;
//!
//! #[stem::task(queue = "math", retries = 2)]
//! async fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let stem = stem::connect("memory://facade-doc").await?;
//! let worker = stem::worker::Worker::builder().client(&stem).build().await?.start();
//! let handle = add::enqueue_on(&stem, 2, 3).await?;
//! assert_eq!(handle.wait(Duration::from_secs(5)).await?, 5);
//! worker.shutdown();
//! worker.join().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Adapters
//! A URL picks the adapter: `memory://` (one process), `sqlite://path`
//! (feature `sqlite`, on by default). Each adapter is also a typed
//! constructor under [`adapters`].
//!
//! # Enqueue inside your transaction
//! `my_task::enqueue_in(&mut tx, ..)`, `my_task::enqueue_many_in(&mut tx,
//! [..])` and `my_task::with().on(&stem).enqueue_in(&mut tx, ..)` store the
//! task with your own open transaction: it exists if and only if that
//! transaction commits ([`TaskBuilder::enqueue_args_in`] says what `tx` is
//! for each adapter; for Postgres, pass `&mut *tx`). With SQLite, `tx` is a
//! `rusqlite::Connection` on the broker's file, after `BEGIN IMMEDIATE`:
//!
//! ```
//! use stem::adapters::sqlite::rusqlite;
//!
//! #[stem::task(queue = "shipping")]
//! async fn ship(order_id: u64) -> u64 {
//!     order_id
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("stem-doc-tx-{}", stem::TaskId::new()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("shop.db");
//! let stem = stem::connect(&format!("sqlite://{}", path.display())).await?;
//! let mut conn = rusqlite::Connection::open(&path)?;
//! conn.busy_timeout(std::time::Duration::from_secs(10))?;
//! conn.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY)")?;
//!
//! conn.execute_batch("BEGIN IMMEDIATE")?;
//! conn.execute("INSERT INTO orders (id) VALUES (?1)", [42])?;
//! let handle = ship::with().on(&stem).enqueue_in(&mut conn, 42).await?;
//! assert_eq!(stem.stats("shipping").await?.ready, 0, "not before the commit");
//! conn.execute_batch("COMMIT")?; // the order and its task, together
//! assert_eq!(stem.stats("shipping").await?.ready, 1);
//!
//! conn.execute_batch("BEGIN IMMEDIATE")?;
//! conn.execute("INSERT INTO orders (id) VALUES (?1)", [43])?;
//! ship::with().on(&stem).enqueue_many_in(&mut conn, [ship::Args { order_id: 43 }]).await?;
//! conn.execute_batch("ROLLBACK")?; // neither
//! assert_eq!(stem.stats("shipping").await?.ready, 1);
//!
//! let worker = stem::worker::Worker::builder().client(&stem).build().await?.start();
//! assert_eq!(handle.wait(std::time::Duration::from_secs(10)).await?, 42);
//! worker.shutdown();
//! worker.join().await;
//! # drop(conn);
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok(())
//! # }
//! ```
//!
//! # Linking tasks from other crates
//! Tasks register at link time. A crate whose items are never referenced
//! from the final binary can be dropped by the linker with its tasks; name
//! one of its items from the worker (`let _ = my_tasks::send_email::NAME;`).
//! A worker that finds no task at all refuses to start and says so.

// Explicit re-exports (axum's habit): what the facade promises is listed
// here, and an item added to the core is public here only when added.
pub use stem_core::{
    AdvertisedTask, BackendError, Backoff, Broadcast, BroadcastMessage, BroadcastStream, Broker,
    BrokerError, Capabilities, Cause, ConfigError, Context, DeadLetter, DeadLetterPage,
    DeadLetters, Delivery, DeliveryMode, Disposition, EnqueueOptions, Envelope, EnvelopeError,
    FailureKind, Fatal, FetchRequest, GroupSpec, GroupStatus, LeaseModel, Limits, Published,
    QueueAdmin, QueueStats, QueueSummary, RateLimit, Receipt, ReceiptHandle, Replay, ResultBackend,
    Retry, Settlement, Signature, State, StateMap, Stem, StemError, Task, TaskBuilder, TaskError,
    TaskFailure, TaskHandle, TaskId, TaskOptions, TaskRecord, TaskState, Unique, UniqueRelease,
    WorkerHeartbeat, WorkerStatus, connect, connect_with,
};
pub use stem_core::{
    backend, broker, builder, by_name, client, context, control, duration, envelope, error, events,
    handle, memory, registry, retry, task, url, worker,
};
pub use stem_macros::task;

/// The adapters compiled into this build (see the cargo features).
pub mod adapters {
    #[cfg(feature = "postgres")]
    pub use stem_adapters::postgres;
    #[cfg(feature = "redis")]
    pub use stem_adapters::redis;
    #[cfg(feature = "sqlite")]
    pub use stem_adapters::sqlite;
}

#[doc(hidden)]
pub mod __private {
    pub use stem_core::__private::*;

    /// Called by every generated task handler so that a binary with tasks
    /// always links the adapters and their URL registrations.
    #[inline(never)]
    pub fn link_adapters() {
        std::hint::black_box(stem_adapters::link());
    }
}
