//! Stem: typed background tasks for Rust.
//!
//! Put `#[stem::task]` on an `async fn`; enqueue it with the generated
//! `my_task::enqueue(..)`; run `stem::worker::run()` in a worker binary.

pub use stem_core::*;
pub use stem_macros::task;

#[doc(hidden)]
pub use stem_core::__private;
