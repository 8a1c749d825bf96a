//! Where results go: aligned tables and `key: value` blocks for people,
//! one JSON document per command with `--json`. Everything on stdout is
//! written here; progress and errors go to stderr.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::CliError;

/// The command's output: human or JSON.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Out {
    json: bool,
}

impl Out {
    pub(crate) const fn new(json: bool) -> Self {
        Self { json }
    }

    /// Whether `--json` was given.
    pub(crate) const fn json(self) -> bool {
        self.json
    }

    /// Writes `value` as the command's one JSON document (pretty).
    pub(crate) fn document<T: Serialize + ?Sized>(self, value: &T) -> Result<(), CliError> {
        let mut s = serde_json::to_string_pretty(value).map_err(|e| CliError::Io {
            what: "encoding the JSON output",
            source: e.into(),
        })?;
        s.push('\n');
        write_stdout(&s)
    }

    /// Writes `value` as one compact JSON line (`--watch --json`).
    pub(crate) fn json_line<T: Serialize + ?Sized>(self, value: &T) -> Result<(), CliError> {
        let mut s = serde_json::to_string(value).map_err(|e| CliError::Io {
            what: "encoding the JSON output",
            source: e.into(),
        })?;
        s.push('\n');
        write_stdout(&s)
    }

    /// Writes text for people.
    pub(crate) fn text(self, text: &str) -> Result<(), CliError> {
        write_stdout(text)
    }
}

fn write_stdout(s: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| CliError::Io {
            what: "writing the output",
            source,
        })
}

/// A column's alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// A table: headers, then rows of cells, columns padded to their widest
/// cell, two spaces apart.
#[derive(Debug)]
pub(crate) struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: &[(&'static str, Align)]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let width = widths[i];
                let pad = width.saturating_sub(cell.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                match self.headers[i].1 {
                    Align::Left => {
                        line.push_str(cell);
                        if i + 1 < row.len() {
                            line.push_str(&" ".repeat(pad));
                        }
                    }
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A task's stored JSON result as a value for output (the raw text as a
/// string in the one case it is not JSON: a record written by hand).
pub(crate) fn result_value(result: &serde_json::value::RawValue) -> serde_json::Value {
    serde_json::from_str(result.get())
        .unwrap_or_else(|_| serde_json::Value::String(result.get().to_owned()))
}

/// `key: value` lines, keys padded to one width.
pub(crate) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&format!(
            "{k:<width$}  {v}\n",
            width = width + 1,
            k = format!("{k}:")
        ));
    }
    out
}

/// A time for people: RFC 3339 to the second, UTC, and how long ago.
pub(crate) fn when(t: DateTime<Utc>) -> String {
    format!(
        "{} ({})",
        t.format("%Y-%m-%d %H:%M:%S UTC"),
        ago(Utc::now(), t)
    )
}

/// `3s ago`, `in 2m`, rounded to seconds.
pub(crate) fn ago(now: DateTime<Utc>, t: DateTime<Utc>) -> String {
    let d = now - t;
    let secs = d.num_seconds();
    let span =
        |s: i64| humantime::format_duration(Duration::from_secs(s.unsigned_abs())).to_string();
    if secs >= 0 {
        format!("{} ago", span(secs))
    } else {
        format!("in {}", span(secs))
    }
}

/// A progress bar over `len` steps, drawn only when stderr is a terminal.
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// A spinner for one long call, drawn only when stderr is a terminal.
pub(crate) fn spinner(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(&[("QUEUE", Align::Left), ("READY", Align::Right)]);
        t.row(vec!["emails".into(), "3".into()]);
        t.row(vec!["q".into(), "1200".into()]);
        assert_eq!(t.render(), "QUEUE   READY\nemails      3\nq        1200\n");
    }

    #[test]
    fn fields_pad_keys() {
        assert_eq!(
            fields(&[("id", "1".into()), ("state", "x".into())]),
            "id:     1\nstate:  x\n"
        );
    }

    #[test]
    fn ago_reads_both_ways() {
        let now = Utc::now();
        assert_eq!(ago(now, now - chrono::TimeDelta::seconds(3)), "3s ago");
        assert_eq!(ago(now, now + chrono::TimeDelta::seconds(120)), "in 2m");
    }
}
