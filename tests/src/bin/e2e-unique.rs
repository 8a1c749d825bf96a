//! A producer process for the duplicate-enqueue race: connects to
//! `STEM_BROKER_URL` (namespace `STEM_NAMESPACE`, default `stem`), builds
//! `COUNT` `ledger_fault` calls for `KEY` with `unique_for(WINDOW_MS)` (the
//! same arguments, so the same unique key; each envelope its own id),
//! prints `ready`, then waits for the file `GO` to appear. The file holds a
//! Unix time in milliseconds: the process sleeps until then and publishes
//! the `COUNT` envelopes at once, concurrently, so every process started
//! for the race publishes at the same moment. It prints one line per
//! publish with what the broker answered and the Unix ms it was sent and
//! answered: `stored ID SENT_MS ANSWERED_MS` or `duplicate ID …`.
//! Usage: `e2e-unique GO KEY WINDOW_MS COUNT`. Exits 0 when every publish
//! answered, 1 on an error (printed as `error …`).

// Its output is read by the test.
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use stem::Published;
use stem_tests::e2e_tasks::ledger_fault;
use stem_tests::ledger::unix_ms;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: e2e-unique GO KEY WINDOW_MS COUNT";
    let mut args = std::env::args().skip(1);
    let go = PathBuf::from(args.next().ok_or(usage)?);
    let key = args.next().ok_or(usage)?;
    let window: u64 = args.next().ok_or(usage)?.parse()?;
    let count: usize = args.next().ok_or(usage)?.parse()?;
    let url = std::env::var("STEM_BROKER_URL")?;
    let ns = std::env::var("STEM_NAMESPACE").unwrap_or_else(|_| String::from("stem"));
    let stem = stem::connect_with(&url, None, &ns).await?;
    // Connected and the envelopes built before the start: the race is the
    // publishes alone.
    let builder = ledger_fault::with().unique_for(Duration::from_millis(window));
    let envelopes = (0..count)
        .map(|_| {
            builder.build(&ledger_fault::Args {
                key: key.clone(),
                millis: 5,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = std::io::stdout();
    out.write_all(b"ready\n")?;
    out.flush()?;
    let start_ms: u64 = loop {
        if let Ok(text) = std::fs::read_to_string(&go)
            && let Ok(ms) = text.trim().parse()
        {
            break ms;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let now = unix_ms();
    if start_ms > now {
        tokio::time::sleep(Duration::from_millis(start_ms - now)).await;
    }
    let answers = futures::future::join_all(envelopes.into_iter().map(|env| {
        let stem = &stem;
        async move {
            let sent = unix_ms();
            let answer = stem.publish(env).await;
            (sent, unix_ms(), answer)
        }
    }))
    .await;
    let mut text = String::new();
    let mut failed = false;
    for (sent, answered, answer) in answers {
        match answer {
            Ok(Published::Stored(id)) => {
                text.push_str(&format!("stored {id} {sent} {answered}\n"));
            }
            Ok(Published::Duplicate(id)) => {
                text.push_str(&format!("duplicate {id} {sent} {answered}\n"));
            }
            Err(e) => {
                failed = true;
                text.push_str(&format!("error {e}\n"));
            }
        }
    }
    out.write_all(text.as_bytes())?;
    out.flush()?;
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
