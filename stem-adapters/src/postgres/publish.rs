//! Storing envelopes (B1, B14, B16, B17): one multi-row statement per
//! batch, on the pool or on the caller's own connection.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use stem_core::broker::check_encoded_size;
use stem_core::envelope::UniqueRelease;
use stem_core::{BrokerError, Envelope, Published, TaskId};
use uuid::Uuid;

use super::client::Client;

/// Rows per statement: a bigger batch is split into several statements
/// inside one transaction.
const CHUNK: usize = 5_000;

/// A row and its place in the batch.
type Numbered = (usize, NewRow);

/// One envelope, checked and encoded, ready to bind.
pub(crate) struct NewRow {
    pub(crate) id: TaskId,
    pub(crate) queue: String,
    pub(crate) priority: i16,
    pub(crate) delay_ms: i64,
    pub(crate) attempt: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) bytes: Vec<u8>,
    pub(crate) unique: Option<(String, i64, bool)>,
}

/// Validates and encodes `env` (B16). The delay is taken relative to the
/// producer's own `enqueued_at` and applied to the server's clock, so a
/// producer clock that is off cannot shorten or stretch it (B18).
pub(crate) fn prepare(env: &Envelope, limit: usize) -> Result<NewRow, BrokerError> {
    env.validate()?;
    let bytes = env.encode()?;
    check_encoded_size(env, bytes.len(), limit)?;
    let delay_ms = env
        .not_before
        .map_or(0, |nb| (nb - env.enqueued_at).num_milliseconds().max(0));
    Ok(NewRow {
        id: env.id,
        queue: env.queue.clone(),
        priority: i16::from(env.priority),
        delay_ms,
        attempt: i32::try_from(env.attempt).unwrap_or(i32::MAX),
        last_error: env.last_error.clone(),
        bytes,
        unique: env.unique.as_ref().map(|u| {
            (
                u.key.clone(),
                (u.until - env.enqueued_at).num_milliseconds().max(0),
                u.release == UniqueRelease::OnFinish,
            )
        }),
    })
}

/// Stores `rows` on `conn`, in order: inside whatever transaction `conn`
/// is in (the caller's, for `publish_in`), else in one of its own when
/// the batch needs more than one statement.
pub(crate) async fn store(
    client: &Client,
    conn: &mut PgConnection,
    rows: Vec<NewRow>,
    own_tx: bool,
) -> Result<Vec<Published>, BrokerError> {
    let statements =
        rows.len().div_ceil(CHUNK) + usize::from(rows.iter().any(|r| r.unique.is_some()));
    if own_tx && statements > 1 {
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| client.broker_err("begin a publish", e))?;
        let out = store_in(client, &mut tx, rows).await?;
        tx.commit()
            .await
            .map_err(|e| client.broker_err("commit a publish", e))?;
        Ok(out)
    } else {
        store_in(client, conn, rows).await
    }
}

async fn store_in(
    client: &Client,
    conn: &mut PgConnection,
    rows: Vec<NewRow>,
) -> Result<Vec<Published>, BrokerError> {
    let mut out: Vec<Option<Published>> = vec![None; rows.len()];
    let (unique, plain): (Vec<Numbered>, Vec<Numbered>) = rows
        .into_iter()
        .enumerate()
        .partition(|(_, r)| r.unique.is_some());
    for chunk in plain.chunks(CHUNK) {
        insert_plain(client, conn, chunk).await?;
        for (i, r) in chunk {
            out[*i] = Some(Published::Stored(r.id));
        }
    }
    if !unique.is_empty() {
        insert_unique(client, conn, &unique, &mut out).await?;
    }
    out.into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| BrokerError::Storage {
            adapter: client.describe.clone(),
            reason: String::from("a publish left an envelope without an answer"),
            source: None,
        })
}

async fn insert_plain(
    client: &Client,
    conn: &mut PgConnection,
    rows: &[(usize, NewRow)],
) -> Result<(), BrokerError> {
    let n = rows.len();
    let (mut q, mut p, mut i, mut e, mut d, mut a, mut le) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    // (delayed, queue) pairs: a batch holds a handful, so a scan beats a
    // set; the payloads are formatted once per pair, not per row.
    let mut wake: Vec<(bool, &str)> = Vec::new();
    for (_, r) in rows {
        let note = (r.delay_ms > 0, r.queue.as_str());
        if !wake.contains(&note) {
            wake.push(note);
        }
        q.push(r.queue.as_str());
        p.push(r.priority);
        i.push(*r.id.as_uuid());
        e.push(r.bytes.as_slice());
        d.push(r.delay_ms);
        a.push(r.attempt);
        le.push(r.last_error.as_deref());
    }
    sqlx::query(AssertSqlSafe(client.sql.publish.clone()))
        .bind(q)
        .bind(p)
        .bind(i)
        .bind(e)
        .bind(d)
        .bind(a)
        .bind(le)
        .bind(&client.schema)
        .bind(
            wake.iter()
                .map(|(delayed, queue)| format!("{} {queue}", if *delayed { 't' } else { 'j' }))
                .collect::<Vec<_>>(),
        )
        .execute(conn)
        .await
        .map_err(|e| client.broker_err("publish", e))?;
    Ok(())
}

/// Stores rows with unique keys; a key held by a live envelope stores
/// nothing and answers with its holder. A key repeated in the batch is
/// taken by its first row; the later ones answer with that row's id.
async fn insert_unique(
    client: &Client,
    conn: &mut PgConnection,
    rows: &[(usize, NewRow)],
    out: &mut [Option<Published>],
) -> Result<(), BrokerError> {
    let mut first: HashMap<&str, TaskId> = HashMap::new();
    let mut batch: Vec<&(usize, NewRow)> = Vec::new();
    for row in rows {
        let Some((key, _, _)) = &row.1.unique else {
            continue;
        };
        match first.get(key.as_str()) {
            Some(holder) => out[row.0] = Some(Published::Duplicate(*holder)),
            None => {
                first.insert(key, row.1.id);
                batch.push(row);
            }
        }
    }
    let n = batch.len();
    let mut keys = Vec::with_capacity(n);
    let mut holders = Vec::with_capacity(n);
    let mut windows = Vec::with_capacity(n);
    let (mut q, mut p, mut e, mut d, mut a, mut le, mut f) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (_, r) in &batch {
        let (key, window, on_finish) = r
            .unique
            .as_ref()
            .map_or(("", 0, false), |(k, w, f)| (k.as_str(), *w, *f));
        keys.push(key);
        holders.push(*r.id.as_uuid());
        windows.push(window);
        q.push(r.queue.as_str());
        p.push(r.priority);
        e.push(r.bytes.as_slice());
        d.push(r.delay_ms);
        a.push(r.attempt);
        le.push(r.last_error.as_deref());
        f.push(on_finish);
    }
    let got: Vec<(String, Uuid, bool, i64)> =
        sqlx::query_as(AssertSqlSafe(client.sql.publish_unique.clone()))
            .bind(&keys)
            .bind(&holders)
            .bind(windows)
            .bind(q)
            .bind(p)
            .bind(&holders)
            .bind(e)
            .bind(d)
            .bind(a)
            .bind(le)
            .bind(&keys)
            .bind(f)
            .bind(&client.schema)
            .fetch_all(conn)
            .await
            .map_err(|e| client.broker_err("publish with a unique key", e))?;
    let held: HashMap<String, (Uuid, bool)> = got
        .into_iter()
        .map(|(k, holder, stored, _)| (k, (holder, stored)))
        .collect();
    for (i, r) in batch {
        let key = r.unique.as_ref().map_or("", |u| u.0.as_str());
        out[*i] = Some(match held.get(key) {
            Some((holder, true)) if *holder == *r.id.as_uuid() => Published::Stored(r.id),
            Some((holder, _)) => Published::Duplicate(TaskId::from_uuid(*holder)),
            None => {
                return Err(BrokerError::Storage {
                    adapter: client.describe.clone(),
                    reason: format!("the unique key `{key}` was neither taken nor found"),
                    source: None,
                });
            }
        });
    }
    Ok(())
}
