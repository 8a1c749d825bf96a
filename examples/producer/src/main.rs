//! A producer: enqueues the example tasks and prints their typed results.
//! Start `cargo run -p example-worker` in another terminal first.
//!
//! Run it with `cargo run -p example-producer`.

// A program that shows its results prints them.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use example_tasks::{Thumbnail, add, make_thumbnail, word_count};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let wait = Duration::from_secs(30);
    let sum = add::enqueue(19, 23).await?;
    println!("enqueued add(19, 23) as {}", sum.id());
    let thumbs = make_thumbnail::enqueue_many((1..=3).map(|i| make_thumbnail::Args {
        job: Thumbnail {
            path: format!("photos/{i}.jpg"),
            width: 128 * i,
        },
    }))
    .await?;
    let words = word_count::with()
        .delay(Duration::from_millis(500))
        .enqueue("the quick brown fox".to_owned())
        .await?;

    println!("add(19, 23) = {}", sum.wait(wait).await?);
    for t in thumbs {
        println!("thumbnail   = {}", t.wait(wait).await?);
    }
    println!(
        "word_count  = {} (ran after a 500 ms delay)",
        words.wait(wait).await?
    );
    Ok(())
}
