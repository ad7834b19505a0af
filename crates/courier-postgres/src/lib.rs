//! # courier-postgres
//!
//! Courier on PostgreSQL, the service database at scale:
//! - [`PgStore`]: hosts the transactional [`Outbox`], the inbox (idempotent consumer) and
//!   dead letters in the service's own database, implementing
//!   [`courier_core::MessageStore`] — the same shape as `courier_sqlite::SqliteStore`, so
//!   user code changes only its store and pool types;
//! - the outbox side of the [`Relay`] ([`courier_core::OutboxSource`]): committed rows
//!   oldest first (never a high-water mark: sequence numbers are not commit order on
//!   PostgreSQL), a lease on the database's clock with a generation checked by every
//!   delete (fencing), and wake-ups by `LISTEN`/`NOTIFY` on channel `courier_outbox`
//!   (writers notify only while a relay waits: see [`PgStore::outbox_arm`]).
//!
//! Tables are created in the current schema (the first of the connection's
//! `search_path`), so several services can share one database, a schema each.
//!
//! ```no_run
//! # async fn f(msg: courier_core::Message) -> Result<(), Box<dyn std::error::Error>> {
//! let store = courier_postgres::PgStore::connect("postgres://app@127.0.0.1/orders").await?;
//! let mut tx = store.begin().await?;
//! // ... your business writes on &mut *tx ...
//! store.outbox().send(&mut tx, msg).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! **PostgreSQL as a broker.** [`PgBroker`] implements the transport traits
//! ([`courier_core::Publisher`], [`courier_core::Subscriber`]) on tables
//! (`courier_broker_*`, same current-schema rule), for teams that run only PostgreSQL:
//! partitioned channels, consumer groups with committed offsets, partition leases on the
//! database's clock with generation fencing on every offset commit, rebalancing on
//! join / leave / death, delayed redelivery, retention, and wake-ups by `LISTEN`/`NOTIFY`
//! (channel `courier_broker`) with a fallback poll. Offsets follow commit order per
//! partition (publishers of one partition serialise on its counter row), and a publish
//! resolves after `COMMIT` (with `synchronous_commit = on`: WAL flushed, `Durability::Synced`).
//! [`PgBroker::describe`] lists channels, partitions, groups, owners, offsets and lag.
//!
//! ```no_run
//! # async fn f(msg: courier_core::Message) -> courier_core::Result<()> {
//! use courier_core::Publisher;
//! let broker = courier_postgres::PgBroker::connect("postgres://app@127.0.0.1/broker").await?;
//! broker.publish(&[msg]).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod broker;
mod correlation;
mod error;
mod held;
mod outbox;
mod reference;
mod schema;
mod source;
mod store;
mod tailing;
mod tx;

pub use broker::{
    ChannelInfo, GroupInfo, GroupPartition, PartitionInfo, PgBroker, PgBrokerChanges,
    PgBrokerConfig, PgBrokerStats,
};
pub use courier_core::{OutboxRow, Relay, RelayConfig, RelayStats};
pub use error::redact_url;
pub use outbox::{Outbox, OutboxTarget};
pub use reference::raw_commit_rate;
pub use store::PgStore;
pub use tailing::PgLogTailing;
pub use tx::PgStoreTx;

use bytes::Bytes;
use courier_core::{Headers, Message, MessageId};

/// Rebuild a message from its stored columns, or say what is wrong with them.
pub(crate) fn decode_message(id: &str, headers: &str, payload: Bytes) -> Result<Message, String> {
    let id = MessageId::parse(id).map_err(|e| e.to_string())?;
    let headers = Headers::from_json(headers).map_err(|e| e.to_string())?;
    Ok(Message {
        id,
        headers,
        payload,
    })
}
