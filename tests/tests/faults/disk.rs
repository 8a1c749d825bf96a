//! Scenario 11, disk full (SQLite): the database lives on a 4 MiB tmpfs
//! mounted for the test (unmounted when it ends, however it ends). A
//! worker process (4 slots, lease 2 s) takes eight 1.5-second tasks; then a
//! filler file takes every free byte, and the test publishes until the
//! broker refuses, then a few more; after a while the filler is deleted
//! and the test publishes again.
//!
//! Pass: a publish on the full disk fails with `BrokerError::Unavailable`
//! whose message says the disk is full, and what failed is never stored
//! (it never runs); the worker stays up throughout; once the filler is
//! gone publishes succeed, and every task that was accepted (before, while
//! and after the disk was full) ends `Succeeded` with its key. A task ran
//! twice only when a run of it finished while the disk was full (its
//! acknowledgement could not be written, so it was delivered again after
//! its lease). The worker exits cleanly on SIGTERM.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stem::{BrokerError, StemError, TaskHandle};
use stem_tests::e2e_tasks::ledger_fault;
use stem_tests::ledger::{self, LEDGER_VAR, unix_ms};
use stem_tests::process::Proc;

use crate::support::{QUEUE, say};

/// The tmpfs's size.
const SIZE: &str = "4m";
/// Tasks the worker holds when the disk fills.
const HELD: usize = 8;
/// Their run time.
const HELD_MS: u64 = 1_500;
/// Publishes tried on the full disk before giving up on seeing one fail.
const MAX_TRIES: usize = 5_000;
/// Publishes tried after the first refusal (each must fail too).
const MORE_TRIES: usize = 5;
/// How long the disk stays full after the first refusal.
const FULL_FOR: Duration = Duration::from_millis(2_500);
/// Tasks published after the space came back.
const AFTER: usize = 5;
/// A run that finished this long after the disk was freed may still have
/// had its acknowledgement refused (the worker's settle retries take 0.7 s).
const ACK_SLACK_MS: u64 = 1_500;

/// A tmpfs mounted on a directory, unmounted when dropped (lazily when a
/// process still holds a file there).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `dir`.
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if out.status.success() {
            Ok(Self {
                dir: dir.to_path_buf(),
            })
        } else {
            Err(format!(
                "mount -t tmpfs: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = |args: &[&str]| {
            Command::new("umount")
                .args(args)
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&[]) && !ok(&["-l"]) {
            say(&format!("could not unmount {}", self.dir.display()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_full() {
    let test = "sqlite_disk_full";
    let dir = tempfile::Builder::new()
        .prefix("stem-faults-disk-")
        .tempdir()
        .expect("temp dir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mount point");
    let mount = match Tmpfs::mount(&mnt, SIZE) {
        Ok(m) => m,
        Err(e) => {
            let msg = format!("SKIP {test}: cannot mount a tmpfs (needs root): {e}");
            assert!(
                std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{msg}, and STEM_REQUIRE_SERVICES=1 requires it"
            );
            say(&msg);
            return;
        }
    };
    run(test, &mnt, dir.path()).await;
    // The client and the worker are gone: unmount before the temp dir goes.
    drop(mount);
}

/// Writes a filler file in `dir` until the file system refuses; returns
/// its size.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("filler file");
    let chunk = vec![0x55u8; 16 * 1024];
    let mut size = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => size += n as u64,
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(28),
                    "the filler stopped on another error than ENOSPC: {e}"
                );
                break;
            }
        }
    }
    // Whatever a short chunk left.
    while f.write(&[0x55]).is_ok_and(|n| n == 1) {
        size += 1;
    }
    size
}

/// The scenario, the database in `mnt`; `dir` holds the ledger and the
/// worker's output. The worker and the client live in this function.
#[allow(clippy::too_many_lines)]
async fn run(test: &str, mnt: &Path, dir: &Path) {
    let begun = Instant::now();
    let db = mnt.join("stem.db");
    let url = format!("sqlite://{}", db.display());
    let ledger_path = dir.join("ledger.txt");
    let log_path = dir.join("worker-stderr.txt");
    let stem = stem::connect_with(&url, None, "stem")
        .await
        .expect("client connects");

    let child = Command::new(env!("CARGO_BIN_EXE_e2e-worker"))
        .env("STEM_BROKER_URL", &url)
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env("STEM_NAMESPACE", "stem")
        .env(LEDGER_VAR, &ledger_path)
        .env("STEM_LEASE", "2s")
        .env("STEM_WORKER_ID", "faults-disk")
        .env("STEM_QUEUES", QUEUE)
        .env("STEM_CONCURRENCY", "4")
        .env("STEM_POLL_INTERVAL", "50ms")
        .env("STEM_SHUTDOWN_GRACE", "5s")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(&log_path).expect("worker log"),
        ))
        .spawn()
        .expect("worker starts");
    let mut worker = Proc(child);

    // key -> handle, for every publish that answered Ok.
    let mut accepted: BTreeMap<String, TaskHandle<String>> = BTreeMap::new();
    let held = ledger_fault::with()
        .on(&stem)
        .enqueue_many((0..HELD).map(|i| ledger_fault::Args {
            key: format!("a{i}"),
            millis: HELD_MS,
        }))
        .await
        .expect("enqueue the held tasks");
    for (i, h) in held.into_iter().enumerate() {
        accepted.insert(format!("a{i}"), h);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while ledger::read_runs(&ledger_path)
        .iter()
        .filter(|r| r.event == "start")
        .count()
        < 4
    {
        worker.assert_running("the worker");
        assert!(
            Instant::now() < deadline,
            "{test}: the worker started no task in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The disk fills.
    let filler = mnt.join("filler");
    let filled_at = unix_ms();
    let filler_size = fill(&filler);
    let mut refused: Vec<String> = Vec::new();
    let mut first_error: Option<StemError> = None;
    let mut accepted_while_full = 0;
    let mut tries = 0;
    while tries < MAX_TRIES && first_error.is_none() {
        let key = format!("b{tries}");
        tries += 1;
        match ledger_fault::with().on(&stem).enqueue(key.clone(), 5).await {
            Ok(h) => {
                accepted_while_full += 1;
                accepted.insert(key, h);
            }
            Err(e) => {
                refused.push(key);
                first_error = Some(e);
            }
        }
    }
    let first_error = first_error
        .unwrap_or_else(|| panic!("{test}: {MAX_TRIES} publishes on a full disk, none refused"));
    let refused_at = unix_ms();
    let mut later_errors = Vec::new();
    for i in 0..MORE_TRIES {
        let key = format!("r{i}");
        match ledger_fault::with().on(&stem).enqueue(key.clone(), 5).await {
            Ok(h) => {
                accepted.insert(key.clone(), h);
                later_errors.push(format!("{key}: accepted on the full disk"));
            }
            Err(e) => {
                if !e.to_string().contains("disk is full") {
                    later_errors.push(format!("{key}: {e}"));
                }
                refused.push(key);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The worker lives on the full disk: its held tasks end, their
    // acknowledgements and its claims fail, their leases run out.
    let full_until = Instant::now() + FULL_FOR;
    while Instant::now() < full_until {
        worker.assert_running("the worker on the full disk");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st_full = stem.stats(QUEUE).await;

    // Space comes back.
    std::fs::remove_file(&filler).expect("delete the filler");
    let freed_at = unix_ms();
    let mut after_errors = Vec::new();
    for i in 0..AFTER {
        let key = format!("c{i}");
        match ledger_fault::with().on(&stem).enqueue(key.clone(), 5).await {
            Ok(h) => {
                accepted.insert(key, h);
            }
            Err(e) => after_errors.push(format!("{key}: {e}")),
        }
    }

    // Every accepted task's result.
    let mut not_back = Vec::new();
    for (key, h) in &accepted {
        let left = Duration::from_secs(40).saturating_sub(begun.elapsed());
        match h.wait(left.max(Duration::from_millis(1))).await {
            Ok(out) if out == *key => {}
            Ok(out) => not_back.push(format!("{key}: returned {out}")),
            Err(e) => not_back.push(format!("{key}: {e}")),
        }
    }
    let drained = begun.elapsed();
    worker.assert_running("the worker after the disk came back");
    let st = stem.stats(QUEUE).await.expect("stats");
    let worker_pid = worker.pid();
    worker.terminate();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let full_lines = log.lines().filter(|l| l.contains("disk is full")).count();

    // The ledger: every accepted key ran; no refused key ran; a second run
    // only where a run ended while the disk was full.
    let runs = ledger::read_runs(&ledger_path);
    let mut by_key: BTreeMap<&str, Vec<&ledger::Run>> = BTreeMap::new();
    for r in &runs {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let mut problems = later_errors;
    problems.extend(after_errors);
    problems.extend(not_back);
    let mut ran_twice = Vec::new();
    for key in accepted.keys() {
        let Some(key_runs) = by_key.get(key.as_str()) else {
            problems.push(format!("{key}: accepted, never ran"));
            continue;
        };
        let starts = key_runs.iter().filter(|r| r.event == "start").count();
        if starts > 1 {
            ran_twice.push(key.clone());
            let explained = key_runs.iter().any(|r| {
                r.event == "done" && r.at_ms >= filled_at && r.at_ms <= freed_at + ACK_SLACK_MS
            });
            if !explained {
                problems.push(format!(
                    "{key}: started {starts} times, and no run ended while the disk was full: {key_runs:?}"
                ));
            }
        }
    }
    for key in &refused {
        if by_key.contains_key(key.as_str()) {
            problems.push(format!("{key}: refused at publish, and ran"));
        }
    }
    for key in by_key.keys() {
        if !accepted.contains_key(*key) && !refused.iter().any(|k| k == key) {
            problems.push(format!("{key}: ran, and was never published"));
        }
    }
    if (st.ready, st.delayed, st.leased) != (0, 0, 0) {
        problems.push(format!("the queue is not empty after the drain: {st:?}"));
    }

    let msg = first_error.to_string();
    say(&format!(
        "{test}: tmpfs={SIZE} filler={filler_size}B held={HELD} accepted_while_full={accepted_while_full} \
         refused={} (first after {} ms of full disk) accepted_total={} ran_twice={} {ran_twice:?} \
         worker_log_lines_disk_full={full_lines} stats_while_full={} queue_after={st:?} \
         worker={worker_pid} drained_at={:.1}s\n{test}: refusal: {msg}",
        refused.len(),
        refused_at.saturating_sub(filled_at),
        accepted.len(),
        ran_twice.len(),
        match &st_full {
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("error: {e}"),
        },
        drained.as_secs_f64(),
    ));
    assert!(
        matches!(
            first_error,
            StemError::Broker(BrokerError::Unavailable { .. })
        ),
        "{test}: the refusal is not BrokerError::Unavailable: {first_error:?}"
    );
    assert!(
        msg.contains("disk is full"),
        "{test}: the refusal does not say the disk is full: {msg}"
    );
    assert!(problems.is_empty(), "{test}: {problems:#?}");
}
