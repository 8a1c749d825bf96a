//! `Worker::builder()` reads the `STEM_*` variables, explicit builder calls
//! win over them, and a bad value is a typed `ConfigError` naming the
//! variable, flag or builder method that set it, on the real worker loop.
//!
//! A test cannot set variables in its own process without racing the
//! other tests of the binary, so each environment case re-runs this test
//! binary as a child process with the variables set, running only
//! [`env_child`], which reads the case to check from `STEM_TEST_ENV_CASE`.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stem::worker::{Worker, WorkerArgs, WorkerError};
use stem::{ConfigError, Context};
use stem_tests::isolated_client;

const CASE_VAR: &str = "STEM_TEST_ENV_CASE";

static RUNNING: AtomicUsize = AtomicUsize::new(0);
static MOST_AT_ONCE: AtomicUsize = AtomicUsize::new(0);

/// Holds a slot for `millis`, recording how many ran at once; returns the
/// id of the worker that ran it.
#[stem::task(queue = "env_queue")]
async fn held(ctx: Context, millis: u64) -> String {
    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    MOST_AT_ONCE.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(millis)).await;
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    ctx.worker_id().to_owned()
}

/// Runs [`env_child`] in a child process with `vars` set (and every other
/// `STEM_*` worker variable removed) and asserts it passed.
fn run_child(case: &str, vars: &[(&str, &str)]) {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args([
        "--exact",
        "env_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (key, _) in std::env::vars() {
        if key.starts_with("STEM_") {
            cmd.env_remove(key);
        }
    }
    cmd.env(CASE_VAR, case);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child case `{case}` failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn worker_builder_reads_stem_env_vars() {
    run_child(
        "reads_env",
        &[
            ("STEM_CONCURRENCY", "2"),
            ("STEM_PREFETCH", "3"),
            ("STEM_WORKER_ID", "from-env-7"),
            ("STEM_QUEUES", "env_queue"),
            ("STEM_LEASE", "2s"),
            ("STEM_POLL_INTERVAL", "50ms"),
            ("STEM_HEARTBEAT_INTERVAL", "300ms"),
            ("STEM_SHUTDOWN_GRACE", "3s"),
        ],
    );
}

#[test]
fn worker_builder_calls_win_over_stem_env_vars() {
    run_child(
        "builder_wins",
        &[
            ("STEM_CONCURRENCY", "2"),
            ("STEM_PREFETCH", "3"),
            ("STEM_WORKER_ID", "from-env"),
            ("STEM_LEASE", "2s"),
        ],
    );
}

#[test]
fn worker_builder_rejects_stem_concurrency_zero() {
    run_child("concurrency_zero", &[("STEM_CONCURRENCY", "0")]);
}

#[test]
fn worker_builder_calls_are_checked_as_config_errors() {
    run_child("builder_checked", &[]);
}

#[test]
fn worker_builder_rejects_unparsable_stem_env_vars() {
    run_child(
        "unparsable",
        &[("STEM_PREFETCH", "lots"), ("STEM_LEASE", "soon")],
    );
}

/// Flags go through the same checks: a typed `ConfigError` naming the flag.
#[tokio::test]
async fn worker_flags_are_checked_as_config_errors() {
    for (flag, value) in [
        ("--concurrency", "0"),
        ("--concurrency", "two"),
        ("--prefetch", "-1"),
        ("--lease", "soon"),
        ("--lease", "10ms"),
        ("--poll-interval", "0s"),
    ] {
        let args = one_flag(flag, value);
        match stem::worker::builder_from_args(&args).await {
            Err(WorkerError::Config(ConfigError::BadValue { key, .. })) => {
                assert_eq!(key, flag, "{flag} {value}");
            }
            Err(other) => panic!("{flag} {value}: expected a BadValue, got {other:?}"),
            Ok(_) => panic!("{flag} {value}: accepted"),
        }
    }
}

/// The parsed flags of `stem-worker FLAG VALUE`.
fn one_flag(flag: &str, value: &str) -> WorkerArgs {
    let mut args = WorkerArgs {
        broker_url: None,
        result_backend_url: None,
        namespace: None,
        queues: Vec::new(),
        concurrency: None,
        prefetch: None,
        shutdown_grace: None,
        lease: None,
        poll_interval: None,
        heartbeat_interval: None,
        worker_id: None,
        unknown_task_grace: None,
        long_task_warning: None,
        events: false,
    };
    let slot = match flag {
        "--concurrency" => &mut args.concurrency,
        "--prefetch" => &mut args.prefetch,
        "--lease" => &mut args.lease,
        "--poll-interval" => &mut args.poll_interval,
        other => panic!("no such flag in this test: {other}"),
    };
    *slot = Some(value.to_owned());
    args
}

fn bad_value_key(err: &WorkerError) -> &str {
    match err {
        WorkerError::Config(ConfigError::BadValue { key, .. }) => key,
        other => panic!("expected a BadValue, got {other:?}"),
    }
}

#[test]
#[ignore = "run in a child process by the tests above, with STEM_* variables set"]
fn env_child() {
    let case = std::env::var(CASE_VAR).expect("run by the parent tests");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let stem = isolated_client("worker_env").await;
        match case.as_str() {
            "reads_env" => {
                let worker = Worker::builder().client(&stem).build().await.unwrap();
                let c = worker.config();
                assert_eq!(c.concurrency, 2);
                assert_eq!(c.prefetch, 3);
                assert_eq!(c.worker_id, "from-env-7");
                assert_eq!(c.queues, ["env_queue"]);
                assert_eq!(c.lease, Duration::from_secs(2));
                assert_eq!(c.poll_interval, Duration::from_millis(50));
                assert_eq!(c.heartbeat_interval, Duration::from_millis(300));
                assert_eq!(c.shutdown_grace, Duration::from_secs(3));
                // The running loop uses them: two at a time, under that id.
                let worker = worker.start();
                let handles = held::with()
                    .on(&stem)
                    .enqueue_many((0..6).map(|_| held::Args { millis: 150 }))
                    .await
                    .unwrap();
                for h in handles {
                    assert_eq!(h.wait(Duration::from_secs(10)).await.unwrap(), "from-env-7");
                }
                assert_eq!(MOST_AT_ONCE.load(Ordering::SeqCst), 2);
                worker.shutdown();
                assert_eq!(worker.join().await.succeeded, 6);
            }
            "builder_wins" => {
                let worker = Worker::builder()
                    .client(&stem)
                    .concurrency(5)
                    .worker_id("from-builder")
                    .build()
                    .await
                    .unwrap();
                let c = worker.config();
                // The builder's concurrency wins, and the prefetch follows it.
                assert_eq!((c.concurrency, c.prefetch), (5, 20));
                assert_eq!(c.worker_id, "from-builder");
                // What the builder did not set still comes from the variables.
                assert_eq!(c.lease, Duration::from_secs(2));
            }
            "concurrency_zero" => {
                let err = Worker::builder().client(&stem).build().await.unwrap_err();
                assert_eq!(bad_value_key(&err), "STEM_CONCURRENCY");
                // A variable that is set is checked even when a call
                // overrides it: a typo in the environment is not ignored.
                let err = Worker::builder()
                    .client(&stem)
                    .concurrency(4)
                    .build()
                    .await
                    .unwrap_err();
                assert_eq!(bad_value_key(&err), "STEM_CONCURRENCY");
            }
            "builder_checked" => {
                for (builder, key) in [
                    (
                        Worker::builder().concurrency(0),
                        "WorkerBuilder::concurrency",
                    ),
                    (Worker::builder().prefetch(0), "WorkerBuilder::prefetch"),
                    (
                        Worker::builder().lease(Duration::from_millis(5)),
                        "WorkerBuilder::lease",
                    ),
                    (
                        Worker::builder().queues(["bad queue"]),
                        "WorkerBuilder::queues",
                    ),
                    (Worker::builder().worker_id(" "), "WorkerBuilder::worker_id"),
                    (
                        Worker::builder().concurrency(8).prefetch(4),
                        "WorkerBuilder::prefetch",
                    ),
                ] {
                    let err = builder.client(&stem).build().await.unwrap_err();
                    assert_eq!(bad_value_key(&err), key);
                }
            }
            "unparsable" => {
                let err = Worker::builder().client(&stem).build().await.unwrap_err();
                assert_eq!(bad_value_key(&err), "STEM_PREFETCH");
                let msg = format!("{err:?}");
                assert!(msg.contains("`lots`"), "{msg}");
            }
            other => panic!("unknown case {other}"),
        }
    });
}
