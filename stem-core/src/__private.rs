//! Items used by code that `#[stem::task]` generates. Not public API: no
//! stability promise, may change in any release.

pub use inventory;
pub use serde;
pub use serde_json;
pub use serde_json::value::RawValue;

pub use crate::builder::{Signature, TaskBuilder};
pub use crate::client::Stem;
pub use crate::context::{Context, State};
pub use crate::error::StemError;
pub use crate::handle::TaskHandle;
pub use crate::registry::{
    ArgsCheckFn, DecodeError, HandlerError, HandlerFn, HandlerFuture, HandlerResult,
    StateRequirement, TaskEntry,
};
pub use crate::retry::Backoff;
pub use crate::task::{DeliveryMode, RateLimit, Task, TaskOptions};

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decodes a task's `Args` from the envelope's JSON.
///
/// # Errors
/// [`DecodeError`] naming the type and serde's message.
pub fn decode_args<A: DeserializeOwned>(raw: &RawValue) -> Result<A, DecodeError> {
    serde_json::from_str(raw.get()).map_err(|e| DecodeError {
        args_type: std::any::type_name::<A>(),
        reason: e.to_string(),
    })
}

/// Encodes a handler's output.
///
/// # Errors
/// A failure when the output does not serialize (e.g. a map with non-string keys).
pub fn encode_output<T: Serialize>(output: &T) -> HandlerResult {
    serde_json::value::to_raw_value(output).map_err(|e| {
        HandlerError::new(
            crate::backend::FailureKind::Error,
            std::any::type_name::<T>(),
            format!("the task's output could not be serialized: {e}"),
        )
    })
}

/// Maps a handler's error value, keeping its message and type name.
pub fn map_error<E: std::fmt::Display + 'static>(err: &E) -> HandlerError {
    HandlerError::from_error(err)
}

/// Fetches an injected `State<T>` (the worker checked at start that it exists).
///
/// # Errors
/// A failure naming the type if it is missing after all.
pub fn state<T: Send + Sync + 'static>(ctx: &Context) -> Result<State<T>, HandlerError> {
    ctx.state::<T>().ok_or_else(|| {
        HandlerError::new(
            crate::backend::FailureKind::Fatal,
            "stem::State",
            format!(
                "the worker has no `State<{}>`: add `.state(value)` to the worker builder",
                std::any::type_name::<T>()
            ),
        )
    })
}

/// A `TypeId` getter for [`StateRequirement`].
#[must_use]
pub fn type_id_of<T: 'static>() -> std::any::TypeId {
    std::any::TypeId::of::<T>()
}

/// Runs a future on a thread of its own (for `blocking = true`).
///
/// A plain detached thread, not tokio's blocking pool: a runtime waits for
/// its pool's threads when it is dropped, so a task that ignores its
/// cancellation and never returns would keep `#[tokio::main]` (and the
/// process) from exiting after the worker stopped. A detached thread is
/// abandoned when the process exits. The worker lists it while it runs
/// (the guard it offered while calling the handler), to name at shutdown
/// the tasks it abandons.
pub fn run_blocking<F>(fut: F) -> HandlerFuture
where
    F: std::future::Future<Output = HandlerResult> + Send + 'static,
{
    let guard = crate::context::take_blocking_guard();
    Box::pin(async move {
        let handle = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(String::from("stem-blocking"))
            .spawn(move || {
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle.block_on(fut)));
                // The run may be over (time limit, shutdown): nobody waits.
                let _ = tx.send(r);
                drop(guard);
            });
        if let Err(e) = spawned {
            return Err(HandlerError::new(
                crate::backend::FailureKind::Error,
                "std::io::Error",
                format!("could not start a thread for the blocking task: {e}"),
            ));
        }
        match rx.await {
            Ok(Ok(r)) => r,
            Ok(Err(payload)) => std::panic::resume_unwind(payload),
            Err(_) => Err(HandlerError::new(
                crate::backend::FailureKind::Error,
                "stem::BlockingThread",
                String::from("the blocking task's thread ended without a result"),
            )),
        }
    })
}

/// Implemented for every type a task parameter may have.
#[diagnostic::on_unimplemented(
    message = "task parameter type `{Self}` cannot be sent through a broker",
    label = "this parameter must be `Serialize + DeserializeOwned + Send + 'static`",
    note = "derive `serde::Serialize` and `serde::Deserialize` for it, and use owned types (`String`, not `&str`)"
)]
pub trait TaskArg: Serialize + DeserializeOwned + Send + 'static {}
// `do_not_recommend`: a type missing several of the bounds gets one error
// saying `TaskArg` is not implemented, not one per missing bound.
#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned + Send + 'static> TaskArg for T {}

/// Implemented for every type a task may return.
#[diagnostic::on_unimplemented(
    message = "task output type `{Self}` cannot be stored as a result",
    label = "the output must be `Serialize + DeserializeOwned + Send + 'static`",
    note = "derive `serde::Serialize` and `serde::Deserialize` for it"
)]
pub trait TaskOutput: Serialize + DeserializeOwned + Send + 'static {}
#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned + Send + 'static> TaskOutput for T {}

/// Implemented for every error type a task may return.
#[diagnostic::on_unimplemented(
    message = "task error type `{Self}` must implement `Display`",
    label = "the `E` of `Result<T, E>` must be `Display + Send + 'static`",
    note = "implement `std::fmt::Display` (e.g. with `thiserror`) so the message can be recorded"
)]
pub trait TaskErrorType: std::fmt::Display + Send + 'static {}
#[diagnostic::do_not_recommend]
impl<T: std::fmt::Display + Send + 'static> TaskErrorType for T {}

/// Asserts `T: TaskArg` at the span of a parameter's type.
pub const fn assert_arg<T: TaskArg>() {}
/// Asserts `T: TaskOutput` at the span of the output type.
pub const fn assert_output<T: TaskOutput>() {}
/// Asserts `E: TaskErrorType` at the span of the error type.
pub const fn assert_error<E: TaskErrorType>() {}
/// Asserts `T: Send + Sync + 'static` for `State<T>`.
pub const fn assert_state<T: Send + Sync + 'static>() {}
/// Asserts that the task's future is `Send`.
pub fn assert_send<F: std::future::Future + Send>(_: &F) {}

/// The worker-side entry point of a generated task: decode, inject, run.
///
/// The generated impl carries the task's type requirements (`TaskArg` for
/// each parameter, `TaskOutput`, ...) as where clauses, so a type that
/// misses one is reported once, by the `assert_*` call on that type, and
/// not again inside the handler.
pub trait Handle {
    /// Decodes the arguments and returns the task's future.
    ///
    /// # Errors
    /// Arguments that do not decode as the task's `Args`.
    fn handle(ctx: Context, raw: &RawValue) -> Result<HandlerFuture, DecodeError>;

    /// Decodes the arguments and drops them.
    ///
    /// # Errors
    /// Arguments that do not decode as the task's `Args`.
    fn check_args(raw: &RawValue) -> Result<(), DecodeError>;
}

/// `<HandlerOf<T>>::HANDLER` is `T::handle` when `T: Handle`. Otherwise the
/// associated const of [`NoHandler`] is found instead, so the registration
/// raises no error of its own: the failing `assert_*` already reported why
/// `T: Handle` does not hold (its where clauses are exactly what the
/// assertions check), and the crate does not compile.
pub struct HandlerOf<T>(PhantomData<fn() -> T>);

impl<T: Handle> HandlerOf<T> {
    /// The task's handler.
    pub const HANDLER: HandlerFn = T::handle;
    /// The task's argument check.
    pub const CHECK_ARGS: ArgsCheckFn = T::check_args;
}

/// The fallback of [`HandlerOf`], chosen only for a task whose types fail
/// an assertion (a crate that does not compile).
pub trait NoHandler {
    /// A handler that decodes nothing.
    const HANDLER: HandlerFn;
    /// A check that accepts nothing.
    const CHECK_ARGS: ArgsCheckFn;
}

impl<T: 'static> NoHandler for HandlerOf<T> {
    const HANDLER: HandlerFn = no_handler::<T>;
    const CHECK_ARGS: ArgsCheckFn = no_check::<T>;
}

fn no_check<T: 'static>(_: &RawValue) -> Result<(), DecodeError> {
    Err(DecodeError {
        args_type: std::any::type_name::<T>(),
        reason: "the task's parameter or output types do not meet its requirements".to_owned(),
    })
}

fn no_handler<T: 'static>(_: Context, _: &RawValue) -> Result<HandlerFuture, DecodeError> {
    Err(DecodeError {
        args_type: std::any::type_name::<T>(),
        reason: "the task's parameter or output types do not meet its requirements".to_owned(),
    })
}
