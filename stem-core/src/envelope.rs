//! The task envelope: the one serde type that crosses a broker.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::error::EnvelopeError;

/// The envelope format version this crate writes.
pub const ENVELOPE_VERSION: u32 = 1;

/// The highest priority a task may have; `0` is the lowest.
pub const MAX_PRIORITY: u8 = crate::task::rules::MAX_PRIORITY;

/// A task's identifier: a UUIDv7, so ids sort by creation time.
///
/// ```
/// let a = stem_core::TaskId::new();
/// let b: stem_core::TaskId = a.to_string().parse().unwrap();
/// assert_eq!(a, b);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(Uuid);

impl TaskId {
    /// A fresh, time-ordered id: ids made by one process sort in the
    /// order they were made. (Deliberately no `Default`: a default id would
    /// be a random one, and `unwrap_or_default()` on a corrupt stored id
    /// would invent a task.)
    #[must_use]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(v7::next())
    }

    /// Wraps an existing UUID.
    #[must_use]
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID inside.
    #[must_use]
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0)
    }
}

impl FromStr for TaskId {
    type Err = EnvelopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|e| EnvelopeError::BadTaskId {
                input: s.chars().take(64).collect(),
                reason: e.to_string(),
            })
    }
}

/// UUIDv7 generation (RFC 9562, section 5.7, method 1: a counter in the
/// random bits). `Uuid::now_v7` reads the operating system's random source
/// for every id, a system call each; profiles of enqueue showed it. Here
/// the random bits come from the thread-local generator of `rand`, and
/// a process-wide counter, reseeded every millisecond, keeps ids monotonic.
mod v7 {
    use std::sync::{Mutex, PoisonError};
    use std::time::{SystemTime, UNIX_EPOCH};

    use uuid::Uuid;

    /// Counter bits (the 42 most significant of the 74 random bits).
    const COUNTER_BITS: u32 = 42;
    /// Reseeds leave the top counter bit clear, so a millisecond has at
    /// least 2^41 increments before the counter wraps.
    const RESEED_MASK: u64 = (1 << (COUNTER_BITS - 1)) - 1;
    const MAX_COUNTER: u64 = (1 << COUNTER_BITS) - 1;

    /// (unix milliseconds, counter) of the last id.
    static LAST: Mutex<(u64, u64)> = Mutex::new((0, 0));

    pub(super) fn next() -> Uuid {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        at_ms(now_ms)
    }

    /// An id for a clock reading the caller already has (unix ms; a
    /// reading before 1970 counts as 0).
    pub(super) fn at(unix_ms: i64) -> Uuid {
        at_ms(u64::try_from(unix_ms).unwrap_or(0))
    }

    fn at_ms(now_ms: u64) -> Uuid {
        let tail: u32 = rand::random();
        let seed: u64 = rand::random::<u64>() & RESEED_MASK;
        let (ms, counter) = {
            let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
            if now_ms > last.0 {
                *last = (now_ms, seed);
            } else if last.1 >= MAX_COUNTER {
                // Wrapped within one millisecond (or the clock went back):
                // borrow the next millisecond.
                *last = (last.0 + 1, seed);
            } else {
                last.1 += 1;
            }
            *last
        };
        encode(ms, counter, tail)
    }

    /// `unix_ts_ms (48) | ver (4) | rand_a (12) | var (2) | rand_b (62)`,
    /// with `counter (42) | tail (32)` as the 74 random bits.
    fn encode(ms: u64, counter: u64, tail: u32) -> Uuid {
        let random = (u128::from(counter & MAX_COUNTER) << 32) | u128::from(tail);
        let rand_a = (random >> 62) & 0x0fff;
        let rand_b = random & ((1 << 62) - 1);
        let ms = u128::from(ms & ((1 << 48) - 1));
        Uuid::from_u128((ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ids_are_v7_and_monotonic() {
            let mut prev = next();
            assert_eq!(prev.get_version_num(), 7);
            assert_eq!(prev.get_variant(), uuid::Variant::RFC4122);
            for _ in 0..100_000 {
                let id = next();
                assert!(id > prev, "{id} after {prev}");
                prev = id;
            }
            let (secs, _) = prev.get_timestamp().expect("v7 has a timestamp").to_unix();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert!(secs.abs_diff(now) <= 1);
        }

        #[test]
        fn encode_places_the_counter_above_the_tail() {
            let a = encode(1, 5, u32::MAX);
            let b = encode(1, 6, 0);
            assert!(a < b);
            assert!(encode(1, MAX_COUNTER, u32::MAX) < encode(2, 0, 0));
        }
    }
}

/// When a unique key is released again (contract clause B17).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UniqueRelease {
    /// The key stays taken until `until`, even after the holder finished.
    Window,
    /// The key is freed as soon as the holder is acked or dead-lettered
    /// (or when `until` passes, whichever comes first).
    OnFinish,
}

/// A uniqueness claim carried by an envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unique {
    /// The key; two envelopes with the same key in one namespace collide.
    pub key: String,
    /// The end of the window.
    pub until: DateTime<Utc>,
    /// When the key frees up.
    pub release: UniqueRelease,
}

/// The versioned task envelope.
///
/// Unknown fields are ignored when decoding, so an older worker reads an
/// envelope written by a newer producer.
///
/// ```
/// use stem_core::Envelope;
/// let env = Envelope::new("app::add", "default", serde_json::json!({"a": 1, "b": 2})).unwrap();
/// let bytes = env.encode().unwrap();
/// let back = Envelope::decode(&bytes).unwrap();
/// assert_eq!(back.id, env.id);
/// assert_eq!(back.args.get(), r#"{"a":1,"b":2}"#);
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version, [`ENVELOPE_VERSION`].
    pub v: u32,
    /// The task id.
    pub id: TaskId,
    /// The registered task name.
    pub name: String,
    /// The queue the envelope lives on.
    pub queue: String,
    /// 0..=9, higher runs first.
    #[serde(default)]
    pub priority: u8,
    /// The arguments, as JSON (an object with one field per parameter).
    pub args: Box<RawValue>,
    /// Attempts already charged (0 before the first run).
    #[serde(default)]
    pub attempt: u32,
    /// Retries allowed after the first attempt.
    #[serde(default)]
    pub max_retries: u32,
    /// Not delivered before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// Not run after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When the producer built it.
    pub enqueued_at: DateTime<Utc>,
    /// Free-form headers (trace context, correlation id, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The task that enqueued this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<TaskId>,
    /// The group this task is a member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<TaskId>,
    /// The chord whose callback waits for this task's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chord_id: Option<TaskId>,
    /// A uniqueness claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<Unique>,
    /// How long the result is kept, in seconds (backend default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ttl_secs: Option<u64>,
    /// The error of the previous attempt, when this is a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Envelope {
    /// A new envelope with a fresh id and defaults for everything else.
    ///
    /// # Errors
    /// [`EnvelopeError::Args`] when `args` cannot be serialized, and
    /// [`EnvelopeError::EmptyName`] / [`EnvelopeError::BadQueue`] for bad names.
    pub fn new(
        name: impl Into<String>,
        queue: impl Into<String>,
        args: impl Serialize,
    ) -> Result<Self, EnvelopeError> {
        let args = serde_json::value::to_raw_value(&args).map_err(EnvelopeError::args)?;
        Self::from_raw(name, queue, args)
    }

    /// A new envelope from already-encoded JSON arguments.
    ///
    /// # Errors
    /// As [`Envelope::new`].
    pub fn from_raw(
        name: impl Into<String>,
        queue: impl Into<String>,
        args: Box<RawValue>,
    ) -> Result<Self, EnvelopeError> {
        let env = Self::unchecked(name.into(), queue.into(), args);
        env.validate()?;
        Ok(env)
    }

    /// A new envelope with defaults, not validated yet. The id and
    /// `enqueued_at` come from one reading of the clock.
    pub(crate) fn unchecked(name: String, queue: String, args: Box<RawValue>) -> Self {
        let enqueued_at = Utc::now();
        Self {
            v: ENVELOPE_VERSION,
            id: TaskId(v7::at(enqueued_at.timestamp_millis())),
            name,
            queue,
            priority: 0,
            args,
            attempt: 0,
            max_retries: 0,
            not_before: None,
            expires_at: None,
            enqueued_at,
            headers: BTreeMap::new(),
            parent_id: None,
            group_id: None,
            chord_id: None,
            unique: None,
            result_ttl_secs: None,
            last_error: None,
        }
    }

    /// Checks the fields a broker relies on.
    ///
    /// # Errors
    /// The first problem found, saying how to fix it.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if self.name.trim().is_empty() {
            return Err(EnvelopeError::EmptyName);
        }
        validate_queue_name(&self.queue)?;
        if self.priority > MAX_PRIORITY {
            return Err(EnvelopeError::Priority {
                priority: self.priority,
            });
        }
        Ok(())
    }

    /// Encodes to JSON bytes.
    ///
    /// # Errors
    /// Only if a header or argument cannot be encoded, which valid envelopes never hit.
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        serde_json::to_vec(self).map_err(EnvelopeError::encode)
    }

    /// Decodes JSON bytes, ignoring unknown fields.
    ///
    /// # Errors
    /// [`EnvelopeError::Decode`] with serde's message, or
    /// [`EnvelopeError::Version`] for an envelope from a newer major format.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let env: Self = serde_json::from_slice(bytes).map_err(EnvelopeError::decode)?;
        if env.v != ENVELOPE_VERSION {
            return Err(EnvelopeError::Version { found: env.v });
        }
        Ok(env)
    }

    /// Whether the envelope may be delivered at `now`.
    #[must_use]
    pub fn is_ready(&self, now: DateTime<Utc>) -> bool {
        self.not_before.is_none_or(|t| t <= now)
    }
}

/// Checks a queue name: 1..=128 characters of `[A-Za-z0-9_.:-]`.
///
/// ```
/// assert!(stem_core::envelope::validate_queue_name("emails.high").is_ok());
/// assert!(stem_core::envelope::validate_queue_name("bad queue").is_err());
/// ```
///
/// # Errors
/// [`EnvelopeError::BadQueue`] saying what is allowed.
pub fn validate_queue_name(queue: &str) -> Result<(), EnvelopeError> {
    if crate::task::rules::is_valid_queue_name(queue) {
        Ok(())
    } else {
        Err(EnvelopeError::BadQueue {
            queue: queue.chars().take(140).collect(),
        })
    }
}
