//! Generated code is clean under the strictest rustc lints a user may set.
#![deny(warnings, unused_qualifications, missing_docs, unreachable_pub)]
#![deny(missing_debug_implementations, unused_results, trivial_casts)]
#![deny(rust_2018_idioms, let_underscore_drop)]
#![forbid(unsafe_code)]

//! Crate docs.

use std::time::Duration;

/// A module.
pub mod tasks {
    use std::time::Duration;

    /// A public task using an imported type.
    #[stem::task(timeout = "10s")]
    pub async fn wait(d: Duration) -> Duration {
        d
    }

    /// A private task.
    #[stem::task]
    async fn private(n: u32) -> Result<u32, std::fmt::Error> {
        Ok(n)
    }

    /// Uses the private task.
    pub fn name() -> &'static str {
        private::NAME
    }
}

fn main() {
    let _d = Duration::from_secs(1);
    let _n = tasks::name();
    let _w = tasks::wait::NAME;
}
