//! The executor: a fixed set of slots, each running one delivery at a
//! time. For each delivery it finds the task, decodes its arguments, keeps
//! its lease alive, enforces its time limit, turns panics into failures,
//! and decides between success, retry and dead letter.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use tracing::Instrument;

use super::Runtime;
use super::completer::{Completion, Count};
use super::dispatch::Queued;
use super::lease;
use crate::backend::{FailureKind, TaskFailure, TaskRecord, TaskState};
use crate::broker::{Disposition, Receipt};
use crate::context::Context;
use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::events::EventKind;
use crate::registry::{HandlerError, HandlerResult, TaskEntry};
use crate::retry::RetryDirective;
use crate::task::DeliveryMode;

/// The target of the lines a task's life logs (start, outcome), so
/// `RUST_LOG=info,stem::task=warn` keeps the worker's own lines and drops
/// the per-task ones.
const TASK: &str = "stem::task";

/// Logs an event of a task's life at `target: stem::task`, carrying the
/// task's name, id and attempt as fields of its own (not only through the
/// span, which some subscribers do not show). Never its arguments or
/// result. The macros check the level before evaluating any field.
macro_rules! task_event {
    ($level:ident, $envelope:expr, $attempt:expr, $($rest:tt)+) => {{
        let envelope: &Envelope = $envelope;
        let attempt: u32 = $attempt;
        tracing::event!(
            target: TASK,
            tracing::Level::$level,
            task.name = %envelope.name,
            task.id = %envelope.id,
            task.attempt = attempt,
            $($rest)+
        )
    }};
}

/// Milliseconds since `clock` (read only when the task lines are on).
fn elapsed_ms(clock: Option<Instant>) -> Option<u64> {
    clock.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// How one run ended.
enum Outcome {
    Finished(HandlerResult),
    Panicked(String),
    TimedOut(Duration),
    /// Shutdown grace over: requeue without charging an attempt.
    Aborted,
    /// Another consumer owns the delivery now.
    LeaseLost,
    /// Revoked while it ran (seen at a lease renewal).
    Revoked,
}

/// One executor slot: runs the deliveries the fetcher hands over, one at
/// a time. Ends when the fetcher is gone and nothing is left to run.
pub(crate) async fn slot(rt: Arc<Runtime>) {
    while let Some(Queued { ctx, renewed, .. }) = rt.dispatch.next().await {
        // From shutdown on, nothing new starts: it goes back to the queue.
        if rt.dispatch.is_aborted() || rt.stop.is_cancelled() {
            rt.release(ctx.owned_receipt(), Duration::ZERO);
        } else if rt.live.is_revoked(ctx.envelope().id) {
            revoked_before_start(&rt, &ctx);
        } else if let Some(renewed) = lease::still_leased(&rt, &ctx, renewed).await {
            execute(&rt, ctx, renewed).await;
        }
        rt.dispatch.finished();
    }
}

/// A delivery revoked over the control plane while it waited for a slot:
/// acked without running, recorded `Revoked`.
fn revoked_before_start(rt: &Runtime, ctx: &Context) {
    let envelope = ctx.envelope();
    task_event!(
        INFO,
        envelope,
        envelope.attempt + 1,
        "task revoked before it started; skipped"
    );
    rt.event(|p| p.task(EventKind::Revoked, envelope));
    let record = record(rt, envelope, envelope.attempt, Utc::now(), || {
        TaskState::Revoked
    });
    complete(
        rt,
        Some((ctx.owned_receipt(), Disposition::Ack)),
        record,
        envelope,
        Count::Revoked,
    );
}

async fn execute(rt: &Runtime, ctx: Context, renewed: Instant) {
    let envelope = ctx.envelope();
    let span = tracing::info_span!(
        "stem.task",
        task.name = %envelope.name,
        task.id = %envelope.id,
        task.attempt = envelope.attempt + 1,
        task.queue = %envelope.queue,
    );
    run_delivery(rt, ctx, renewed).instrument(span).await;
}

async fn run_delivery(rt: &Runtime, ctx: Context, renewed: Instant) {
    let envelope = ctx.envelope();
    // The clock is read only when something needs it: an expiry to check
    // or records to write (`started_at` goes nowhere without a backend).
    let started_at = if rt.backend.is_some() || envelope.expires_at.is_some() {
        Utc::now()
    } else {
        DateTime::UNIX_EPOCH
    };
    if envelope.expires_at.is_some_and(|t| t <= started_at) {
        task_event!(
            INFO,
            envelope,
            envelope.attempt + 1,
            "task expired before it ran; dropped"
        );
        let record = record(rt, envelope, envelope.attempt, started_at, || {
            let failure = TaskFailure {
                message: format!(
                    "expired at {} before a worker ran it",
                    envelope.expires_at.unwrap_or(started_at)
                ),
                type_name: String::from("stem::Expired"),
                kind: FailureKind::Expired,
            };
            TaskState::Failed { error: failure }
        });
        rt.event(|p| {
            let mut e = p.task(EventKind::Failed, envelope);
            e.error = Some(String::from("expired before a worker ran it"));
            e
        });
        complete(
            rt,
            Some((ctx.owned_receipt(), Disposition::Ack)),
            record,
            ctx.envelope(),
            Count::Failed,
        );
        return;
    }
    let Some(entry) = rt.tasks.get(envelope.name.as_str()).copied() else {
        unknown_task(rt, &ctx, started_at);
        return;
    };
    if let Some(wait) = rt.rates.acquire(entry.name) {
        tracing::debug!(?wait, "rate limited; handed back");
        rt.complete(Completion::settle(
            ctx.owned_receipt(),
            Disposition::Release { after: wait },
            Count::Nothing,
        ));
        return;
    }
    let handler = || (entry.handler)(ctx.clone(), &envelope.args);
    let handled = if entry.options.blocking {
        // The thread the handler starts is listed while it runs (see
        // `__private::run_blocking`).
        let guard = ctx.blocking_threads().register(envelope);
        crate::context::offer_blocking_guard(guard, handler)
    } else {
        handler()
    };
    let future = match handled {
        Ok(f) => f,
        Err(e) => {
            let reason = format!("undecodable arguments for task `{}`: {e}", envelope.name);
            // Not the decoder's message: it may quote an argument. It is
            // in the dead letter.
            task_event!(
                ERROR,
                envelope,
                envelope.attempt + 1,
                args_type = e.args_type,
                "task dead-lettered: its arguments do not decode (the decode error is in the dead letter)"
            );
            dead_letter_now(
                rt,
                ctx.owned_receipt(),
                ctx.envelope(),
                started_at,
                reason,
                Some(e.to_string()),
                FailureKind::Decode,
                "stem::DecodeError",
            );
            return;
        }
    };
    let at_most_once = entry.options.delivery == DeliveryMode::AtMostOnce;
    if at_most_once && let Err(e) = rt.broker.ack(ctx.receipt()).await {
        tracing::warn!(error = %e, "at-most-once task could not be acked before running; not running it");
        return;
    }
    let attempt = envelope.attempt + 1;
    rt.counters.started.fetch_add(1, Ordering::Relaxed);
    let clock = (rt.events.is_some() || tracing::enabled!(target: TASK, tracing::Level::INFO))
        .then(Instant::now);
    task_event!(INFO, envelope, attempt, "task started");
    rt.event(|p| {
        let mut e = p.task(EventKind::Started, envelope);
        e.attempt = Some(attempt);
        e
    });
    if let Some(started) = record(rt, envelope, attempt, started_at, || TaskState::Started) {
        rt.complete(Completion::record(started));
    }

    let outcome = run_with_lease(rt, entry, &ctx, future, at_most_once, renewed).await;
    // Fault suite (feature `failpoints`): a crash after the handler
    // returned, before anything of its outcome is written.
    crash_point!(
        "stem-after-handler",
        matches!(outcome, Outcome::Finished(_) | Outcome::Panicked(_))
    );
    if !matches!(outcome, Outcome::Finished(_) | Outcome::Panicked(_)) {
        // The future is dropped; code it handed work to (a blocking
        // thread above all) learns of it here.
        ctx.cancel();
    }
    // The handler's future is gone: the receipt comes back without a copy
    // unless the task kept a clone of its context.
    let settle_receipt = if at_most_once {
        None
    } else {
        Some(ctx.owned_receipt())
    };
    let envelope = ctx.envelope();
    match outcome {
        Outcome::Finished(Ok(result)) => {
            let record = record(rt, envelope, attempt, started_at, || TaskState::Succeeded {
                result,
            });
            task_event!(
                INFO,
                envelope,
                attempt,
                duration_ms = elapsed_ms(clock),
                "task succeeded"
            );
            rt.event(|p| {
                let mut e = p.task(EventKind::Succeeded, envelope);
                e.attempt = Some(attempt);
                e.duration_ms = elapsed_ms(clock);
                e
            });
            let settle = settle_receipt.map(|r| (r, Disposition::Ack));
            complete(rt, settle, record, envelope, Count::Succeeded);
        }
        Outcome::Finished(Err(err)) => {
            fail(
                rt,
                settle_receipt,
                envelope,
                entry,
                (started_at, clock),
                err,
            );
        }
        Outcome::Panicked(message) => {
            task_event!(ERROR, envelope, attempt, %message, "task panicked");
            let err = HandlerError::new(FailureKind::Panic, "panic", message);
            fail(
                rt,
                settle_receipt,
                envelope,
                entry,
                (started_at, clock),
                err,
            );
        }
        Outcome::TimedOut(limit) => {
            if entry.options.blocking {
                task_event!(
                    WARN,
                    envelope,
                    attempt,
                    ?limit,
                    "blocking task hit its time limit; its context is cancelled and its thread runs until it returns"
                );
            } else {
                task_event!(
                    WARN,
                    envelope,
                    attempt,
                    ?limit,
                    "task hit its time limit; future dropped"
                );
            }
            let err = HandlerError::new(
                FailureKind::Timeout,
                "stem::Timeout",
                format!(
                    "exceeded the time limit of {}",
                    humantime::format_duration(limit)
                ),
            );
            fail(
                rt,
                settle_receipt,
                envelope,
                entry,
                (started_at, clock),
                err,
            );
        }
        Outcome::Aborted => {
            task_event!(
                WARN,
                envelope,
                attempt,
                "task stopped at the end of the shutdown grace; handed back"
            );
            if let Some(receipt) = settle_receipt {
                rt.release(receipt, Duration::ZERO);
            }
        }
        Outcome::LeaseLost => {
            task_event!(
                WARN,
                envelope,
                attempt,
                "lease lost while running: another worker has the task now; stopped this run"
            );
        }
        Outcome::Revoked => {
            task_event!(
                INFO,
                envelope,
                attempt,
                "task revoked while running; its context is cancelled and it is acked"
            );
            rt.event(|p| {
                let mut e = p.task(EventKind::Revoked, envelope);
                e.attempt = Some(attempt);
                e
            });
            let record = record(rt, envelope, attempt, started_at, || TaskState::Revoked);
            let settle = settle_receipt.map(|r| (r, Disposition::Ack));
            complete(rt, settle, record, envelope, Count::Revoked);
        }
    }
}

/// How long an unknown task waits before it is offered again: long enough
/// not to be re-fetched in a loop by this worker, short enough for a worker
/// that knows it (another app on the namespace, the other build of a
/// rolling deploy) to get it soon.
const UNKNOWN_TASK_BACKOFF: Duration = Duration::from_secs(5);

/// A task this worker has no handler for: handed back without charging an
/// attempt while it is younger than the grace (another worker may know it),
/// dead-lettered with the reason after.
fn unknown_task(rt: &Runtime, ctx: &Context, now: DateTime<Utc>) {
    let envelope = ctx.envelope();
    let grace = rt.config.unknown_task_grace;
    let age = (Utc::now() - envelope.enqueued_at)
        .to_std()
        .unwrap_or(Duration::ZERO);
    if age < grace {
        let first = rt
            .unknown_warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(envelope.name.clone());
        if first {
            tracing::warn!(
                task = %envelope.name,
                worker_id = %rt.config.worker_id,
                known = %rt.known_names,
                grace = %humantime::format_duration(grace),
                "no handler for this task name here: handing it back for a worker that has one (another app on this namespace, or another build during a deploy); it is dead-lettered if none takes it within the grace (STEM_UNKNOWN_TASK_GRACE). Logged once per name"
            );
        }
        let after = UNKNOWN_TASK_BACKOFF.min(grace - age);
        rt.complete(Completion::settle(
            ctx.owned_receipt(),
            Disposition::Release { after },
            Count::Nothing,
        ));
        return;
    }
    let reason = format!(
        "unknown task name `{}`: no worker with a handler for it took it within the grace of {} (this one, {}, knows: {}); deploy a worker that links the task, then replay the dead letter",
        envelope.name,
        humantime::format_duration(grace),
        rt.config.worker_id,
        rt.known_names
    );
    task_event!(
        ERROR,
        envelope,
        envelope.attempt + 1,
        %reason,
        "task dead-lettered: unknown task name"
    );
    let receipt = ctx.owned_receipt();
    dead_letter_now(
        rt,
        receipt,
        ctx.envelope(),
        now,
        reason,
        None,
        FailureKind::Decode,
        "stem::UnknownTask",
    );
}

async fn run_with_lease(
    rt: &Runtime,
    entry: &TaskEntry,
    ctx: &Context,
    future: crate::registry::HandlerFuture,
    at_most_once: bool,
    renewed: Instant,
) -> Outcome {
    let receipt = ctx.receipt();
    let lease = entry.lease_or(rt.config.lease);
    if !at_most_once
        && lease > rt.config.lease
        && let Err(e) = rt.broker.extend_lease(receipt, lease).await
    {
        tracing::warn!(error = %e, "could not extend the lease to the task's own");
    }
    let guarded = AssertUnwindSafe(future).catch_unwind();
    let timed = async {
        match entry.options.timeout {
            Some(limit) => match tokio::time::timeout(limit, guarded).await {
                Ok(r) => r.map(Some),
                Err(_) => Ok(None),
            },
            None => guarded.await.map(Some),
        }
    };
    tokio::pin!(timed);
    let finished = |r: Result<Option<HandlerResult>, Box<dyn std::any::Any + Send>>| match r {
        Ok(Some(result)) => Outcome::Finished(result),
        Ok(None) => Outcome::TimedOut(entry.options.timeout.unwrap_or_default()),
        Err(payload) => Outcome::Panicked(panic_message(payload.as_ref())),
    };
    // Most tasks finish without ever waiting: poll once before arming the
    // keep-alive timer and the shutdown watch, so those cost nothing then.
    if let Poll::Ready(r) = futures::poll!(timed.as_mut()) {
        return finished(r);
    }
    // Listed for `inspect active` and stoppable by `revoke --terminate`
    // from here on (a task done at its first poll is neither).
    let running = rt.live.start(ctx.envelope(), ctx.attempt());
    // The first renewal is due a period after the last one (the claim or
    // the queue keeper's), not after the start.
    let period = lease::renew_period(lease);
    let mut keepalive = tokio::time::interval_at((renewed + period).into(), period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A task without a time limit that runs far longer than expected is
    // logged once (polled only for such tasks).
    let mut warn_long = entry.options.timeout.is_none();
    let long = tokio::time::sleep(rt.config.long_task_warning);
    tokio::pin!(long);
    loop {
        tokio::select! {
            biased;
            () = rt.abort.cancelled() => return Outcome::Aborted,
            r = &mut timed => return finished(r),
            () = running.stop.cancelled() => return Outcome::Revoked,
            () = &mut long, if warn_long => {
                warn_long = false;
                task_event!(
                    WARN,
                    ctx.envelope(),
                    ctx.attempt(),
                    running_for = %humantime::format_duration(rt.config.long_task_warning),
                    "task still running past the long-task warning and it has no time limit (STEM_LONG_TASK_WARNING); logged once"
                );
            }
            _ = keepalive.tick(), if !at_most_once => {
                match rt.broker.extend_lease(receipt, lease).await {
                    Ok(()) => {}
                    Err(BrokerError::LeaseLost { .. }) => return Outcome::LeaseLost,
                    Err(e) => tracing::warn!(error = %e, "could not extend lease; will retry"),
                }
                // Revocation is learned where the lease is renewed: one
                // look-up per renewal period, only for a task still running
                // (or at once, from the control plane, with `terminate`).
                if rt.live.is_revoked(receipt.task_id) || revoked(rt, receipt).await {
                    return Outcome::Revoked;
                }
            }
        }
    }
}

/// Whether the running task was revoked (false without a backend, or when
/// the backend cannot say: the task keeps running).
async fn revoked(rt: &Runtime, receipt: &Receipt) -> bool {
    let Some(backend) = &rt.backend else {
        return false;
    };
    match backend.revoked(&[receipt.task_id]).await {
        Ok(flags) => flags.first().copied().unwrap_or(false),
        Err(e) => {
            tracing::warn!(error = %e, "could not check whether the running task was revoked");
            false
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::from("panic with a non-string payload")
    }
}

/// A failed attempt: retry, or fail for good (dead letter). The broker
/// charges the attempt; the worker only says which.
fn fail(
    rt: &Runtime,
    receipt: Option<Receipt>,
    envelope: &Envelope,
    entry: &TaskEntry,
    (started_at, clock): (DateTime<Utc>, Option<Instant>),
    err: HandlerError,
) {
    let attempt = envelope.attempt + 1;
    let failure = err.failure;
    let Some(receipt) = receipt else {
        // At-most-once: already acked, never retried.
        task_event!(
            WARN,
            envelope,
            attempt,
            error = %failure,
            duration_ms = elapsed_ms(clock),
            "task failed; at-most-once, not retried"
        );
        rt.event(|p| {
            let mut e = p.task(EventKind::Failed, envelope);
            e.attempt = Some(attempt);
            e.error = Some(failure.to_string());
            e
        });
        let record = record(rt, envelope, attempt, started_at, || TaskState::Failed {
            error: failure,
        });
        complete(rt, None, record, envelope, Count::Failed);
        return;
    };
    let retry_delay = match err.directive {
        RetryDirective::Fatal => None,
        _ if attempt > envelope.max_retries => None,
        RetryDirective::After(d) => Some(d),
        RetryDirective::Policy => Some(entry.options.backoff.delay(attempt)),
    };
    let error_text = failure.to_string();
    match retry_delay {
        Some(delay) => {
            let next_at =
                Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            task_event!(
                INFO,
                envelope,
                attempt,
                error = %failure,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                duration_ms = elapsed_ms(clock),
                "task failed; retrying"
            );
            rt.event(|p| {
                let mut e = p.task(EventKind::Retried, envelope);
                e.attempt = Some(attempt);
                e.error = Some(error_text.clone());
                e.next_at = Some(next_at);
                e
            });
            let record = record(rt, envelope, attempt, started_at, || TaskState::Retrying {
                next_at,
                error: failure,
            });
            let disposition = Disposition::Retry {
                after: delay,
                error: error_text,
            };
            // A retry is not the group's last word: no group progress.
            rt.complete(Completion {
                settle: Some((receipt, disposition)),
                record: record.map(Box::new),
                group_id: None,
                count: Count::Retried,
            });
        }
        None => {
            let reason = if err.directive == RetryDirective::Fatal {
                String::from("failed with a fatal error; not retried")
            } else {
                format!(
                    "retries exhausted: attempt {attempt} of {} failed",
                    envelope.max_retries + 1
                )
            };
            task_event!(
                ERROR,
                envelope,
                attempt,
                error = %failure,
                %reason,
                duration_ms = elapsed_ms(clock),
                "task failed; dead-lettered"
            );
            if let Some(p) = &rt.events {
                let mut e = p.task(EventKind::Failed, envelope);
                e.attempt = Some(attempt);
                e.error = Some(error_text.clone());
                e.duration_ms = elapsed_ms(clock);
                p.emit(e);
                let mut e = p.task(EventKind::DeadLettered, envelope);
                e.attempt = Some(attempt);
                e.reason = Some(reason.clone());
                p.emit(e);
            }
            let record = record(rt, envelope, attempt, started_at, || TaskState::Failed {
                error: failure,
            });
            let disposition = Disposition::DeadLetter {
                reason,
                error: Some(error_text),
                charge: true,
            };
            complete(
                rt,
                Some((receipt, disposition)),
                record,
                envelope,
                Count::DeadLettered,
            );
        }
    }
}

/// Dead-letters a delivery that never ran (unknown task, undecodable
/// arguments): no attempt is charged.
#[allow(clippy::too_many_arguments)]
fn dead_letter_now(
    rt: &Runtime,
    receipt: Receipt,
    envelope: &Envelope,
    started_at: DateTime<Utc>,
    reason: String,
    error: Option<String>,
    kind: FailureKind,
    type_name: &str,
) {
    rt.event(|p| {
        let mut e = p.task(EventKind::DeadLettered, envelope);
        e.reason = Some(reason.clone());
        e
    });
    let record = record(rt, envelope, envelope.attempt + 1, started_at, || {
        let failure = TaskFailure {
            message: reason.clone(),
            type_name: type_name.to_owned(),
            kind,
        };
        TaskState::Failed { error: failure }
    });
    let disposition = Disposition::DeadLetter {
        reason,
        error,
        charge: false,
    };
    complete(
        rt,
        Some((receipt, disposition)),
        record,
        envelope,
        Count::DeadLettered,
    );
}

/// Sends a settlement and, with a result backend, the record that goes
/// with it.
fn complete(
    rt: &Runtime,
    settle: Option<(Receipt, Disposition)>,
    record: Option<TaskRecord>,
    envelope: &Envelope,
    count: Count,
) {
    rt.complete(Completion {
        settle,
        group_id: envelope.group_id,
        record: record.map(Box::new),
        count,
    });
}

/// The record of this step, built only when a result backend will store
/// it (`state` is not even computed otherwise).
fn record(
    rt: &Runtime,
    envelope: &Envelope,
    attempts: u32,
    started_at: DateTime<Utc>,
    state: impl FnOnce() -> TaskState,
) -> Option<TaskRecord> {
    rt.backend.as_ref()?;
    let mut rec = TaskRecord::new(envelope.id, state());
    rec.name = Some(envelope.name.clone());
    rec.attempts = attempts;
    rec.worker_id = Some(rt.worker_id.to_string());
    rec.started_at = Some(started_at);
    rec.group_id = envelope.group_id;
    if let Some(secs) = envelope.result_ttl_secs {
        rec.ttl = Duration::from_secs(secs);
    }
    Some(rec)
}
