//! The fault-injection suite (issue 19): worker processes draining a
//! backlog while faults are injected, on SQLite, Postgres and Redis. Tasks
//! append every run to a ledger file outside the broker, so the checks do
//! not trust the system under test. Tests are named `<adapter>_<scenario>`.
//!
//! Postgres and Redis come from `STEM_TEST_POSTGRES_URL` and
//! `STEM_TEST_REDIS_URL`; without a server a test prints one `SKIP` line
//! and passes, except under `STEM_REQUIRE_SERVICES=1`, where it fails.

mod clock;
mod crash;
mod disk;
mod handlers;
mod long;
mod outage;
mod poison;
mod sigkill;
mod stall;
mod stop;
mod support;
mod unique;
