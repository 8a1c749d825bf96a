//! Stem quickstart: three tasks enqueued and run in one process on the
//! embedded default broker, printing their typed results.
//!
//! Run it with `cargo run -p quickstart` (add `RUST_LOG=info` to see the
//! worker's logs).

// A program that shows its results prints them.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An order line to price.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Line {
    sku: String,
    quantity: u32,
    unit_cents: u64,
}

/// Why pricing failed.
#[derive(Debug, thiserror::Error)]
enum PricingError {
    #[error("order has no lines")]
    Empty,
}

/// Adds two numbers.
#[stem::task]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Greets someone, reporting which attempt ran it.
#[stem::task(queue = "greetings", retries = 2, timeout = "5s")]
async fn greet(ctx: stem::Context, name: String) -> String {
    format!(
        "Hello, {name}! (task {}, attempt {})",
        ctx.id(),
        ctx.attempt()
    )
}

/// Totals an order; fails for an empty one.
#[stem::task(queue = "orders", priority = 7, retries = 0)]
async fn price_order(lines: Vec<Line>) -> Result<u64, PricingError> {
    if lines.is_empty() {
        return Err(PricingError::Empty);
    }
    Ok(lines
        .iter()
        .map(|l| u64::from(l.quantity) * l.unit_cents)
        .sum())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();

    // The embedded default: with no STEM_BROKER_URL this is a SQLite file
    // (durable, shared with every Stem process on this host).
    let stem = stem::Stem::default_client().await?;
    println!("broker: {}", stem.broker().describe());

    // A worker in this process, consuming every task's queue.
    let worker = stem::worker::Worker::builder()
        .client(&stem)
        .concurrency(4)
        .build()
        .await?
        .start();

    let sum = add::enqueue(2, 40).await?;
    let hello = greet::enqueue("Ada".to_owned()).await?;
    let total = price_order::with()
        .priority(9)
        .enqueue(vec![
            Line {
                sku: "tea".into(),
                quantity: 2,
                unit_cents: 450,
            },
            Line {
                sku: "cake".into(),
                quantity: 1,
                unit_cents: 320,
            },
        ])
        .await?;
    let empty = price_order::enqueue(Vec::new()).await?;

    let timeout = Duration::from_secs(10);
    println!("add(2, 40)          = {}", sum.wait(timeout).await?);
    println!("greet(\"Ada\")        = {}", hello.wait(timeout).await?);
    println!("price_order(..)     = {} cents", total.wait(timeout).await?);
    match empty.wait(timeout).await {
        Ok(v) => println!("price_order([])     = {v} (unexpected)"),
        Err(e) => println!("price_order([])     failed as expected: {e}"),
    }

    worker.shutdown();
    let report = worker.join().await;
    println!(
        "worker: {} started, {} succeeded, {} failed",
        report.started, report.succeeded, report.failed
    );
    Ok(())
}
