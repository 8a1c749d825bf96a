//! The rules a task's options follow, written once: `#[stem::task]` checks
//! them at compile time and `stem-core` at run time (re-exported as
//! `stem_core::task::rules`). A crate of its own so that both can depend
//! on it and each packages on its own.
//!
//! ```
//! assert!(stem_rules::is_valid_queue_name("emails.high"));
//! assert!(!stem_rules::is_valid_queue_name("bad queue"));
//! ```

use std::time::Duration;

/// The highest priority a task may have; `0` is the lowest.
pub const MAX_PRIORITY: u8 = 9;

/// The longest queue name, in bytes.
pub const MAX_QUEUE_NAME_LEN: usize = 128;

/// The most arguments a task may take besides `Context` and `State<T>`:
/// the positional `enqueue` and `signature` exist for up to this many.
pub const MAX_TASK_ARGS: usize = 16;

/// What a queue name may be, for error messages.
pub const QUEUE_NAME_RULE: &str =
    "use 1 to 128 characters of letters, digits, `_`, `-`, `.` and `:`";

/// What a priority may be, for error messages.
pub const PRIORITY_RULE: &str = "0..=9 (higher runs first)";

/// The form of a rate limit, for error messages.
pub const RATE_LIMIT_FORM: &str =
    "expected COUNT/UNIT such as \"100/s\", \"10/m\", \"5/h\" or \"20/30s\"";

/// Whether `queue` is a valid queue name: 1 to [`MAX_QUEUE_NAME_LEN`]
/// bytes of ASCII letters, digits, `_`, `-`, `.` and `:`.
#[must_use]
pub fn is_valid_queue_name(queue: &str) -> bool {
    !queue.is_empty()
        && queue.len() <= MAX_QUEUE_NAME_LEN
        && queue
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Whether `priority` is in `0..=MAX_PRIORITY`.
#[must_use]
pub fn is_valid_priority(priority: u64) -> bool {
    priority <= u64::from(MAX_PRIORITY)
}

/// Why a rate limit did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitError {
    /// Not `COUNT/UNIT`, or a zero-length window.
    Form,
    /// A count of zero.
    ZeroCount,
}

impl RateLimitError {
    /// The message for `input`.
    #[must_use]
    pub fn message(self, input: &str) -> String {
        match self {
            Self::Form => format!("invalid rate limit {input:?}: {RATE_LIMIT_FORM}"),
            Self::ZeroCount => {
                format!("invalid rate limit {input:?}: the count must be at least 1")
            }
        }
    }
}

/// Parses a rate limit, `COUNT/UNIT`: `"100/s"`, `"10/m"`, `"5/h"`, or a
/// duration window such as `"20/30s"`. Returns the count and the window.
///
/// # Errors
/// [`RateLimitError`] saying what is wrong.
pub fn parse_rate_limit(input: &str) -> Result<(u32, Duration), RateLimitError> {
    let (count, per) = input.split_once('/').ok_or(RateLimitError::Form)?;
    let count: u32 = count.trim().parse().map_err(|_| RateLimitError::Form)?;
    if count == 0 {
        return Err(RateLimitError::ZeroCount);
    }
    let per = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => humantime::parse_duration(other).map_err(|_| RateLimitError::Form)?,
    };
    if per.is_zero() {
        return Err(RateLimitError::Form);
    }
    Ok((count, per))
}
