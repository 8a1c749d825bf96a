//! Tasks shared by `examples/worker` (which runs them) and
//! `examples/producer` (which enqueues them and waits for typed results).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A thumbnail request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Thumbnail {
    /// Source image path.
    pub path: String,
    /// Target width in pixels.
    pub width: u32,
}

/// Why making a thumbnail failed.
#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    /// Zero width.
    #[error("width must be above zero")]
    ZeroWidth,
}

/// Adds two numbers.
#[stem::task(queue = "math")]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// How long [`make_thumbnail()`] works: long enough to `kill -9` the worker
/// in the middle of it (the README's walkthrough).
pub const THUMBNAIL_TIME: Duration = Duration::from_secs(10);

/// Pretends to resize an image, taking [`THUMBNAIL_TIME`].
#[stem::task(queue = "images", retries = 2, timeout = "30s", priority = 5)]
pub async fn make_thumbnail(ctx: stem::Context, job: Thumbnail) -> Result<String, ThumbnailError> {
    if job.width == 0 {
        return Err(ThumbnailError::ZeroWidth);
    }
    tracing::info!(path = %job.path, attempt = ctx.attempt(), "making a thumbnail");
    tokio::time::sleep(THUMBNAIL_TIME).await;
    Ok(format!(
        "{}@{}w (worker {}, attempt {})",
        job.path,
        job.width,
        ctx.worker_id(),
        ctx.attempt()
    ))
}

/// Counts the words of a text on the blocking pool.
#[stem::task(queue = "math", blocking = true)]
pub async fn word_count(text: String) -> usize {
    text.split_whitespace().count()
}
