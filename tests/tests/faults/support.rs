//! What the fault scenarios share: worker processes, the Redis server
//! check and cleanup, a seeded random source, and printing past libtest's
//! capture.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use stem::adapters::redis::{RedisBroker, RedisOptions};
use stem_tests::ledger::LEDGER_VAR;
use stem_tests::process::Proc;

/// The queue of [`stem_tests::e2e_tasks::ledger_fault`].
pub(crate) const QUEUE: &str = "faults";

/// Prints a line the reader sees even when libtest captures output.
pub(crate) fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Where the workers of one scenario connect.
pub(crate) struct Target {
    /// The broker URL (the result backend is the same adapter).
    pub url: String,
    /// The namespace, for the client and `STEM_NAMESPACE`.
    pub namespace: String,
}

/// Starts an `e2e-worker` on `target`'s fault queue, recording runs in
/// `ledger`, with `lease` and `concurrency`; killed (SIGKILL) when dropped.
pub(crate) fn spawn_worker(
    target: &Target,
    ledger: &Path,
    lease: &str,
    concurrency: usize,
) -> Proc {
    spawn_worker_with(target, ledger, lease, concurrency, &[], Stdio::null())
}

/// [`spawn_worker`] with more `STEM_*` variables (`extra`, set last) and
/// the worker's stdout (its `report ...` line) sent to `stdout`.
pub(crate) fn spawn_worker_with(
    target: &Target,
    ledger: &Path,
    lease: &str,
    concurrency: usize,
    extra: &[(&str, &str)],
    stdout: Stdio,
) -> Proc {
    let child = worker_command(target, ledger, lease, concurrency, extra)
        .stdout(stdout)
        .spawn()
        .expect("worker starts");
    Proc(child)
}

/// [`spawn_worker_with`], its stdout in the file `report` and its log
/// (`RUST_LOG=warn`, unless `extra` sets another) in the file `log`.
pub(crate) fn spawn_worker_logged(
    target: &Target,
    ledger: &Path,
    lease: &str,
    concurrency: usize,
    extra: &[(&str, &str)],
    (report, log): (&Path, &Path),
) -> Proc {
    let file = |p: &Path| Stdio::from(std::fs::File::create(p).expect("worker output file"));
    let mut cmd = worker_command(target, ledger, lease, concurrency, &[]);
    let child = cmd
        .env("RUST_LOG", "warn")
        .envs(extra.iter().copied())
        .stdout(file(report))
        .stderr(file(log))
        .spawn()
        .expect("worker starts");
    Proc(child)
}

/// The `e2e-worker` command of [`spawn_worker_with`], stdout not set.
fn worker_command(
    target: &Target,
    ledger: &Path,
    lease: &str,
    concurrency: usize,
    extra: &[(&str, &str)],
) -> Command {
    let id = format!("faults-{}", stem::TaskId::new().as_uuid().simple());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-worker"));
    cmd.env("STEM_BROKER_URL", &target.url)
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env("STEM_NAMESPACE", &target.namespace)
        .env(LEDGER_VAR, ledger)
        .env("STEM_LEASE", lease)
        .env("STEM_WORKER_ID", id)
        .env("STEM_QUEUES", QUEUE)
        .env("STEM_CONCURRENCY", concurrency.to_string())
        .env("STEM_POLL_INTERVAL", "50ms")
        .env("STEM_SHUTDOWN_GRACE", "5s")
        .envs(extra.iter().copied())
        .stdin(Stdio::null());
    cmd
}

/// Three tests, `$sqlite`, `$postgres` and `$redis`, each calling
/// `$run(test_name, &Target, ledger_dir).await` on its adapter: SQLite in
/// a temporary file, Postgres in a fresh schema and Redis in a fresh
/// namespace (both named from `$prefix`, and dropped when the test ends,
/// pass or fail), skipped when the server is not there.
macro_rules! adapter_tests {
    ($sqlite:ident, $postgres:ident, $redis:ident, $prefix:literal, $run:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let dir = $crate::support::temp_dir("sqlite");
            let target = $crate::support::Target {
                url: format!("sqlite://{}", dir.path().join("stem.db").display()),
                namespace: String::from("stem"),
            };
            $run(stringify!($sqlite), &target, dir.path()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            if !stem_tests::postgres::server_up(stringify!($postgres)) {
                return;
            }
            let ns = stem_tests::postgres::namespace($prefix);
            let _drop_schema = stem_tests::postgres::DropSchema {
                namespace: ns.clone(),
            };
            let dir = $crate::support::temp_dir("postgres");
            let target = $crate::support::Target {
                url: stem_tests::postgres::url_with(&format!("namespace={ns}")),
                namespace: ns,
            };
            $run(stringify!($postgres), &target, dir.path()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            if !$crate::support::redis_up(stringify!($redis)) {
                return;
            }
            let ns = stem_tests::postgres::namespace($prefix);
            let _delete = $crate::support::DeleteRedisNamespace {
                namespace: ns.clone(),
            };
            let dir = $crate::support::temp_dir("redis");
            let target = $crate::support::Target {
                url: $crate::support::redis_url(),
                namespace: ns,
            };
            $run(stringify!($redis), &target, dir.path()).await;
        }
    };
}
pub(crate) use adapter_tests;

/// A temporary directory for one test's ledger and files.
pub(crate) fn temp_dir(adapter: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("stem-faults-{adapter}-"))
        .tempdir()
        .expect("temp dir")
}

/// Sends `sig` (`-STOP`, `-CONT`, `-TERM`) to `proc` with `kill`.
pub(crate) fn signal(proc: &Proc, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &proc.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} {} failed", proc.pid());
}

/// Waits up to `limit` for `proc` to exit; its status, if it did.
pub(crate) async fn wait_exit(
    proc: &mut Proc,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = proc.0.try_wait().expect("wait") {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small seeded generator (xorshift64*): no dependency, and the seed is
/// printed so a failing run can be read against its schedule.
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded from a fresh random task id.
    pub(crate) fn new() -> Self {
        let bytes = stem::TaskId::new().as_uuid().as_u128();
        #[allow(clippy::cast_possible_truncation)]
        let seed = (bytes ^ (bytes >> 64)) as u64 | 1;
        Self(seed)
    }

    /// The seed (print it).
    pub(crate) fn seed(&self) -> u64 {
        self.0
    }

    /// A number in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        lo + x.wrapping_mul(0x2545_F491_4F6C_DD1D) % (hi - lo + 1)
    }
}

/// The Redis named by `STEM_TEST_REDIS_URL` (default
/// `redis://127.0.0.1:6379`).
pub(crate) fn redis_url() -> String {
    std::env::var("STEM_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| String::from("redis://127.0.0.1:6379"))
}

/// Whether the Redis accepts TCP connections. When it does not, prints one
/// SKIP line naming `test` and returns false, or fails under
/// `STEM_REQUIRE_SERVICES=1`.
pub(crate) fn redis_up(test: &str) -> bool {
    let hp = redis_url()
        .split_once("://")
        .map(|(_, r)| {
            let authority = r.split(['/', '?']).next().unwrap_or("");
            let h = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if h.contains(':') {
                h.to_owned()
            } else {
                format!("{h}:6379")
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
    let msg = format!("SKIP {test}: no Redis at {hp} (start one, or set STEM_TEST_REDIS_URL)");
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{msg}, and STEM_REQUIRE_SERVICES=1 requires it"
    );
    say(&msg);
    false
}

/// Deletes a Redis namespace's keys when dropped, so a failing test leaves
/// nothing behind either (on a thread of its own: a drop cannot await).
/// Declare it before the worker processes, so they are killed first.
pub(crate) struct DeleteRedisNamespace {
    /// The namespace whose keys go.
    pub namespace: String,
}

impl Drop for DeleteRedisNamespace {
    fn drop(&mut self) {
        let ns = self.namespace.clone();
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let b = RedisBroker::connect(&redis_url(), RedisOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                b.delete_namespace(&ns).await.map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(e)) = deleted {
            say(&format!(
                "could not delete the Redis namespace {}: {e}",
                self.namespace
            ));
        }
    }
}
