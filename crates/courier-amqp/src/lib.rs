//! # courier-amqp
//!
//! Courier's transport over RabbitMQ (AMQP 0-9-1, with lapin): [`AmqpTransport`]
//! implements [`Publisher`] and [`Subscriber`].
//!
//! - A **channel** of N partitions is N RabbitMQ **streams** (`x-queue-type: stream`),
//!   `courier:<channel>:p<i>`: append-only, replicated logs that keep messages after
//!   they were read, so a consumer group created after a publish still sees it (the
//!   Kafka model the Courier channel contract asks for; classic and quorum queues forget
//!   a message once one consumer took it). The partition count is pinned by a marker
//!   queue `courier:<channel>:meta` declared with `x-max-length = N`: RabbitMQ refuses
//!   to redeclare it with another value (PRECONDITION_FAILED), so every process agrees
//!   on N, and [`AmqpTransport::create_channel`] with another count is a clear error.
//! - **Publishing** sends each message to the stream of its partition
//!   ([`courier_core::partition::partition_for`] of its `partition-key`, or of its id),
//!   persistent (`delivery_mode = 2`), mandatory, with the message id as `message_id`
//!   and Courier headers as AMQP headers, on a channel in publisher-confirm mode;
//!   `publish` resolves when every message is confirmed. A nack or a returned
//!   (unroutable) message is an error naming the message and channel. A stream confirm
//!   means the message is written to the stream's segment files on every replica, but
//!   RabbitMQ streams do **not** fsync before confirming (they rely on replication), so
//!   [`Capabilities::durability`] is [`Durability::Written`]: a power cut of a
//!   single-node broker may lose the last confirmed messages; run 3 replicas where that
//!   matters. Receipts carry no positions: RabbitMQ tells a stream offset to consumers
//!   only, not in the confirm.
//! - A **consumer group** reads each partition's stream from its committed offset.
//!   Partitions are shared among the group's live members with broker-side locks:
//!   every member consumes from `courier:<channel>:<group>:members` (the queue's
//!   consumer count is the group size), holds an exclusive queue
//!   `...:slot<k>` (its rank), and owns partition `p` by holding the exclusive queue
//!   `...:p<p>:lock`. Exclusive queues die with their connection, so a crashed member's
//!   partitions are freed by RabbitMQ itself (at once on a closed socket, after the
//!   AMQP heartbeat timeout on a silent one). Member `k` of `m` wants the partitions
//!   `p % m == k`; it releases the others and claims its own every
//!   [`AmqpConfig::rebalance_interval`].
//! - **Acks are progress.** A member delivers in offset order and commits, per
//!   partition, the highest offset below which every delivery was acked (its ack
//!   floor) to `...:p<p>:offset` (a durable queue holding its last message). An ack
//!   resolves once the floor it advanced is confirmed (one commit covers every ack
//!   waiting at that moment). A partition is handed over only
//!   after each of its deliveries was acked, nacked or dropped and the floor committed;
//!   the next owner resumes at the floor, so unacknowledged messages come again in
//!   order, before newer ones (acknowledged ones after the floor may come twice: the
//!   inbox absorbs them).
//! - `nack(delay)` is a broker-side delay: the message is published (confirmed,
//!   persistent) to the group's delay queue `...:delay<ms>` for the smallest bucket of
//!   at least `delay` (100 ms doubling up to ~29 h; a bucket's TTL is uniform, so no
//!   message waits behind a longer one), and only then acknowledged in the stream.
//!   When the TTL runs out RabbitMQ dead-letters it into the group's retry queue
//!   `...:retry`, which every member consumes; it arrives with `redeliveries` counted
//!   up. It thus survives its member, comes back no earlier than asked and at most
//!   twice as late. Messages with other keys keep flowing; later messages with the
//!   same key are **not** held back (parking a key is the dispatcher's job, ADR 0002).
//!   Should the broker refuse the scheduling, the member redelivers from memory (the
//!   floor stays below the message meanwhile). A delivery dropped without settlement
//!   comes again to the same member after a second.
//! - **Back-pressure**: each owned partition has at most `SubscribeOptions::buffer`
//!   (capped at 1000) deliveries unsettled (the AMQP prefetch); the subscription's
//!   buffer is bounded by the same option.
//! - **Sizes**: [`AmqpConfig::max_message_bytes`] defaults to Courier's 1 MiB. RabbitMQ
//!   accepts up to its `max_message_size` (128 MiB by default in 3.x, 16 MiB in 4.x);
//!   raise the Courier limit only below the broker's, since a larger message is refused
//!   by the broker with a permanent error.
//! - A message published by another client without Courier's `message_id` or with
//!   non-Courier headers is delivered as `Err(Malformed)` with a reason.
//! - **Connection loss**: `publish` returns transient (retryable) errors and reconnects
//!   on a later call, no faster than an exponential backoff; a subscription's member
//!   reconnects with the same backoff and claims partitions again from the committed
//!   floors. Deliveries held across a reconnection can no longer be acked (their
//!   `ack` fails with a transient error; they come again).
//!
//! - **Operators** (`courier channels`, `courier tail`):
//!   [`AmqpTransport::describe`] and [`AmqpTransport::describe_group`] describe a channel
//!   and a consumer group **by name** (AMQP 0-9-1 cannot list queues; only the
//!   management plugin's HTTP API can, and this transport speaks AMQP only), with passive
//!   declarations and by reading offsets from the streams: nothing is created, written
//!   or committed. [`AmqpTransport::tail`] follows a channel without joining a group (a
//!   stream consumer per partition, markers skipped, positions = partition and stream
//!   offset).
//!
//! Needs RabbitMQ 3.9 or later (streams). TLS (`amqps://`) is not compiled in (no
//! rustls provider is pulled into the build); such a URL is refused with a clear error.
//!
//! lapin logs a channel closed by the broker at error level; a member that probes a
//! partition lock still held by its previous owner during a hand-over causes such a
//! log line (`RESOURCE_LOCKED`): expected; so does [`AmqpTransport::describe`] of a
//! channel this process has not used yet (`PRECONDITION_FAILED`: the partition count is
//! read from the refusal of a redeclaration). Add `lapin::channel=off` to the log filter
//! if it is noise.
#![deny(missing_docs)]

mod admin;
mod codec;
mod config;
mod error;
mod member;
mod names;
mod publish;
#[cfg(test)]
mod recovery_tests;
mod reference;
mod topology;

pub use admin::{AmqpTail, AmqpTailFrom, TailRead};
pub use config::AmqpConfig;
pub use reference::raw_publish_rate;

use courier_core::transport::BoxFuture;
use courier_core::{
    Capabilities, ChannelName, Durability, Error, ErrorKind, GroupName, Message, Publisher,
    Receipt, Result, SubscribeOptions, Subscriber, Subscription,
};
use lapin::Connection;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most partitions a channel may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// Builds an [`AmqpTransport`].
#[derive(Debug, Clone, Default)]
pub struct AmqpTransportBuilder {
    config: AmqpConfig,
}

impl AmqpTransportBuilder {
    /// The server URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.config.url = url.into();
        self
    }

    /// Partitions of channels created implicitly.
    pub fn default_partitions(mut self, n: u32) -> Self {
        self.config.default_partitions = n.clamp(1, MAX_PARTITIONS);
        self
    }

    /// How often members rebalance partitions.
    pub fn rebalance_interval(mut self, interval: Duration) -> Self {
        self.config.rebalance_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// The size limit of `publish` (RabbitMQ's own limit, `max_message_size`, is
    /// 128 MiB by default; keep below it).
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.config.max_message_bytes = n;
        self
    }

    /// Stream retention by age (`None`: unlimited).
    pub fn stream_max_age(mut self, age: Option<Duration>) -> Self {
        self.config.stream_max_age = age;
        self
    }

    /// Stream retention by size per partition (`None`: unlimited).
    pub fn stream_max_bytes(mut self, bytes: Option<u64>) -> Self {
        self.config.stream_max_bytes = bytes;
        self
    }

    /// How long to wait for the server when connecting.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Longest pause between two reconnection attempts.
    pub fn max_reconnect_backoff(mut self, max: Duration) -> Self {
        self.config.max_reconnect_backoff = max.max(Duration::from_millis(100));
        self
    }

    /// Use these settings as a whole.
    pub fn config(mut self, config: AmqpConfig) -> Self {
        self.config = config;
        self
    }

    /// The settings built so far.
    pub fn build_config(self) -> AmqpConfig {
        self.config
    }

    /// Connect and return the transport.
    pub async fn connect(self) -> Result<AmqpTransport> {
        AmqpTransport::connect_with(self.config).await
    }
}

/// Courier's transport on RabbitMQ. Cheap to clone (one publishing connection shared;
/// every subscription opens its own connection, which is its liveness).
#[derive(Clone)]
pub struct AmqpTransport {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: AmqpConfig,
    /// The URL with credentials redacted, for messages.
    pub(crate) url: String,
    pub(crate) max_message_bytes: usize,
    pub(crate) publisher: tokio::sync::Mutex<publish::PublishState>,
    channels: Mutex<HashMap<ChannelName, u32>>,
}

impl Inner {
    fn new(config: AmqpConfig) -> Self {
        Self {
            url: error::redact(&config.url),
            max_message_bytes: config.max_message_bytes,
            config,
            publisher: tokio::sync::Mutex::new(publish::PublishState::default()),
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The partition count of `channel`, declaring it with the default count if missing.
    pub(crate) async fn partitions(&self, conn: &Connection, channel: &ChannelName) -> Result<u32> {
        if let Some(n) = self.cached(channel) {
            return Ok(n);
        }
        let n = topology::ensure_channel(
            conn,
            &self.config,
            channel,
            self.config.default_partitions.clamp(1, MAX_PARTITIONS),
            false,
        )
        .await?;
        self.remember(channel, n);
        Ok(n)
    }

    fn cached(&self, channel: &ChannelName) -> Option<u32> {
        self.channels.lock().ok()?.get(channel).copied()
    }

    fn remember(&self, channel: &ChannelName, n: u32) {
        if let Ok(mut c) = self.channels.lock() {
            c.insert(channel.clone(), n);
        }
    }

    pub(crate) fn forget(&self, channel: &ChannelName) {
        if let Ok(mut c) = self.channels.lock() {
            c.remove(channel);
        }
    }
}

impl fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl AmqpTransport {
    /// A builder with default settings.
    pub fn builder() -> AmqpTransportBuilder {
        AmqpTransportBuilder::default()
    }

    /// Connect to `url` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`) with default
    /// settings.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder().url(url).connect().await
    }

    /// Connect with `config`: fails at once, naming the redacted URL, when RabbitMQ is
    /// unreachable or refuses the credentials.
    pub async fn connect_with(config: AmqpConfig) -> Result<Self> {
        if config.rebalance_interval.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "AMQP transport: rebalance_interval must be above zero",
            ));
        }
        let inner = Arc::new(Inner::new(config));
        inner.publisher.lock().await.link(&inner).await?;
        Ok(Self { inner })
    }

    /// The settings.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }

    async fn connection(&self) -> Result<Arc<Connection>> {
        Ok(self.inner.publisher.lock().await.link(&self.inner).await?.0)
    }

    /// Create `channel` with `partitions` partitions. Creating an existing channel with
    /// the same count is a no-op; with another count it is an error (repartitioning would
    /// break per-key order).
    pub async fn create_channel(&self, channel: &ChannelName, partitions: u32) -> Result<()> {
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(Error::invalid(format!(
                "channel {channel}: partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}"
            )));
        }
        let conn = self.connection().await?;
        let n =
            topology::ensure_channel(&conn, &self.inner.config, channel, partitions, true).await?;
        self.inner.remember(channel, n);
        Ok(())
    }

    /// Delete `channel`: its streams (every message) and its partition-count marker.
    /// Consumer groups' queues are deleted with [`delete_group`](Self::delete_group).
    pub async fn delete_channel(&self, channel: &ChannelName) -> Result<()> {
        let conn = self.connection().await?;
        if !topology::exists(&conn, &names::meta(channel)).await? {
            self.inner.forget(channel);
            return Ok(());
        }
        let n = self.inner.partitions(&conn, channel).await?;
        self.inner.forget(channel);
        let mut queues: Vec<String> = (0..n).map(|p| names::stream(channel, p)).collect();
        queues.push(names::meta(channel));
        topology::delete_queues(&conn, &queues).await
    }

    /// Delete the queues that hold `group`'s offsets and membership on `channel` (the
    /// group then starts over as a new group). Live members lose their locks.
    pub async fn delete_group(&self, channel: &ChannelName, group: &GroupName) -> Result<()> {
        let conn = self.connection().await?;
        let n = self.inner.partitions(&conn, channel).await?;
        let queues = names::group_queues(channel, group, n, n.max(8))?;
        topology::delete_queues(&conn, &queues).await
    }
}

impl Publisher for AmqpTransport {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<Receipt>> {
        Box::pin(async move {
            if messages.is_empty() {
                return Ok(Receipt {
                    durability: Durability::Written,
                    positions: Vec::new(),
                });
            }
            publish::publish(&self.inner, messages).await
        })
    }

    fn capabilities(&self) -> Capabilities {
        // Partitioned by key and in order per key, but without positions in receipts
        // (`partitions` promises those).
        let mut caps = Capabilities::new(Durability::Written, self.inner.max_message_bytes)
            .with_consumer_groups()
            .with_delayed_redelivery();
        caps.ordered_per_key = true;
        caps
    }
}

impl Subscriber for AmqpTransport {
    fn subscribe<'a>(&'a self, options: SubscribeOptions) -> BoxFuture<'a, Result<Subscription>> {
        Box::pin(async move { member::join(self.inner.clone(), options).await })
    }
}

impl From<AmqpTransport> for Arc<dyn Publisher> {
    fn from(t: AmqpTransport) -> Self {
        Arc::new(t)
    }
}
