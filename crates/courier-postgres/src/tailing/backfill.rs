//! Rows committed before the slot existed are not in its stream: a source relays them
//! from the table once, oldest first, before it reads the slot. The publication's comment
//! records that this was done, so a crash before the end only repeats it (duplicates,
//! never a gap). Rows committed after the slot's start may come both ways: duplicates
//! with the same id.

use super::PgLogTailing;
use super::slot::quote_ident;
use courier_core::{OutboxRow, Result};

/// The publication comment that says the backfill is done.
const DONE: &str = "courier: rows from before the slot relayed";

/// The highest key to backfill up to, or `None` when a backfill is not needed.
pub(super) async fn pending(store: &crate::PgStore, slot: &str) -> Result<Option<i64>> {
    let comment: Option<Option<String>> = sqlx::query_scalar(
        "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
    )
    .bind(slot)
    .fetch_optional(store.pool())
    .await
    .map_err(store.err("reading the outbox publication"))?;
    if comment.flatten().as_deref() == Some(DONE) {
        return Ok(None);
    }
    let max: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM courier_outbox")
        .fetch_one(store.pool())
        .await
        .map_err(store.err("reading the outbox"))?;
    if max.is_none() {
        mark_done(store, slot).await?;
    }
    Ok(max)
}

async fn mark_done(store: &crate::PgStore, slot: &str) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "COMMENT ON PUBLICATION {} IS '{DONE}'",
        quote_ident(slot)
    )))
    .execute(store.pool())
    .await
    .map_err(store.err("marking the outbox publication"))?;
    Ok(())
}

impl PgLogTailing {
    /// The next backfill rows (keys up to `until`, leaving out `exclude`), or `None` once
    /// there are none left (then the backfill is marked done).
    pub(super) async fn backfill_peek(
        &self,
        until: i64,
        limit: u32,
        max_bytes: usize,
        exclude: &[i64],
    ) -> Result<Option<Vec<OutboxRow>>> {
        let store = &self.inner.store;
        let rows: Vec<(i64, String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, message_id, headers, payload FROM courier_outbox
             WHERE seq <= $1 AND seq <> ALL($3) ORDER BY seq LIMIT $2",
        )
        .bind(until)
        .bind(i64::from(limit.max(1)))
        .bind(exclude)
        .fetch_all(store.pool())
        .await
        .map_err(store.err("reading the outbox rows from before the slot"))?;
        if rows.is_empty() {
            if !exclude.is_empty() {
                // The last ones are being published: done once they are confirmed.
                return Ok(Some(Vec::new()));
            }
            // Rows relayed from the table committed before this point of the log: the
            // stream skips them up to here.
            let lsn: i64 =
                sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8")
                    .fetch_one(store.pool())
                    .await
                    .map_err(store.err("reading the end of the WAL"))?;
            mark_done(store, &self.inner.slot).await?;
            *self.backfill() = None;
            self.inner
                .shared
                .lock()
                .buf
                .backfill_ended(u64::try_from(lsn).unwrap_or(0));
            return Ok(None);
        }
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for (seq, id, headers, payload) in rows {
            bytes += payload.len() + headers.len();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            let message = crate::decode_message(&id, &headers, payload.into());
            out.push(OutboxRow { seq, message });
        }
        Ok(Some(out))
    }
}
