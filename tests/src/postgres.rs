//! What the Postgres tests share: the server's URL, the SKIP-or-fail check
//! when there is none, a namespace of each test's own, and a guard that
//! drops its schema however the test ends.

use std::io::Write as _;
use std::time::Duration;

use stem::adapters::postgres::{PostgresBroker, PostgresOptions};

/// The server named by `STEM_TEST_POSTGRES_URL` (default
/// `postgres://postgres@127.0.0.1:5432/test`), without a query string.
#[must_use]
pub fn url() -> String {
    std::env::var("STEM_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:5432/test"))
}

/// `url()` with `options` (`k=v&k=v`) added to its query string.
#[must_use]
pub fn url_with(options: &str) -> String {
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{options}")
}

/// Whether the server accepts TCP connections. When it does not, prints
/// one SKIP line naming `test` and returns false, or fails under
/// `STEM_REQUIRE_SERVICES=1`.
///
/// # Panics
/// With no server and `STEM_REQUIRE_SERVICES=1`.
#[must_use]
pub fn server_up(test: &str) -> bool {
    let u = url();
    let hp = u
        .split_once("://")
        .map(|(_, r)| {
            let authority = r.split(['/', '?']).next().unwrap_or("");
            let h = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if h.contains(':') {
                h.to_owned()
            } else {
                format!("{h}:5432")
            }
        })
        .unwrap_or_default();
    let up = std::net::ToSocketAddrs::to_socket_addrs(&hp)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok()
        });
    if up {
        return true;
    }
    let msg =
        format!("SKIP {test}: no PostgreSQL at {hp} (start one, or set STEM_TEST_POSTGRES_URL)");
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{msg}, and STEM_REQUIRE_SERVICES=1 requires it"
    );
    // libtest captures `eprintln!`, not a write to the real stderr.
    let _ = writeln!(std::io::stderr(), "{msg}");
    false
}

/// A namespace no other test or run uses: `prefix` and a random suffix.
#[must_use]
pub fn namespace(prefix: &str) -> String {
    format!("{prefix}_{}", stem::TaskId::new().as_uuid().simple())
}

/// Drops a namespace's schema when dropped, so a failing test leaves
/// nothing behind either (on a thread of its own: a drop cannot await).
/// Declare it before the worker processes, so they are killed first.
pub struct DropSchema {
    /// The namespace whose schema goes.
    pub namespace: String,
}

impl Drop for DropSchema {
    fn drop(&mut self) {
        let url = url_with(&format!("namespace={}", self.namespace));
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let b = PostgresBroker::connect(&url, PostgresOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                b.drop_schema().await.map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            let _ = writeln!(
                std::io::stderr(),
                "could not drop the schema of {}: {e}",
                self.namespace
            );
        }
    }
}
