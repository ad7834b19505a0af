//! What a peek saw and how far the slot may move: the slot can only be advanced to the
//! end of a commit (decoding from inside a transaction would resend all of it), and only
//! past inserts that are all published.
//!
//! Published rows are remembered by key (`done`) until the slot has passed them: a batch
//! that ends inside a transaction, or a relay that reads the next batch while the last one
//! is still being confirmed, never gets those rows again. A crash forgets `done`: the
//! next relay republishes them (duplicates with the same ids, never a gap).

use std::collections::HashSet;

/// One insert into the outbox, as a peek saw it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The row's key.
    pub(crate) seq: i64,
    /// The end of its transaction's commit, once the peek read it.
    pub(crate) commit: Option<u64>,
    /// Whether it is the last insert of its transaction.
    pub(crate) last_in_txn: bool,
}

/// What a peek saw, from the slot's position at the time.
#[derive(Debug, Default, Clone)]
pub(crate) struct Peeked {
    /// Inserts, in commit order (published ones too).
    pub(crate) entries: Vec<Entry>,
    /// The end of the last commit read such that everything before it is in `entries`.
    pub(crate) safe: Option<u64>,
}

impl Peeked {
    /// The furthest commit end such that every insert before it is in `done`, with the
    /// keys the slot passes by moving there; `None` when it cannot move.
    pub(crate) fn advance(&self, done: &HashSet<i64>) -> Option<(u64, Vec<i64>)> {
        let mut target = None;
        let mut passed = 0usize;
        for (i, e) in self.entries.iter().enumerate() {
            if !done.contains(&e.seq) {
                return target.map(|t| (t, self.keys(passed)));
            }
            if e.last_in_txn
                && let Some(c) = e.commit
            {
                target = Some(c);
                passed = i + 1;
            }
        }
        match self.safe {
            Some(s) => Some((s, self.keys(passed))),
            None => target.map(|t| (t, self.keys(passed))),
        }
    }

    fn keys(&self, n: usize) -> Vec<i64> {
        self.entries[..n].iter().map(|e| e.seq).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: i64, commit: Option<u64>, last: bool) -> Entry {
        Entry {
            seq,
            commit,
            last_in_txn: last,
        }
    }

    fn done(keys: &[i64]) -> HashSet<i64> {
        keys.iter().copied().collect()
    }

    #[test]
    fn moves_past_whole_published_transactions_only() {
        let p = Peeked {
            entries: vec![
                e(1, Some(100), false),
                e(2, Some(100), true),
                e(3, Some(200), true),
            ],
            safe: Some(300),
        };
        assert_eq!(p.advance(&done(&[1, 2, 3])), Some((300, vec![1, 2, 3])));
        assert_eq!(p.advance(&done(&[1, 2])), Some((100, vec![1, 2])));
        assert_eq!(p.advance(&done(&[1])), None);
        assert_eq!(p.advance(&done(&[2, 3])), None, "1 is not published");
        assert_eq!(p.advance(&done(&[])), None);
    }

    #[test]
    fn a_transaction_cut_by_the_batch_holds_the_slot_before_it() {
        // Transaction at 200 was cut: its commit was not read.
        let p = Peeked {
            entries: vec![e(1, Some(100), true), e(5, None, false), e(6, None, false)],
            safe: Some(100),
        };
        assert_eq!(p.advance(&done(&[1, 5, 6])), Some((100, vec![1])));
    }

    #[test]
    fn an_empty_peek_moves_to_what_it_read() {
        let p = Peeked {
            entries: vec![],
            safe: Some(150),
        };
        assert_eq!(p.advance(&done(&[])), Some((150, vec![])));
        assert_eq!(Peeked::default().advance(&done(&[])), None);
    }
}
