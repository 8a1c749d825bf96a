//! A worker process for the multi-process tests: runs the ledger tasks on
//! the broker named by `STEM_BROKER_URL`.

#[tokio::main]
async fn main() -> Result<(), stem::worker::WorkerError> {
    tracing::debug!(task = stem_tests::e2e_tasks::ledger_noop::NAME, "linked");
    stem::worker::run().await.map(|_| ())
}
