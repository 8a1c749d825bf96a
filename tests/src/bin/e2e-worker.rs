//! A worker process for the multi-process tests: runs the ledger tasks on
//! the broker named by `STEM_BROKER_URL`, and prints its final counts on
//! stdout as one line (`report succeeded=N failed=N ...`) when it stops.
//! With `RUST_LOG` set, it logs to stderr (tests read the lines).
//! `FAILPOINTS` sets the worker's failpoints (stem's `failpoints` feature,
//! e.g. `FAILPOINTS=stem-after-handler=return`: the process ends at once,
//! exit status 137, when a handler returns).

use std::io::Write;

#[tokio::main]
async fn main() -> Result<(), stem::worker::WorkerError> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    // Held for the whole run: the failpoints named in `FAILPOINTS`.
    let failpoints = fail::FailScenario::setup();
    tracing::debug!(task = stem_tests::e2e_tasks::ledger_noop::NAME, "linked");
    let r = stem::worker::run().await?;
    let line = format!(
        "report succeeded={} failed={} retried={} dead_lettered={} requeued={}\n",
        r.succeeded, r.failed, r.retried, r.dead_lettered, r.requeued
    );
    // A test reads it; a closed stdout is not the worker's failure.
    let _ = std::io::stdout().write_all(line.as_bytes());
    failpoints.teardown();
    Ok(())
}
