//! The transactional outbox: messages written in the caller's transaction.

use crate::StoreTx;
use courier_core::transport::BoxFuture;
use courier_core::{Message, MessageId, Result};
use sqlx::Sqlite;
use sqlx::sqlite::SqliteConnection;

/// Where outbox messages can be written: an open transaction on the service database.
///
/// A [`StoreTx`] (from [`SqliteStore::begin`](crate::SqliteStore::begin)) queues them and
/// writes them in the same round trip as its `COMMIT`; a sqlx `Transaction` or a
/// connection inside a transaction inserts them at once.
pub trait OutboxTarget: Send {
    /// Write (or queue) `messages`, already validated.
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>>;
}

impl OutboxTarget for StoreTx {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        self.buffer_outbox(messages);
        Box::pin(async { Ok(()) })
    }
}

impl OutboxTarget for SqliteConnection {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::store::insert_outbox(self, messages))
    }
}

impl OutboxTarget for sqlx::Transaction<'_, Sqlite> {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::store::insert_outbox(self, messages))
    }
}

impl OutboxTarget for sqlx::pool::PoolConnection<Sqlite> {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::store::insert_outbox(self, messages))
    }
}

/// Writes messages into `courier_outbox` inside the caller's transaction; the
/// [`Relay`](crate::Relay) publishes them after the commit, in order.
///
/// ```no_run
/// # async fn f(store: courier_sqlite::SqliteStore, msg: courier_core::Message) -> courier_core::Result<()> {
/// let mut tx = store.begin().await?;
/// // ... your business writes on &mut *tx ...
/// store.outbox().send(&mut tx, msg).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Outbox {
    max_message_bytes: Option<usize>,
}

impl Outbox {
    /// An outbox with the default 1 MiB message limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuse messages larger than `bytes`.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = Some(bytes);
        self
    }

    fn check(&self, m: &Message) -> Result<()> {
        m.check_outgoing(
            self.max_message_bytes
                .unwrap_or(courier_core::message::DEFAULT_MAX_MESSAGE_BYTES),
        )
    }

    /// Add `message` to the outbox in the transaction `tx` (pass `&mut tx`): it is
    /// published only if the transaction commits. The message must name its channel
    /// ([`Message::to`]) and fit the size limit; both are checked here. Returns its id.
    pub async fn send<T: OutboxTarget + ?Sized>(
        &self,
        tx: &mut T,
        message: Message,
    ) -> Result<MessageId> {
        self.check(&message)?;
        let id = message.id;
        tx.write_outbox(std::slice::from_ref(&message)).await?;
        Ok(id)
    }

    /// Add several messages, in order.
    pub async fn send_all<T: OutboxTarget + ?Sized>(
        &self,
        tx: &mut T,
        messages: &[Message],
    ) -> Result<()> {
        for m in messages {
            self.check(m)?;
        }
        tx.write_outbox(messages).await
    }
}
