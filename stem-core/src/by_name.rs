//! Enqueue by name: publish a task from its registered name and JSON
//! arguments, for tools (the `stem` CLI), scripts and other languages.
//!
//! # The JSON shape of a task's arguments
//! A task's arguments travel as one JSON object with one field per
//! parameter of the task function (not counting `Context` and `State<T>`
//! parameters), named as the parameter, each field the parameter's serde
//! JSON form. `async fn send_email(to: String, retries: u8)` takes
//! `{"to": "a@example.com", "retries": 2}`; a task without parameters
//! takes `{}`. Another language that writes an [`Envelope`] with such
//! `args` produces a task a Stem worker runs.
//!
//! Where the name is resolved from:
//! 1. a task linked into this program: the arguments are checked against
//!    its `Args` before anything is published ([`StemError::BadArgs`] with
//!    serde's message), and its declared queue and options apply;
//! 2. else a live worker's heartbeat that lists the task (with its queue,
//!    priority and retries); the arguments must be a JSON object;
//! 3. else only with an explicit queue in the options;
//!
//! otherwise [`StemError::UnknownTask`]. Per-call options win over the
//! declared ones, as with `my_task::with()`.

use serde_json::value::RawValue;

use crate::backend::AdvertisedTask;
use crate::broker::Published;
use crate::builder::{EnqueueOptions, build_envelope};
use crate::client::Stem;
use crate::envelope::Envelope;
use crate::error::StemError;
use crate::task::TaskOptions;

impl Stem {
    /// Publishes task `name` with JSON `args` (see the [module
    /// docs](crate::by_name) for the shape and how the name is resolved).
    /// Returns the id to track, as [`Stem::publish`] does.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
    /// use stem_core::EnqueueOptions;
    /// let stem = stem_core::connect("memory://by-name-doc").await?;
    /// // Not linked here and no worker runs it: refused without a queue...
    /// let refused = stem.enqueue_by_name("billing::charge", r#"{"cents": 250}"#, &EnqueueOptions::default()).await;
    /// assert!(matches!(refused, Err(stem_core::StemError::UnknownTask { .. })));
    /// // ...accepted with one.
    /// let options = EnqueueOptions { queue: Some("billing".into()), ..Default::default() };
    /// let published = stem.enqueue_by_name("billing::charge", r#"{"cents": 250}"#, &options).await?;
    /// assert_eq!(stem.stats("billing").await?.ready, 1);
    /// # let _ = published;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`StemError::BadArgs`] for arguments that are not JSON, not an
    /// object, or do not decode into a linked task's `Args`;
    /// [`StemError::UnknownTask`]; an invalid option
    /// ([`StemError::Envelope`]); or a broker error.
    pub async fn enqueue_by_name(
        &self,
        name: &str,
        args: &str,
        options: &EnqueueOptions,
    ) -> Result<Published, StemError> {
        let envelope = self.envelope_by_name(name, args, options).await?;
        self.publish(envelope).await
    }

    /// The envelope [`Stem::enqueue_by_name`] would publish.
    ///
    /// # Errors
    /// As [`Stem::enqueue_by_name`], without the broker error.
    pub async fn envelope_by_name(
        &self,
        name: &str,
        args: &str,
        options: &EnqueueOptions,
    ) -> Result<Envelope, StemError> {
        let raw = parse_args(name, args)?;
        if let Some(entry) = crate::registry::find(name) {
            (entry.check_args)(&raw).map_err(|e| StemError::BadArgs {
                name: name.to_owned(),
                args_type: e.args_type.to_owned(),
                reason: e.reason,
            })?;
            return Ok(build_envelope(name, &entry.options, options, raw)?);
        }
        let advertised = self.advertised().await;
        let mut options = options.clone();
        if let Some(task) = advertised.iter().find(|t| t.name == name) {
            options.queue.get_or_insert_with(|| task.queue.clone());
            options.priority.get_or_insert(task.priority);
            options.retries.get_or_insert(task.retries);
        } else if options.queue.is_none() {
            let mut names: Vec<&str> = advertised.iter().map(|t| t.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            return Err(StemError::UnknownTask {
                name: name.to_owned(),
                known: if names.is_empty() {
                    String::new()
                } else {
                    format!(" (live workers run: {})", names.join(", "))
                },
            });
        }
        Ok(build_envelope(name, &TaskOptions::DEFAULT, &options, raw)?)
    }

    /// The tasks live workers advertise (none without a result backend,
    /// or when the backend cannot say).
    async fn advertised(&self) -> Vec<AdvertisedTask> {
        let Some(backend) = self.backend() else {
            return Vec::new();
        };
        match backend.workers().await {
            Ok(workers) => workers
                .into_iter()
                .filter(|w| w.alive)
                .flat_map(|w| w.heartbeat.tasks)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the live workers' task lists");
                Vec::new()
            }
        }
    }
}

/// The arguments as raw JSON: valid JSON, and an object.
fn parse_args(name: &str, args: &str) -> Result<Box<RawValue>, StemError> {
    let bad = |reason: String| StemError::BadArgs {
        name: name.to_owned(),
        args_type: String::from("a JSON object"),
        reason,
    };
    let raw: Box<RawValue> =
        serde_json::from_str(args).map_err(|e| bad(format!("not JSON: {e}")))?;
    if !raw.get().trim_start().starts_with('{') {
        return Err(bad(String::from(
            "the arguments must be a JSON object, one field per task parameter",
        )));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_must_be_a_json_object() {
        assert!(parse_args("t", "{\"a\": 1}").is_ok());
        assert!(parse_args("t", " {}").is_ok());
        let e = parse_args("t", "[1, 2]").unwrap_err().to_string();
        assert!(e.contains("must be a JSON object"), "{e}");
        let e = parse_args("t", "{oops").unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
    }
}
