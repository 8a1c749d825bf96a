//! The kit's shorthand for the optional parts of the seam: the cases call
//! `b.stats(q)` or `b.dead_letter(r, reason)` on any `dyn Broker`, and a
//! broker that lacks the optional trait a case needs fails it with a
//! message naming the trait (a clause that needs it is not optional).

use std::time::Duration;

use async_trait::async_trait;

use crate::broker::{
    Broadcast, BroadcastStream, Broker, DeadLetter, DeadLetters, Disposition, QueueAdmin,
    QueueStats, QueueSummary, Receipt, Replay, Settlement,
};
use crate::error::BrokerError;

fn queues(b: &dyn Broker) -> &dyn QueueAdmin {
    b.queues().unwrap_or_else(|| {
        panic!(
            "{}: no QueueAdmin (B13 needs stats and purge)",
            b.describe()
        )
    })
}

fn dead(b: &dyn Broker) -> &dyn DeadLetters {
    b.dead_letters().unwrap_or_else(|| {
        panic!(
            "{}: no DeadLetters (B7 needs dead-letter administration)",
            b.describe()
        )
    })
}

fn channels(b: &dyn Broker) -> &dyn Broadcast {
    b.broadcast()
        .unwrap_or_else(|| panic!("{}: no Broadcast (B11)", b.describe()))
}

/// Shorthand used by the cases.
#[async_trait]
pub(crate) trait BrokerOps {
    /// `settle` of one `Retry`.
    async fn retry(&self, r: &Receipt, after: Duration, error: &str) -> Result<(), BrokerError>;
    /// `settle` of one `Release`.
    async fn release(&self, r: &Receipt, after: Duration) -> Result<(), BrokerError>;
    /// `settle` of one non-charging `DeadLetter`.
    async fn dead_letter(&self, r: &Receipt, reason: &str) -> Result<(), BrokerError>;
    /// `settle` of many `Ack`s.
    async fn ack_many(&self, receipts: &[Receipt]) -> Vec<Result<(), BrokerError>>;
    /// `QueueAdmin::stats`.
    async fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError>;
    /// `QueueAdmin::purge`.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;
    /// `QueueAdmin::list`.
    async fn list_queues(&self) -> Result<Vec<QueueSummary>, BrokerError>;
    /// Every dead letter of `queue` (all pages, at most `limit`).
    async fn list_dead(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, BrokerError>;
    /// `DeadLetters::count`.
    async fn dead_letter_count(&self, queue: &str) -> Result<u64, BrokerError>;
    /// `DeadLetters::replay`.
    async fn replay_dead_letters(
        &self,
        queue: &str,
        which: Replay,
        reset: bool,
    ) -> Result<u64, BrokerError>;
    /// `DeadLetters::purge`.
    async fn purge_dead_letters(&self, queue: &str) -> Result<u64, BrokerError>;
    /// `Broadcast::send`.
    async fn broadcast_send(&self, channel: &str, payload: &str) -> Result<(), BrokerError>;
    /// `Broadcast::subscribe`.
    async fn subscribe(&self, channel: &str) -> Result<BroadcastStream, BrokerError>;
}

#[async_trait]
impl BrokerOps for dyn Broker {
    async fn retry(&self, r: &Receipt, after: Duration, error: &str) -> Result<(), BrokerError> {
        let disposition = Disposition::Retry {
            after,
            error: error.to_owned(),
        };
        self.settle_one(Settlement::new(r.clone(), disposition))
            .await
    }

    async fn release(&self, r: &Receipt, after: Duration) -> Result<(), BrokerError> {
        self.settle_one(Settlement::new(r.clone(), Disposition::Release { after }))
            .await
    }

    async fn dead_letter(&self, r: &Receipt, reason: &str) -> Result<(), BrokerError> {
        let disposition = Disposition::DeadLetter {
            reason: reason.to_owned(),
            error: None,
            charge: false,
        };
        self.settle_one(Settlement::new(r.clone(), disposition))
            .await
    }

    async fn ack_many(&self, receipts: &[Receipt]) -> Vec<Result<(), BrokerError>> {
        let batch: Vec<Settlement> = receipts
            .iter()
            .map(|r| Settlement::new(r.clone(), Disposition::Ack))
            .collect();
        self.settle(&batch).await
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        queues(self).stats(queue).await
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        queues(self).purge(queue).await
    }

    async fn list_queues(&self) -> Result<Vec<QueueSummary>, BrokerError> {
        queues(self).list().await
    }

    async fn list_dead(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let dl = dead(self);
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = dl.list(queue, cursor.as_deref(), 100).await?;
            out.extend(page.items);
            match page.next {
                Some(next) if out.len() < limit => cursor = Some(next),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn dead_letter_count(&self, queue: &str) -> Result<u64, BrokerError> {
        dead(self).count(queue).await
    }

    async fn replay_dead_letters(
        &self,
        queue: &str,
        which: Replay,
        reset: bool,
    ) -> Result<u64, BrokerError> {
        dead(self).replay(queue, which, reset).await
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64, BrokerError> {
        dead(self).purge(queue).await
    }

    async fn broadcast_send(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        channels(self).send(channel, payload).await
    }

    async fn subscribe(&self, channel: &str) -> Result<BroadcastStream, BrokerError> {
        channels(self).subscribe(channel).await
    }
}
