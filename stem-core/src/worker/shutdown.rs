//! Start-up and graceful shutdown: stop fetching, give running tasks the
//! grace period, then drop what is left and requeue it without charging an
//! attempt, and drain the completer so nothing is lost.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::completer::{self, Completion};
use super::{Runtime, WorkerReport, fetcher, maintenance};

pub(crate) async fn supervise(
    rt: Arc<Runtime>,
    rx: mpsc::UnboundedReceiver<Completion>,
) -> WorkerReport {
    tracing::info!(
        worker_id = %rt.config.worker_id,
        broker = %rt.broker.describe(),
        queues = ?rt.config.queues,
        concurrency = rt.config.concurrency,
        tasks = %rt.known_names,
        "worker started"
    );
    let completer = tokio::spawn(completer::run(
        completer::CompleterParts {
            broker: Arc::clone(&rt.broker),
            backend: rt.backend.clone(),
            counters: Arc::clone(&rt.counters),
        },
        rx,
    ));
    let maintenance = tokio::spawn(maintenance::run(Arc::clone(&rt)));
    let fetcher = tokio::spawn(fetcher::run(Arc::clone(&rt)));
    let keeper = tokio::spawn(fetcher::keep_queued(Arc::clone(&rt)));

    rt.stop.cancelled().await;
    if let Err(e) = fetcher.await {
        tracing::error!(error = %e, "fetcher ended abnormally");
    }
    if let Err(e) = keeper.await {
        tracing::error!(error = %e, "queue keeper ended abnormally");
    }
    // Neither claims nor renews any more: hand back what waits for a slot
    // and let the slots end once they finish what they run.
    fetcher::hand_back_queued(&rt);
    rt.tracker.close();
    let grace = rt.config.shutdown_grace;
    if tokio::time::timeout(grace, rt.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?grace,
            running = rt.tracker.len(),
            "shutdown grace over: stopping running tasks and requeueing them"
        );
        rt.dispatch.abort();
        rt.abort.cancel();
        rt.tracker.wait().await;
    }
    if let Err(e) = maintenance.await {
        tracing::error!(error = %e, "maintenance ended abnormally");
    }
    // Every executor is done: close the completer's channel and let it drain.
    let counters = Arc::clone(&rt.counters);
    drop(rt);
    if let Err(e) = completer.await {
        tracing::error!(error = %e, "completer ended abnormally");
    }
    let report = counters.report();
    tracing::info!(?report, "worker stopped");
    report
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the worker");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
