//! The four scenarios. Each runs in a namespace of its own, so leftovers of
//! an earlier scenario or run never count.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use stem::{Stem, TaskId};

use crate::Res;
use crate::check::{self, Verdict};
use crate::report::{Report, Settings, summarize};
use crate::sys;
use crate::task::{Probe, QUEUE, Recorder, bench_noop, now_ns};
use crate::workers::{self, WorkerProcess, WorkerSettings};

/// Which scenario to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// `enqueue_on` one task at a time, `--tasks` times.
    Enqueue,
    /// `enqueue_many` in batches of `--batch`.
    EnqueueBatch,
    /// Preload `--tasks`, then time the worker(s) burning the queue down.
    Drain,
    /// Open-loop producer at `--rate` for `--duration`; start-minus-send latency.
    Latency,
    /// The four above, in that order.
    All,
}

impl Scenario {
    /// The name used in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Enqueue => "enqueue",
            Self::EnqueueBatch => "enqueue-batch",
            Self::Drain => "drain",
            Self::Latency => "latency",
            Self::All => "all",
        }
    }

    /// The scenarios `self` stands for.
    pub(crate) fn expand(self) -> Vec<Self> {
        match self {
            Self::All => vec![
                Self::Enqueue,
                Self::EnqueueBatch,
                Self::Drain,
                Self::Latency,
            ],
            s => vec![s],
        }
    }
}

/// Everything a scenario needs to know.
#[derive(Debug)]
pub(crate) struct Bench {
    /// Broker URL (a temp file already substituted for a bare `sqlite://`).
    pub(crate) broker: String,
    /// Result backend URL, if any.
    pub(crate) backend: Option<String>,
    /// The broker's scheme.
    pub(crate) adapter: String,
    /// Unique per run; namespaces are `bench_<run_id>_<scenario>`.
    pub(crate) run_id: String,
    /// Tasks for enqueue, enqueue-batch and drain.
    pub(crate) tasks: u64,
    /// Concurrent producers of the enqueue scenario.
    pub(crate) producers: usize,
    /// Drain tasks published with a 1-3 s delay.
    pub(crate) delayed: u64,
    /// Batch size of `enqueue_many`.
    pub(crate) batch: usize,
    /// Padding per task.
    pub(crate) payload_bytes: usize,
    /// Latency scenario send rate, tasks/s.
    pub(crate) rate: u64,
    /// Latency scenario length.
    pub(crate) duration: Duration,
    /// Worker processes (0: in-process worker).
    pub(crate) worker_processes: usize,
    /// Worker settings.
    pub(crate) worker: WorkerSettings,
    /// Longest wait for a scenario's tasks to finish.
    pub(crate) timeout: Duration,
    /// Where worker processes write their logs.
    pub(crate) scratch: PathBuf,
    /// Test the checker: the producers skip task 5 and send task 3 twice.
    pub(crate) inject_fault: bool,
}

/// What a measured interval cost.
struct Measured {
    tasks: u64,
    elapsed: Duration,
    cpu_s: f64,
    cpu_scope: String,
    peak_rss_kib: u64,
    rss_scope: String,
    verdict: Verdict,
    latencies_ns: Vec<u64>,
    notes: Vec<String>,
}

impl Bench {
    fn namespace(&self, s: Scenario) -> String {
        format!("bench_{}_{}", self.run_id, s.name().replace('-', "_"))
    }

    fn pad(&self) -> String {
        "x".repeat(self.payload_bytes)
    }

    /// The sequence numbers to send for `lo..hi`: all of them, unless a
    /// fault is injected (5 skipped, 3 twice).
    fn seqs(&self, lo: u64, hi: u64) -> impl Iterator<Item = u64> + use<> {
        let fault = self.inject_fault;
        (lo..hi).flat_map(move |s| match (fault, s) {
            (true, 5) => vec![],
            (true, 3) => vec![3, 3],
            _ => vec![s],
        })
    }

    fn args(&self, seq: u64, sent_ns: u64, pad: &str) -> bench_noop::Args {
        bench_noop::Args {
            seq,
            sent_ns,
            pad: pad.to_owned(),
        }
    }

    /// With events on, a subscriber that counts them (its CPU is in this
    /// process's figure).
    async fn count_events(
        &self,
        client: &Stem,
    ) -> Res<
        Option<(
            Arc<std::sync::atomic::AtomicU64>,
            tokio::task::JoinHandle<()>,
        )>,
    > {
        if !self.worker.events {
            return Ok(None);
        }
        let mut stream = client.events().await?;
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&count);
        let task = tokio::spawn(async move {
            use futures::StreamExt as _;
            while stream.next().await.is_some() {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        Ok(Some((count, task)))
    }

    /// Runs one scenario and reports on it.
    pub(crate) async fn run(&self, s: Scenario) -> Res<Report> {
        let ns = self.namespace(s);
        let wall = Instant::now();
        let client = workers::client(&self.broker, self.backend.as_deref(), &ns).await?;
        let (concurrency, prefetch, poll) = self.effective_worker_settings(&client).await?;
        let m = match s {
            Scenario::Enqueue => self.enqueue(&client, false).await?,
            Scenario::EnqueueBatch => self.enqueue(&client, true).await?,
            Scenario::Drain => self.drain(&client, &ns).await?,
            Scenario::Latency => self.latency(&client, &ns).await?,
            Scenario::All => return Err("`all` is not one scenario".into()),
        };
        self.forget(&ns).await?;
        let mut notes = m.notes;
        notes.push(format!(
            "scenario wall time {:.3} s (setup, preload and verification included)",
            wall.elapsed().as_secs_f64()
        ));
        let mut r = Report {
            scenario: s.name(),
            adapter: self.adapter.clone(),
            broker: stem::url::redact(&self.broker),
            backend: self.backend.as_deref().map(stem::url::redact),
            namespace: ns,
            settings: Settings {
                tasks: m.tasks,
                concurrency,
                prefetch,
                poll_interval_ms: poll.as_secs_f64() * 1e3,
                producers: self.producers,
                batch: self.batch,
                payload_bytes: self.payload_bytes,
                rate: self.rate,
                duration_s: self.duration.as_secs_f64(),
                workers: if self.worker_processes > 0
                    && matches!(s, Scenario::Drain | Scenario::Latency)
                {
                    "processes"
                } else {
                    "in-process"
                },
                worker_processes: if matches!(s, Scenario::Drain | Scenario::Latency) {
                    self.worker_processes
                } else {
                    0
                },
            },
            tasks: m.tasks,
            elapsed_s: m.elapsed.as_secs_f64(),
            tasks_per_s: 0.0,
            cpu_s: m.cpu_s,
            cpu_s_per_1000_tasks: 0.0,
            cpu_scope: m.cpu_scope,
            peak_rss_kib: m.peak_rss_kib,
            rss_scope: m.rss_scope,
            latency: summarize(&m.latencies_ns),
            exactly_once: m.verdict.exactly_once(),
            check: m.verdict,
            notes,
        };
        r.finish_rates();
        Ok(r)
    }

    /// The concurrency, prefetch and poll interval a worker built with
    /// these settings gets.
    async fn effective_worker_settings(&self, client: &Stem) -> Res<(usize, usize, Duration)> {
        let probe = Probe(Arc::new(Recorder::counting(0)));
        let w = workers::builder(client, probe, &self.worker)
            .build()
            .await?;
        let c = w.config();
        Ok((c.concurrency, c.prefetch, c.poll_interval))
    }

    /// Frees a scenario's storage: a `memory://` scenario's queues, a
    /// Redis namespace's keys (SQLite's temp file goes with the run).
    async fn forget(&self, ns: &str) -> Res<()> {
        if let Some(rest) = self.broker.strip_prefix("memory://") {
            let name = rest.split('?').next().unwrap_or("");
            stem::memory::forget_shared(name, ns);
        }
        if self.broker.starts_with("redis://") || self.broker.starts_with("rediss://") {
            use stem::adapters::redis::{RedisBroker, RedisOptions};
            let b = RedisBroker::connect(&self.broker, RedisOptions::default()).await?;
            b.delete_namespace(ns).await?;
        }
        if self.broker.starts_with("postgres://") || self.broker.starts_with("postgresql://") {
            use stem::adapters::postgres::{PostgresBroker, PostgresOptions};
            let b = PostgresBroker::connect(
                &self.broker,
                PostgresOptions {
                    namespace: ns.to_owned(),
                    ..PostgresOptions::default()
                },
            )
            .await?;
            // What the burn-down left behind, before the schema goes.
            let sizes: (i64, i64, i64, i64, i64) = stem::adapters::postgres::sqlx::query_as(
                stem::adapters::postgres::sqlx::AssertSqlSafe(format!(
                    "SELECT pg_relation_size('\"{s}\".jobs'), pg_relation_size('\"{s}\".jobs_ready'), \
                     pg_relation_size('\"{s}\".jobs_due'), pg_relation_size('\"{s}\".jobs_pkey'), \
                     COALESCE((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = '\"{s}\".jobs'::regclass), 0)",
                    s = b.schema()
                )),
            )
            .fetch_one(b.pool())
            .await?;
            tracing::info!(
                schema = b.schema(),
                heap_bytes = sizes.0,
                jobs_ready_bytes = sizes.1,
                jobs_due_bytes = sizes.2,
                jobs_pkey_bytes = sizes.3,
                dead_rows = sizes.4,
                "postgres table and index sizes after the scenario"
            );
            b.drop_schema().await?;
        }
        Ok(())
    }

    /// `enqueue` (one `enqueue_on` per task) or `enqueue-batch`
    /// (`with().on(..).enqueue_many(..)` per `--batch`); then the tasks are
    /// drained, untimed, by an in-process worker to check exactly-once.
    async fn enqueue(&self, client: &Stem, batched: bool) -> Res<Measured> {
        let n = self.tasks;
        let pad = self.pad();
        let cpu0 = sys::cpu_seconds("self")?;
        let t0 = Instant::now();
        if batched {
            self.enqueue_batches(client, n, 0, &pad).await?;
        } else if self.producers <= 1 {
            for seq in self.seqs(0, n) {
                bench_noop::enqueue_on(client, seq, 0, pad.clone()).await?;
            }
        } else {
            let p = self.producers as u64;
            let mut set = tokio::task::JoinSet::new();
            for k in 0..p {
                let seqs: Vec<u64> = self.seqs(0, n).filter(|s| s % p == k).collect();
                let (client, pad) = (client.clone(), pad.clone());
                set.spawn(async move {
                    for seq in seqs {
                        bench_noop::enqueue_on(&client, seq, 0, pad.clone()).await?;
                    }
                    Ok::<(), stem::StemError>(())
                });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
        }
        let elapsed = t0.elapsed();
        let cpu_s = sys::cpu_seconds("self")? - cpu0;
        let (verdict, drain_note) = self.verify_in_process(client, n).await?;
        Ok(Measured {
            tasks: n,
            elapsed,
            cpu_s,
            cpu_scope: String::from("this process (the producer; no worker runs while timed)"),
            peak_rss_kib: sys::peak_rss_kib("self")?,
            rss_scope: in_process_rss_scope(),
            verdict,
            latencies_ns: Vec::new(),
            notes: vec![drain_note],
        })
    }

    /// Enqueues tasks `0..n` in batches; the last `delayed` of them with a
    /// delay of 1 to 3 s (one delay per batch, spread over the batches).
    async fn enqueue_batches(
        &self,
        client: &Stem,
        n: u64,
        delayed: u64,
        pad: &str,
    ) -> Res<Vec<TaskId>> {
        let batch = self.batch.max(1) as u64;
        let keep = client.backend().is_some();
        let mut ids = Vec::new();
        let mut lo = 0;
        let first_delayed = n - delayed.min(n);
        while lo < n {
            let hi = (lo + batch)
                .min(n)
                .min(if lo < first_delayed { first_delayed } else { n });
            let mut with = bench_noop::with().on(client);
            if lo >= first_delayed {
                with = with.delay(Duration::from_millis(1000 + (lo * 7919) % 2000));
            }
            let handles = with
                .enqueue_many(self.seqs(lo, hi).map(|seq| self.args(seq, 0, pad)))
                .await?;
            if keep {
                ids.extend(handles.iter().map(|h| h.id()));
            }
            lo = hi;
        }
        Ok(ids)
    }

    /// Runs the `n` queued tasks on an in-process worker (untimed) and judges them.
    async fn verify_in_process(&self, client: &Stem, n: u64) -> Res<(Verdict, String)> {
        let recorder = Arc::new(Recorder::counting(n));
        let worker = workers::builder(client, Probe(Arc::clone(&recorder)), &self.worker)
            .build()
            .await?
            .start();
        let t0 = Instant::now();
        let done = wait_until_drained(client, Some(&recorder), n, self.timeout, &mut []).await;
        let took = t0.elapsed();
        worker.shutdown();
        worker.join().await;
        done?;
        Ok((
            check::judge(&recorder.counts(), &recorder.out_of_range()),
            format!(
                "exactly-once verified by draining with an in-process worker afterwards (untimed: {:.3} s)",
                took.as_secs_f64()
            ),
        ))
    }

    /// `drain`: preload `n` tasks in batches, then time from worker start
    /// until every task ran and the queue is empty.
    async fn drain(&self, client: &Stem, ns: &str) -> Res<Measured> {
        let n = self.tasks;
        let pad = self.pad();
        let t_pre = Instant::now();
        let ids = self.enqueue_batches(client, n, self.delayed, &pad).await?;
        let preload = t_pre.elapsed();
        let st = client.stats(QUEUE).await?;
        if st.ready + st.delayed != n {
            return Err(format!(
                "preloaded {n} tasks but the queue holds {} ready and {} delayed",
                st.ready, st.delayed
            )
            .into());
        }
        let mut notes = vec![format!(
            "preload: {n} tasks ({} delayed by 1-3 s; {} still delayed when the worker started) in batches of {} took {:.3} s",
            self.delayed,
            st.delayed,
            self.batch,
            preload.as_secs_f64()
        )];
        if self.worker_processes == 0 {
            let recorder = Arc::new(Recorder::counting(n));
            let subscriber = self.count_events(client).await?;
            let cpu0 = sys::cpu_seconds("self")?;
            let t0 = Instant::now();
            let t0_wall = Utc::now();
            let worker = workers::builder(client, Probe(Arc::clone(&recorder)), &self.worker)
                .build()
                .await?
                .start();
            let done = wait_until_drained(client, Some(&recorder), n, self.timeout, &mut []).await;
            let mut elapsed = t0.elapsed();
            let cpu_s = sys::cpu_seconds("self")? - cpu0;
            let rss = sys::peak_rss_kib("self")?;
            if !ids.is_empty() {
                // Untimed, and outside the CPU figure: the harness's own reads.
                let (until_terminal, note) =
                    records_terminal(client, &ids, t0_wall, self.timeout).await?;
                elapsed = elapsed.max(until_terminal);
                notes.push(note);
            }
            let t_stop = Instant::now();
            worker.shutdown();
            let report = worker.join().await;
            done?;
            notes.push(format!(
                "timed from Worker::start; worker report: {report:?}; shutdown + join of the idle worker took {:.0} ms (untimed)",
                t_stop.elapsed().as_secs_f64() * 1e3
            ));
            if let Some((count, task)) = subscriber {
                task.abort();
                notes.push(format!(
                    "task events on; one subscriber in this process received {} events",
                    count.load(std::sync::atomic::Ordering::Relaxed)
                ));
            }
            Ok(Measured {
                tasks: n,
                elapsed,
                cpu_s,
                cpu_scope: String::from("this process (worker and broker; the producer is idle)"),
                peak_rss_kib: rss,
                rss_scope: in_process_rss_scope(),
                verdict: check::judge(&recorder.counts(), &recorder.out_of_range()),
                latencies_ns: Vec::new(),
                notes,
            })
        } else {
            let cpu0 = sys::cpu_seconds("self")?;
            let t0 = Instant::now();
            let t0_wall = Utc::now();
            let mut procs = self.spawn_workers(ns)?;
            let done = wait_until_drained(client, None, n, self.timeout, &mut procs).await;
            let mut elapsed = t0.elapsed();
            done?;
            if !ids.is_empty() {
                let (until_terminal, note) =
                    records_terminal(client, &ids, t0_wall, self.timeout).await?;
                elapsed = elapsed.max(until_terminal);
                notes.push(note);
            }
            notes.push(String::from(
                "timed from spawning the worker processes (process start-up included)",
            ));
            self.finish_processes(n, elapsed, cpu0, &[], procs, notes)
        }
    }

    fn spawn_workers(&self, ns: &str) -> Res<Vec<WorkerProcess>> {
        (0..self.worker_processes)
            .map(|k| {
                let out = self.scratch.join(format!("{ns}-worker-{k}.log"));
                WorkerProcess::spawn(&self.broker, self.backend.as_deref(), ns, &self.worker, out)
            })
            .collect()
    }

    /// Reads the worker processes' CPU and peak RSS, stops them, reads
    /// their logs and judges them.
    fn finish_processes(
        &self,
        n: u64,
        elapsed: Duration,
        self_cpu0: f64,
        worker_cpu0: &[f64],
        procs: Vec<WorkerProcess>,
        mut notes: Vec<String>,
    ) -> Res<Measured> {
        let mut cpu_s = sys::cpu_seconds("self")? - self_cpu0;
        let mut rss = Vec::new();
        for (i, p) in procs.iter().enumerate() {
            let pid = p.pid();
            cpu_s += sys::cpu_seconds(&pid)? - worker_cpu0.get(i).copied().unwrap_or(0.0);
            rss.push(sys::peak_rss_kib(&pid)?);
        }
        notes.push(format!(
            "worker processes' peak RSS (KiB): {rss:?}; producer's (this process): {}",
            sys::peak_rss_kib("self")?
        ));
        let mut seqs = Vec::new();
        let mut lats = Vec::new();
        for p in procs {
            let log = p.stop(self.timeout.min(Duration::from_secs(60)))?;
            seqs.extend(log.seqs);
            lats.extend(log.latencies_ns);
        }
        Ok(Measured {
            tasks: n,
            elapsed,
            cpu_s,
            cpu_scope: format!("this process (producer) + {} worker processes", rss.len()),
            peak_rss_kib: rss.iter().copied().max().unwrap_or(0),
            rss_scope: String::from("the largest worker process's VmHWM"),
            verdict: check::judge_log(n, seqs),
            latencies_ns: lats,
            notes,
        })
    }

    /// `latency`: an open-loop producer sends `rate × duration` tasks at
    /// fixed intervals (each enqueue is spawned, so a slow one does not
    /// delay the next send); each task records its start minus its send time.
    async fn latency(&self, client: &Stem, ns: &str) -> Res<Measured> {
        let n = ((self.rate as f64) * self.duration.as_secs_f64()).round() as u64;
        if n == 0 {
            return Err("--rate × --duration sends no task".into());
        }
        let pad = self.pad();
        let mut notes = Vec::new();
        let recorder = Arc::new(Recorder::counting(n));
        let mut procs = Vec::new();
        let mut worker = None;
        if self.worker_processes == 0 {
            worker = Some(
                workers::builder(client, Probe(Arc::clone(&recorder)), &self.worker)
                    .build()
                    .await?
                    .start(),
            );
        } else {
            procs = self.spawn_workers(ns)?;
            for p in &mut procs {
                p.wait_ready(Duration::from_secs(60))?;
            }
        }
        let worker_cpu0 = procs
            .iter()
            .map(|p| sys::cpu_seconds(&p.pid()))
            .collect::<Result<Vec<_>, _>>()?;
        let cpu0 = sys::cpu_seconds("self")?;
        let t0 = Instant::now();
        let max_lag = self.produce_open_loop(client, n, &pad).await?;
        let in_proc = worker.is_some().then_some(&*recorder);
        let done = wait_until_drained(client, in_proc, n, self.timeout, &mut procs).await;
        let elapsed = t0.elapsed();
        done?;
        notes.push(format!(
            "open loop: {n} sends at {}/s; the producer's largest lag behind schedule was {:.3} ms",
            self.rate,
            max_lag.as_secs_f64() * 1e3
        ));
        if let Some(w) = worker {
            let cpu_s = sys::cpu_seconds("self")? - cpu0;
            let rss = sys::peak_rss_kib("self")?;
            w.shutdown();
            w.join().await;
            Ok(Measured {
                tasks: n,
                elapsed,
                cpu_s,
                cpu_scope: String::from("this process (producer and worker)"),
                peak_rss_kib: rss,
                rss_scope: in_process_rss_scope(),
                verdict: check::judge(&recorder.counts(), &recorder.out_of_range()),
                latencies_ns: recorder.take_latencies(),
                notes,
            })
        } else {
            self.finish_processes(n, elapsed, cpu0, &worker_cpu0, procs, notes)
        }
    }

    /// Sends `n` tasks at `rate`/s; returns the largest lag behind schedule.
    async fn produce_open_loop(&self, client: &Stem, n: u64, pad: &str) -> Res<Duration> {
        let start = tokio::time::Instant::now();
        let rate = self.rate as f64;
        let mut sends = tokio::task::JoinSet::new();
        let mut max_lag = Duration::ZERO;
        for seq in 0..n {
            let due = start + Duration::from_secs_f64(seq as f64 / rate);
            tokio::time::sleep_until(due).await;
            max_lag = max_lag.max(tokio::time::Instant::now().saturating_duration_since(due));
            let client = client.clone();
            let pad = pad.to_owned();
            sends.spawn(async move {
                bench_noop::enqueue_on(&client, seq, now_ns(), pad)
                    .await
                    .map(|_| ())
            });
            while let Some(r) = sends.try_join_next() {
                r??;
            }
        }
        while let Some(r) = sends.join_next().await {
            r??;
        }
        Ok(max_lag)
    }
}

fn in_process_rss_scope() -> String {
    String::from(
        "this process (in-process mode: producer, worker and, for memory://, the queues share it; the high-water mark since the process started, so it carries over from earlier scenarios of the same run)",
    )
}

/// Waits until the queue is empty (ready + delayed + leased == 0). Every
/// task was published before this is called and a task is acked only after
/// it ran, so an empty queue means every task that will run has run (lost
/// or duplicated ones are then the checker's business).
///
/// With an in-process `recorder` the broker is asked only once the recorder
/// has seen `n` executions (or every second, so a lost task cannot hang the
/// wait), to keep the polling's own cost out of the measurement. Without
/// one the broker is polled every ~10 ms near the end, and less often (half
/// the estimated time left, at most 1 s) while many tasks remain, since a
/// SQLite `stats` call scans the queue. Fails if a worker process dies or
/// `timeout` passes.
/// With a result backend, a drain ends only when every task's record is
/// terminal: reads every record (untimed) until all are, and returns the
/// time from `t0` to the last record's `updated_at`, so a result written
/// after the queue emptied (or lost, which times out) cannot pass.
async fn records_terminal(
    client: &Stem,
    ids: &[TaskId],
    t0: chrono::DateTime<Utc>,
    timeout: Duration,
) -> Res<(Duration, String)> {
    use futures::StreamExt as _;
    let backend = client
        .backend()
        .ok_or("records_terminal needs a result backend")?;
    let started = Instant::now();
    let mut pending: Vec<TaskId> = ids.to_vec();
    let mut latest = t0;
    while !pending.is_empty() {
        let answers: Vec<(TaskId, Option<chrono::DateTime<Utc>>)> =
            futures::stream::iter(pending.iter().copied())
                .map(|id| async move {
                    let rec = backend.get(id).await.ok().flatten();
                    (
                        id,
                        rec.filter(|r| r.state.is_terminal()).map(|r| r.updated_at),
                    )
                })
                .buffer_unordered(64)
                .collect()
                .await;
        pending.clear();
        for (id, at) in answers {
            match at {
                Some(at) => latest = latest.max(at),
                None => pending.push(id),
            }
        }
        if pending.is_empty() {
            break;
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "{} of {} task records are not terminal after {timeout:?}",
                pending.len(),
                ids.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let until = (latest - t0).to_std().unwrap_or(Duration::ZERO);
    Ok((
        until,
        format!(
            "every one of {} records is terminal; the last was written {:.3} s after the start (checked untimed in {:.3} s)",
            ids.len(),
            until.as_secs_f64(),
            started.elapsed().as_secs_f64()
        ),
    ))
}

async fn wait_until_drained(
    client: &Stem,
    recorder: Option<&Recorder>,
    n: u64,
    timeout: Duration,
    procs: &mut [WorkerProcess],
) -> Res<()> {
    const TICK: Duration = Duration::from_millis(10);
    const SLOW: Duration = Duration::from_secs(1);
    let t0 = Instant::now();
    let mut last_stats: Option<Instant> = None;
    loop {
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        let mut left = recorder.map_or(n, |r| n.saturating_sub(r.ran()));
        let ask = recorder.is_none() || left == 0 || last_stats.is_none_or(|t| t.elapsed() >= SLOW);
        if ask {
            let st = client.stats(QUEUE).await?;
            last_stats = Some(Instant::now());
            let queued = st.ready + st.delayed + st.leased;
            if queued == 0 {
                return Ok(());
            }
            if recorder.is_none() {
                left = queued;
            }
        }
        if t0.elapsed() > timeout {
            let st = client.stats(QUEUE).await?;
            return Err(format!(
                "timed out after {timeout:?} waiting for {n} tasks to run; queue stats {st:?}"
            )
            .into());
        }
        // In process, the count is an atomic read: look every tick, so the
        // end is seen within 10 ms (a nap from a rate estimate overshot
        // the end of a short run that sped up by up to half a second).
        // Worker processes are counted through queue stats: estimate the
        // time left from the progress so far.
        let done = n.saturating_sub(left) as f64;
        let secs = t0.elapsed().as_secs_f64();
        let nap = if recorder.is_some() {
            TICK
        } else if done > 0.0 && secs > 0.0 {
            let eta = left as f64 / (done / secs);
            Duration::from_secs_f64((eta / 2.0).min(1.0)).max(TICK)
        } else {
            TICK
        };
        tokio::time::sleep(nap).await;
    }
}
