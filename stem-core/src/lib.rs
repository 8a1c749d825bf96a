//! The core of Stem, a typed background-task framework: the task
//! [`Envelope`], the [`Broker`] and [`ResultBackend`] contracts, the
//! [`Stem`] client, the worker runtime, the in-memory adapter and the
//! adapter conformance kit (module `kit`, behind the `kit` feature that
//! adapter crates enable in their tests).
//!
//! Applications depend on the `stem` facade crate, which re-exports this
//! one together with the `#[stem::task]` macro and the adapters.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
//! use stem_core::{Envelope, FetchRequest};
//! let stem = stem_core::connect("memory://core-doc").await?;
//! let env = Envelope::new("demo::hello", "default", serde_json::json!({"name": "Ada"}))?;
//! let id = stem.publish(env).await?.id();
//! let got = stem.broker().fetch(&FetchRequest::new(["default"], 1)).await?;
//! assert_eq!(got[0].envelope.id, id);
//! stem.broker().ack(&got[0].receipt).await?;
//! # Ok(()) }
//! ```

pub mod backend;
pub mod broker;
pub mod builder;
pub mod by_name;
pub mod client;
pub mod clock;
pub mod context;
pub mod control;
pub mod duration;
pub mod envelope;
pub mod error;
pub mod events;
pub mod handle;
#[cfg(feature = "kit")]
pub mod kit;
pub mod memory;
pub mod registry;
pub mod retry;
pub mod task;
pub mod url;
pub mod worker;

pub use backend::{
    AdvertisedTask, FailureKind, GroupSpec, GroupStatus, ResultBackend, TaskFailure, TaskRecord,
    TaskState, WorkerHeartbeat, WorkerStatus,
};
pub use broker::{
    Broadcast, BroadcastMessage, BroadcastStream, Broker, Capabilities, DeadLetter, DeadLetterPage,
    DeadLetters, Delivery, Disposition, FetchRequest, LeaseModel, Limits, Published, QueueAdmin,
    QueueStats, QueueSummary, Receipt, ReceiptHandle, Replay, Settlement,
};
pub use builder::{EnqueueOptions, Signature, TaskBuilder};
pub use client::{Stem, connect, connect_with};
pub use context::{Context, State, StateMap};
pub use envelope::{Envelope, TaskId, Unique, UniqueRelease};
pub use error::{
    BackendError, BrokerError, Cause, ConfigError, EnvelopeError, StemError, TaskError,
};
pub use handle::TaskHandle;
pub use retry::{Backoff, Fatal, Retry};
pub use task::{DeliveryMode, RateLimit, Task, TaskOptions};

#[doc(hidden)]
pub mod __private;
