//! Per-call enqueue options ([`TaskBuilder`]) and unsent calls ([`Signature`]).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::Duration;

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
/// The generated `with()` wraps this type; it is public so generic code can
/// use it too.
pub struct TaskBuilder<T: Task> {
    options: EnqueueOptions,
    client: Option<Stem>,
    _task: PhantomData<fn() -> T>,
}

impl<T: Task> std::fmt::Debug for TaskBuilder<T> {
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

    /// Not before `eta`.
    #[must_use]
    pub fn eta(mut self, eta: DateTime<Utc>) -> Self {
        self.options.eta = Some(eta);
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
        let raw = serde_json::value::to_raw_value(args).map_err(|e| EnvelopeError::Args {
            reason: e.to_string(),
        })?;
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
    pub fn signature(self, args: T::Args) -> Signature<T::Output> {
        let envelope = self.build(&args);
        Signature {
            envelope,
            client: self.client,
            _output: PhantomData,
        }
    }
}

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
