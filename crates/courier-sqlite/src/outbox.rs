//! The transactional outbox: messages written in the caller's transaction.

use courier_core::{Message, MessageId, Result};
use sqlx::sqlite::SqliteConnection;

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
        m.check_size(
            self.max_message_bytes
                .unwrap_or(courier_core::message::DEFAULT_MAX_MESSAGE_BYTES),
        )?;
        m.channel()?;
        Ok(())
    }

    /// Add `message` to the outbox in the transaction `conn` (pass `&mut tx`). The message
    /// must name its channel ([`Message::to`]). Returns its id.
    pub async fn send(&self, conn: &mut SqliteConnection, message: Message) -> Result<MessageId> {
        self.check(&message)?;
        let id = message.id;
        crate::store::insert_outbox(conn, std::slice::from_ref(&message)).await?;
        Ok(id)
    }

    /// Add several messages in one statement batch.
    pub async fn send_all(&self, conn: &mut SqliteConnection, messages: &[Message]) -> Result<()> {
        for m in messages {
            self.check(m)?;
        }
        crate::store::insert_outbox(conn, messages).await
    }
}
