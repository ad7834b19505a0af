//! Correlation rows (commands this service sent, replies received) on SQLite.

use crate::error::map;
use courier_core::{
    CorrelationRecord, CorrelationState, Error, NewCorrelation, ReplyApplied, ReplyRecord, Result,
    now_ms,
};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Row, Sqlite};

/// The tables (created with the store's schema).
pub(crate) const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS courier_correlation (
        correlation_id TEXT PRIMARY KEY,
        command_type TEXT NOT NULL,
        channel TEXT NOT NULL,
        data TEXT NOT NULL,
        deadline_ms INTEGER,
        expected TEXT NOT NULL,
        expected_count INTEGER NOT NULL,
        gather INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        created_at_ms INTEGER NOT NULL,
        completed_at_ms INTEGER) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS courier_correlation_due
        ON courier_correlation (deadline_ms) WHERE state = 'pending' AND deadline_ms IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS courier_correlation_done
        ON courier_correlation (completed_at_ms) WHERE state <> 'pending'",
    "CREATE TABLE IF NOT EXISTS courier_correlation_replies (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        correlation_id TEXT NOT NULL,
        responder TEXT NOT NULL,
        message_id TEXT NOT NULL,
        headers TEXT NOT NULL,
        payload BLOB NOT NULL,
        received_at_ms INTEGER NOT NULL,
        UNIQUE (correlation_id, responder))",
];

const COLUMNS: &str = "correlation_id, command_type, channel, data, deadline_ms, expected, \
     expected_count, gather, state, attempts, error, created_at_ms, completed_at_ms";

pub(crate) async fn insert(conn: &mut SqliteConnection, rows: &[NewCorrelation]) -> Result<()> {
    for chunk in rows.chunks(50) {
        let mut q = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO courier_correlation (correlation_id, command_type, channel, data, \
             deadline_ms, expected, expected_count, gather, state, created_at_ms) ",
        );
        let mut err = None;
        q.push_values(chunk, |mut b, c| {
            let expected = serde_json::to_string(&c.expected).unwrap_or_else(|e| {
                err = Some(e.to_string());
                "[]".to_owned()
            });
            b.push_bind(c.correlation_id.clone())
                .push_bind(c.command_type.clone())
                .push_bind(c.channel.clone())
                .push_bind(c.data.clone())
                .push_bind(c.deadline_ms.map(|d| i64::try_from(d).unwrap_or(i64::MAX)))
                .push_bind(expected)
                .push_bind(i64::from(c.expected_count))
                .push_bind(i64::from(c.gather))
                .push_bind("pending")
                .push_bind(c.created_at_ms as i64);
        });
        if let Some(e) = err {
            return Err(Error::invalid(format!(
                "correlation: expected responders: {e}"
            )));
        }
        q.build()
            .execute(&mut *conn)
            .await
            .map_err(|e| map("storing a correlation row", e))?;
    }
    Ok(())
}

fn row_to_record(r: &SqliteRow) -> Result<CorrelationRecord> {
    let get = |e: sqlx::Error| map("reading a correlation row", e);
    let expected: String = r.try_get("expected").map_err(get)?;
    let state: String = r.try_get("state").map_err(get)?;
    Ok(CorrelationRecord {
        correlation: NewCorrelation {
            correlation_id: r.try_get("correlation_id").map_err(get)?,
            command_type: r.try_get("command_type").map_err(get)?,
            channel: r.try_get("channel").map_err(get)?,
            data: r.try_get("data").map_err(get)?,
            deadline_ms: r
                .try_get::<Option<i64>, _>("deadline_ms")
                .map_err(get)?
                .map(|d| d as u64),
            expected: serde_json::from_str(&expected).map_err(|e| {
                Error::invalid(format!("correlation row: expected responders: {e}"))
            })?,
            expected_count: r.try_get::<i64, _>("expected_count").map_err(get)? as u32,
            gather: r.try_get::<i64, _>("gather").map_err(get)? != 0,
            created_at_ms: r.try_get::<i64, _>("created_at_ms").map_err(get)? as u64,
        },
        state: CorrelationState::parse(&state)?,
        attempts: r.try_get::<i64, _>("attempts").map_err(get)? as u32,
        error: r.try_get("error").map_err(get)?,
        completed_at_ms: r
            .try_get::<Option<i64>, _>("completed_at_ms")
            .map_err(get)?
            .map(|d| d as u64),
        replies: Vec::new(),
    })
}

async fn replies(conn: &mut SqliteConnection, id: &str) -> Result<Vec<ReplyRecord>> {
    let rows = sqlx::query(
        "SELECT responder, message_id, headers, payload, received_at_ms
         FROM courier_correlation_replies WHERE correlation_id = ? ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| map("reading replies", e))?;
    rows.iter()
        .map(|r| {
            let get = |e: sqlx::Error| map("reading a reply", e);
            Ok(ReplyRecord {
                responder: r.try_get("responder").map_err(get)?,
                message_id: r.try_get("message_id").map_err(get)?,
                headers_json: r.try_get("headers").map_err(get)?,
                payload: r.try_get::<Vec<u8>, _>("payload").map_err(get)?.into(),
                received_at_ms: r.try_get::<i64, _>("received_at_ms").map_err(get)? as u64,
            })
        })
        .collect()
}

pub(crate) async fn get(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Option<CorrelationRecord>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM courier_correlation WHERE correlation_id = ?"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| map("reading a correlation row", e))?;
    let Some(row) = row else { return Ok(None) };
    let mut rec = row_to_record(&row)?;
    rec.replies = replies(conn, id).await?;
    Ok(Some(rec))
}

/// Inside a write transaction (SQLite has one writer: no lock needed beyond it).
pub(crate) async fn reply(
    conn: &mut SqliteConnection,
    id: &str,
    reply: &ReplyRecord,
) -> Result<ReplyApplied> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT state, expected_count FROM courier_correlation WHERE correlation_id = ?",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| map("reading a correlation row", e))?;
    let Some((state, expected)) = row else {
        return Ok(ReplyApplied::Unknown);
    };
    let state = CorrelationState::parse(&state)?;
    if state != CorrelationState::Pending {
        return Ok(ReplyApplied::AlreadyComplete(state));
    }
    let inserted = sqlx::query(
        "INSERT INTO courier_correlation_replies
           (correlation_id, responder, message_id, headers, payload, received_at_ms)
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(&reply.responder)
    .bind(&reply.message_id)
    .bind(&reply.headers_json)
    .bind(reply.payload.to_vec())
    .bind(reply.received_at_ms as i64)
    .execute(&mut *conn)
    .await
    .map_err(|e| map("recording a reply", e))?;
    if inserted.rows_affected() == 0 {
        return Ok(ReplyApplied::Duplicate);
    }
    let received: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM courier_correlation_replies WHERE correlation_id = ?",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| map("counting replies", e))?;
    if received < expected {
        return Ok(ReplyApplied::Waiting {
            received: received as u32,
            expected: expected as u32,
        });
    }
    sqlx::query(
        "UPDATE courier_correlation SET state = 'done', completed_at_ms = ? WHERE correlation_id = ?",
    )
    .bind(now_ms() as i64)
    .bind(id)
    .execute(&mut *conn)
    .await
    .map_err(|e| map("completing a correlation", e))?;
    match get(conn, id).await? {
        Some(rec) => Ok(ReplyApplied::Completed(Box::new(rec))),
        None => Ok(ReplyApplied::Unknown),
    }
}

pub(crate) async fn expire(
    conn: &mut SqliteConnection,
    now: u64,
    limit: u32,
) -> Result<Vec<CorrelationRecord>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE courier_correlation SET state = 'timed-out', completed_at_ms = ?
         WHERE correlation_id IN (
           SELECT correlation_id FROM courier_correlation
           WHERE state = 'pending' AND deadline_ms IS NOT NULL AND deadline_ms < ?
           ORDER BY deadline_ms LIMIT ?)
         RETURNING {COLUMNS}"
    )))
    .bind(now as i64)
    .bind(now as i64)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| map("claiming timed-out correlations", e))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut rec = row_to_record(row)?;
        rec.replies = replies(conn, &rec.correlation.correlation_id).await?;
        out.push(rec);
    }
    Ok(out)
}

pub(crate) async fn retry_later(
    conn: &mut SqliteConnection,
    id: &str,
    error: &str,
    retry_at_ms: u64,
    give_up: bool,
) -> Result<()> {
    let q = if give_up {
        sqlx::query(
            "UPDATE courier_correlation SET state = 'failed', attempts = attempts + 1, error = ?,
               completed_at_ms = ?
             WHERE correlation_id = ?",
        )
        .bind(error)
        .bind(now_ms() as i64)
        .bind(id)
    } else {
        sqlx::query(
            "UPDATE courier_correlation SET state = 'pending', attempts = attempts + 1, error = ?,
               deadline_ms = ?, completed_at_ms = NULL
             WHERE correlation_id = ?",
        )
        .bind(error)
        .bind(i64::try_from(retry_at_ms).unwrap_or(i64::MAX))
        .bind(id)
    };
    q.execute(&mut *conn)
        .await
        .map_err(|e| map("rescheduling a timeout", e))?;
    Ok(())
}

pub(crate) async fn prune(
    conn: &mut SqliteConnection,
    older_than_ms: u64,
    batch: u32,
) -> Result<u64> {
    let cutoff = now_ms().saturating_sub(older_than_ms) as i64;
    let ids: Vec<String> = sqlx::query_scalar(
        "DELETE FROM courier_correlation WHERE correlation_id IN (
           SELECT correlation_id FROM courier_correlation
           WHERE state <> 'pending' AND completed_at_ms < ? LIMIT ?)
         RETURNING correlation_id",
    )
    .bind(cutoff)
    .bind(i64::from(batch))
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| map("pruning correlations", e))?;
    for id in &ids {
        sqlx::query("DELETE FROM courier_correlation_replies WHERE correlation_id = ?")
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(|e| map("pruning replies", e))?;
    }
    Ok(ids.len() as u64)
}
