//! `stem dlq list|show|replay|purge`: dead-letter administration
//! ([`DeadLetters`](stem::DeadLetters)).

use chrono::{DateTime, Utc};
use serde::Serialize;
use stem::{DeadLetter, Replay, TaskId};

use crate::args::{DlqCommand, PurgeArgs, ReplayArgs};
use crate::connect::{Target, dead_letters, task_id};
use crate::error::CliError;
use crate::output::{Align, Out, Table, fields, progress, spinner, when};
use crate::purge::{Purged, confirm, plural};

pub(crate) async fn run(target: &Target, out: Out, cmd: &DlqCommand) -> Result<(), CliError> {
    match cmd {
        DlqCommand::List {
            queue,
            page,
            page_size,
        } => list(target, out, queue, *page, *page_size).await,
        DlqCommand::Show { id } => show(target, out, id).await,
        DlqCommand::Replay(args) => replay(target, out, args).await,
        DlqCommand::Purge(args) => purge(target, out, args).await,
    }
}

/// One dead letter in a listing (`--json` of `dlq list`).
#[derive(Debug, Serialize)]
struct Row {
    id: TaskId,
    queue: String,
    /// The task's name, when the stored bytes are an envelope.
    task: Option<String>,
    reason: String,
    error: Option<String>,
    dead_at: DateTime<Utc>,
    /// Charged attempts, when the stored bytes are an envelope.
    attempt: Option<u32>,
    /// Whether `replay` can put it back (false for undecodable bytes).
    replayable: bool,
}

impl From<&DeadLetter> for Row {
    fn from(d: &DeadLetter) -> Self {
        Self {
            id: d.id,
            queue: d.queue.clone(),
            task: d.envelope.as_ref().map(|e| e.name.clone()),
            reason: d.reason.clone(),
            error: d.error.clone(),
            dead_at: d.dead_at,
            attempt: d.envelope.as_ref().map(|e| e.attempt),
            replayable: d.envelope.is_some(),
        }
    }
}

async fn list(
    target: &Target,
    out: Out,
    queue: &str,
    page: u64,
    page_size: u64,
) -> Result<(), CliError> {
    let broker = target.broker().await?;
    let dl = dead_letters(&*broker)?;
    let size = usize::try_from(page_size).unwrap_or(usize::MAX);
    // Cursors are opaque: page N is reached by walking pages 1..N.
    let mut current = dl.list(queue, None, size).await?;
    for _ in 1..page {
        match current.next.take() {
            Some(next) => current = dl.list(queue, Some(&next), size).await?,
            None => {
                current.items.clear();
                break;
            }
        }
    }
    let rows: Vec<Row> = current.items.iter().map(Row::from).collect();
    if out.json() {
        return out.document(&rows);
    }
    if rows.is_empty() {
        let total = dl.count(queue).await?;
        return out.text(&format!(
            "no dead letters on page {page} of queue `{queue}` ({total} in all)\n"
        ));
    }
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("TASK", Align::Left),
        ("ATTEMPT", Align::Right),
        ("DEAD AT", Align::Left),
        ("REASON", Align::Left),
    ]);
    for r in &rows {
        t.row(vec![
            r.id.to_string(),
            r.task
                .clone()
                .unwrap_or_else(|| String::from("(undecodable)")),
            r.attempt
                .map_or_else(|| String::from("-"), |a| a.to_string()),
            r.dead_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            one_line(&r.reason, 60),
        ]);
    }
    let mut text = t.render();
    if current.next.is_some() {
        text.push_str(&format!(
            "more: stem dlq list {queue} --page {} --page-size {page_size}\n",
            page + 1
        ));
    }
    out.text(&text)
}

/// The first line of `s`, at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let first = s.lines().next().unwrap_or_default();
    if first.chars().count() > max || first.len() < s.len() {
        let cut: String = first.chars().take(max.saturating_sub(3)).collect();
        format!("{cut}...")
    } else {
        first.to_owned()
    }
}

async fn show(target: &Target, out: Out, id: &str) -> Result<(), CliError> {
    let id = task_id(id)?;
    let broker = target.broker().await?;
    let dl = dead_letters(&*broker)?;
    let Some(d) = dl.get(id).await? else {
        return Err(CliError::Failed(format!(
            "no dead letter {id} in namespace `{}`",
            target.namespace
        )));
    };
    if out.json() {
        return out.document(&d);
    }
    let mut pairs = vec![
        ("id", d.id.to_string()),
        ("queue", d.queue.clone()),
        ("reason", d.reason.clone()),
        (
            "error",
            d.error.clone().unwrap_or_else(|| String::from("-")),
        ),
        ("dead at", when(d.dead_at)),
    ];
    match &d.envelope {
        Some(env) => {
            pairs.push(("task", env.name.clone()));
            pairs.push((
                "attempt",
                format!("{} (retries allowed: {})", env.attempt, env.max_retries),
            ));
            pairs.push(("priority", env.priority.to_string()));
            pairs.push(("enqueued at", when(env.enqueued_at)));
            pairs.push(("args", env.args.get().to_owned()));
            if let Some(e) = &env.last_error {
                pairs.push(("last error", e.clone()));
            }
        }
        None => {
            pairs.push((
                "envelope",
                String::from("(undecodable: cannot be replayed)"),
            ));
            pairs.push(("raw", d.raw.clone().unwrap_or_default()));
        }
    }
    out.text(&fields(&pairs))
}

/// `--json` of `dlq replay`.
#[derive(Debug, Serialize)]
struct Replayed {
    queue: String,
    replayed: u64,
    not_found: Vec<TaskId>,
}

async fn replay(target: &Target, out: Out, args: &ReplayArgs) -> Result<(), CliError> {
    // Every id is checked before anything moves.
    let ids = args
        .ids
        .iter()
        .map(|s| task_id(s))
        .collect::<Result<Vec<_>, _>>()?;
    // Through the client: each task's old record is forgotten first, so
    // its new run is recorded (R8).
    let stem = target.client().await?;
    dead_letters(&**stem.broker())?;
    let mut replayed = 0;
    let mut not_found = Vec::new();
    if args.all {
        let bar = spinner(&format!("replaying every dead letter of `{}`", args.queue));
        let n = stem
            .replay_dead_letters(&args.queue, Replay::All, args.reset_attempts)
            .await;
        bar.finish_and_clear();
        replayed = n?;
    } else {
        let bar = progress(ids.len() as u64, "replaying");
        for id in &ids {
            let n = stem
                .replay_dead_letters(&args.queue, Replay::One(*id), args.reset_attempts)
                .await;
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    bar.finish_and_clear();
                    return Err(e.into());
                }
            };
            if n == 0 {
                not_found.push(*id);
            }
            replayed += n;
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let doc = Replayed {
        queue: args.queue.clone(),
        replayed,
        not_found,
    };
    if out.json() {
        out.document(&doc)?;
    } else {
        out.text(&format!(
            "replayed {replayed} dead letter{} to queue `{}`{}\n",
            plural(replayed),
            args.queue,
            if args.reset_attempts {
                ", attempts reset"
            } else {
                ""
            }
        ))?;
    }
    if doc.not_found.is_empty() {
        Ok(())
    } else {
        let list: Vec<String> = doc.not_found.iter().map(ToString::to_string).collect();
        Err(CliError::Failed(format!(
            "{} of {} ids are not dead letters of queue `{}`: {}",
            list.len(),
            ids.len(),
            args.queue,
            list.join(", ")
        )))
    }
}

async fn purge(target: &Target, out: Out, args: &PurgeArgs) -> Result<(), CliError> {
    let broker = target.broker().await?;
    let dl = dead_letters(&*broker)?;
    let count = dl.count(&args.queue).await?;
    let question = format!(
        "Delete {count} dead letter{} of queue `{}` (namespace `{}`)?",
        plural(count),
        args.queue,
        target.namespace
    );
    if !confirm(args.yes, &question)? {
        return Err(CliError::Failed(String::from(
            "purge cancelled: nothing deleted",
        )));
    }
    let bar = spinner(&format!("deleting the dead letters of `{}`", args.queue));
    let purged = dl.purge(&args.queue).await;
    bar.finish_and_clear();
    let purged = purged?;
    if out.json() {
        out.document(&Purged {
            queue: args.queue.clone(),
            purged,
        })
    } else {
        out.text(&format!(
            "deleted {purged} dead letter{} of queue `{}`\n",
            plural(purged),
            args.queue
        ))
    }
}
