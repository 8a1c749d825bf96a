//! The control plane: commands to live workers over the broker's broadcast
//! channel, and their replies.
//!
//! A [`Control`] (from [`Stem::control`]) sends one [`Command`] to every
//! worker of the namespace, or to the workers named, on the channel
//! [`CONTROL_CHANNEL`]; each worker that hears it answers on the request's
//! own reply channel; the caller collects the answers until every live
//! worker (as the result backend's heartbeats list them) has answered or
//! the timeout passes, and names the live workers that stayed silent.
//!
//! Requests and replies are JSON, versioned like the envelope
//! ([`CONTROL_VERSION`]); a worker that does not know a command (an older
//! build) answers [`Answer::Error`] instead of ignoring it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stem_core::StemError> {
//! use std::time::Duration;
//! let stem = stem_core::connect("memory://control-doc").await?;
//! // No worker runs here: nobody answers.
//! let replies = stem.control()?.timeout(Duration::from_millis(50)).ping().await?;
//! assert!(replies.replies.is_empty());
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::broker::Broadcast;
use crate::client::Stem;
use crate::envelope::TaskId;
use crate::error::{BrokerError, StemError};

/// The broadcast channel workers listen to for commands.
pub const CONTROL_CHANNEL: &str = "stem.control";

/// The control message format this crate writes and reads.
pub const CONTROL_VERSION: u32 = 1;

/// How long a [`Control`] waits for replies unless told otherwise.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// What to ask of workers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Command {
    /// Answer [`Answer::Pong`].
    Ping,
    /// Answer [`Answer::Stats`].
    Stats,
    /// List tasks: running, waiting for a slot, or revoked.
    Inspect {
        /// Which list.
        what: Inspect,
    },
    /// Revoke a task: skip it if it has not started; if it runs, stop it at
    /// its next lease renewal, or at once with `terminate`.
    Revoke {
        /// The task.
        id: TaskId,
        /// Stop it now if it runs (its future is dropped at its next
        /// await; a blocking task sees `ctx.is_cancelled()`).
        terminate: bool,
    },
    /// Shut down gracefully, as on SIGTERM.
    Shutdown,
    /// Stop consuming a queue (the worker keeps running).
    Pause {
        /// The queue.
        queue: String,
    },
    /// Consume a paused queue again.
    Resume {
        /// The queue.
        queue: String,
    },
}

/// Which tasks [`Command::Inspect`] lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Inspect {
    /// Running now.
    Active,
    /// Leased by the worker and waiting for a slot.
    Reserved,
    /// Revoked tasks this worker knows of (heard or skipped), newest last.
    Revoked,
}

impl std::str::FromStr for Inspect {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Self::Active),
            "reserved" => Ok(Self::Reserved),
            "revoked" => Ok(Self::Revoked),
            other => Err(format!(
                "unknown list `{other}`: expected active, reserved or revoked"
            )),
        }
    }
}

/// A command on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`CONTROL_VERSION`] of the sender.
    pub v: u32,
    /// Unique per request; replies carry it.
    pub id: TaskId,
    /// The channel replies go to.
    pub reply_to: String,
    /// The workers addressed; `None` for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<String>>,
    /// What to do.
    pub command: Command,
}

/// A task as a worker sees it, in [`Answer::Tasks`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// The task id.
    pub id: TaskId,
    /// The task name.
    pub name: String,
    /// Its queue.
    pub queue: String,
    /// Size of its JSON arguments in bytes.
    pub args_bytes: usize,
    /// When this attempt started (`None` while waiting for a slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// The attempt (1 for the first run).
    pub attempt: u32,
}

/// A worker's counters and settings, in [`Answer::Stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Seconds since the worker started.
    pub uptime_secs: u64,
    /// Tasks run at once at most.
    pub concurrency: usize,
    /// Running now.
    pub active: usize,
    /// Leased and waiting for a slot.
    pub prefetched: usize,
    /// Queues consumed.
    pub queues: Vec<String>,
    /// Queues paused.
    pub paused: Vec<String>,
    /// Attempts started.
    pub started: u64,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed and were scheduled again.
    pub retried: u64,
    /// Tasks that failed for good.
    pub failed: u64,
    /// Deliveries dead-lettered.
    pub dead_lettered: u64,
    /// Revoked deliveries skipped or stopped.
    pub revoked: u64,
    /// Deliveries handed back without an attempt charged.
    pub requeued: u64,
}

/// A worker's answer to one command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Answer {
    /// To [`Command::Ping`].
    Pong,
    /// To [`Command::Stats`].
    Stats(WorkerStats),
    /// To [`Command::Inspect`] of active or reserved tasks.
    Tasks {
        /// The tasks.
        tasks: Vec<TaskInfo>,
    },
    /// To [`Command::Inspect`] of revoked tasks.
    RevokedIds {
        /// The ids, oldest first.
        ids: Vec<TaskId>,
    },
    /// To [`Command::Revoke`].
    Revoked {
        /// The task.
        id: TaskId,
        /// It was running here (and is stopped now with `terminate`, or at
        /// its next lease renewal without).
        running: bool,
        /// It was waiting for a slot here and will be skipped.
        reserved: bool,
    },
    /// The command was carried out ([`Command::Shutdown`],
    /// [`Command::Pause`], [`Command::Resume`]).
    Done {
        /// What changed, in words.
        detail: String,
    },
    /// The command could not be carried out, or was not understood.
    Error {
        /// Why.
        message: String,
    },
}

/// A reply on the wire: who answered, and what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// [`CONTROL_VERSION`] of the worker.
    pub v: u32,
    /// The request's id.
    pub request: TaskId,
    /// The worker's id.
    pub worker_id: String,
    /// Its host name.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// The answer.
    pub answer: Answer,
}

/// The replies to one command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replies {
    /// One per worker that answered, in arrival order.
    pub replies: Vec<Reply>,
    /// Workers the result backend lists as alive that were addressed and
    /// did not answer within the timeout (empty without a result backend).
    pub silent: Vec<String>,
}

/// Sends commands to live workers; made by [`Stem::control`].
#[derive(Clone, Debug)]
pub struct Control {
    stem: Stem,
    timeout: Duration,
    to: Option<Vec<String>>,
}

impl Stem {
    /// The control plane of this client's namespace.
    ///
    /// # Errors
    /// [`StemError::NoBroadcast`] when the broker has no broadcast channel.
    pub fn control(&self) -> Result<Control, StemError> {
        broadcast_of(self)?;
        Ok(Control {
            stem: self.clone(),
            timeout: DEFAULT_REPLY_TIMEOUT,
            to: None,
        })
    }
}

/// The broker's broadcast, or the error that says there is none.
pub(crate) fn broadcast_of(stem: &Stem) -> Result<&dyn Broadcast, StemError> {
    stem.broker()
        .broadcast()
        .ok_or_else(|| StemError::NoBroadcast {
            adapter: stem.broker().describe(),
        })
}

impl Control {
    /// How long to wait for replies (default [`DEFAULT_REPLY_TIMEOUT`]).
    #[must_use]
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Addresses only these workers (by worker id).
    #[must_use]
    pub fn to<I, S>(mut self, workers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.to = Some(workers.into_iter().map(Into::into).collect());
        self
    }

    /// Every addressed worker answers [`Answer::Pong`].
    ///
    /// # Errors
    /// A broker error sending the command or listening for replies.
    pub async fn ping(&self) -> Result<Replies, StemError> {
        self.send(Command::Ping).await
    }

    /// Every addressed worker answers its [`WorkerStats`].
    ///
    /// # Errors
    /// As [`Control::ping`].
    pub async fn stats(&self) -> Result<Replies, StemError> {
        self.send(Command::Stats).await
    }

    /// Lists the tasks each worker runs, holds or knows revoked.
    ///
    /// # Errors
    /// As [`Control::ping`].
    pub async fn inspect(&self, what: Inspect) -> Result<Replies, StemError> {
        self.send(Command::Inspect { what }).await
    }

    /// Revokes a task everywhere: recorded in the result backend (so a
    /// worker that fetches it later skips it, and it is recorded
    /// `Revoked`), then told to every live worker, which skips it if it
    /// holds it, and stops it if it runs: at once with `terminate`, else at
    /// its next lease renewal.
    ///
    /// Without a result backend only the live workers learn of it.
    ///
    /// # Errors
    /// A backend error recording the revocation, or as [`Control::ping`].
    pub async fn revoke(&self, id: TaskId, terminate: bool) -> Result<Replies, StemError> {
        if self.stem.backend().is_some() {
            self.stem.revoke(id).await?;
        }
        self.send(Command::Revoke { id, terminate }).await
    }

    /// Asks the addressed workers to shut down gracefully.
    ///
    /// # Errors
    /// As [`Control::ping`].
    pub async fn shutdown(&self) -> Result<Replies, StemError> {
        self.send(Command::Shutdown).await
    }

    /// Asks the addressed workers to stop consuming `queue`.
    ///
    /// # Errors
    /// As [`Control::ping`].
    pub async fn pause(&self, queue: &str) -> Result<Replies, StemError> {
        self.send(Command::Pause {
            queue: queue.to_owned(),
        })
        .await
    }

    /// Asks the addressed workers to consume `queue` again.
    ///
    /// # Errors
    /// As [`Control::ping`].
    pub async fn resume(&self, queue: &str) -> Result<Replies, StemError> {
        self.send(Command::Resume {
            queue: queue.to_owned(),
        })
        .await
    }

    /// Sends any command and collects the replies.
    ///
    /// # Errors
    /// A broker error sending the command or listening for replies.
    pub async fn send(&self, command: Command) -> Result<Replies, StemError> {
        let broadcast = broadcast_of(&self.stem)?;
        let id = TaskId::new();
        let reply_to = format!("stem.reply.{}", id.as_uuid().simple());
        // Subscribed before the command goes out, so no reply is missed.
        let mut replies_stream = broadcast.subscribe(&reply_to).await?;
        let expected = self.expected().await;
        let request = Request {
            v: CONTROL_VERSION,
            id,
            reply_to,
            to: self.to.clone(),
            command,
        };
        let payload = serde_json::to_string(&request).map_err(|e| {
            StemError::Broker(BrokerError::Invalid(format!(
                "control request does not encode: {e}"
            )))
        })?;
        broadcast.send(CONTROL_CHANNEL, &payload).await?;
        let mut out = Replies::default();
        let mut heard = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if let Some(expected) = &expected
                && !expected.is_empty()
                && expected.is_subset(&heard)
            {
                break;
            }
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies_stream.next()).await
            else {
                break;
            };
            match serde_json::from_str::<Reply>(&msg.payload) {
                Ok(reply) if reply.request == id => {
                    if heard.insert(reply.worker_id.clone()) {
                        out.replies.push(reply);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable control reply ignored");
                }
            }
        }
        if let Some(expected) = expected {
            out.silent = expected.difference(&heard).cloned().collect();
        }
        Ok(out)
    }

    /// The live workers addressed, from the result backend's heartbeats;
    /// `None` without a backend (then the whole timeout is waited).
    async fn expected(&self) -> Option<BTreeSet<String>> {
        let backend = self.stem.backend()?;
        let workers = match backend.workers().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "could not list live workers; waiting the whole timeout for replies");
                return None;
            }
        };
        Some(
            workers
                .into_iter()
                .filter(|w| w.alive)
                .map(|w| w.heartbeat.worker_id)
                .filter(|id| self.to.as_ref().is_none_or(|to| to.contains(id)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_a_stable_wire_form() {
        let json = serde_json::to_value(Command::Revoke {
            id: "0190a5d2-7c4e-7000-8000-000000000001".parse().unwrap(),
            terminate: true,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "revoke", "id": "0190a5d2-7c4e-7000-8000-000000000001", "terminate": true})
        );
        let json = serde_json::to_value(Command::Inspect {
            what: Inspect::Reserved,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "inspect", "what": "reserved"})
        );
        let stats = serde_json::to_value(Answer::Stats(WorkerStats::default())).unwrap();
        assert_eq!(stats["type"], "stats");
        assert_eq!(stats["concurrency"], 0);
    }

    #[test]
    fn an_unknown_command_does_not_decode() {
        let raw = r#"{"v":2,"id":"0190a5d2-7c4e-7000-8000-000000000001","reply_to":"r","command":{"type":"reboot"}}"#;
        assert!(serde_json::from_str::<Request>(raw).is_err());
    }
}
