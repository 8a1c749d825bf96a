//! The SQLite file deleted under a running worker: the worker must not
//! keep working on the deleted file while new producers create a new one
//! at the path (their tasks would never run). It notices, logs an error
//! naming the path, and stops, so that a supervisor restarts it on the
//! file now at the path.

#![cfg(unix)]

use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use stem::Broker;
use stem::adapters::sqlite::{SqliteBroker, SqliteOptions};
use stem::worker::Worker;

#[stem::task(queue = "deleted")]
async fn triple(n: u64) -> u64 {
    n * 3
}

/// ERROR events logged anywhere in this test binary, as text.
fn errors() -> &'static Mutex<Vec<String>> {
    static ERRORS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    ERRORS.get_or_init(Mutex::default)
}

/// Records the fields of ERROR events; ignores spans.
struct ErrorLog;

struct Text(String);

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl tracing::Subscriber for ErrorLog {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() == tracing::Level::ERROR
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = Text(event.metadata().target().to_owned());
        event.record(&mut text);
        errors()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(text.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_sqlite_file_is_deleted_stops_with_a_clear_error() {
    let _ = tracing::subscriber::set_global_default(ErrorLog);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().canonicalize().unwrap().join("stem.db");
    let url = format!("sqlite://{}", db.display());
    let stem = stem::connect_with(&url, None, "stem").await.unwrap();
    let worker = Worker::builder()
        .client(&stem)
        .queues(["deleted"])
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap()
        .start();
    // It runs tasks while the file is in place.
    let h = triple::enqueue_on(&stem, 2).await.unwrap();
    assert_eq!(h.wait(Duration::from_secs(10)).await.unwrap(), 6);

    remove_db(&db);
    // Another process creates a new (empty) file at the path; the worker
    // must not carry on with the deleted one as if nothing happened.
    std::fs::File::create(&db).unwrap();

    let report = tokio::time::timeout(Duration::from_secs(10), worker.join())
        .await
        .expect("the worker stops on its own once its file is deleted");
    assert_eq!(report.succeeded, 1);

    let path = db.display().to_string();
    let logged = errors()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert!(
        logged.iter().any(|l| l.contains(&path)
            && l.contains("deleted or replaced")
            && l.contains("restart")),
        "no ERROR naming {path}: {logged:#?}"
    );
    // The worker's client fails with the reason, too.
    let err = stem.broker().maintain().await.unwrap_err();
    assert!(err.to_string().contains(&path), "{err}");
    // A client opened now uses the file at the path.
    let fresh = SqliteBroker::open(&db, SqliteOptions::default())
        .await
        .unwrap();
    fresh.maintain().await.unwrap();
}

/// The same as a real worker process would meet it: `stem::worker::run()`
/// returns an error naming the file, and the process exits non-zero, so a
/// supervisor restarts it on the file now at the path.
#[test]
fn a_worker_process_whose_sqlite_file_is_deleted_exits_with_an_error() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("stem.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_e2e-worker"))
        .env("STEM_BROKER_URL", format!("sqlite://{}", db.display()))
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env_remove("STEM_NAMESPACE")
        .env("STEM_QUEUES", "e2e")
        .env("STEM_POLL_INTERVAL", "50ms")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker starts");
    let started = Instant::now();
    while !db.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the worker never created its file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    remove_db(&db);
    let deleted = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if deleted.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("the worker process kept running on a deleted file");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).expect("stderr");
    }
    assert!(
        !status.success(),
        "a worker that lost its file exits non-zero"
    );
    assert!(
        stderr.contains("the worker stopped") && stderr.contains(&db.display().to_string()),
        "the error names the file: {stderr}"
    );
}
