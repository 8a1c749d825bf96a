//! The Redis result backend's waiting at scale and across a dropped
//! subscriber connection, on the Redis at `STEM_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`). Without one each test prints a SKIP line and
//! passes, except under `STEM_REQUIRE_SERVICES=1`.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use stem_adapters::redis::{RedisBackend, RedisOptions};
use stem_core::{ResultBackend, TaskId, TaskRecord, TaskState};

fn url() -> String {
    std::env::var("STEM_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| String::from("redis://127.0.0.1:6379"))
}

/// Whether the test must not run: no Redis answers (a SKIP line is
/// written), or panics when `STEM_REQUIRE_SERVICES=1`.
fn no_server(test: &str) -> bool {
    let reachable = redis::Client::open(url())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
        .is_ok();
    if reachable {
        return false;
    }
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{test}: no Redis at {}, and STEM_REQUIRE_SERVICES=1 requires it",
        stem_core::url::redact(&url())
    );
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP redis {test}: no Redis at {} (start one, or set STEM_TEST_REDIS_URL)",
        stem_core::url::redact(&url())
    );
    true
}

/// Deletes a namespace's keys when dropped, so a failing test leaves
/// nothing behind either (test namespaces need no escaping).
struct DeleteOnDrop {
    url: String,
    namespace: String,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let Ok(mut c) = redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection())
        else {
            return;
        };
        for pattern in [
            format!("stem:{{{}}}*", self.namespace),
            format!("stem:{{{}:*", self.namespace),
        ] {
            let mut cursor = 0_u64;
            loop {
                let Ok((next, keys)) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query::<(u64, Vec<String>)>(&mut c)
                else {
                    break;
                };
                if !keys.is_empty() {
                    let _: redis::RedisResult<()> = redis::cmd("UNLINK").arg(&keys).query(&mut c);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
}

async fn connect(namespace: &str) -> RedisBackend {
    RedisBackend::connect(
        &url(),
        RedisOptions {
            namespace: namespace.to_owned(),
            ..RedisOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("Redis backend connects: {e}"))
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .unwrap_or_else(|e| panic!("Redis URL: {e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis connects: {e}"))
}

/// The subscriber connections of the server, with their subscription
/// counts, from `CLIENT LIST`.
async fn clients(con: &mut redis::aio::MultiplexedConnection) -> (usize, Vec<u64>) {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(con)
        .await
        .unwrap_or_else(|e| panic!("CLIENT LIST: {e}"));
    let subs = list
        .lines()
        .filter_map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("sub="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .filter(|n| *n > 0)
        .collect();
    (list.lines().count(), subs)
}

/// 10,000 concurrent waits on one client, one id each, all on one
/// subscriber connection; every one returns its record soon after the
/// records are stored.
#[test]
fn ten_thousand_waiters_share_one_connection() {
    const N: usize = 10_000;
    if no_server("ten_thousand_waiters_share_one_connection") {
        return;
    }
    stem_core::kit::run(async {
        let ns = format!(
            "kit_redis_waiters_{}",
            TaskId::new().to_string().replace('-', "")
        );
        let _cleanup = DeleteOnDrop {
            url: url(),
            namespace: ns.clone(),
        };
        let b = Arc::new(connect(&ns).await);
        let mut admin = raw().await;
        let (clients_before, _) = clients(&mut admin).await;
        let ids: Vec<TaskId> = (0..N).map(|_| TaskId::new()).collect();
        let started = Instant::now();
        let waits: Vec<_> = ids
            .iter()
            .map(|id| {
                let (b, id) = (b.clone(), *id);
                tokio::spawn(async move { b.wait(id, Duration::from_secs(40)).await })
            })
            .collect();
        // Until every channel is subscribed.
        let pattern = format!("stem:{{{ns}:r:*");
        loop {
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(&pattern)
                .query_async(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("PUBSUB CHANNELS: {e}"));
            if channels.len() == N {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "only {} of {N} channels subscribed after 20 s",
                channels.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let subscribed_after = started.elapsed();
        let (clients_during, subs) = clients(&mut admin).await;
        let ours: Vec<u64> = subs.iter().copied().filter(|n| *n >= N as u64).collect();
        assert_eq!(
            ours,
            [N as u64],
            "one connection carries every subscription (subscriber counts: {subs:?})"
        );

        let stored_at = Instant::now();
        let records: Vec<TaskRecord> = ids
            .iter()
            .map(|id| TaskRecord::new(*id, TaskState::Revoked))
            .collect();
        for r in b.store_many(records).await {
            assert!(r.expect("store_many"), "every record is written");
        }
        let stored = stored_at.elapsed();
        for (w, id) in waits.into_iter().zip(&ids) {
            let rec = w.await.expect("waiter").expect("wait");
            assert_eq!(
                rec.map(|r| (r.id, r.state.name())),
                Some((*id, "revoked")),
                "every wait returns its terminal record"
            );
        }
        let all_back = stored_at.elapsed();
        assert!(
            all_back < Duration::from_secs(5),
            "the waits took {all_back:?} to return after the store"
        );
        // The subscriptions are dropped once the waiters are gone.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(&pattern)
                .query_async(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("PUBSUB CHANNELS: {e}"));
            if channels.is_empty() {
                break;
            }
            assert!(
                Instant::now() < until,
                "{} channels still subscribed",
                channels.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "{N} waiters: all subscribed after {subscribed_after:?}; store_many of {N} took {stored:?}; \
             every wait returned {all_back:?} after the store began; server clients before {clients_before}, \
             while waiting {clients_during} (one subscriber connection with sub={N})"
        );
        b.cleanup_namespace(&ns).await.expect("cleanup");
    });
}

/// Client ids and subscription counts from `CLIENT LIST`.
async fn client_subs(con: &mut redis::aio::MultiplexedConnection) -> Vec<(u64, u64)> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(con)
        .await
        .unwrap_or_else(|e| panic!("CLIENT LIST: {e}"));
    list.lines()
        .filter_map(|l| {
            let field = |name: &str| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix(name))
                    .and_then(|n| n.parse::<u64>().ok())
            };
            Some((field("id=")?, field("sub=")?))
        })
        .collect()
}

/// A waiter whose subscriber connection is killed while a record turns
/// terminal (the message is lost with it) still returns the record, soon:
/// the connection comes back, resubscribes and every waiter reads again
/// (well before the 5 s safety re-check).
#[test]
fn a_waiter_survives_its_subscriber_connection_dying() {
    if no_server("a_waiter_survives_its_subscriber_connection_dying") {
        return;
    }
    stem_core::kit::run(async {
        let ns = format!(
            "kit_redis_resub_{}",
            TaskId::new().to_string().replace('-', "")
        );
        let _cleanup = DeleteOnDrop {
            url: url(),
            namespace: ns.clone(),
        };
        let b = Arc::new(connect(&ns).await);
        let writer = connect(&ns).await;
        let mut admin = raw().await;
        let before: Vec<u64> = client_subs(&mut admin)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let id = TaskId::new();
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move {
                let r = b.wait(id, Duration::from_secs(30)).await;
                (r, Instant::now())
            })
        };
        // Our subscriber: the new connection with one subscription.
        let started = Instant::now();
        let ours = loop {
            let new: Vec<u64> = client_subs(&mut admin)
                .await
                .into_iter()
                .filter(|(cid, sub)| !before.contains(cid) && *sub == 1)
                .map(|(cid, _)| cid)
                .collect();
            if let [one] = new.as_slice() {
                break *one;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no subscriber connection appeared: {new:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(ours)
            .query_async(&mut admin)
            .await
            .expect("CLIENT KILL");
        assert_eq!(killed, 1);
        let stored_at = Instant::now();
        assert!(
            writer
                .store(TaskRecord::new(id, TaskState::Revoked))
                .await
                .expect("store")
        );
        let (r, returned_at) = waiting.await.expect("waiter");
        assert_eq!(r.expect("wait").map(|r| r.state.name()), Some("revoked"));
        let took = returned_at - stored_at;
        assert!(
            took < Duration::from_secs(3),
            "the waiter took {took:?} to see the record after its connection was killed"
        );
        eprintln!("after the subscriber was killed, the waiter returned {took:?} after the store");
        b.cleanup_namespace(&ns).await.expect("cleanup");
    });
}
