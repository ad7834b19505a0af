//! The two transport traits, [`Publisher`] and [`Subscriber`], and what flows through them.
//!
//! A backend says what it can do in [`Capabilities`] instead of panicking, and says what
//! a publish confirmation means in [`Durability`].

use crate::error::Result;
use crate::message::Message;
use crate::names::{ChannelName, GroupName};
use bytes::Bytes;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;

/// A boxed, sendable future (keeps the transport traits object safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a publish confirmation promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Flushed to stable storage (fsync): survives a power cut.
    Synced,
    /// Written to the broker's storage: survives any process crash, a power cut may lose
    /// the last confirmations (SQLite WAL with `synchronous=NORMAL`, NATS' default PubAck).
    Written,
    /// Held in memory only.
    Memory,
}

/// What a transport can do; the conformance suite picks its tests from these flags.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Channels have several partitions picked by `partition-key`.
    pub partitions: bool,
    /// Messages with one key are delivered in publish order.
    pub ordered_per_key: bool,
    /// Several consumer groups each see every message.
    pub consumer_groups: bool,
    /// `nack` with a delay redelivers later without the consumer holding a timer.
    pub delayed_redelivery: bool,
    /// What a confirmation means.
    pub durability: Durability,
    /// Largest message the transport accepts (payload + headers).
    pub max_message_bytes: usize,
}

impl Capabilities {
    /// A transport that promises `durability` and accepts messages up to
    /// `max_message_bytes`, with no other capability; add them with the setters.
    pub fn new(durability: Durability, max_message_bytes: usize) -> Self {
        Self {
            partitions: false,
            ordered_per_key: false,
            consumer_groups: false,
            delayed_redelivery: false,
            durability,
            max_message_bytes,
        }
    }

    /// Partitioned by key, in order per key.
    pub fn partitioned(mut self) -> Self {
        self.partitions = true;
        self.ordered_per_key = true;
        self
    }

    /// Several consumer groups each see every message.
    pub fn with_consumer_groups(mut self) -> Self {
        self.consumer_groups = true;
        self
    }

    /// `nack` with a delay is supported by the transport.
    pub fn with_delayed_redelivery(mut self) -> Self {
        self.delayed_redelivery = true;
        self
    }
}

/// Where a message landed in a partitioned log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The partition.
    pub partition: u32,
    /// The offset in that partition (increasing, not necessarily dense).
    pub offset: u64,
}

/// The broker's confirmation of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// What this confirmation promises.
    pub durability: Durability,
    /// Where each message landed, in input order (`None` where the backend has no offsets).
    pub positions: Vec<Option<Position>>,
}

/// Hands messages to a broker.
pub trait Publisher: Send + Sync {
    /// Publish a batch; each message's `destination` header names its channel. Resolves
    /// when the broker has them as [`Receipt::durability`] says, in order per channel.
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<Receipt>>;

    /// What this transport can do.
    fn capabilities(&self) -> Capabilities;
}

impl<T: Publisher + ?Sized> Publisher for std::sync::Arc<T> {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<Receipt>> {
        (**self).publish(messages)
    }

    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// From the oldest retained message.
    #[default]
    Earliest,
    /// Only messages published after the group was created.
    Latest,
}

/// What to subscribe to.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// The channel.
    pub channel: ChannelName,
    /// The consumer group: members compete, groups fan out.
    pub group: GroupName,
    /// Where a new group starts.
    pub start: StartFrom,
    /// How many deliveries may wait in the subscription's buffer (back-pressure bound).
    pub buffer: usize,
}

impl SubscribeOptions {
    /// Subscribe `group` to `channel`, starting at the earliest message, buffering 256.
    pub fn new(channel: ChannelName, group: GroupName) -> Self {
        Self {
            channel,
            group,
            start: StartFrom::Earliest,
            buffer: 256,
        }
    }

    /// Where a new group starts.
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// The buffer bound.
    pub fn buffer(mut self, buffer: usize) -> Self {
        self.buffer = buffer.max(1);
        self
    }
}

/// Receives deliveries for a channel and consumer group.
pub trait Subscriber: Send + Sync {
    /// Join `options.group` on `options.channel`. Partitions are shared among the group's
    /// live members; the subscription yields deliveries of the partitions this member owns.
    fn subscribe<'a>(&'a self, options: SubscribeOptions) -> BoxFuture<'a, Result<Subscription>>;
}

/// A stored message that is not a valid Courier message (bad headers, bad id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// The id as stored, if any.
    pub raw_id: String,
    /// The headers as stored.
    pub raw_headers: String,
    /// The payload as stored.
    pub payload: Bytes,
    /// What is wrong.
    pub reason: String,
}

/// Settles a delivery with the broker. Implemented by transports.
pub trait Acker: Send + Sync {
    /// Done: never deliver again to this group.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>>;
    /// Not done: deliver again after `delay`.
    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<()>>;
}

/// One message delivered to one member of a group.
pub struct Delivery {
    /// The message, or what was stored when it is not a valid message.
    pub message: std::result::Result<Message, Malformed>,
    /// The channel it came from.
    pub channel: ChannelName,
    /// Where it sits in the channel.
    pub position: Option<Position>,
    /// How many times this member delivered it before (0 the first time).
    pub redeliveries: u32,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery; transports build these.
    pub fn new(
        message: std::result::Result<Message, Malformed>,
        channel: ChannelName,
        position: Option<Position>,
        redeliveries: u32,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self {
            message,
            channel,
            position,
            redeliveries,
            acker,
        }
    }

    /// Acknowledge: the group is done with this message.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Ask for redelivery after `delay`; later messages with other keys keep flowing.
    pub async fn nack(self, delay: Duration) -> Result<()> {
        self.acker.nack(delay).await
    }

    /// The partition key, if the message is valid and has one.
    pub fn key(&self) -> Option<&str> {
        self.message
            .as_ref()
            .ok()
            .and_then(|m| m.headers.partition_key())
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("channel", &self.channel)
            .field("position", &self.position)
            .field("redeliveries", &self.redeliveries)
            .finish_non_exhaustive()
    }
}

/// A live membership in a consumer group: a bounded stream of deliveries. Dropping it
/// leaves the group (the partitions go to the remaining members).
pub struct Subscription {
    rx: mpsc::Receiver<Delivery>,
    _membership: Box<dyn Send + Sync>,
}

impl Subscription {
    /// Wrap a receiver; `membership` is dropped with the subscription (stops its tasks).
    pub fn new(rx: mpsc::Receiver<Delivery>, membership: Box<dyn Send + Sync>) -> Self {
        Self {
            rx,
            _membership: membership,
        }
    }

    /// The next delivery; `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// A delivery if one is waiting now.
    pub fn try_next(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// One subscription over several (e.g. a service's command channel, its reply
    /// channel and the event channels it follows), so one dispatcher handles them all.
    /// It ends when all of them end; dropping it leaves every group. Needs a tokio
    /// runtime.
    pub fn merge(subscriptions: Vec<Subscription>) -> Subscription {
        let (tx, rx) = mpsc::channel(16);
        let tasks = subscriptions
            .into_iter()
            .map(|mut sub| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(d) = sub.next().await {
                        if tx.send(d).await.is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        Subscription::new(rx, Box::new(AbortOnDrop(tasks)))
    }
}

/// Stops the forwarding tasks of a merged subscription (and so drops the inner ones).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}
