//! One set of connections (writer thread, readers) and one set of wake-up
//! signals per database file per process, shared by every broker and
//! backend client opened on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::SqliteOptions;
use super::db::{Db, DbError};
use super::wake::Wake;

/// What clients of one file share.
pub(crate) struct Shared {
    pub(crate) db: Db,
    pub(crate) path: PathBuf,
    /// Wakes waiters in this process and in the others on the same file.
    pub(crate) wake: Wake,
    /// Notices the file being deleted or replaced under this process.
    pub(crate) watch: FileWatch,
}

/// How often the cheap check ([`Shared::check_file`]) looks at the path.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A file's device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file `path` names now: `Ok(None)` when the
    /// path is missing, or off Unix (where the check is skipped).
    #[cfg(unix)]
    fn of(path: &Path) -> std::io::Result<Option<Self>> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(Self {
                dev: m.dev(),
                ino: m.ino(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    #[cfg(not(unix))]
    #[allow(clippy::unnecessary_wraps)]
    fn of(_path: &Path) -> std::io::Result<Option<Self>> {
        Ok(None)
    }
}

/// The identity of the file this process opened, checked against what the
/// path names now. A worker holding a deleted (or replaced) file keeps
/// working on it while new producers create a new file at the path: a
/// silent split. Once noticed, it stays noticed: every later call fails.
pub(crate) struct FileWatch {
    /// At open; `None` when unknown (then nothing is checked).
    opened: Option<FileId>,
    /// When the path was last looked at.
    checked_at: Mutex<Option<Instant>>,
    /// Why the file is no longer the one at the path, once noticed.
    gone: OnceLock<String>,
}

impl FileWatch {
    fn new(path: &Path) -> Self {
        let opened = FileId::of(path).unwrap_or_else(|e| {
            tracing::debug!(error = %e, db = %path.display(), "cannot stat the SQLite file; not watching it for replacement");
            None
        });
        Self {
            opened,
            checked_at: Mutex::new(Some(Instant::now())),
            gone: OnceLock::new(),
        }
    }

    /// Looks at the path now (or, unless `force`, only if it was not
    /// looked at in the last second). `Err` with the reason once the path
    /// no longer names the file that was opened.
    fn check(&self, path: &Path, force: bool) -> Result<(), &str> {
        if let Some(why) = self.gone.get() {
            return Err(why);
        }
        let Some(opened) = self.opened else {
            return Ok(());
        };
        {
            let mut at = self
                .checked_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !force && at.is_some_and(|t| t.elapsed() < CHECK_EVERY) {
                return Ok(());
            }
            *at = Some(Instant::now());
        }
        let change = match FileId::of(path) {
            Ok(Some(now)) if now == opened => return Ok(()),
            Ok(Some(now)) => format!(
                "device/inode changed from {}/{} to {}/{}",
                opened.dev, opened.ino, now.dev, now.ino
            ),
            Ok(None) => format!(
                "device/inode {}/{}; the path is now missing",
                opened.dev, opened.ino
            ),
            // Cannot tell (permissions, I/O): not proof of a split.
            Err(e) => {
                tracing::debug!(error = %e, db = %path.display(), "cannot stat the SQLite file to check it is the one open");
                return Ok(());
            }
        };
        let why = format!(
            "the SQLite file at {p} was deleted or replaced while this process had it open ({change}); restart the worker so it opens the file now at {p}",
            p = path.display()
        );
        if self.gone.set(why).is_ok() {
            tracing::error!(db = %path.display(), "{}", self.gone.get().map_or("", String::as_str));
        }
        Err(self.gone.get().map_or("", String::as_str))
    }
}

impl Shared {
    pub(crate) fn describe(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    /// The adapter's name, the reason and SQLite's error, sorted: `Ok`
    /// for storage errors, `Err` when the database is unreachable.
    pub(crate) fn classify(&self, e: &DbError) -> Result<Parts, Parts> {
        let parts = (self.describe(), e.reason.clone(), e.cause.clone());
        if e.unavailable { Err(parts) } else { Ok(parts) }
    }

    /// Whether the path still names the file this process has open,
    /// looked at once a second at most (cheap enough for every fetch).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`](stem_core::BrokerError::Unavailable)
    /// naming the path and what happened, once the file was deleted or
    /// replaced (logged at ERROR the first time).
    pub(crate) fn check_file(&self) -> Result<(), stem_core::BrokerError> {
        self.check_file_with(false)
    }

    /// [`Self::check_file`], looking at the path now.
    pub(crate) fn check_file_now(&self) -> Result<(), stem_core::BrokerError> {
        self.check_file_with(true)
    }

    /// For fetches: [`BrokerError::Closed`](stem_core::BrokerError::Closed)
    /// instead, which a worker's fetcher takes as a reason to stop (so a
    /// supervisor restarts it on the file now at the path) rather than
    /// one to retry. The precise reason is logged at ERROR when noticed.
    pub(crate) fn check_file_for_fetch(&self) -> Result<(), stem_core::BrokerError> {
        self.watch
            .check(&self.path, false)
            .map_err(|_| stem_core::BrokerError::Closed)
    }

    fn check_file_with(&self, force: bool) -> Result<(), stem_core::BrokerError> {
        self.watch
            .check(&self.path, force)
            .map_err(|why| stem_core::BrokerError::Unavailable {
                adapter: self.describe(),
                reason: why.to_owned(),
                source: None,
            })
    }
}

/// Adapter name, reason, cause.
pub(crate) type Parts = (String, String, Option<stem_core::Cause>);

type Registry = Mutex<HashMap<PathBuf, Weak<Shared>>>;

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(Registry::default)
}

/// Why a file could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open SQLite database {path}: {reason}")]
pub(crate) struct OpenError {
    pub(crate) path: String,
    pub(crate) reason: String,
    #[source]
    pub(crate) cause: Option<stem_core::Cause>,
}

impl From<OpenError> for stem_core::BrokerError {
    fn from(e: OpenError) -> Self {
        Self::Unavailable {
            adapter: format!("sqlite://{}", e.path),
            reason: e.reason,
            source: e.cause,
        }
    }
}

impl From<OpenError> for stem_core::BackendError {
    fn from(e: OpenError) -> Self {
        Self::Unavailable {
            adapter: format!("sqlite://{}", e.path),
            reason: e.reason,
            source: e.cause,
        }
    }
}

/// How a client gets its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sharing {
    /// The process-wide set for the file (one writer thread per file).
    Process,
    /// A set of its own, as a second process would have.
    Own,
}

pub(crate) async fn open(
    path: &Path,
    opts: &SqliteOptions,
    sharing: Sharing,
) -> Result<Arc<Shared>, OpenError> {
    let err = |reason: String, cause: Option<stem_core::Cause>| OpenError {
        path: path.display().to_string(),
        reason,
        cause,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            let reason = format!("cannot create directory {}", parent.display());
            err(reason, Some(stem_core::Cause::new(e)))
        })?;
    }
    // Canonicalise once the file can exist, so two spellings share a pool.
    let key = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(_) => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::canonicalize(parent)
                .map(|p| p.join(path.file_name().unwrap_or_default()))
                .unwrap_or_else(|_| path.to_path_buf())
        }
    };
    // A file deleted or replaced under this process is not reused: the
    // new client opens the file now at the path.
    if sharing == Sharing::Process
        && let Some(existing) = registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|s| s.watch.check(&s.path, true).is_ok())
    {
        return Ok(existing);
    }
    let db = {
        let key = key.clone();
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || Db::open_when_free(&key, &opts))
            .await
            .map_err(|e| err(e.to_string(), Some(stem_core::Cause::new(e))))?
            .map_err(|e| err(e.reason, e.cause))?
    };
    let shared = Arc::new(Shared {
        db,
        watch: FileWatch::new(&key),
        path: key.clone(),
        wake: Wake::new(&key),
    });
    if sharing == Sharing::Own {
        return Ok(shared);
    }
    let mut reg = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Another task may have opened it meanwhile: keep the first.
    if let Some(existing) = reg
        .get(&key)
        .and_then(Weak::upgrade)
        .filter(|s| s.watch.check(&s.path, true).is_ok())
    {
        return Ok(existing);
    }
    reg.retain(|_, w| w.strong_count() > 0);
    reg.insert(key, Arc::downgrade(&shared));
    Ok(shared)
}
