//! The worker shows its work: one line per start and outcome of a task at
//! INFO, target `stem::task`, with the task's name, id and attempt as the
//! event's own fields, and never its arguments or result; the long-task
//! warning. Each test runs its worker on its own thread (the default
//! current-thread runtime) under its own subscriber writing to a buffer.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stem::Stem;
use stem::worker::Worker;
use stem_tests::{eventually, isolated_client};
use tracing_subscriber::fmt::MakeWriter;

/// A log buffer a subscriber writes into.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// Logs with `filter` into a buffer for the rest of the calling thread.
fn capture(filter: &str) -> (Buffer, tracing::subscriber::DefaultGuard) {
    let buffer = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(buffer.clone())
        .with_ansi(false)
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

#[derive(Debug, thiserror::Error)]
#[error("refused on purpose")]
struct Refused;

#[stem::task(queue = "logs_ok")]
async fn logged_ok(secret: String) -> String {
    format!("{secret}-result")
}

#[stem::task(
    queue = "logs_fail",
    retries = 1,
    backoff = "fixed",
    backoff_base = "50ms"
)]
async fn logged_fail(secret: String) -> Result<(), Refused> {
    let _ = secret;
    Err(Refused)
}

#[stem::task(queue = "logs_slow")]
async fn logged_slow(secret: String) -> usize {
    tokio::time::sleep(Duration::from_millis(700)).await;
    secret.len()
}

async fn worker(
    stem: &Stem,
    queue: &str,
    configure: impl FnOnce(stem::worker::WorkerBuilder) -> stem::worker::WorkerBuilder,
) -> stem::worker::WorkerHandle {
    configure(
        Worker::builder()
            .client(stem)
            .queues([queue])
            .poll_interval(Duration::from_millis(20)),
    )
    .build()
    .await
    .expect("worker builds")
    .start()
}

/// The lines of `stem::task` events about task `id` with `message`, each
/// checked to carry name, id and attempt as the event's own fields (after
/// the target, where the span's fields are not).
fn task_lines(log: &str, message: &str, name: &str, id: &str, attempt: u32) -> usize {
    log.lines()
        .filter_map(|l| l.split_once(" stem::task: "))
        .map(|(_, event)| event)
        .filter(|e| e.starts_with(message))
        .filter(|e| {
            e.contains(&format!("task.name={name}"))
                && e.contains(&format!("task.id={id}"))
                && e.contains(&format!("task.attempt={attempt}"))
        })
        .count()
}

fn secret() -> String {
    format!("hunter2-{}", stem::TaskId::new())
}

#[tokio::test]
async fn the_worker_logs_each_task_start_and_outcome_without_its_arguments() {
    let (buffer, _guard) = capture("info");
    let stem = isolated_client("logs").await;
    let (ok_secret, fail_secret) = (secret(), secret());

    let w = worker(&stem, "logs_ok", |b| b).await;
    let ok = logged_ok::enqueue_on(&stem, ok_secret.clone())
        .await
        .expect("enqueue");
    let ok_id = ok.id().to_string();
    assert!(
        eventually(Duration::from_secs(5), || async {
            task_lines(&buffer.text(), "task succeeded", logged_ok::NAME, &ok_id, 1) == 1
        })
        .await,
        "no `task succeeded` line for {ok_id}:\n{}",
        buffer.text()
    );
    w.shutdown();
    w.join().await;

    let w = worker(&stem, "logs_fail", |b| b).await;
    let failing = logged_fail::enqueue_on(&stem, fail_secret.clone())
        .await
        .expect("enqueue");
    let fail_id = failing.id().to_string();
    assert!(
        eventually(Duration::from_secs(5), || async {
            task_lines(
                &buffer.text(),
                "task failed; dead-lettered",
                logged_fail::NAME,
                &fail_id,
                2,
            ) == 1
        })
        .await,
        "no dead-letter line for {fail_id}:\n{}",
        buffer.text()
    );
    w.shutdown();
    w.join().await;

    let log = buffer.text();
    for (message, name, id, attempt) in [
        ("task started", logged_ok::NAME, &ok_id, 1),
        ("task started", logged_fail::NAME, &fail_id, 1),
        ("task failed; retrying", logged_fail::NAME, &fail_id, 1),
        ("task started", logged_fail::NAME, &fail_id, 2),
    ] {
        assert_eq!(
            task_lines(&log, message, name, id, attempt),
            1,
            "one `{message}` line for {name} {id} attempt {attempt}:\n{log}"
        );
    }
    let succeeded = log
        .lines()
        .find(|l| l.contains("task succeeded") && l.contains(&ok_id))
        .expect("succeeded line");
    assert!(succeeded.contains("duration_ms="), "{succeeded}");
    let retry = log
        .lines()
        .find(|l| l.contains("task failed; retrying") && l.contains(&fail_id))
        .expect("retry line");
    assert!(retry.contains("retry_in_ms=50"), "{retry}");
    assert!(retry.contains("refused on purpose"), "{retry}");
    assert!(
        !log.contains("hunter2"),
        "an argument or result value was logged:\n{log}"
    );
}

#[tokio::test]
async fn stem_task_warn_quiets_the_task_lines_and_keeps_failures() {
    let (buffer, _guard) = capture("info,stem::task=warn");
    let stem = isolated_client("logs_quiet").await;
    let w = worker(&stem, "logs_ok", |b| b).await;
    let handle = logged_ok::enqueue_on(&stem, secret())
        .await
        .expect("enqueue");
    handle
        .wait(Duration::from_secs(5))
        .await
        .expect("task succeeds");
    w.shutdown();
    w.join().await;
    let w = worker(&stem, "logs_fail", |b| b).await;
    let failing = logged_fail::enqueue_on(&stem, secret())
        .await
        .expect("enqueue");
    let fail_id = failing.id().to_string();
    assert!(
        eventually(Duration::from_secs(5), || async {
            task_lines(
                &buffer.text(),
                "task failed; dead-lettered",
                logged_fail::NAME,
                &fail_id,
                2,
            ) == 1
        })
        .await,
        "the dead letter is still logged with stem::task=warn:\n{}",
        buffer.text()
    );
    w.shutdown();
    w.join().await;
    let log = buffer.text();
    assert!(log.contains("worker started"), "{log}");
    for quiet in ["task started", "task succeeded", "task failed; retrying"] {
        assert!(
            !log.contains(quiet),
            "`{quiet}` logged with stem::task=warn:\n{log}"
        );
    }
}

#[tokio::test]
async fn a_task_running_past_the_long_task_warning_is_warned_about_once() {
    let (buffer, _guard) = capture("info");
    let stem = isolated_client("logs_long").await;
    let w = worker(&stem, "logs_slow", |b| {
        b.long_task_warning(Duration::from_millis(150))
    })
    .await;
    let handle = logged_slow::enqueue_on(&stem, secret())
        .await
        .expect("enqueue");
    let id = handle.id().to_string();
    handle
        .wait(Duration::from_secs(5))
        .await
        .expect("task succeeds");
    w.shutdown();
    w.join().await;
    let log = buffer.text();
    assert_eq!(
        task_lines(
            &log,
            "task still running past the long-task warning",
            logged_slow::NAME,
            &id,
            1
        ),
        1,
        "one long-task warning:\n{log}"
    );
    assert!(!log.contains("hunter2"), "{log}");
}
