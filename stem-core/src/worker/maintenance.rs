//! Background chores: heartbeats to the result backend, and the adapters'
//! own housekeeping (expired dead letters, results, unique keys), run only
//! by the worker that holds the namespace's housekeeping lease
//! (`Broker::try_lead`), so fifty workers sweep once, not fifty times.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::Runtime;
use super::config::host_name;
use crate::backend::WorkerHeartbeat;

/// How often adapters' `maintain` runs.
const MAINTAIN_EVERY: Duration = Duration::from_secs(5);

pub(crate) async fn run(rt: Arc<Runtime>) {
    let host = host_name();
    let mut beat = tokio::time::interval(rt.config.heartbeat_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut maintain = tokio::time::interval(MAINTAIN_EVERY);
    maintain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = rt.stop.cancelled() => break,
            _ = beat.tick() => heartbeat(&rt, &host).await,
            _ = maintain.tick() => {
                match rt.broker.try_lead(&rt.config.worker_id, MAINTAIN_EVERY * 3).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not take the housekeeping lease; skipping this round");
                        continue;
                    }
                }
                if let Err(e) = rt.broker.maintain().await {
                    tracing::warn!(error = %e, "broker maintenance failed");
                }
                if let Some(b) = &rt.backend
                    && let Err(e) = b.maintain().await
                {
                        tracing::warn!(error = %e, "result backend maintenance failed");
                }
            }
        }
    }
}

async fn heartbeat(rt: &Runtime, host: &str) {
    rt.event(|p| super::supervisor::worker_event(rt, p, crate::events::EventKind::WorkerHeartbeat));
    let Some(backend) = &rt.backend else {
        return;
    };
    let hb = WorkerHeartbeat {
        worker_id: rt.config.worker_id.clone(),
        host: host.to_owned(),
        pid: std::process::id(),
        queues: rt.config.queues.clone(),
        concurrency: rt.config.concurrency,
        active: rt.dispatch.in_flight(),
        at: Utc::now(),
        interval: rt.config.heartbeat_interval,
        tasks: rt.advertised.clone(),
        events: rt.events.is_some(),
    };
    if let Err(e) = backend.heartbeat(hb).await {
        tracing::warn!(error = %e, "could not record heartbeat");
    }
}
