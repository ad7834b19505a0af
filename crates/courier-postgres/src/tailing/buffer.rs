//! The outbox inserts the replication stream delivered and the relay has not confirmed
//! yet, in commit order, and how far the slot may be confirmed.
//!
//! `pgoutput` (protocol 1) sends a transaction only once it has committed, so its rows may
//! be published as soon as they arrive, even before its Commit message (a transaction
//! larger than the buffer arrives in parts). The slot, though, can only be confirmed at
//! the end of a commit, and only past transactions whose rows are all published
//! (confirmed): the server resends from the confirmed position after a reconnect.
//!
//! A reconnect resends what was not confirmed. Transactions already received are known by
//! their commit position and skipped; a transaction cut by the disconnect is resent from
//! its start, and the inserts already received are skipped by count (the order of a
//! transaction's changes never differs). So a source never hands out a row twice, except
//! when its buffer was reset (lease lost): duplicates with the same id, never a gap.

use courier_core::{Message, OutboxRow};
use std::collections::{HashSet, VecDeque};

/// Most unconfirmed rows held; beyond, the stream stops reading and TCP flow control
/// holds the server's sender.
pub(super) const MAX_ROWS: usize = 10_000;

/// Most column bytes of unconfirmed rows held (one row is always accepted).
pub(super) const MAX_BYTES: usize = 32 * 1024 * 1024;

/// One outbox insert.
#[derive(Debug)]
struct Row {
    seq: i64,
    /// Bytes of its columns (id, headers, payload).
    size: usize,
    /// The message, or why the row cannot be read as one.
    message: Result<Message, String>,
}

/// One transaction's inserts not yet confirmed.
#[derive(Debug)]
struct Txn {
    /// Where its commit record starts (from Begin): the transaction's identity.
    final_lsn: u64,
    /// Its transaction id (from Begin): whether it is visible yet is asked by it.
    xid: u32,
    /// The end of its commit record, once its Commit arrived.
    end: Option<u64>,
    rows: VecDeque<Row>,
    /// Outbox inserts received so far (confirmed ones too).
    received: usize,
}

/// A protocol step that cannot happen in a well-formed stream.
#[derive(Debug, PartialEq)]
pub(super) struct OutOfOrder(pub(super) &'static str);

/// Committed outbox inserts not yet confirmed, and the slot position they allow.
#[derive(Debug, Default)]
pub(super) struct Buffer {
    txns: VecDeque<Txn>,
    rows: usize,
    bytes: usize,
    /// Everything that commits up to here was received (end of the last commit, or the
    /// server's position in a keep-alive between transactions).
    received: u64,
    /// Every row that commits up to here was confirmed: the slot may be confirmed here.
    flushed: u64,
    /// Inside a transaction received before (a resend after a reconnect).
    skipping: bool,
    /// Inserts of the resent open transaction still to skip.
    replay_skip: usize,
    /// Rows relayed from the table by the backfill: skipped when the stream brings them
    /// too. Dropped once the stream has passed the position the backfill ended at.
    backfilled: HashSet<i64>,
    backfill_end: Option<u64>,
}

impl Buffer {
    /// A new connection starts streaming (from the slot's confirmed position).
    pub(super) fn session_started(&mut self) {
        self.skipping = false;
        self.replay_skip = 0;
    }

    /// Whether the stream may read more.
    pub(super) fn has_room(&self) -> bool {
        self.rows < MAX_ROWS && (self.bytes < MAX_BYTES || self.rows == 0)
    }

    /// Everything that commits up to this position was received.
    pub(super) fn received(&self) -> u64 {
        self.received
    }

    /// Where the slot may be confirmed.
    pub(super) fn flushed(&self) -> u64 {
        self.flushed
    }

    /// Transaction `xid`, whose commit record starts at `final_lsn`, begins.
    pub(super) fn begin(&mut self, final_lsn: u64, xid: u32) {
        self.skipping = false;
        self.replay_skip = 0;
        if final_lsn < self.received {
            // Received before (resent after a reconnect).
            self.skipping = true;
            return;
        }
        if let Some(open) = self.txns.back_mut()
            && open.end.is_none()
        {
            if open.final_lsn == final_lsn {
                // Cut by a disconnect and resent from its start.
                self.replay_skip = open.received;
                return;
            }
            // Never resent (the slot moved past it elsewhere): its rows are committed
            // rows all the same. Confirming at its commit's start is short of its end,
            // so at worst it is sent again.
            open.end = Some(open.final_lsn);
        }
        self.txns.push_back(Txn {
            final_lsn,
            xid,
            end: None,
            rows: VecDeque::new(),
            received: 0,
        });
    }

    /// An insert into the outbox with key `seq`; `decode` reads it (only when kept).
    /// `Ok(true)` when the row was added.
    pub(super) fn insert(
        &mut self,
        seq: i64,
        decode: impl FnOnce() -> (usize, Result<Message, String>),
    ) -> Result<bool, OutOfOrder> {
        if self.skipping {
            return Ok(false);
        }
        let Some(open) = self.txns.back_mut().filter(|t| t.end.is_none()) else {
            return Err(OutOfOrder("an insert outside a transaction"));
        };
        if self.replay_skip > 0 {
            self.replay_skip -= 1;
            return Ok(false);
        }
        open.received += 1;
        if self.backfilled.contains(&seq) {
            return Ok(false);
        }
        let (size, message) = decode();
        open.rows.push_back(Row { seq, size, message });
        self.rows += 1;
        self.bytes += size;
        Ok(true)
    }

    /// The open transaction committed, ending at `end_lsn`. `Some(position)` when the
    /// slot may now be confirmed further.
    pub(super) fn commit(&mut self, end_lsn: u64) -> Option<u64> {
        if std::mem::take(&mut self.skipping) {
            return None;
        }
        if let Some(open) = self.txns.back_mut()
            && open.end.is_none()
        {
            open.end = Some(end_lsn);
        }
        self.received = self.received.max(end_lsn);
        self.settle()
    }

    /// The server's position `wal_end` (a keep-alive): everything committed before it was
    /// sent. `Some(position)` when the slot may now be confirmed further (with nothing
    /// pending, up to `wal_end`: an idle outbox does not hold WAL).
    pub(super) fn keepalive(&mut self, wal_end: u64) -> Option<u64> {
        let open = self.txns.back().is_some_and(|t| t.end.is_none());
        if open || self.skipping {
            return None;
        }
        self.received = self.received.max(wal_end);
        self.settle()
    }

    /// Up to `limit` rows (about `max_bytes`, at least one), oldest first, leaving out
    /// `exclude`.
    pub(super) fn peek(
        &self,
        limit: usize,
        max_bytes: usize,
        exclude: &HashSet<i64>,
    ) -> Vec<OutboxRow> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let rows = self.txns.iter().flat_map(|t| t.rows.iter());
        for row in rows.filter(|r| !exclude.contains(&r.seq)) {
            if out.len() >= limit || (!out.is_empty() && bytes + row.size > max_bytes) {
                break;
            }
            bytes += row.size;
            out.push(OutboxRow {
                seq: row.seq,
                message: row.message.clone(),
            });
        }
        out
    }

    /// Replace the message of row `seq` (an unreadable row an operator fixed).
    pub(super) fn fix(&mut self, seq: i64, message: Message) {
        let row = self
            .txns
            .iter_mut()
            .flat_map(|t| t.rows.iter_mut())
            .find(|r| r.seq == seq);
        if let Some(row) = row {
            row.message = Ok(message);
        }
    }

    /// Each of rows `seqs` that came from the stream, with its transaction id (rows the
    /// backfill relayed from the table have none here).
    pub(super) fn xids(&self, seqs: &HashSet<i64>) -> Vec<(i64, u32)> {
        self.txns
            .iter()
            .flat_map(|t| t.rows.iter().map(move |r| (r.seq, t.xid)))
            .filter(|(seq, _)| seqs.contains(seq))
            .collect()
    }

    /// Rows `seqs` were published and deleted (or deleted by an operator): drop them.
    /// `Some(position)` when the slot may now be confirmed further.
    pub(super) fn confirm(&mut self, seqs: &[i64]) -> Option<u64> {
        let mut left: HashSet<i64> = seqs.iter().copied().collect();
        for txn in &mut self.txns {
            if left.is_empty() {
                break;
            }
            txn.rows.retain(|r| {
                if left.remove(&r.seq) {
                    self.rows -= 1;
                    self.bytes -= r.size;
                    false
                } else {
                    true
                }
            });
        }
        self.settle()
    }

    /// Rows `seqs` were relayed from the table (backfill): the stream skips them.
    pub(super) fn backfilled(&mut self, seqs: &[i64]) {
        if self.backfill_end.is_none() {
            self.backfilled.extend(seqs.iter().copied());
        }
    }

    /// The backfill ended with the log at `lsn`: rows it relayed committed before.
    pub(super) fn backfill_ended(&mut self, lsn: u64) {
        self.backfill_end = Some(lsn);
        self.drop_backfilled();
    }

    fn drop_backfilled(&mut self) {
        if self.backfill_end.is_some_and(|end| self.received >= end) {
            self.backfilled = HashSet::new();
        }
    }

    /// Pop the whole transactions at the front that are confirmed; move `flushed`.
    fn settle(&mut self) -> Option<u64> {
        self.drop_backfilled();
        let before = self.flushed;
        while let Some(front) = self.txns.front() {
            match front.end {
                Some(end) if front.rows.is_empty() => {
                    self.flushed = self.flushed.max(end);
                    self.txns.pop_front();
                }
                _ => break,
            }
        }
        if self.txns.is_empty() && !self.skipping {
            self.flushed = self.flushed.max(self.received);
        }
        (self.flushed > before).then_some(self.flushed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tag: &str) -> impl FnOnce() -> (usize, Result<Message, String>) {
        let m = Message::new(tag.to_owned());
        move || (10, Ok(m))
    }

    fn seqs(b: &Buffer) -> Vec<i64> {
        b.peek(usize::MAX, usize::MAX, &HashSet::new())
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    /// Transaction at 100..110 with rows 1, 2; at 200..210 with row 3.
    fn two() -> Buffer {
        let mut b = Buffer::default();
        b.begin(100, 701);
        assert_eq!(b.insert(1, row("a")), Ok(true));
        assert_eq!(b.insert(2, row("b")), Ok(true));
        assert_eq!(b.commit(110), None);
        b.begin(200, 702);
        assert_eq!(b.insert(3, row("c")), Ok(true));
        assert_eq!(b.commit(210), None);
        b
    }

    #[test]
    fn confirms_the_slot_past_whole_published_transactions_only() {
        let mut b = two();
        assert_eq!(seqs(&b), vec![1, 2, 3]);
        assert_eq!(b.confirm(&[1]), None, "half a transaction");
        assert_eq!(b.confirm(&[3]), None, "the one before is not published");
        assert_eq!(b.confirm(&[2]), Some(210));
        assert_eq!(b.rows, 0);
        assert!(seqs(&b).is_empty());
    }

    #[test]
    fn knows_the_transaction_of_each_streamed_row() {
        let mut b = two();
        let all: HashSet<i64> = [1, 2, 3, 4].into_iter().collect();
        assert_eq!(b.xids(&all), vec![(1, 701), (2, 701), (3, 702)]);
        b.confirm(&[1]);
        let some: HashSet<i64> = [1, 3].into_iter().collect();
        assert_eq!(b.xids(&some), vec![(3, 702)], "confirmed rows are gone");
    }

    #[test]
    fn an_idle_stream_confirms_the_servers_position() {
        let mut b = two();
        assert_eq!(b.keepalive(500), None, "rows are pending");
        assert_eq!(b.confirm(&[1, 2, 3]), Some(500));
        assert_eq!(b.keepalive(600), Some(600));
        assert_eq!(b.keepalive(600), None);
        b.begin(700, 707);
        assert_eq!(b.keepalive(800), None, "inside a transaction");
    }

    #[test]
    fn peeks_respect_limit_bytes_and_exclusions() {
        let b = two();
        let none = HashSet::new();
        assert_eq!(b.peek(2, usize::MAX, &none).len(), 2);
        assert_eq!(b.peek(10, 0, &none).len(), 1, "at least one row");
        assert_eq!(b.peek(10, 25, &none).len(), 2);
        let ex: HashSet<i64> = [1, 2].into();
        let rows = b.peek(10, usize::MAX, &ex);
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn a_resent_transaction_is_skipped_and_a_cut_one_resumes() {
        let mut b = two();
        // Third transaction cut after one of its two rows; that row is published.
        b.begin(300, 703);
        b.insert(4, row("d")).unwrap();
        assert_eq!(b.confirm(&[1, 2, 4]), Some(110));
        // Reconnect: the server resends from 110.
        b.session_started();
        b.begin(200, 702);
        assert_eq!(b.insert(3, row("c")), Ok(false));
        assert_eq!(b.commit(210), None);
        b.begin(300, 703);
        assert_eq!(b.insert(4, row("d")), Ok(false), "already received");
        assert_eq!(b.insert(5, row("e")), Ok(true));
        b.commit(310);
        assert_eq!(seqs(&b), vec![3, 5], "each row once");
        assert_eq!(b.confirm(&[3, 5]), Some(310));
    }

    #[test]
    fn inserts_need_a_transaction() {
        let mut b = Buffer::default();
        assert!(b.insert(1, row("a")).is_err());
    }

    #[test]
    fn the_buffer_is_bounded() {
        let mut b = Buffer::default();
        b.begin(1, 700);
        for i in 0..MAX_ROWS as i64 {
            assert!(b.has_room());
            b.insert(i, row("x")).unwrap();
        }
        assert!(!b.has_room());
        b.confirm(&[0]);
        assert!(b.has_room());
        let mut big = Buffer::default();
        big.begin(1, 700);
        big.insert(1, || (MAX_BYTES + 1, Ok(Message::new("big"))))
            .unwrap();
        assert!(!big.has_room());
    }

    #[test]
    fn backfilled_rows_are_not_streamed_again() {
        let mut b = Buffer::default();
        b.backfilled(&[1]);
        b.begin(100, 701);
        assert_eq!(b.insert(1, row("a")), Ok(false));
        assert_eq!(b.insert(2, row("b")), Ok(true));
        b.commit(110);
        b.backfill_ended(150);
        assert!(!b.backfilled.is_empty(), "the stream has not passed 150");
        b.keepalive(160);
        assert!(b.backfilled.is_empty());
    }
}
