//! Retry policy: backoff with jitter, and the [`Retry`] / [`Fatal`] errors a
//! handler returns to override the policy.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use rand::Rng;

/// How long to wait before the next attempt.
///
/// ```
/// use std::time::Duration;
/// use stem_core::Backoff;
/// let b = Backoff::Exponential { base: Duration::from_secs(1), max: Duration::from_secs(60) };
/// let d = b.delay(3); // third retry: around 4 s, jittered into [2 s, 4 s]
/// assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(4));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backoff {
    /// `base * 2^(retry-1)`, capped at `max`, with equal jitter (the delay is
    /// drawn from `[d/2, d]`) so retries of many tasks spread out.
    Exponential {
        /// The first delay.
        base: Duration,
        /// The cap.
        max: Duration,
    },
    /// The same delay every time (no jitter).
    Fixed(Duration),
    /// Retry at once.
    None,
}

impl Backoff {
    /// The default: exponential from 1 s up to 10 min.
    pub const DEFAULT: Self = Self::Exponential {
        base: Duration::from_secs(1),
        max: Duration::from_secs(600),
    };

    /// The delay before retry number `retry` (1 for the first retry).
    #[must_use]
    pub fn delay(&self, retry: u32) -> Duration {
        match *self {
            Self::None => Duration::ZERO,
            Self::Fixed(d) => d,
            Self::Exponential { base, max } => {
                let shift = retry.saturating_sub(1).min(30);
                let full = base.saturating_mul(1u32 << shift).min(max);
                let half = full / 2;
                let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
                let extra = if jitter_nanos == 0 {
                    0
                } else {
                    rand::rng().random_range(0..=jitter_nanos)
                };
                half + Duration::from_nanos(extra)
            }
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Returned by a handler to ask for a retry after a given delay, whatever
/// the backoff policy says. Retries still count against `retries`.
///
/// ```
/// use std::time::Duration;
/// async fn handler() -> Result<(), stem_core::Retry> {
///     Err(stem_core::Retry::after(Duration::from_secs(5), "rate limited upstream"))
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// The delay before the next attempt.
    pub after: Duration,
    /// Why.
    pub message: String,
}

impl Retry {
    /// Retry after `after`.
    #[must_use]
    pub fn after(after: Duration, message: impl Into<String>) -> Self {
        Self {
            after,
            message: message.into(),
        }
    }
}

impl fmt::Display for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (retry requested after {:?})",
            self.message, self.after
        )
    }
}

impl StdError for Retry {}

/// Returned by a handler to fail the task for good: no retry, straight to
/// the dead-letter queue.
///
/// ```
/// async fn handler() -> Result<(), stem_core::Fatal> {
///     Err(stem_core::Fatal::new("account was deleted"))
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    /// Why.
    pub message: String,
}

impl Fatal {
    /// A fatal error with a message.
    #[must_use]
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Fatal {}

/// What a handler's error asks of the retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDirective {
    /// Follow the task's backoff policy.
    Policy,
    /// Retry after this delay.
    After(Duration),
    /// Do not retry.
    Fatal,
}

/// Looks inside an error value for [`Retry`] or [`Fatal`]: the value itself,
/// or inside a `Box<dyn Error>`, or anywhere in its `source()` chain.
#[must_use]
pub fn directive_of<E: 'static>(err: &E) -> RetryDirective {
    let any: &dyn std::any::Any = err;
    if let Some(r) = any.downcast_ref::<Retry>() {
        return RetryDirective::After(r.after);
    }
    if any.is::<Fatal>() {
        return RetryDirective::Fatal;
    }
    if let Some(b) = any.downcast_ref::<Box<dyn StdError + Send + Sync>>() {
        return directive_in_chain(b.as_ref());
    }
    if let Some(b) = any.downcast_ref::<Box<dyn StdError + Send>>() {
        return directive_in_chain(b.as_ref());
    }
    if let Some(b) = any.downcast_ref::<Box<dyn StdError>>() {
        return directive_in_chain(b.as_ref());
    }
    RetryDirective::Policy
}

fn directive_in_chain(mut err: &(dyn StdError + 'static)) -> RetryDirective {
    loop {
        if let Some(r) = err.downcast_ref::<Retry>() {
            return RetryDirective::After(r.after);
        }
        if err.is::<Fatal>() {
            return RetryDirective::Fatal;
        }
        match err.source() {
            Some(next) => err = next,
            None => return RetryDirective::Policy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_grows_and_caps() {
        let b = Backoff::Exponential {
            base: Duration::from_millis(100),
            max: Duration::from_millis(500),
        };
        for _ in 0..50 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d9 = b.delay(9);
            assert!(d9 >= Duration::from_millis(250) && d9 <= Duration::from_millis(500));
        }
        assert_eq!(Backoff::None.delay(4), Duration::ZERO);
        assert_eq!(
            Backoff::Fixed(Duration::from_secs(2)).delay(7),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn directives_are_found_in_boxes() {
        let r = Retry::after(Duration::from_secs(3), "later");
        assert_eq!(
            directive_of(&r),
            RetryDirective::After(Duration::from_secs(3))
        );
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(Fatal::new("no"));
        assert_eq!(directive_of(&boxed), RetryDirective::Fatal);
        assert_eq!(directive_of(&String::from("x")), RetryDirective::Policy);
    }
}
