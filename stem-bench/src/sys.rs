//! CPU time and peak memory of a process, read from `/proc` (Linux only; no
//! `libc`, since the workspace forbids `unsafe`).

use std::io;

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat`
/// (`USER_HZ`, 100 on every Linux architecture that matters here).
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds used so far by process `pid` (`"self"` for
/// this one), all of its threads included.
pub(crate) fn cpu_seconds(pid: &str) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc stat line"))
}

/// `utime + stime` in seconds from a `/proc/<pid>/stat` line. The command
/// name in parentheses may contain spaces, so fields are counted from the
/// last `)`: `utime` and `stime` are fields 14 and 15 of the line, the 12th
/// and 13th after it.
fn parse_stat_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    #[allow(clippy::cast_precision_loss)]
    Some((utime + stime) as f64 / USER_HZ)
}

/// Peak resident set size (`VmHWM`) of process `pid` in KiB.
pub(crate) fn peak_rss_kib(pid: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_hwm(&status)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmHWM in /proc status"))
}

fn parse_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_the_name_parses() {
        let line =
            "4242 (stem bench) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat_cpu(line), Some(3.0));
    }

    #[test]
    fn hwm_is_read_in_kib() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_hwm(status), Some(1234));
    }

    #[test]
    fn this_process_can_be_measured() {
        assert!(cpu_seconds("self").unwrap() >= 0.0);
        assert!(peak_rss_kib("self").unwrap() > 0);
    }
}
