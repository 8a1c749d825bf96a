//! The worker's side of the control plane: listens on the namespace's
//! control channel, carries out the commands addressed to it and answers
//! on each request's reply channel (see [`crate::control`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;

use super::Runtime;
use super::config::host_name;
use crate::broker::BroadcastStream;
use crate::control::{
    Answer, CONTROL_CHANNEL, CONTROL_VERSION, Command, Inspect, Reply, Request, WorkerStats,
};
use crate::envelope::TaskId;

/// Subscribes to the control channel; `None` when the broker has no
/// broadcast or the subscription fails (logged: the worker runs without
/// a control plane).
pub(crate) async fn subscribe(rt: &Runtime) -> Option<BroadcastStream> {
    let broadcast = rt.broker.broadcast()?;
    match broadcast.subscribe(CONTROL_CHANNEL).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, broker = %rt.broker.describe(), "could not listen for control commands; this worker will not answer `stem ping`, `inspect`, `revoke` and the like");
            None
        }
    }
}

/// Answers commands until the worker stops.
pub(crate) async fn run(rt: Arc<Runtime>, mut commands: BroadcastStream) {
    let host = host_name();
    loop {
        let msg = tokio::select! {
            () = rt.stop.cancelled() => return,
            m = commands.next() => m,
        };
        let Some(msg) = msg else {
            // The subscription ended (the broker closed it): listen again.
            tokio::select! {
                () = rt.stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match subscribe(&rt).await {
                Some(s) => commands = s,
                None => return,
            }
            continue;
        };
        let Some((request, answer)) = answer_raw(&rt, &msg.payload) else {
            continue;
        };
        let shutdown = matches!(request.command, Some(Command::Shutdown))
            && matches!(answer, Answer::Done { .. });
        let reply = Reply {
            v: CONTROL_VERSION,
            request: request.id,
            worker_id: rt.config.worker_id.clone(),
            host: host.clone(),
            pid: std::process::id(),
            answer,
        };
        if let Some(broadcast) = rt.broker.broadcast() {
            match serde_json::to_string(&reply) {
                Ok(payload) => {
                    if let Err(e) = broadcast.send(&request.reply_to, &payload).await {
                        tracing::warn!(error = %e, "could not send a control reply");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "control reply does not encode"),
            }
        }
        if shutdown {
            tracing::info!(
                "shutdown asked over the control plane: no new tasks; waiting for running ones"
            );
            rt.stop.cancel();
            return;
        }
    }
}

/// The parts of a request needed to answer it, read even when the command
/// itself is not understood (a newer sender).
struct Envelope {
    id: TaskId,
    reply_to: String,
    command: Option<Command>,
}

/// Reads a request; `None` when it is not for this worker or cannot be
/// answered at all (no id or reply channel).
fn answer_raw(rt: &Runtime, payload: &str) -> Option<(Envelope, Answer)> {
    match serde_json::from_str::<Request>(payload) {
        Ok(req) => {
            if !addressed(rt, req.to.as_deref()) {
                return None;
            }
            let answer = answer(rt, &req.command);
            Some((
                Envelope {
                    id: req.id,
                    reply_to: req.reply_to,
                    command: Some(req.command),
                },
                answer,
            ))
        }
        Err(e) => {
            // Answer what can be answered: a command this build does not know.
            let value: serde_json::Value = serde_json::from_str(payload).ok()?;
            let id: TaskId = value.get("id")?.as_str()?.parse().ok()?;
            let reply_to = value.get("reply_to")?.as_str()?.to_owned();
            let to: Option<Vec<String>> = value
                .get("to")
                .and_then(|t| serde_json::from_value(t.clone()).ok());
            if !addressed(rt, to.as_deref()) {
                return None;
            }
            let version = value.get("v").and_then(serde_json::Value::as_u64);
            tracing::warn!(error = %e, ?version, "control command not understood");
            Some((
                Envelope {
                    id,
                    reply_to,
                    command: None,
                },
                Answer::Error {
                    message: format!(
                        "command not understood by this worker (it speaks control version {CONTROL_VERSION}): {e}"
                    ),
                },
            ))
        }
    }
}

fn addressed(rt: &Runtime, to: Option<&[String]>) -> bool {
    to.is_none_or(|to| to.contains(&rt.config.worker_id))
}

fn answer(rt: &Runtime, command: &Command) -> Answer {
    match command {
        Command::Ping => Answer::Pong,
        Command::Stats => Answer::Stats(stats(rt)),
        Command::Inspect { what } => match what {
            Inspect::Active => Answer::Tasks {
                tasks: rt.live.active(),
            },
            Inspect::Reserved => Answer::Tasks {
                tasks: rt.dispatch.queued_infos(),
            },
            Inspect::Revoked => Answer::RevokedIds {
                ids: rt.live.revoked_ids(),
            },
        },
        Command::Revoke { id, terminate } => {
            let running = rt.live.revoke(*id, *terminate);
            let reserved = rt.dispatch.holds(*id);
            if running || reserved {
                tracing::info!(task.id = %id, running, reserved, terminate, "revoke received for a task held here");
            }
            Answer::Revoked {
                id: *id,
                running,
                reserved,
            }
        }
        Command::Shutdown => Answer::Done {
            detail: String::from("shutting down gracefully"),
        },
        Command::Pause { queue } => {
            if !rt.config.queues.iter().any(|q| q == queue) {
                not_consumed(rt, queue)
            } else if rt.live.pause(queue) {
                tracing::info!(queue, "queue paused over the control plane");
                Answer::Done {
                    detail: format!("paused `{queue}`"),
                }
            } else {
                Answer::Done {
                    detail: format!("`{queue}` was already paused"),
                }
            }
        }
        Command::Resume { queue } => {
            if !rt.config.queues.iter().any(|q| q == queue) {
                not_consumed(rt, queue)
            } else if rt.live.resume(queue) {
                tracing::info!(queue, "queue resumed over the control plane");
                Answer::Done {
                    detail: format!("resumed `{queue}`"),
                }
            } else {
                Answer::Done {
                    detail: format!("`{queue}` was not paused"),
                }
            }
        }
    }
}

fn not_consumed(rt: &Runtime, queue: &str) -> Answer {
    Answer::Error {
        message: format!(
            "this worker does not consume `{queue}` (it consumes: {})",
            rt.config.queues.join(", ")
        ),
    }
}

fn stats(rt: &Runtime) -> WorkerStats {
    let report = rt.counters.report();
    let prefetched = rt.dispatch.queued_len();
    let active = rt.dispatch.in_flight().saturating_sub(prefetched);
    WorkerStats {
        uptime_secs: rt.started.elapsed().as_secs(),
        concurrency: rt.config.concurrency,
        active,
        prefetched,
        queues: rt.config.queues.clone(),
        paused: rt.live.paused().into_iter().collect(),
        started: rt.counters.started.load(Ordering::Relaxed),
        succeeded: report.succeeded,
        retried: report.retried,
        failed: report.failed,
        dead_lettered: report.dead_lettered,
        revoked: report.revoked,
        requeued: report.requeued,
    }
}
