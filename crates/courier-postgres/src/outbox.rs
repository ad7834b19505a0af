//! The transactional outbox: messages written in the caller's transaction.

use crate::error::map;
use courier_core::transport::BoxFuture;
use courier_core::{Message, MessageId, Result, now_ms};
use sqlx::Postgres;
use sqlx::postgres::PgConnection;

/// The `NOTIFY` channel the outbox announces its commits on.
pub(crate) const CHANNEL: &str = "courier_outbox";

/// Rows per `INSERT` (5 parameters each, well under PostgreSQL's 65,535).
const ROWS_PER_INSERT: usize = 1000;

/// Where outbox messages can be written: an open transaction on the service database
/// (a sqlx `Transaction`, or a connection inside one).
pub trait OutboxTarget: Send {
    /// Write `messages`, already validated.
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>>;
}

impl OutboxTarget for PgConnection {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(insert_outbox(self, messages))
    }
}

impl OutboxTarget for sqlx::Transaction<'_, Postgres> {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(insert_outbox(self, messages))
    }
}

impl OutboxTarget for sqlx::pool::PoolConnection<Postgres> {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(insert_outbox(self, messages))
    }
}

/// Insert `messages` into `courier_outbox` on `conn` (inside the caller's transaction)
/// and `NOTIFY courier_outbox` in the same statement; PostgreSQL delivers the
/// notification when (and only if) the transaction commits. The payload is the schema,
/// so relays of other schemas in the same database can ignore it.
pub(crate) async fn insert_outbox(conn: &mut PgConnection, messages: &[Message]) -> Result<()> {
    let now = now_ms() as i64;
    for chunk in messages.chunks(ROWS_PER_INSERT) {
        let mut rows = Vec::with_capacity(chunk.len());
        for m in chunk {
            rows.push((
                m.id.to_string(),
                m.channel()?.to_string(),
                m.headers.to_json(),
                m.payload.to_vec(),
            ));
        }
        let mut q = sqlx::QueryBuilder::<Postgres>::new(
            "WITH ins AS (INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at) ",
        );
        q.push_values(rows, |mut b, (id, ch, h, p)| {
            b.push_bind(id)
                .push_bind(ch)
                .push_bind(h)
                .push_bind(p)
                .push_bind(now);
        });
        q.push(") SELECT pg_notify('")
            .push(CHANNEL)
            .push("', coalesce(current_schema(), ''))");
        q.build()
            .execute(&mut *conn)
            .await
            .map_err(|e| map("writing to the outbox", e))?;
    }
    Ok(())
}

/// Writes messages into `courier_outbox` inside the caller's transaction; the
/// [`Relay`](crate::Relay) publishes them after the commit, in order.
///
/// ```no_run
/// # async fn f(store: courier_postgres::PgStore, msg: courier_core::Message) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = store.pool().begin().await?;
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
        if messages.is_empty() {
            return Ok(());
        }
        tx.write_outbox(messages).await
    }
}
