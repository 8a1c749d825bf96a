//! The control-plane commands: `stem ping`, `stats`, `inspect`, `revoke`,
//! `shutdown`, `pause`, `resume`. Each sends one command to the live
//! workers over the broker's broadcast and prints their replies, then the
//! live workers (by heartbeat) that stayed silent.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use stem::TaskId;
use stem::control::{Answer, Control, Inspect, Replies, TaskInfo, WorkerStats};

use crate::connect::{Target, task_id};
use crate::error::CliError;
use crate::output::{Align, Out, Table, ago};

/// Flags every control command takes.
#[derive(Debug, Args)]
pub(crate) struct Addressing {
    /// How long to wait for replies (`2s`, `500ms`).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub(crate) timeout: Duration,
    /// Address only this worker (repeatable; default: every worker).
    #[arg(long = "worker", value_name = "WORKER_ID", global = true)]
    pub(crate) workers: Vec<String>,
}

/// `stem inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// `active` (running), `reserved` (leased, waiting for a slot) or
    /// `revoked` (revoked ids the workers know).
    pub(crate) what: Inspect,
}

/// `stem revoke`.
#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    /// The task id (a UUID).
    pub(crate) id: String,
    /// Stop the task now if it runs (else at its next lease renewal).
    #[arg(long)]
    pub(crate) terminate: bool,
}

/// `stem shutdown`.
#[derive(Debug, Args)]
pub(crate) struct ShutdownArgs {
    /// The worker to stop (default: every worker of the namespace).
    pub(crate) worker: Option<String>,
}

/// `stem pause` and `stem resume`.
#[derive(Debug, Args)]
pub(crate) struct QueueArg {
    /// The queue.
    pub(crate) queue: String,
}

/// Which control command.
#[derive(Debug)]
pub(crate) enum Ask<'a> {
    Ping,
    Stats,
    Inspect(&'a InspectArgs),
    Revoke(&'a RevokeArgs),
    Shutdown(&'a ShutdownArgs),
    Pause(&'a QueueArg),
    Resume(&'a QueueArg),
}

/// One reply as `--json` prints it: who, then the answer's own fields
/// (`type` names the answer: `pong`, `stats`, `tasks`, `revoked_ids`,
/// `revoked`, `done`, `error`).
#[derive(Debug, Serialize)]
struct ReplyRow<'a> {
    worker_id: &'a str,
    host: &'a str,
    pid: u32,
    #[serde(flatten)]
    answer: &'a Answer,
}

/// The command's whole `--json` document.
#[derive(Debug, Serialize)]
struct Document<'a> {
    replies: Vec<ReplyRow<'a>>,
    /// Live workers (by heartbeat) addressed that did not answer.
    silent: &'a [String],
}

pub(crate) async fn run(
    target: &Target,
    out: Out,
    addressing: &Addressing,
    ask: Ask<'_>,
) -> Result<(), CliError> {
    let stem = target.client().await?;
    let mut control: Control = stem.control()?.timeout(addressing.timeout);
    let mut to = addressing.workers.clone();
    if let Ask::Shutdown(ShutdownArgs {
        worker: Some(worker),
    }) = &ask
    {
        to.push(worker.clone());
    }
    if !to.is_empty() {
        control = control.to(to);
    }
    let replies = match &ask {
        Ask::Ping => control.ping().await?,
        Ask::Stats => control.stats().await?,
        Ask::Inspect(a) => control.inspect(a.what).await?,
        Ask::Revoke(a) => control.revoke(task_id(&a.id)?, a.terminate).await?,
        Ask::Shutdown(_) => control.shutdown().await?,
        Ask::Pause(q) => control.pause(&q.queue).await?,
        Ask::Resume(q) => control.resume(&q.queue).await?,
    };
    print(out, &ask, &replies)?;
    verdict(&ask, &replies, addressing.timeout)
}

fn print(out: Out, ask: &Ask<'_>, replies: &Replies) -> Result<(), CliError> {
    if out.json() {
        return out.document(&Document {
            replies: replies
                .replies
                .iter()
                .map(|r| ReplyRow {
                    worker_id: &r.worker_id,
                    host: &r.host,
                    pid: r.pid,
                    answer: &r.answer,
                })
                .collect(),
            silent: &replies.silent,
        });
    }
    let mut text = match ask {
        Ask::Stats => stats_table(replies),
        Ask::Inspect(a) if a.what == Inspect::Revoked => revoked_table(replies),
        Ask::Inspect(_) => tasks_table(replies),
        _ => answers_table(replies),
    };
    for w in &replies.silent {
        text.push_str(&format!("{w}: no answer (alive by its heartbeat)\n"));
    }
    out.text(&text)
}

/// Exit 1 when nobody answered, when an addressed live worker stayed
/// silent, or when every answer is an error.
fn verdict(ask: &Ask<'_>, replies: &Replies, timeout: Duration) -> Result<(), CliError> {
    if replies.replies.is_empty() {
        return Err(CliError::Failed(format!(
            "no worker answered within {}: are workers running on this broker and namespace?",
            humantime::format_duration(timeout)
        )));
    }
    if !replies.silent.is_empty() {
        return Err(CliError::Failed(format!(
            "{} live worker(s) did not answer: {}",
            replies.silent.len(),
            replies.silent.join(", ")
        )));
    }
    let all_errors = replies
        .replies
        .iter()
        .all(|r| matches!(r.answer, Answer::Error { .. }));
    if all_errors {
        return Err(CliError::Failed(match ask {
            Ask::Pause(q) | Ask::Resume(q) => {
                format!("no worker that answered consumes `{}`", q.queue)
            }
            _ => String::from("every worker that answered refused the command"),
        }));
    }
    Ok(())
}

fn answers_table(replies: &Replies) -> String {
    let mut t = Table::new(&[
        ("WORKER", Align::Left),
        ("HOST", Align::Left),
        ("PID", Align::Right),
        ("ANSWER", Align::Left),
    ]);
    for r in &replies.replies {
        let answer = match &r.answer {
            Answer::Pong => String::from("pong"),
            Answer::Done { detail } => detail.clone(),
            Answer::Error { message } => format!("error: {message}"),
            Answer::Revoked {
                id,
                running,
                reserved,
            } => revoked_text(*id, *running, *reserved),
            other => format!("{other:?}"),
        };
        t.row(vec![
            r.worker_id.clone(),
            r.host.clone(),
            r.pid.to_string(),
            answer,
        ]);
    }
    t.render()
}

fn revoked_text(id: TaskId, running: bool, reserved: bool) -> String {
    if running {
        format!("{id} was running here: stopped")
    } else if reserved {
        format!("{id} was waiting here: skipped")
    } else {
        format!("{id} not held here")
    }
}

fn stats_table(replies: &Replies) -> String {
    let mut t = Table::new(&[
        ("WORKER", Align::Left),
        ("UPTIME", Align::Right),
        ("ACTIVE", Align::Right),
        ("PREFETCHED", Align::Right),
        ("SUCCEEDED", Align::Right),
        ("RETRIED", Align::Right),
        ("FAILED", Align::Right),
        ("DEAD", Align::Right),
        ("QUEUES", Align::Left),
    ]);
    for r in &replies.replies {
        let Answer::Stats(s) = &r.answer else {
            continue;
        };
        let WorkerStats {
            uptime_secs,
            concurrency,
            active,
            prefetched,
            succeeded,
            retried,
            failed,
            dead_lettered,
            ..
        } = s;
        let queues: Vec<String> = s
            .queues
            .iter()
            .map(|q| {
                if s.paused.contains(q) {
                    format!("{q} (paused)")
                } else {
                    q.clone()
                }
            })
            .collect();
        t.row(vec![
            r.worker_id.clone(),
            humantime::format_duration(Duration::from_secs(*uptime_secs)).to_string(),
            format!("{active}/{concurrency}"),
            prefetched.to_string(),
            succeeded.to_string(),
            retried.to_string(),
            failed.to_string(),
            dead_lettered.to_string(),
            queues.join(","),
        ]);
    }
    t.render()
}

fn tasks_table(replies: &Replies) -> String {
    let now = chrono::Utc::now();
    let mut t = Table::new(&[
        ("WORKER", Align::Left),
        ("TASK ID", Align::Left),
        ("NAME", Align::Left),
        ("QUEUE", Align::Left),
        ("ATTEMPT", Align::Right),
        ("ARGS", Align::Right),
        ("STARTED", Align::Left),
    ]);
    let mut any = false;
    for r in &replies.replies {
        let Answer::Tasks { tasks } = &r.answer else {
            continue;
        };
        for TaskInfo {
            id,
            name,
            queue,
            args_bytes,
            started_at,
            attempt,
        } in tasks
        {
            any = true;
            t.row(vec![
                r.worker_id.clone(),
                id.to_string(),
                name.clone(),
                queue.clone(),
                attempt.to_string(),
                format!("{args_bytes} B"),
                started_at.map_or_else(|| String::from("-"), |s| ago(now, s)),
            ]);
        }
    }
    if any {
        t.render()
    } else {
        format!("no tasks ({} worker(s) answered)\n", replies.replies.len())
    }
}

fn revoked_table(replies: &Replies) -> String {
    let mut t = Table::new(&[("WORKER", Align::Left), ("REVOKED TASK ID", Align::Left)]);
    for r in &replies.replies {
        if let Answer::RevokedIds { ids } = &r.answer {
            for id in ids {
                t.row(vec![r.worker_id.clone(), id.to_string()]);
            }
        }
    }
    t.render()
}
