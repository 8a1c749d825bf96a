//! Tasks in nested modules of a library crate, compiled under strict lints
//! (`deny(warnings, unused_qualifications)`, `clippy::pedantic`): if the
//! code `#[stem::task]` generates trips a lint, this crate stops building.
//! `ui-tests` uses these tasks from another crate.

#![deny(warnings, unused_qualifications, missing_docs, unreachable_pub)]
#![warn(clippy::pedantic)]

/// Outer module.
pub mod a {
    /// Inner module.
    pub mod b {
        use std::collections::BTreeMap;
        use std::fmt;
        use std::time::Duration;

        use serde::{Deserialize, Serialize};

        /// A payload type defined next to the tasks.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub struct Welcome {
            /// The user.
            pub user_id: u64,
            /// Their locale.
            pub locale: String,
        }

        /// The user's own error type.
        #[derive(Debug)]
        pub struct MailError(pub String);

        impl fmt::Display for MailError {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "mail failed: {}", self.0)
            }
        }

        /// Shared state a worker provides.
        #[derive(Debug)]
        pub struct Mailer {
            /// Where mail goes.
            pub host: String,
        }

        /// Every attribute key at once; Context and State injected; a user
        /// error type.
        ///
        /// # Errors
        /// When the mail cannot be sent.
        #[stem::task(
            queue = "emails.high",
            priority = 7,
            retries = 5,
            backoff = exponential,
            backoff_base = "250ms",
            backoff_max = "1d",
            timeout = "30s",
            lease = "5m",
            delivery = at_least_once,
            rate_limit = "100/s",
            name = "fixture.send_welcome",
            blocking = false,
            crate = "::stem"
        )]
        pub async fn send_welcome(
            ctx: stem::Context,
            mailer: stem::State<Mailer>,
            msg: Welcome,
            extra: BTreeMap<String, String>,
        ) -> Result<u64, MailError> {
            std::future::ready(()).await;
            if mailer.host.is_empty() {
                return Err(MailError(format!("no host for {}", ctx.name())));
            }
            Ok(msg.user_id + u64::try_from(extra.len()).unwrap_or(0))
        }

        /// Unit output, default options, a parameter whose type comes from a
        /// `use` in this module.
        #[stem::task]
        pub async fn cleanup(older_than: Duration) {
            std::future::ready(older_than).await;
        }

        /// `blocking = true`, fixed backoff, at-most-once, a plain output.
        #[stem::task(
            blocking = true,
            backoff = "fixed",
            backoff_base = "2s",
            delivery = "at_most_once",
            rate_limit = "20/30s"
        )]
        pub async fn checksum(data: Vec<u8>) -> u32 {
            std::future::ready(()).await;
            data.iter().map(|b| u32::from(*b)).sum()
        }

        /// No backoff; a crate-visible task.
        #[stem::task(backoff = none, retries = 0)]
        pub(crate) async fn ping() -> String {
            std::future::ready(String::from("pong")).await
        }

        /// A private task and a `pub(super)` one, used from here so nothing
        /// is dead.
        #[stem::task]
        async fn private_task(n: u32) -> u32 {
            std::future::ready(n + 1).await
        }

        #[stem::task]
        pub(super) async fn super_task(n: u32) -> u32 {
            std::future::ready(n * 2).await
        }

        /// Names of the non-public tasks, proving their modules are reachable.
        #[must_use]
        pub fn hidden_names() -> [&'static str; 3] {
            [private_task::NAME, super_task::NAME, ping::NAME]
        }

        /// Uses the producer API of the non-public tasks (type-checked only).
        ///
        /// # Errors
        /// Whatever the enqueue returns.
        pub async fn enqueue_hidden(client: &stem::Stem) -> Result<(), stem::StemError> {
            private_task::enqueue_on(client, 1).await?;
            super_task::with().on(client).priority(3).enqueue(2).await?;
            ping::enqueue_on(client).await?;
            Ok(())
        }
    }

    /// `pub(super)` seen from its parent.
    #[must_use]
    pub fn super_task_name() -> &'static str {
        b::super_task::NAME
    }
}

/// A task at the crate root with the same fn name as one in `a::b`.
#[stem::task]
pub async fn cleanup(days: u32) -> u32 {
    std::future::ready(days).await
}
