//! One set of connections (writer thread, readers) and one set of wake-up
//! signals per database file per process, shared by every broker and
//! backend client opened on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::SqliteOptions;
use super::db::{Db, DbError};
use super::wake::Wake;

/// What clients of one file share.
pub(crate) struct Shared {
    pub(crate) db: Db,
    pub(crate) path: PathBuf,
    /// Wakes waiters in this process and in the others on the same file.
    pub(crate) wake: Wake,
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

pub(crate) async fn open(path: &Path, opts: &SqliteOptions) -> Result<Arc<Shared>, OpenError> {
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
    if let Some(existing) = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&key)
        .and_then(Weak::upgrade)
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
        path: key.clone(),
        wake: Wake::new(&key),
    });
    let mut reg = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Another task may have opened it meanwhile: keep the first.
    if let Some(existing) = reg.get(&key).and_then(Weak::upgrade) {
        return Ok(existing);
    }
    reg.retain(|_, w| w.strong_count() > 0);
    reg.insert(key, Arc::downgrade(&shared));
    Ok(shared)
}
