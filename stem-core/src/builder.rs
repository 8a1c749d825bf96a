//! Per-call enqueue options ([`TaskBuilder`]) and unsent calls ([`Signature`]).

use std::any::Any;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use crate::client::Stem;
use crate::context::Context;
use crate::envelope::{Envelope, TaskId, Unique, UniqueRelease};
use crate::error::{BrokerError, EnvelopeError, StemError};
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

    /// Enqueues with these options inside the caller's own open
    /// transaction: the task exists if and only if that transaction
    /// commits, so a row and the task that processes it are stored
    /// together or not at all.
    ///
    /// `tx` is the adapter's transaction or connection type, inside its
    /// transaction:
    /// - SQLite: a `rusqlite::Connection` open on the broker's file, after
    ///   `BEGIN IMMEDIATE` (the `rusqlite` the adapter links is re-exported
    ///   as `stem::adapters::sqlite::rusqlite`);
    /// - Postgres (feature `postgres`): pass `&mut *tx` for a
    ///   `sqlx::Transaction`, which reaches its `PgConnection`. `&mut tx`
    ///   works only for a `Transaction<'static, Postgres>` (begun on a
    ///   pool): one begun on a borrowed connection (`conn.begin()`) is not
    ///   `'static`, so `&mut tx` fails to compile there (E0597); `&mut *tx`
    ///   always works.
    ///
    /// Other connections, workers included, see the task only once the
    /// caller commits; after a `ROLLBACK` it never existed. The handle comes
    /// back before the commit: wait on it after committing (until then the
    /// task reads `Pending`). With `unique_for`, a live holder of the key
    /// (in the database or earlier in the same transaction) answers the
    /// holder's handle, as [`TaskBuilder::enqueue_args`] does. After an
    /// error the transaction may be unusable: on Postgres a failed
    /// statement leaves it aborted, and only `ROLLBACK` is possible, as
    /// after any failed statement.
    ///
    /// The task's examples for SQLite and Postgres are in the docs of
    /// `#[stem::task]` ("Enqueue inside your transaction"), whose module
    /// shortcuts `my_task::enqueue_in` and `my_task::enqueue_many_in` call
    /// this on the default client.
    ///
    /// ```
    /// # use stem_core::{Task, TaskBuilder, TaskOptions};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # struct AddArgs { a: i64, b: i64 }
    /// # struct Add;
    /// # impl Task for Add {
    /// #     const NAME: &'static str = "doc::add";
    /// #     const OPTIONS: TaskOptions = TaskOptions::DEFAULT;
    /// #     type Args = AddArgs;
    /// #     type Params = (i64, i64);
    /// #     type Output = i64;
    /// #     fn args((a, b): Self::Params) -> AddArgs { AddArgs { a, b } }
    /// # }
    /// use stem_core::{BrokerError, StemError};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), StemError> {
    /// // The in-memory adapter has no transactions: it answers `Unsupported`,
    /// // as does every adapter without them. With SQLite, `tx` would be a
    /// // `rusqlite::Connection` inside `BEGIN IMMEDIATE`.
    /// let stem = stem_core::connect("memory://doc-enqueue-args-in").await?;
    /// let mut tx = String::from("not a transaction");
    /// let err = TaskBuilder::<Add>::new()
    ///     .on(&stem)
    ///     .enqueue_args_in(&mut tx, AddArgs { a: 2, b: 3 })
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(err, StemError::Broker(BrokerError::Unsupported { .. })), "{err}");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Invalid options or arguments, no client, [`BrokerError::Unsupported`]
    /// from an adapter without transactions, [`BrokerError::Invalid`] naming
    /// the type the adapter takes when `tx` is another type (or, on SQLite,
    /// not inside `BEGIN`), or a broker error.
    pub async fn enqueue_args_in<X: Any + Send>(
        self,
        tx: &mut X,
        args: T::Args,
    ) -> Result<TaskHandle<T::Output>, StemError> {
        let envelope = self.build(&args)?;
        let client = match self.client {
            Some(c) => c,
            None => Stem::default_client().await?,
        };
        let published = client
            .publish_in(tx as &mut (dyn Any + Send), vec![envelope])
            .await?;
        let [published] = published[..] else {
            return Err(wrong_count(&client, 1, published.len()));
        };
        Ok(TaskHandle::new(published.id(), client))
    }

    /// Enqueues many argument sets inside the caller's own open
    /// transaction, in one broker call; handles come back in input order.
    /// The tasks exist if and only if that transaction commits.
    ///
    /// `tx` is as for [`TaskBuilder::enqueue_args_in`] (SQLite: a
    /// `rusqlite::Connection` inside `BEGIN IMMEDIATE`; Postgres: `&mut
    /// *tx`), and so are the errors.
    ///
    /// ```
    /// # use stem_core::{Task, TaskBuilder, TaskOptions};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # struct AddArgs { a: i64, b: i64 }
    /// # struct Add;
    /// # impl Task for Add {
    /// #     const NAME: &'static str = "doc::add";
    /// #     const OPTIONS: TaskOptions = TaskOptions::DEFAULT;
    /// #     type Args = AddArgs;
    /// #     type Params = (i64, i64);
    /// #     type Output = i64;
    /// #     fn args((a, b): Self::Params) -> AddArgs { AddArgs { a, b } }
    /// # }
    /// use stem_core::{BrokerError, StemError};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), StemError> {
    /// let stem = stem_core::connect("memory://doc-enqueue-many-in").await?;
    /// let mut tx = 0_u32; // not a transaction: the memory adapter has none anyway
    /// let err = TaskBuilder::<Add>::new()
    ///     .on(&stem)
    ///     .enqueue_many_in(&mut tx, [Add::args((1, 2)), Add::args((3, 4))])
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(err, StemError::Broker(BrokerError::Unsupported { .. })), "{err}");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`TaskBuilder::enqueue_args_in`]; nothing is stored when any
    /// envelope is refused (the caller's transaction decides the rest).
    pub async fn enqueue_many_in<X, I>(
        self,
        tx: &mut X,
        args: I,
    ) -> Result<Vec<TaskHandle<T::Output>>, StemError>
    where
        X: Any + Send,
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
        let sent = envelopes.len();
        let published = client
            .publish_in(tx as &mut (dyn Any + Send), envelopes)
            .await?;
        if published.len() != sent {
            return Err(wrong_count(&client, sent, published.len()));
        }
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

            /// Enqueues the task with these options inside the caller's own
            /// open transaction; the task exists if and only if it commits.
            /// The arguments come in the order the task function declares
            /// them. `tx` is as for [`TaskBuilder::enqueue_args_in`] (SQLite:
            /// a `rusqlite::Connection` inside `BEGIN IMMEDIATE`; Postgres:
            /// `&mut *tx`), which has the example.
            ///
            /// # Errors
            /// As [`TaskBuilder::enqueue_args_in`]: `Unsupported` without
            /// transactions, `Invalid` for a `tx` of the wrong type.
            #[allow(clippy::too_many_arguments)]
            pub async fn enqueue_in<X: Any + Send>(self, tx: &mut X, $($arg: $Arg),*) -> Result<TaskHandle<T::Output>, StemError> {
                self.enqueue_args_in(tx, T::args(($($arg,)*))).await
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

/// An adapter that answered `publish_in` with another number of results
/// than envelopes sent: the handles could not be matched to the calls.
fn wrong_count(client: &Stem, sent: usize, got: usize) -> StemError {
    StemError::Broker(BrokerError::Storage {
        adapter: client.broker().describe(),
        reason: format!(
            "publish_in answered {got} results for {sent} envelopes (an adapter bug); roll the transaction back"
        ),
        source: None,
    })
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
