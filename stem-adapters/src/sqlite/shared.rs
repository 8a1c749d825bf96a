//! One connection pool and one set of wake-up signals per database file per
//! process, shared by every broker and backend client opened on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::wake::Wake;
use super::{SqliteOptions, schema};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// What clients of one file share.
pub(crate) struct Shared {
    pub(crate) pool: SqlitePool,
    pub(crate) path: PathBuf,
    /// Wakes waiters in this process and in the others on the same file.
    pub(crate) wake: Wake,
}

impl Shared {
    pub(crate) fn describe(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    /// Sorts a sqlx error: `Ok` for storage errors, `Err` when the database
    /// is unreachable (I/O, pool exhausted or closed); both with the
    /// adapter's name and the message.
    pub(crate) fn classify(&self, e: &sqlx::Error) -> Result<(String, String), (String, String)> {
        let parts = (self.describe(), e.to_string());
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => Err(parts),
            _ => Ok(parts),
        }
    }
}

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
}

impl From<OpenError> for stem_core::BrokerError {
    fn from(e: OpenError) -> Self {
        Self::Unavailable {
            adapter: format!("sqlite://{}", e.path),
            reason: e.reason,
        }
    }
}

impl From<OpenError> for stem_core::BackendError {
    fn from(e: OpenError) -> Self {
        Self::Unavailable {
            adapter: format!("sqlite://{}", e.path),
            reason: e.reason,
        }
    }
}

pub(crate) async fn open(path: &Path, opts: &SqliteOptions) -> Result<Arc<Shared>, OpenError> {
    let err = |reason: String| OpenError {
        path: path.display().to_string(),
        reason,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(format!("cannot create directory {}: {e}", parent.display())))?;
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
    let connect = SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| err(e.to_string()))?
        .filename(&key)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(if opts.synchronous_full {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        })
        .busy_timeout(opts.busy_timeout)
        .foreign_keys(false)
        .statement_cache_capacity(256)
        // 4 MiB of page cache per connection (the default is 2 MiB). No
        // memory map: mapped pages count in the worker's RSS and grow with
        // the file, and they bought nothing measurable here.
        .pragma("cache_size", "-4096")
        .pragma("temp_store", "memory");
    let pool = SqlitePoolOptions::new()
        .max_connections(opts.max_connections)
        .min_connections(1)
        .connect_with(connect)
        .await
        .map_err(|e| err(e.to_string()))?;
    schema::migrate(&pool)
        .await
        .map_err(|e| err(e.to_string()))?;
    let shared = Arc::new(Shared {
        pool,
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
