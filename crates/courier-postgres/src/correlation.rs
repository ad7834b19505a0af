//! Correlation rows on PostgreSQL: commands this service sent (`courier_correlation`) and
//! the replies that came back (`courier_correlation_replies`); tables in `schema.rs`.
//!
//! Every function takes `db`, the database for error messages (the store's URL without
//! password, or "the caller's transaction" for outbox writes).

use crate::error::map;
use courier_core::{
    CorrelationRecord, CorrelationState, Error, ErrorKind, NewCorrelation, ReplyApplied,
    ReplyRecord, Result, now_ms,
};
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};
use std::collections::HashMap;

/// The columns of a correlation row (`record` reads them by name).
const COLUMNS: &str = "correlation_id, command_type, channel, data, deadline_ms, expected, \
     expected_count, gather, state, attempts, error, created_at_ms, completed_at_ms";

/// Map a sqlx error met doing `what` in `db`.
fn err<'a>(what: &'a str, db: &'a str) -> impl FnOnce(sqlx::Error) -> Error + 'a {
    move |e| map(format!("{what} in {db}"), e)
}

/// Milliseconds as a `BIGINT`; a far-future time saturates instead of wrapping negative
/// (which would make a deadline already passed).
fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored row that does not decode: permanent, names the row.
fn corrupt(db: &str, id: &str, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Decode,
        format!("correlation row {id} in {db} cannot be read: {what}"),
    )
}

/// Insert `rows` as pending, in one statement whatever their number (arrays, not a
/// parameter per row).
pub(crate) async fn insert(
    conn: &mut PgConnection,
    rows: &[NewCorrelation],
    db: &str,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let (mut ids, mut types, mut channels, mut data) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut deadlines, mut expected, mut counts, mut gathers, mut created) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in rows {
        ids.push(r.correlation_id.as_str());
        types.push(r.command_type.as_str());
        channels.push(r.channel.as_str());
        data.push(r.data.as_str());
        deadlines.push(r.deadline_ms.map(ms));
        expected.push(serde_json::to_string(&r.expected).map_err(|e| {
            Error::invalid(format!(
                "correlation {}: expected responders cannot be stored as JSON: {e}",
                r.correlation_id
            ))
        })?);
        counts.push(i32::try_from(r.expected_count).unwrap_or(i32::MAX));
        gathers.push(r.gather);
        created.push(ms(r.created_at_ms));
    }
    sqlx::query(
        "INSERT INTO courier_correlation (correlation_id, command_type, channel, data,
           deadline_ms, expected, expected_count, gather, state, created_at_ms)
         SELECT id, ty, ch, data, deadline, expected, n, gather, 'pending', created
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                     $7::int[], $8::bool[], $9::bigint[])
           AS t(id, ty, ch, data, deadline, expected, n, gather, created)",
    )
    .bind(&ids)
    .bind(&types)
    .bind(&channels)
    .bind(&data)
    .bind(&deadlines)
    .bind(&expected)
    .bind(&counts)
    .bind(&gathers)
    .bind(&created)
    .execute(&mut *conn)
    .await
    .map_err(err("storing correlation rows", db))?;
    Ok(())
}

/// A correlation row without its replies.
fn record(r: &PgRow, db: &str) -> Result<CorrelationRecord> {
    let get = || err("reading a correlation row", db);
    let id: String = r.try_get("correlation_id").map_err(get())?;
    let expected: String = r.try_get("expected").map_err(get())?;
    let state: String = r.try_get("state").map_err(get())?;
    let expected = serde_json::from_str(&expected)
        .map_err(|e| corrupt(db, &id, format_args!("expected responders: {e}")))?;
    let state = CorrelationState::parse(&state).map_err(|e| corrupt(db, &id, e))?;
    Ok(CorrelationRecord {
        correlation: NewCorrelation {
            command_type: r.try_get("command_type").map_err(get())?,
            channel: r.try_get("channel").map_err(get())?,
            data: r.try_get("data").map_err(get())?,
            deadline_ms: r
                .try_get::<Option<i64>, _>("deadline_ms")
                .map_err(get())?
                .map(|d| d as u64),
            expected,
            expected_count: r.try_get::<i32, _>("expected_count").map_err(get())? as u32,
            gather: r.try_get("gather").map_err(get())?,
            created_at_ms: r.try_get::<i64, _>("created_at_ms").map_err(get())? as u64,
            correlation_id: id,
        },
        state,
        attempts: r.try_get::<i32, _>("attempts").map_err(get())? as u32,
        error: r.try_get("error").map_err(get())?,
        completed_at_ms: r
            .try_get::<Option<i64>, _>("completed_at_ms")
            .map_err(get())?
            .map(|d| d as u64),
        replies: Vec::new(),
    })
}

/// Fill in the replies of `records` (one query for all), in arrival order.
async fn with_replies(
    conn: &mut PgConnection,
    records: &mut [CorrelationRecord],
    db: &str,
) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r.correlation.correlation_id.as_str())
        .collect();
    let rows = sqlx::query(
        "SELECT correlation_id, responder, message_id, headers, payload, received_at_ms
         FROM courier_correlation_replies WHERE correlation_id = ANY($1::text[])
         ORDER BY seq",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(err("reading replies", db))?;
    let mut by_id: HashMap<String, Vec<ReplyRecord>> = HashMap::new();
    for r in &rows {
        let get = || err("reading a reply", db);
        let id: String = r.try_get("correlation_id").map_err(get())?;
        by_id.entry(id).or_default().push(ReplyRecord {
            responder: r.try_get("responder").map_err(get())?,
            message_id: r.try_get("message_id").map_err(get())?,
            headers_json: r.try_get("headers").map_err(get())?,
            payload: r.try_get::<Vec<u8>, _>("payload").map_err(get())?.into(),
            received_at_ms: r.try_get::<i64, _>("received_at_ms").map_err(get())? as u64,
        });
    }
    for rec in records {
        rec.replies = by_id
            .remove(&rec.correlation.correlation_id)
            .unwrap_or_default();
    }
    Ok(())
}

/// One correlation with its replies.
pub(crate) async fn get(
    conn: &mut PgConnection,
    id: &str,
    db: &str,
) -> Result<Option<CorrelationRecord>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM courier_correlation WHERE correlation_id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(err("reading a correlation row", db))?;
    let Some(row) = row else { return Ok(None) };
    let mut rec = [record(&row, db)?];
    with_replies(conn, &mut rec, db).await?;
    let [rec] = rec;
    Ok(Some(rec))
}

/// Record `reply` for correlation `id` (inside the caller's transaction).
///
/// The correlation row is locked first (`FOR UPDATE`), so concurrent replies to one
/// correlation (a gather answered on several instances at once) take turns: each sees the
/// replies committed before it, exactly one of them completes it, and the ones after see
/// it complete.
pub(crate) async fn reply(
    conn: &mut PgConnection,
    id: &str,
    reply: &ReplyRecord,
    db: &str,
) -> Result<ReplyApplied> {
    let row: Option<(String, i32)> = sqlx::query_as(
        "SELECT state, expected_count FROM courier_correlation
         WHERE correlation_id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(err("locking a correlation row", db))?;
    let Some((state, expected)) = row else {
        return Ok(ReplyApplied::Unknown);
    };
    let state = CorrelationState::parse(&state).map_err(|e| corrupt(db, id, e))?;
    if state != CorrelationState::Pending {
        return Ok(ReplyApplied::AlreadyComplete(state));
    }
    // The statement's snapshot does not see its own insert: replies before it, plus the
    // one it inserted (0 for a responder that had already answered). Nobody else can add
    // a reply meanwhile: they wait for the row lock.
    let (inserted, before): (i64, i64) = sqlx::query_as(
        "WITH ins AS (
           INSERT INTO courier_correlation_replies
             (correlation_id, responder, message_id, headers, payload, received_at_ms)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (correlation_id, responder) DO NOTHING
           RETURNING 1)
         SELECT (SELECT count(*) FROM ins),
                (SELECT count(*) FROM courier_correlation_replies WHERE correlation_id = $1)",
    )
    .bind(id)
    .bind(&reply.responder)
    .bind(&reply.message_id)
    .bind(&reply.headers_json)
    .bind(reply.payload.as_ref())
    .bind(ms(reply.received_at_ms))
    .fetch_one(&mut *conn)
    .await
    .map_err(err("recording a reply", db))?;
    if inserted == 0 {
        return Ok(ReplyApplied::Duplicate);
    }
    let received = before + inserted;
    let expected = i64::from(expected.max(1));
    if received < expected {
        return Ok(ReplyApplied::Waiting {
            received: received as u32,
            expected: expected as u32,
        });
    }
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE courier_correlation SET state = 'done', completed_at_ms = $2
         WHERE correlation_id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(ms(now_ms()))
    .fetch_one(&mut *conn)
    .await
    .map_err(err("completing a correlation", db))?;
    let mut rec = [record(&row, db)?];
    with_replies(conn, &mut rec, db).await?;
    let [rec] = rec;
    Ok(ReplyApplied::Completed(Box::new(rec)))
}

/// Claim up to `limit` pending correlations whose deadline is before `now`: they become
/// `timed-out` in the caller's transaction and come back with their replies, earliest
/// deadline first.
///
/// `FOR UPDATE SKIP LOCKED`: instances checking deadlines at once each claim different
/// rows (a row another transaction holds, claimed or being replied to, is left for a
/// later pass, when its state says whether it is still due). The CTE is `MATERIALIZED`
/// so the claim runs exactly once.
pub(crate) async fn expire(
    conn: &mut PgConnection,
    now: u64,
    limit: u32,
    db: &str,
) -> Result<Vec<CorrelationRecord>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH due AS MATERIALIZED (
           SELECT correlation_id FROM courier_correlation
           WHERE state = 'pending' AND deadline_ms IS NOT NULL AND deadline_ms < $1
           ORDER BY deadline_ms LIMIT $2
           FOR UPDATE SKIP LOCKED)
         UPDATE courier_correlation SET state = 'timed-out', completed_at_ms = $1
         WHERE correlation_id IN (SELECT correlation_id FROM due)
         RETURNING {COLUMNS}"
    )))
    .bind(ms(now))
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await
    .map_err(err("claiming timed-out correlations", db))?;
    let mut out = rows
        .iter()
        .map(|r| record(r, db))
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| {
        (a.correlation.deadline_ms, &a.correlation.correlation_id)
            .cmp(&(b.correlation.deadline_ms, &b.correlation.correlation_id))
    });
    with_replies(conn, &mut out, db).await?;
    Ok(out)
}

/// The timeout handler of claimed correlation `id` failed: one more attempt and `error`
/// kept; `failed` when `give_up`, else pending again with deadline `retry_at_ms`. An
/// unknown id changes nothing.
pub(crate) async fn retry_later(
    conn: &mut PgConnection,
    id: &str,
    error: &str,
    retry_at_ms: u64,
    give_up: bool,
    db: &str,
) -> Result<()> {
    let q = if give_up {
        sqlx::query(
            "UPDATE courier_correlation SET state = 'failed', attempts = attempts + 1,
               error = $2, completed_at_ms = $3
             WHERE correlation_id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(ms(now_ms()))
    } else {
        sqlx::query(
            "UPDATE courier_correlation SET state = 'pending', attempts = attempts + 1,
               error = $2, deadline_ms = $3, completed_at_ms = NULL
             WHERE correlation_id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(ms(retry_at_ms))
    };
    q.execute(&mut *conn)
        .await
        .map_err(err("rescheduling a correlation's timeout", db))?;
    Ok(())
}

/// Delete at most `batch` completed correlations (done, timed out or failed) that
/// completed more than `older_than_ms` ago, oldest first, with their replies, in one
/// statement; returns how many went. Rows another transaction holds are skipped.
pub(crate) async fn prune(
    conn: &mut PgConnection,
    older_than_ms: u64,
    batch: u32,
    db: &str,
) -> Result<u64> {
    let cutoff = ms(now_ms().saturating_sub(older_than_ms));
    let n: i64 = sqlx::query_scalar(
        "WITH old AS MATERIALIZED (
           SELECT correlation_id FROM courier_correlation
           WHERE state <> 'pending' AND completed_at_ms < $1
           ORDER BY completed_at_ms LIMIT $2
           FOR UPDATE SKIP LOCKED),
         gone AS (
           DELETE FROM courier_correlation
           WHERE correlation_id IN (SELECT correlation_id FROM old)
           RETURNING correlation_id),
         replies AS (
           DELETE FROM courier_correlation_replies
           WHERE correlation_id IN (SELECT correlation_id FROM gone))
         SELECT count(*) FROM gone",
    )
    .bind(cutoff)
    .bind(i64::from(batch))
    .fetch_one(&mut *conn)
    .await
    .map_err(err("pruning correlations", db))?;
    Ok(n as u64)
}
