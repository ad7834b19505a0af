//! Handing out streamed rows (peek) and confirming what was published (fenced delete,
//! then the slot may be confirmed past it).

use super::PgLogTailing;
use super::slot::db_code;
use super::stream;
use crate::PgStore;
use crate::error::map;
use courier_core::{Error, ErrorKind, Message, OutboxRow, Result};
use std::collections::HashSet;
use std::time::Duration;

/// How long after a stream started peeks with nothing to hand out wait for it to catch
/// up with what was committed before it started.
const CATCH_UP: Duration = Duration::from_secs(2);

/// How long a confirm waits for the transactions of rows received from the log that are
/// not yet visible (doubling pauses from 1 ms up to 100 ms), before it leaves them to the
/// relay's next attempt.
const NOT_YET_VISIBLE: Duration = Duration::from_secs(1);

impl PgLogTailing {
    /// Up to `limit` committed rows (about `max_bytes`, at least one) in commit order,
    /// leaving out `exclude` and the rows already confirmed. Starts the stream if needed;
    /// a stream that has just started is waited for (up to [`CATCH_UP`]) until it has
    /// caught up with what was committed before, so a peek sees every row committed
    /// before it began.
    pub(super) async fn peek(
        &self,
        limit: u32,
        max_bytes: usize,
        exclude: &[i64],
    ) -> Result<Vec<OutboxRow>> {
        let backfill = *self.backfill();
        if let Some(until) = backfill
            && let Some(rows) = self.backfill_peek(until, limit, max_bytes, exclude).await?
        {
            return Ok(rows);
        }
        let limit = limit.max(1) as usize;
        let exclude: HashSet<i64> = exclude.iter().copied().collect();
        let shared = &self.inner.shared;
        stream::ensure_running(shared, &self.inner.target);
        let mut signal = shared.signal.subscribe();
        let rows = loop {
            signal.borrow_and_update();
            let deadline = {
                let s = shared.lock();
                let rows = s.buf.peek(limit, max_bytes, &exclude);
                if !rows.is_empty() || s.caught_up {
                    break rows;
                }
                // Just started: wait for it to catch up (bounded, so the relay renews
                // its lease in time). Later, rows wake the relay when they arrive.
                let deadline = s
                    .started
                    .map(|t| t + CATCH_UP)
                    .filter(|d| *d > tokio::time::Instant::now());
                if let Some(e) = s.failure()
                    && (!e.is_retryable() || deadline.is_none())
                {
                    return Err(e);
                }
                match deadline {
                    Some(d) => d,
                    None => break rows,
                }
            };
            if tokio::time::timeout_at(deadline, signal.changed())
                .await
                .is_err()
            {
                break Vec::new();
            }
        };
        self.readable(rows).await
    }

    /// `rows` up to and with the first that cannot be read as a message, each such row
    /// read again from the table first: an operator may have fixed it (`UPDATE`) — then
    /// that is published — or deleted it — then it is skipped.
    async fn readable(&self, rows: Vec<OutboxRow>) -> Result<Vec<OutboxRow>> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let Err(reason) = row.message else {
                out.push(row);
                continue;
            };
            match self.reread(row.seq, reason).await? {
                None => {
                    let flush = self.inner.shared.lock().buf.confirm(&[row.seq]);
                    self.inner.shared.confirmed(flush);
                }
                Some(Ok(message)) => {
                    self.inner.shared.lock().buf.fix(row.seq, message.clone());
                    out.push(OutboxRow {
                        seq: row.seq,
                        message: Ok(message),
                    });
                }
                Some(Err(reason)) => {
                    out.push(OutboxRow {
                        seq: row.seq,
                        message: Err(reason),
                    });
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The row `seq` as it is now in the table (`None`: deleted), for a row whose insert
    /// cannot be read as a message for `reason`.
    async fn reread(
        &self,
        seq: i64,
        reason: String,
    ) -> Result<Option<std::result::Result<Message, String>>> {
        let store = &self.inner.store;
        let row: Option<(String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT message_id, headers, payload FROM courier_outbox WHERE seq = $1",
        )
        .bind(seq)
        .fetch_optional(store.pool())
        .await
        .map_err(store.err("re-reading an unreadable outbox row"))?;
        Ok(row.map(|(id, headers, payload)| {
            crate::decode_message(&id, &headers, payload.into()).map_err(|now| {
                format!(
                    "{reason} (and as it is now in the table: {now}); the log-tailing relay \
                     publishes it once it is fixed with UPDATE, or skips it once DELETEd"
                )
            })
        }))
    }

    /// After the broker confirmed rows `seqs`: delete them while `holder` holds the lease
    /// of `generation` (`false`, and the stream stops, when it does not), then let the
    /// stream confirm the slot past every whole transaction now published. A crash in
    /// between leaves the rows deleted and the slot behind: they are republished
    /// (duplicates), never skipped.
    ///
    /// A row arrives here at its transaction's commit record, which PostgreSQL sends to
    /// the slot once it is flushed: a moment before the transaction is visible to new
    /// snapshots (longer with synchronous replication, which waits in between). A delete
    /// in that moment does not see the row; were the slot then confirmed past it, the row
    /// would stay in the table for good. So a row the delete did not find is looked at
    /// by its transaction: still in progress, it is waited for (up to [`NOT_YET_VISIBLE`])
    /// and deleted once visible; visible, it is gone (an operator deleted it). Rows still
    /// not visible after the wait make this an error: they stay unconfirmed, so the relay
    /// publishes them again after its backoff (duplicates with the same id) and tries
    /// again, renewing its lease in between.
    pub(super) async fn confirm(
        &self,
        seqs: &[i64],
        holder: &str,
        generation: i64,
    ) -> Result<bool> {
        let store = &self.inner.store;
        // One statement: the lease check (`FOR SHARE`: a take-over waits) and the delete.
        let Some(deleted) = store.outbox_delete_rows(seqs, holder, generation).await? else {
            self.lease_lost(holder);
            return Ok(false);
        };
        let mut missing: HashSet<i64> = HashSet::new();
        if deleted.len() < seqs.len() {
            let deleted: HashSet<i64> = deleted.into_iter().collect();
            missing.extend(seqs.iter().filter(|s| !deleted.contains(s)));
        }
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        while !missing.is_empty() {
            // Rows the backfill read from the table have no transaction here: they were
            // visible when read, so one the delete did not find is gone.
            let xids = self.inner.shared.lock().buf.xids(&missing);
            let running = in_progress(store, &xids).await?;
            let waiting: HashSet<i64> = xids
                .iter()
                .filter(|(_, xid)| running.contains(xid))
                .map(|(seq, _)| *seq)
                .collect();
            // First looked at, then deleted: a transaction visible to the first statement
            // is visible to the second.
            let visible: Vec<i64> = missing.difference(&waiting).copied().collect();
            if !visible.is_empty()
                && store
                    .outbox_delete_rows(&visible, holder, generation)
                    .await?
                    .is_none()
            {
                self.lease_lost(holder);
                return Ok(false);
            }
            missing = waiting;
            if missing.is_empty() {
                break;
            }
            if started.elapsed() >= NOT_YET_VISIBLE {
                let done: Vec<i64> = seqs
                    .iter()
                    .copied()
                    .filter(|s| !missing.contains(s))
                    .collect();
                self.confirm_in_stream(&done);
                let mut xids: Vec<u32> = running.into_iter().collect();
                xids.sort_unstable();
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "{} published outbox row(s) cannot be deleted yet: the log sent \
                         their transaction(s) {xids:?} as committed, but after {:?} they \
                         are still not visible on {} (a commit waiting for a synchronous \
                         standby, see synchronous_standby_names?); they are published again \
                         (same ids) and deleted once visible",
                        missing.len(),
                        started.elapsed(),
                        courier_core::OutboxSource::describe(store),
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        self.confirm_in_stream(seqs);
        Ok(true)
    }

    /// Rows `seqs` are published and gone from the table: the stream may confirm the slot
    /// past them.
    fn confirm_in_stream(&self, seqs: &[i64]) {
        let backfilling = self.backfill().is_some();
        let shared = &self.inner.shared;
        let flush = {
            let mut s = shared.lock();
            if backfilling {
                s.buf.backfilled(seqs);
            }
            s.buf.confirm(seqs)
        };
        shared.confirmed(flush);
    }
}

/// Which of the transactions of `rows` (row, xid) are still in progress on the server:
/// committed in the log but not yet visible to new snapshots. An xid is 32 bits in the
/// log and 64 in a snapshot; the low 32 bits of a running transaction are unique.
async fn in_progress(store: &PgStore, rows: &[(i64, u32)]) -> Result<HashSet<u32>> {
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    let mut xids: Vec<i64> = rows.iter().map(|(_, x)| i64::from(*x)).collect();
    xids.sort_unstable();
    xids.dedup();
    let running: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT x::text::int8 & 4294967295
         FROM pg_snapshot_xip(pg_current_snapshot()) AS x
         WHERE x::text::int8 & 4294967295 = ANY($1)",
    )
    .bind(&xids)
    .fetch_all(store.pool())
    .await
    .map_err(store.err("asking which published rows' transactions are still in progress"))?;
    Ok(running
        .into_iter()
        .filter_map(|x| u32::try_from(x).ok())
        .collect())
}

/// End the session that holds `slot` (a relay that lost the lease and has not noticed
/// yet), in a transaction that holds the lease of `generation` (`false` if it does not):
/// fenced like a delete.
pub(super) async fn end_slot_holder(
    store: &PgStore,
    slot: &str,
    holder: &str,
    generation: i64,
) -> Result<bool> {
    let what = "ending the session that holds the slot";
    let mut tx = store.pool().begin().await.map_err(store.err(what))?;
    let held: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM courier_relay_lease
         WHERE outbox = 'default' AND holder = $1 AND generation = $2 FOR SHARE",
    )
    .bind(holder)
    .bind(generation)
    .fetch_optional(&mut *tx)
    .await
    .map_err(store.err("checking the relay lease"))?;
    if held.is_none() {
        let _ = tx.rollback().await;
        return Ok(false);
    }
    let ended = sqlx::query(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
         WHERE slot_name = $1 AND active_pid IS NOT NULL",
    )
    .bind(slot)
    .execute(&mut *tx)
    .await;
    if let Err(e) = ended {
        // insufficient_privilege: another role's session; it ends on its own.
        if db_code(&e).as_deref() != Some("42501") {
            return Err(map(format!("ending the session that holds slot {slot}"), e));
        }
    }
    tx.commit().await.map_err(store.err(what))?;
    Ok(true)
}
