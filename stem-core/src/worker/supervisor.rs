//! The supervisor: starts the worker's services (completer, maintenance,
//! fetcher, queue keeper) and stops them in order at shutdown: stop
//! fetching, hand back what has not started, let running tasks finish
//! within the grace, then stop them and hand them back, and drain the
//! completer last so nothing finished is lost.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::completer::{self, Completion};
use super::{Runtime, WorkerReport, control, fetcher, lease, maintenance};
use crate::events::EventKind;

/// Runs the worker until it is stopped; returns its counts.
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
    if let Some(warning) = rt.broker.check_capacity(rt.config.concurrency) {
        tracing::warn!(broker = %rt.broker.describe(), "{warning}");
    }
    let completer = tokio::spawn(completer::run(
        completer::CompleterParts {
            broker: Arc::clone(&rt.broker),
            backend: rt.backend.clone(),
            counters: Arc::clone(&rt.counters),
            lease: rt.config.lease,
        },
        rx,
    ));
    // Listening before the first claim, so a command sent once the worker
    // is seen (its heartbeat, a first task) is heard.
    let control = control::subscribe(&rt)
        .await
        .map(|commands| tokio::spawn(control::run(Arc::clone(&rt), commands)));
    rt.event(|p| worker_event(&rt, p, EventKind::WorkerOnline));
    let maintenance = tokio::spawn(maintenance::run(Arc::clone(&rt)));
    let fetcher = tokio::spawn(fetcher::run(Arc::clone(&rt)));
    let keeper = tokio::spawn(lease::keep_queued(Arc::clone(&rt)));

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
    let finished = tokio::select! {
        r = tokio::time::timeout(grace, rt.tracker.wait()) => r.is_ok(),
        () = rt.force.cancelled() => false,
    };
    if !finished {
        tracing::warn!(
            grace = ?grace,
            forced = rt.force.is_cancelled(),
            running = rt.tracker.len(),
            "shutdown grace over: stopping running tasks and requeueing them"
        );
        rt.dispatch.abort();
        rt.abort.cancel();
        rt.tracker.wait().await;
    }
    abandon_stuck_threads(&rt).await;
    if let Err(e) = maintenance.await {
        tracing::error!(error = %e, "maintenance ended abnormally");
    }
    if let Some(c) = control {
        c.abort();
    }
    // Every executor is done: close the completer's channel and let it drain.
    let counters = Arc::clone(&rt.counters);
    let events = rt.events.clone();
    drop(rt);
    if let Err(e) = completer.await {
        tracing::error!(error = %e, "completer ended abnormally");
    }
    if let Some(p) = &events {
        let mut e = p.task_free(EventKind::WorkerOffline);
        e.processed = Some(counters.processed());
        p.emit(e);
        p.flush().await;
    }
    let report = counters.report();
    tracing::info!(?report, "worker stopped");
    report
}

/// How long the supervisor waits, once every slot is done, for the
/// threads of blocking tasks told to stop (time limit, end of the grace).
const BLOCKING_STOP_WAIT: Duration = Duration::from_secs(1);

/// Blocking threads still running once the slots are done ignore their
/// cancellation: a thread cannot be killed, so after a short wait they
/// are named and abandoned (they are detached: the process exits without
/// them). Their deliveries were already settled or handed back.
async fn abandon_stuck_threads(rt: &Runtime) {
    let threads = &rt.ctx_shared.blocking;
    if threads.wait_idle(BLOCKING_STOP_WAIT).await {
        return;
    }
    for (id, name) in threads.running() {
        tracing::warn!(
            task.name = %name,
            task.id = %id,
            "blocking task still running after it was cancelled: its thread is abandoned (check ctx.is_cancelled() in its loops); the worker stops without it"
        );
    }
}

/// A worker event (online, heartbeat) with its activity.
pub(crate) fn worker_event(
    rt: &Runtime,
    p: &crate::events::Publisher,
    kind: EventKind,
) -> crate::events::Event {
    let mut e = p.task_free(kind);
    e.active = Some(rt.dispatch.in_flight());
    e.processed = Some(rt.counters.processed());
    e
}
