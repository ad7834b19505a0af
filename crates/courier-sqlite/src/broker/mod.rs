//! The embedded broker: partitioned, durable logs in one SQLite file (WAL) shared by the
//! processes of one machine. See `docs/adr/0003-embedded-sqlite-broker.md`.

mod admin;
mod member;

pub use admin::{ChannelInfo, GroupInfo, GroupPartition, PartitionInfo};

use crate::connect::{self, Sync};
use crate::error::map;
use crate::wake::{FileWaker, waker_for};
use courier_core::partition::partition_for;
use courier_core::transport::BoxFuture;
use courier_core::{
    Capabilities, ChannelName, Error, Message, Position, Publisher, Receipt, Result,
    SubscribeOptions, Subscriber, Subscription,
};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS courier_channels (
        name TEXT PRIMARY KEY,
        partitions INTEGER NOT NULL,
        created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS courier_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        partition INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        headers TEXT NOT NULL,
        payload BLOB NOT NULL,
        published_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS courier_log_by_partition ON courier_log (channel, partition, seq)",
    "CREATE TABLE IF NOT EXISTS courier_groups (
        channel TEXT NOT NULL,
        grp TEXT NOT NULL,
        partition INTEGER NOT NULL,
        committed INTEGER NOT NULL,
        owner TEXT,
        generation INTEGER NOT NULL,
        PRIMARY KEY (channel, grp, partition)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS courier_members (
        channel TEXT NOT NULL,
        grp TEXT NOT NULL,
        member TEXT NOT NULL,
        joined_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        PRIMARY KEY (channel, grp, member)) WITHOUT ROWID",
];

/// Settings of the embedded broker.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteBrokerConfig {
    /// Durability of publishes and offset commits.
    pub sync: Sync,
    /// Partitions of a channel created implicitly (by a publish or subscribe).
    pub default_partitions: u32,
    /// How often a member renews its membership and rebalances.
    pub heartbeat_interval: Duration,
    /// A member not heard from for this long is dead; its partitions move.
    pub session_timeout: Duration,
    /// How often acknowledged progress is committed (duplicates after a crash are at most
    /// this much work; the inbox absorbs them).
    pub commit_interval: Duration,
    /// Poll even without a wake-up signal this often.
    pub poll_interval: Duration,
    /// Most delivered-but-unacknowledged messages per partition.
    pub max_in_flight: usize,
    /// Rows read per query.
    pub fetch_batch: u32,
    /// Largest message accepted by `publish`.
    pub max_message_bytes: usize,
    /// Messages every group has consumed are deleted once older than this.
    pub retention: Duration,
    /// How often a group member prunes consumed messages.
    pub prune_interval: Duration,
}

impl Default for SqliteBrokerConfig {
    fn default() -> Self {
        Self {
            sync: Sync::Normal,
            default_partitions: 4,
            heartbeat_interval: Duration::from_millis(300),
            session_timeout: Duration::from_secs(3),
            commit_interval: Duration::from_millis(50),
            poll_interval: Duration::from_millis(100),
            max_in_flight: 5_000,
            fetch_batch: 256,
            max_message_bytes: courier_core::message::DEFAULT_MAX_MESSAGE_BYTES,
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(300),
        }
    }
}

impl SqliteBrokerConfig {
    /// Set the default partition count.
    pub fn default_partitions(mut self, n: u32) -> Self {
        self.default_partitions = n.max(1);
        self
    }
    /// Set heartbeat interval and session timeout together.
    pub fn liveness(mut self, heartbeat: Duration, session_timeout: Duration) -> Self {
        self.heartbeat_interval = heartbeat;
        self.session_timeout = session_timeout.max(heartbeat * 2);
        self
    }
    /// Set the durability.
    pub fn sync(mut self, sync: Sync) -> Self {
        self.sync = sync;
        self
    }
    /// Set the size limit.
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }
    /// Set how long consumed messages are kept, and how often members prune.
    pub fn retention(mut self, keep: Duration, prune_every: Duration) -> Self {
        self.retention = keep;
        self.prune_interval = prune_every.max(Duration::from_millis(10));
        self
    }
}

/// The embedded broker on one SQLite file. Cheap to clone; implements [`Publisher`] and
/// [`Subscriber`].
#[derive(Clone)]
pub struct SqliteBroker {
    pub(crate) inner: Arc<BrokerInner>,
}

pub(crate) struct BrokerInner {
    /// Keeps the background checkpointer running while the broker lives.
    _alive: Arc<()>,
    pub(crate) write: SqlitePool,
    pub(crate) read: SqlitePool,
    /// Settings for dedicated read connections (one per group member's fetcher).
    pub(crate) read_options: sqlx::sqlite::SqliteConnectOptions,
    pub(crate) path: PathBuf,
    pub(crate) waker: Arc<FileWaker>,
    pub(crate) config: SqliteBrokerConfig,
    channels: Mutex<HashMap<String, u32>>,
}

impl BrokerInner {
    /// A write transaction; waits for other processes' writers with short async back-off.
    pub(crate) async fn write_begin(
        &self,
    ) -> std::result::Result<sqlx::Transaction<'static, Sqlite>, sqlx::Error> {
        connect::begin_immediate(&self.write).await
    }
}

impl fmt::Debug for SqliteBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBroker")
            .field("path", &self.inner.path)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl SqliteBroker {
    /// Open (or create) the broker file at `path` with default settings.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteBrokerConfig::default()).await
    }

    /// Open `sqlite:PATH`.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(connect::parse_sqlite_url(url)?).await
    }

    /// Open with settings.
    pub async fn open_with(path: impl AsRef<Path>, config: SqliteBrokerConfig) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let write =
            connect::open_pool_with(&path, config.sync, 1, connect::LockWait::InCourier).await?;
        connect::apply_schema(&write, &path, SCHEMA).await?;
        let read = connect::open_pool(&path, config.sync, 2).await?;
        let waker = waker_for(&path);
        let alive = Arc::new(());
        connect::spawn_checkpointer(
            &path,
            config.sync,
            Duration::from_millis(500),
            Arc::downgrade(&alive),
        );
        Ok(Self {
            inner: Arc::new(BrokerInner {
                _alive: alive,
                write,
                read,
                read_options: connect::connect_options(
                    &path,
                    config.sync,
                    connect::LockWait::InSqlite,
                ),
                path,
                waker,
                config,
                channels: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The broker file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The settings.
    pub fn config(&self) -> &SqliteBrokerConfig {
        &self.inner.config
    }

    pub(crate) fn err(&self, what: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
        let what = format!("{what} in broker {}", self.inner.path.display());
        move |e| map(what, e)
    }

    /// Create `channel` with `partitions` partitions. Creating an existing channel with
    /// the same count is a no-op; with another count it is an error (repartitioning would
    /// break per-key order).
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
    pub(crate) async fn partitions(&self, channel: &ChannelName) -> Result<u32> {
        if let Some(n) = self.cached(channel) {
            return Ok(n);
        }
        self.ensure_channel(channel, self.inner.config.default_partitions)
            .await
    }

    fn cached(&self, channel: &ChannelName) -> Option<u32> {
        self.inner
            .channels
            .lock()
            .ok()
            .and_then(|c| c.get(channel.as_str()).copied())
    }

    async fn ensure_channel(&self, channel: &ChannelName, partitions: u32) -> Result<u32> {
        let mut tx = self
            .inner
            .write_begin()
            .await
            .map_err(self.err("creating a channel"))?;
        sqlx::query(
            "INSERT INTO courier_channels (name, partitions, created_at)
             VALUES (?, ?, unixepoch('subsec')) ON CONFLICT (name) DO NOTHING",
        )
        .bind(channel.as_str())
        .bind(i64::from(partitions))
        .execute(&mut *tx)
        .await
        .map_err(self.err("creating a channel"))?;
        let n: i64 = sqlx::query_scalar("SELECT partitions FROM courier_channels WHERE name = ?")
            .bind(channel.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(self.err("reading a channel"))?;
        tx.commit().await.map_err(self.err("creating a channel"))?;
        let n = u32::try_from(n).unwrap_or(1).max(1);
        if let Ok(mut c) = self.inner.channels.lock() {
            c.insert(channel.to_string(), n);
        }
        Ok(n)
    }

    async fn publish_batch(&self, messages: &[Message]) -> Result<Receipt> {
        let mut routed = Vec::with_capacity(messages.len());
        for m in messages {
            m.check_size(self.inner.config.max_message_bytes)?;
            let channel = m.channel()?;
            let n = self.partitions(&channel).await?;
            let partition = match m.headers.partition_key() {
                Some(k) => partition_for(k, n),
                None => partition_for(&m.id.to_string(), n),
            };
            routed.push((channel, partition, m));
        }
        let mut positions = Vec::with_capacity(messages.len());
        let mut tx = self
            .inner
            .write_begin()
            .await
            .map_err(self.err("publishing"))?;
        for chunk in routed.chunks(100) {
            let mut q = sqlx::QueryBuilder::<Sqlite>::new(
                "INSERT INTO courier_log (channel, partition, message_id, headers, payload, published_at) ",
            );
            q.push_values(chunk, |mut b, (channel, partition, m)| {
                b.push_bind(channel.as_str())
                    .push_bind(i64::from(*partition))
                    .push_bind(m.id.to_string())
                    .push_bind(m.headers.to_json())
                    .push_bind(m.payload.to_vec())
                    .push("unixepoch('subsec')");
            });
            let done = q
                .build()
                .execute(&mut *tx)
                .await
                .map_err(self.err("publishing"))?;
            // AUTOINCREMENT rowids of one multi-row insert by the only writer are consecutive.
            let last = done.last_insert_rowid();
            let first = last - chunk.len() as i64 + 1;
            for (i, (_, partition, _)) in chunk.iter().enumerate() {
                positions.push(Some(Position {
                    partition: *partition,
                    offset: (first + i as i64) as u64,
                }));
            }
        }
        tx.commit().await.map_err(self.err("publishing"))?;
        self.inner.waker.bump();
        Ok(Receipt {
            durability: self.inner.config.sync.durability(),
            positions,
        })
    }

    /// Read up to `limit` messages of `channel` after global position `after` (any
    /// partition, publish order), without joining a group: what `courier tail` uses.
    pub async fn read_after(
        &self,
        channel: &ChannelName,
        after: u64,
        limit: u32,
    ) -> Result<
        Vec<(
            Position,
            std::result::Result<Message, courier_core::Malformed>,
        )>,
    > {
        let rows = sqlx::query(
            "SELECT seq, partition, message_id, headers, payload FROM courier_log
             WHERE channel = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(channel.as_str())
        .bind(after as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.inner.read)
        .await
        .map_err(self.err("reading a channel"))?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get("seq").map_err(self.err("reading a channel"))?;
                let partition: i64 = r
                    .try_get("partition")
                    .map_err(self.err("reading a channel"))?;
                let id: String = r
                    .try_get("message_id")
                    .map_err(self.err("reading a channel"))?;
                let headers: String = r
                    .try_get("headers")
                    .map_err(self.err("reading a channel"))?;
                let payload: Vec<u8> = r
                    .try_get("payload")
                    .map_err(self.err("reading a channel"))?;
                Ok((
                    Position {
                        partition: partition as u32,
                        offset: seq as u64,
                    },
                    crate::decode_message(&id, &headers, payload.into()),
                ))
            })
            .collect()
    }

    /// The newest position of `channel` (0 when empty).
    pub async fn head(&self, channel: &ChannelName) -> Result<u64> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT max(seq) FROM courier_log WHERE channel = ?")
                .bind(channel.as_str())
                .fetch_one(&self.inner.read)
                .await
                .map_err(self.err("reading a channel"))?;
        Ok(n.unwrap_or(0) as u64)
    }

    /// Wait until something may have changed in the broker file (a local or another
    /// process's commit), or `timeout` passed. A commit that happened before this call is
    /// not seen: to follow a channel, keep a [`Changes`] from [`changes`](Self::changes).
    pub async fn wait_for_change(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.changes().changed()).await;
    }

    /// A handle that remembers changes since it was made: take it BEFORE reading, then
    /// `changed().await` returns at once if a commit landed in between.
    pub fn changes(&self) -> Changes {
        Changes {
            rx: self.inner.waker.subscribe(),
        }
    }

    /// Delete messages every group has consumed that are older than `retention`, in
    /// batches. Returns how many were deleted.
    pub async fn prune(&self, retention: Duration) -> Result<u64> {
        let mut total = 0;
        loop {
            let mut tx = self
                .inner
                .write_begin()
                .await
                .map_err(self.err("pruning consumed messages"))?;
            let n = sqlx::query(
                "DELETE FROM courier_log WHERE seq IN (
                   SELECT l.seq FROM courier_log l
                   WHERE l.published_at < unixepoch('subsec') - ?
                     AND l.seq <= (SELECT min(g.committed) FROM courier_groups g
                                   WHERE g.channel = l.channel AND g.partition = l.partition)
                   LIMIT 1000)",
            )
            .bind(retention.as_secs_f64())
            .execute(&mut *tx)
            .await
            .map_err(self.err("pruning consumed messages"))?
            .rows_affected();
            tx.commit()
                .await
                .map_err(self.err("pruning consumed messages"))?;
            total += n;
            if n < 1000 {
                return Ok(total);
            }
        }
    }
}

/// Wake-ups for commits to a broker file, from [`SqliteBroker::changes`].
#[derive(Debug)]
pub struct Changes {
    rx: tokio::sync::watch::Receiver<u64>,
}

impl Changes {
    /// Resolve when the file changed since the last call (or since this handle was made).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The broker is gone: nothing will change any more.
            std::future::pending::<()>().await;
        }
    }
}

impl Publisher for SqliteBroker {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<Receipt>> {
        Box::pin(async move {
            if messages.is_empty() {
                return Ok(Receipt {
                    durability: self.inner.config.sync.durability(),
                    positions: Vec::new(),
                });
            }
            self.publish_batch(messages).await
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(
            self.inner.config.sync.durability(),
            self.inner.config.max_message_bytes,
        )
        .partitioned()
        .with_consumer_groups()
        .with_delayed_redelivery()
    }
}

impl Subscriber for SqliteBroker {
    fn subscribe<'a>(&'a self, options: SubscribeOptions) -> BoxFuture<'a, Result<Subscription>> {
        Box::pin(async move { member::join(self.clone(), options).await })
    }
}

impl From<SqliteBroker> for Arc<dyn Publisher> {
    fn from(b: SqliteBroker) -> Self {
        Arc::new(b)
    }
}
