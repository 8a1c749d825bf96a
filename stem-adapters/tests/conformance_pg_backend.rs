//! The result-backend half of the conformance kit (R1..R7, the decided
//! `create_group` rule and the raced chord) against the Postgres backend,
//! on the server at `STEM_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Every case gets its own
//! schema (its namespace's, see `schema_name`), dropped at the end. The
//! broker the factory must offer is an in-memory one: no case here uses
//! it. Without a reachable server every case prints a SKIP line (and
//! fails under `STEM_REQUIRE_SERVICES=1`).
//!
//! Beside the kit: the SQL form of the R1 rule checked against
//! `TaskRecord::may_replace` on every pair of states and attempts, batches
//! with repeated ids, and a thousand waiters released by one `store_many`
//! over one `LISTEN` connection.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use stem_adapters::postgres::sqlx;
use stem_adapters::postgres::{PostgresBackend, PostgresOptions, schema_name};
use stem_core::backend::{FailureKind, TaskFailure};
use stem_core::kit::{AdapterFactory, KitOptions};
use stem_core::memory::{InMemoryBroker, MemoryOptions};
use stem_core::{BackendError, Broker, ResultBackend, TaskId, TaskRecord, TaskState};

#[path = "support/postgres.rs"]
mod pg;
use pg::{admin, server_url};

/// The `application_name` of a namespace's clients: `stem-kit:` and a
/// hash, so `pg_stat_activity` shows exactly one case's connections.
fn app_name(namespace: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("stem-kit:{h:016x}")
}

fn options(namespace: &str) -> PostgresOptions {
    PostgresOptions {
        namespace: namespace.to_owned(),
        application_name: Some(app_name(namespace)),
        ..PostgresOptions::default()
    }
}

async fn connect(opts: PostgresOptions) -> PostgresBackend {
    PostgresBackend::connect(&server_url(), opts)
        .await
        .unwrap_or_else(|e| panic!("Postgres backend connects: {e}"))
}

async fn drop_schema(namespace: &str) {
    let mut c = admin().await;
    let sql = format!(
        "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
        schema_name(namespace)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("schema dropped: {e}"));
}

/// The Postgres backend, beside an in-memory broker.
pub struct PgBackendFactory;

impl PgBackendFactory {
    fn memory(opts: &KitOptions) -> InMemoryBroker {
        let options = MemoryOptions {
            max_envelope_bytes: opts.max_envelope_bytes,
            dead_letter_retention: opts.dead_letter_retention,
        };
        InMemoryBroker::shared("kit-pg-backend", &opts.namespace, options)
    }
}

#[async_trait::async_trait]
impl AdapterFactory for PgBackendFactory {
    fn name(&self) -> &'static str {
        "postgres_backend"
    }

    fn unavailable(&self) -> Option<String> {
        pg::unavailable()
    }

    async fn broker(&self, opts: &KitOptions) -> Arc<dyn Broker> {
        Arc::new(Self::memory(opts))
    }

    async fn backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        Arc::new(connect(options(&opts.namespace)).await)
    }

    /// A client as another process has it: a pool of its own, given to
    /// `from_pool`.
    async fn peer_backend(&self, opts: &KitOptions) -> Arc<dyn ResultBackend> {
        let url = format!(
            "{}?application_name={}",
            server_url(),
            app_name(&opts.namespace)
        );
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("peer pool connects: {e}"));
        Arc::new(
            PostgresBackend::from_pool(pool, options(&opts.namespace))
                .await
                .unwrap_or_else(|e| panic!("peer backend opens: {e}")),
        )
    }

    async fn insert_garbage(&self, opts: &KitOptions, queue: &str, bytes: &[u8]) {
        Self::memory(opts).insert_raw(queue, bytes);
    }

    async fn cleanup(&self, opts: &KitOptions) {
        stem_core::memory::forget_shared("kit-pg-backend", &opts.namespace);
        drop_schema(&opts.namespace).await;
    }

    fn tick(&self) -> Duration {
        Duration::from_millis(100)
    }
}

/// The backend's cases of the kit.
mod backend_kit {
    use super::PgBackendFactory;

    macro_rules! backend_cases {
        ($($module:ident :: $case:ident),* $(,)?) => {$(
            #[test]
            fn $case() {
                if stem_core::kit::server_missing(&PgBackendFactory, stringify!($case)) {
                    return;
                }
                stem_core::kit::run(async { stem_core::kit::$module::$case(&PgBackendFactory).await });
            }
        )*};
    }

    backend_cases!(
        backend::r1_states,
        backend::r2_wait,
        backend::r3_expiry,
        backend::r3_maintain_keeps_live_data,
        backend::r4_groups,
        decided::r4_create_group_keeps_existing,
        backend::r5_chords,
        backend::r5_chord_waits_for_terminal_members,
        backend::r6_heartbeats,
        backend::r7_revocation,
        backend::r8_forget,
        races::r5_race_chord_finishers,
    );
}

/// Runs `body` on a fresh namespace, dropping its schema afterwards
/// (also when the body fails).
fn with_namespace<F, Fut>(case: &str, body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if stem_core::kit::server_missing(&PgBackendFactory, case) {
        return;
    }
    let ns = KitOptions::new("postgres_backend", case).namespace;
    stem_core::kit::run(async {
        let outcome =
            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(body(ns.clone()))).await;
        drop_schema(&ns).await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    });
}

fn states() -> Vec<TaskState> {
    let error = TaskFailure {
        message: String::from("boom"),
        type_name: String::from("kit::KitError"),
        kind: FailureKind::Error,
    };
    vec![
        TaskState::Pending,
        TaskState::Started,
        TaskState::Retrying {
            next_at: chrono::Utc::now(),
            error: error.clone(),
        },
        TaskState::Succeeded {
            result: serde_json::value::to_raw_value(&7).unwrap_or_else(|e| panic!("{e}")),
        },
        TaskState::Failed { error },
        TaskState::Revoked,
    ]
}

fn rec(id: TaskId, state: TaskState, attempts: u32) -> TaskRecord {
    let mut r = TaskRecord::new(id, state);
    r.attempts = attempts;
    r
}

/// The SQL rule of the upsert is `TaskRecord::may_replace`: every pair of
/// (state, attempts) as old and new record, 324 pairs, answered by the
/// server exactly as the Rust rule answers, and the row left holding the
/// record the rule says.
#[test]
fn sql_rule_equals_may_replace() {
    with_namespace("rule", |ns| async move {
        let b = connect(options(&ns)).await;
        let mut pairs = Vec::new();
        for old_state in states() {
            for old_attempts in 0..3 {
                for new_state in states() {
                    for new_attempts in 0..3 {
                        let id = TaskId::new();
                        pairs.push((
                            rec(id, old_state.clone(), old_attempts),
                            rec(id, new_state.clone(), new_attempts),
                        ));
                    }
                }
            }
        }
        assert_eq!(pairs.len(), 324);
        let first = b
            .store_many(pairs.iter().map(|(old, _)| old.clone()).collect())
            .await;
        assert!(
            first.iter().all(|r| matches!(r, Ok(true))),
            "a fresh id is always written: {first:?}"
        );
        let second = b
            .store_many(pairs.iter().map(|(_, new)| new.clone()).collect())
            .await;
        let mut disagree = Vec::new();
        for ((old, new), got) in pairs.iter().zip(second) {
            let got = got.unwrap_or_else(|e| panic!("store_many: {e}"));
            let want = new.may_replace(old);
            let stored = b
                .get(old.id)
                .await
                .unwrap_or_else(|e| panic!("get: {e}"))
                .unwrap_or_else(|| panic!("the record of {} is gone", old.id));
            let expect = if want { new } else { old };
            let held = (stored.state.name(), stored.attempts);
            if got != want || held != (expect.state.name(), expect.attempts) {
                disagree.push(format!(
                    "old {}/{} new {}/{}: SQL {got}, may_replace {want}, row holds {held:?}",
                    old.state.name(),
                    old.attempts,
                    new.state.name(),
                    new.attempts
                ));
            }
        }
        assert!(disagree.is_empty(), "the SQL rule differs: {disagree:#?}");
        // The single-record statement answers the same.
        for (old, new) in pairs.iter().step_by(7) {
            let id = TaskId::new();
            let mut o = old.clone();
            o.id = id;
            let mut n = new.clone();
            n.id = id;
            assert!(b.store(o.clone()).await.unwrap_or_else(|e| panic!("{e}")));
            assert_eq!(
                b.store(n.clone()).await.unwrap_or_else(|e| panic!("{e}")),
                n.may_replace(&o),
                "store: old {}/{} new {}/{}",
                o.state.name(),
                o.attempts,
                n.state.name(),
                n.attempts
            );
        }
    });
}

/// A batch that names one id several times is applied in order; a record
/// that cannot be stored answers for itself and the rest are written.
#[test]
fn store_many_applies_repeats_in_order() {
    with_namespace("repeats", |ns| async move {
        let b = connect(options(&ns)).await;
        let (a, c) = (TaskId::new(), TaskId::new());
        let mut nul = rec(TaskId::new(), TaskState::Started, 1);
        nul.name = Some(String::from("nul\0name"));
        let answers = b
            .store_many(vec![
                rec(a, TaskState::Started, 1),
                rec(a, TaskState::Pending, 0),
                rec(c, TaskState::Revoked, 0),
                rec(a, TaskState::Started, 2),
                nul,
                rec(a, TaskState::Revoked, 2),
                rec(c, TaskState::Started, 1),
                rec(a, TaskState::Started, 3),
            ])
            .await;
        let shown: Vec<String> = answers
            .iter()
            .map(|r| match r {
                Ok(w) => w.to_string(),
                Err(BackendError::Invalid(_)) => String::from("invalid"),
                Err(e) => format!("error: {e}"),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "true", "false", "true", "true", "invalid", "true", "false", "false"
            ]
        );
        let got = b.get(a).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            got.map(|r| (r.state.name(), r.attempts)),
            Some(("revoked", 2))
        );
        assert!(b.store_many(Vec::new()).await.is_empty());
    });
}

/// A thousand `wait`s on one client, released by one `store_many` of their
/// terminal records: all return within a few seconds, by notification (the
/// fallback re-read is a minute away), over one `LISTEN` connection.
#[test]
fn thousand_waiters_released_by_one_store_many() {
    with_namespace("waiters", |ns| async move {
        let opts = PostgresOptions {
            poll_interval: Duration::from_secs(60),
            ..options(&ns)
        };
        let b = Arc::new(connect(opts.clone()).await);
        let writer = connect(opts).await;
        let ids: Vec<TaskId> = (0..1000).map(|_| TaskId::new()).collect();
        let waiters: Vec<_> = ids
            .iter()
            .map(|id| {
                let (b, id) = (b.clone(), *id);
                tokio::spawn(async move { b.wait(id, Duration::from_secs(50)).await })
            })
            .collect();
        // Every waiter has read its (missing) record and sleeps.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "a waiter returned before any record was stored"
        );
        let started = Instant::now();
        let stored = writer
            .store_many(
                ids.iter()
                    .map(|id| {
                        rec(
                            *id,
                            TaskState::Succeeded {
                                result: serde_json::value::to_raw_value("done")
                                    .unwrap_or_else(|e| panic!("{e}")),
                            },
                            1,
                        )
                    })
                    .collect(),
            )
            .await;
        assert!(stored.iter().all(|r| matches!(r, Ok(true))));
        let mut slowest = Duration::ZERO;
        for (w, id) in waiters.into_iter().zip(&ids) {
            let got = w
                .await
                .unwrap_or_else(|e| panic!("waiter: {e}"))
                .unwrap_or_else(|e| panic!("wait: {e}"));
            assert_eq!(
                got.map(|r| (r.id, r.state.name())),
                Some((*id, "succeeded")),
                "every waiter sees its terminal record"
            );
            slowest = slowest.max(started.elapsed());
        }
        eprintln!("1,000 waiters: the last returned {slowest:?} after the store_many began");
        assert!(
            slowest < Duration::from_secs(5),
            "the last waiter returned {slowest:?} after the store"
        );
        let mut c = admin().await;
        let (listening, total): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE query ILIKE 'LISTEN%'), count(*) \
             FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(app_name(&ns))
        .fetch_one(&mut c)
        .await
        .unwrap_or_else(|e| panic!("pg_stat_activity: {e}"));
        assert_eq!(listening, 1, "one LISTEN connection for 1,000 waiters");
        assert!(
            total <= 2 * 8 + 1,
            "{total} connections for two clients of 8 and one listener"
        );
    });
}

/// An expired record blocks no write even before `maintain` deleted its
/// row (the kit's R3 case runs `maintain` first), and an expired group is
/// replaced by a new one of the same id, while a live one is kept.
#[test]
fn expired_rows_block_nothing_before_maintain() {
    with_namespace("expired", |ns| async move {
        let b = connect(options(&ns)).await;
        let id = TaskId::new();
        let mut done = rec(id, TaskState::Revoked, 3);
        done.ttl = Duration::from_secs(1);
        assert!(b.store(done).await.unwrap_or_else(|e| panic!("{e}")));
        assert!(
            !b.store(rec(id, TaskState::Started, 4))
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            "a live terminal record blocks"
        );
        let group = TaskId::new();
        let first = vec![TaskId::new()];
        b.create_group(stem_core::backend::GroupSpec {
            id: group,
            members: first.clone(),
            callback: None,
            ttl: Duration::from_secs(1),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert!(b.get(id).await.unwrap_or_else(|e| panic!("{e}")).is_none());
        assert!(
            b.store(rec(id, TaskState::Pending, 0))
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            "an expired record (row still there) blocked a write"
        );
        assert_eq!(
            b.get(id)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|r| r.state.name()),
            Some("pending")
        );
        assert!(
            b.group(group)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none()
        );
        let second = vec![TaskId::new(), TaskId::new()];
        b.create_group(stem_core::backend::GroupSpec {
            id: group,
            members: second.clone(),
            callback: None,
            ttl: Duration::from_secs(3600),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let status = b
            .group(group)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("the new group exists"));
        assert_eq!(
            status.members.iter().map(|(m, _)| *m).collect::<Vec<_>>(),
            second,
            "an expired group is replaced"
        );
        // An empty group exists, is complete, and its chord fires once.
        let empty = TaskId::new();
        let callback = stem_core::Envelope::new("kit::callback", "chords", 1)
            .unwrap_or_else(|e| panic!("{e}"));
        b.create_group(stem_core::backend::GroupSpec {
            id: empty,
            members: Vec::new(),
            callback: Some(callback.clone()),
            ttl: Duration::from_secs(3600),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let status = b
            .group(empty)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("the empty group exists"));
        assert!(status.members.is_empty() && status.complete);
        let fired = b
            .member_finished(empty)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fired.map(|e| e.id), Some(callback.id));
        assert!(
            b.member_finished(empty)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none()
        );
    });
}
