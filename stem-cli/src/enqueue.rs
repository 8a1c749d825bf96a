//! `stem enqueue NAME --args JSON`: publish a task by name, as
//! `Stem::enqueue_by_name` does (the CLI links no task: the queue and
//! options come from the live workers' heartbeats, or `--queue`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use stem::{EnqueueOptions, Published, StemError, TaskId, TaskState};

use crate::connect::Target;
use crate::error::CliError;
use crate::output::{Out, fields, result_value};

/// `stem enqueue`.
#[derive(Debug, Args)]
pub(crate) struct EnqueueArgs {
    /// The task's registered name, e.g. `my_app::tasks::send_email`.
    pub(crate) name: String,
    /// The arguments: a JSON object, one field per task parameter.
    #[arg(long, default_value = "{}")]
    pub(crate) args: String,
    /// The queue (default: the task's, as live workers advertise it).
    #[arg(long)]
    pub(crate) queue: Option<String>,
    /// Priority, 0 (lowest) to 9.
    #[arg(long)]
    pub(crate) priority: Option<u8>,
    /// Retries after the first attempt.
    #[arg(long)]
    pub(crate) retries: Option<u32>,
    /// Run no earlier than this long from now (`30s`, `5m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) delay: Option<Duration>,
    /// Run no earlier than this time (RFC 3339, e.g. `2026-12-24T18:00:00Z`).
    #[arg(long)]
    pub(crate) eta: Option<DateTime<Utc>>,
    /// Refuse a duplicate of the same name and arguments for this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) unique_for: Option<Duration>,
    /// Wait for the task to finish and print its result.
    #[arg(long)]
    pub(crate) wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, requires = "wait")]
    pub(crate) timeout: Duration,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Enqueued {
    id: TaskId,
    /// A live task already held the unique key: `id` is that task's.
    duplicate: bool,
    /// With `--wait`: the task's final state name.
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
    /// With `--wait`: the result of a succeeded task.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    /// With `--wait`: the error of a failed task.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub(crate) async fn run(target: &Target, out: Out, args: &EnqueueArgs) -> Result<(), CliError> {
    let stem = target.client().await?;
    let options = EnqueueOptions {
        queue: args.queue.clone(),
        priority: args.priority,
        retries: args.retries,
        delay: args.delay,
        eta: args.eta,
        unique_for: args.unique_for,
        ..EnqueueOptions::default()
    };
    let published = stem
        .enqueue_by_name(&args.name, &args.args, &options)
        .await
        .map_err(|e| match e {
            // The caller's input: bad usage.
            e @ (StemError::BadArgs { .. } | StemError::Envelope(_)) => {
                CliError::Usage(e.to_string())
            }
            e => e.into(),
        })?;
    stem.flush_events().await;
    let mut shown = Enqueued {
        id: published.id(),
        duplicate: matches!(published, Published::Duplicate(_)),
        state: None,
        result: None,
        error: None,
    };
    let mut failed = None;
    if args.wait {
        let record = stem
            .wait_record(shown.id, args.timeout)
            .await?
            .ok_or_else(|| {
                CliError::Failed(format!(
                    "task {} did not finish within {}",
                    shown.id,
                    humantime::format_duration(args.timeout)
                ))
            })?;
        shown.state = Some(record.state.name());
        match record.state {
            TaskState::Succeeded { result } => {
                shown.result = Some(result_value(&result));
            }
            TaskState::Failed { error } => {
                shown.error = Some(error.to_string());
                failed = Some(format!("task {} failed: {error}", shown.id));
            }
            other => failed = Some(format!("task {} ended {}", shown.id, other.name())),
        }
    }
    if out.json() {
        out.document(&shown)?;
    } else if let Some(result) = &shown.result {
        // The result alone, as JSON, so a shell can use it.
        out.text(&format!("{result}\n"))?;
    } else if !args.wait {
        let mut pairs = vec![("id", shown.id.to_string())];
        if shown.duplicate {
            pairs.push((
                "duplicate",
                String::from("yes: a live task holds this unique key"),
            ));
        }
        out.text(&fields(&pairs))?;
    }
    match failed {
        Some(why) => Err(CliError::Failed(why)),
        None => Ok(()),
    }
}
