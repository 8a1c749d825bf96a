//! `stem queues [--watch]`: every queue that holds something, with its
//! counts ([`QueueAdmin::list`](stem::QueueAdmin::list)).

use std::io::IsTerminal;
use std::time::Duration;

use stem::QueueSummary;

use crate::args::QueuesArgs;
use crate::connect::{Target, queues};
use crate::error::CliError;
use crate::output::{Align, Out, Table};

/// How often `--watch` redraws.
const WATCH_EVERY: Duration = Duration::from_secs(1);

pub(crate) async fn run(target: &Target, out: Out, args: &QueuesArgs) -> Result<(), CliError> {
    let broker = target.broker().await?;
    let admin = queues(&*broker)?;
    if !args.watch {
        let list = admin.list().await?;
        return if out.json() {
            out.document(&list)
        } else {
            out.text(&render(&list, &broker.describe()))
        };
    }
    let clear = std::io::stdout().is_terminal() && !out.json();
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tick.tick() => {}
        }
        let list = admin.list().await?;
        if out.json() {
            out.json_line(&list)?;
        } else {
            let mut screen = String::new();
            if clear {
                // Home the cursor and clear the screen, then redraw.
                screen.push_str("\x1b[H\x1b[2J");
            }
            screen.push_str(&format!(
                "{}  every {}s, Ctrl-C to stop\n\n",
                chrono::Utc::now().format("%H:%M:%S"),
                WATCH_EVERY.as_secs()
            ));
            screen.push_str(&render(&list, &broker.describe()));
            if !clear {
                screen.push('\n');
            }
            out.text(&screen)?;
        }
    }
}

fn render(list: &[QueueSummary], broker: &str) -> String {
    if list.is_empty() {
        return format!("no queue holds anything on {broker}\n");
    }
    let mut t = Table::new(&[
        ("QUEUE", Align::Left),
        ("READY", Align::Right),
        ("DELAYED", Align::Right),
        ("LEASED", Align::Right),
        ("DEAD", Align::Right),
    ]);
    for q in list {
        t.row(vec![
            q.queue.clone(),
            q.stats.ready.to_string(),
            q.stats.delayed.to_string(),
            q.stats.leased.to_string(),
            q.stats.dead.to_string(),
        ]);
    }
    t.render()
}
