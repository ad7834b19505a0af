//! Transaction-log tailing: the outbox read from PostgreSQL's write-ahead log through a
//! logical replication slot, in commit order, without polling queries on the outbox table.
//!
//! [`PgLogTailing`] is an [`OutboxSource`], so the same [`Relay`](crate::Relay) runs on it
//! as on the polling [`PgStore`]:
//! - **reading**: a background task streams the slot over a replication connection
//!   (`START_REPLICATION`, plugin `pgoutput`, a publication of inserts into this schema's
//!   `courier_outbox` only, binary columns: `bytea` and `text` arrive as raw bytes) into a
//!   bounded buffer of committed rows, in commit order. When the buffer is full (rows or
//!   bytes), the task stops reading and TCP flow control holds the server. A peek hands
//!   out buffered rows not yet confirmed; the first peek after the stream (re)started
//!   waits until it has caught up with what was committed before.
//! - **waking**: rows arriving on the stream wake the relay at once (the outbox's
//!   wake-up signal), and the relay's periodic peek remains. Writers send no `NOTIFY`:
//!   they notify only while a polling relay has armed the signal, and this source's
//!   signal is always on.
//! - **confirming**: after the broker confirmed a batch, a transaction checks the relay
//!   lease (`FOR SHARE`: a take-over waits for it) and deletes the published rows by key
//!   (so the table does not grow); then the stream reports the end of the last fully
//!   published transaction to the server as flushed, which moves the slot. A relay whose
//!   lease was taken neither deletes nor moves the slot past what it did not publish,
//!   and stops streaming. A crash anywhere makes the next stream start from the slot's
//!   confirmed position: duplicates with the same ids, never a gap, no row left behind.
//! - **one session per slot**: only the relay holding the lease streams (the relay
//!   peeks only then; a source stops its stream when it learns its lease is gone). A
//!   lease holder that finds the slot still held by a relay that lost the lease ends
//!   that session. A dropped connection (server restart, killed backend) is reopened
//!   with backoff, resuming at the slot's confirmed position; what this source already
//!   received is not handed out twice.
//! - **starting**: rows committed before the slot existed are not in its stream; they
//!   are relayed from the table once (oldest first) before the stream's rows.
//! - **idle**: a slot holds all WAL after its position, also WAL of other tables. With
//!   nothing pending, the stream reports the server's position from its keep-alives as
//!   flushed, so an idle outbox does not hold WAL while its relay runs.
//!
//! The replication connection uses the store's host (or socket directory), port, user,
//! password and database, without TLS: a URL that requires TLS (`sslmode=require` and
//! stricter) is refused with an error saying so.
//!
//! The slot survives restarts and holds WAL while no relay runs: drop it with
//! [`PgLogTailing::drop_slot`] when log tailing is given up (see docs/operations.md).

mod backfill;
mod buffer;
mod peek;
mod pgoutput;
mod slot;
mod stream;

use crate::PgStore;
use courier_core::{OutboxRow, OutboxSource, Result};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// The outbox of a [`PgStore`] read by tailing PostgreSQL's transaction log (logical
/// decoding) instead of polling the table. Cheap to clone; clones share their stream and
/// progress.
///
/// Needs `wal_level = logical` on the server, a free replication slot, and a role allowed
/// to create slots and publications and to open replication connections (`REPLICATION`
/// or superuser, owner of the table).
///
/// ```no_run
/// # async fn f(publisher: impl courier_core::Publisher) -> courier_core::Result<()> {
/// use courier_postgres::{PgLogTailing, PgStore, Relay};
/// let store = PgStore::connect("postgres://app@127.0.0.1/orders").await?;
/// let source = PgLogTailing::new(store).await?; // creates its slot if missing
/// println!("slot {}", source.slot_name());
/// Relay::new(source, publisher).run(std::future::pending()).await
/// # }
/// ```
#[derive(Clone)]
pub struct PgLogTailing {
    inner: Arc<Inner>,
}

struct Inner {
    store: PgStore,
    slot: String,
    /// Where the stream connects.
    target: stream::Target,
    /// The stream's buffer and state, shared with its background task.
    shared: Arc<stream::Shared>,
    /// Rows up to this key were committed before the slot may have existed: relayed from
    /// the table first.
    backfill: Mutex<Option<i64>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last clone is gone: end the replication connection, freeing the slot.
        self.shared.stop();
    }
}

impl fmt::Debug for PgLogTailing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgLogTailing")
            .field("store", &self.inner.store)
            .field("slot", &self.inner.slot)
            .finish_non_exhaustive()
    }
}

impl PgLogTailing {
    /// Tail `store`'s outbox through the slot (and publication) named
    /// [`default_slot_name`](Self::default_slot_name), creating both if missing.
    pub async fn new(store: PgStore) -> Result<Self> {
        let name = Self::default_slot_name(&store).await?;
        Self::with_slot(store, &name).await
    }

    /// Tail `store`'s outbox through slot `slot` (1 to 63 of `a-z`, `0-9`, `_`; the
    /// publication gets the same name), creating both if missing. Creating a slot waits
    /// until the transactions running at that moment have ended.
    pub async fn with_slot(store: PgStore, slot: &str) -> Result<Self> {
        slot::check_name(slot)?;
        let target = stream::Target {
            store: store.clone(),
            slot: slot.to_owned(),
            config: stream::config(&store, slot)?,
        };
        slot::ensure(&store, slot).await?;
        stream::check(&target).await?;
        let backfill = backfill::pending(&store, slot).await?;
        let shared = Arc::new(stream::Shared::new(store.inner.changes.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                slot: slot.to_owned(),
                target,
                shared,
                backfill: Mutex::new(backfill),
            }),
        })
    }

    /// The slot name [`new`](Self::new) uses for `store`: `courier_<schema>_<hash>`, unique
    /// per database and schema.
    pub async fn default_slot_name(store: &PgStore) -> Result<String> {
        let database: String = sqlx::query_scalar("SELECT current_database()::text")
            .fetch_one(store.pool())
            .await
            .map_err(store.err("reading the database name"))?;
        Ok(slot::default_name(&database, store.schema()))
    }

    /// Drop replication slot `slot` and its publication on `store`'s server, without
    /// opening a source (which would create them). `Ok(false)` when there was no such
    /// slot. Fails while a relay is reading from the slot.
    pub async fn drop_slot_named(store: &PgStore, slot: &str) -> Result<bool> {
        slot::drop(store, slot).await
    }

    /// Drop this source's slot and publication: the WAL it held is released, and rows
    /// still in the outbox are no longer relayed by log tailing (the polling relay still
    /// finds them). `Ok(false)` when the slot was already gone.
    pub async fn drop_slot(&self) -> Result<bool> {
        self.inner.shared.stop();
        // This source's stream, just stopped, lets go of the slot in a moment.
        slot::wait_inactive(&self.inner.store, &self.inner.slot).await?;
        slot::drop(&self.inner.store, &self.inner.slot).await
    }

    /// The replication slot (and publication) name.
    pub fn slot_name(&self) -> &str {
        &self.inner.slot
    }

    /// The store whose outbox this is.
    pub fn store(&self) -> &PgStore {
        &self.inner.store
    }

    /// Bytes of WAL the slot keeps on the server's disk (from its confirmed position to
    /// the current end of the log); `None` when the slot was dropped.
    pub async fn lag_bytes(&self) -> Result<Option<u64>> {
        slot::lag_bytes(&self.inner.store, &self.inner.slot).await
    }

    fn backfill(&self) -> MutexGuard<'_, Option<i64>> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.inner
            .backfill
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `holder` no longer holds the lease: stop streaming (a slot serves one session at a
    /// time, and the new holder needs it) and forget what was received.
    fn lease_lost(&self, holder: &str) {
        let mine = {
            let mut s = self.inner.shared.lock();
            let mine = s.lease.as_ref().is_some_and(|(h, _)| h == holder);
            if mine {
                s.lease = None;
            }
            mine
        };
        if mine {
            self.inner.shared.stop();
        }
    }
}

impl OutboxSource for PgLogTailing {
    async fn outbox_peek(&self, limit: u32, max_bytes: usize) -> Result<Vec<OutboxRow>> {
        self.peek(limit, max_bytes, &[]).await
    }

    async fn outbox_peek_excluding(
        &self,
        limit: u32,
        max_bytes: usize,
        exclude: &[i64],
    ) -> Result<Vec<OutboxRow>> {
        self.peek(limit, max_bytes, exclude).await
    }

    async fn outbox_delete(&self, seqs: &[i64], holder: &str, generation: i64) -> Result<bool> {
        self.confirm(seqs, holder, generation).await
    }

    async fn relay_lease(&self, holder: &str, ttl_ms: u64) -> Result<Option<i64>> {
        let lease = self.inner.store.relay_lease(holder, ttl_ms).await;
        match &lease {
            Ok(Some(g)) => {
                let renewed = {
                    let mut s = self.inner.shared.lock();
                    let before = s.lease.replace((holder.to_owned(), *g));
                    before.is_none_or(|(h, old)| h == holder && old == *g)
                };
                if !renewed {
                    // The lease was lost and taken again: another relay may have moved
                    // the slot meanwhile; start over from its position.
                    self.inner.shared.stop();
                }
            }
            Ok(None) => self.lease_lost(holder),
            Err(_) => {}
        }
        lease
    }

    async fn relay_release(&self, holder: &str) -> Result<()> {
        self.lease_lost(holder);
        self.inner.store.relay_release(holder).await
    }

    /// Always on: the stream wakes the relay with every row it receives.
    async fn outbox_arm(&self) -> bool {
        true
    }

    fn outbox_changes(&self) -> watch::Receiver<u64> {
        OutboxSource::outbox_changes(&self.inner.store)
    }

    fn describe(&self) -> String {
        format!(
            "{} (log tailing, slot {})",
            self.inner.store.inner.describe, self.inner.slot
        )
    }
}
