//! Reading the slot (peek) and confirming what was published (fenced delete + advance).

use super::PgLogTailing;
use super::pgoutput::{self, Change, Column, Relation};
use super::progress::{Entry, Peeked};
use crate::error::map;
use courier_core::{Error, ErrorKind, OutboxRow, Result};
use futures::TryStreamExt;
use std::time::{Duration, Instant};

/// How often an idle source may write a mark to let its slot move on.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// How far behind the end of the log an idle slot may stay before a mark is written.
const MARK_AFTER_BYTES: i64 = 64 * 1024;

/// Where the outbox's columns are in a `pgoutput` row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Columns {
    seq: usize,
    message_id: usize,
    headers: usize,
    payload: usize,
}

impl Columns {
    fn of(rel: &Relation, schema: &str) -> Option<Columns> {
        if rel.namespace != schema || rel.name != "courier_outbox" {
            return None;
        }
        let at = |name: &str| rel.columns.iter().position(|c| c == name);
        Some(Columns {
            seq: at("seq")?,
            message_id: at("message_id")?,
            headers: at("headers")?,
            payload: at("payload")?,
        })
    }
}

fn protocol(slot: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Decode,
        format!("reading replication slot {slot}: {e}"),
    )
}

impl PgLogTailing {
    /// Up to `limit` inserted rows (about `max_bytes`, at least one) in commit order from
    /// the slot's position, leaving out those already published.
    pub(super) async fn peek(&self, limit: u32, max_bytes: usize) -> Result<Vec<OutboxRow>> {
        let backfill = self.state().backfill;
        if let Some(until) = backfill
            && let Some(rows) = self.backfill_peek(until, limit, max_bytes).await?
        {
            return Ok(rows);
        }
        let limit = limit.max(1) as usize;
        let store = &self.inner.store;
        let slot = &self.inner.slot;
        // Rows confirmed before this peek began; those confirmed while it runs are the
        // relay's to leave out (it knows which batch it is confirming).
        let (done, mut relations) = {
            let s = self.state();
            (s.done.clone(), s.relations.clone())
        };
        // Decoding stops after the commit that reaches this many changes; a transaction
        // larger than that is streamed and cut here.
        let changes = limit.saturating_add(done.len()).saturating_mul(2);
        // One use of the slot at a time in this process (a slot serves one session at a
        // time; the relay confirms one batch while it reads the next).
        let slot_use = self.inner.slot_use.lock().await;
        let mut stream = sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2,
               'proto_version', '1', 'publication_names', $1, 'binary', 'true', 'messages', 'true')",
        )
        .bind(slot)
        .bind(i32::try_from(changes).unwrap_or(i32::MAX))
        .fetch(store.pool());

        let mut rows = Vec::new();
        let mut peeked = Peeked::default();
        let mut skipped = Vec::new();
        let mut bytes = 0usize;
        let mut full = false;
        let mut txn_start: Option<usize> = None;
        let mut decoded_any = false;
        while let Some(data) = stream.try_next().await.map_err(|e| {
            map(
                format!(
                    "reading replication slot {slot} of {}",
                    store.inner.describe
                ),
                e,
            )
        })? {
            decoded_any = true;
            match pgoutput::parse(&data).map_err(|e| protocol(slot, e))? {
                Change::Begin { .. } => {
                    if full {
                        break;
                    }
                    txn_start = Some(peeked.entries.len());
                }
                Change::Relation(rel) => {
                    let columns = Columns::of(&rel, store.schema());
                    relations.insert(rel.id, columns);
                }
                Change::Insert { relation, columns } => {
                    if txn_start.is_none() {
                        return Err(protocol(slot, "an insert outside a transaction"));
                    }
                    let map = relations.get(&relation).ok_or_else(|| {
                        protocol(slot, format!("an insert into unknown relation {relation}"))
                    })?;
                    let Some(map) = *map else { continue };
                    let seq = columns
                        .get(map.seq)
                        .ok_or_else(|| protocol(slot, "an outbox insert without seq"))?
                        .int8()
                        .map_err(|e| protocol(slot, format!("an outbox insert's seq: {e}")))?;
                    if !done.contains(&seq) {
                        if full {
                            break;
                        }
                        let (size, message) = decode_row(map, columns);
                        let message = match message {
                            Ok(m) => Some(Ok(m)),
                            Err(reason) => self.reread(seq, reason).await?,
                        };
                        match message {
                            Some(message) => {
                                bytes += size;
                                rows.push(OutboxRow { seq, message });
                                if rows.len() >= limit || bytes >= max_bytes {
                                    full = true;
                                }
                            }
                            // Deleted by an operator: consumed, never published.
                            None => skipped.push(seq),
                        }
                    }
                    peeked.entries.push(Entry {
                        seq,
                        commit: None,
                        last_in_txn: false,
                    });
                }
                Change::Commit { end_lsn } => {
                    if let Some(start) = txn_start.take() {
                        let mine = &mut peeked.entries[start..];
                        for e in mine.iter_mut() {
                            e.commit = Some(end_lsn);
                        }
                        if let Some(last) = mine.last_mut() {
                            last.last_in_txn = true;
                        }
                    }
                    peeked.safe = Some(end_lsn);
                    if full {
                        break;
                    }
                }
                Change::Other => {}
            }
        }
        drop(stream);
        drop(slot_use);
        {
            let mut s = self.state();
            s.relations = relations;
            s.done.extend(skipped);
            s.last = Some(peeked);
        }
        if rows.is_empty() {
            self.idle(decoded_any).await?;
        }
        Ok(rows)
    }

    /// A row whose insert cannot be read as a message: read it from the table by key
    /// instead. An operator may have fixed it (`UPDATE`) — then publish that — or deleted
    /// it — then skip it (`None`); otherwise report it.
    async fn reread(
        &self,
        seq: i64,
        reason: String,
    ) -> Result<Option<std::result::Result<courier_core::Message, String>>> {
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

    /// Nothing to publish: let the slot move past what was read (only while this source's
    /// relay holds the lease), or write a mark to read next time when the slot lags.
    async fn idle(&self, decoded_any: bool) -> Result<()> {
        let Some((holder, generation)) = self.state().lease.clone() else {
            return Ok(());
        };
        let moved = match self.advance(&holder, generation).await {
            Ok(moved) => moved,
            Err(e) => {
                tracing::warn!(slot = %self.inner.slot, error = %e, "cannot advance the replication slot yet");
                false
            }
        };
        if moved || decoded_any {
            return Ok(());
        }
        let due = self
            .state()
            .last_mark
            .is_none_or(|t| t.elapsed() >= MARK_EVERY);
        if !due {
            return Ok(());
        }
        self.state().last_mark = Some(Instant::now());
        let store = &self.inner.store;
        let lag: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.inner.slot)
        .fetch_optional(store.pool())
        .await
        .map_err(store.err("reading the replication slot's lag"))?;
        if lag.flatten().unwrap_or(0) > MARK_AFTER_BYTES {
            // Transactional, so it is flushed and read back as BEGIN, message, COMMIT.
            sqlx::query("SELECT pg_logical_emit_message(true, 'courier-mark', '')")
                .execute(store.pool())
                .await
                .map_err(store.err("writing a mark to the WAL"))?;
        }
        Ok(())
    }

    /// After the broker confirmed rows `seqs`: delete them, then advance the slot past
    /// every whole transaction now published — each only while `holder` holds the lease
    /// of `generation`. Advancing is not transactional, so it comes last: a crash in
    /// between leaves the rows deleted and the slot behind (they are republished:
    /// duplicates), never rows the slot has passed (they would stay in the table).
    pub(super) async fn confirm(
        &self,
        seqs: &[i64],
        holder: &str,
        generation: i64,
    ) -> Result<bool> {
        if !seqs.is_empty() && !self.fenced(holder, generation, Step::Delete(seqs)).await? {
            return Ok(false);
        }
        let backfilling = {
            let mut s = self.state();
            s.done.extend(seqs.iter().copied());
            s.backfill.is_some()
        };
        if backfilling {
            return Ok(true);
        }
        // The rows are deleted and remembered: a slot that cannot move now moves with a
        // later batch (or while idle).
        if let Err(e) = self.advance(holder, generation).await {
            tracing::warn!(slot = %self.inner.slot, error = %e, "cannot advance the replication slot yet");
        }
        Ok(true)
    }

    /// Advance the slot as far as the last peek and the published rows allow (under the
    /// lease). `true` if it moved.
    async fn advance(&self, holder: &str, generation: i64) -> Result<bool> {
        let target = {
            let s = self.state();
            s.last
                .as_ref()
                .and_then(|p| p.advance(&s.done))
                .filter(|(lsn, _)| *lsn > s.confirmed)
        };
        let Some((lsn, passed)) = target else {
            return Ok(false);
        };
        let slot_use = self.inner.slot_use.lock().await;
        let moved = self.fenced(holder, generation, Step::Advance(lsn)).await?;
        drop(slot_use);
        if !moved {
            // The rows are deleted, the slot stays: the next holder republishes them
            // (duplicates, never a gap).
            return Ok(false);
        }
        let mut s = self.state();
        s.confirmed = s.confirmed.max(lsn);
        for seq in passed {
            s.done.remove(&seq);
        }
        Ok(true)
    }

    /// Do `step` in a transaction that holds the lease of `generation` (`false` if not).
    async fn fenced(&self, holder: &str, generation: i64, step: Step<'_>) -> Result<bool> {
        let store = &self.inner.store;
        let slot = &self.inner.slot;
        let mut tx = store
            .pool()
            .begin()
            .await
            .map_err(store.err("confirming published outbox rows"))?;
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
        match step {
            Step::Delete(seqs) => {
                sqlx::query("DELETE FROM courier_outbox WHERE seq = ANY($1)")
                    .bind(seqs)
                    .execute(&mut *tx)
                    .await
                    .map_err(store.err("deleting published outbox rows"))?;
            }
            Step::Advance(lsn) => {
                sqlx::query(
                    "SELECT pg_replication_slot_advance($1, GREATEST($2::text::pg_lsn,
                       (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1)))",
                )
                .bind(slot)
                .bind(format_lsn(lsn))
                .execute(&mut *tx)
                .await
                .map_err(|e| map(format!("advancing replication slot {slot}"), e))?;
            }
        }
        tx.commit()
            .await
            .map_err(store.err("confirming published outbox rows"))?;
        Ok(true)
    }
}

/// What [`PgLogTailing::fenced`] does under the lease.
enum Step<'a> {
    Delete(&'a [i64]),
    Advance(u64),
}

/// `lsn` as PostgreSQL writes it (`16/B374D848`).
fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The size and message of an inserted row.
fn decode_row(
    map: Columns,
    mut columns: Vec<Column>,
) -> (usize, std::result::Result<courier_core::Message, String>) {
    let mut take = |i: usize, name: &str| {
        columns
            .get_mut(i)
            .map(|c| std::mem::replace(c, Column::Null))
            .ok_or_else(|| format!("column {name} is missing"))
    };
    let (id, headers, payload) = (
        take(map.message_id, "message_id"),
        take(map.headers, "headers"),
        take(map.payload, "payload"),
    );
    let size = [&id, &headers, &payload]
        .iter()
        .map(|c| c.as_ref().map_or(0, Column::len))
        .sum();
    let message = (|| {
        let id = id?.text().map_err(|e| format!("message_id: {e}"))?;
        let headers = headers?.text().map_err(|e| format!("headers: {e}"))?;
        let payload = payload?.bytea().map_err(|e| format!("payload: {e}"))?;
        crate::decode_message(&id, &headers, payload.into())
    })();
    (size, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_print_like_postgres() {
        assert_eq!(format_lsn(0x01DA_EDC8), "0/1DAEDC8");
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
    }
}
