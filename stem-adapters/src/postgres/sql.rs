//! Every statement of the broker, written once per client for its schema.
//! Durations are bound as milliseconds and turned into intervals by the
//! server, so its clock decides every deadline. `$ch` below is the
//! schema's notification channel.

use std::sync::Arc;

/// The broker's statements for one schema.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) publish: Arc<str>,
    pub(crate) publish_unique: Arc<str>,
    pub(crate) claim: Arc<str>,
    pub(crate) peek: Arc<str>,
    pub(crate) extend: Arc<str>,
    pub(crate) settle: Arc<str>,
    pub(crate) settle_records: Arc<str>,
    pub(crate) stats: Arc<str>,
    pub(crate) queues: Arc<str>,
    pub(crate) purge: Arc<str>,
    pub(crate) dead_list: Arc<str>,
    pub(crate) dead_count: Arc<str>,
    pub(crate) dead_get: Arc<str>,
    pub(crate) dead_take: Arc<str>,
    pub(crate) dead_purge: Arc<str>,
    pub(crate) take_key: Arc<str>,
    pub(crate) replay_insert: Arc<str>,
    pub(crate) broadcast_send: Arc<str>,
    pub(crate) broadcast_last: Arc<str>,
    pub(crate) broadcast_read: Arc<str>,
    pub(crate) lead: Arc<str>,
    pub(crate) sweep: Arc<str>,
    pub(crate) dead_tuples: Arc<str>,
    pub(crate) vacuum: Arc<str>,
    pub(crate) may_vacuum: Arc<str>,
    pub(crate) insert_raw: Arc<str>,
}

/// Rows without a unique key: one multi-row insert over arrays, and one
/// notification per queue (`j <queue>` when ready now, `t <queue>` when
/// delayed: a new due time a sleeping consumer may want to wake for),
/// computed by the client ($9): the insert returns nothing, and the
/// notifications go only if it succeeds (one statement).
/// $1 queues, $2 priorities, $3 task ids, $4 envelopes, $5 delays (ms),
/// $6 attempts, $7 last errors, $8 channel, $9 notification payloads.
const PUBLISH: &str = "
WITH ins AS (
  INSERT INTO {S}.jobs (queue, priority, state, due, task_id, envelope, attempt, last_error)
  SELECT q, p, CASE WHEN d > 0 THEN 1 ELSE 0 END, now() + d * interval '1 millisecond', i, e, a, le
  FROM UNNEST($1::text[], $2::int2[], $3::uuid[], $4::bytea[], $5::int8[], $6::int4[], $7::text[])
    AS u(q, p, i, e, d, a, le)
)
SELECT count(pg_notify($8, n))::int8 FROM unnest($9::text[]) n";

/// Rows with a unique key: each key is taken with `ON CONFLICT`, which
/// waits for a concurrent taker and then sees its committed row, so every
/// contender learns the true holder in this one statement. The update
/// rewrites a live key with its own values (so it is returned) and hands
/// an expired one to the new holder; a row is inserted only where this
/// statement took the key (its holder, with the deadline computed now).
/// $1 keys, $2 holders, $3 windows (ms), then the rows: $4 queues,
/// $5 priorities, $6 task ids, $7 envelopes, $8 delays, $9 attempts,
/// $10 last errors, $11 keys, $12 released on finish, $13 channel.
const PUBLISH_UNIQUE: &str = "
WITH want AS (
  SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::int8[]) AS w(key, holder, window_ms)
), taken AS (
  INSERT INTO {S}.uniq AS u (key, holder, until)
  SELECT key, holder, now() + window_ms * interval '1 millisecond' FROM want
  ON CONFLICT (key) DO UPDATE
    SET holder = CASE WHEN u.until <= now() THEN EXCLUDED.holder ELSE u.holder END,
        until  = CASE WHEN u.until <= now() THEN EXCLUDED.until  ELSE u.until  END
  RETURNING u.key, u.holder, u.until
), ins AS (
  INSERT INTO {S}.jobs (queue, priority, state, due, task_id, envelope, attempt, last_error, unique_key, unique_on_finish)
  SELECT r.q, r.p, CASE WHEN r.d > 0 THEN 1 ELSE 0 END, now() + r.d * interval '1 millisecond',
         r.i, r.e, r.a, r.le, r.k, r.f
  FROM UNNEST($4::text[], $5::int2[], $6::uuid[], $7::bytea[], $8::int8[], $9::int4[], $10::text[], $11::text[], $12::bool[])
    AS r(q, p, i, e, d, a, le, k, f)
  JOIN taken t ON t.key = r.k AND t.holder = r.i
  JOIN want w ON w.key = r.k
  WHERE t.until = now() + w.window_ms * interval '1 millisecond'
  RETURNING task_id, queue, state
), wake AS (
  SELECT pg_notify($13, CASE WHEN state = 0 THEN 'j ' ELSE 't ' END || queue)
  FROM (SELECT DISTINCT queue, state FROM ins) w
)
SELECT t.key, t.holder, EXISTS (SELECT 1 FROM ins WHERE ins.task_id = t.holder),
       (SELECT count(*) FROM wake)::int8
FROM taken t";

/// Leases the best `$2` ready rows of queue `$1` (priority, then enqueue
/// order, by the ready index) and, in the same statement, up to `$3` rows
/// whose delay or lease ran out: those that earn a place are leased here
/// (a new token fences the old receipt), the others become ready. Returns
/// the leased rows, or one row of NULLs with the milliseconds until the
/// queue's next due time, so an idle consumer knows how long to sleep (only
/// then: the look steps over the due index's dead entries, which a busy
/// queue has many of between vacuums).
/// $4 lease (ms).
const CLAIM: &str = "
WITH ready AS (
  SELECT id, priority FROM {S}.jobs
  WHERE queue = $1 AND state = 0
  ORDER BY priority DESC, id
  LIMIT $2
  FOR UPDATE SKIP LOCKED
), due AS (
  SELECT id, priority FROM {S}.jobs
  WHERE queue = $1 AND state > 0 AND due <= now()
  ORDER BY due
  LIMIT $3
  FOR UPDATE SKIP LOCKED
), pick AS (
  SELECT id FROM (SELECT id, priority FROM ready UNION ALL SELECT id, priority FROM due) c
  ORDER BY priority DESC, id
  LIMIT $2
), leased AS (
  UPDATE {S}.jobs j
  SET state = 2, due = now() + $4 * interval '1 millisecond', token = j.token + 1,
      deliveries = j.deliveries + 1
  FROM pick WHERE j.id = pick.id
  RETURNING j.id, j.priority, j.token, j.deliveries, j.attempt, j.last_error, j.envelope
), promoted AS (
  UPDATE {S}.jobs j SET state = 0
  FROM due WHERE j.id = due.id AND NOT EXISTS (SELECT 1 FROM pick WHERE pick.id = due.id)
  RETURNING j.id
)
SELECT l.id, l.priority, l.token, l.deliveries, l.attempt, l.last_error, l.envelope,
       (SELECT count(*) FROM promoted)::int8,
       CASE WHEN l.id IS NULL THEN
         (SELECT floor(extract(epoch FROM (min(due) - now())) * 1000)::int8
            FROM {S}.jobs WHERE queue = $1 AND state > 0)
       END
FROM (SELECT 1) one LEFT JOIN leased l ON true";

/// Whether any of the queues `$1` has a ready row or a due one, and the
/// milliseconds to their earliest due row: one look before a claim per
/// queue, for an idle consumer woken by its clock.
const PEEK: &str = "
SELECT EXISTS (SELECT 1 FROM unnest($1::text[]) q(name)
               WHERE EXISTS (SELECT 1 FROM {S}.jobs WHERE queue = q.name AND state = 0)),
       (SELECT floor(extract(epoch FROM (min(due) - now())) * 1000)::int8
          FROM {S}.jobs WHERE queue = ANY($1) AND state > 0)";

/// Pushes live leases to now + `$3` ms; fenced by the token alone.
const EXTEND: &str = "
UPDATE {S}.jobs j SET state = 2, due = now() + $3 * interval '1 millisecond'
FROM UNNEST($1::int8[], $2::int8[]) AS r(id, token)
WHERE j.id = r.id AND j.token = r.token
RETURNING j.id, j.token";

/// One statement per batch of settlements, each fenced by its token.
/// kind: 0 ack (delete), 1 retry (charge, keep the error), 2 release, 3
/// dead letter (moved to `dead`, charged when `charge`; `raw` is set for
/// bytes that are no envelope). An ack or dead letter frees an
/// until-finished unique key; a requeue notifies its queue.
/// $1 ids, $2 tokens, $3 kinds, $4 delays (ms), $5 errors, $6 reasons,
/// $7 charges, $8 raw texts, $9 dead-letter retention (ms), $10 channel.
/// This is its first part: the batch as rows.
const SETTLE_HEAD: &str = "
WITH s AS (
  SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int2[], $4::int8[], $5::text[], $6::text[], $7::bool[], $8::text[])
    AS s(id, token, kind, after_ms, error, reason, charge, raw)";

/// The settlements themselves, ending in `done`: the rows whose lease was
/// live.
const SETTLE_BODY: &str = "
), acked AS (
  DELETE FROM {S}.jobs j USING s
  WHERE s.kind = 0 AND j.id = s.id AND j.token = s.token
  RETURNING j.id, j.task_id, j.unique_key, j.unique_on_finish
), requeued AS (
  UPDATE {S}.jobs j SET
    state = CASE WHEN s.after_ms > 0 THEN 1 ELSE 0 END,
    due = now() + s.after_ms * interval '1 millisecond',
    token = j.token + 1,
    attempt = j.attempt + CASE WHEN s.kind = 1 THEN 1 ELSE 0 END,
    last_error = CASE WHEN s.kind = 1 THEN s.error ELSE j.last_error END
  FROM s WHERE s.kind IN (1, 2) AND j.id = s.id AND j.token = s.token
  RETURNING j.id, j.queue, j.state
), buried AS (
  DELETE FROM {S}.jobs j USING s
  WHERE s.kind = 3 AND j.id = s.id AND j.token = s.token
  RETURNING j.id, j.queue, j.task_id, j.unique_key, j.unique_on_finish, j.envelope, j.attempt,
            j.last_error, s.reason, s.error AS s_error, s.charge, s.raw
), dead_in AS (
  INSERT INTO {S}.dead (queue, task_id, reason, error, expires_at, attempt, last_error,
                        unique_key, unique_on_finish, envelope, raw)
  SELECT queue, task_id, reason, s_error, now() + $9 * interval '1 millisecond',
         attempt + CASE WHEN charge THEN 1 ELSE 0 END,
         CASE WHEN charge AND s_error IS NOT NULL THEN s_error ELSE last_error END,
         unique_key, unique_on_finish, CASE WHEN raw IS NULL THEN envelope END, raw
  FROM buried
), freed AS (
  DELETE FROM {S}.uniq u USING (
    SELECT unique_key, task_id FROM acked WHERE unique_on_finish
    UNION ALL SELECT unique_key, task_id FROM buried WHERE unique_on_finish) f
  WHERE u.key = f.unique_key AND u.holder = f.task_id
), wake AS (
  SELECT pg_notify($10, CASE WHEN state = 0 THEN 'j ' ELSE 't ' END || queue)
  FROM (SELECT DISTINCT queue, state FROM requeued) q
), done AS (
  SELECT id FROM acked UNION ALL SELECT id FROM requeued UNION ALL SELECT id FROM buried
)";

/// The end of SETTLE without records.
const SETTLE_TAIL: &str = "
SELECT x.id, (SELECT count(*) FROM wake)::int8 FROM done x";

/// The first part of a settle batch that writes records: the record
/// columns ($11..$16: id, state, terminal, attempts, ttl ms, json) are
/// NULL where no record goes along.
const SETTLE_RECORDS_HEAD: &str = "
WITH s AS (
  SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int2[], $4::int8[], $5::text[], $6::text[], $7::bool[], $8::text[],
                       $11::uuid[], $12::text[], $13::bool[], $14::int4[], $15::int8[], $16::text[])
    AS s(id, token, kind, after_ms, error, reason, charge, raw, rid, rstate, rterminal, rattempts, rttl, rjson)";

/// The end of SETTLE with records: each record is written only where its
/// settlement's lease was held (it is in `done`), by the R1 rule, and a
/// terminal one notifies its waiters.
const SETTLE_RECORDS_TAIL: &str = "
, records AS (
  {UPSERT}
), rwake AS (
  SELECT pg_notify($10, 'r ' || id) FROM records WHERE terminal
)
SELECT x.id, (SELECT count(*) FROM wake)::int8 + (SELECT count(*) FROM rwake)::int8 FROM done x";

/// Counts of one queue; an expired lease counts as ready.
const STATS: &str = "
SELECT (SELECT count(*) FROM {S}.jobs WHERE queue = $1 AND state = 0)
         + count(*) FILTER (WHERE due <= now()),
       count(*) FILTER (WHERE state = 1 AND due > now()),
       count(*) FILTER (WHERE state = 2 AND due > now()),
       (SELECT count(*) FROM {S}.dead WHERE queue = $1 AND expires_at > now())
FROM {S}.jobs WHERE queue = $1 AND state > 0";

/// Counts of every queue that holds something, by name, as `STATS`
/// counts one: grouped over the jobs and the live dead letters, joined.
const QUEUES: &str = "
WITH j AS (
  SELECT queue,
         count(*) FILTER (WHERE state = 0 OR due <= now()) AS ready,
         count(*) FILTER (WHERE state = 1 AND due > now()) AS delayed,
         count(*) FILTER (WHERE state = 2 AND due > now()) AS leased
  FROM {S}.jobs GROUP BY queue
), d AS (
  SELECT queue, count(*) AS dead FROM {S}.dead WHERE expires_at > now() GROUP BY queue
)
SELECT COALESCE(j.queue, d.queue), COALESCE(j.ready, 0)::int8, COALESCE(j.delayed, 0)::int8,
       COALESCE(j.leased, 0)::int8, COALESCE(d.dead, 0)::int8
FROM j FULL JOIN d ON j.queue = d.queue ORDER BY 1";

/// Removes a queue's ready and delayed rows (and expired leases, which
/// count as ready), freeing their unique keys.
const PURGE: &str = "
WITH gone AS (
  DELETE FROM {S}.jobs WHERE queue = $1 AND (state IN (0, 1) OR due <= now())
  RETURNING task_id, unique_key
), freed AS (
  DELETE FROM {S}.uniq u USING gone g WHERE u.key = g.unique_key AND u.holder = g.task_id
)
SELECT count(*)::int8 FROM gone";

const DEAD_LIST: &str = "
SELECT id, task_id, reason, error, dead_at, envelope, raw, attempt, last_error FROM {S}.dead
WHERE queue = $1 AND id >= $2 AND expires_at > now() ORDER BY id LIMIT $3";

/// The live dead letter of one task, in any queue (the newest, should a
/// task have two). The dead table's task index leads with the queue, so
/// this reads the namespace's dead letters: few, and kept only for the
/// retention window.
const DEAD_GET: &str = "
SELECT id, task_id, reason, error, dead_at, envelope, raw, attempt, last_error, queue FROM {S}.dead
WHERE task_id = $1 AND expires_at > now() ORDER BY id DESC LIMIT 1";

const DEAD_COUNT: &str =
    "SELECT count(*)::int8 FROM {S}.dead WHERE queue = $1 AND expires_at > now()";

/// Takes dead letters out for a replay (inside its transaction): all of a
/// queue's live ones, or one task's (`$2` not NULL).
const DEAD_TAKE: &str = "
DELETE FROM {S}.dead WHERE queue = $1 AND ($2::uuid IS NULL OR task_id = $2) AND expires_at > now()
  AND ($3 OR envelope IS NOT NULL)
RETURNING id, task_id, envelope, attempt, last_error, unique_key, unique_on_finish";

const DEAD_PURGE: &str = "
WITH gone AS (DELETE FROM {S}.dead WHERE queue = $1 RETURNING 1) SELECT count(*)::int8 FROM gone";

/// Takes a key for a replayed envelope when free (or expired), until `$3`.
const TAKE_KEY: &str = "
INSERT INTO {S}.uniq AS u (key, holder, until) VALUES ($1, $2, $3)
ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
WHERE u.until <= now() OR u.holder = EXCLUDED.holder
RETURNING holder";

const REPLAY_INSERT: &str = "
INSERT INTO {S}.jobs (queue, priority, state, due, task_id, envelope, attempt, last_error, unique_key, unique_on_finish)
VALUES ($1, $2, 0, now(), $3, $4, $5, $6, $7, $8)";

const BROADCAST_SEND: &str = "
WITH b AS (INSERT INTO {S}.broadcast (channel, payload) VALUES ($1, $2) RETURNING id)
SELECT pg_notify($3, 'b ' || id) FROM b";

const BROADCAST_LAST: &str = "SELECT COALESCE(max(id), 0)::int8 FROM {S}.broadcast";

/// A subscriber's catch-up read: everything after its cursor, and the
/// window of ids just below it that it has not seen (an insert that
/// commits after a higher id was read).
const BROADCAST_READ: &str = "
SELECT id, payload FROM {S}.broadcast
WHERE channel = $1 AND id > $2 - 1000 AND id > $4 AND NOT (id = ANY($3::int8[]))
ORDER BY id";

const LEAD: &str = "
INSERT INTO {S}.leader AS l (one, holder, until) VALUES (true, $1, now() + $2 * interval '1 millisecond')
ON CONFLICT (one) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
WHERE l.holder = EXCLUDED.holder OR l.until <= now()
RETURNING holder";

/// Housekeeping, bounded per call: expired dead letters and unique keys,
/// broadcasts older than five minutes.
const SWEEP: &str = "
WITH d AS (
  DELETE FROM {S}.dead WHERE id IN (SELECT id FROM {S}.dead WHERE expires_at <= now() LIMIT 10000) RETURNING 1
), k AS (
  DELETE FROM {S}.uniq WHERE key IN (SELECT key FROM {S}.uniq WHERE until <= now() LIMIT 10000) RETURNING 1
), b AS (
  DELETE FROM {S}.broadcast WHERE id IN (
    SELECT id FROM {S}.broadcast WHERE sent_at < now() - interval '5 minutes' LIMIT 10000) RETURNING 1
)
SELECT (SELECT count(*) FROM d)::int8, (SELECT count(*) FROM k)::int8, (SELECT count(*) FROM b)::int8";

const DEAD_TUPLES: &str = "
SELECT COALESCE(n_dead_tup, 0)::int8, COALESCE(n_live_tup, 0)::int8 FROM pg_stat_user_tables
WHERE relid = '{S}.jobs'::regclass";

const VACUUM: &str = "VACUUM (INDEX_CLEANUP ON) {S}.jobs";

/// Whether this role may vacuum the jobs table: its owner (or a member of
/// the owning role), or a superuser.
const MAY_VACUUM: &str = "
SELECT pg_has_role(current_user, c.relowner, 'MEMBER')
       OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
FROM pg_class c WHERE c.oid = '{S}.jobs'::regclass";

/// Bytes straight into a queue (tests of garbage handling, B16).
const INSERT_RAW: &str = "
INSERT INTO {S}.jobs (queue, priority, state, due, task_id, envelope)
VALUES ($1, 0, 0, now(), gen_random_uuid(), $2)";

impl Sql {
    /// The statements for the quoted schema `s`.
    pub(crate) fn new(s: &str) -> Self {
        let f = |t: &str| Arc::<str>::from(t.replace("{S}", s));
        Self {
            publish: f(PUBLISH),
            publish_unique: f(PUBLISH_UNIQUE),
            claim: f(CLAIM),
            peek: f(PEEK),
            extend: f(EXTEND),
            settle: f(&format!("{SETTLE_HEAD}{SETTLE_BODY}{SETTLE_TAIL}")),
            settle_records: f(&format!(
                "{SETTLE_RECORDS_HEAD}{SETTLE_BODY}{}",
                SETTLE_RECORDS_TAIL.replace(
                    "{UPSERT}",
                    &super::backend::results_upsert(
                        "{S}",
                        "SELECT s.rid, s.rstate, s.rterminal, s.rattempts, \
                         now() + s.rttl * interval '1 millisecond', s.rjson::jsonb \
                         FROM s JOIN done ON done.id = s.id WHERE s.rid IS NOT NULL",
                    ),
                )
            )),
            stats: f(STATS),
            queues: f(QUEUES),
            purge: f(PURGE),
            dead_list: f(DEAD_LIST),
            dead_count: f(DEAD_COUNT),
            dead_get: f(DEAD_GET),
            dead_take: f(DEAD_TAKE),
            dead_purge: f(DEAD_PURGE),
            take_key: f(TAKE_KEY),
            replay_insert: f(REPLAY_INSERT),
            broadcast_send: f(BROADCAST_SEND),
            broadcast_last: f(BROADCAST_LAST),
            broadcast_read: f(BROADCAST_READ),
            lead: f(LEAD),
            sweep: f(SWEEP),
            dead_tuples: f(DEAD_TUPLES),
            vacuum: f(VACUUM),
            may_vacuum: f(MAY_VACUUM),
            insert_raw: f(INSERT_RAW),
        }
    }
}
