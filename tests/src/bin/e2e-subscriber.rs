//! A broadcast subscriber process for the multi-process tests: subscribes
//! to the channel in `argv[1]` on `STEM_BROKER_URL`, prints `ready`, then
//! prints each message's payload on its own line and exits after `argv[2]`
//! messages.

// Its output is read by the test.
#![allow(clippy::print_stdout)]

use std::io::Write;

use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let channel = args.next().ok_or("usage: e2e-subscriber CHANNEL COUNT")?;
    let count: usize = args
        .next()
        .ok_or("usage: e2e-subscriber CHANNEL COUNT")?
        .parse()?;
    let url = std::env::var("STEM_BROKER_URL")?;
    let stem = stem::connect_with(&url, None, "stem").await?;
    let mut stream = stem
        .broker()
        .broadcast()
        .expect("broadcast")
        .subscribe(&channel)
        .await?;
    println!("ready");
    std::io::stdout().flush()?;
    for _ in 0..count {
        let msg = stream.next().await.ok_or("subscription ended")?;
        println!("{}", msg.payload);
        std::io::stdout().flush()?;
    }
    Ok(())
}
