//! The whole conformance kit against the Redis adapter in cluster mode
//! (`?cluster=true`), on a three-master Redis Cluster this test binary
//! starts itself on free loopback ports (`support/redis_cluster.rs`) and
//! shares between its cases. Every case connects as an ACL user of its
//! own, created on every node (ACLs are per node), so `disrupt` kills
//! exactly its connections on every node (`CLIENT KILL USER`).
//!
//! Cleanup checks the layout before deleting a case's keys: every key
//! carries a hash tag and, by `CLUSTER KEYSLOT`, all keys of one queue
//! (and of one record, one group, the namespace) map to one slot. A test of
//! its own publishes across many queues with unique keys, delays and dead
//! letters, checks the same on every key kind, that the queues spread over
//! the masters, and that a fetch blocked on queues of every master wakes
//! at a publish.
//!
//! Without `redis-server` and `redis-cli` on `PATH` every case prints one
//! `SKIP redis-cluster …` line and passes (and fails under
//! `STEM_REQUIRE_SERVICES=1`).
#![cfg(feature = "redis")]

#[path = "support/redis_cluster.rs"]
mod redis_cluster;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stem_adapters::redis::{RedisBackend, RedisBroker, RedisOptions};
use stem_core::clock::Clock;
use stem_core::kit::{AdapterFactory, KitOptions};
use stem_core::{Broker, Envelope, FetchRequest, ResultBackend};

/// The ACL user of a namespace: `kit_` and a hash, so any namespace text
/// makes a valid user name.
fn user_of(namespace: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("kit_{h:016x}")
}

/// The adapter's escaping of names in keys (`keys.rs`).
fn escape(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn ports() -> &'static [u16] {
    &redis_cluster::cluster().ports
}

/// An admin connection to every node.
async fn admins() -> Vec<redis::aio::MultiplexedConnection> {
    let mut out = Vec::new();
    for p in ports() {
        let c = redis::Client::open(format!("redis://127.0.0.1:{p}"))
            .unwrap_or_else(|e| panic!("node URL: {e}"))
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("node {p} reachable: {e}"));
        out.push(c);
    }
    out
}

/// The cluster URL of `user` (or the default user): the first master,
/// the others as seeds.
fn url(user: Option<&str>) -> String {
    let p = ports();
    let auth = user.map(|u| format!("{u}:kit@")).unwrap_or_default();
    let seeds: Vec<String> = p[1..].iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        "redis://{auth}127.0.0.1:{}?cluster=true&seeds={}",
        p[0],
        seeds.join(",")
    )
}

/// Every key of `namespace` on every node, with its node's index.
async fn keys_of(namespace: &str) -> Vec<(usize, String)> {
    let ns = escape(namespace);
    let patterns = [format!("stem:{{{ns}}}*"), format!("stem:{{{ns}:*")];
    let mut out = Vec::new();
    for (n, mut c) in admins().await.into_iter().enumerate() {
        for pattern in &patterns {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("SCAN: {e}"));
                out.extend(keys.into_iter().map(|k| (n, k)));
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
    out
}

/// Checks that every key of `namespace` has a hash tag and that all keys
/// sharing one (a queue's, a record's, a group's, the namespace's) map to
/// one slot by `CLUSTER KEYSLOT`, on the node that holds them. Returns the
/// slot of every tag.
async fn check_slots(namespace: &str) -> BTreeMap<String, (i64, usize)> {
    let mut admin = admins().await;
    let mut tags: BTreeMap<String, (i64, usize)> = BTreeMap::new();
    for (node, key) in keys_of(namespace).await {
        let tag = key
            .strip_prefix("stem:{")
            .and_then(|r| r.split_once('}'))
            .map(|(t, _)| t.to_owned())
            .unwrap_or_else(|| panic!("key `{key}` has no hash tag"));
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&key)
            .query_async(&mut admin[node])
            .await
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT: {e}"));
        let seen = *tags.entry(tag.clone()).or_insert((slot, node));
        assert_eq!(
            seen,
            (slot, node),
            "key `{key}` is in slot {slot} on node {node}, other keys of `{{{tag}}}` in slot {} on node {}",
            seen.0,
            seen.1
        );
    }
    tags
}

struct ClusterFactory;

impl ClusterFactory {
    fn options(opts: &KitOptions) -> RedisOptions {
        RedisOptions {
            namespace: opts.namespace.clone(),
            max_envelope_bytes: opts.max_envelope_bytes,
            dead_letter_retention: opts.dead_letter_retention,
            max_block: Duration::from_secs(1),
            ..RedisOptions::default()
        }
    }

    /// The case's URL: its own ACL user on every node, created on first use.
    async fn url(opts: &KitOptions) -> String {
        let user = user_of(&opts.namespace);
        for mut c in admins().await {
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
        }
        url(Some(&user))
    }

    async fn open(opts: &KitOptions, options: RedisOptions) -> RedisBroker {
        RedisBroker::connect(&Self::url(opts).await, options)
            .await
            .unwrap_or_else(|e| panic!("Redis Cluster connects: {e}"))
    }
}

#[async_trait::async_trait]
impl AdapterFactory for ClusterFactory {
    fn name(&self) -> &'static str {
        "redis-cluster"
    }

    /// Missing binaries skip; otherwise the cluster is started here (sync,
    /// before the case's runtime), and a cluster that does not come up
    /// fails the case.
    fn unavailable(&self) -> Option<String> {
        if let Some(why) = redis_cluster::missing() {
            return Some(why);
        }
        let _ = redis_cluster::cluster();
        None
    }

    async fn broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
        Arc::new(Self::open(opts, Self::options(opts)).await)
    }

    async fn backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        Arc::new(
            RedisBackend::connect(&Self::url(opts).await, Self::options(opts))
                .await
                .unwrap_or_else(|e| panic!("Redis Cluster backend connects: {e}")),
        )
    }

    async fn insert_garbage(&self, opts: &KitOptions, queue: &str, bytes: &[u8]) {
        Self::open(opts, Self::options(opts))
            .await
            .insert_raw(queue, bytes)
            .await
            .unwrap_or_else(|e| panic!("garbage inserted: {e}"));
    }

    async fn cleanup(&self, opts: &KitOptions) {
        check_slots(&opts.namespace).await;
        let b = Self::open(opts, Self::options(opts)).await;
        b.delete_namespace(&opts.namespace)
            .await
            .unwrap_or_else(|e| panic!("delete_namespace: {e}"));
        let left = keys_of(&opts.namespace).await;
        assert!(
            left.is_empty(),
            "keys left after delete_namespace: {left:?}"
        );
        for mut c in admins().await {
            let _: redis::RedisResult<()> = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(user_of(&opts.namespace))
                .query_async(&mut c)
                .await;
        }
    }

    /// Kills every connection of this case (its ACL user) on every node,
    /// the blocking ones included, and returns once every node answers.
    async fn disrupt(&self, opts: &KitOptions) -> Option<()> {
        for mut c in admins().await {
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
        }
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
        let mut c = admins().await.remove(0);
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
    use super::ClusterFactory;
    stem_core::conformance_tests!(redis_cluster, ClusterFactory);
}

/// Twelve queues, with plain, delayed, unique and dead-lettered envelopes:
/// each queue's keys (streams, lease sets, delayed set, timer, dead
/// letters, unique keys made inside the scripts) share one slot, the
/// queues spread over the masters, and a fetch blocked on all of them
/// wakes at once at a publish to any.
#[test]
fn queue_keys_share_a_slot_and_blocked_fetches_wake() {
    if stem_core::kit::server_missing(&ClusterFactory, "queue_keys_share_a_slot") {
        return;
    }
    stem_core::kit::run(async {
        let namespace = format!("slots_{}", std::process::id());
        let broker = RedisBroker::connect(
            &url(None),
            RedisOptions {
                namespace: namespace.clone(),
                max_block: Duration::from_secs(5),
                ..RedisOptions::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("connects: {e}"));
        let queues: Vec<String> = (0..12).map(|i| format!("q{i}")).collect();
        let mut batch = Vec::new();
        let now = chrono::Utc::now();
        for q in &queues {
            let plain = Envelope::new("t::plain", q.as_str(), serde_json::json!({})).unwrap();
            let mut delayed = plain.clone();
            delayed.id = stem_core::TaskId::new();
            delayed.not_before = Some(now + chrono::TimeDelta::seconds(60));
            let mut unique = plain.clone();
            unique.id = stem_core::TaskId::new();
            unique.unique = Some(stem_core::envelope::Unique {
                key: format!("u:{q}"),
                until: now + chrono::TimeDelta::seconds(60),
                release: stem_core::UniqueRelease::OnFinish,
            });
            batch.extend([plain, delayed, unique]);
        }
        let published = broker.publish_many(batch.clone()).await.unwrap();
        let ids: Vec<_> = batch.iter().map(|e| e.id).collect();
        let got: Vec<_> = published
            .iter()
            .map(|p| match p {
                stem_core::Published::Stored(id) => *id,
                other => panic!("not stored: {other:?}"),
            })
            .collect();
        assert_eq!(got, ids, "results in input order");
        // One delivery of each queue is dead-lettered.
        for q in &queues {
            let d = broker
                .fetch(&FetchRequest::new([q.as_str()], 1))
                .await
                .unwrap();
            let d = d.into_iter().next().expect("a delivery");
            broker
                .settle_one(stem_core::Settlement::new(
                    d.receipt,
                    stem_core::Disposition::DeadLetter {
                        reason: String::from("test"),
                        error: None,
                        charge: false,
                    },
                ))
                .await
                .unwrap();
        }
        // Drain what is ready (the unique envelopes stay leased).
        let ready = broker
            .fetch(&FetchRequest::new(queues.clone(), 100))
            .await
            .unwrap();
        assert_eq!(
            ready.len(),
            queues.len(),
            "one ready envelope left per queue"
        );

        let tags = check_slots(&namespace).await;
        let ns = escape(&namespace);
        let mut nodes = HashSet::new();
        for q in &queues {
            let (_, node) = tags
                .get(&format!("{ns}:q:{q}"))
                .unwrap_or_else(|| panic!("no keys of queue {q}: {tags:?}"));
            nodes.insert(*node);
        }
        assert!(
            nodes.len() >= 2,
            "twelve queues on one master of three: {tags:?}"
        );
        let kinds = keys_of(&namespace).await;
        for kind in [":p0", ":l0", ":delayed", ":dead", ":u:"] {
            assert!(
                kinds.iter().any(|(_, k)| k.contains(kind)),
                "no `{kind}` key among {kinds:?}"
            );
        }

        // A fetch blocked on every queue (reads on every master) wakes at
        // a publish to the last queue well before its wait ends.
        let waiter = {
            let queues = queues.clone();
            let url = url(None);
            let namespace = namespace.clone();
            tokio::spawn(async move {
                let b = RedisBroker::connect(
                    &url,
                    RedisOptions {
                        namespace,
                        max_block: Duration::from_secs(5),
                        ..RedisOptions::default()
                    },
                )
                .await
                .unwrap();
                let start = Instant::now();
                let got = b
                    .fetch(&FetchRequest::new(queues, 10).wait(Duration::from_secs(20)))
                    .await
                    .unwrap();
                (got.len(), start.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let last = queues.last().unwrap().as_str();
        broker
            .publish(Envelope::new("t::wake", last, serde_json::json!({})).unwrap())
            .await
            .unwrap();
        let (n, took) = waiter.await.unwrap();
        assert_eq!(n, 1);
        assert!(took < Duration::from_secs(4), "woke after {took:?}");

        broker.delete_namespace(&namespace).await.unwrap();
        assert!(keys_of(&namespace).await.is_empty());
    });
}
