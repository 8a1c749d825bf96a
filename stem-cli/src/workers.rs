//! `stem workers`: every worker that has sent a heartbeat and not yet
//! expired from the backend, alive or dead (silent for 3 intervals).

use chrono::{DateTime, Utc};
use serde::Serialize;
use stem::WorkerStatus;

use crate::connect::Target;
use crate::error::CliError;
use crate::output::{Align, Out, Table, ago};

/// One worker as `--json` prints it.
#[derive(Debug, Serialize)]
struct Row {
    worker_id: String,
    host: String,
    pid: u32,
    queues: Vec<String>,
    concurrency: usize,
    active: usize,
    last_seen: DateTime<Utc>,
    interval_ms: u64,
    alive: bool,
}

impl From<&WorkerStatus> for Row {
    fn from(w: &WorkerStatus) -> Self {
        let h = &w.heartbeat;
        Self {
            worker_id: h.worker_id.clone(),
            host: h.host.clone(),
            pid: h.pid,
            queues: h.queues.clone(),
            concurrency: h.concurrency,
            active: h.active,
            last_seen: h.at,
            interval_ms: u64::try_from(h.interval.as_millis()).unwrap_or(u64::MAX),
            alive: w.alive,
        }
    }
}

pub(crate) async fn run(target: &Target, out: Out) -> Result<(), CliError> {
    let backend = target.backend().await?;
    let mut rows: Vec<Row> = backend.workers().await?.iter().map(Row::from).collect();
    // Alive first, then by id: a stable order for people and scripts.
    rows.sort_by(|a, b| {
        b.alive
            .cmp(&a.alive)
            .then_with(|| a.worker_id.cmp(&b.worker_id))
    });
    if out.json() {
        return out.document(&rows);
    }
    if rows.is_empty() {
        return out.text(&format!(
            "no worker heartbeats in namespace `{}`\n",
            target.namespace
        ));
    }
    let now = Utc::now();
    let mut t = Table::new(&[
        ("WORKER", Align::Left),
        ("STATUS", Align::Left),
        ("HOST", Align::Left),
        ("PID", Align::Right),
        ("ACTIVE", Align::Right),
        ("LAST SEEN", Align::Left),
        ("QUEUES", Align::Left),
    ]);
    for r in &rows {
        t.row(vec![
            r.worker_id.clone(),
            String::from(if r.alive { "alive" } else { "dead" }),
            r.host.clone(),
            r.pid.to_string(),
            format!("{}/{}", r.active, r.concurrency),
            ago(now, r.last_seen),
            r.queues.join(","),
        ]);
    }
    out.text(&t.render())
}
