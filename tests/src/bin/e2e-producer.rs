//! A producer process for the multi-process tests: enqueues `N` ledger
//! tasks in batches, waits for every typed result and checks it.
//! Usage: `e2e-producer N` with `STEM_BROKER_URL` set. Exits 0 when every
//! result came back right.

use std::time::Duration;

use stem_tests::e2e_tasks::ledger_noop;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .ok_or("usage: e2e-producer N")?
        .parse()?;
    let mut handles = Vec::new();
    let ids: Vec<u64> = (0..n).collect();
    for chunk in ids.chunks(500) {
        let batch =
            ledger_noop::enqueue_many(chunk.iter().map(|&n| ledger_noop::Args { n })).await?;
        handles.extend(chunk.iter().copied().zip(batch));
    }
    for (n, h) in handles {
        let out = h.wait(Duration::from_secs(120)).await?;
        if out != n * 2 {
            return Err(format!("task {n} returned {out}, expected {}", n * 2).into());
        }
    }
    Ok(())
}
