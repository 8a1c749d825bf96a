//! Helpers shared by the end-to-end tests: isolated clients and waiting on
//! conditions with a deadline instead of sleeping.

pub mod e2e_tasks;
pub mod ledger;
pub mod postgres;
pub mod process;
pub mod redis_server;

use std::future::Future;
use std::time::{Duration, Instant};

/// A client on a fresh in-memory namespace, private to one test.
///
/// # Panics
/// If the in-memory adapter cannot be opened (a bug).
pub async fn isolated_client(test: &str) -> stem::Stem {
    let ns = format!("test_{test}_{}", stem::TaskId::new().as_uuid().simple());
    stem::connect_with("memory://e2e", None, &ns)
        .await
        .expect("memory adapter opens")
}

/// Polls `check` every 10 ms until it returns true or `timeout` passes;
/// returns whether it became true.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
