//! The schema of a namespace: its name, and the versioned migrations that
//! create and upgrade it under an advisory lock.

use sqlx::{AssertSqlSafe, Connection, PgPool};

/// Postgres's limit on identifiers is 63 bytes; names are kept to 55 so a
/// suffix still fits.
const MAX_NAME: usize = 55;

/// The first key of the advisory lock every migration takes (the second is
/// the schema's hash): Stem's own, fixed.
const LOCK_KEY: i32 = 7_355_608;

/// The schema a namespace lives in: `stem_` and the namespace with every
/// byte other than `a-z` and `0-9` written as `_` and two hex digits, so
/// no two namespaces meet (`app:jobs` is `stem_app_3ajobs`, `app_jobs` is
/// `stem_app_5fjobs`). A name longer than 55 bytes becomes `stemh_` and 32
/// hex digits of a hash of the namespace; the schema remembers its
/// namespace and a client of another namespace is refused.
///
/// ```
/// use stem_adapters::postgres::schema_name;
/// assert_eq!(schema_name("app"), "stem_app");
/// assert_eq!(schema_name("app:jobs"), "stem_app_3ajobs");
/// assert_ne!(schema_name("app:jobs"), schema_name("app.jobs"));
/// assert!(schema_name(&"x".repeat(100)).starts_with("stemh_"));
/// ```
#[must_use]
pub fn schema_name(namespace: &str) -> String {
    let mut out = String::from("stem_");
    for b in namespace.bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    if out.len() <= MAX_NAME {
        return out;
    }
    // Two independent 64-bit FNV-1a hashes: 128 bits.
    let fnv = |seed: u64| {
        namespace.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    format!(
        "stemh_{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x6c62_272e_07bb_0142)
    )
}

/// Checks a schema name given by hand: lowercase letters, digits and `_`,
/// starting with a letter or `_`, at most 55 bytes (so it never needs
/// quoting rules a person could get wrong).
pub(crate) fn check_schema_name(name: &str) -> Result<(), String> {
    let ok_start = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if !ok_start
        || name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "`{name}` is not a schema name Stem accepts: use 1 to {MAX_NAME} lowercase letters, digits and `_`, starting with a letter"
        ));
    }
    Ok(())
}

/// The migrations, in order; `{S}` is the quoted schema. The version of a
/// schema is how many of them ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE {S}.jobs (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  queue       text        NOT NULL,
  priority    smallint    NOT NULL,
  state       smallint    NOT NULL,
  due         timestamptz NOT NULL,
  token       bigint      NOT NULL DEFAULT 0,
  deliveries  integer     NOT NULL DEFAULT 0,
  attempt     integer     NOT NULL DEFAULT 0,
  last_error  text,
  task_id     uuid        NOT NULL,
  unique_key  text,
  unique_on_finish boolean NOT NULL DEFAULT false,
  envelope    bytea       NOT NULL
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);
COMMENT ON COLUMN {S}.jobs.state IS '0 ready, 1 delayed (due = when it becomes ready), 2 leased (due = lease deadline)';
COMMENT ON COLUMN {S}.jobs.token IS 'the fence: raised at every hand-out and every settlement';
CREATE INDEX jobs_ready ON {S}.jobs (queue, priority DESC, id) WHERE state = 0;
CREATE INDEX jobs_due ON {S}.jobs (queue, due) WHERE state > 0;

CREATE TABLE {S}.dead (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  queue       text        NOT NULL,
  task_id     uuid        NOT NULL,
  reason      text        NOT NULL,
  error       text,
  dead_at     timestamptz NOT NULL DEFAULT now(),
  expires_at  timestamptz NOT NULL,
  attempt     integer     NOT NULL,
  last_error  text,
  unique_key  text,
  unique_on_finish boolean NOT NULL DEFAULT false,
  envelope    bytea,
  raw         text
);
CREATE INDEX dead_queue ON {S}.dead (queue, id);
CREATE INDEX dead_task ON {S}.dead (queue, task_id);
CREATE INDEX dead_expires ON {S}.dead (expires_at);

CREATE TABLE {S}.uniq (key text PRIMARY KEY, holder uuid NOT NULL, until timestamptz NOT NULL);
CREATE INDEX uniq_until ON {S}.uniq (until);

CREATE TABLE {S}.broadcast (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  channel text NOT NULL,
  payload text NOT NULL,
  sent_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX broadcast_channel ON {S}.broadcast (channel, id);
CREATE INDEX broadcast_sent ON {S}.broadcast (sent_at);

CREATE TABLE {S}.leader (
  one boolean PRIMARY KEY DEFAULT true CHECK (one),
  holder text NOT NULL,
  until timestamptz NOT NULL
);

CREATE TABLE {S}.results (
  id uuid PRIMARY KEY,
  state text NOT NULL,
  terminal boolean NOT NULL,
  attempts integer NOT NULL,
  expires_at timestamptz NOT NULL,
  record jsonb NOT NULL
);
CREATE INDEX results_expires ON {S}.results (expires_at);
CREATE TABLE {S}.groups (
  id uuid PRIMARY KEY,
  members uuid[] NOT NULL,
  callback bytea,
  fired boolean NOT NULL DEFAULT false,
  expires_at timestamptz NOT NULL
);
CREATE INDEX groups_expires ON {S}.groups (expires_at);
CREATE TABLE {S}.workers (
  worker_id text PRIMARY KEY,
  seen_at timestamptz NOT NULL,
  interval_ms bigint NOT NULL,
  heartbeat jsonb NOT NULL
);
CREATE TABLE {S}.revoked (id uuid PRIMARY KEY, expires_at timestamptz NOT NULL);
CREATE INDEX revoked_expires ON {S}.revoked (expires_at);

CREATE VIEW {S}.jobs_v AS
SELECT id, queue, priority,
       CASE state WHEN 0 THEN 'ready' WHEN 1 THEN 'delayed' ELSE 'leased' END AS state,
       due, deliveries, attempt, last_error, task_id, unique_key,
       convert_from(envelope, 'UTF8') AS envelope
FROM {S}.jobs;
"#];

/// The version this build writes.
pub(crate) const VERSION: usize = MIGRATIONS.len();

/// Why a schema could not be made ready.
#[derive(Debug)]
pub(crate) enum MigrateError {
    /// The database said no.
    Db(sqlx::Error),
    /// The schema is someone else's, or newer than this build.
    Refused(String),
}

impl From<sqlx::Error> for MigrateError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e)
    }
}

/// Creates or upgrades `schema` for `namespace`. The fast path reads the
/// version without a lock; anything missing is done in one transaction
/// behind `pg_advisory_xact_lock`, so concurrent clients wait for one
/// another instead of racing on `CREATE`.
pub(crate) async fn migrate(
    pool: &PgPool,
    schema: &str,
    namespace: &str,
) -> Result<(), MigrateError> {
    let q = quote(schema);
    let read = format!(
        "SELECT (SELECT value FROM {q}.meta WHERE key = 'version'), (SELECT value FROM {q}.meta WHERE key = 'namespace')"
    );
    if let Ok((Some(v), Some(ns))) =
        sqlx::query_as::<_, (Option<String>, Option<String>)>(AssertSqlSafe(read.clone()))
            .fetch_one(pool)
            .await
        && v == VERSION.to_string()
    {
        return check_namespace(schema, &ns, namespace);
    }
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(LOCK_KEY)
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {q}; CREATE TABLE IF NOT EXISTS {q}.meta (key text PRIMARY KEY, value text NOT NULL);"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {q}.meta (key, value) VALUES ('namespace', $1) ON CONFLICT (key) DO NOTHING"
    )))
    .bind(namespace)
    .execute(&mut *tx)
    .await?;
    let (v, ns) = sqlx::query_as::<_, (Option<String>, Option<String>)>(AssertSqlSafe(read))
        .fetch_one(&mut *tx)
        .await?;
    check_namespace(schema, ns.as_deref().unwrap_or(namespace), namespace)?;
    let have: usize = match v {
        None => 0,
        Some(v) => v.parse().map_err(|_| {
            MigrateError::Refused(format!(
                "schema {schema} has version `{v}`, which is not a number: it was not made by Stem"
            ))
        })?,
    };
    if have > VERSION {
        return Err(MigrateError::Refused(format!(
            "schema {schema} is at version {have}, newer than this build of Stem knows ({VERSION}): upgrade Stem"
        )));
    }
    for script in &MIGRATIONS[have..] {
        sqlx::raw_sql(AssertSqlSafe(script.replace("{S}", &q)))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {q}.meta (key, value) VALUES ('version', $1) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
    )))
    .bind(VERSION.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if have < VERSION {
        tracing::info!(
            schema,
            from = have,
            to = VERSION,
            "migrated the Stem schema"
        );
    }
    Ok(())
}

fn check_namespace(schema: &str, stored: &str, namespace: &str) -> Result<(), MigrateError> {
    if stored == namespace {
        Ok(())
    } else {
        Err(MigrateError::Refused(format!(
            "schema {schema} belongs to namespace `{stored}`, not `{namespace}`: pick another `schema` (or namespace)"
        )))
    }
}

/// `name` as a quoted identifier.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_injective_and_short() {
        let names = [
            "app", "app2", "app:jobs", "app.jobs", "app_jobs", "App", "ünï",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let s = schema_name(n);
            assert!(s.len() <= MAX_NAME, "{s}");
            assert!(check_schema_name(&s).is_ok(), "{s}");
            assert!(seen.insert(s.clone()), "{n} -> {s} met another");
        }
        assert_eq!(schema_name("App"), "stem__41pp");
        let long = schema_name(&"a".repeat(60));
        assert!(long.starts_with("stemh_") && long.len() == 38, "{long}");
        assert_ne!(long, schema_name(&"a".repeat(61)));
        assert!(check_schema_name("9x").is_err());
        assert!(check_schema_name("").is_err());
        assert!(check_schema_name("a\"b").is_err());
    }
}
