//! The transactional outbox: messages written in the caller's transaction.

use crate::StoreTx;
use courier_core::interaction::{command_message, event_message, notification_message};
use courier_core::transport::BoxFuture;
use courier_core::{
    ChannelName, Command, Correlation, DomainEvent, Error, ErrorKind, Message, MessageId,
    NewCorrelation, Notification, Result,
};
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

    /// Write correlation rows of commands sent in this transaction.
    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>>;
}

impl OutboxTarget for StoreTx {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        self.buffer_outbox(messages);
        Box::pin(async { Ok(()) })
    }

    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::correlation::insert(self, rows))
    }
}

impl OutboxTarget for SqliteConnection {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::store::insert_outbox(self, messages))
    }

    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::correlation::insert(self, rows))
    }
}

impl OutboxTarget for sqlx::Transaction<'_, Sqlite> {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::store::insert_outbox(self, messages))
    }

    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::correlation::insert(self, rows))
    }
}

impl OutboxTarget for sqlx::pool::PoolConnection<Sqlite> {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::store::insert_outbox(self, messages))
    }

    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::correlation::insert(self, rows))
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
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    max_message_bytes: Option<usize>,
    reply_to: Option<ChannelName>,
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

    /// This service's reply channel: commands sent with
    /// [`send_command`](Self::send_command) ask for their replies there (the service's
    /// dispatcher with [`Dispatcher::replies_to`](courier_core::Dispatcher::replies_to)
    /// the same channel consumes them).
    pub fn replies_to(mut self, channel: ChannelName) -> Self {
        self.reply_to = Some(channel);
        self
    }

    /// Send command `cmd` in the transaction `tx`: the message (with `reply-to`,
    /// `correlation-id`, `deadline`) and its correlation row commit together, so any
    /// instance of this service can handle the reply, even after a restart. Returns the
    /// command's id (its correlation id).
    ///
    /// ```no_run
    /// # async fn f<C: courier_core::Command>(store: courier_sqlite::SqliteStore, cmd: C) -> courier_core::Result<()> {
    /// use courier_core::{ChannelName, Correlation};
    /// use std::time::Duration;
    /// let outbox = store.outbox().replies_to(ChannelName::new("order-service.replies")?);
    /// let mut tx = store.begin().await?;
    /// // ... the business change on &mut *tx ...
    /// outbox.send_command(&mut tx, &cmd, Correlation::new().data(&"o-1")?.deadline_in(Duration::from_secs(30))).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_command<C: Command, T: OutboxTarget + ?Sized>(
        &self,
        tx: &mut T,
        cmd: &C,
        correlation: Correlation,
    ) -> Result<MessageId> {
        let reply_to = self.reply_to.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "cannot send command {}: the outbox has no reply channel \
                     (use store.outbox().replies_to(channel))",
                    C::TYPE
                ),
            )
        })?;
        let (msg, row) = command_message(cmd, reply_to, &correlation)?;
        self.check(&msg)?;
        tx.write_correlations(std::slice::from_ref(&row)).await?;
        tx.write_outbox(std::slice::from_ref(&msg)).await?;
        Ok(msg.id)
    }

    /// Send notification `n` (a one-way command) in the transaction `tx`.
    pub async fn notify<N: Notification, T: OutboxTarget + ?Sized>(
        &self,
        tx: &mut T,
        n: &N,
        key: Option<&str>,
    ) -> Result<MessageId> {
        self.send(tx, notification_message(n, key)?).await
    }

    /// Publish domain event `e` in the transaction `tx` (channel = its aggregate type,
    /// key = its aggregate id).
    pub async fn publish_event<E: DomainEvent, T: OutboxTarget + ?Sized>(
        &self,
        tx: &mut T,
        e: &E,
    ) -> Result<MessageId> {
        self.send(tx, event_message(e)?).await
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
