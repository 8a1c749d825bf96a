//! A worker binary: runs every task linked into it until Ctrl-C/SIGTERM.
//!
//! Run it with `cargo run -p example-worker` (flags: `-- --help`). With no
//! `STEM_BROKER_URL` it uses the embedded SQLite default, the same file the
//! example producer uses, so the two cooperate with no configuration.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // The tasks live in another crate: name one so the linker keeps it.
    tracing::info!(task = example_tasks::add::NAME, "linking example tasks");
    // The id to `kill -9` in the walkthrough (not `cargo run`'s own).
    tracing::info!(pid = std::process::id(), "worker process");
    let report = stem::worker::run().await?;
    tracing::info!(?report, "worker exited");
    Ok(())
}
