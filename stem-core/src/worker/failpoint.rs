//! Failpoints in the worker's completion path, for the fault-injection
//! suite (issue 19, scenario 8): compiled only with the `failpoints`
//! feature, which no default build turns on. A failpoint set to `return`
//! (`FAILPOINTS=stem-after-handler=return`, read by the worker binary with
//! `fail::FailScenario::setup`) ends the process at once with exit status
//! 137, as a SIGKILL would: no graceful code, no settlement, no record.
//!
//! - `stem-after-handler`: the handler returned (or panicked), nothing of
//!   its outcome is written (executor).
//! - `stem-after-record`: a terminal record is written and its delivery
//!   not yet settled (completer). With a result backend in separate storage
//!   (Redis) that is between the record write and the ack; where the broker
//!   stores the records in the same transaction as the settlement (SQLite,
//!   Postgres: `Broker::stores_results_of`) there is no such moment, and
//!   the point fires once that transaction has committed (both written).

/// `crash_point!(NAME, CONDITION)`: with the `failpoints` feature, when
/// `CONDITION` holds and the failpoint `NAME` is set to `return`, ends the
/// process at once. Without the feature it is nothing (the condition is
/// not evaluated).
#[cfg(feature = "failpoints")]
macro_rules! crash_point {
    ($name:expr, $cond:expr) => {
        if $cond {
            let _ = fail::eval($name, |_| crate::worker::failpoint::crash($name));
        }
    };
}

/// See the `failpoints` version: nothing without the feature.
#[cfg(not(feature = "failpoints"))]
macro_rules! crash_point {
    ($name:expr, $cond:expr) => {};
}

/// Ends the process at once, as a crash would (exit status 137, the
/// status of a SIGKILL), without running any destructor or graceful path.
#[cfg(feature = "failpoints")]
pub(crate) fn crash(name: &str) -> ! {
    tracing::error!(
        failpoint = name,
        "failpoint: ending the process at once (exit status 137)"
    );
    std::process::exit(137)
}
