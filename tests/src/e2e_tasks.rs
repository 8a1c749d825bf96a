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

/// Records its start, sleeps, then fails (no retries) in a worker process
/// started with `STEM_E2E_FAIL` set, and succeeds elsewhere: the stale and
/// the live run of one task end differently, so a test can tell whose
/// result was recorded.
#[stem::task(queue = "e2e_slow", retries = 0)]
pub async fn ledger_outcome(key: String, millis: u64) -> Result<String, String> {
    crate::ledger::append("start", &key);
    tokio::time::sleep(Duration::from_millis(millis)).await;
    if std::env::var_os("STEM_E2E_FAIL").is_some() {
        crate::ledger::append("failed", &key);
        return Err(String::from("failing on purpose (STEM_E2E_FAIL is set)"));
    }
    crate::ledger::append("done", &key);
    Ok(key)
}

/// Records its start, then spins on its blocking thread forever and never
/// looks at its context's cancellation: a stuck `blocking = true` task,
/// which the worker can only abandon.
#[stem::task(queue = "e2e_spin", blocking = true)]
pub async fn ledger_spin(key: String) {
    crate::ledger::append("start", &key);
    loop {
        std::hint::spin_loop();
    }
}

/// For the fault-injection suite: records `start` (with this delivery's
/// attempt and delivery count, and the time), sleeps, records `done`, and
/// returns its key. The lines carry more than [`crate::ledger::append`]'s
/// (see [`crate::ledger::append_run`]).
#[stem::task(queue = "faults", retries = 5)]
pub async fn ledger_fault(ctx: stem::Context, key: String, millis: u64) -> String {
    crate::ledger::append_run("start", &key, ctx.attempt(), ctx.deliveries());
    tokio::time::sleep(Duration::from_millis(millis)).await;
    crate::ledger::append_run("done", &key, ctx.attempt(), ctx.deliveries());
    key
}
