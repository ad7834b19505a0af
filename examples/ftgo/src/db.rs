//! A service's own database, SQLite or PostgreSQL, with ONE SQL text per query.
//!
//! Each service is generic over [`ServiceDb`], which Courier's two stores implement
//! (`SqliteStore` for `--db sqlite:FILE`, `PgStore` for `--db postgres://…`): its
//! business rows and Courier's outbox, inbox and correlation rows commit in one
//! transaction of the same database.
//!
//! Queries go through [`query`], [`query_as`] and [`query_scalar`], shaped like sqlx's:
//!
//! ```text
//! query("UPDATE consumers SET suspended = 1 WHERE id = $1").bind(&id).execute(&mut *tx)
//! ```
//!
//! Why not sqlx's own functions: code generic over a sqlx `Database` needs a where-clause
//! for each bound and decoded type (`String: Encode<DB> + Type<DB>`,
//! `for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>`, …) on every function,
//! and Rust does not carry such clauses from a trait to the code that uses it. These
//! wrappers bind each value for both databases at once and run on whichever the service
//! opened, so service code needs no bound but `S: ServiceDb`.
//!
//! Portable SQL, as the services write it:
//! - placeholders `$1, $2, …` (PostgreSQL's; sqlx's SQLite driver binds `$N` by number);
//! - types TEXT and BIGINT (`i64`: PostgreSQL's INTEGER has 32 bits), flags as BIGINT
//!   0 / 1 (PostgreSQL does not mix integers and booleans);
//! - `INSERT … ON CONFLICT (…) DO UPDATE SET x = excluded.x` (both spell it alike);
//! - no `rowid`: a column keeps an order (`ordinal`);
//! - DDL differs in one spot only: an auto-incremented key, `{auto_id}` in
//!   [`create_tables`] (see [`ServiceDb::AUTO_ID`]).

use anyhow::Context as _;
use courier::postgres::PgStore;
use courier::sqlite::SqliteStore;
use courier::{
    ChannelName, Command, Correlation, DomainEvent, MessageId, MessageStore, OutboxSource,
};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgRow, Postgres};
use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteConnection, SqliteRow};
use sqlx::{Arguments as _, Connection as _, Encode, FromRow, SqlSafeStr, SqlStr, Type};
use std::future::Future;
use std::marker::PhantomData;
use std::ops::DerefMut;
use std::time::Duration;

/// A service database: Courier's store (outbox, inbox, correlation rows) that also holds
/// the service's own tables. Implemented for `SqliteStore` and `PgStore`.
///
/// `begin()` and `commit(tx)` are [`MessageStore`]'s; run queries on `&mut *tx`, in a
/// handler on `&mut *ctx.tx().await`, and outside a transaction on
/// `&mut *store.acquire().await?`.
pub(crate) trait ServiceDb:
    MessageStore<Tx: DerefMut<Target = Self::Conn>, Conn: Conn> + OutboxSource
{
    /// The column definition of an auto-incremented BIGINT primary key.
    const AUTO_ID: &'static str;

    /// A pooled connection, for reads outside a transaction.
    type Pooled: DerefMut<Target = Self::Conn> + Send;

    /// Open the database `url` names and create Courier's tables in it; errors name the
    /// URL without its password.
    fn open(url: &str) -> impl Future<Output = anyhow::Result<Self>> + Send;

    /// A connection from the pool.
    fn acquire(&self) -> impl Future<Output = sqlx::Result<Self::Pooled>> + Send;

    /// Publish domain event `event` through the outbox, in `tx`.
    fn publish_event<E: DomainEvent>(
        &self,
        tx: &mut Self::Tx,
        event: &E,
    ) -> impl Future<Output = courier::Result<MessageId>> + Send;

    /// Send command `cmd` through the outbox in `tx`, with its correlation row; the reply
    /// comes back on `replies`.
    fn send_command<C: Command>(
        &self,
        tx: &mut Self::Tx,
        replies: &ChannelName,
        cmd: &C,
        correlation: Correlation,
    ) -> impl Future<Output = courier::Result<MessageId>> + Send;
}

/// Create the service's tables if they are missing, in one transaction. `{auto_id}` in a
/// statement stands for [`ServiceDb::AUTO_ID`].
pub(crate) async fn create_tables<S: ServiceDb>(store: &S, ddl: &[&str]) -> anyhow::Result<()> {
    let mut tx = store.begin().await?;
    for statement in ddl {
        // The only text spliced in is one of the two AUTO_ID constants.
        let sql = sqlx::AssertSqlSafe(statement.replace("{auto_id}", S::AUTO_ID));
        query(sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("cannot create the service's tables: {statement}"))?;
    }
    store.commit(tx).await?;
    Ok(())
}

impl ServiceDb for SqliteStore {
    const AUTO_ID: &'static str = "INTEGER PRIMARY KEY AUTOINCREMENT";

    type Pooled = sqlx::pool::PoolConnection<Sqlite>;

    async fn open(url: &str) -> anyhow::Result<Self> {
        SqliteStore::connect(url)
            .await
            .with_context(|| format!("cannot open the service database {url}"))
    }

    async fn acquire(&self) -> sqlx::Result<Self::Pooled> {
        self.pool().acquire().await
    }

    async fn publish_event<E: DomainEvent>(
        &self,
        tx: &mut Self::Tx,
        event: &E,
    ) -> courier::Result<MessageId> {
        self.outbox().publish_event(tx, event).await
    }

    async fn send_command<C: Command>(
        &self,
        tx: &mut Self::Tx,
        replies: &ChannelName,
        cmd: &C,
        correlation: Correlation,
    ) -> courier::Result<MessageId> {
        let outbox = self.outbox().replies_to(replies.clone());
        outbox.send_command(tx, cmd, correlation).await
    }
}

/// How long opening a PostgreSQL database may take.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl ServiceDb for PgStore {
    const AUTO_ID: &'static str = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY";

    type Pooled = sqlx::pool::PoolConnection<Postgres>;

    /// Creates the URL's schema first when it does not exist (see [`create_schema`]).
    async fn open(url: &str) -> anyhow::Result<Self> {
        let shown = courier::connect::redact(url);
        create_schema(url)
            .await
            .with_context(|| format!("cannot open the service database {shown}"))?;
        PgStore::connect(url)
            .await
            .with_context(|| format!("cannot open the service database {shown}"))
    }

    async fn acquire(&self) -> sqlx::Result<Self::Pooled> {
        self.pool().acquire().await
    }

    async fn publish_event<E: DomainEvent>(
        &self,
        tx: &mut Self::Tx,
        event: &E,
    ) -> courier::Result<MessageId> {
        self.outbox().publish_event(tx, event).await
    }

    async fn send_command<C: Command>(
        &self,
        tx: &mut Self::Tx,
        replies: &ChannelName,
        cmd: &C,
        correlation: Correlation,
    ) -> courier::Result<MessageId> {
        let outbox = self.outbox().replies_to(replies.clone());
        outbox.send_command(tx, cmd, correlation).await
    }
}

/// Create the first schema of the connection's `search_path` when it does not exist, so
/// `postgres://…/db?options=-csearch_path%3Dftgo_order` needs no set-up: PgStore and
/// the service create their tables in that schema (the current one).
async fn create_schema(url: &str) -> anyhow::Result<()> {
    let options: PgConnectOptions = url.parse().context(
        "not a PostgreSQL URL (expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE)",
    )?;
    let mut conn = tokio::time::timeout(PG_CONNECT_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .with_context(|| format!("no connection within {PG_CONNECT_TIMEOUT:?}"))??;
    let (current, search_path): (Option<String>, String) =
        sqlx::query_as("SELECT current_schema(), current_setting('search_path')")
            .fetch_one(&mut conn)
            .await?;
    let first = search_path.split(',').next().unwrap_or_default().trim();
    // `"$user"` (the default path) names the user's schema: left to the administrator.
    if current.is_none() && !first.is_empty() && !first.contains("$user") {
        let name = first.trim_matches('"').replace('"', "\"\"");
        // A quoted identifier, its quotes doubled: nothing else is spliced in.
        let ddl = format!("CREATE SCHEMA IF NOT EXISTS \"{name}\"");
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&mut conn)
            .await
            .with_context(|| format!("cannot create the schema {name}"))?;
    }
    conn.close().await?;
    Ok(())
}

// ---- queries -------------------------------------------------------------------------

/// A value both drivers can bind: `&str`, `String`, `i64`, `Option<…>` of those, ….
pub(crate) trait Value<'q>:
    Encode<'q, Sqlite> + Type<Sqlite> + Encode<'q, Postgres> + Type<Postgres> + Clone
{
}

impl<'q, T> Value<'q> for T where
    T: Encode<'q, Sqlite> + Type<Sqlite> + Encode<'q, Postgres> + Type<Postgres> + Clone
{
}

/// A row type both drivers can decode: tuples of `String`, `i64`, `Option<String>`, ….
pub(crate) trait Record:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin + 'static
{
}

impl<T> Record for T where
    T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin + 'static
{
}

/// An SQL statement with its values, bound for both databases.
pub(crate) struct Statement {
    sql: SqlStr,
    sqlite: Result<SqliteArguments, BoxDynError>,
    pg: Result<PgArguments, BoxDynError>,
}

impl Statement {
    fn new(sql: impl SqlSafeStr) -> Self {
        Self {
            sql: sql.into_sql_str(),
            sqlite: Ok(SqliteArguments::default()),
            pg: Ok(PgArguments::default()),
        }
    }

    fn bind<'q>(&mut self, value: impl Value<'q>) {
        // A value that cannot be encoded fails the statement when it runs, as in sqlx.
        if let Ok(args) = &mut self.sqlite
            && let Err(e) = args.add(value.clone())
        {
            self.sqlite = Err(e);
        }
        if let Ok(args) = &mut self.pg
            && let Err(e) = args.add(value)
        {
            self.pg = Err(e);
        }
    }
}

/// A connection the statements run on: `SqliteConnection` or `PgConnection`.
pub(crate) trait Conn: Send {
    /// Run `statement`; the number of rows it changed.
    fn execute(&mut self, statement: Statement) -> impl Future<Output = sqlx::Result<u64>> + Send;

    /// The first row, if any.
    fn fetch_optional<R: Record>(
        &mut self,
        statement: Statement,
    ) -> impl Future<Output = sqlx::Result<Option<R>>> + Send;

    /// Every row.
    fn fetch_all<R: Record>(
        &mut self,
        statement: Statement,
    ) -> impl Future<Output = sqlx::Result<Vec<R>>> + Send;
}

impl Conn for SqliteConnection {
    async fn execute(&mut self, s: Statement) -> sqlx::Result<u64> {
        let args = s.sqlite.map_err(sqlx::Error::Encode)?;
        let done = sqlx::query_with(s.sql, args).execute(self).await?;
        Ok(done.rows_affected())
    }

    async fn fetch_optional<R: Record>(&mut self, s: Statement) -> sqlx::Result<Option<R>> {
        let args = s.sqlite.map_err(sqlx::Error::Encode)?;
        sqlx::query_as_with(s.sql, args).fetch_optional(self).await
    }

    async fn fetch_all<R: Record>(&mut self, s: Statement) -> sqlx::Result<Vec<R>> {
        let args = s.sqlite.map_err(sqlx::Error::Encode)?;
        sqlx::query_as_with(s.sql, args).fetch_all(self).await
    }
}

impl Conn for PgConnection {
    async fn execute(&mut self, s: Statement) -> sqlx::Result<u64> {
        let args = s.pg.map_err(sqlx::Error::Encode)?;
        let done = sqlx::query_with(s.sql, args).execute(self).await?;
        Ok(done.rows_affected())
    }

    async fn fetch_optional<R: Record>(&mut self, s: Statement) -> sqlx::Result<Option<R>> {
        let args = s.pg.map_err(sqlx::Error::Encode)?;
        sqlx::query_as_with(s.sql, args).fetch_optional(self).await
    }

    async fn fetch_all<R: Record>(&mut self, s: Statement) -> sqlx::Result<Vec<R>> {
        let args = s.pg.map_err(sqlx::Error::Encode)?;
        sqlx::query_as_with(s.sql, args).fetch_all(self).await
    }
}

/// A statement whose rows are ignored: [`Query::execute`] returns how many it changed.
pub(crate) fn query(sql: impl SqlSafeStr) -> Query<()> {
    Query {
        statement: Statement::new(sql),
        row: PhantomData,
    }
}

/// A query whose rows decode as `R` (a tuple): `query_as::<(String, i64)>("SELECT …")`.
pub(crate) fn query_as<R: Record>(sql: impl SqlSafeStr) -> Query<R> {
    Query {
        statement: Statement::new(sql),
        row: PhantomData,
    }
}

/// A query whose rows are one column of type `T`.
pub(crate) fn query_scalar<T>(sql: impl SqlSafeStr) -> QueryScalar<T>
where
    (T,): Record,
{
    QueryScalar(query_as(sql))
}

/// See [`query`] and [`query_as`].
#[must_use = "a query does nothing until it runs"]
pub(crate) struct Query<R> {
    statement: Statement,
    row: PhantomData<fn() -> R>,
}

impl<R> Query<R> {
    /// Bind the next placeholder (`$1`, then `$2`, …).
    pub(crate) fn bind<'q>(mut self, value: impl Value<'q>) -> Self {
        self.statement.bind(value);
        self
    }

    /// Run it; the number of rows it changed.
    pub(crate) async fn execute<C: Conn + ?Sized>(self, conn: &mut C) -> sqlx::Result<u64> {
        conn.execute(self.statement).await
    }
}

impl<R: Record> Query<R> {
    /// The first row, if any.
    pub(crate) async fn fetch_optional<C: Conn + ?Sized>(
        self,
        conn: &mut C,
    ) -> sqlx::Result<Option<R>> {
        conn.fetch_optional(self.statement).await
    }

    /// Every row.
    pub(crate) async fn fetch_all<C: Conn + ?Sized>(self, conn: &mut C) -> sqlx::Result<Vec<R>> {
        conn.fetch_all(self.statement).await
    }
}

/// See [`query_scalar`].
#[must_use = "a query does nothing until it runs"]
pub(crate) struct QueryScalar<T>(Query<(T,)>);

impl<T> QueryScalar<T>
where
    (T,): Record,
{
    /// Bind the next placeholder (`$1`, then `$2`, …).
    pub(crate) fn bind<'q>(self, value: impl Value<'q>) -> Self {
        Self(self.0.bind(value))
    }

    /// The first row's value, if any.
    pub(crate) async fn fetch_optional<C: Conn + ?Sized>(
        self,
        conn: &mut C,
    ) -> sqlx::Result<Option<T>> {
        Ok(self.0.fetch_optional(conn).await?.map(|(v,)| v))
    }
}
