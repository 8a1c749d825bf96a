//! A producer process for the connection-loss tests: publishes `N`
//! `ledger_slow` tasks (keys `0..N`, each sleeping `MILLIS`) one at a time
//! on `STEM_BROKER_URL`, and appends each publish's answer to its own
//! ledger (`STEM_E2E_LEDGER`): `ok KEY` or `err KEY`. An Err is not
//! retried: the test checks what the answers promised.
//! Usage: `e2e-publisher N MILLIS`. Exits 0 once every publish answered,
//! 1 when one hangs for 30 s.

use std::time::Duration;

use stem_tests::e2e_tasks::ledger_slow;
use stem_tests::ledger;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: e2e-publisher N MILLIS";
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().ok_or(usage)?.parse()?;
    let millis: u64 = args.next().ok_or(usage)?.parse()?;
    let url = std::env::var("STEM_BROKER_URL")?;
    let stem = stem::connect_with(&url, None, "stem").await?;
    for k in 0..n {
        let key = k.to_string();
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            ledger_slow::enqueue_on(&stem, key.clone(), millis),
        )
        .await
        .map_err(|_| format!("publish {key} hung for 30 s"))?;
        ledger::append(if answer.is_ok() { "ok" } else { "err" }, &key);
    }
    Ok(())
}
