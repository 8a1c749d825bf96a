//! A producer: enqueues the example tasks and prints their typed results.
//! Start `STEM_LEASE=5s cargo run -p example-worker` in another terminal
//! first.
//!
//! Run it with `cargo run -p example-producer`. The thumbnails take
//! [`example_tasks::THUMBNAIL_TIME`] each: kill the worker with `kill -9`
//! meanwhile and start it again, and they run again once their lease
//! expires; the producer waits [`WAIT`] for each result, enough for the
//! task, the default 30 s lease and the re-run.

// A program that shows its results prints them.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use example_tasks::{Thumbnail, add, make_thumbnail, word_count};

/// How long the producer waits for each result.
const WAIT: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let wait = WAIT;
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

    println!(
        "enqueued 3 thumbnails ({} s each) and word_count; waiting up to {} s for each result",
        example_tasks::THUMBNAIL_TIME.as_secs(),
        wait.as_secs()
    );

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

#[cfg(test)]
mod tests {
    use super::WAIT;
    use example_tasks::THUMBNAIL_TIME;

    /// The README's kill demo: a thumbnail must run long enough to kill
    /// the worker in the middle of it, and the producer must wait for the
    /// task, its lease to expire (even the default 30 s one) and the re-run.
    #[test]
    fn walkthrough_kill_demo_fits_the_producer_wait() {
        assert!(
            THUMBNAIL_TIME >= std::time::Duration::from_secs(5),
            "{THUMBNAIL_TIME:?} is too short to kill the worker mid-task"
        );
        let default_lease = stem::worker::WorkerConfig::default().lease;
        let needed = THUMBNAIL_TIME + default_lease + THUMBNAIL_TIME;
        assert!(
            WAIT >= needed + std::time::Duration::from_secs(30),
            "the producer waits {WAIT:?}; a kill and a re-run need {needed:?} plus time to restart"
        );
    }
}
