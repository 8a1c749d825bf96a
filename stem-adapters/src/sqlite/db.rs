//! The connection layer: one writer thread per database file per process
//! that runs every write in group-committed transactions, a small pool of
//! reader connections for reads, and a checkpointer thread that keeps the
//! write-ahead log short without stalling the writer.
//!
//! Why a writer thread: SQLite admits one writer at a time per file, so
//! writes from one process are serialised anyway. Handing each write to one
//! thread that owns the write connection costs one hop per write instead of
//! one per statement, lets the thread run whatever has queued up meanwhile
//! (claims, acks, publishes, results from many tasks) in ONE transaction —
//! one commit, one WAL append — and keeps the async runtime's threads out
//! of SQLite's blocking calls. Each queued write runs in its own savepoint,
//! so one that fails is rolled back alone; callers hear back only after the
//! commit.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};

use rusqlite::{Connection, ErrorCode, OpenFlags};
use tokio::sync::{Semaphore, oneshot};

use super::SqliteOptions;

/// Most queued writes run in one transaction.
const MAX_GROUP: usize = 256;

/// Commits between nudges to the checkpointer.
const COMMITS_PER_CHECKPOINT: u32 = 64;

/// WAL pages after which the writer checkpoints by itself, a safety net
/// for when the checkpointer cannot keep up (the checkpointer normally
/// keeps the log far shorter).
const WRITER_AUTOCHECKPOINT: i64 = 20_000;

/// A SQLite failure, classified once.
#[derive(Clone, Debug)]
pub(crate) struct DbError {
    /// The database cannot be reached or locked (busy past the timeout,
    /// I/O, disk full, the writer gone): worth retrying later.
    pub(crate) unavailable: bool,
    /// Busy or locked: another connection holds the lock right now.
    pub(crate) busy: bool,
    pub(crate) reason: String,
    /// SQLite's own error, when there is one (kept as the `source`).
    pub(crate) cause: Option<stem_core::Cause>,
}

impl DbError {
    fn gone() -> Self {
        Self {
            unavailable: true,
            busy: false,
            reason: String::from("the SQLite writer thread has stopped"),
            cause: None,
        }
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        let unavailable = matches!(
            e.sqlite_error_code(),
            Some(
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::DiskFull
                    | ErrorCode::CannotOpen
                    | ErrorCode::ReadOnly
            )
        );
        let busy = matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        );
        Self {
            unavailable,
            busy,
            reason: e.to_string(),
            cause: Some(stem_core::Cause::new(e)),
        }
    }
}

/// What a closure run on a connection can fail with: SQLite itself, or the
/// caller's own error (`E`, e.g. a lease lost).
#[derive(Debug)]
pub(crate) enum Fail<E> {
    Db(DbError),
    Other(E),
}

impl<E> From<rusqlite::Error> for Fail<E> {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(e.into())
    }
}

impl<E> From<DbError> for Fail<E> {
    fn from(e: DbError) -> Self {
        Self::Db(e)
    }
}

impl From<stem_core::BrokerError> for Fail<stem_core::BrokerError> {
    fn from(e: stem_core::BrokerError) -> Self {
        Self::Other(e)
    }
}

impl From<stem_core::BackendError> for Fail<stem_core::BackendError> {
    fn from(e: stem_core::BackendError) -> Self {
        Self::Other(e)
    }
}

/// One write queued for the writer thread.
trait Job: Send {
    /// The caller stopped waiting (its future was dropped): skip the job.
    fn abandoned(&self) -> bool;
    /// Runs the job; `false` when it failed and its changes must go.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Reports the outcome once the transaction is settled.
    fn finish(self: Box<Self>, commit: Result<(), &DbError>);
}

type Reply<T, E> = oneshot::Sender<Result<T, Fail<E>>>;

struct Call<F, T, E> {
    f: Option<F>,
    out: Option<Result<T, Fail<E>>>,
    reply: Reply<T, E>,
}

impl<F, T, E> Job for Call<F, T, E>
where
    F: FnOnce(&Connection) -> Result<T, Fail<E>> + Send,
    T: Send,
    E: Send,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| f(conn))).unwrap_or_else(|_| {
            Err(Fail::Db(DbError {
                unavailable: false,
                busy: false,
                reason: String::from("internal error: a SQLite write panicked"),
                cause: None,
            }))
        });
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), &DbError>) {
        let out = match (commit, self.out) {
            (_, Some(Err(e))) => Err(e),
            (Ok(()), Some(Ok(v))) => Ok(v),
            (Err(e), _) => Err(Fail::Db(e.clone())),
            (Ok(()), None) => Err(Fail::Db(DbError::gone())),
        };
        let _ = self.reply.send(out);
    }
}

/// The connections of one database file in this process.
pub(crate) struct Db {
    writer: mpsc::Sender<Box<dyn Job>>,
    readers: Mutex<Vec<Connection>>,
    reader_slots: Semaphore,
    path: PathBuf,
    opts: SqliteOptions,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

/// Opens a connection with the adapter's settings.
pub(crate) fn connect(path: &Path, opts: &SqliteOptions) -> Result<Connection, DbError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(opts.busy_timeout)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(DbError {
            unavailable: false,
            busy: false,
            reason: format!("the database refused WAL mode (journal mode is {mode})"),
            cause: None,
        });
    }
    conn.pragma_update(
        None,
        "synchronous",
        if opts.synchronous_full {
            "FULL"
        } else {
            "NORMAL"
        },
    )?;
    // 4 MiB of page cache per connection (the default is 2 MiB). No memory
    // map: mapped pages count in the worker's RSS and grow with the file.
    conn.pragma_update(None, "cache_size", -4096)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "foreign_keys", false)?;
    // Claims cache a statement per (queue, limit) in use (see the broker).
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

impl Db {
    /// [`Db::open`], tried again while the file is busy or locked, for up
    /// to the busy timeout. Processes opening a new file at the same moment
    /// race for the locks that switching it to WAL and migrating it take,
    /// and SQLite answers some of those races with `SQLITE_BUSY` at once
    /// instead of waiting (seen: one of two workers started together exited
    /// with "database is locked"). Blocking.
    pub(crate) fn open_when_free(path: &Path, opts: &SqliteOptions) -> Result<Self, DbError> {
        let deadline = std::time::Instant::now() + opts.busy_timeout;
        let mut pause = std::time::Duration::from_millis(5);
        loop {
            match Self::open(path, opts) {
                Err(e) if e.busy && std::time::Instant::now() + pause < deadline => {
                    tracing::debug!(error = %e.reason, retry_in = ?pause, "SQLite file busy while opening; trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// Opens the writer connection (migrating the schema on it), starts the
    /// writer and checkpointer threads. Blocking: call off the runtime.
    pub(crate) fn open(path: &Path, opts: &SqliteOptions) -> Result<Self, DbError> {
        let mut conn = connect(path, opts)?;
        super::schema::migrate(&mut conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)?;
        let checkpointer = connect(path, opts)?;
        let (nudge, nudged) = mpsc::sync_channel::<()>(1);
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::thread::Builder::new()
            .name(String::from("stem-sqlite-checkpoint"))
            .spawn(move || checkpoint_loop(&checkpointer, &nudged))
            .map_err(|e| DbError {
                unavailable: true,
                busy: false,
                reason: format!("cannot start the checkpointer thread: {e}"),
                cause: Some(stem_core::Cause::new(e)),
            })?;
        std::thread::Builder::new()
            .name(String::from("stem-sqlite-writer"))
            .spawn(move || {
                tracing::debug!(db = %name, "SQLite writer started");
                write_loop(&conn, &rx, &nudge);
                tracing::debug!(db = %name, "SQLite writer stopped");
            })
            .map_err(|e| DbError {
                unavailable: true,
                busy: false,
                reason: format!("cannot start the writer thread: {e}"),
                cause: Some(stem_core::Cause::new(e)),
            })?;
        Ok(Self {
            writer: tx,
            readers: Mutex::new(Vec::new()),
            reader_slots: Semaphore::new(usize::try_from(opts.max_connections).unwrap_or(4)),
            path: path.to_path_buf(),
            opts: opts.clone(),
        })
    }

    /// Runs `f` on the writer thread inside a write transaction (grouped
    /// with whatever else is queued); answers after the commit.
    pub(crate) async fn write<F, T, E>(&self, f: F) -> Result<T, Fail<E>>
    where
        F: FnOnce(&Connection) -> Result<T, Fail<E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Call {
            f: Some(f),
            out: None,
            reply,
        });
        self.writer
            .send(job)
            .map_err(|_| Fail::Db(DbError::gone()))?;
        rx.await.map_err(|_| Fail::Db(DbError::gone()))?
    }

    /// Runs `f` on a reader connection on the blocking pool.
    pub(crate) async fn read<F, T, E>(&self, f: F) -> Result<T, Fail<E>>
    where
        F: FnOnce(&Connection) -> Result<T, Fail<E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let _slot = self
            .reader_slots
            .acquire()
            .await
            .map_err(|_| Fail::Db(DbError::gone()))?;
        let pooled = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let path = self.path.clone();
        let opts = self.opts.clone();
        let (conn, out) = tokio::task::spawn_blocking(move || {
            let conn = match pooled {
                Some(c) => c,
                None => match connect(&path, &opts) {
                    Ok(c) => c,
                    Err(e) => return (None, Err(Fail::Db(e))),
                },
            };
            let out = f(&conn);
            (Some(conn), out)
        })
        .await
        .map_err(|e| {
            Fail::Db(DbError {
                unavailable: false,
                busy: false,
                reason: format!("internal error: a SQLite read failed: {e}"),
                cause: Some(stem_core::Cause::new(e)),
            })
        })?;
        if let Some(conn) = conn {
            self.readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
        out
    }
}

fn write_loop(conn: &Connection, rx: &mpsc::Receiver<Box<dyn Job>>, nudge: &mpsc::SyncSender<()>) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_GROUP);
    let mut commits = 0u32;
    while let Some(first) = next_job(rx) {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batch.retain(|job| !job.abandoned());
        if batch.is_empty() {
            continue;
        }
        let settled = run_group(conn, &mut batch);
        for job in batch.drain(..) {
            job.finish(settled.as_ref().copied());
        }
        commits += 1;
        if commits >= COMMITS_PER_CHECKPOINT {
            commits = 0;
            let _ = nudge.try_send(());
        }
    }
}

/// How long the writer keeps looking for the next write before it sleeps.
const LINGER: std::time::Duration = std::time::Duration::from_micros(50);

/// The next write: a producer that awaits each publish sends its next one
/// a few microseconds after hearing back, so the writer looks again for a
/// moment (yielding the core) before it sleeps; a sleeping writer costs a
/// wake-up per write, which profiles of one-at-a-time publishing showed as
/// the largest cost. `None` once every sender is gone.
fn next_job(rx: &mpsc::Receiver<Box<dyn Job>>) -> Option<Box<dyn Job>> {
    let until = std::time::Instant::now() + LINGER;
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if std::time::Instant::now() < until => {
                std::thread::yield_now();
            }
            Err(mpsc::TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

/// One transaction around every job of `batch`; a job that fails is rolled
/// back to its savepoint (or, alone, the whole transaction).
fn run_group(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), DbError> {
    exec(conn, "BEGIN IMMEDIATE")?;
    let single = batch.len() == 1;
    let mut any_ok = false;
    for job in batch.iter_mut() {
        if single {
            any_ok = job.run(conn);
            continue;
        }
        if let Err(e) = exec(conn, "SAVEPOINT stem_job") {
            let _ = exec(conn, "ROLLBACK");
            return Err(e);
        }
        if job.run(conn) {
            any_ok = true;
            if let Err(e) = exec(conn, "RELEASE stem_job") {
                let _ = exec(conn, "ROLLBACK");
                return Err(e);
            }
        } else if let Err(e) =
            exec(conn, "ROLLBACK TO stem_job").and_then(|()| exec(conn, "RELEASE stem_job"))
        {
            let _ = exec(conn, "ROLLBACK");
            return Err(e);
        }
    }
    let end = if any_ok { "COMMIT" } else { "ROLLBACK" };
    exec(conn, end).inspect_err(|_| {
        let _ = exec(conn, "ROLLBACK");
    })
}

fn exec(conn: &Connection, sql: &str) -> Result<(), DbError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Copies the WAL back into the database when nudged, without blocking the
/// writer (PASSIVE), so the writer's own commits never pay for it.
fn checkpoint_loop(conn: &Connection, nudged: &mpsc::Receiver<()>) {
    while nudged.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "WAL checkpoint skipped");
        }
    }
}
