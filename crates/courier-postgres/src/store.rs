//! The service database on PostgreSQL: inbox, dead letters, and the store the dispatcher
//! runs handlers in.

use crate::PgStoreTx;
use crate::error::{connect_error, map, redact_url};
use bytes::Bytes;
use courier_core::dead_letter::DeadLetterRecord;
use courier_core::{
    CorrelationRecord, DeadLetter, DeadLetterReason, DeadLetterStatus, Error, Message,
    MessageStore, NewCorrelation, NewDeadLetter, ReplyApplied, ReplyRecord, Result, now_ms,
};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long [`PgStore::connect`] waits for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A service database on PostgreSQL: hosts the outbox, inbox and dead letters next to the
/// service's own tables (use [`PgStore::pool`] for those). Cheap to clone.
///
/// Courier's tables live in the current schema of the pool's connections (the first of
/// their `search_path`) and are created if missing when the store opens.
#[derive(Clone)]
pub struct PgStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    /// The database for people: a URL without password.
    pub(crate) describe: String,
    /// The schema holding Courier's tables.
    pub(crate) schema: String,
    /// Bumped when outbox rows may have been committed.
    pub(crate) changes: Arc<watch::Sender<u64>>,
    /// The `LISTEN` task (started by the first `outbox_changes`): stops when dropped.
    pub(crate) listener: std::sync::Mutex<Option<crate::source::ListenerHandle>>,
    /// Connections held outside the pool for transactions and the relay.
    pub(crate) held: Arc<crate::held::Held>,
    /// `describe`, shared with transactions.
    pub(crate) label: Arc<str>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.inner.describe)
            .field("schema", &self.inner.schema)
            .finish()
    }
}

impl PgStore {
    /// Connect to `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`) with a pool of
    /// 10 connections and create Courier's tables if they are missing. Errors name the URL
    /// with its password redacted.
    pub async fn connect(url: &str) -> Result<Self> {
        let shown = redact_url(url);
        let options: PgConnectOptions = url.parse().map_err(|e| {
            map(
                format!(
                    "{shown} is not a PostgreSQL URL (expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE)"
                ),
                e,
            )
        })?;
        // One direct connection first: a pool retries a refused connection until its
        // acquire timeout and then reports only that it timed out.
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
            Ok(Err(e)) => return Err(connect_error(&shown, e)),
            Err(_) => return Err(connect_error(&shown, sqlx::Error::PoolTimedOut)),
        }
        // No ping before each acquire (sqlx pings every connection on release already):
        // a round trip less per transaction. A connection that died while idle fails its
        // first statement and is dropped; callers retry transient errors.
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(CONNECT_TIMEOUT)
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Self::build(pool, shown).await
    }

    /// Use an existing pool (its connections' `search_path` picks the schema) and create
    /// Courier's tables if they are missing.
    pub async fn open(pool: PgPool) -> Result<Self> {
        let describe = describe_options(&pool.connect_options());
        Self::build(pool, describe).await
    }

    async fn build(pool: PgPool, describe: String) -> Result<Self> {
        let schema = crate::schema::apply(&pool, &describe).await?;
        let (changes, _) = watch::channel(0u64);
        Ok(Self {
            inner: Arc::new(Inner {
                held: crate::held::Held::new(pool.clone()),
                label: Arc::from(describe.as_str()),
                pool,
                describe,
                schema,
                changes: Arc::new(changes),
                listener: std::sync::Mutex::new(None),
            }),
        })
    }

    /// Begin a transaction: run your business statements on `&mut *tx`, add messages with
    /// `store.outbox().send(&mut tx, msg)`, then `tx.commit()` (see [`PgStoreTx`]). Its
    /// connection is one the store holds outside [`pool`](Self::pool) (at most as many
    /// as the pool's size), so it costs no pool round trip.
    pub async fn begin(&self) -> Result<PgStoreTx> {
        let conn = self
            .inner
            .held
            .get()
            .await
            .map_err(self.err("beginning a transaction"))?;
        PgStoreTx::begin(conn, self.inner.label.clone()).await
    }

    /// The pool, for the service's own queries and transactions.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema holding Courier's tables.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The outbox of this database.
    pub fn outbox(&self) -> crate::Outbox {
        crate::Outbox::new()
    }

    pub(crate) fn err(&self, what: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
        let what = format!("{what} in {}", self.inner.describe);
        move |e| map(what, e)
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
        let batch = batch.max(1);
        let mut total = 0u64;
        loop {
            let n = sqlx::query(
                "DELETE FROM courier_inbox WHERE ctid IN (
                   SELECT ctid FROM courier_inbox WHERE handled_at <= $1 LIMIT $2)",
            )
            .bind(cutoff)
            .bind(i64::from(batch))
            .execute(self.pool())
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
        let n: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM courier_inbox WHERE subscriber = $1 AND message_id = $2",
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
            "SELECT * FROM courier_dead_letters WHERE ($1::text IS NULL OR subscriber = $1)
             ORDER BY id LIMIT $2",
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
        let row = sqlx::query("SELECT * FROM courier_dead_letters WHERE id = $1")
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
            "UPDATE courier_dead_letters SET status = 'retry' WHERE id = $1 AND status = 'dead'",
        )
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(self.err("retrying a dead letter"))?;
        self.require_dead_letter(id).await
    }

    /// Delete dead letter `id`; messages parked behind it (same subscriber and key) are
    /// released for retry, in order.
    pub async fn discard_dead_letter(&self, id: i64) -> Result<DeadLetter> {
        let dl = self.require_dead_letter(id).await?;
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM courier_dead_letters WHERE id = $1")
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
                self.inner.describe
            ))
        })
    }

    fn row_to_dead_letter(&self, r: &PgRow) -> Result<DeadLetter> {
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

/// A URL for people from connect options: never a password.
fn describe_options(o: &PgConnectOptions) -> String {
    let db = o.get_database().unwrap_or_default();
    match o.get_socket() {
        Some(dir) => format!("postgres://{}@{}/{db}", o.get_username(), dir.display()),
        None => format!(
            "postgres://{}@{}:{}/{db}",
            o.get_username(),
            o.get_host(),
            o.get_port()
        ),
    }
}

async fn release_parked(
    tx: &mut PgConnection,
    dl: &DeadLetter,
) -> std::result::Result<(), sqlx::Error> {
    if let Some(key) = &dl.record.partition_key {
        sqlx::query(
            "UPDATE courier_dead_letters SET status = 'retry'
             WHERE subscriber = $1 AND partition_key = $2 AND status = 'parked'",
        )
        .bind(&dl.record.subscriber)
        .bind(key)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

impl MessageStore for PgStore {
    type Tx = PgStoreTx;
    type Conn = PgConnection;

    fn conn(tx: &mut Self::Tx) -> &mut Self::Conn {
        tx
    }

    async fn begin(&self) -> Result<Self::Tx> {
        PgStore::begin(self).await
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
        sqlx::query("ROLLBACK TO SAVEPOINT courier_msg")
            .execute(&mut **tx)
            .await
            .map_err(self.err("rolling back a savepoint"))?;
        sqlx::query("RELEASE SAVEPOINT courier_msg")
            .execute(&mut **tx)
            .await
            .map_err(self.err("releasing a savepoint"))?;
        Ok(())
    }

    async fn release_savepoint(&self, tx: &mut Self::Tx) -> Result<()> {
        sqlx::query("RELEASE SAVEPOINT courier_msg")
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
            "INSERT INTO courier_inbox (subscriber, message_id, handled_at) VALUES ($1, $2, $3)
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
    ) -> Result<HashSet<String>> {
        if message_ids.is_empty() {
            return Ok(HashSet::new());
        }
        // One statement for the whole batch, whatever its size (an array, not a
        // parameter per row); a second copy of an id is a conflict like any other.
        let mut seen = HashSet::with_capacity(message_ids.len());
        let ids: Vec<&str> = message_ids
            .iter()
            .map(String::as_str)
            .filter(|id| seen.insert(*id))
            .collect();
        let new: Vec<String> = sqlx::query_scalar(
            "INSERT INTO courier_inbox (subscriber, message_id, handled_at)
             SELECT $1, id, $3 FROM unnest($2::text[]) AS t(id)
             ON CONFLICT DO NOTHING RETURNING message_id",
        )
        .bind(subscriber)
        .bind(&ids)
        .bind(now_ms() as i64)
        .fetch_all(&mut **tx)
        .await
        .map_err(self.err("recording in the inbox"))?;
        Ok(new.into_iter().collect())
    }

    async fn prune_inbox(&self, older_than_ms: u64, batch: u32) -> Result<u64> {
        PgStore::prune_inbox(self, older_than_ms, batch).await
    }

    async fn outbox_insert(&self, tx: &mut Self::Tx, messages: &[Message]) -> Result<()> {
        crate::outbox::insert_outbox(tx, messages).await
    }

    async fn dead_letter_insert(&self, tx: &mut Self::Tx, dl: &NewDeadLetter) -> Result<()> {
        sqlx::query(
            "INSERT INTO courier_dead_letters (subscriber, channel, message_id, partition_key,
               message_type, headers, payload, reason, error, attempts, first_failed_at,
               last_failed_at, status, blocks_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
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
        .bind(dl.reason.blocks_key() && dl.partition_key.is_some())
        .execute(&mut **tx)
        .await
        .map_err(self.err("storing a dead letter"))?;
        Ok(())
    }

    async fn key_blocked(&self, tx: &mut Self::Tx, subscriber: &str, key: &str) -> Result<bool> {
        let n: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM courier_dead_letters
             WHERE subscriber = $1 AND partition_key = $2 AND blocks_key LIMIT 1",
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
            "SELECT count(*) FROM courier_dead_letters WHERE subscriber = $1 AND blocks_key",
        )
        .bind(subscriber)
        .fetch_one(self.pool())
        .await
        .map_err(self.err("counting dead letters"))?;
        Ok(n as u64)
    }

    async fn redrive_batch(&self, subscriber: &str, limit: u32) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT * FROM courier_dead_letters WHERE subscriber = $1 AND status = 'retry'
             ORDER BY id LIMIT $2",
        )
        .bind(subscriber)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(self.err("reading dead letters to retry"))?;
        rows.iter().map(|r| self.row_to_dead_letter(r)).collect()
    }

    async fn dead_letter_resolved(&self, tx: &mut Self::Tx, dl: &DeadLetter) -> Result<()> {
        sqlx::query("DELETE FROM courier_dead_letters WHERE id = $1")
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
        // blocks_key is left as it was: the key stays held back.
        sqlx::query(
            "UPDATE courier_dead_letters SET status = 'dead', error = $1, attempts = attempts + 1,
               last_failed_at = $2
             WHERE id = $3",
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
                 WHERE subscriber = $1 AND partition_key = $2 AND status = 'retry' AND id > $3",
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

    // ---- correlation state: see crate::correlation for the SQL -------------------

    async fn correlation_insert(&self, tx: &mut Self::Tx, rows: &[NewCorrelation]) -> Result<()> {
        crate::correlation::insert(tx, rows, &self.inner.describe).await
    }

    async fn correlation_reply(
        &self,
        tx: &mut Self::Tx,
        correlation_id: &str,
        reply: &ReplyRecord,
    ) -> Result<ReplyApplied> {
        crate::correlation::reply(tx, correlation_id, reply, &self.inner.describe).await
    }

    async fn correlation_expire(
        &self,
        tx: &mut Self::Tx,
        now_ms: u64,
        limit: u32,
    ) -> Result<Vec<CorrelationRecord>> {
        crate::correlation::expire(tx, now_ms, limit, &self.inner.describe).await
    }

    async fn correlation_retry_later(
        &self,
        tx: &mut Self::Tx,
        correlation_id: &str,
        error: &str,
        retry_at_ms: u64,
        give_up: bool,
    ) -> Result<()> {
        crate::correlation::retry_later(
            tx,
            correlation_id,
            error,
            retry_at_ms,
            give_up,
            &self.inner.describe,
        )
        .await
    }

    async fn correlation_get(&self, correlation_id: &str) -> Result<Option<CorrelationRecord>> {
        let mut conn = self
            .pool()
            .acquire()
            .await
            .map_err(self.err("reading a correlation row"))?;
        crate::correlation::get(&mut conn, correlation_id, &self.inner.describe).await
    }

    async fn prune_correlations(&self, older_than_ms: u64, batch: u32) -> Result<u64> {
        let mut conn = self
            .pool()
            .acquire()
            .await
            .map_err(self.err("pruning correlations"))?;
        crate::correlation::prune(&mut conn, older_than_ms, batch, &self.inner.describe).await
    }
}
