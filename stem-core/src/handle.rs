//! [`TaskHandle`]: the typed result of an enqueue.

use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::backend::{FailureKind, TaskState};
use crate::client::Stem;
use crate::envelope::TaskId;
use crate::error::{StemError, TaskError};

/// A handle to an enqueued task whose output is `T`.
pub struct TaskHandle<T> {
    id: TaskId,
    client: Stem,
    _output: PhantomData<fn() -> T>,
}

impl<T> Clone for TaskHandle<T> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            client: self.client.clone(),
            _output: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for TaskHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle")
            .field("id", &self.id)
            .field("output", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> TaskHandle<T> {
    /// A handle for `id` read through `client`.
    #[must_use]
    pub fn new(id: TaskId, client: Stem) -> Self {
        Self {
            id,
            client,
            _output: PhantomData,
        }
    }

    /// The task id.
    #[must_use]
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The current state (`Pending` while nothing is recorded).
    ///
    /// # Errors
    /// No result backend, or a backend error.
    pub async fn state(&self) -> Result<TaskState, StemError> {
        self.client.state(self.id).await
    }
}

impl<T: DeserializeOwned> TaskHandle<T> {
    /// Waits up to `timeout` for the task to finish and returns its typed
    /// output.
    ///
    /// # Errors
    /// [`TaskError`] saying whether the task failed (message and type),
    /// was revoked, expired, or the wait timed out.
    pub async fn wait(&self, timeout: Duration) -> Result<T, TaskError> {
        let task_id = self.id;
        let record = self
            .client
            .wait_record(task_id, timeout)
            .await
            .map_err(|e| match e {
                StemError::NoResultBackend => TaskError::NoResultBackend { task_id },
                other => TaskError::Backend {
                    task_id,
                    reason: other.to_string(),
                },
            })?;
        match record.map(|r| r.state) {
            Some(TaskState::Succeeded { result }) => {
                serde_json::from_str(result.get()).map_err(|e| TaskError::Decode {
                    task_id,
                    reason: e.to_string(),
                })
            }
            Some(TaskState::Failed { error }) if error.kind == FailureKind::Expired => {
                Err(TaskError::Expired { task_id })
            }
            Some(TaskState::Failed { error }) => Err(TaskError::Failed {
                task_id,
                message: error.message,
                type_name: error.type_name,
            }),
            Some(TaskState::Revoked) => Err(TaskError::Revoked { task_id }),
            _ => Err(TaskError::Timeout {
                task_id,
                waited: timeout,
            }),
        }
    }
}
