//! Workers for the scenarios: in this process, or as separate OS processes
//! (this same binary re-executed in its hidden worker mode).
//!
//! A worker process prints `ready` once its worker is built, runs until
//! SIGTERM, shuts down gracefully, and then writes every sequence number it
//! ran (`s <seq>`) and every latency sample (`l <ns>`) to its output file.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stem::Stem;
use stem::worker::{Worker, WorkerBuilder};

use crate::Res;
use crate::task::{Probe, QUEUE, Recorder};

/// Worker settings shared by both modes.
#[derive(Clone, Debug)]
pub(crate) struct WorkerSettings {
    /// Tasks run at once (`None`: the runtime's default).
    pub(crate) concurrency: Option<usize>,
    /// Deliveries per fetch (`None`: the runtime's default).
    pub(crate) prefetch: Option<usize>,
    /// Longest wait per fetch (`None`: the runtime's default).
    pub(crate) poll_interval: Option<Duration>,
    /// Task events on.
    pub(crate) events: bool,
}

/// A worker builder on `client` consuming the bench queue, with `probe` as state.
pub(crate) fn builder(client: &Stem, probe: Probe, settings: &WorkerSettings) -> WorkerBuilder {
    let mut b = Worker::builder()
        .client(client)
        .state(probe)
        .queues([QUEUE])
        .shutdown_grace(Duration::from_secs(30));
    if let Some(c) = settings.concurrency {
        b = b.concurrency(c);
    }
    if let Some(p) = settings.prefetch {
        b = b.prefetch(p);
    }
    if let Some(d) = settings.poll_interval {
        b = b.poll_interval(d);
    }
    if settings.events {
        b = b.events(true);
    }
    b
}

/// Opens a client on `broker` in `namespace`, with a result backend only
/// when `backend` names one (so by default no results are written).
pub(crate) async fn client(broker: &str, backend: Option<&str>, namespace: &str) -> Res<Stem> {
    let b = stem::client::open_broker(broker, namespace).await?;
    let be = match backend {
        Some(url) => Some(stem::client::open_backend(url, namespace).await?),
        None => None,
    };
    Ok(Stem::new(b, be))
}

/// The hidden worker mode: run until SIGTERM, then write the log to `out`.
pub(crate) async fn worker_process_main(
    broker: &str,
    backend: Option<&str>,
    namespace: &str,
    settings: &WorkerSettings,
    out: &Path,
) -> Res<()> {
    let client = client(broker, backend, namespace).await?;
    let recorder = Arc::new(Recorder::logging());
    let worker = builder(&client, Probe(Arc::clone(&recorder)), settings)
        .build()
        .await?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "ready")?;
        stdout.flush()?;
    }
    let report = worker.run().await?;
    tracing::info!(?report, "worker process stopped");
    let seqs = recorder.take_seqs();
    let lats = recorder.take_latencies();
    let tmp = out.with_extension("tmp");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for s in seqs {
            writeln!(w, "s {s}")?;
        }
        for l in lats {
            writeln!(w, "l {l}")?;
        }
        w.flush()?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// What a worker process wrote.
#[derive(Debug, Default)]
pub(crate) struct WorkerLog {
    /// Sequence numbers run, in the order run.
    pub(crate) seqs: Vec<u64>,
    /// Start-minus-send samples, ns.
    pub(crate) latencies_ns: Vec<u64>,
}

/// Parses a worker process's output file.
pub(crate) fn parse_log(text: &str) -> Res<WorkerLog> {
    let mut log = WorkerLog::default();
    for (i, line) in text.lines().enumerate() {
        let bad = || {
            format!(
                "line {} of a worker log is not `s N` or `l N`: {line:?}",
                i + 1
            )
        };
        let (kind, n) = line.split_once(' ').ok_or_else(bad)?;
        let n: u64 = n.parse().map_err(|_| bad())?;
        match kind {
            "s" => log.seqs.push(n),
            "l" => log.latencies_ns.push(n),
            _ => return Err(bad().into()),
        }
    }
    Ok(log)
}

/// A worker process; killed (SIGKILL) if dropped before it was stopped.
#[derive(Debug)]
pub(crate) struct WorkerProcess {
    child: Option<Child>,
    /// Its output file.
    pub(crate) out: PathBuf,
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl WorkerProcess {
    /// Starts `stem-bench` in worker mode; `out` is where it writes its log.
    pub(crate) fn spawn(
        broker: &str,
        backend: Option<&str>,
        namespace: &str,
        settings: &WorkerSettings,
        out: PathBuf,
    ) -> Res<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("--internal-worker")
            .arg(&out)
            .arg("--internal-namespace")
            .arg(namespace)
            .arg("--broker")
            .arg(broker);
        if let Some(b) = backend {
            cmd.arg("--backend").arg(b);
        }
        if let Some(c) = settings.concurrency {
            cmd.arg("--concurrency").arg(c.to_string());
        }
        if let Some(p) = settings.prefetch {
            cmd.arg("--prefetch").arg(p.to_string());
        }
        if let Some(d) = settings.poll_interval {
            cmd.arg("--poll-interval")
                .arg(humantime::format_duration(d).to_string());
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self {
            child: Some(child),
            out,
        })
    }

    /// The process id, as `/proc` names it.
    pub(crate) fn pid(&self) -> String {
        self.child
            .as_ref()
            .map_or_else(String::new, |c| c.id().to_string())
    }

    /// Waits (blocking, up to `timeout`) for the `ready` line.
    pub(crate) fn wait_ready(&mut self, timeout: Duration) -> Res<()> {
        let child = self.child.as_mut().ok_or("worker already stopped")?;
        let stdout = child.stdout.take().ok_or("worker stdout already taken")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let got = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(got);
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(line)) if line.trim() == "ready" => Ok(()),
            Ok(Ok(line)) => Err(format!(
                "worker process {} did not start (said {line:?}; see its stderr above)",
                self.pid()
            )
            .into()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                Err(format!("worker process {} not ready after {timeout:?}", self.pid()).into())
            }
        }
    }

    /// Fails if the process has exited (it should run until stopped).
    pub(crate) fn check_alive(&mut self) -> Res<()> {
        let child = self.child.as_mut().ok_or("worker already stopped")?;
        match child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                Err(format!("worker process {} exited early with {status}", child.id()).into())
            }
        }
    }

    /// SIGTERM (through the `kill` command), then waits up to `timeout` for
    /// a clean exit and reads the log it wrote.
    pub(crate) fn stop(mut self, timeout: Duration) -> Res<WorkerLog> {
        let mut child = self.child.take().ok_or("worker already stopped")?;
        let pid = child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !status.success() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("`kill -TERM {pid}` failed: {status}").into());
        }
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "worker process {pid} did not stop within {timeout:?} of SIGTERM"
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            return Err(format!("worker process {pid} exited with {status}").into());
        }
        let text = std::fs::read_to_string(&self.out).map_err(|e| {
            format!(
                "worker process {pid} left no log at {}: {e}",
                self.out.display()
            )
        })?;
        parse_log(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_parse_and_garbage_is_refused() {
        let log = parse_log("s 3\ns 1\nl 1500\n").unwrap();
        assert_eq!(log.seqs, vec![3, 1]);
        assert_eq!(log.latencies_ns, vec![1500]);
        assert!(parse_log("x 1\n").is_err());
        assert!(parse_log("s one\n").is_err());
        assert!(parse_log("").unwrap().seqs.is_empty());
    }
}
