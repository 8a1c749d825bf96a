//! The [`Task`] trait that `#[stem::task]` implements, and a task's
//! declared options.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::retry::Backoff;

/// The rules of task options (queue names, priorities, rate limits), the
/// same crate `#[stem::task]` checks them with at compile time.
pub use stem_rules as rules;

/// Whether a task is acked before or after it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeliveryMode {
    /// Acked after it finishes; re-delivered if the worker dies (default).
    #[default]
    AtLeastOnce,
    /// Acked before it runs; never runs twice, may not run at all.
    AtMostOnce,
}

/// A rate limit: at most `count` starts per `per`, per worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Starts allowed per window.
    pub count: u32,
    /// The window.
    pub per: Duration,
}

impl RateLimit {
    /// Parses `"100/s"`, `"10/m"`, `"5/h"`, `"20/30s"` (the rule
    /// `#[stem::task(rate_limit = ...)]` checks at compile time).
    ///
    /// ```
    /// let r = stem_core::RateLimit::parse("100/s").unwrap();
    /// assert_eq!(r.count, 100);
    /// assert!(stem_core::RateLimit::parse("fast").is_err());
    /// ```
    ///
    /// # Errors
    /// A message saying the expected form.
    pub fn parse(s: &str) -> Result<Self, String> {
        rules::parse_rate_limit(s)
            .map(|(count, per)| Self { count, per })
            .map_err(|e| e.message(s))
    }
}

/// Options declared on `#[stem::task(...)]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct TaskOptions {
    /// Default queue.
    pub queue: &'static str,
    /// Default priority, 0..=9.
    pub priority: u8,
    /// Retries after the first attempt.
    pub retries: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// Time limit per attempt.
    pub timeout: Option<Duration>,
    /// Visibility timeout; kept alive while the task runs.
    pub lease: Option<Duration>,
    /// Ack before or after running.
    pub delivery: DeliveryMode,
    /// Starts per window, per worker.
    pub rate_limit: Option<RateLimit>,
    /// Run the body on the blocking thread pool.
    pub blocking: bool,
}

impl TaskOptions {
    /// Defaults: queue `default`, priority 0, 3 retries with exponential
    /// backoff, no time limit, the worker's lease, at-least-once.
    pub const DEFAULT: Self = Self {
        queue: "default",
        priority: 0,
        retries: 3,
        backoff: Backoff::DEFAULT,
        timeout: None,
        lease: None,
        delivery: DeliveryMode::AtLeastOnce,
        rate_limit: None,
        blocking: false,
    };
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A task type, implemented by `#[stem::task]` on a marker type.
pub trait Task: Send + Sync + 'static {
    /// The registered name.
    const NAME: &'static str;
    /// The declared options.
    const OPTIONS: TaskOptions;
    /// The serialized parameters.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// The same parameters as a tuple, in the order the task function
    /// declares them (`()` for none, `(A,)` for one): what the positional
    /// [`TaskBuilder::enqueue`](crate::TaskBuilder) takes.
    type Params;
    /// The output.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Puts positional parameters into `Args`.
    fn args(params: Self::Params) -> Self::Args;
}

#[cfg(test)]
mod tests {
    use super::{RateLimit, rules};
    use crate::envelope::{MAX_PRIORITY, validate_queue_name};

    /// `envelope.rs` still spells the queue and priority rules itself: it
    /// must agree with the shared rules until it calls them.
    #[test]
    fn envelope_agrees_with_the_shared_rules() {
        assert_eq!(MAX_PRIORITY, rules::MAX_PRIORITY);
        let long = "q".repeat(rules::MAX_QUEUE_NAME_LEN);
        let too_long = "q".repeat(rules::MAX_QUEUE_NAME_LEN + 1);
        for queue in [
            "default",
            "emails.high",
            "a:b-c_d",
            "",
            " ",
            "bad queue",
            "caf\u{e9}",
            "x/y",
            &long,
            &too_long,
        ] {
            assert_eq!(
                rules::is_valid_queue_name(queue),
                validate_queue_name(queue).is_ok(),
                "{queue:?}"
            );
        }
    }

    #[test]
    fn rate_limits() {
        assert_eq!(
            RateLimit::parse("20/30s"),
            Ok(RateLimit {
                count: 20,
                per: std::time::Duration::from_secs(30)
            })
        );
        assert_eq!(RateLimit::parse("5/h").map(|r| r.per.as_secs()), Ok(3600));
        let zero = RateLimit::parse("0/s").unwrap_err();
        assert!(zero.contains("at least 1"), "{zero}");
        for bad in ["fast", "10", "x/s", "10/0s", "10/fortnight"] {
            let e = RateLimit::parse(bad).unwrap_err();
            assert!(e.contains("COUNT/UNIT"), "{bad}: {e}");
        }
    }
}
