//! The Postgres test server, shared by the Postgres test files: its URL
//! (`STEM_TEST_POSTGRES_URL`), whether it answers, and a connection of
//! the test's own for checks and cleanup.
#![allow(dead_code, reason = "each test file uses part of it")]

use std::time::Duration;

use sqlx::Connection;

/// `STEM_TEST_POSTGRES_URL`, else the local server's database `test`.
pub(crate) fn server_url() -> String {
    std::env::var("STEM_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:5432/test"))
}

/// `host:port` of the test server.
pub(crate) fn host_port() -> String {
    let url = server_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hp = rest.split(['/', '?']).next().unwrap_or("127.0.0.1:5432");
    if hp.contains(':') {
        hp.to_owned()
    } else {
        format!("{hp}:5432")
    }
}

/// Why the server cannot be used, when it does not answer a TCP connect
/// within 300 ms (the sentence of a SKIP line).
pub(crate) fn unavailable() -> Option<String> {
    let hp = host_port();
    let up = std::net::ToSocketAddrs::to_socket_addrs(&hp)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok()
        });
    (!up).then(|| format!("no PostgreSQL at {hp} (start one, or set STEM_TEST_POSTGRES_URL)"))
}

/// A connection of the test's own.
pub(crate) async fn admin() -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&server_url())
        .await
        .unwrap_or_else(|e| panic!("Postgres reachable at STEM_TEST_POSTGRES_URL: {e}"))
}
