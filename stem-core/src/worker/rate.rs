//! Per-task rate limits (`rate_limit = "100/s"`): a token bucket per task
//! name, per worker.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::registry::TaskEntry;
use crate::task::RateLimit;

struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

/// The buckets of every rate-limited task.
pub(crate) struct RateLimits {
    buckets: HashMap<&'static str, Mutex<Bucket>>,
}

impl RateLimits {
    pub(crate) fn new<'a>(tasks: impl IntoIterator<Item = &'a TaskEntry>) -> Self {
        let now = Instant::now();
        let buckets = tasks
            .into_iter()
            .filter_map(|t| {
                t.options.rate_limit.map(|limit| {
                    (
                        t.name,
                        Mutex::new(Bucket {
                            limit,
                            tokens: f64::from(limit.count),
                            last: now,
                        }),
                    )
                })
            })
            .collect();
        Self { buckets }
    }

    /// `None` when `task` may start now (a token is taken); otherwise how
    /// long until it may.
    pub(crate) fn acquire(&self, task: &str) -> Option<Duration> {
        if self.buckets.is_empty() {
            return None;
        }
        let bucket = self.buckets.get(task)?;
        let mut b = bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let per = b.limit.per.as_secs_f64();
        let rate = f64::from(b.limit.count) / per;
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(f64::from(b.limit.count));
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - b.tokens) / rate).max(Duration::from_millis(1)))
        }
    }
}
