//! The service databases of the bench: the producer's (business rows + outbox) and the
//! consumer's (effects + inbox), on SQLite files or in two schemas of a PostgreSQL
//! database, behind one small trait so the bench code is written once.

use anyhow::{Context, Result};
use courier::core::{HandlerContext, Message, MessageStore, OutboxSource};
use courier::postgres::PgStore;
use courier::sqlite::{SqliteStore, SqliteStoreOptions, Sync};
use sqlx::{AssertSqlSafe, Connection};
use std::future::Future;
use std::path::{Path, PathBuf};

/// Which side of the bench a database belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// Commits business rows and outbox messages; runs the relay.
    Producer,
    /// Handles messages with the inbox and records effects.
    Consumer,
}

impl Side {
    fn file(self) -> &'static str {
        match self {
            Self::Producer => "producer.db",
            Self::Consumer => "consumer.db",
        }
    }

    /// The PostgreSQL schema of this side: `PREFIX_producer` or `PREFIX_consumer`.
    fn schema(self, prefix: &str) -> String {
        match self {
            Self::Producer => format!("{prefix}_producer"),
            Self::Consumer => format!("{prefix}_consumer"),
        }
    }
}

/// Where the bench's service databases live (`--db`).
#[derive(Debug, Clone)]
pub(super) enum DbSpec {
    /// `producer.db` and `consumer.db` in the bench directory.
    Sqlite { dir: PathBuf, sync: Sync },
    /// Two schemas of the database at `url`, named after `prefix`.
    Postgres { url: String, prefix: String },
}

/// `url` with its connections' `search_path` set to `schema` (so Courier's tables and
/// the bench's own land there).
pub(super) fn pg_url_in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options[search_path]={schema}")
}

/// (Re)create `schema` empty in the database at `url`.
pub(super) async fn pg_reset_schema(url: &str, schema: &str) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("cannot connect to {}", courier::postgres::redact_url(url)))?;
    for sql in [
        format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        format!("CREATE SCHEMA {schema}"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .with_context(|| format!("cannot reset schema {schema}"))?;
    }
    let _ = conn.close().await;
    Ok(())
}

/// Drop `schema` (best effort: the bench is over).
pub(super) async fn pg_drop_schema(url: &str, schema: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(url).await {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
    }
}

impl DbSpec {
    /// A fresh start: remove what an earlier run left (SQLite files are removed by the
    /// caller with the directory's other files).
    pub(super) async fn reset(&self) -> Result<()> {
        if let Self::Postgres { url, prefix } = self {
            for side in [Side::Producer, Side::Consumer] {
                pg_reset_schema(url, &side.schema(prefix)).await?;
            }
        }
        Ok(())
    }

    /// Remove what the run left in a database that is not the bench's own.
    pub(super) async fn cleanup(&self) {
        if let Self::Postgres { url, prefix } = self {
            for side in [Side::Producer, Side::Consumer] {
                pg_drop_schema(url, &side.schema(prefix)).await;
            }
        }
    }

    /// What a human reads in the report.
    pub(super) fn describe(&self) -> String {
        match self {
            Self::Sqlite { .. } => "sqlite".to_owned(),
            Self::Postgres { url, .. } => courier::postgres::redact_url(url),
        }
    }

    /// The URL of `side`'s PostgreSQL schema, if PostgreSQL.
    pub(super) fn pg_url(&self, side: Side) -> Option<String> {
        match self {
            Self::Postgres { url, prefix } => Some(pg_url_in_schema(url, &side.schema(prefix))),
            Self::Sqlite { .. } => None,
        }
    }

    fn sqlite_file(dir: &Path, side: Side) -> PathBuf {
        dir.join(side.file())
    }

    /// Open `side`'s SQLite store (with its bench table).
    pub(super) async fn open_sqlite(&self, side: Side) -> Result<Option<SqliteStore>> {
        let Self::Sqlite { dir, sync } = self else {
            return Ok(None);
        };
        let store = SqliteStore::open_with(
            Self::sqlite_file(dir, side),
            SqliteStoreOptions::default().sync(*sync),
        )
        .await?;
        sqlx::query(table_sql(side, false))
            .execute(store.pool())
            .await?;
        Ok(Some(store))
    }

    /// Open `side`'s PostgreSQL store (with its bench table).
    pub(super) async fn open_pg(&self, side: Side) -> Result<Option<PgStore>> {
        let Some(url) = self.pg_url(side) else {
            return Ok(None);
        };
        let store = PgStore::connect(&url).await?;
        sqlx::query(table_sql(side, true))
            .execute(store.pool())
            .await?;
        Ok(Some(store))
    }

    /// A reader of the consumer's effects, for progress and the final count.
    pub(super) async fn effects(&self) -> Result<Effects> {
        match self {
            Self::Sqlite { dir, .. } => Ok(Effects::Sqlite(
                sqlx::SqlitePool::connect(&format!(
                    "sqlite:{}",
                    Self::sqlite_file(dir, Side::Consumer).display()
                ))
                .await?,
            )),
            Self::Postgres { .. } => {
                let url = self.pg_url(Side::Consumer).unwrap_or_default();
                Ok(Effects::Postgres(sqlx::PgPool::connect(&url).await?))
            }
        }
    }
}

/// The bench table of `side` on SQLite (`pg = false`) or PostgreSQL.
fn table_sql(side: Side, pg: bool) -> &'static str {
    match (side, pg) {
        (Side::Producer, false) => {
            "CREATE TABLE IF NOT EXISTS business (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, body TEXT NOT NULL)"
        }
        (Side::Producer, true) => {
            "CREATE TABLE IF NOT EXISTS business (id BIGSERIAL PRIMARY KEY, n BIGINT NOT NULL, body TEXT NOT NULL)"
        }
        (Side::Consumer, _) => {
            "CREATE TABLE IF NOT EXISTS effects (n BIGINT NOT NULL, latency_us BIGINT NOT NULL, handled_at_us BIGINT NOT NULL)"
        }
    }
}

/// The consumer's effects table, read by the bench process.
pub(super) enum Effects {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// What the effects table says at the end of a run.
pub(super) struct Totals {
    pub(super) rows: i64,
    pub(super) distinct: i64,
    pub(super) last_us: Option<i64>,
    pub(super) latencies_us: Vec<i64>,
}

impl Effects {
    /// Effects recorded so far (duplicates included).
    pub(super) async fn handled(&self) -> i64 {
        let q = "SELECT count(*) FROM effects";
        match self {
            Self::Sqlite(p) => sqlx::query_scalar::<_, i64>(q).fetch_one(p).await,
            Self::Postgres(p) => sqlx::query_scalar::<_, i64>(q).fetch_one(p).await,
        }
        .unwrap_or(0)
    }

    /// Counts, last handling time and every latency.
    pub(super) async fn totals(self) -> Result<Totals> {
        let q = "SELECT count(*), count(DISTINCT n), max(handled_at_us) FROM effects";
        let l = "SELECT latency_us FROM effects";
        let ((rows, distinct, last_us), latencies_us) = match &self {
            Self::Sqlite(p) => (
                sqlx::query_as(q).fetch_one(p).await?,
                sqlx::query_scalar(l).fetch_all(p).await?,
            ),
            Self::Postgres(p) => (
                sqlx::query_as(q).fetch_one(p).await?,
                sqlx::query_scalar(l).fetch_all(p).await?,
            ),
        };
        match self {
            Self::Sqlite(p) => p.close().await,
            Self::Postgres(p) => p.close().await,
        }
        Ok(Totals {
            rows,
            distinct,
            last_us,
            latencies_us,
        })
    }
}

/// A service database the bench runs on: one producer transaction, one effect.
pub(super) trait BenchStore: MessageStore + OutboxSource + Clone {
    /// One producer transaction: a business row and `message` in the outbox.
    fn produce(
        &self,
        n: u64,
        body: &str,
        message: Message,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Whether producer transaction `n` committed (its business row exists): after a
    /// failed commit the outcome is unknown, and retrying a committed one would send its
    /// message twice.
    fn committed(&self, n: u64) -> impl Future<Output = Result<bool>> + Send;

    /// Commit `messages` into the outbox in one transaction (no business row).
    fn fill_outbox(&self, messages: &[Message]) -> impl Future<Output = Result<()>> + Send;

    /// Record that message `n` was handled, in the handler's transaction.
    fn record_effect(
        ctx: &HandlerContext<Self>,
        n: u64,
        latency_us: u64,
        now_us: u64,
    ) -> impl Future<Output = std::result::Result<(), sqlx::Error>> + Send;
}

impl BenchStore for SqliteStore {
    async fn fill_outbox(&self, messages: &[Message]) -> Result<()> {
        let mut tx = self.begin().await?;
        self.outbox().send_all(&mut tx, messages).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn committed(&self, n: u64) -> Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM business WHERE n = ?)")
                .bind(n as i64)
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn produce(&self, n: u64, body: &str, message: Message) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO business (n, body) VALUES (?, ?)")
            .bind(n as i64)
            .bind(body)
            .execute(&mut *tx)
            .await?;
        self.outbox().send(&mut tx, message).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_effect(
        ctx: &HandlerContext<Self>,
        n: u64,
        latency_us: u64,
        now_us: u64,
    ) -> std::result::Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO effects (n, latency_us, handled_at_us) VALUES (?, ?, ?)")
            .bind(n as i64)
            .bind(latency_us as i64)
            .bind(now_us as i64)
            .execute(&mut *ctx.tx().await)
            .await
            .map(drop)
    }
}

impl BenchStore for PgStore {
    async fn fill_outbox(&self, messages: &[Message]) -> Result<()> {
        let mut tx = self.begin().await?;
        self.outbox().send_all(&mut tx, messages).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn committed(&self, n: u64) -> Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM business WHERE n = $1)")
                .bind(n as i64)
                .fetch_one(self.pool())
                .await?,
        )
    }

    async fn produce(&self, n: u64, body: &str, message: Message) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO business (n, body) VALUES ($1, $2)")
            .bind(n as i64)
            .bind(body)
            .execute(&mut *tx)
            .await?;
        self.outbox().send(&mut tx, message).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_effect(
        ctx: &HandlerContext<Self>,
        n: u64,
        latency_us: u64,
        now_us: u64,
    ) -> std::result::Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO effects (n, latency_us, handled_at_us) VALUES ($1, $2, $3)")
            .bind(n as i64)
            .bind(latency_us as i64)
            .bind(now_us as i64)
            .execute(&mut *ctx.tx().await)
            .await
            .map(drop)
    }
}
