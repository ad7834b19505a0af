//! PostgreSQL as a broker: partitioned, durable channels and consumer groups in tables,
//! for teams that run only PostgreSQL. The design of the embedded SQLite broker
//! (`docs/adr/0003-embedded-sqlite-broker.md`) ported to a database whose writers run
//! concurrently:
//!
//! - **Offsets in commit order.** A partition's offsets come from its counter row
//!   (`courier_broker_partitions.head`), bumped with `UPDATE .. RETURNING` inside the
//!   publishing transaction. The row lock is held until that transaction ends, so a second
//!   publisher of the same partition waits and then gets higher offsets: within a
//!   partition, offset order is commit order, and a reader that remembers "after offset N"
//!   never misses a row that commits later with a lower offset. Publishers of different
//!   partitions do not wait for each other (`log.rs`).
//! - **Groups, leases, fencing** on the database's clock, as in the SQLite broker:
//!   `member.rs` (joining, fenced offset commits, leaving) and `rebalance.rs`.
//! - **Delayed redelivery**: the member that nacked redelivers from a timer; the delay is
//!   also stored, so a member taking over after a crash honours it (`delay.rs`).
//! - **Wake-ups** by `pg_notify` in the publishing transaction, a fallback poll, and a
//!   catch-up after the listener reconnects (`listen.rs`); a fetcher per member
//!   (`fetch.rs`).
//! - **Retention**: consumed messages older than the retention are deleted in small
//!   batches by the members (`log.rs`); introspection for `courier channels` in
//!   `admin.rs`, group-less reading for `courier tail` in `tail.rs`.

mod admin;
mod config;
mod delay;
mod fetch;
mod listen;
mod log;
mod member;
mod rebalance;
mod schema;
mod tail;

pub use admin::{ChannelInfo, GroupInfo, GroupPartition, PartitionInfo};
pub use config::PgBrokerConfig;
pub use tail::PgBrokerChanges;

use crate::error::{connect_error, map, redact_url};
use courier_core::transport::BoxFuture;
use courier_core::{
    Capabilities, ChannelName, Durability, Error, ErrorKind, Message, Publisher, Receipt, Result,
    SubscribeOptions, Subscriber, Subscription,
};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// How long connecting waits for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// PostgreSQL as a broker: implements [`Publisher`] and [`Subscriber`] with partitioned
/// channels and consumer groups stored in tables of one schema. Cheap to clone; each
/// [`PgBroker::connect`] behaves like another process (its own pool and listener).
///
/// A publish resolves after `COMMIT`: with PostgreSQL's default `synchronous_commit = on`
/// (and `fsync = on`) the WAL is flushed to disk first, so receipts say
/// [`Durability::Synced`]; a server with either setting off gets [`Durability::Written`].
#[derive(Clone)]
pub struct PgBroker {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    /// The database for people: the URL without password, and the schema.
    describe: String,
    schema: String,
    config: PgBrokerConfig,
    durability: Durability,
    channels: Mutex<HashMap<String, u32>>,
    wakes: Arc<listen::Wakes>,
    fenced_commits: AtomicU64,
    /// Stops the `LISTEN` task when the broker is dropped.
    _listener: oneshot::Sender<()>,
}

/// Counters of a [`PgBroker`] (this process's view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PgBrokerStats {
    /// Offset commits refused because another member took the partition over (fencing).
    pub fenced_commits: u64,
}

impl fmt::Debug for PgBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBroker")
            .field("database", &self.inner.describe)
            .field("schema", &self.inner.schema)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl PgBroker {
    /// Settings for the database at `url`, to adjust and pass to
    /// [`connect_with`](Self::connect_with).
    pub fn builder(url: impl Into<String>) -> PgBrokerConfig {
        PgBrokerConfig::new(url)
    }

    /// Connect to `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`) with default
    /// settings and create the broker's tables in the current schema if missing.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(PgBrokerConfig::new(url)).await
    }

    /// Connect with settings. Errors name the URL with its password redacted and say what
    /// to check: wrong credentials or a missing database are permanent, an unreachable
    /// server is transient.
    pub async fn connect_with(config: PgBrokerConfig) -> Result<Self> {
        let shown = redact_url(&config.url);
        let scheme = config
            .url
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("postgres" | "postgresql")) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{shown} is not a PostgreSQL URL (expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE)"
                ),
            ));
        }
        let mut options: PgConnectOptions = config.url.parse().map_err(|e| {
            map(
                format!(
                    "{shown} is not a PostgreSQL URL (expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE)"
                ),
                e,
            )
        })?;
        if let Some(schema) = &config.schema {
            options = options.options([("search_path", schema.as_str())]);
        }
        // One direct connection first: a pool retries a refused connection until its
        // acquire timeout and then reports only that it timed out.
        let durability =
            match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await
            {
                Ok(Ok(mut conn)) => {
                    let d = durability(&mut conn)
                        .await
                        .map_err(|e| map(format!("reading settings of {shown}"), e))?;
                    let _ = conn.close().await;
                    d
                }
                Ok(Err(e)) => return Err(connect_error(&shown, e)),
                Err(_) => return Err(connect_error(&shown, sqlx::Error::PoolTimedOut)),
            };
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(2))
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with(options.clone());
        let schema = schema::apply(&pool, &shown).await?;
        let describe = format!("{shown} (schema {schema})");
        let wakes = Arc::new(listen::Wakes::default());
        let listener = listen::spawn(options, schema.clone(), wakes.clone(), describe.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                describe,
                schema,
                config,
                durability,
                channels: Mutex::new(HashMap::new()),
                wakes,
                fenced_commits: AtomicU64::new(0),
                _listener: listener,
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &PgBrokerConfig {
        &self.inner.config
    }

    /// The schema holding the broker's tables.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// This process's counters.
    pub fn stats(&self) -> PgBrokerStats {
        PgBrokerStats {
            fenced_commits: self.inner.fenced_commits.load(Ordering::Relaxed),
        }
    }

    fn err(&self, what: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
        let what = format!("{what} in broker {}", self.inner.describe);
        move |e| map(what, e)
    }

    /// Create `channel` with `partitions` partitions (1 to 1024). Creating an existing
    /// channel with the same count is a no-op; with another count it is an error
    /// (repartitioning would break per-key order).
    pub async fn create_channel(&self, channel: &ChannelName, partitions: u32) -> Result<()> {
        if partitions == 0 || partitions > 1024 {
            return Err(Error::invalid(format!(
                "channel {channel}: partitions must be between 1 and 1024, got {partitions}"
            )));
        }
        let have = self.ensure_channel(channel, partitions).await?;
        if have != partitions {
            return Err(Error::invalid(format!(
                "channel {channel} already exists with {have} partitions, not {partitions}; \
                 the partition count of a channel cannot change"
            )));
        }
        Ok(())
    }

    /// The partition count of `channel`, creating it with the default count if missing.
    async fn partitions(&self, channel: &ChannelName) -> Result<u32> {
        let cached = self
            .inner
            .channels
            .lock()
            .ok()
            .and_then(|c| c.get(channel.as_str()).copied());
        match cached {
            Some(n) => Ok(n),
            None => {
                self.ensure_channel(channel, self.inner.config.default_partitions)
                    .await
            }
        }
    }

    async fn ensure_channel(&self, channel: &ChannelName, partitions: u32) -> Result<u32> {
        let e = || self.err("creating a channel");
        let mut tx = self.inner.pool.begin().await.map_err(e())?;
        sqlx::query(
            "INSERT INTO courier_broker_channels (name, partitions) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(channel.as_str())
        .bind(partitions as i32)
        .execute(&mut *tx)
        .await
        .map_err(e())?;
        let n: i32 =
            sqlx::query_scalar("SELECT partitions FROM courier_broker_channels WHERE name = $1")
                .bind(channel.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(e())?;
        sqlx::query(
            "INSERT INTO courier_broker_partitions (channel, partition)
             SELECT $1, p FROM generate_series(0, $2 - 1) AS p ON CONFLICT DO NOTHING",
        )
        .bind(channel.as_str())
        .bind(n)
        .execute(&mut *tx)
        .await
        .map_err(e())?;
        tx.commit().await.map_err(e())?;
        let n = u32::try_from(n).unwrap_or(1).max(1);
        if let Ok(mut c) = self.inner.channels.lock() {
            c.insert(channel.to_string(), n);
        }
        Ok(n)
    }
}

/// What a commit confirmation means on this server.
async fn durability(conn: &mut PgConnection) -> std::result::Result<Durability, sqlx::Error> {
    let (sync, fsync): (String, String) =
        sqlx::query_as("SELECT current_setting('synchronous_commit'), current_setting('fsync')")
            .fetch_one(conn)
            .await?;
    Ok(if sync == "off" || fsync == "off" {
        Durability::Written
    } else {
        Durability::Synced
    })
}

impl Publisher for PgBroker {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<Receipt>> {
        Box::pin(async move {
            if messages.is_empty() {
                return Ok(Receipt {
                    durability: self.inner.durability,
                    positions: Vec::new(),
                });
            }
            self.publish_batch(messages).await
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.inner.durability, self.inner.config.max_message_bytes)
            .partitioned()
            .with_consumer_groups()
            .with_delayed_redelivery()
    }
}

impl Subscriber for PgBroker {
    fn subscribe<'a>(&'a self, options: SubscribeOptions) -> BoxFuture<'a, Result<Subscription>> {
        Box::pin(async move { member::join(self.clone(), options).await })
    }
}

impl From<PgBroker> for Arc<dyn Publisher> {
    fn from(b: PgBroker) -> Self {
        Arc::new(b)
    }
}
