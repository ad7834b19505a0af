//! The transactional outbox: messages written in the caller's transaction.

use crate::error::map;
use courier_core::interaction::{command_message, event_message, notification_message};
use courier_core::transport::BoxFuture;
use courier_core::{
    ChannelName, Command, Correlation, DomainEvent, Error, ErrorKind, Message, MessageId,
    NewCorrelation, Notification, Result, now_ms,
};
use sqlx::Postgres;
use sqlx::postgres::PgConnection;

/// The `NOTIFY` channel the outbox announces its commits on.
pub(crate) const CHANNEL: &str = "courier_outbox";

/// The first key of the advisory lock by which a relay says it waits for a signal (the
/// second is `hashtext` of the outbox's schema). "cour" in ASCII.
pub(crate) const SIGNAL_LOCK_CLASS: i32 = 0x636f_7572;

/// The end of every outbox write: `NOTIFY courier_outbox` (payload: the schema, so the
/// relays of other schemas in the same database ignore it) only when a relay waits for
/// one. A relay about to wait holds the schema's signal lock exclusively (it *arms*, see
/// `PgStore::outbox_arm`); a writer that gets the lock shared knows no relay waits, and
/// keeps it until its transaction ends, so a relay cannot arm while such a writer is in
/// flight — after arming, one more look at the outbox finds every row committed
/// without a signal. A `NOTIFY` costs more than the write: PostgreSQL serialises the
/// commits of notifying transactions on one lock, so under load (the relay never waits)
/// no writer sends one, and commits stay grouped.
pub(crate) const NOTIFY_IF_WAITED_FOR: &str = "SELECT pg_notify('courier_outbox', coalesce(current_schema(), '')) \
     WHERE NOT pg_try_advisory_xact_lock_shared(1668248946, hashtext(coalesce(current_schema(), '')))";

/// Rows per `INSERT` (5 parameters each, well under PostgreSQL's 65,535).
const ROWS_PER_INSERT: usize = 1000;

/// How errors of writes through an [`OutboxTarget`] name the database.
const CALLER_TX: &str = "the caller's transaction";

/// Where outbox messages can be written: an open transaction on the service database
/// (a sqlx `Transaction`, or a connection inside one).
pub trait OutboxTarget: Send {
    /// Write `messages`, already validated.
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>>;

    /// Write correlation rows (`courier_correlation`) of commands sent in this
    /// transaction.
    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>>;
}

impl OutboxTarget for PgConnection {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(insert_outbox(self, messages))
    }

    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::correlation::insert(self, rows, CALLER_TX))
    }
}

impl OutboxTarget for crate::PgStoreTx {
    /// Queued: written with the `COMMIT`, in its round trip.
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        self.buffer_outbox(messages);
        Box::pin(async { Ok(()) })
    }

    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::correlation::insert(self, rows, CALLER_TX))
    }
}

impl OutboxTarget for sqlx::Transaction<'_, Postgres> {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(insert_outbox(self, messages))
    }

    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::correlation::insert(self, rows, CALLER_TX))
    }
}

impl OutboxTarget for sqlx::pool::PoolConnection<Postgres> {
    fn write_outbox<'a>(&'a mut self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(insert_outbox(self, messages))
    }

    fn write_correlations<'a>(
        &'a mut self,
        rows: &'a [NewCorrelation],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::correlation::insert(self, rows, CALLER_TX))
    }
}

/// Insert `messages` into `courier_outbox` on `conn` (inside the caller's transaction)
/// and, if a relay waits for a signal, `NOTIFY courier_outbox` in the same statement
/// (see [`NOTIFY_IF_WAITED_FOR`]).
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
        q.push(") ").push(NOTIFY_IF_WAITED_FOR);
        q.build()
            .execute(&mut *conn)
            .await
            .map_err(|e| map("writing to the outbox", e))?;
    }
    Ok(())
}

/// The outbox write of [`PgStoreTx::commit`](crate::PgStoreTx::commit) as SQL text, to
/// go with the `COMMIT` in one simple-protocol query (which takes no bound parameters):
/// `INSERT`s of up to [`ROWS_PER_INSERT`] rows and the conditional `NOTIFY`, each ended
/// by `;`. Text values are escape-string literals (`E'…'`, quotes and backslashes
/// doubled, so `standard_conforming_strings` does not matter), payloads hex-decoded.
pub(crate) fn insert_sql(messages: &[Message]) -> Result<String> {
    use std::fmt::Write as _;
    let now = now_ms() as i64;
    let size: usize = messages
        .iter()
        .map(|m| 2 * m.payload.len() + m.headers.len() * 48 + 160)
        .sum();
    let mut sql = String::with_capacity(size + 256);
    for chunk in messages.chunks(ROWS_PER_INSERT) {
        sql.push_str(
            "INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at) VALUES ",
        );
        for (i, m) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push('(');
            push_text(&mut sql, &m.id.to_string(), "message id")?;
            sql.push(',');
            push_text(&mut sql, m.channel()?.as_str(), "channel")?;
            sql.push(',');
            push_text(&mut sql, &m.headers.to_json(), "headers")?;
            sql.push_str(",decode('");
            for b in m.payload.iter() {
                let _ = write!(sql, "{b:02x}");
            }
            let _ = write!(sql, "','hex'),{now})");
        }
        sql.push_str(";\n");
    }
    sql.push_str(NOTIFY_IF_WAITED_FOR);
    sql.push_str(";\n");
    Ok(sql)
}

/// Append `s` as an escape-string literal. PostgreSQL text cannot hold NUL.
fn push_text(sql: &mut String, s: &str, field: &str) -> Result<()> {
    if s.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "the {field} of an outbox message contains a NUL character, which PostgreSQL text cannot hold"
            ),
        ));
    }
    sql.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => sql.push_str("''"),
            '\\' => sql.push_str("\\\\"),
            c => sql.push(c),
        }
    }
    sql.push('\'');
    Ok(())
}

/// Writes messages into `courier_outbox` inside the caller's transaction; the
/// [`Relay`](crate::Relay) publishes them after the commit, in order.
///
/// On a [`PgStoreTx`](crate::PgStoreTx) (from [`PgStore::begin`](crate::PgStore::begin))
/// the rows are written with the `COMMIT`, in its round trip:
///
/// ```no_run
/// # async fn f(store: courier_postgres::PgStore, msg: courier_core::Message) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = store.begin().await?;
/// // ... your business writes on &mut *tx ...
/// store.outbox().send(&mut tx, msg).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
///
/// A sqlx transaction of your own works too (the rows are written at once):
///
/// ```no_run
/// # async fn f(store: courier_postgres::PgStore, msg: courier_core::Message) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = store.pool().begin().await?;
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
    /// on the same channel consumes them).
    ///
    /// ```no_run
    /// # fn f(store: courier_postgres::PgStore) -> courier_core::Result<()> {
    /// let outbox = store
    ///     .outbox()
    ///     .replies_to(courier_core::ChannelName::new("order-service.replies")?);
    /// # Ok(()) }
    /// ```
    pub fn replies_to(mut self, channel: ChannelName) -> Self {
        self.reply_to = Some(channel);
        self
    }

    /// Send command `cmd` in the transaction `tx`: the message (with `reply-to`,
    /// `correlation-id`, `deadline`) and its correlation row commit together, so any
    /// instance of this service can handle the reply, even after a restart. Returns the
    /// command's id (its correlation id). Needs a reply channel
    /// ([`replies_to`](Self::replies_to)); the message must fit the size limit.
    ///
    /// ```no_run
    /// # async fn f<C: courier_core::Command>(store: courier_postgres::PgStore, cmd: C) -> Result<(), Box<dyn std::error::Error>> {
    /// use courier_core::{ChannelName, Correlation};
    /// use std::time::Duration;
    /// let outbox = store.outbox().replies_to(ChannelName::new("order-service.replies")?);
    /// let mut tx = store.begin().await?;
    /// // ... the business change on &mut *tx ...
    /// let correlation = Correlation::new()
    ///     .data(&"o-1")?
    ///     .deadline_in(Duration::from_secs(30));
    /// outbox.send_command(&mut tx, &cmd, correlation).await?;
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

    /// Send notification `n` (a one-way command: no reply, no correlation row) in the
    /// transaction `tx`, keyed by `key` when given.
    ///
    /// ```no_run
    /// # async fn f<N: courier_core::Notification>(store: courier_postgres::PgStore, n: N) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = store.begin().await?;
    /// store.outbox().notify(&mut tx, &n, Some("consumer-7")).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```no_run
    /// # async fn f<E: courier_core::DomainEvent>(store: courier_postgres::PgStore, e: E) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = store.begin().await?;
    /// // ... the change to the aggregate on &mut *tx ...
    /// store.outbox().publish_event(&mut tx, &e).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
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
        if messages.is_empty() {
            return Ok(());
        }
        tx.write_outbox(messages).await
    }
}
