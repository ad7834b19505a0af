//! # courier-sqlite
//!
//! Courier on SQLite, the zero-set-up default:
//! - [`SqliteStore`]: a service database hosting the transactional [`Outbox`], the inbox
//!   (idempotent consumer) and dead letters, implementing [`courier_core::MessageStore`];
//! - the outbox side of the [`Relay`] ([`courier_core::OutboxSource`]): committed rows,
//!   a lease with fencing, wake-ups on commits from any process;
//! - [`SqliteBroker`]: an embedded, durable, partitioned broker in one SQLite file shared
//!   by the processes of a machine, with consumer groups, leases and rebalancing.
//!
//! Durability: WAL with `synchronous=NORMAL` by default (survives any process crash; a
//! power cut may lose the last commits), [`Sync::Full`] to fsync every commit.
#![deny(missing_docs)]

mod broker;
mod connect;
mod correlation;
mod error;
mod outbox;
mod reference;
mod store;
mod wake;
mod writer;

pub use broker::{
    Changes, ChannelInfo, GroupInfo, GroupPartition, PartitionInfo, SqliteBroker,
    SqliteBrokerConfig,
};
pub use connect::{Sync, parse_sqlite_url};
pub use courier_core::{OutboxRow, Relay, RelayConfig, RelayStats};
pub use outbox::{Outbox, OutboxTarget};
pub use reference::{RawPath, raw_commit_rate};
pub use store::{SqliteStore, SqliteStoreOptions};
pub use writer::StoreTx;

use bytes::Bytes;
use courier_core::{Headers, Malformed, Message, MessageId};

/// Rebuild a message from its stored columns, or say what is wrong with them.
pub(crate) fn decode_message(
    id: &str,
    headers: &str,
    payload: Bytes,
) -> Result<Message, Malformed> {
    let malformed = |reason: String| Malformed {
        raw_id: id.to_owned(),
        raw_headers: headers.to_owned(),
        payload: payload.clone(),
        reason,
    };
    let id = MessageId::parse(id).map_err(|e| malformed(e.to_string()))?;
    let headers = Headers::from_json(headers).map_err(|e| malformed(e.to_string()))?;
    Ok(Message {
        id,
        headers,
        payload: payload.clone(),
    })
}
