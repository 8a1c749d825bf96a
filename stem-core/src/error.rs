//! Typed errors, one enum per layer. Each message says what happened and
//! what to do about it.

use std::sync::Arc;
use std::time::Duration;

use crate::envelope::TaskId;

/// The error underneath a Stem error (a serde, SQLite, I/O or driver
/// error), kept as its [`source`](std::error::Error::source) so the chain
/// reaches the root. Shared (`Arc`), so the errors that hold it stay
/// `Clone`; two causes are equal when their messages are.
///
/// ```
/// use std::error::Error as _;
/// let json = serde_json::from_str::<u32>("x").unwrap_err();
/// let err = stem_core::EnvelopeError::decode(json);
/// assert!(err.source().is_some(), "the serde error is kept");
/// ```
#[derive(Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    /// Keeps `error` as a cause.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(error))
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for Cause {}

/// A problem with an envelope or one of its fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The task name is empty.
    #[error("the task name is empty: give every task a non-empty name")]
    EmptyName,
    /// The queue name has characters brokers cannot store in keys.
    #[error(
        "invalid queue name `{queue}`: use 1 to 128 characters of letters, digits, `_`, `-`, `.` or `:`"
    )]
    BadQueue {
        /// The name given (cut to 140 characters).
        queue: String,
    },
    /// Priority out of range.
    #[error("priority {priority} is out of range: use 0 (lowest) to 9 (highest)")]
    Priority {
        /// The priority given.
        priority: u8,
    },
    /// Arguments could not be serialized.
    #[error("the task arguments could not be serialized to JSON: {reason}")]
    Args {
        /// serde's message.
        reason: String,
        /// serde's error.
        #[source]
        source: Option<Cause>,
    },
    /// Encoding failed.
    #[error("the envelope could not be encoded: {reason}")]
    Encode {
        /// serde's message.
        reason: String,
        /// serde's error.
        #[source]
        source: Option<Cause>,
    },
    /// Bytes that are not an envelope.
    #[error("not a Stem envelope: {reason}")]
    Decode {
        /// serde's message.
        reason: String,
        /// serde's error.
        #[source]
        source: Option<Cause>,
    },
    /// A format version this worker does not read.
    #[error(
        "envelope format v{found} is not supported by this worker (it reads v1): upgrade the worker"
    )]
    Version {
        /// The version found.
        found: u32,
    },
    /// A task id that is not a UUID.
    #[error("`{input}` is not a task id (a UUID): {reason}")]
    BadTaskId {
        /// The input (cut to 64 characters).
        input: String,
        /// The parser's message.
        reason: String,
    },
}

impl EnvelopeError {
    /// Arguments that did not serialize, keeping serde's error.
    #[must_use]
    pub fn args(e: serde_json::Error) -> Self {
        Self::Args {
            reason: e.to_string(),
            source: Some(Cause::new(e)),
        }
    }

    /// An envelope that did not encode, keeping serde's error.
    #[must_use]
    pub fn encode(e: serde_json::Error) -> Self {
        Self::Encode {
            reason: e.to_string(),
            source: Some(Cause::new(e)),
        }
    }

    /// Bytes that are not an envelope, keeping serde's error.
    #[must_use]
    pub fn decode(e: serde_json::Error) -> Self {
        Self::Decode {
            reason: e.to_string(),
            source: Some(Cause::new(e)),
        }
    }
}

/// An error from a [`Broker`](crate::Broker).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The lease behind a receipt expired and the envelope was handed to
    /// another consumer; the ack/extend/nack changed nothing.
    #[error(
        "lease lost for task {task_id}: it expired and the task was re-delivered; raise the task's `lease` or extend it while running"
    )]
    LeaseLost {
        /// The task.
        task_id: TaskId,
    },
    /// The encoded envelope is larger than the adapter accepts.
    #[error(
        "envelope for task {task_id} is {size} bytes, over this broker's limit of {limit} bytes: pass large data by reference (a URL or a row id), or raise the limit"
    )]
    TooLarge {
        /// The task.
        task_id: TaskId,
        /// Encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The envelope failed validation.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The server could not be reached or the connection dropped.
    #[error("broker {adapter} is unavailable: {reason}")]
    Unavailable {
        /// Adapter name and redacted address.
        adapter: String,
        /// What failed.
        reason: String,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The operation is not supported by this adapter.
    #[error("{adapter} does not support {operation}: {hint}")]
    Unsupported {
        /// Adapter name.
        adapter: &'static str,
        /// The operation.
        operation: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// The broker was closed.
    #[error("the broker was closed; connect a new client")]
    Closed,
    /// Invalid input to a broker call.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The storage layer reported an error.
    #[error("broker {adapter} storage error: {reason}")]
    Storage {
        /// Adapter name.
        adapter: String,
        /// What failed.
        reason: String,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },
}

/// An error from a [`ResultBackend`](crate::ResultBackend).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The server could not be reached.
    #[error("result backend {adapter} is unavailable: {reason}")]
    Unavailable {
        /// Adapter name and redacted address.
        adapter: String,
        /// What failed.
        reason: String,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The storage layer reported an error.
    #[error("result backend {adapter} storage error: {reason}")]
    Storage {
        /// Adapter name.
        adapter: String,
        /// What failed.
        reason: String,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// A stored record could not be decoded.
    #[error("result record for {task_id} is corrupt: {reason}")]
    Corrupt {
        /// The task.
        task_id: TaskId,
        /// serde's message.
        reason: String,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// Invalid input.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The backend was closed.
    #[error("the result backend was closed; connect a new client")]
    Closed,
}

/// Writes `err` the way `anyhow` does: its message, then the message of
/// each [`source`](std::error::Error::source) under `Caused by:`. The
/// `Debug` of the top-level errors, so that `main() -> Result<..>` prints
/// something a person can act on instead of nested enum names.
pub(crate) fn fmt_chain(
    err: &(dyn std::error::Error + 'static),
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    write!(f, "{err}")?;
    // A cause whose message the error above it already ends with (the
    // usual "context: cause" form) is not repeated.
    let mut above = err.to_string();
    let causes: Vec<_> = std::iter::successors(err.source(), |e| e.source())
        .filter(|c| {
            let text = c.to_string();
            let repeated = above.ends_with(&text);
            above = text;
            !repeated
        })
        .collect();
    match causes.as_slice() {
        [] => Ok(()),
        [only] => write!(f, "\n\nCaused by:\n    {only}"),
        many => {
            f.write_str("\n\nCaused by:")?;
            for (i, cause) in many.iter().enumerate() {
                write!(f, "\n    {i}: {cause}")?;
            }
            Ok(())
        }
    }
}

/// Errors from connecting, configuring and using a [`Stem`](crate::Stem) client.
///
/// Its `Debug` is the readable message chain (what `main` prints when it
/// returns the error), not the enum's structure:
///
/// ```
/// let err = stem_core::StemError::from(stem_core::ConfigError::BadUrl {
///     url: "nope".into(),
///     reason: "expected `scheme://...`".into(),
/// });
/// assert_eq!(format!("{err:?}"), "invalid URL `nope`: expected `scheme://...`");
/// ```
#[derive(Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StemError {
    /// A broker call failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A result backend call failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The envelope was invalid.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// A configuration value was wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No client was installed and none could be built.
    #[error(
        "no default Stem client: set STEM_BROKER_URL (e.g. `memory://`) or call `stem::connect(url).await?.install_default()` before enqueueing"
    )]
    NoDefaultClient,
    /// The operation needs a result backend and the client has none.
    #[error(
        "this client has no result backend: set STEM_RESULT_BACKEND_URL or use a broker URL whose adapter also stores results"
    )]
    NoResultBackend,
    /// The operation needs the broker's broadcast channel (the control
    /// plane, task events) and the broker has none.
    #[error(
        "the broker {adapter} has no broadcast channel: the control plane and task events need one (the memory, SQLite, Redis and Postgres adapters have it)"
    )]
    NoBroadcast {
        /// The broker, redacted.
        adapter: String,
    },
    /// [`Stem::enqueue_by_name`](crate::Stem::enqueue_by_name) was given a
    /// name that neither this binary nor any live worker knows.
    #[error(
        "unknown task `{name}`: it is not linked into this program and no live worker advertises it{known}; check the name, start a worker that runs it, or give the queue explicitly (`--queue`, `EnqueueOptions::queue`)"
    )]
    UnknownTask {
        /// The name asked for.
        name: String,
        /// `" (known: a, b)"`, or empty.
        known: String,
    },
    /// Arguments given by name do not decode into the task's `Args`.
    #[error(
        "arguments for task `{name}` do not decode as `{args_type}`: {reason}; pass a JSON object with one field per task parameter, e.g. {{\"to\": \"a@example.com\"}}"
    )]
    BadArgs {
        /// The task.
        name: String,
        /// Its `Args` type.
        args_type: String,
        /// serde's message.
        reason: String,
    },
}

impl std::fmt::Debug for StemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_chain(self, f)
    }
}

/// A configuration value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A URL whose scheme no linked adapter handles.
    #[error(
        "no adapter for URL `{url}`: known schemes are {known}; enable the cargo feature of the adapter you want (e.g. `stem = {{ features = [\"sqlite\"] }}`)"
    )]
    UnknownScheme {
        /// The URL, password redacted.
        url: String,
        /// The schemes this binary knows.
        known: String,
    },
    /// A malformed URL.
    #[error("invalid URL `{url}`: {reason}")]
    BadUrl {
        /// The URL, password redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A value that does not parse.
    #[error("invalid value `{value}` for {key}: {reason}")]
    BadValue {
        /// The variable or flag.
        key: String,
        /// The value (redacted if it was a URL).
        value: String,
        /// What is expected.
        reason: String,
    },
}

/// Why awaiting a task's result did not produce its output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The task failed for good.
    #[error("task {task_id} failed: {message} ({type_name})")]
    Failed {
        /// The task.
        task_id: TaskId,
        /// The error's message.
        message: String,
        /// The error's Rust type name (or `panic`, `timeout`).
        type_name: String,
    },
    /// The task was revoked before it ran.
    #[error("task {task_id} was revoked")]
    Revoked {
        /// The task.
        task_id: TaskId,
    },
    /// The task expired before a worker ran it.
    #[error("task {task_id} expired before it ran")]
    Expired {
        /// The task.
        task_id: TaskId,
    },
    /// The wait timed out; the task may still finish.
    #[error(
        "timed out after {waited:?} waiting for task {task_id}; it may still finish, wait again"
    )]
    Timeout {
        /// The task.
        task_id: TaskId,
        /// How long we waited.
        waited: Duration,
    },
    /// The output could not be decoded into the expected type.
    #[error("the output of task {task_id} does not decode as the task's output type: {reason}")]
    Decode {
        /// The task.
        task_id: TaskId,
        /// serde's message.
        reason: String,
    },
    /// The client has no result backend.
    #[error(
        "cannot wait for task {task_id}: the client has no result backend; set STEM_RESULT_BACKEND_URL"
    )]
    NoResultBackend {
        /// The task.
        task_id: TaskId,
    },
    /// The backend could not be read.
    #[error("could not read the result of task {task_id}: {reason}")]
    Backend {
        /// The task.
        task_id: TaskId,
        /// The backend error.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a source, to show the chain.
    #[derive(Debug, thiserror::Error)]
    #[error("{msg}")]
    struct Layer {
        msg: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    struct Chain<'a>(&'a (dyn std::error::Error + 'static));

    impl std::fmt::Debug for Chain<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            fmt_chain(self.0, f)
        }
    }

    fn layer(msg: &'static str, source: Option<Layer>) -> Layer {
        Layer {
            msg,
            source: source.map(Box::new),
        }
    }

    #[test]
    fn debug_is_the_message_chain() {
        let one = layer("top", Some(layer("middle", None)));
        assert_eq!(
            format!("{:?}", Chain(&one)),
            "top\n\nCaused by:\n    middle"
        );
        let two = layer("top", Some(layer("middle", Some(layer("bottom", None)))));
        assert_eq!(
            format!("{:?}", Chain(&two)),
            "top\n\nCaused by:\n    0: middle\n    1: bottom"
        );
        let err = StemError::from(ConfigError::UnknownScheme {
            url: "x://".into(),
            known: "memory://".into(),
        });
        let debug = format!("{err:?}");
        assert_eq!(debug, err.to_string());
        assert!(!debug.contains("UnknownScheme"), "{debug}");
    }
}
