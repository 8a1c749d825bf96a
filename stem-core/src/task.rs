//! The [`Task`] trait that `#[stem::task]` implements, and a task's
//! declared options.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::retry::Backoff;

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
    /// Parses `"100/s"`, `"10/m"`, `"5/h"`, `"20/30s"`.
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
        let err = || {
            format!(
                "invalid rate limit `{s}`: expected COUNT/UNIT such as \"100/s\", \"10/m\" or \"20/30s\""
            )
        };
        let (count, per) = s.split_once('/').ok_or_else(err)?;
        let count: u32 = count.trim().parse().map_err(|_| err())?;
        if count == 0 {
            return Err(format!(
                "invalid rate limit `{s}`: the count must be at least 1"
            ));
        }
        let per = match per.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => crate::duration::parse_duration(other).map_err(|_| err())?,
        };
        if per.is_zero() {
            return Err(err());
        }
        Ok(Self { count, per })
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
    /// The output.
    type Output: Serialize + DeserializeOwned + Send + 'static;
}
