//! # courier-nats
//!
//! Courier's transport over NATS JetStream: [`NatsTransport`] implements
//! [`Publisher`] and [`Subscriber`].
//!
//! - A **channel** is a stream `COURIER_<channel>` (file storage) with one subject per
//!   partition, `courier.<channel>.<partition>`. The partition count is stored in the
//!   stream's description (`partitions=N`) when the stream is created (explicitly with
//!   [`NatsTransport::create_channel`] or on first use with
//!   [`NatsConfig::default_partitions`]), so every process agrees on it.
//! - **Publishing** sends each message to the subject of its partition
//!   ([`courier_core::partition::partition_for`] of its `partition-key`,
//!   or of its id), Courier headers as NATS headers, the message id as `Nats-Msg-Id`
//!   (JetStream drops a re-published duplicate within the stream's duplicate window),
//!   and resolves when JetStream acknowledged every message. That acknowledgement means
//!   the message is written to the server's storage, **not fsync'd**: JetStream syncs
//!   its files periodically (`sync_interval`, 2 minutes by default), so
//!   [`Capabilities::durability`] is [`Durability::Written`]: a power cut of a single
//!   server may lose recent confirmations; use 3 replicas (or `sync_interval: always` on
//!   the server) where that matters.
//! - A **consumer group** is one durable pull consumer per partition
//!   (`<group>_p<partition>`, explicit acks, unlimited deliveries: Courier dead-letters in
//!   the service database). Partitions are shared among a group's live members through
//!   leases in a JetStream KV bucket ([`NatsConfig::leases_bucket`]) whose `max_age` is
//!   the session timeout, so liveness uses the broker's clock. Only the lease holder
//!   pulls a partition, in order; a member hands a partition over only after every
//!   message it delivered from it was settled. The lease's KV revision is its fencing
//!   token: a member that fails to renew it in time stops delivering at once.
//! - Acks are per message (double acks: resolved when the server has them). A member
//!   that claims a partition whose consumer still has unacknowledged deliveries (its
//!   previous owner crashed or left with messages in hand) recreates the consumer from
//!   its **ack floor** — the lowest unacknowledged position, as the SQLite broker commits
//!   — so those messages come again in order, before newer ones; acknowledged ones after
//!   the floor may come twice (the inbox absorbs them). Order per key thus holds across
//!   crashes and rebalances.
//! - `nack(delay)` is a JetStream `-NAK` with that delay (messages with other keys keep
//!   flowing). A delivery dropped without a settlement stays unacknowledged: JetStream
//!   redelivers it after [`NatsConfig::ack_wait`], or the partition's next owner resumes
//!   from the ack floor.
//!
//! A message stored by another client without Courier's headers is delivered as
//! `Err(Malformed)` with a reason.
//!
//! Works with nats-server 2.9 and later (no 2.10+ features are used).
#![deny(missing_docs)]

mod admin;
mod codec;
mod config;
mod error;
mod member;
mod names;
mod reference;

pub use admin::{NatsTail, TailFrom};
pub use config::NatsConfig;
pub use reference::{raw_publish_rate, raw_publish_rate_with_headers};

use async_nats::Subject;
use async_nats::jetstream::{self, stream::StorageType};
use courier_core::partition::partition_for;
use courier_core::transport::BoxFuture;
use courier_core::{
    Capabilities, ChannelName, Durability, Error, ErrorKind, Message, Position, Publisher, Receipt,
    Result, SubscribeOptions, Subscriber, Subscription,
};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Room kept for NATS' own framing and headers below the server's `max_payload`.
const NATS_OVERHEAD: usize = 4 * 1024;

/// Messages sent before waiting for their acks.
const PUBLISH_WINDOW: usize = 256;

/// Builds a [`NatsTransport`].
#[derive(Debug, Clone, Default)]
pub struct NatsTransportBuilder {
    config: NatsConfig,
}

impl NatsTransportBuilder {
    /// The server URL(s), comma separated.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.config.url = url.into();
        self
    }

    /// Partitions of channels created implicitly.
    pub fn default_partitions(mut self, n: u32) -> Self {
        self.config.default_partitions = n.max(1);
        self
    }

    /// The KV bucket for memberships and leases.
    pub fn leases_bucket(mut self, bucket: impl Into<String>) -> Self {
        self.config.leases_bucket = bucket.into();
        self
    }

    /// Heartbeat interval and session timeout (at least three heartbeats).
    pub fn liveness(mut self, heartbeat: Duration, session_timeout: Duration) -> Self {
        self.config.heartbeat_interval = heartbeat;
        self.config.session_timeout = session_timeout.max(heartbeat * 3);
        self
    }

    /// How long an unsettled delivery waits before JetStream redelivers it.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.config.ack_wait = ack_wait;
        self
    }

    /// How long one pull request waits for messages.
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.config.fetch_wait = wait;
        self
    }

    /// Remove channel messages older than `age` (`None`: keep them).
    pub fn stream_max_age(mut self, age: Option<Duration>) -> Self {
        self.config.stream_max_age = age;
        self
    }

    /// The size limit of `publish`.
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.config.max_message_bytes = n;
        self
    }

    /// Use these settings as a whole.
    pub fn config(mut self, config: NatsConfig) -> Self {
        self.config = config;
        self
    }

    /// The settings built so far (e.g. to connect several transports alike).
    pub fn build_config(self) -> NatsConfig {
        self.config
    }

    /// Connect, check that JetStream is enabled, and return the transport.
    pub async fn connect(self) -> Result<NatsTransport> {
        NatsTransport::connect_with(self.config).await
    }
}

/// Courier's transport on NATS JetStream. Cheap to clone (one connection shared).
#[derive(Clone)]
pub struct NatsTransport {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) js: jetstream::Context,
    pub(crate) config: NatsConfig,
    /// The URL with credentials redacted, for messages.
    pub(crate) url: String,
    max_message_bytes: usize,
    channels: Mutex<HashMap<ChannelName, u32>>,
    leases: tokio::sync::OnceCell<jetstream::kv::Store>,
}

impl fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl NatsTransport {
    /// A builder with default settings.
    pub fn builder() -> NatsTransportBuilder {
        NatsTransportBuilder::default()
    }

    /// Connect to `url` with default settings.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder().url(url).connect().await
    }

    /// Connect with `config`.
    pub async fn connect_with(config: NatsConfig) -> Result<Self> {
        let url = error::redact(&config.url);
        if config.heartbeat_interval.is_zero()
            || config.session_timeout < config.heartbeat_interval * 2
        {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "NATS transport: session_timeout ({:?}) must be at least twice heartbeat_interval ({:?})",
                    config.session_timeout, config.heartbeat_interval
                ),
            ));
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(config.connect_timeout)
            .connect(config.url.as_str())
            .await
            .map_err(|e| {
                error::map(
                    format!(
                        "cannot connect to NATS at {url}; check that nats-server is running \
                         there with JetStream enabled (-js), reachable from this host, and \
                         that the URL's credentials are right"
                    ),
                    e,
                )
                .with_status(courier_core::ErrorStatus::Transient)
            })?;
        // Wait (rather than fail) when many publishes share the connection's ack window.
        let js = jetstream::ContextBuilder::new()
            .backpressure_on_inflight(true)
            .build(client.clone());
        // A raw account-info request: it only has to be answered (async-nats' typed
        // response does not parse older servers' answers).
        client
            .request("$JS.API.INFO", bytes::Bytes::new())
            .await
            .map_err(|e| {
                error::map(
                    format!(
                        "NATS at {url} answers but JetStream is not available; start \
                         nats-server with JetStream enabled (-js) and check the account's \
                         JetStream limits"
                    ),
                    e,
                )
            })?;
        let server_max = client.server_info().max_payload;
        let max_message_bytes = config
            .max_message_bytes
            .min(server_max.saturating_sub(NATS_OVERHEAD));
        Ok(Self {
            inner: Arc::new(Inner {
                js,
                config,
                url,
                max_message_bytes,
                channels: Mutex::new(HashMap::new()),
                leases: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
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

    /// Delete `channel`'s stream with every message and consumer group on it.
    pub async fn delete_channel(&self, channel: &ChannelName) -> Result<()> {
        if let Ok(mut c) = self.inner.channels.lock() {
            c.remove(channel);
        }
        match self.inner.js.delete_stream(names::stream(channel)).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(error::map(format!("deleting channel {channel}"), e)),
        }
    }

    /// The partition count of `channel`, creating it with the default count if missing.
    pub(crate) async fn partitions(&self, channel: &ChannelName) -> Result<u32> {
        if let Some(n) = self
            .inner
            .channels
            .lock()
            .ok()
            .and_then(|c| c.get(channel).copied())
        {
            return Ok(n);
        }
        self.ensure_channel(channel, self.inner.config.default_partitions.max(1))
            .await
    }

    /// The channel's stream (created with `partitions` if missing) and its partition count.
    pub(crate) async fn stream(
        &self,
        channel: &ChannelName,
        partitions: u32,
    ) -> Result<(jetstream::stream::Stream, u32)> {
        let name = names::stream(channel);
        let what = || {
            format!(
                "opening channel {channel} (stream {name}) on NATS at {}",
                self.inner.url
            )
        };
        let stream = match self.inner.js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) if is_not_found(&e) => {
                let cfg = jetstream::stream::Config {
                    name: name.clone(),
                    description: Some(names::description(partitions)),
                    subjects: vec![names::subjects(channel)],
                    storage: StorageType::File,
                    num_replicas: self.inner.config.replicas.max(1),
                    max_age: self.inner.config.stream_max_age.unwrap_or_default(),
                    ..Default::default()
                };
                match self.inner.js.create_stream(cfg).await {
                    Ok(s) => s,
                    // Another process may have created it first: use theirs; otherwise
                    // report why creating failed (e.g. subjects taken by another stream).
                    Err(create) => match self.inner.js.get_stream(&name).await {
                        Ok(s) => s,
                        Err(_) => {
                            return Err(error::map(
                                format!(
                                    "creating channel {channel} (stream {name}, subjects {}) on NATS at {}",
                                    names::subjects(channel),
                                    self.inner.url
                                ),
                                create,
                            ));
                        }
                    },
                }
            }
            Err(e) => return Err(error::map(what(), e)),
        };
        let info = stream.cached_info();
        let n = info
            .config
            .description
            .as_deref()
            .and_then(names::parse_description)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "stream {name} of channel {channel} has no \"partitions=N\" in its \
                         description: it was not created by Courier; delete or rename it"
                    ),
                )
            })?;
        if !info.config.subjects.contains(&names::subjects(channel)) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "stream {name} does not carry subjects {} of channel {channel}: it belongs \
                     to something else; delete or rename it",
                    names::subjects(channel)
                ),
            ));
        }
        if let Ok(mut c) = self.inner.channels.lock() {
            c.insert(channel.clone(), n);
        }
        Ok((stream, n))
    }

    async fn ensure_channel(&self, channel: &ChannelName, partitions: u32) -> Result<u32> {
        Ok(self.stream(channel, partitions).await?.1)
    }

    /// The leases bucket, created on first use; its `max_age` must be the session timeout.
    pub(crate) async fn leases(&self) -> Result<jetstream::kv::Store> {
        let inner = &self.inner;
        inner
            .leases
            .get_or_try_init(|| async {
                let bucket = inner.config.leases_bucket.clone();
                let want = inner.config.session_timeout;
                let what = || format!("opening the leases bucket {bucket} on NATS at {}", inner.url);
                let store = match inner.js.get_key_value(&bucket).await {
                    Ok(s) => s,
                    Err(_) => {
                        // The KV bucket's stream, as async-nats' `create_key_value` makes
                        // it (which cannot parse a 2.9 server's account info).
                        let created = inner
                            .js
                            .create_stream(jetstream::stream::Config {
                                name: format!("KV_{bucket}"),
                                description: Some(
                                    "Courier group memberships and partition leases".to_owned(),
                                ),
                                subjects: vec![format!("$KV.{bucket}.>")],
                                max_messages_per_subject: 1,
                                max_age: want,
                                storage: StorageType::File,
                                allow_rollup: true,
                                deny_delete: true,
                                allow_direct: true,
                                num_replicas: inner.config.replicas.max(1),
                                discard: jetstream::stream::DiscardPolicy::New,
                                ..Default::default()
                            })
                            .await;
                        if let Err(e) = created {
                            tracing::debug!(error = %e, "creating the leases bucket failed; maybe another process did");
                        }
                        match inner.js.get_key_value(&bucket).await {
                            Ok(s) => s,
                            Err(_) => inner
                                .js
                                .get_key_value(&bucket)
                                .await
                                .map_err(|e| error::map(what(), e))?,
                        }
                    }
                };
                let mut stream = inner
                    .js
                    .get_stream(format!("KV_{bucket}"))
                    .await
                    .map_err(|e| error::map(what(), e))?;
                let have = stream
                    .info()
                    .await
                    .map_err(|e| error::map(what(), e))?
                    .config
                    .max_age;
                if have != want {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "leases bucket {bucket} has max_age {have:?} but this process's \
                             session_timeout is {want:?}; every process must use the same \
                             session timeout (or another leases_bucket)"
                        ),
                    ));
                }
                Ok(store)
            })
            .await
            .cloned()
    }

    async fn publish_batch(&self, messages: &[Message]) -> Result<Receipt> {
        let started = std::time::Instant::now();
        // A batch mostly goes to few channels: each destination is parsed, looked up and
        // its subjects named once per batch; a message then refers to its route by index.
        let mut routes: Vec<Route> = Vec::new();
        let mut by_destination: HashMap<&str, usize> = HashMap::new();
        let mut routed = Vec::with_capacity(messages.len());
        for m in messages {
            m.check_size(self.inner.max_message_bytes)?;
            let destination = m.headers.get(courier_core::headers::DESTINATION);
            let r = match destination.and_then(|d| by_destination.get(d)) {
                Some(r) => *r,
                None => {
                    // A new destination, or none (`channel` then says what is missing).
                    let channel = m.channel()?;
                    let partitions = self.partitions(&channel).await?;
                    routes.push(Route {
                        subjects: vec![None; partitions.max(1) as usize],
                        channel,
                        partitions,
                    });
                    if let Some(d) = destination {
                        by_destination.insert(d, routes.len() - 1);
                    }
                    routes.len() - 1
                }
            };
            let route = &mut routes[r];
            let partition = match m.headers.partition_key() {
                Some(k) => partition_for(k, route.partitions),
                None => partition_for(&m.id.to_string(), route.partitions),
            };
            let channel = &route.channel;
            let subject = route.subjects[partition as usize]
                .get_or_insert_with(|| Subject::from(names::subject(channel, partition)))
                .clone();
            routed.push((r, partition, subject, codec::encode(m)?, m));
        }
        // A sliding window: up to PUBLISH_WINDOW publishes in flight, the oldest awaited
        // when it is full, so the server never waits for the relay to collect a whole
        // window. One connection keeps publish order; the bound keeps within the
        // context's in-flight ack limit.
        let mut positions = Vec::with_capacity(routed.len());
        let mut pending = std::collections::VecDeque::with_capacity(PUBLISH_WINDOW);
        for (r, partition, subject, headers, m) in routed {
            if pending.len() == PUBLISH_WINDOW
                && let Some(oldest) = pending.pop_front()
            {
                positions.push(Some(confirmed(&routes, oldest).await?));
            }
            let ack = self
                .inner
                .js
                .send_publish(
                    subject,
                    jetstream::message::PublishMessage::build()
                        .payload(m.payload.clone())
                        .headers(headers),
                )
                .await
                .map_err(|e| {
                    error::map(
                        format!(
                            "publishing message {} to channel {}",
                            m.id, routes[r].channel
                        ),
                        e,
                    )
                })?;
            pending.push_back((r, partition, m.id, ack));
        }
        for p in pending {
            positions.push(Some(confirmed(&routes, p).await?));
        }
        tracing::debug!(messages = messages.len(), elapsed = ?started.elapsed(), "published");
        Ok(Receipt {
            durability: Durability::Written,
            positions,
        })
    }
}

/// Where a batch's messages for one channel go: its partition count and, once named,
/// the subject of each partition.
struct Route {
    channel: ChannelName,
    partitions: u32,
    subjects: Vec<Option<Subject>>,
}

/// Wait for JetStream to confirm one publish: its position.
async fn confirmed(
    routes: &[Route],
    (r, partition, id, ack): (
        usize,
        u32,
        courier_core::MessageId,
        jetstream::context::PublishAckFuture,
    ),
) -> Result<Position> {
    let ack = ack.await.map_err(|e| {
        error::map(
            format!(
                "waiting for JetStream to confirm message {id} on channel {}",
                routes[r].channel
            ),
            e,
        )
    })?;
    Ok(Position {
        partition,
        offset: ack.sequence,
    })
}

/// True when a JetStream API error says "stream not found".
fn is_not_found<K: fmt::Debug + Clone + PartialEq + fmt::Display>(
    e: &async_nats::error::Error<K>,
) -> bool {
    let s = format!("{:?}", e.kind());
    s.contains("10059") || s.contains("NotFound") || s.contains("not found")
}

impl Publisher for NatsTransport {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<Receipt>> {
        Box::pin(async move {
            if messages.is_empty() {
                return Ok(Receipt {
                    durability: Durability::Written,
                    positions: Vec::new(),
                });
            }
            self.publish_batch(messages).await
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Durability::Written, self.inner.max_message_bytes)
            .partitioned()
            .with_consumer_groups()
            .with_delayed_redelivery()
    }
}

impl Subscriber for NatsTransport {
    fn subscribe<'a>(&'a self, options: SubscribeOptions) -> BoxFuture<'a, Result<Subscription>> {
        Box::pin(async move { member::join(self.clone(), options).await })
    }
}

impl From<NatsTransport> for Arc<dyn Publisher> {
    fn from(t: NatsTransport) -> Self {
        Arc::new(t)
    }
}
