//! The conformance kit against the Redis adapter, on the Redis at
//! `STEM_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`). Every case
//! uses its own namespaces on that one server, and connects as an ACL user
//! of its own so `disrupt` can kill exactly its connections (`CLIENT KILL
//! USER`) while other cases run on. Without a reachable Redis every case
//! prints a SKIP line (and fails under `STEM_REQUIRE_SERVICES=1`).
//!
//! A second factory pairs the Redis broker with the SQLite result backend
//! (a mixed deployment) for the chord cases, whose exactly-once then spans
//! two stores.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use stem_adapters::redis::{RedisBackend, RedisBroker, RedisOptions};
use stem_core::clock::Clock;
use stem_core::kit::{AdapterFactory, KitOptions};
use stem_core::{Broker, ResultBackend};

fn server_url() -> String {
    std::env::var("STEM_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| String::from("redis://127.0.0.1:6379"))
}

/// `host:port` of the test server.
fn host_port() -> String {
    let url = server_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hp = rest.split(['/', '?']).next().unwrap_or("127.0.0.1:6379");
    if hp.contains(':') {
        hp.to_owned()
    } else {
        format!("{hp}:6379")
    }
}

/// The ACL user of a namespace: `kit_` and a hash, so any namespace text
/// makes a valid user name.
fn user_of(namespace: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("kit_{h:016x}")
}

async fn admin() -> redis::aio::MultiplexedConnection {
    redis::Client::open(server_url())
        .unwrap_or_else(|e| panic!("STEM_TEST_REDIS_URL is not a Redis URL: {e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis reachable: {e}"))
}

fn backend_path(opts: &KitOptions) -> std::path::PathBuf {
    std::env::temp_dir()
        .join("stem-kit-redis")
        .join(format!("{}.db", opts.storage))
}

struct RedisFactory;

impl RedisFactory {
    fn options(opts: &KitOptions) -> RedisOptions {
        RedisOptions {
            namespace: opts.namespace.clone(),
            max_envelope_bytes: opts.max_envelope_bytes,
            dead_letter_retention: opts.dead_letter_retention,
            max_block: Duration::from_secs(1),
            ..RedisOptions::default()
        }
    }

    /// The case's URL: its own ACL user, created on first use.
    async fn url(opts: &KitOptions) -> String {
        let user = user_of(&opts.namespace);
        let mut c = admin().await;
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("on")
            .arg(">kit")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query_async::<()>(&mut c)
            .await
            .unwrap_or_else(|e| panic!("ACL SETUSER: {e}"));
        format!("redis://{user}:kit@{}", host_port())
    }

    async fn open(opts: &KitOptions, options: RedisOptions) -> RedisBroker {
        RedisBroker::connect(&Self::url(opts).await, options)
            .await
            .unwrap_or_else(|e| panic!("Redis connects: {e}"))
    }
}

#[async_trait::async_trait]
impl AdapterFactory for RedisFactory {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn unavailable(&self) -> Option<String> {
        let hp = host_port();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&hp)
            .ok()
            .and_then(|mut a| a.next());
        let up = addr.is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok()
        });
        (!up).then(|| format!("no Redis at {hp} (start one, or set STEM_TEST_REDIS_URL)"))
    }

    async fn broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
        Arc::new(Self::open(opts, Self::options(opts)).await)
    }

    async fn backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        Arc::new(
            RedisBackend::connect(&Self::url(opts).await, Self::options(opts))
                .await
                .unwrap_or_else(|e| panic!("Redis backend connects: {e}")),
        )
    }

    async fn insert_garbage(&self, opts: &KitOptions, queue: &str, bytes: &[u8]) {
        Self::open(opts, Self::options(opts))
            .await
            .insert_raw(queue, bytes)
            .await
            .unwrap_or_else(|e| panic!("garbage inserted: {e}"));
    }

    /// Deletes the namespace's keys and its ACL user, then checks that no
    /// key of the namespace is left (a finished case leaves nothing).
    async fn cleanup(&self, opts: &KitOptions) {
        let b = Self::open(opts, Self::options(opts)).await;
        b.delete_namespace(&opts.namespace)
            .await
            .unwrap_or_else(|e| panic!("namespace deleted: {e}"));
        let left = b
            .delete_namespace(&opts.namespace)
            .await
            .unwrap_or_else(|e| panic!("namespace scanned: {e}"));
        assert_eq!(left, 0, "keys of {} outlived its cleanup", opts.namespace);
        let mut c = admin().await;
        let _: redis::RedisResult<()> = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(user_of(&opts.namespace))
            .query_async(&mut c)
            .await;
    }

    /// Kills every connection of this case (its ACL user), the blocking
    /// ones included, and returns once Redis answers again.
    async fn disrupt(&self, opts: &KitOptions) -> Option<()> {
        let mut c = admin().await;
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(user_of(&opts.namespace))
            .query_async::<i64>(&mut c)
            .await
            .ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .ok()?;
        Some(())
    }

    async fn skewed_broker(
        &self,
        opts: &KitOptions,
        skew: chrono::TimeDelta,
    ) -> Option<Arc<dyn Broker>> {
        let options = RedisOptions {
            clock: Clock::skewed(skew),
            ..Self::options(opts)
        };
        Some(Arc::new(Self::open(opts, options).await))
    }

    async fn server_now(&self, _opts: &KitOptions) -> chrono::DateTime<chrono::Utc> {
        let mut c = admin().await;
        let (s, us): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("TIME: {e}"));
        chrono::DateTime::from_timestamp(s, u32::try_from(us * 1000).unwrap_or(0))
            .unwrap_or_else(chrono::Utc::now)
    }

    fn tick(&self) -> Duration {
        Duration::from_millis(50)
    }
}

mod conformance {
    use super::RedisFactory;
    stem_core::conformance_tests!(redis, RedisFactory);
}

/// The Redis broker with the SQLite result backend (one file per case's
/// storage): every case of [`RedisFactory`] but the backend's.
struct MixedFactory;

#[async_trait::async_trait]
impl AdapterFactory for MixedFactory {
    fn name(&self) -> &'static str {
        "redis+sqlite"
    }

    fn unavailable(&self) -> Option<String> {
        RedisFactory.unavailable()
    }

    async fn broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
        RedisFactory.broker(opts).await
    }

    async fn backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        Arc::new(
            stem_adapters::sqlite::SqliteBackend::open(
                backend_path(opts),
                stem_adapters::sqlite::SqliteOptions {
                    namespace: opts.namespace.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("SQLite backend opens: {e}")),
        )
    }

    async fn peer_backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        Arc::new(
            stem_adapters::sqlite::SqliteBackend::open_unshared(
                backend_path(opts),
                stem_adapters::sqlite::SqliteOptions {
                    namespace: opts.namespace.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("SQLite backend opens: {e}")),
        )
    }

    async fn insert_garbage(&self, opts: &KitOptions, queue: &str, bytes: &[u8]) {
        RedisFactory.insert_garbage(opts, queue, bytes).await;
    }

    async fn cleanup(&self, opts: &KitOptions) {
        RedisFactory.cleanup(opts).await;
        let path = backend_path(opts);
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }

    fn tick(&self) -> Duration {
        Duration::from_millis(50)
    }
}

/// The chord cases (R5) on the mixed deployment.
mod mixed {
    use super::MixedFactory;

    macro_rules! mixed_cases {
        ($($module:ident :: $case:ident),* $(,)?) => {$(
            #[test]
            fn $case() {
                if stem_core::kit::server_missing(&MixedFactory, stringify!($case)) {
                    return;
                }
                stem_core::kit::run(async { stem_core::kit::$module::$case(&MixedFactory).await });
            }
        )*};
    }

    mixed_cases!(
        backend::r5_chords,
        backend::r5_chord_waits_for_terminal_members,
        races::r5_race_chord_finishers,
    );
}
