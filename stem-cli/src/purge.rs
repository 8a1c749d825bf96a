//! `stem purge QUEUE [--yes]`: removes a queue's ready and delayed tasks,
//! after asking on a terminal; refuses without `--yes` when stdin is not
//! one (a script must say so). Also the confirmation of `stem dlq purge`.

use std::io::{BufRead, IsTerminal, Write};

use serde::Serialize;

use crate::args::PurgeArgs;
use crate::connect::{Target, queues};
use crate::error::CliError;
use crate::output::{Out, spinner};

/// `--json` of `stem purge` and `stem dlq purge`.
#[derive(Debug, Serialize)]
pub(crate) struct Purged {
    pub(crate) queue: String,
    pub(crate) purged: u64,
}

pub(crate) async fn run(target: &Target, out: Out, args: &PurgeArgs) -> Result<(), CliError> {
    let broker = target.broker().await?;
    let admin = queues(&*broker)?;
    let stats = admin.stats(&args.queue).await?;
    let what = format!(
        "{} ready and {} delayed tasks of queue `{}` (namespace `{}`)",
        stats.ready, stats.delayed, args.queue, target.namespace
    );
    if !confirm(args.yes, &format!("Purge {what}?"))? {
        return Err(CliError::Failed(String::from(
            "purge cancelled: nothing removed",
        )));
    }
    let bar = spinner(&format!("purging `{}`", args.queue));
    let purged = admin.purge(&args.queue).await;
    bar.finish_and_clear();
    let purged = purged?;
    if out.json() {
        out.document(&Purged {
            queue: args.queue.clone(),
            purged,
        })
    } else {
        out.text(&format!(
            "purged {purged} task{} from queue `{}`\n",
            plural(purged),
            args.queue
        ))
    }
}

/// `""` for one, `"s"` otherwise.
pub(crate) const fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Whether to go ahead with a destructive command: yes with `--yes`; on a
/// terminal, the answer to `question`; off a terminal without `--yes`, a
/// usage error (exit 2).
pub(crate) fn confirm(yes: bool, question: &str) -> Result<bool, CliError> {
    if yes {
        return Ok(true);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CliError::Usage(String::from(
            "refusing to delete without --yes: stdin is not a terminal to ask on",
        )));
    }
    let io = |source| CliError::Io {
        what: "asking for confirmation",
        source,
    };
    let mut err = std::io::stderr().lock();
    write!(err, "{question} [y/N] ").map_err(io)?;
    err.flush().map_err(io)?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer).map_err(io)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
