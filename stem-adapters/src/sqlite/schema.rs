//! The schema, versioned with `PRAGMA user_version` and migrated inside
//! `BEGIN IMMEDIATE`, which takes the write lock first: of two processes
//! opening a new file at once, one migrates and the other then sees the
//! new version and does nothing.

use rusqlite::{Connection, TransactionBehavior};

use super::db::DbError;

/// Each entry upgrades the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: jobs, dead letters, unique keys, broadcasts, results, groups,
    // heartbeats, revocations.
    r"
    CREATE TABLE stem_jobs (
        seq        INTEGER PRIMARY KEY,
        ns         TEXT    NOT NULL,
        id         TEXT    NOT NULL,
        queue      TEXT    NOT NULL,
        priority   INTEGER NOT NULL,
        state      INTEGER NOT NULL,   -- 0 ready, 1 delayed, 2 leased
        due_ms     INTEGER NOT NULL,   -- delayed: not before; leased: lease deadline
        token      INTEGER NOT NULL DEFAULT 0,
        deliveries INTEGER NOT NULL DEFAULT 0,
        unique_key TEXT,
        unique_on_finish INTEGER NOT NULL DEFAULT 0,
        payload    BLOB    NOT NULL
    );
    CREATE UNIQUE INDEX stem_jobs_id ON stem_jobs (ns, id);
    CREATE INDEX stem_jobs_ready ON stem_jobs (ns, queue, state, priority DESC, seq);
    CREATE INDEX stem_jobs_due ON stem_jobs (ns, state, due_ms);

    CREATE TABLE stem_dead (
        seq        INTEGER PRIMARY KEY,
        ns         TEXT    NOT NULL,
        queue      TEXT    NOT NULL,
        id         TEXT    NOT NULL,
        reason     TEXT    NOT NULL,
        error      TEXT,
        dead_ms    INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        envelope   BLOB,
        raw        TEXT
    );
    CREATE INDEX stem_dead_queue ON stem_dead (ns, queue, seq);
    CREATE INDEX stem_dead_expiry ON stem_dead (ns, expires_ms);

    CREATE TABLE stem_unique (
        ns         TEXT    NOT NULL,
        key        TEXT    NOT NULL,
        holder     TEXT    NOT NULL,
        until_ms   INTEGER NOT NULL,
        PRIMARY KEY (ns, key)
    ) WITHOUT ROWID;

    CREATE TABLE stem_broadcast (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        ns         TEXT    NOT NULL,
        channel    TEXT    NOT NULL,
        payload    TEXT    NOT NULL,
        sent_ms    INTEGER NOT NULL
    );
    CREATE INDEX stem_broadcast_channel ON stem_broadcast (ns, channel, seq);

    CREATE TABLE stem_results (
        ns         TEXT    NOT NULL,
        id         TEXT    NOT NULL,
        state      TEXT    NOT NULL,
        terminal   INTEGER NOT NULL,
        attempts   INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        record     BLOB    NOT NULL,
        PRIMARY KEY (ns, id)
    ) WITHOUT ROWID;
    CREATE INDEX stem_results_expiry ON stem_results (ns, expires_ms);

    CREATE TABLE stem_groups (
        ns         TEXT    NOT NULL,
        id         TEXT    NOT NULL,
        members    TEXT    NOT NULL,
        callback   BLOB,
        fired      INTEGER NOT NULL DEFAULT 0,
        expires_ms INTEGER NOT NULL,
        PRIMARY KEY (ns, id)
    ) WITHOUT ROWID;

    CREATE TABLE stem_workers (
        ns         TEXT    NOT NULL,
        worker_id  TEXT    NOT NULL,
        seen_ms    INTEGER NOT NULL,
        heartbeat  BLOB    NOT NULL,
        PRIMARY KEY (ns, worker_id)
    ) WITHOUT ROWID;

    CREATE TABLE stem_revoked (
        ns         TEXT    NOT NULL,
        id         TEXT    NOT NULL,
        expires_ms INTEGER NOT NULL,
        PRIMARY KEY (ns, id)
    ) WITHOUT ROWID;
    ",
    // 2: the ready index holds only ready rows and the due index only
    // delayed and leased ones, so a claim moves one entry out of the first
    // and one into the second instead of rewriting both, and the indexes
    // stay as small as the work they find.
    r"
    DROP INDEX stem_jobs_ready;
    DROP INDEX stem_jobs_due;
    CREATE INDEX stem_jobs_ready ON stem_jobs (ns, queue, priority DESC, seq) WHERE state = 0;
    CREATE INDEX stem_jobs_due ON stem_jobs (ns, due_ms) WHERE state > 0;
    ",
    // 3: no index on (ns, id). Every statement on a job finds it by `seq`
    // (receipts carry it), so the index was kept up for nothing but a
    // uniqueness the ids already have (UUIDv7 made per envelope); keeping
    // it was a third b-tree written per publish and per ack: autocommit
    // publishes measured 15.8k/s with it and 25.8k/s without.
    r"
    DROP INDEX stem_jobs_id;
    ",
    // 4: the namespace's housekeeping lease, so one worker of many runs
    // `maintain` (Broker::try_lead).
    r"
    CREATE TABLE stem_leader (
        ns         TEXT    NOT NULL PRIMARY KEY,
        holder     TEXT    NOT NULL,
        until_ms   INTEGER NOT NULL
    ) WITHOUT ROWID;
    ",
];

/// The schema version this build writes.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema to [`VERSION`]. Blocking.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), DbError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current == VERSION {
        return Ok(());
    }
    if current > VERSION {
        return Err(DbError {
            unavailable: false,
            busy: false,
            reason: format!(
                "the database schema is version {current}, newer than this build's {VERSION}: upgrade Stem"
            ),
            cause: None,
        });
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Read again under the write lock: another process may have migrated.
    let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        tx.execute_batch(sql)?;
        tracing::info!(version = i + 1, "SQLite schema migrated");
    }
    tx.pragma_update(None, "user_version", VERSION)?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_2_database_migrates_to_the_latest_and_keeps_its_jobs() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).expect("old migration");
        }
        conn.pragma_update(None, "user_version", 2)
            .expect("version");
        conn.execute(
            "INSERT INTO stem_jobs (ns, id, queue, priority, state, due_ms, payload) VALUES ('stem', 'a', 'q', 0, 0, 0, x'00')",
            [],
        )
        .expect("old row");
        migrate(&mut conn).expect("migration");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, VERSION);
        let jobs: i64 = conn
            .query_row("SELECT COUNT(*) FROM stem_jobs", [], |r| r.get(0))
            .expect("count");
        assert_eq!(jobs, 1, "the job survived");
        let id_index: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'stem_jobs_id'",
                [],
                |r| r.get(0),
            )
            .expect("schema");
        assert_eq!(id_index, 0, "the id index is gone");
        migrate(&mut conn).expect("a second run does nothing");
    }
}
