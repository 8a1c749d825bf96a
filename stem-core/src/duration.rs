//! Duration strings such as `"30s"`, `"5m"`, `"1h 30m"`, `"250ms"`.

use std::time::Duration;

/// Parses a human duration: a number followed by `ms`, `s`, `m`, `h` or
/// `d`, possibly several (`"1h 30m"`).
///
/// ```
/// use std::time::Duration;
/// assert_eq!(stem_core::duration::parse_duration("30s").unwrap(), Duration::from_secs(30));
/// assert_eq!(stem_core::duration::parse_duration("250ms").unwrap(), Duration::from_millis(250));
/// assert!(stem_core::duration::parse_duration("soon").is_err());
/// ```
///
/// # Errors
/// A message naming the input and the expected form.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration `{s}`: {e}; write a number and a unit, such as \"30s\", \"5m\", \"250ms\" or \"1h 30m\"")
    })
}
