//! The exactly-once check: every sequence number sent ran exactly once, and
//! nothing ran that was never sent.

use serde::Serialize;

/// How many ids of each kind a verdict lists by value.
const SHOWN: usize = 10;

/// The verdict on one scenario's executions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Verdict {
    /// Tasks sent.
    pub(crate) expected: u64,
    /// Sequence numbers that never ran.
    pub(crate) lost: u64,
    /// Sequence numbers that ran more than once.
    pub(crate) duplicated: u64,
    /// Executions of sequence numbers that were never sent.
    pub(crate) unexpected: u64,
    /// The first lost sequence numbers.
    pub(crate) lost_first: Vec<u64>,
    /// The first duplicated sequence numbers, with their run counts.
    pub(crate) duplicated_first: Vec<(u64, u32)>,
    /// The first unexpected sequence numbers.
    pub(crate) unexpected_first: Vec<u64>,
}

impl Verdict {
    /// True when every task ran exactly once and nothing else ran.
    pub(crate) fn exactly_once(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0
    }

    /// A sentence for stderr naming what went wrong, or `None` when all is well.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.exactly_once() {
            return None;
        }
        let mut parts = Vec::new();
        if self.lost > 0 {
            parts.push(format!(
                "{} of {} tasks never ran (first: {:?})",
                self.lost, self.expected, self.lost_first
            ));
        }
        if self.duplicated > 0 {
            parts.push(format!(
                "{} tasks ran more than once (first, as (seq, runs): {:?})",
                self.duplicated, self.duplicated_first
            ));
        }
        if self.unexpected > 0 {
            parts.push(format!(
                "{} executions carried ids that were never sent (first: {:?})",
                self.unexpected, self.unexpected_first
            ));
        }
        Some(parts.join("; "))
    }
}

/// Judges per-sequence run counts (`counts[seq]`) plus any executions of
/// sequence numbers outside `0..counts.len()`.
pub(crate) fn judge(counts: &[u32], unexpected: &[u64]) -> Verdict {
    let mut v = Verdict {
        expected: counts.len() as u64,
        unexpected: unexpected.len() as u64,
        unexpected_first: unexpected.iter().copied().take(SHOWN).collect(),
        ..Verdict::default()
    };
    for (seq, &n) in counts.iter().enumerate() {
        let seq = seq as u64;
        match n {
            1 => {}
            0 => {
                v.lost += 1;
                if v.lost_first.len() < SHOWN {
                    v.lost_first.push(seq);
                }
            }
            n => {
                v.duplicated += 1;
                if v.duplicated_first.len() < SHOWN {
                    v.duplicated_first.push((seq, n));
                }
            }
        }
    }
    v
}

/// Judges a log of executed sequence numbers (from worker processes) against
/// `expected` tasks numbered `0..expected`.
pub(crate) fn judge_log(expected: u64, seqs: impl IntoIterator<Item = u64>) -> Verdict {
    let mut counts = vec![0u32; usize::try_from(expected).unwrap_or(usize::MAX)];
    let mut unexpected = Vec::new();
    for seq in seqs {
        match usize::try_from(seq).ok().and_then(|i| counts.get_mut(i)) {
            Some(c) => *c = c.saturating_add(1),
            None => unexpected.push(seq),
        }
    }
    judge(&counts, &unexpected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_once_is_exactly_once() {
        let v = judge(&[1, 1, 1], &[]);
        assert!(v.exactly_once());
        assert_eq!(v.expected, 3);
        assert_eq!(v.problem(), None);
    }

    #[test]
    fn lost_and_duplicated_are_named() {
        let v = judge(&[1, 0, 2, 0, 3], &[]);
        assert!(!v.exactly_once());
        assert_eq!((v.lost, v.duplicated), (2, 2));
        assert_eq!(v.lost_first, vec![1, 3]);
        assert_eq!(v.duplicated_first, vec![(2, 2), (4, 3)]);
        let msg = v.problem().unwrap();
        assert!(
            msg.contains("2 of 5 tasks never ran (first: [1, 3])"),
            "{msg}"
        );
        assert!(msg.contains("(2, 2), (4, 3)"), "{msg}");
    }

    #[test]
    fn only_the_first_few_are_listed_but_all_are_counted() {
        let v = judge(&vec![0; 1000], &[]);
        assert_eq!(v.lost, 1000);
        assert_eq!(v.lost_first.len(), SHOWN);
    }

    #[test]
    fn a_log_from_worker_processes_is_judged_the_same() {
        let v = judge_log(4, [3, 0, 1, 2]);
        assert!(v.exactly_once());
        let v = judge_log(4, [3, 0, 0, 9]);
        assert_eq!((v.lost, v.duplicated, v.unexpected), (2, 1, 1));
        assert_eq!(v.lost_first, vec![1, 2]);
        assert_eq!(v.unexpected_first, vec![9]);
        assert!(v.problem().unwrap().contains("never sent (first: [9])"));
    }
}
