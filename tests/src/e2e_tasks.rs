//! Tasks run by the end-to-end worker processes; each writes to the ledger.

use std::time::Duration;

/// Records that it ran, returns `n * 2`.
#[stem::task(queue = "e2e")]
pub async fn ledger_noop(n: u64) -> u64 {
    crate::ledger::append("done", &n.to_string());
    n * 2
}

/// Records its start, sleeps, records its end.
#[stem::task(queue = "e2e_slow", retries = 5)]
pub async fn ledger_slow(key: String, millis: u64) -> String {
    crate::ledger::append("start", &key);
    tokio::time::sleep(Duration::from_millis(millis)).await;
    crate::ledger::append("done", &key);
    key
}
