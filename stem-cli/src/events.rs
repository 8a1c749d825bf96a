//! `stem events`: a live tail of the namespace's task and worker events,
//! one line per event (one JSON object per line with `--json`).

use std::io::Write as _;
use std::time::Duration;

use clap::Args;
use futures::StreamExt as _;
use stem::events::Event;

use crate::connect::Target;
use crate::error::CliError;
use crate::output::Out;

/// `stem events`.
#[derive(Debug, Args)]
pub(crate) struct EventsArgs {
    /// Keep listening until Ctrl-C (default: stop after `--for`).
    #[arg(long, short = 'f')]
    pub(crate) follow: bool,
    /// How long to listen without `--follow`.
    #[arg(long = "for", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) listen_for: Duration,
    /// Only events of this task name (repeatable).
    #[arg(long = "task")]
    pub(crate) tasks: Vec<String>,
    /// Only events of this queue (repeatable).
    #[arg(long = "queue")]
    pub(crate) queues: Vec<String>,
    /// Only events of this type, e.g. `failed` (repeatable).
    #[arg(long = "type")]
    pub(crate) kinds: Vec<String>,
}

impl EventsArgs {
    fn wants(&self, e: &Event) -> bool {
        let matches = |wanted: &[String], value: Option<&str>| {
            wanted.is_empty() || value.is_some_and(|v| wanted.iter().any(|w| w == v))
        };
        matches(&self.tasks, e.name.as_deref())
            && matches(&self.queues, e.queue.as_deref())
            && matches(&self.kinds, Some(e.kind.name()))
    }
}

pub(crate) async fn run(target: &Target, out: Out, args: &EventsArgs) -> Result<(), CliError> {
    let stem = target.client().await?;
    let mut events = stem.events().await?;
    // Say why the tail may stay empty: events are off unless turned on.
    if let Some(backend) = stem.backend()
        && let Ok(workers) = backend.workers().await
    {
        let alive: Vec<_> = workers.iter().filter(|w| w.alive).collect();
        if alive.is_empty() {
            note(
                "no live worker in this namespace (events appear once workers run with STEM_EVENTS=1 or --events)",
            );
        } else if !alive.iter().any(|w| w.heartbeat.events) {
            note(&format!(
                "none of the {} live worker(s) sends events: start them with STEM_EVENTS=1 (or `--events`, or `.events(true)`); producers send `sent` with STEM_EVENTS=1",
                alive.len()
            ));
        }
    }
    let deadline = (!args.follow).then(|| tokio::time::Instant::now() + args.listen_for);
    loop {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, events.next())
                    .await
                    .ok()
                    .flatten(),
                None => events.next().await,
            }
        };
        let event = tokio::select! {
            e = next => e,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(event) = event else {
            return Ok(());
        };
        if !args.wants(&event) {
            continue;
        }
        if out.json() {
            out.json_line(&event)?;
        } else {
            out.text(&line(&event))?;
        }
    }
}

fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "note: {text}");
}

/// `2026-12-06T19:40:01.123Z  started        app::send_email  <id>  queue=emails attempt=1  (w1)`.
fn line(e: &Event) -> String {
    let mut s = format!(
        "{}  {:<16}",
        e.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        e.kind.name()
    );
    if let Some(name) = &e.name {
        s.push_str(&format!("  {name}"));
    }
    if let Some(id) = e.task_id {
        s.push_str(&format!("  {id}"));
    }
    let mut extra = Vec::new();
    if let Some(q) = &e.queue {
        extra.push(format!("queue={q}"));
    }
    if let Some(a) = e.attempt {
        extra.push(format!("attempt={a}"));
    }
    if let Some(d) = e.duration_ms {
        extra.push(format!("duration={d}ms"));
    }
    if let Some(t) = e.next_at {
        extra.push(format!("next_at={}", t.format("%H:%M:%S%.3f")));
    }
    if let Some(a) = e.active {
        extra.push(format!("active={a}"));
    }
    if let Some(p) = e.processed {
        extra.push(format!("processed={p}"));
    }
    if let Some(err) = &e.error {
        extra.push(format!("error={err:?}"));
    }
    if let Some(r) = &e.reason {
        extra.push(format!("reason={r:?}"));
    }
    if !extra.is_empty() {
        s.push_str("  ");
        s.push_str(&extra.join(" "));
    }
    s.push_str(&format!("  ({})\n", e.source));
    s
}
