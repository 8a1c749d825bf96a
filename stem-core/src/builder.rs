//! Per-call enqueue options ([`TaskBuilder`]) and unsent calls ([`Signature`]).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use crate::client::Stem;
use crate::context::Context;
use crate::envelope::{Envelope, TaskId, Unique, UniqueRelease};
use crate::error::{EnvelopeError, StemError};
use crate::handle::TaskHandle;
use crate::task::Task;

/// Options for one enqueue, overriding the task's declared ones.
#[derive(Clone, Debug, Default)]
pub struct EnqueueOptions {
    /// Run no earlier than now + delay.
    pub delay: Option<Duration>,
    /// Run no earlier than this time.
    pub eta: Option<DateTime<Utc>>,
    /// Do not run after now + this.
    pub expires_in: Option<Duration>,
    /// Priority 0..=9.
    pub priority: Option<u8>,
    /// Queue.
    pub queue: Option<String>,
    /// Retries after the first attempt.
    pub retries: Option<u32>,
    /// Uniqueness window.
    pub unique_for: Option<Duration>,
    /// Free the unique key when the task finishes rather than at the window's end.
    pub unique_release_on_finish: bool,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// The parent task.
    pub parent_id: Option<TaskId>,
    /// Result TTL.
    pub result_ttl: Option<Duration>,
}

/// Builds one enqueue of task `T`: `my_task::with().delay(d).enqueue(args)`.
///
/// The generated `with()` returns this type (the generated module's
/// `Builder` is an alias of `TaskBuilder<Task>`), so every option here is
/// available on every task. `P` is always `T::Params`, the task's
/// parameters as a tuple: it selects the positional `enqueue(a, b, ...)`
/// and `signature(a, b, ...)` of the task's arity.
pub struct TaskBuilder<T: Task, P = <T as Task>::Params> {
    options: EnqueueOptions,
    client: Option<Stem>,
    _task: PhantomData<fn() -> (T, P)>,
}

impl<T: Task, P> std::fmt::Debug for TaskBuilder<T, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskBuilder")
            .field("task", &T::NAME)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<T: Task> Default for TaskBuilder<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Task> TaskBuilder<T> {
    /// Declared options only, on the default client.
    #[must_use]
    pub fn new() -> Self {
        Self {
            options: EnqueueOptions::default(),
            client: None,
            _task: PhantomData,
        }
    }

    /// Not before now + `delay`.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.options.delay = Some(delay);
        self
    }

    /// Not before `eta` (a `SystemTime`, or anything that converts into
    /// one, such as `chrono::DateTime<Utc>`).
    #[must_use]
    pub fn eta(mut self, eta: impl Into<SystemTime>) -> Self {
        self.options.eta = Some(DateTime::<Utc>::from(eta.into()));
        self
    }

    /// Dropped, not run, after now + `ttl`.
    #[must_use]
    pub fn expires_in(mut self, ttl: Duration) -> Self {
        self.options.expires_in = Some(ttl);
        self
    }

    /// Priority 0..=9 (checked at enqueue).
    #[must_use]
    pub fn priority(mut self, priority: u8) -> Self {
        self.options.priority = Some(priority);
        self
    }

    /// Another queue (checked at enqueue).
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.options.queue = Some(queue.into());
        self
    }

    /// Retries after the first attempt.
    #[must_use]
    pub fn retries(mut self, retries: u32) -> Self {
        self.options.retries = Some(retries);
        self
    }

    /// At most one live task with these arguments within `window`; a
    /// duplicate enqueue returns the live task's handle.
    #[must_use]
    pub fn unique_for(mut self, window: Duration) -> Self {
        self.options.unique_for = Some(window);
        self
    }

    /// With `unique_for`: free the key as soon as the task finishes.
    #[must_use]
    pub fn unique_until_finished(mut self) -> Self {
        self.options.unique_release_on_finish = true;
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.headers.insert(key.into(), value.into());
        self
    }

    /// Marks the task as a child of the running task.
    #[must_use]
    pub fn parent(mut self, ctx: &Context) -> Self {
        self.options.parent_id = Some(ctx.id());
        self
    }

    /// Keeps the result for `ttl`.
    #[must_use]
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.options.result_ttl = Some(ttl);
        self
    }

    /// Uses `client` instead of the default one.
    #[must_use]
    pub fn on(mut self, client: &Stem) -> Self {
        self.client = Some(client.clone());
        self
    }

    /// The options so far.
    #[must_use]
    pub fn options(&self) -> &EnqueueOptions {
        &self.options
    }

    /// Builds the envelope without sending it.
    ///
    /// # Errors
    /// Invalid options or unserializable arguments.
    pub fn build(&self, args: &T::Args) -> Result<Envelope, StemError> {
        let raw = serde_json::value::to_raw_value(args).map_err(EnvelopeError::args)?;
        Ok(build_envelope(T::NAME, &T::OPTIONS, &self.options, raw)?)
    }

    /// Enqueues with these options.
    ///
    /// # Errors
    /// Invalid options, no client, or a broker error.
    pub async fn enqueue_args(self, args: T::Args) -> Result<TaskHandle<T::Output>, StemError> {
        let envelope = self.build(&args)?;
        let client = match self.client {
            Some(c) => c,
            None => Stem::default_client().await?,
        };
        let published = client.publish(envelope).await?;
        Ok(TaskHandle::new(published.id(), client))
    }

    /// Enqueues many argument sets in one broker call; handles come back in
    /// input order.
    ///
    /// # Errors
    /// Invalid options, no client, or a broker error (nothing is stored when
    /// the adapter's batches are atomic).
    pub async fn enqueue_many<I>(self, args: I) -> Result<Vec<TaskHandle<T::Output>>, StemError>
    where
        I: IntoIterator<Item = T::Args>,
    {
        let envelopes = args
            .into_iter()
            .map(|a| self.build(&a))
            .collect::<Result<Vec<_>, _>>()?;
        let client = match self.client {
            Some(c) => c,
            None => Stem::default_client().await?,
        };
        let published = client.publish_many(envelopes).await?;
        Ok(published
            .into_iter()
            .map(|p| TaskHandle::new(p.id(), client.clone()))
            .collect())
    }

    /// An unsent call with these options, for canvas.
    #[must_use]
    pub fn signature_args(self, args: T::Args) -> Signature<T::Output> {
        let envelope = self.build(&args);
        Signature {
            envelope,
            client: self.client,
            _output: PhantomData,
        }
    }
}

/// The positional `enqueue(a, b, ...)` and `signature(a, b, ...)` of a
/// task taking `$A, $B, ...`: one impl per arity, told apart by `P`.
macro_rules! positional {
    ($($arg:ident: $Arg:ident),*) => {
        impl<T, $($Arg),*> TaskBuilder<T, ($($Arg,)*)>
        where
            T: Task<Params = ($($Arg,)*)>,
        {
            /// Enqueues the task with these options; the arguments come in
            /// the order the task function declares them.
            ///
            /// # Errors
            /// Invalid options or arguments, no client, or a broker error.
            #[allow(clippy::too_many_arguments)]
            pub async fn enqueue(self, $($arg: $Arg),*) -> Result<TaskHandle<T::Output>, StemError> {
                self.enqueue_args(T::args(($($arg,)*))).await
            }

            /// An unsent call with these options, for canvas.
            #[must_use]
            #[allow(clippy::too_many_arguments)]
            pub fn signature(self, $($arg: $Arg),*) -> Signature<T::Output> {
                self.signature_args(T::args(($($arg,)*)))
            }
        }
    };
}

// Arities 0 to `rules::MAX_TASK_ARGS` (16); the macro rejects more.
positional!();
positional!(a0: A0);
positional!(a0: A0, a1: A1);
positional!(a0: A0, a1: A1, a2: A2);
positional!(a0: A0, a1: A1, a2: A2, a3: A3);
positional!(a0: A0, a1: A1, a2: A2, a3: A3, a4: A4);
positional!(a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5);
positional!(a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6);
positional!(a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6, a7: A7);
positional!(a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6, a7: A7, a8: A8);
positional!(a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6, a7: A7, a8: A8, a9: A9);
positional!(
    a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6, a7: A7, a8: A8, a9: A9, a10: A10
);
positional!(
    a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6, a7: A7, a8: A8, a9: A9, a10: A10,
    a11: A11
);
positional!(
    a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6, a7: A7, a8: A8, a9: A9, a10: A10,
    a11: A11, a12: A12
);
positional!(
    a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6, a7: A7, a8: A8, a9: A9, a10: A10,
    a11: A11, a12: A12, a13: A13
);
positional!(
    a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6, a7: A7, a8: A8, a9: A9, a10: A10,
    a11: A11, a12: A12, a13: A13, a14: A14
);
positional!(
    a0: A0, a1: A1, a2: A2, a3: A3, a4: A4, a5: A5, a6: A6, a7: A7, a8: A8, a9: A9, a10: A10,
    a11: A11, a12: A12, a13: A13, a14: A14, a15: A15
);

/// Applies declared and per-call options to build an envelope.
///
/// # Errors
/// A bad queue, priority or duration.
pub fn build_envelope(
    name: &str,
    declared: &crate::task::TaskOptions,
    options: &EnqueueOptions,
    args: Box<RawValue>,
) -> Result<Envelope, EnvelopeError> {
    let queue = options.queue.as_deref().unwrap_or(declared.queue);
    // Validated once, below, with every field set.
    let mut env = Envelope::unchecked(name.to_owned(), queue.to_owned(), args);
    env.priority = options.priority.unwrap_or(declared.priority);
    env.max_retries = options.retries.unwrap_or(declared.retries);
    let now = env.enqueued_at;
    let not_before = match (options.delay, options.eta) {
        (Some(d), Some(eta)) => Some(eta.max(now + to_chrono(d))),
        (Some(d), None) => Some(now + to_chrono(d)),
        (None, eta) => eta,
    };
    env.not_before = not_before.filter(|t| *t > now);
    env.expires_at = options.expires_in.map(|d| now + to_chrono(d));
    if !options.headers.is_empty() {
        env.headers.clone_from(&options.headers);
    }
    env.parent_id = options.parent_id;
    env.result_ttl_secs = options.result_ttl.map(|d| d.as_secs().max(1));
    if let Some(window) = options.unique_for {
        env.unique = Some(Unique {
            key: unique_key(name, env.args.get()),
            until: now + to_chrono(window),
            release: if options.unique_release_on_finish {
                UniqueRelease::OnFinish
            } else {
                UniqueRelease::Window
            },
        });
    }
    env.validate()?;
    Ok(env)
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The unique key of a call: the task name and a 64-bit FNV-1a hash of the
/// JSON arguments (stable across processes and versions).
#[must_use]
pub fn unique_key(name: &str, args_json: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in args_json.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{name}:{h:016x}")
}

/// An unsent task call with a typed output, for groups, chains and chords.
pub struct Signature<O> {
    envelope: Result<Envelope, StemError>,
    client: Option<Stem>,
    _output: PhantomData<fn() -> O>,
}

impl<O> std::fmt::Debug for Signature<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signature")
            .field("envelope", &self.envelope)
            .finish_non_exhaustive()
    }
}

impl<O> Signature<O> {
    /// The envelope that would be sent.
    ///
    /// # Errors
    /// The error the call's arguments or options had.
    pub fn envelope(&self) -> Result<&Envelope, StemError> {
        self.envelope.as_ref().map_err(Clone::clone)
    }

    /// Consumes the signature, returning its envelope.
    ///
    /// # Errors
    /// As [`Signature::envelope`].
    pub fn into_envelope(self) -> Result<Envelope, StemError> {
        self.envelope
    }

    /// Sends it.
    ///
    /// # Errors
    /// Its build error, no client, or a broker error.
    pub async fn enqueue(self) -> Result<TaskHandle<O>, StemError> {
        let envelope = self.envelope?;
        let client = match self.client {
            Some(c) => c,
            None => Stem::default_client().await?,
        };
        let published = client.publish(envelope).await?;
        Ok(TaskHandle::new(published.id(), client))
    }
}

#[cfg(test)]
mod tests {
    use super::{Task, TaskBuilder};
    use crate::error::{EnvelopeError, StemError};
    use crate::task::TaskOptions;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct PairArgs {
        name: String,
        count: u32,
    }

    struct Pair;

    impl Task for Pair {
        const NAME: &'static str = "tests::pair";
        const OPTIONS: TaskOptions = TaskOptions {
            queue: "pairs",
            ..TaskOptions::DEFAULT
        };
        type Args = PairArgs;
        type Params = (String, u32);
        type Output = ();

        fn args((name, count): Self::Params) -> Self::Args {
            PairArgs { name, count }
        }
    }

    fn args() -> PairArgs {
        Pair::args(("x".to_owned(), 2))
    }

    #[test]
    fn declared_and_per_call_options_reach_the_envelope() {
        let env = TaskBuilder::<Pair>::new().build(&args()).unwrap();
        assert_eq!((env.queue.as_str(), env.priority), ("pairs", 0));
        assert_eq!(env.args.get(), r#"{"name":"x","count":2}"#);
        let env = TaskBuilder::<Pair>::new()
            .queue("other")
            .priority(9)
            .build(&args())
            .unwrap();
        assert_eq!((env.queue.as_str(), env.priority), ("other", 9));
    }

    #[test]
    fn a_bad_queue_at_run_time_is_a_typed_error() {
        let err = TaskBuilder::<Pair>::new()
            .queue("bad name")
            .build(&args())
            .unwrap_err();
        assert!(
            matches!(&err, StemError::Envelope(EnvelopeError::BadQueue { queue }) if queue == "bad name"),
            "{err:?}"
        );
    }

    #[test]
    fn a_bad_priority_at_run_time_is_a_typed_error() {
        let err = TaskBuilder::<Pair>::new()
            .priority(12)
            .build(&args())
            .unwrap_err();
        assert!(
            matches!(
                err,
                StemError::Envelope(EnvelopeError::Priority { priority: 12 })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn the_positional_signature_builds_the_same_args() {
        let sig = TaskBuilder::<Pair>::new().signature("x".to_owned(), 2);
        let env = sig.into_envelope().unwrap();
        assert_eq!(env.name, "tests::pair");
        assert_eq!(env.args.get(), r#"{"name":"x","count":2}"#);
        let bad = TaskBuilder::<Pair>::new()
            .queue("")
            .signature("x".to_owned(), 2);
        assert!(matches!(
            bad.envelope(),
            Err(StemError::Envelope(EnvelopeError::BadQueue { .. }))
        ));
    }
}
