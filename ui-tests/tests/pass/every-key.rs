//! Every attribute key at once, with injected params and a user error type.
#![deny(warnings)]

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Welcome {
    user_id: u64,
    locale: String,
}

#[derive(Debug)]
struct MailError;

impl fmt::Display for MailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mail failed")
    }
}

struct Pool;

#[stem::task(
    queue = "emails",
    priority = 9,
    retries = 10,
    backoff = "exponential",
    backoff_base = "100ms",
    backoff_max = "1h 30m",
    timeout = "2m",
    lease = "45s",
    delivery = at_most_once,
    rate_limit = "5/h",
    name = "emails.welcome",
    blocking = true,
    crate = "::stem"
)]
async fn send_welcome(
    ctx: stem::Context,
    pool: stem::State<Pool>,
    msg: Welcome,
) -> Result<u64, MailError> {
    let _ = (ctx, pool);
    Ok(msg.user_id)
}

fn main() {
    const _: &str = send_welcome::NAME;
    assert_eq!(send_welcome::NAME, "emails.welcome");
    assert_eq!(send_welcome::OPTIONS.priority, 9);
    assert!(send_welcome::OPTIONS.blocking);
    let _: send_welcome::Output = 1_u64;
}
