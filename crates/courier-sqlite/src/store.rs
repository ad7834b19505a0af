//! The service database on SQLite: outbox, inbox, dead letters, relay lease.

use crate::connect::{self, Sync};
use crate::error::map;
use crate::wake::{FileWaker, waker_for};
use crate::writer::{LockedConnection, StoreTx};
use bytes::Bytes;
use courier_core::dead_letter::DeadLetterRecord;
use courier_core::{
    CorrelationRecord, DeadLetter, DeadLetterReason, DeadLetterStatus, Error, Message,
    MessageStore, NewCorrelation, NewDeadLetter, OutboxRow, OutboxSource, ReplyApplied,
    ReplyRecord, Result, now_ms,
};
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Row, Sqlite};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS courier_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        headers TEXT NOT NULL,
        payload BLOB NOT NULL,
        created_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS courier_inbox (
        subscriber TEXT NOT NULL,
        message_id TEXT NOT NULL,
        handled_at INTEGER NOT NULL,
        PRIMARY KEY (subscriber, message_id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS courier_inbox_by_time ON courier_inbox (handled_at)",
    "CREATE TABLE IF NOT EXISTS courier_dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        subscriber TEXT NOT NULL,
        channel TEXT NOT NULL,
        message_id TEXT NOT NULL,
        partition_key TEXT,
        message_type TEXT,
        headers TEXT NOT NULL,
        payload BLOB NOT NULL,
        reason TEXT NOT NULL,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        first_failed_at INTEGER NOT NULL,
        last_failed_at INTEGER NOT NULL,
        status TEXT NOT NULL,
        blocks_key INTEGER NOT NULL,
        UNIQUE (subscriber, message_id))",
    "CREATE INDEX IF NOT EXISTS courier_dead_letters_by_key
        ON courier_dead_letters (subscriber, partition_key) WHERE blocks_key = 1",
    "CREATE TABLE IF NOT EXISTS courier_relay_lease (
        outbox TEXT PRIMARY KEY,
        holder TEXT,
        generation INTEGER NOT NULL,
        expires_at REAL NOT NULL)",
];

/// Options of a [`SqliteStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteStoreOptions {
    /// Durability of commits.
    pub sync: Sync,
    /// Connections in the read pool ([`SqliteStore::pool`]). Writes go through the one
    /// writer connection ([`SqliteStore::begin`]).
    pub max_connections: u32,
}

impl Default for SqliteStoreOptions {
    fn default() -> Self {
        Self {
            sync: Sync::Normal,
            max_connections: 2,
        }
    }
}

impl SqliteStoreOptions {
    /// Set the durability.
    pub fn sync(mut self, sync: Sync) -> Self {
        self.sync = sync;
        self
    }

    /// Set the pool size.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }
}

/// A service database on a SQLite file: hosts the outbox, inbox and dead letters, and
/// the service's own tables (use [`SqliteStore::pool`]).
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Keeps the background checkpointer running while the store lives.
    _alive: Arc<()>,
    pool: SqlitePool,
    writer: LockedConnection,
    /// The relay's reads: never wait behind writers (WAL readers never block), no pool cost.
    read: LockedConnection,
    path: PathBuf,
    waker: Arc<FileWaker>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl SqliteStore {
    /// Open (or create) the service database at `path` with default options.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteStoreOptions::default()).await
    }

    /// Open with options.
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteStoreOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let pool = connect::open_pool(&path, options.sync, options.max_connections).await?;
        connect::apply_schema(&pool, &path, SCHEMA).await?;
        connect::apply_schema(&pool, &path, crate::correlation::SCHEMA).await?;
        let read = LockedConnection::open(
            &connect::connect_options(&path, options.sync, connect::LockWait::InSqlite),
            path.clone(),
        )
        .await?;
        let writer = LockedConnection::open(
            &connect::connect_options(&path, options.sync, connect::LockWait::InSqlite),
            path.clone(),
        )
        .await?;
        let waker = waker_for(&path);
        let alive = Arc::new(());
        connect::spawn_checkpointer(
            &path,
            options.sync,
            std::time::Duration::from_millis(500),
            Arc::downgrade(&alive),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                _alive: alive,
                pool,
                writer,
                read,
                path,
                waker,
            }),
        })
    }

    /// Open `sqlite:PATH`.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(connect::parse_sqlite_url(url)?).await
    }

    /// Begin a write transaction on the service database's writer connection: run your
    /// business statements on `&mut *tx`, add messages with
    /// `store.outbox().send(&mut tx, msg)`, then `tx.commit()`. All write transactions of
    /// the process queue here (SQLite has one writer at a time), without the per-
    /// transaction cost of a pool.
    pub async fn begin(&self) -> Result<StoreTx> {
        self.inner.writer.begin().await
    }

    /// A pool on the same file, for reads (and for writes by code that needs a sqlx
    /// `Transaction`; those wait on SQLite's file lock behind [`begin`](Self::begin)).
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The outbox of this database.
    pub fn outbox(&self) -> crate::Outbox {
        crate::Outbox::new()
    }

    fn err(&self, what: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
        let what = format!("{what} in {}", self.inner.path.display());
        move |e| map(what, e)
    }

    // ---- relay support ------------------------------------------------------------

    /// Read up to `limit` outbox rows (and at most about `max_bytes`), oldest first.
    pub async fn outbox_peek(&self, limit: u32, max_bytes: usize) -> Result<Vec<OutboxRow>> {
        self.outbox_peek_after(limit, max_bytes, None).await
    }

    /// Like [`outbox_peek`](Self::outbox_peek), leaving out the rows `exclude` (batches
    /// the relay is publishing or deleting while it reads the next one). SQLite has one
    /// writer at a time, so keys are committed in increasing order: the next batch is the
    /// rows after the last one in flight, read by key range.
    pub async fn outbox_peek_excluding(
        &self,
        limit: u32,
        max_bytes: usize,
        exclude: &[i64],
    ) -> Result<Vec<OutboxRow>> {
        self.outbox_peek_after(limit, max_bytes, exclude.iter().copied().max())
            .await
    }

    async fn outbox_peek_after(
        &self,
        limit: u32,
        max_bytes: usize,
        after: Option<i64>,
    ) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT seq, message_id, headers, payload FROM courier_outbox
             WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after.unwrap_or(i64::MIN))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.inner.read.lock().await)
        .await
        .map_err(self.err("reading the outbox"))?;
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for row in rows {
            let seq: i64 = row.try_get("seq").map_err(self.err("reading the outbox"))?;
            let payload: Vec<u8> = row
                .try_get("payload")
                .map_err(self.err("reading the outbox"))?;
            bytes += payload.len();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            let id: String = row
                .try_get("message_id")
                .map_err(self.err("reading the outbox"))?;
            let headers: String = row
                .try_get("headers")
                .map_err(self.err("reading the outbox"))?;
            let message =
                crate::decode_message(&id, &headers, payload.into()).map_err(|m| m.reason);
            out.push(OutboxRow { seq, message });
        }
        Ok(out)
    }

    /// Delete published outbox rows `seqs`, if `holder` still holds the relay lease of
    /// generation `generation` (fencing). Returns `false` when the lease was lost.
    pub async fn outbox_delete(&self, seqs: &[i64], holder: &str, generation: i64) -> Result<bool> {
        if seqs.is_empty() {
            return Ok(true);
        }
        // One statement: the lease check and the delete are atomic without a transaction.
        let mut q = sqlx::QueryBuilder::<Sqlite>::new("DELETE FROM courier_outbox WHERE seq IN (");
        let mut sep = q.separated(", ");
        for s in seqs {
            sep.push_bind(*s);
        }
        q.push(") AND EXISTS (SELECT 1 FROM courier_relay_lease WHERE outbox = 'default' AND holder = ");
        q.push_bind(holder);
        q.push(" AND generation = ");
        q.push_bind(generation);
        q.push(")");
        let mut w = self.inner.writer.lock().await;
        let deleted = q
            .build()
            .execute(&mut *w)
            .await
            .map_err(self.err("deleting published outbox rows"))?
            .rows_affected();
        if deleted > 0 {
            return Ok(true);
        }
        // Nothing deleted: either the lease was lost, or the rows were already gone.
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM courier_relay_lease WHERE outbox = 'default' AND holder = ? AND generation = ?",
        )
        .bind(holder)
        .bind(generation)
        .fetch_optional(&mut *w)
        .await
        .map_err(self.err("checking the relay lease"))?;
        Ok(held.is_some())
    }

    /// Take or renew the relay lease for `ttl_ms`. Returns the generation when `holder`
    /// holds it (a new generation when it just took it over), `None` when another live
    /// relay holds it. Uses the database's clock only.
    pub async fn relay_lease(&self, holder: &str, ttl_ms: u64) -> Result<Option<i64>> {
        let ttl = ttl_ms as f64 / 1000.0;
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT OR IGNORE INTO courier_relay_lease (outbox, holder, generation, expires_at)
             VALUES ('default', NULL, 0, 0)",
        )
        .execute(&mut *tx)
        .await
        .map_err(self.err("taking the relay lease"))?;
        // Renew our own lease (same generation) ...
        sqlx::query(
            "UPDATE courier_relay_lease SET expires_at = unixepoch('subsec') + ?
             WHERE outbox = 'default' AND holder = ?",
        )
        .bind(ttl)
        .bind(holder)
        .execute(&mut *tx)
        .await
        .map_err(self.err("renewing the relay lease"))?;
        // ... or take over an expired or free one (new generation = fencing token).
        sqlx::query(
            "UPDATE courier_relay_lease
             SET holder = ?, generation = generation + 1, expires_at = unixepoch('subsec') + ?
             WHERE outbox = 'default' AND (holder IS NULL OR holder != ?) AND expires_at < unixepoch('subsec')",
        )
        .bind(holder)
        .bind(ttl)
        .bind(holder)
        .execute(&mut *tx)
        .await
        .map_err(self.err("taking the relay lease"))?;
        let generation: Option<i64> = sqlx::query_scalar(
            "SELECT generation FROM courier_relay_lease WHERE outbox = 'default' AND holder = ?",
        )
        .bind(holder)
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.err("reading the relay lease"))?;
        tx.commit().await?;
        Ok(generation)
    }

    /// Give the relay lease up (clean shutdown: a standby takes over at once).
    pub async fn relay_release(&self, holder: &str) -> Result<()> {
        sqlx::query(
            "UPDATE courier_relay_lease SET holder = NULL, expires_at = 0 WHERE outbox = 'default' AND holder = ?",
        )
        .bind(holder)
        .execute(&mut *self.inner.writer.lock().await)
        .await
        .map_err(self.err("releasing the relay lease"))?;
        Ok(())
    }

    /// Messages waiting in the outbox.
    pub async fn outbox_len(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM courier_outbox")
            .fetch_one(self.pool())
            .await
            .map_err(self.err("counting the outbox"))?;
        Ok(n as u64)
    }

    // ---- maintenance ----------------------------------------------------------------

    /// Delete inbox rows older than `older_than_ms` in batches of `batch` (so the hot path
    /// never waits long). Keep the window longer than the broker's redelivery horizon.
    pub async fn prune_inbox(&self, older_than_ms: u64, batch: u32) -> Result<u64> {
        let cutoff = now_ms().saturating_sub(older_than_ms) as i64;
        let mut total = 0u64;
        loop {
            let n = sqlx::query(
                "DELETE FROM courier_inbox WHERE (subscriber, message_id) IN (
                   SELECT subscriber, message_id FROM courier_inbox WHERE handled_at <= ? LIMIT ?)",
            )
            .bind(cutoff)
            .bind(i64::from(batch))
            .execute(&mut *self.inner.writer.lock().await)
            .await
            .map_err(self.err("pruning the inbox"))?
            .rows_affected();
            total += n;
            if n < u64::from(batch) {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Whether `subscriber` has handled `message_id`.
    pub async fn inbox_contains(&self, subscriber: &str, message_id: &str) -> Result<bool> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM courier_inbox WHERE subscriber = ? AND message_id = ?",
        )
        .bind(subscriber)
        .bind(message_id)
        .fetch_optional(self.pool())
        .await
        .map_err(self.err("reading the inbox"))?;
        Ok(n.is_some())
    }

    // ---- dead letters for operators ------------------------------------------------

    /// Dead letters, oldest first, optionally of one subscriber.
    pub async fn dead_letters(
        &self,
        subscriber: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT * FROM courier_dead_letters WHERE (?1 IS NULL OR subscriber = ?1) ORDER BY id LIMIT ?2",
        )
        .bind(subscriber)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(self.err("listing dead letters"))?;
        rows.iter().map(|r| self.row_to_dead_letter(r)).collect()
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>> {
        let row = sqlx::query("SELECT * FROM courier_dead_letters WHERE id = ?")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(self.err("reading a dead letter"))?;
        row.as_ref().map(|r| self.row_to_dead_letter(r)).transpose()
    }

    /// Ask the subscriber to handle dead letter `id` again. Only `dead` letters can be
    /// retried (parked ones follow the one they wait behind).
    pub async fn retry_dead_letter(&self, id: i64) -> Result<DeadLetter> {
        self.require_dead_letter(id).await?.ensure_retryable()?;
        sqlx::query(
            "UPDATE courier_dead_letters SET status = 'retry' WHERE id = ? AND status = 'dead'",
        )
        .bind(id)
        .execute(&mut *self.inner.writer.lock().await)
        .await
        .map_err(self.err("retrying a dead letter"))?;
        self.require_dead_letter(id).await
    }

    /// Delete dead letter `id`; messages parked behind it (same subscriber and key) are
    /// released for retry, in order.
    pub async fn discard_dead_letter(&self, id: i64) -> Result<DeadLetter> {
        let dl = self.require_dead_letter(id).await?;
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM courier_dead_letters WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(self.err("discarding a dead letter"))?;
        release_parked(&mut tx, &dl)
            .await
            .map_err(self.err("releasing parked messages"))?;
        tx.commit().await?;
        Ok(dl)
    }

    async fn require_dead_letter(&self, id: i64) -> Result<DeadLetter> {
        self.dead_letter(id).await?.ok_or_else(|| {
            Error::invalid(format!(
                "no dead letter with id {id} in {}; `courier dlq list` shows the ids",
                self.inner.path.display()
            ))
        })
    }

    fn row_to_dead_letter(&self, r: &SqliteRow) -> Result<DeadLetter> {
        let get_err = self.err("reading a dead letter");
        let inner = || -> std::result::Result<DeadLetter, sqlx::Error> {
            let headers: String = r.try_get("headers")?;
            let reason: String = r.try_get("reason")?;
            let status: String = r.try_get("status")?;
            let payload: Vec<u8> = r.try_get("payload")?;
            Ok(DeadLetter {
                id: r.try_get("id")?,
                record: DeadLetterRecord {
                    subscriber: r.try_get("subscriber")?,
                    channel: r.try_get("channel")?,
                    message_id: r.try_get("message_id")?,
                    partition_key: r.try_get("partition_key")?,
                    message_type: r.try_get("message_type")?,
                    headers: serde_json::from_str(&headers)
                        .unwrap_or(serde_json::Value::String(headers)),
                    payload: Bytes::from(payload),
                    reason: DeadLetterReason::parse(&reason).unwrap_or(DeadLetterReason::Malformed),
                    error: r.try_get("error")?,
                    attempts: r.try_get::<i64, _>("attempts")? as u32,
                    first_failed_at_ms: r.try_get::<i64, _>("first_failed_at")? as u64,
                    last_failed_at_ms: r.try_get::<i64, _>("last_failed_at")? as u64,
                    status: DeadLetterStatus::parse(&status).unwrap_or(DeadLetterStatus::Dead),
                },
            })
        };
        inner().map_err(get_err)
    }
}

async fn release_parked(
    tx: &mut SqliteConnection,
    dl: &DeadLetter,
) -> std::result::Result<(), sqlx::Error> {
    if let Some(key) = &dl.record.partition_key {
        sqlx::query(
            "UPDATE courier_dead_letters SET status = 'retry'
             WHERE subscriber = ? AND partition_key = ? AND status = 'parked'",
        )
        .bind(&dl.record.subscriber)
        .bind(key)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Insert messages into the outbox on `conn` (inside the caller's transaction).
pub(crate) async fn insert_outbox(conn: &mut SqliteConnection, messages: &[Message]) -> Result<()> {
    insert_outbox_then(conn, messages, None).await
}

/// Insert `messages` into the outbox; with `then`, append that statement (e.g. `COMMIT`)
/// to the last insert so both go to SQLite in one round trip. sqlx runs the statements in
/// order and stops at the first error, so `then` never runs after a failed insert.
pub(crate) async fn insert_outbox_then(
    conn: &mut SqliteConnection,
    messages: &[Message],
    then: Option<&'static str>,
) -> Result<()> {
    let now = now_ms() as i64;
    let chunks: Vec<&[Message]> = messages.chunks(100).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut rows = Vec::with_capacity(chunk.len());
        for m in chunk.iter() {
            rows.push((
                m.id.to_string(),
                m.channel()?.to_string(),
                m.headers.to_json(),
                m.payload.clone(),
            ));
        }
        let mut q = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at) ",
        );
        q.push_values(rows, |mut b, (id, ch, h, p)| {
            b.push_bind(id)
                .push_bind(ch)
                .push_bind(h)
                .push_bind(p.to_vec())
                .push_bind(now);
        });
        if i + 1 == chunks.len()
            && let Some(stmt) = then
        {
            q.push("; ").push(stmt);
        }
        q.build()
            .execute(&mut *conn)
            .await
            .map_err(|e| map("writing to the outbox", e))?;
    }
    Ok(())
}

impl OutboxSource for SqliteStore {
    async fn outbox_peek(&self, limit: u32, max_bytes: usize) -> Result<Vec<OutboxRow>> {
        SqliteStore::outbox_peek(self, limit, max_bytes).await
    }

    async fn outbox_peek_excluding(
        &self,
        limit: u32,
        max_bytes: usize,
        exclude: &[i64],
    ) -> Result<Vec<OutboxRow>> {
        SqliteStore::outbox_peek_excluding(self, limit, max_bytes, exclude).await
    }

    async fn outbox_delete(&self, seqs: &[i64], holder: &str, generation: i64) -> Result<bool> {
        SqliteStore::outbox_delete(self, seqs, holder, generation).await
    }

    async fn relay_lease(&self, holder: &str, ttl_ms: u64) -> Result<Option<i64>> {
        SqliteStore::relay_lease(self, holder, ttl_ms).await
    }

    async fn relay_release(&self, holder: &str) -> Result<()> {
        SqliteStore::relay_release(self, holder).await
    }

    /// Always on: every commit signals.
    async fn outbox_arm(&self) -> bool {
        true
    }

    fn outbox_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.waker.subscribe()
    }

    fn describe(&self) -> String {
        self.inner.path.display().to_string()
    }
}

impl MessageStore for SqliteStore {
    type Tx = StoreTx;
    type Conn = SqliteConnection;

    fn conn(tx: &mut Self::Tx) -> &mut Self::Conn {
        tx
    }

    async fn begin(&self) -> Result<Self::Tx> {
        SqliteStore::begin(self).await
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        tx.commit().await
    }

    async fn savepoint(&self, tx: &mut Self::Tx) -> Result<()> {
        sqlx::query("SAVEPOINT courier_msg")
            .execute(&mut **tx)
            .await
            .map_err(self.err("opening a savepoint"))?;
        Ok(())
    }

    async fn rollback_savepoint(&self, tx: &mut Self::Tx) -> Result<()> {
        sqlx::query("ROLLBACK TO courier_msg")
            .execute(&mut **tx)
            .await
            .map_err(self.err("rolling back a savepoint"))?;
        sqlx::query("RELEASE courier_msg")
            .execute(&mut **tx)
            .await
            .map_err(self.err("releasing a savepoint"))?;
        Ok(())
    }

    async fn release_savepoint(&self, tx: &mut Self::Tx) -> Result<()> {
        sqlx::query("RELEASE courier_msg")
            .execute(&mut **tx)
            .await
            .map_err(self.err("releasing a savepoint"))?;
        Ok(())
    }

    async fn inbox_record(
        &self,
        tx: &mut Self::Tx,
        subscriber: &str,
        message_id: &str,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO courier_inbox (subscriber, message_id, handled_at) VALUES (?, ?, ?)
             ON CONFLICT DO NOTHING",
        )
        .bind(subscriber)
        .bind(message_id)
        .bind(now_ms() as i64)
        .execute(&mut **tx)
        .await
        .map_err(self.err("recording in the inbox"))?;
        Ok(r.rows_affected() == 1)
    }

    async fn inbox_record_many(
        &self,
        tx: &mut Self::Tx,
        subscriber: &str,
        message_ids: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        let mut new = std::collections::HashSet::with_capacity(message_ids.len());
        let now = now_ms() as i64;
        for chunk in message_ids.chunks(200) {
            let mut q = sqlx::QueryBuilder::<Sqlite>::new(
                "INSERT INTO courier_inbox (subscriber, message_id, handled_at) ",
            );
            q.push_values(chunk, |mut b, id| {
                b.push_bind(subscriber).push_bind(id).push_bind(now);
            });
            q.push(" ON CONFLICT DO NOTHING RETURNING message_id");
            let ids: Vec<String> = q
                .build_query_scalar()
                .fetch_all(&mut **tx)
                .await
                .map_err(self.err("recording in the inbox"))?;
            new.extend(ids);
        }
        Ok(new)
    }

    async fn prune_inbox(&self, older_than_ms: u64, batch: u32) -> Result<u64> {
        SqliteStore::prune_inbox(self, older_than_ms, batch).await
    }

    async fn outbox_insert(&self, tx: &mut Self::Tx, messages: &[Message]) -> Result<()> {
        insert_outbox(tx, messages).await
    }

    async fn correlation_insert(&self, tx: &mut Self::Tx, rows: &[NewCorrelation]) -> Result<()> {
        crate::correlation::insert(tx, rows).await
    }

    async fn correlation_reply(
        &self,
        tx: &mut Self::Tx,
        correlation_id: &str,
        reply: &ReplyRecord,
    ) -> Result<ReplyApplied> {
        crate::correlation::reply(tx, correlation_id, reply).await
    }

    async fn correlation_expire(
        &self,
        tx: &mut Self::Tx,
        now_ms: u64,
        limit: u32,
    ) -> Result<Vec<CorrelationRecord>> {
        crate::correlation::expire(tx, now_ms, limit).await
    }

    async fn correlation_retry_later(
        &self,
        tx: &mut Self::Tx,
        correlation_id: &str,
        error: &str,
        retry_at_ms: u64,
        give_up: bool,
    ) -> Result<()> {
        crate::correlation::retry_later(tx, correlation_id, error, retry_at_ms, give_up).await
    }

    async fn correlation_get(&self, correlation_id: &str) -> Result<Option<CorrelationRecord>> {
        let mut conn = self
            .pool()
            .acquire()
            .await
            .map_err(self.err("reading a correlation row"))?;
        crate::correlation::get(&mut conn, correlation_id).await
    }

    async fn prune_correlations(&self, older_than_ms: u64, batch: u32) -> Result<u64> {
        let mut tx = self.begin().await?;
        let n = crate::correlation::prune(&mut tx, older_than_ms, batch).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn dead_letter_insert(&self, tx: &mut Self::Tx, dl: &NewDeadLetter) -> Result<()> {
        sqlx::query(
            "INSERT INTO courier_dead_letters (subscriber, channel, message_id, partition_key,
               message_type, headers, payload, reason, error, attempts, first_failed_at,
               last_failed_at, status, blocks_key)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (subscriber, message_id) DO NOTHING",
        )
        .bind(&dl.subscriber)
        .bind(&dl.channel)
        .bind(&dl.message_id)
        .bind(&dl.partition_key)
        .bind(&dl.message_type)
        .bind(&dl.headers_json)
        .bind(dl.payload.to_vec())
        .bind(dl.reason.as_str())
        .bind(&dl.error)
        .bind(i64::from(dl.attempts))
        .bind(dl.first_failed_at_ms as i64)
        .bind(dl.last_failed_at_ms as i64)
        .bind(dl.status.as_str())
        .bind(i64::from(
            dl.reason.blocks_key() && dl.partition_key.is_some(),
        ))
        .execute(&mut **tx)
        .await
        .map_err(self.err("storing a dead letter"))?;
        Ok(())
    }

    async fn key_blocked(&self, tx: &mut Self::Tx, subscriber: &str, key: &str) -> Result<bool> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM courier_dead_letters WHERE subscriber = ? AND partition_key = ? AND blocks_key = 1 LIMIT 1",
        )
        .bind(subscriber)
        .bind(key)
        .fetch_optional(&mut **tx)
        .await
        .map_err(self.err("checking for a blocked key"))?;
        Ok(n.is_some())
    }

    async fn blocking_dead_letters(&self, subscriber: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM courier_dead_letters WHERE subscriber = ? AND blocks_key = 1",
        )
        .bind(subscriber)
        .fetch_one(self.pool())
        .await
        .map_err(self.err("counting dead letters"))?;
        Ok(n as u64)
    }

    async fn redrive_batch(&self, subscriber: &str, limit: u32) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT * FROM courier_dead_letters WHERE subscriber = ? AND status = 'retry' ORDER BY id LIMIT ?",
        )
        .bind(subscriber)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(self.err("reading dead letters to retry"))?;
        rows.iter().map(|r| self.row_to_dead_letter(r)).collect()
    }

    async fn dead_letter_resolved(&self, tx: &mut Self::Tx, dl: &DeadLetter) -> Result<()> {
        sqlx::query("DELETE FROM courier_dead_letters WHERE id = ?")
            .bind(dl.id)
            .execute(&mut **tx)
            .await
            .map_err(self.err("resolving a dead letter"))?;
        release_parked(tx, dl)
            .await
            .map_err(self.err("releasing parked messages"))?;
        Ok(())
    }

    async fn dead_letter_failed_again(&self, dl: &DeadLetter, error: &str, now: u64) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE courier_dead_letters SET status = 'dead', error = ?, attempts = attempts + 1,
               last_failed_at = ?
             WHERE id = ?",
        )
        .bind(error)
        .bind(now as i64)
        .bind(dl.id)
        .execute(&mut *tx)
        .await
        .map_err(self.err("recording a failed retry"))?;
        if let Some(key) = &dl.record.partition_key {
            sqlx::query(
                "UPDATE courier_dead_letters SET status = 'parked'
                 WHERE subscriber = ? AND partition_key = ? AND status = 'retry' AND id > ?",
            )
            .bind(&dl.record.subscriber)
            .bind(key)
            .bind(dl.id)
            .execute(&mut *tx)
            .await
            .map_err(self.err("parking messages again"))?;
        }
        self.commit(tx).await
    }
}
