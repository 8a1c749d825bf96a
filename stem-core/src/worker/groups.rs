//! Group completion: when a terminal record of a group member is stored,
//! the backend counts it, and the member that completes the group
//! enqueues the chord callback (R4, R5; the backend answers the callback
//! exactly once).

use crate::backend::ResultBackend;
use crate::broker::Broker;
use crate::envelope::TaskId;

/// Records that one member of `group` is terminal, and enqueues the
/// chord's callback when this member completed the group.
pub(crate) async fn member_finished(
    broker: &dyn Broker,
    backend: &dyn ResultBackend,
    group: TaskId,
) {
    match backend.member_finished(group).await {
        Ok(Some(callback)) => {
            let id = callback.id;
            if let Err(e) = broker.publish(callback).await {
                tracing::error!(group_id = %group, callback_id = %id, error = %e, "could not enqueue the chord callback");
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(group_id = %group, error = %e, "could not record group progress");
        }
    }
}
