//! Group completion: when a terminal record of a group member is stored,
//! the backend counts it, and the member that completes the group
//! enqueues the chord callback (R4, R5; the backend answers the callback
//! exactly once).
//!
//! The publish of the callback is idempotent: unless the callback carries
//! a unique key of its own, it gets `stem:chord:<group id>`, so a publish
//! retried after an ambiguous error (the write ran, the reply was lost) or
//! repeated by a second finisher when broker and backend are different
//! stores stores one callback; a `Duplicate` answer counts as done.

use std::time::Duration;

use crate::backend::ResultBackend;
use crate::broker::{Broker, Published};
use crate::envelope::{Envelope, TaskId, Unique, UniqueRelease};
use crate::error::BrokerError;

/// Attempts at publishing a callback before giving up (with backoff from
/// 100 ms: about 3 s in all).
const PUBLISH_ATTEMPTS: u32 = 5;

/// How long the callback's unique key keeps a repeated publish out.
const CALLBACK_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// Records that one member of `group` is terminal, and enqueues the
/// chord's callback when this member completed the group.
pub(crate) async fn member_finished(
    broker: &dyn Broker,
    backend: &dyn ResultBackend,
    group: TaskId,
) {
    match backend.member_finished(group).await {
        Ok(Some(callback)) => publish_callback(broker, group, callback).await,
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(group_id = %group, error = %e, "could not record group progress");
        }
    }
}

/// The callback with its idempotency key: its own unique key if it has
/// one, else `stem:chord:<group>` for an hour from now.
fn keyed(group: TaskId, mut callback: Envelope) -> Envelope {
    if callback.unique.is_none() {
        callback.unique = Some(Unique {
            key: format!("stem:chord:{group}"),
            until: chrono::Utc::now().max(callback.enqueued_at) + CALLBACK_WINDOW,
            release: UniqueRelease::Window,
        });
    }
    callback
}

async fn publish_callback(broker: &dyn Broker, group: TaskId, callback: Envelope) {
    let callback = keyed(group, callback);
    let id = callback.id;
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=PUBLISH_ATTEMPTS {
        match broker.publish(callback.clone()).await {
            Ok(Published::Stored(_)) => return,
            Ok(Published::Duplicate(holder)) => {
                tracing::debug!(group_id = %group, callback_id = %id, holder = %holder, "the chord callback was already enqueued");
                return;
            }
            Err(e @ (BrokerError::Unavailable { .. } | BrokerError::Storage { .. }))
                if attempt < PUBLISH_ATTEMPTS =>
            {
                tracing::warn!(group_id = %group, callback_id = %id, attempt, error = %e, "enqueueing the chord callback failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(e) => {
                tracing::error!(group_id = %group, callback_id = %id, error = %e, "could not enqueue the chord callback");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callback_gets_the_group_key_unless_it_has_one() {
        let group = TaskId::new();
        let env = Envelope::new("t", "q", serde_json::json!({})).expect("envelope");
        let keyed_env = keyed(group, env.clone());
        let u = keyed_env.unique.expect("keyed");
        assert_eq!(u.key, format!("stem:chord:{group}"));
        assert!(u.until > chrono::Utc::now() + chrono::TimeDelta::minutes(59));
        let mut own = env;
        own.unique = Some(Unique {
            key: String::from("mine"),
            until: own.enqueued_at + chrono::TimeDelta::seconds(5),
            release: UniqueRelease::OnFinish,
        });
        assert_eq!(keyed(group, own).unique.expect("kept").key, "mine");
    }

    #[tokio::test]
    async fn a_second_publish_of_one_callback_stores_nothing() {
        let broker = crate::memory::InMemoryBroker::new();
        let group = TaskId::new();
        let env = Envelope::new("t", "q", serde_json::json!({})).expect("envelope");
        publish_callback(&broker, group, env.clone()).await;
        publish_callback(&broker, group, env).await;
        let got = broker
            .fetch(&crate::FetchRequest::new(["q"], 10))
            .await
            .expect("fetch");
        assert_eq!(got.len(), 1, "one callback stored");
    }
}
