//! The benchmark task and the recorder it reports to.
//!
//! `bench_noop` does no work of its own: it tells the [`Recorder`] which
//! sequence number it carried and, when the producer stamped a send time,
//! how long the task waited between being sent and being started.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// The queue every bench task is sent to. Scenarios never share it: each
/// one runs in a namespace of its own.
pub(crate) const QUEUE: &str = "bench";

/// What executed tasks report.
///
/// In-process it counts executions per sequence number (`counts[seq]`). In a
/// worker process (where the producer's `N` is unknown) it logs every
/// sequence number it saw instead, and the worker writes the log to a file
/// for the harness.
#[derive(Debug)]
pub(crate) struct Recorder {
    counts: Vec<AtomicU32>,
    ran: AtomicU64,
    out_of_range: Mutex<Vec<u64>>,
    seqs: Option<Mutex<Vec<u64>>>,
    latencies_ns: Mutex<Vec<u64>>,
}

impl Recorder {
    /// Counts executions of sequence numbers `0..n`.
    pub(crate) fn counting(n: u64) -> Self {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        Self {
            counts: (0..n).map(|_| AtomicU32::new(0)).collect(),
            ran: AtomicU64::new(0),
            out_of_range: Mutex::new(Vec::new()),
            seqs: None,
            latencies_ns: Mutex::new(Vec::new()),
        }
    }

    /// Logs every sequence number executed (worker-process mode).
    pub(crate) fn logging() -> Self {
        Self {
            counts: Vec::new(),
            ran: AtomicU64::new(0),
            out_of_range: Mutex::new(Vec::new()),
            seqs: Some(Mutex::new(Vec::new())),
            latencies_ns: Mutex::new(Vec::new()),
        }
    }

    /// Records one execution of `seq`; `sent_ns` is the producer's wall
    /// clock at send time in ns since the epoch, or 0 for "not timed".
    pub(crate) fn record(&self, seq: u64, sent_ns: u64) {
        if sent_ns != 0 {
            let waited = now_ns().saturating_sub(sent_ns);
            lock(&self.latencies_ns).push(waited);
        }
        if let Some(seqs) = &self.seqs {
            lock(seqs).push(seq);
        } else if let Some(c) = usize::try_from(seq).ok().and_then(|i| self.counts.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
        } else {
            lock(&self.out_of_range).push(seq);
        }
        self.ran.fetch_add(1, Ordering::Release);
    }

    /// Executions recorded so far, duplicates included.
    pub(crate) fn ran(&self) -> u64 {
        self.ran.load(Ordering::Acquire)
    }

    /// A snapshot of the per-sequence counts (in-process mode).
    pub(crate) fn counts(&self) -> Vec<u32> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Sequence numbers that ran but were never sent (in-process mode).
    pub(crate) fn out_of_range(&self) -> Vec<u64> {
        lock(&self.out_of_range).clone()
    }

    /// The sequence numbers logged so far (worker-process mode).
    pub(crate) fn take_seqs(&self) -> Vec<u64> {
        self.seqs
            .as_ref()
            .map(|s| std::mem::take(&mut *lock(s)))
            .unwrap_or_default()
    }

    /// The start-minus-send samples recorded so far, in ns.
    pub(crate) fn take_latencies(&self) -> Vec<u64> {
        std::mem::take(&mut *lock(&self.latencies_ns))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The worker state handed to `bench_noop`: a shared [`Recorder`], so the
/// harness keeps a handle to what the worker's copy records.
#[derive(Clone, Debug)]
pub(crate) struct Probe(pub(crate) Arc<Recorder>);

/// The wall clock in ns since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The benchmark's no-op task: records that `seq` ran (and its start-minus-
/// send latency when `sent_ns` is set). `pad` is the `--payload-bytes`
/// padding, carried only to make the envelope that big.
#[stem::task(queue = "bench")]
pub(crate) async fn bench_noop(probe: stem::State<Probe>, seq: u64, sent_ns: u64, pad: String) {
    std::hint::black_box(&pad);
    probe.0.record(seq, sent_ns);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_recorder_counts_and_flags_unknown_seqs() {
        let r = Recorder::counting(3);
        r.record(0, 0);
        r.record(2, 0);
        r.record(2, 0);
        r.record(7, 0);
        assert_eq!(r.counts(), vec![1, 0, 2]);
        assert_eq!(r.out_of_range(), vec![7]);
        assert_eq!(r.ran(), 4);
        assert!(r.take_latencies().is_empty());
    }

    #[test]
    fn logging_recorder_keeps_seqs_and_latencies() {
        let r = Recorder::logging();
        r.record(5, now_ns());
        r.record(1, 0);
        assert_eq!(r.take_seqs(), vec![5, 1]);
        assert_eq!(r.take_latencies().len(), 1);
        assert!(r.take_seqs().is_empty());
    }
}
