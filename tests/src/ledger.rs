//! A ledger file that tasks in worker processes append to, one line per
//! event, so a test can check what ran where and how often.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Variable naming the ledger file.
pub const LEDGER_VAR: &str = "STEM_E2E_LEDGER";

/// Appends `event key pid` to the ledger named by `STEM_E2E_LEDGER`.
///
/// # Panics
/// If the variable is unset or the file cannot be written (test setup bug).
pub fn append(event: &str, key: &str) {
    let path = std::env::var(LEDGER_VAR).expect("STEM_E2E_LEDGER is set by the test");
    let line = format!("{event} {key} {}\n", std::process::id());
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("ledger opens");
    // One write of a short line: atomic with O_APPEND.
    f.write_all(line.as_bytes()).expect("ledger write");
}

/// Appends `event key pid attempt deliveries unix_ms` to the ledger named
/// by `STEM_E2E_LEDGER`: a run's line for the fault-injection suite, read
/// with [`read_runs`].
///
/// # Panics
/// If the variable is unset or the file cannot be written (test setup bug).
pub fn append_run(event: &str, key: &str, attempt: u32, deliveries: u32) {
    let path = std::env::var(LEDGER_VAR).expect("STEM_E2E_LEDGER is set by the test");
    let line = format!(
        "{event} {key} {} {attempt} {deliveries} {}\n",
        std::process::id(),
        unix_ms()
    );
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("ledger opens");
    // One write of a short line: atomic with O_APPEND.
    f.write_all(line.as_bytes()).expect("ledger write");
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn unix_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One line written by [`append_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// What happened (`start`, `done`).
    pub event: String,
    /// The task's key.
    pub key: String,
    /// The worker process.
    pub pid: u32,
    /// The delivery's attempt number (from 1).
    pub attempt: u32,
    /// How many times the broker had handed the envelope out.
    pub deliveries: u32,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
}

/// Reads a ledger of [`append_run`] lines.
///
/// # Panics
/// If a line is malformed.
#[must_use]
pub fn read_runs(path: &Path) -> Vec<Run> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 6, "malformed ledger line {l:?}");
            Run {
                event: f[0].to_owned(),
                key: f[1].to_owned(),
                pid: f[2].parse().expect("pid number"),
                attempt: f[3].parse().expect("attempt number"),
                deliveries: f[4].parse().expect("deliveries number"),
                at_ms: f[5].parse().expect("time number"),
            }
        })
        .collect()
}

/// One line of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What happened (`start`, `done`).
    pub event: String,
    /// The task's key.
    pub key: String,
    /// The worker process.
    pub pid: u32,
}

/// Reads the ledger.
///
/// # Panics
/// If a line is malformed.
#[must_use]
pub fn read(path: &Path) -> Vec<Entry> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut parts = l.split(' ');
            Entry {
                event: parts.next().expect("event").to_owned(),
                key: parts.next().expect("key").to_owned(),
                pid: parts.next().expect("pid").parse().expect("pid number"),
            }
        })
        .collect()
}

/// How many times each key has `event`.
#[must_use]
pub fn counts(entries: &[Entry], event: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in entries.iter().filter(|e| e.event == event) {
        *m.entry(e.key.clone()).or_insert(0) += 1;
    }
    m
}
