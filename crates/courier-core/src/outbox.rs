//! The outbox as a relay sees it: committed rows, a lease, wake-ups. Service-database
//! backends implement [`OutboxSource`]; the [`Relay`](crate::relay::Relay) is built on it.

use crate::error::Result;
use crate::message::Message;
use std::future::Future;

/// One row of an outbox, as the relay reads it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Position in the outbox (the relay publishes in this order).
    pub seq: i64,
    /// The message, or why the row cannot be read as one.
    pub message: std::result::Result<Message, String>,
}

/// A service database's outbox, as a relay needs it.
pub trait OutboxSource: Clone + Send + Sync + 'static {
    /// Up to `limit` committed rows (and about `max_bytes`, at least one row), oldest
    /// first. Rows stay until [`outbox_delete`](Self::outbox_delete): never a high-water
    /// mark, so a row whose transaction commits late is still found.
    fn outbox_peek(
        &self,
        limit: u32,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<OutboxRow>>> + Send;

    /// Like [`outbox_peek`](Self::outbox_peek), leaving out the rows `exclude` (a batch
    /// being published while the next one is read). The default peeks `exclude.len()`
    /// more rows and filters them; a source may do it in its query.
    fn outbox_peek_excluding(
        &self,
        limit: u32,
        max_bytes: usize,
        exclude: &[i64],
    ) -> impl Future<Output = Result<Vec<OutboxRow>>> + Send {
        let extra = u32::try_from(exclude.len()).unwrap_or(u32::MAX);
        let exclude: std::collections::HashSet<i64> = exclude.iter().copied().collect();
        let bytes = max_bytes.saturating_mul(2);
        async move {
            let mut rows = self.outbox_peek(limit.saturating_add(extra), bytes).await?;
            rows.retain(|r| !exclude.contains(&r.seq));
            rows.truncate(limit as usize);
            Ok(rows)
        }
    }

    /// Delete published rows if `holder` still holds the relay lease of `generation`
    /// (fencing); `false` when the lease was lost.
    fn outbox_delete(
        &self,
        seqs: &[i64],
        holder: &str,
        generation: i64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Take or renew the relay lease for `ttl_ms`, by the database's clock. The
    /// generation when `holder` holds it (a new one on take-over), `None` otherwise.
    fn relay_lease(
        &self,
        holder: &str,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<Option<i64>>> + Send;

    /// Give the lease up (clean shutdown: a standby takes over at once).
    fn relay_release(&self, holder: &str) -> impl Future<Output = Result<()>> + Send;

    /// Changes whenever new rows may have been committed (a cross-process signal where
    /// the backend has one); the relay also polls.
    fn outbox_changes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The relay is about to wait for [`outbox_changes`](Self::outbox_changes): make
    /// sure commits signal from now on, for a source whose writers signal only while a
    /// relay waits (a signal can cost writers more than their write). `true` when
    /// armed: the relay then looks once more before it waits, for rows committed before;
    /// `false` when it cannot be armed yet (writers in flight that will not signal): the
    /// relay looks again shortly instead of waiting for the idle poll. A source whose
    /// signal is always on returns `true`; a wrapper must forward it (no default, so
    /// that a wrapper cannot silently lose the wake-ups).
    fn outbox_arm(&self) -> impl Future<Output = bool> + Send;

    /// What this outbox is, for logs and errors (a file path, a URL without password).
    fn describe(&self) -> String;
}
