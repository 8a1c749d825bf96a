//! The link-time task registry: `#[stem::task]` submits a [`TaskEntry`]
//! through `inventory`; workers read them all at start.

use std::any::TypeId;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::value::RawValue;

use crate::backend::{FailureKind, TaskFailure};
use crate::context::{Context, StateMap};
use crate::task::TaskOptions;

/// What a handler's future resolves to: the encoded output or a failure.
pub type HandlerResult = Result<Box<RawValue>, HandlerError>;

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;

/// A task function as the worker calls it: decode the arguments (an error
/// here means the payload is bad and the task is dead-lettered), then run.
pub type HandlerFn = fn(Context, &RawValue) -> Result<HandlerFuture, DecodeError>;

/// A failed attempt, with what the error asks of the retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// The error as recorded.
    pub failure: TaskFailure,
    /// What the retry policy should do.
    pub directive: crate::retry::RetryDirective,
}

impl HandlerError {
    /// From a handler's error value, keeping its message and type name and
    /// honouring [`Retry`](crate::Retry) / [`Fatal`](crate::Fatal).
    pub fn from_error<E: std::fmt::Display + 'static>(err: &E) -> Self {
        let directive = crate::retry::directive_of(err);
        let kind = if directive == crate::retry::RetryDirective::Fatal {
            FailureKind::Fatal
        } else {
            FailureKind::Error
        };
        Self {
            failure: TaskFailure {
                message: err.to_string(),
                type_name: std::any::type_name::<E>().to_owned(),
                kind,
            },
            directive,
        }
    }

    /// A failure of the given kind that follows the retry policy.
    #[must_use]
    pub fn new(kind: FailureKind, type_name: &str, message: impl Into<String>) -> Self {
        Self {
            failure: TaskFailure {
                message: message.into(),
                type_name: type_name.to_owned(),
                kind,
            },
            directive: crate::retry::RetryDirective::Policy,
        }
    }
}

/// Decodes JSON arguments as a task's `Args` and drops them.
pub type ArgsCheckFn = fn(&RawValue) -> Result<(), DecodeError>;

/// Arguments that did not decode into the task's `Args`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("arguments do not decode as `{args_type}`: {reason}")]
pub struct DecodeError {
    /// The `Args` type.
    pub args_type: &'static str,
    /// serde's message.
    pub reason: String,
}

/// A `State<T>` a task needs from the worker.
#[derive(Debug, Clone, Copy)]
pub struct StateRequirement {
    /// `TypeId::of::<T>`.
    pub type_id: fn() -> TypeId,
    /// `type_name::<T>`.
    pub type_name: &'static str,
}

/// One registered task, submitted by `#[stem::task]`.
#[derive(Debug)]
pub struct TaskEntry {
    /// The registered name.
    pub name: &'static str,
    /// The function's path, e.g. `my_app::tasks::send_email`.
    pub fn_path: &'static str,
    /// Source file of the function.
    pub file: &'static str,
    /// Source line of the function.
    pub line: u32,
    /// Declared options.
    pub options: TaskOptions,
    /// `State<T>` parameters the task needs.
    pub states: &'static [StateRequirement],
    /// The handler.
    pub handler: HandlerFn,
    /// Checks that JSON arguments decode into the task's `Args`, without
    /// running anything ([`Stem::enqueue_by_name`](crate::Stem::enqueue_by_name)).
    pub check_args: ArgsCheckFn,
}

impl TaskEntry {
    /// `file:line`.
    #[must_use]
    pub fn location(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }

    /// The lease to use: the task's own or the worker's.
    #[must_use]
    pub fn lease_or(&self, worker_default: Duration) -> Duration {
        self.options.lease.unwrap_or(worker_default)
    }
}

inventory::collect!(TaskEntry);

/// A registry problem found at worker start (or by [`check`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Two functions registered the same name.
    #[error(
        "duplicate task name `{name}`: registered by `{first_fn}` at {first_at} and by `{second_fn}` at {second_at}; give one of them `name = \"...\"`"
    )]
    DuplicateName {
        /// The name.
        name: &'static str,
        /// First function.
        first_fn: &'static str,
        /// Its location.
        first_at: String,
        /// Second function.
        second_fn: &'static str,
        /// Its location.
        second_at: String,
    },
    /// A task needs state the worker was not given.
    #[error(
        "task `{task}` ({at}) takes `State<{type_name}>` but the worker has no such state: add `.state(value)` of type `{type_name}` to the worker builder (it has: {available})"
    )]
    MissingState {
        /// The task.
        task: &'static str,
        /// Its location.
        at: String,
        /// The missing type.
        type_name: &'static str,
        /// What the worker has.
        available: String,
    },
}

/// Every task linked into this binary.
pub fn entries() -> impl Iterator<Item = &'static TaskEntry> {
    inventory::iter::<TaskEntry>.into_iter()
}

/// Checks that no two tasks share a name. Call it in a test to catch a
/// clash before a worker starts.
///
/// ```
/// stem_core::registry::check().unwrap();
/// ```
///
/// # Errors
/// [`RegistryError::DuplicateName`] with both source locations.
pub fn check() -> Result<(), RegistryError> {
    build_index(entries()).map(|_| ())
}

/// Checks that `states` has every state the given tasks need.
///
/// # Errors
/// [`RegistryError::MissingState`] naming the task and the type.
pub fn check_states<'a>(
    tasks: impl IntoIterator<Item = &'a TaskEntry>,
    states: &StateMap,
) -> Result<(), RegistryError> {
    for entry in tasks {
        for req in entry.states {
            if !states.contains((req.type_id)()) {
                let names = states.type_names();
                return Err(RegistryError::MissingState {
                    task: entry.name,
                    at: entry.location(),
                    type_name: req.type_name,
                    available: if names.is_empty() {
                        String::from("no state at all")
                    } else {
                        names.join(", ")
                    },
                });
            }
        }
    }
    Ok(())
}

/// Indexes entries by name, failing on duplicates.
///
/// # Errors
/// [`RegistryError::DuplicateName`].
pub fn build_index<'a>(
    tasks: impl IntoIterator<Item = &'a TaskEntry>,
) -> Result<HashMap<&'a str, &'a TaskEntry>, RegistryError> {
    let mut map: HashMap<&str, &TaskEntry> = HashMap::new();
    for entry in tasks {
        if let Some(prev) = map.insert(entry.name, entry) {
            // Report in a stable order: by location.
            let (a, b) = if (prev.file, prev.line) <= (entry.file, entry.line) {
                (prev, entry)
            } else {
                (entry, prev)
            };
            return Err(RegistryError::DuplicateName {
                name: entry.name,
                first_fn: a.fn_path,
                first_at: a.location(),
                second_fn: b.fn_path,
                second_at: b.location(),
            });
        }
    }
    Ok(map)
}

/// Finds a task by name in the global registry.
#[must_use]
pub fn find(name: &str) -> Option<&'static TaskEntry> {
    static INDEX: OnceLock<HashMap<&'static str, &'static TaskEntry>> = OnceLock::new();
    INDEX
        .get_or_init(|| {
            let mut map = HashMap::new();
            for e in entries() {
                map.entry(e.name).or_insert(e);
            }
            map
        })
        .get(name)
        .copied()
}
