//! What a scenario measured, as one JSON line or one table row.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::check::Verdict;

/// The settings a scenario ran with.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Settings {
    /// Tasks per scenario (`--tasks`); the latency scenario sends `rate × duration`.
    pub(crate) tasks: u64,
    /// Tasks run at once per worker.
    pub(crate) concurrency: usize,
    /// Deliveries a worker holds at most, running or waiting.
    pub(crate) prefetch: usize,
    /// The worker's longest wait per fetch, ms.
    pub(crate) poll_interval_ms: f64,
    /// Concurrent producers of the enqueue scenario.
    pub(crate) producers: usize,
    /// Tasks per `enqueue_many` call.
    pub(crate) batch: usize,
    /// Padding carried by each task's arguments.
    pub(crate) payload_bytes: usize,
    /// Open-loop send rate of the latency scenario, tasks/s.
    pub(crate) rate: u64,
    /// Length of the latency scenario, seconds.
    pub(crate) duration_s: f64,
    /// `in-process` or `processes`.
    pub(crate) workers: &'static str,
    /// Worker processes (0 in-process).
    pub(crate) worker_processes: usize,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct Latency {
    /// Median.
    pub(crate) p50_ms: f64,
    /// 99th percentile.
    pub(crate) p99_ms: f64,
    /// 99.9th percentile.
    pub(crate) p99_9_ms: f64,
    /// Largest sample.
    pub(crate) max_ms: f64,
    /// Samples.
    pub(crate) samples: u64,
}

/// Summarizes start-minus-send samples in ns (`None` when there are none).
pub(crate) fn summarize(samples_ns: &[u64]) -> Option<Latency> {
    if samples_ns.is_empty() {
        return None;
    }
    // 1 ns .. 1 h at 3 significant digits; anything longer saturates.
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).ok()?;
    for &s in samples_ns {
        h.saturating_record(s);
    }
    let ms = |ns: u64| round(ns as f64 / 1e6, 3);
    Some(Latency {
        p50_ms: ms(h.value_at_quantile(0.50)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p99_9_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        samples: h.len(),
    })
}

/// Rounds to `digits` decimals (for readable JSON).
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// One scenario's result.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    /// `enqueue`, `enqueue-batch`, `drain` or `latency`.
    pub(crate) scenario: &'static str,
    /// The broker adapter (URL scheme).
    pub(crate) adapter: String,
    /// The broker URL.
    pub(crate) broker: String,
    /// The result backend URL; `None`: no results were written.
    pub(crate) backend: Option<String>,
    /// The namespace the scenario ran in (fresh per scenario).
    pub(crate) namespace: String,
    /// The settings.
    pub(crate) settings: Settings,
    /// Tasks measured.
    pub(crate) tasks: u64,
    /// Measured wall time, seconds.
    pub(crate) elapsed_s: f64,
    /// `tasks / elapsed_s`.
    pub(crate) tasks_per_s: f64,
    /// User+system CPU seconds of every process involved, over the measurement.
    pub(crate) cpu_s: f64,
    /// `cpu_s` per 1,000 tasks.
    pub(crate) cpu_s_per_1000_tasks: f64,
    /// Which processes `cpu_s` covers.
    pub(crate) cpu_scope: String,
    /// Peak resident set (`VmHWM`) in KiB; see `rss_scope`.
    pub(crate) peak_rss_kib: u64,
    /// Whose peak `peak_rss_kib` is.
    pub(crate) rss_scope: String,
    /// Start-minus-send latency (latency scenario only).
    pub(crate) latency: Option<Latency>,
    /// Every task ran exactly once.
    pub(crate) exactly_once: bool,
    /// The checker's counts and first offending ids.
    pub(crate) check: Verdict,
    /// Anything else worth knowing about this run.
    pub(crate) notes: Vec<String>,
}

impl Report {
    /// Fills the derived rates from `tasks`, `elapsed_s` and `cpu_s`.
    pub(crate) fn finish_rates(&mut self) {
        let tasks = self.tasks as f64;
        self.tasks_per_s = if self.elapsed_s > 0.0 {
            round(tasks / self.elapsed_s, 1)
        } else {
            0.0
        };
        self.cpu_s_per_1000_tasks = if self.tasks > 0 {
            round(self.cpu_s * 1000.0 / tasks, 4)
        } else {
            0.0
        };
        self.elapsed_s = round(self.elapsed_s, 3);
        self.cpu_s = round(self.cpu_s, 2);
    }

    /// One line of JSON.
    pub(crate) fn json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// The table header.
pub(crate) fn table_header() -> String {
    format!(
        "{:<14} {:>9} {:>9} {:>11} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "scenario",
        "tasks",
        "wall s",
        "tasks/s",
        "cpu s/1k",
        "rss MiB",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "once"
    )
}

/// One table row.
pub(crate) fn table_row(r: &Report) -> String {
    let lat = |f: fn(&Latency) -> f64| {
        r.latency
            .as_ref()
            .map_or("-".into(), |l| format!("{:.2}", f(l)))
    };
    format!(
        "{:<14} {:>9} {:>9.3} {:>11.0} {:>9.3} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>6}",
        r.scenario,
        r.tasks,
        r.elapsed_s,
        r.tasks_per_s,
        r.cpu_s_per_1000_tasks,
        r.peak_rss_kib as f64 / 1024.0,
        lat(|l| l.p50_ms),
        lat(|l| l.p99_ms),
        lat(|l| l.p99_9_ms),
        lat(|l| l.max_ms),
        if r.exactly_once { "yes" } else { "NO" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Report {
        Report {
            scenario: "drain",
            adapter: "memory".into(),
            broker: "memory://".into(),
            backend: None,
            namespace: "bench_1".into(),
            settings: Settings {
                tasks: 1000,
                concurrency: 16,
                prefetch: 16,
                poll_interval_ms: 1000.0,
                producers: 1,
                batch: 500,
                payload_bytes: 0,
                rate: 500,
                duration_s: 10.0,
                workers: "in-process",
                worker_processes: 0,
            },
            tasks: 1000,
            elapsed_s: 0.5,
            tasks_per_s: 0.0,
            cpu_s: 0.25,
            cpu_s_per_1000_tasks: 0.0,
            cpu_scope: "this process".into(),
            peak_rss_kib: 2048,
            rss_scope: "this process".into(),
            latency: summarize(&[1_000_000, 2_000_000]),
            exactly_once: true,
            check: crate::check::judge(&[1; 1000], &[]),
            notes: Vec::new(),
        }
    }

    #[test]
    fn percentiles_come_out_in_ms() {
        let samples: Vec<u64> = (1..=1000).map(|i| i * 1_000_000).collect();
        let l = summarize(&samples).unwrap();
        assert_eq!(l.samples, 1000);
        assert!((l.p50_ms - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_9_ms - 999.0).abs() < 1.0, "{l:?}");
        assert!((l.max_ms - 1000.0).abs() < 1.0, "{l:?}");
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn zero_latency_and_huge_latency_do_not_panic() {
        let l = summarize(&[0, u64::MAX]).unwrap();
        assert_eq!(l.samples, 2);
    }

    #[test]
    fn json_line_has_the_fields_the_issue_names() {
        let mut r = sample_report();
        r.finish_rates();
        let line = r.json_line();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["tasks_per_s"], 2000.0);
        assert_eq!(v["cpu_s_per_1000_tasks"], 0.25);
        assert_eq!(v["exactly_once"], true);
        assert_eq!(v["adapter"], "memory");
        assert_eq!(v["settings"]["workers"], "in-process");
        assert_eq!(v["latency"]["p50_ms"], 1.0);
        assert_eq!(v["peak_rss_kib"], 2048);
        assert!(v["rss_scope"].is_string());
        assert!(line.contains("\"exactly_once\":true"));
    }

    #[test]
    fn table_row_lines_up_with_the_header() {
        let mut r = sample_report();
        r.finish_rates();
        r.latency = None;
        let row = table_row(&r);
        assert_eq!(row.len(), table_header().len(), "{row}\n{}", table_header());
        assert!(row.ends_with("yes"));
    }
}
