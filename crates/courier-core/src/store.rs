//! The service database seen by the dispatcher: transactions, inbox, outbox, dead letters.
//!
//! Backends (`courier-sqlite`, later PostgreSQL) implement [`MessageStore`]; the
//! dispatcher runs every handler inside a store transaction that also records the inbox
//! row and the outgoing messages, so consume → change state → produce commits as one.

use crate::correlation::{CorrelationRecord, NewCorrelation, ReplyApplied, ReplyRecord};
use crate::dead_letter::{DeadLetter, NewDeadLetter};
use crate::error::Result;
use crate::message::Message;
use std::future::Future;

/// A service database that can host Courier's inbox, outbox and dead letters.
pub trait MessageStore: Clone + Send + Sync + 'static {
    /// An open transaction.
    type Tx: Send + 'static;
    /// What handlers run their own SQL on (e.g. `sqlx::SqliteConnection`).
    type Conn: ?Sized + Send + 'static;

    /// The connection inside a transaction.
    fn conn(tx: &mut Self::Tx) -> &mut Self::Conn;

    /// Begin a write transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx>> + Send;

    /// Commit.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// Open a savepoint (one per message in a batch).
    fn savepoint(&self, tx: &mut Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// Undo everything since the last savepoint and close it.
    fn rollback_savepoint(&self, tx: &mut Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// Keep everything since the last savepoint and close it.
    fn release_savepoint(&self, tx: &mut Self::Tx) -> impl Future<Output = Result<()>> + Send;

    /// Record that `subscriber` handled `message_id`; `false` if it already had.
    fn inbox_record(
        &self,
        tx: &mut Self::Tx,
        subscriber: &str,
        message_id: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Record several messages at once; returns the ids that were new (the others are
    /// duplicates). The default calls [`inbox_record`](Self::inbox_record) for each.
    fn inbox_record_many(
        &self,
        tx: &mut Self::Tx,
        subscriber: &str,
        message_ids: &[String],
    ) -> impl Future<Output = Result<std::collections::HashSet<String>>> + Send {
        async move {
            let mut new = std::collections::HashSet::new();
            for id in message_ids {
                if self.inbox_record(tx, subscriber, id).await? {
                    new.insert(id.clone());
                }
            }
            Ok(new)
        }
    }

    /// Delete inbox rows older than `older_than_ms` (in batches of `batch`, so the hot
    /// path never waits long); returns how many went.
    fn prune_inbox(
        &self,
        older_than_ms: u64,
        batch: u32,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Put messages in the outbox inside the transaction; the relay publishes them after
    /// commit.
    fn outbox_insert(
        &self,
        tx: &mut Self::Tx,
        messages: &[Message],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Store a dead letter (ignored if `subscriber` already has one for that message id).
    fn dead_letter_insert(
        &self,
        tx: &mut Self::Tx,
        dead_letter: &NewDeadLetter,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Whether a dead letter of `subscriber` holds back messages with `key`.
    fn key_blocked(
        &self,
        tx: &mut Self::Tx,
        subscriber: &str,
        key: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// How many dead letters of `subscriber` hold back a key (0 lets the dispatcher skip
    /// the per-message check).
    fn blocking_dead_letters(&self, subscriber: &str) -> impl Future<Output = Result<u64>> + Send;

    /// Dead letters of `subscriber` an operator asked to retry, oldest first.
    fn redrive_batch(
        &self,
        subscriber: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;

    /// A retried dead letter was handled: delete it and release the messages parked
    /// behind it (same subscriber and key) for retry, in the handler's transaction.
    fn dead_letter_resolved(
        &self,
        tx: &mut Self::Tx,
        dead_letter: &DeadLetter,
    ) -> impl Future<Output = Result<()>> + Send;

    /// A retried dead letter failed again: back to `dead` with the new error, and the
    /// released messages behind it parked again.
    fn dead_letter_failed_again(
        &self,
        dead_letter: &DeadLetter,
        error: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<()>> + Send;

    // ---- correlation state (commands sent, replies received) ----------------------

    /// Insert correlation rows of commands sent in `tx`.
    fn correlation_insert(
        &self,
        tx: &mut Self::Tx,
        rows: &[NewCorrelation],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Record `reply` for `correlation_id` inside `tx`. A correlation completes (state
    /// `done`) when its expected count of replies from distinct responders is reached; a
    /// reply to a completed one, or a second reply of the same responder, changes
    /// nothing. Backends serialise concurrent replies to one correlation (row lock).
    fn correlation_reply(
        &self,
        tx: &mut Self::Tx,
        correlation_id: &str,
        reply: &ReplyRecord,
    ) -> impl Future<Output = Result<ReplyApplied>> + Send;

    /// Claim up to `limit` pending correlations whose deadline is before `now_ms`: they
    /// become `timed-out` in `tx` (one claimer wins) and are returned with their replies.
    fn correlation_expire(
        &self,
        tx: &mut Self::Tx,
        now_ms: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<CorrelationRecord>>> + Send;

    /// The timeout handler of a claimed correlation failed: make it pending again with
    /// deadline `retry_at_ms` (one more attempt, `error` kept), or `failed` when
    /// `give_up`.
    fn correlation_retry_later(
        &self,
        tx: &mut Self::Tx,
        correlation_id: &str,
        error: &str,
        retry_at_ms: u64,
        give_up: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// One correlation with its replies (outside any transaction).
    fn correlation_get(
        &self,
        correlation_id: &str,
    ) -> impl Future<Output = Result<Option<CorrelationRecord>>> + Send;

    /// Delete completed correlations (and their replies) that completed more than
    /// `older_than_ms` ago, at most `batch`; returns how many went. Pending ones stay.
    fn prune_correlations(
        &self,
        older_than_ms: u64,
        batch: u32,
    ) -> impl Future<Output = Result<u64>> + Send;
}
