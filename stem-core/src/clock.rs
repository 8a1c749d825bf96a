//! The clock a client reads for what it computes itself.
//!
//! Brokers with a server judge delays and leases by the server's clock
//! (CONTRACT.md B18), so a worker whose clock is off by minutes can neither
//! run delayed work early nor steal live leases. What a client still
//! computes on its own (a timestamp it writes, a TTL it turns into an
//! instant) reads a [`Clock`]. Adapters take one in their options; the
//! conformance kit opens a client with [`Clock::skewed`] to check that
//! nothing the contract leaves to the server is decided by the client.

use chrono::{DateTime, TimeDelta, Utc};

/// The host clock, optionally moved by a fixed skew.
///
/// ```
/// use chrono::TimeDelta;
/// use stem_core::clock::Clock;
///
/// let fast = Clock::skewed(TimeDelta::minutes(10));
/// let ahead = fast.now() - Clock::system().now();
/// assert!(ahead > TimeDelta::minutes(9));
/// assert_eq!(Clock::default(), Clock::system());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    skew: TimeDelta,
}

impl Clock {
    /// The host clock as it is.
    #[must_use]
    pub const fn system() -> Self {
        Self {
            skew: TimeDelta::zero(),
        }
    }

    /// The host clock moved by `skew` (ahead when positive): a host whose
    /// clock is off, for tests.
    #[must_use]
    pub const fn skewed(skew: TimeDelta) -> Self {
        Self { skew }
    }

    /// How far this clock is from the host's.
    #[must_use]
    pub const fn skew(&self) -> TimeDelta {
        self.skew
    }

    /// Now, by this clock.
    #[must_use]
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.skew
    }

    /// Now, by this clock, in milliseconds since the Unix epoch.
    #[must_use]
    pub fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }
}
