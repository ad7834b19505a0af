//! Settings of the PostgreSQL broker.

use crate::error::redact_url;
use std::fmt;
use std::time::Duration;

/// Settings of [`PgBroker`](super::PgBroker): where the database is, and the timings of
/// group membership, fetching and retention. Build with [`PgBrokerConfig::new`] and the
/// setters; `Debug` shows the URL with its password redacted.
#[derive(Clone)]
#[non_exhaustive]
pub struct PgBrokerConfig {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`.
    pub url: String,
    /// Schema holding the broker's tables (set as `search_path` on every connection);
    /// `None` keeps the connection's own `search_path` (its first schema is used).
    pub schema: Option<String>,
    /// Connections in the broker's pool (publishes, fetches, offset commits, heartbeats).
    pub max_connections: u32,
    /// Partitions of a channel created implicitly (by a publish or subscribe).
    pub default_partitions: u32,
    /// How often a member renews its membership and rebalances.
    pub heartbeat_interval: Duration,
    /// A member not heard from for this long (by the database's clock) is dead; its
    /// partitions move to the live members.
    pub session_timeout: Duration,
    /// How often acknowledged progress is committed (duplicates after a crash are at most
    /// this much work; the inbox absorbs them).
    pub commit_interval: Duration,
    /// Poll even without a `NOTIFY` this often (covers notifications lost while the
    /// listener reconnects).
    pub poll_interval: Duration,
    /// Most delivered-but-unacknowledged messages per partition.
    pub max_in_flight: usize,
    /// Rows read per partition and query.
    pub fetch_batch: u32,
    /// Largest message accepted by `publish` (payload + headers).
    pub max_message_bytes: usize,
    /// Messages every group has consumed are deleted once older than this.
    pub retention: Duration,
    /// How often a group member prunes consumed messages of its channel.
    pub prune_interval: Duration,
    /// Rows deleted per pruning statement (small batches keep locks short).
    pub prune_batch: u32,
}

impl PgBrokerConfig {
    /// Default settings for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: None,
            max_connections: 10,
            default_partitions: 4,
            heartbeat_interval: Duration::from_millis(500),
            session_timeout: Duration::from_secs(5),
            commit_interval: Duration::from_millis(50),
            poll_interval: Duration::from_millis(500),
            max_in_flight: 5_000,
            fetch_batch: 256,
            max_message_bytes: courier_core::message::DEFAULT_MAX_MESSAGE_BYTES,
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(300),
            prune_batch: 1_000,
        }
    }

    /// Keep the broker's tables in `schema` (it must exist).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Set the pool size (at least 2).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(2);
        self
    }

    /// Set the partition count of implicitly created channels (1 to 1024).
    pub fn default_partitions(mut self, n: u32) -> Self {
        self.default_partitions = n.clamp(1, 1024);
        self
    }

    /// Set heartbeat interval and session timeout together (the timeout is at least two
    /// heartbeats).
    pub fn liveness(mut self, heartbeat: Duration, session_timeout: Duration) -> Self {
        self.heartbeat_interval = heartbeat.max(Duration::from_millis(10));
        self.session_timeout = session_timeout.max(self.heartbeat_interval * 2);
        self
    }

    /// Set how often acknowledged progress is committed.
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.commit_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Set the fallback poll interval.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every.max(Duration::from_millis(10));
        self
    }

    /// Set the size limit of a message.
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// Set how long consumed messages are kept, how often members prune, and how many
    /// rows one pruning statement deletes.
    pub fn retention(mut self, keep: Duration, prune_every: Duration, batch: u32) -> Self {
        self.retention = keep;
        self.prune_interval = prune_every.max(Duration::from_millis(10));
        self.prune_batch = batch.max(1);
        self
    }
}

impl fmt::Debug for PgBrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBrokerConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("default_partitions", &self.default_partitions)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("session_timeout", &self.session_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("poll_interval", &self.poll_interval)
            .field("max_in_flight", &self.max_in_flight)
            .field("fetch_batch", &self.fetch_batch)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("retention", &self.retention)
            .field("prune_interval", &self.prune_interval)
            .field("prune_batch", &self.prune_batch)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::PgBrokerConfig;

    #[test]
    fn debug_redacts_the_password() {
        let c = PgBrokerConfig::new("postgres://app:s3cret@db/orders");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("app:***@db/orders"), "{shown}");
    }
}
