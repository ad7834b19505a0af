//! Transaction-log tailing: the outbox read from PostgreSQL's write-ahead log through a
//! logical replication slot, in commit order, without polling queries on the outbox table.
//!
//! [`PgLogTailing`] is an [`OutboxSource`], so the same [`Relay`](crate::Relay) runs on it
//! as on the polling [`PgStore`]:
//! - **reading**: `pg_logical_slot_peek_binary_changes` on a slot with the `pgoutput`
//!   plugin and a publication of inserts into this schema's `courier_outbox` only, with
//!   binary columns (`bytea` and `text` arrive as raw bytes: nothing to unescape, which is
//!   why `pgoutput` and not `test_decoding`, whose text output needs exact unquoting).
//!   Peeking does not consume: until the slot is advanced, the same rows come back.
//! - **confirming**: after the broker confirmed a batch, a transaction checks the relay
//!   lease (`FOR SHARE`: a take-over waits for it) and deletes the published rows by key
//!   (so the table does not grow); then a second one checks the lease again and advances
//!   the slot (`pg_replication_slot_advance`, which is not transactional, hence last) to
//!   the end of the last fully published transaction. A relay whose lease was taken
//!   neither deletes nor advances. A crash anywhere republishes from the slot's position:
//!   duplicates with the same ids, never a gap, and no row left behind.
//! - **waking**: the outbox's `NOTIFY` wakes the relay at once; the relay's periodic peek
//!   is the fallback, so a lost notification only delays.
//! - **starting**: rows committed before the slot existed are not in its stream; they
//!   are relayed from the table once (oldest first) before the slot is read.
//! - **idle**: a slot holds all WAL after its position, also WAL of other tables. When the
//!   outbox is idle but the server is not, the source writes a tiny logical message
//!   (`pg_logical_emit_message`) and, once it reads it back, advances the slot past it.
//!
//! The slot survives restarts and holds WAL while no relay runs: drop it with
//! [`PgLogTailing::drop_slot`] when log tailing is given up (see docs/operations.md).

mod backfill;
mod peek;
mod pgoutput;
mod progress;
mod slot;

use crate::PgStore;
use courier_core::{OutboxRow, OutboxSource, Result};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The outbox of a [`PgStore`] read by tailing PostgreSQL's transaction log (logical
/// decoding) instead of polling the table. Cheap to clone; clones share their progress.
///
/// Needs `wal_level = logical` on the server, a free replication slot, and a role allowed
/// to create slots and publications (`REPLICATION` or superuser, owner of the table).
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
    state: Mutex<State>,
    /// Held while this process reads or advances the slot.
    slot_use: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// What the last peek saw.
    last: Option<progress::Peeked>,
    /// Keys of published (and deleted) rows the slot has not passed yet.
    done: std::collections::HashSet<i64>,
    /// The slot's position as far as this source moved it.
    confirmed: u64,
    /// The lease this source's relay holds (for advancing the slot while idle).
    lease: Option<(String, i64)>,
    /// Columns of the outbox table by relation id (`None`: another table).
    relations: HashMap<u32, Option<peek::Columns>>,
    /// When the last idle mark was written.
    last_mark: Option<std::time::Instant>,
    /// Rows up to this key were committed before the slot may have existed: relayed from
    /// the table first.
    backfill: Option<i64>,
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
        slot::ensure(&store, slot).await?;
        let backfill = backfill::pending(&store, slot).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                slot: slot.to_owned(),
                state: Mutex::new(State {
                    backfill,
                    ..State::default()
                }),
                slot_use: tokio::sync::Mutex::new(()),
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

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl OutboxSource for PgLogTailing {
    async fn outbox_peek(&self, limit: u32, max_bytes: usize) -> Result<Vec<OutboxRow>> {
        self.peek(limit, max_bytes).await
    }

    async fn outbox_delete(&self, seqs: &[i64], holder: &str, generation: i64) -> Result<bool> {
        self.confirm(seqs, holder, generation).await
    }

    async fn relay_lease(&self, holder: &str, ttl_ms: u64) -> Result<Option<i64>> {
        let lease = self.inner.store.relay_lease(holder, ttl_ms).await;
        let mut state = self.state();
        match &lease {
            Ok(Some(g)) => state.lease = Some((holder.to_owned(), *g)),
            Ok(None) => {
                if state.lease.as_ref().is_some_and(|(h, _)| h == holder) {
                    state.lease = None;
                }
            }
            Err(_) => {}
        }
        lease
    }

    async fn relay_release(&self, holder: &str) -> Result<()> {
        {
            let mut state = self.state();
            if state.lease.as_ref().is_some_and(|(h, _)| h == holder) {
                state.lease = None;
            }
        }
        self.inner.store.relay_release(holder).await
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
