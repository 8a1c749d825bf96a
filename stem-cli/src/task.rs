//! `stem task show|wait ID`: a task's record from the result backend.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use stem::{TaskFailure, TaskId, TaskRecord, TaskState};

use crate::args::TaskCommand;
use crate::connect::{Target, task_id};
use crate::error::CliError;
use crate::output::{Out, fields, result_value, when};

pub(crate) async fn run(target: &Target, out: Out, cmd: &TaskCommand) -> Result<(), CliError> {
    match cmd {
        TaskCommand::Show { id } => show(target, out, id).await,
        TaskCommand::Wait { id, timeout } => wait(target, out, id, *timeout).await,
    }
}

/// A task record as `--json` prints it: the record's fields flat, the
/// state as its name, the result and error beside it.
#[derive(Debug, Serialize)]
struct Shown {
    id: TaskId,
    name: Option<String>,
    /// `pending`, `started`, `retrying`, `succeeded`, `failed`, `revoked`.
    state: &'static str,
    /// Whether the state is final.
    finished: bool,
    attempts: u32,
    worker_id: Option<String>,
    started_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    /// From the start to the last update, once finished.
    runtime_ms: Option<i64>,
    /// When the record expires from the backend.
    expires_at: DateTime<Utc>,
    /// When a retrying task runs next.
    next_at: Option<DateTime<Utc>>,
    group_id: Option<TaskId>,
    /// The output of a succeeded task.
    result: Option<serde_json::Value>,
    /// The error of a failed task, or of a retrying task's last attempt.
    error: Option<TaskFailure>,
    progress: Option<serde_json::Value>,
}

impl From<&TaskRecord> for Shown {
    fn from(r: &TaskRecord) -> Self {
        let (result, error, next_at) = match &r.state {
            TaskState::Succeeded { result } => (Some(result_value(result)), None, None),
            TaskState::Failed { error } => (None, Some(error.clone()), None),
            TaskState::Retrying { next_at, error } => (None, Some(error.clone()), Some(*next_at)),
            _ => (None, None, None),
        };
        let finished = r.state.is_terminal();
        Self {
            id: r.id,
            name: r.name.clone(),
            state: r.state.name(),
            finished,
            attempts: r.attempts,
            worker_id: r.worker_id.clone(),
            started_at: r.started_at,
            updated_at: r.updated_at,
            runtime_ms: r
                .started_at
                .filter(|_| finished)
                .map(|s| (r.updated_at - s).num_milliseconds()),
            expires_at: r.expires_at(),
            next_at,
            group_id: r.group_id,
            result,
            error,
            progress: r.progress.clone(),
        }
    }
}

fn render(s: &Shown) -> String {
    let dash = || String::from("-");
    let mut pairs = vec![
        ("id", s.id.to_string()),
        ("task", s.name.clone().unwrap_or_else(dash)),
        ("state", s.state.to_owned()),
        ("attempts", s.attempts.to_string()),
        ("worker", s.worker_id.clone().unwrap_or_else(dash)),
        ("started at", s.started_at.map_or_else(dash, when)),
        ("updated at", when(s.updated_at)),
    ];
    if let Some(ms) = s.runtime_ms {
        pairs.push(("runtime", format!("{ms} ms")));
    }
    if let Some(t) = s.next_at {
        pairs.push(("next attempt", when(t)));
    }
    if let Some(g) = s.group_id {
        pairs.push(("group", g.to_string()));
    }
    if let Some(r) = &s.result {
        pairs.push(("result", r.to_string()));
    }
    if let Some(e) = &s.error {
        pairs.push(("error", format!("{e} [{}]", kind_name(e))));
    }
    if let Some(p) = &s.progress {
        pairs.push(("progress", p.to_string()));
    }
    pairs.push(("expires at", when(s.expires_at)));
    fields(&pairs)
}

fn kind_name(e: &TaskFailure) -> String {
    serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn print(out: Out, record: &TaskRecord) -> Result<(), CliError> {
    let shown = Shown::from(record);
    if out.json() {
        out.document(&shown)
    } else {
        out.text(&render(&shown))
    }
}

fn unknown(id: TaskId, target: &Target) -> CliError {
    CliError::Failed(format!(
        "no record of task {id} in namespace `{}` (never run here, or expired)",
        target.namespace
    ))
}

async fn show(target: &Target, out: Out, id: &str) -> Result<(), CliError> {
    let id = task_id(id)?;
    let backend = target.backend().await?;
    let record = backend.get(id).await?.ok_or_else(|| unknown(id, target))?;
    print(out, &record)
}

async fn wait(target: &Target, out: Out, id: &str, timeout: Duration) -> Result<(), CliError> {
    let id = task_id(id)?;
    let backend = target.backend().await?;
    let record = backend
        .wait(id, timeout)
        .await?
        .ok_or_else(|| unknown(id, target))?;
    print(out, &record)?;
    match &record.state {
        TaskState::Succeeded { .. } => Ok(()),
        TaskState::Failed { error } => Err(CliError::Failed(format!("task {id} failed: {error}"))),
        TaskState::Revoked => Err(CliError::Failed(format!("task {id} was revoked"))),
        other => Err(CliError::Failed(format!(
            "task {id} did not finish within {} (still {})",
            humantime::format_duration(timeout),
            other.name()
        ))),
    }
}
