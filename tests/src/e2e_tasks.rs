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

/// For the fault suite's handler failures: records `start`, then panics.
#[stem::task(
    queue = "faults",
    retries = 2,
    backoff = "fixed",
    backoff_base = "100ms"
)]
pub async fn handler_panic(ctx: stem::Context, key: String) {
    crate::ledger::append_run("start", &key, ctx.attempt(), ctx.deliveries());
    panic!("handler_panic {key} panics on purpose");
}

/// For the fault suite's handler failures: records `start`, then returns
/// an error.
#[stem::task(
    queue = "faults",
    retries = 2,
    backoff = "fixed",
    backoff_base = "100ms"
)]
pub async fn handler_error(ctx: stem::Context, key: String) -> Result<(), String> {
    crate::ledger::append_run("start", &key, ctx.attempt(), ctx.deliveries());
    Err(format!("handler_error {key} fails on purpose"))
}

/// For the fault suite's handler failures: records `start`, sleeps 5 s
/// past its 300 ms time limit, records `done` (which must never show).
#[stem::task(
    queue = "faults",
    retries = 2,
    backoff = "fixed",
    backoff_base = "100ms",
    timeout = "300ms"
)]
pub async fn handler_overrun(ctx: stem::Context, key: String) {
    crate::ledger::append_run("start", &key, ctx.attempt(), ctx.deliveries());
    tokio::time::sleep(Duration::from_secs(5)).await;
    crate::ledger::append_run("done", &key, ctx.attempt(), ctx.deliveries());
}

/// For the fault suite's handler failures: records `start`, then awaits
/// forever (a future that never wakes) under a 300 ms time limit.
#[stem::task(
    queue = "faults",
    retries = 2,
    backoff = "fixed",
    backoff_base = "100ms",
    timeout = "300ms"
)]
pub async fn handler_hang(ctx: stem::Context, key: String) {
    crate::ledger::append_run("start", &key, ctx.attempt(), ctx.deliveries());
    std::future::pending::<()>().await;
}

/// For the fault suite's handler failures: a `blocking = true` task that
/// records `start`, then spins (sleeping 5 ms a turn) until its context is
/// cancelled by its 300 ms time limit, records `cancelled`, and returns.
/// It gives up after 20 s and records `gaveup` (the cancel never came).
#[stem::task(
    queue = "faults",
    retries = 2,
    backoff = "fixed",
    backoff_base = "100ms",
    timeout = "300ms",
    blocking = true
)]
pub async fn handler_spin(ctx: stem::Context, key: String) {
    crate::ledger::append_run("start", &key, ctx.attempt(), ctx.deliveries());
    let begun = std::time::Instant::now();
    while !ctx.is_cancelled() {
        if begun.elapsed() > Duration::from_secs(20) {
            crate::ledger::append_run("gaveup", &key, ctx.attempt(), ctx.deliveries());
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    crate::ledger::append_run("cancelled", &key, ctx.attempt(), ctx.deliveries());
}

/// For the fault suite's stalled workers and crashes: records `start`,
/// sleeps, records `done`, and returns who ran it, `"<key> <pid>
/// <deliveries>"`, so a test can tell which run's result was recorded.
#[stem::task(queue = "faults", retries = 2)]
pub async fn ledger_whoami(ctx: stem::Context, key: String, millis: u64) -> String {
    crate::ledger::append_run("start", &key, ctx.attempt(), ctx.deliveries());
    tokio::time::sleep(Duration::from_millis(millis)).await;
    crate::ledger::append_run("done", &key, ctx.attempt(), ctx.deliveries());
    format!("{key} {} {}", std::process::id(), ctx.deliveries())
}
