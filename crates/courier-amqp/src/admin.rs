//! What operators and `courier channels` / `courier tail` read of a RabbitMQ broker
//! without joining a group: a named channel's partitions and their messages, a named
//! group's members, committed offsets, lock holders and lag, and a group-less follower
//! of a channel.
//!
//! AMQP 0-9-1 has no way to list queues: listing needs the management plugin's HTTP API,
//! which courier-amqp does not use (it speaks AMQP only, and the plugin is often off).
//! So [`AmqpTransport::describe`] describes **named** channels only, with passive
//! declarations (which create nothing), and cannot find a channel's consumer groups
//! either: its [`ChannelInfo::groups`] is empty; [`AmqpTransport::describe_group`]
//! describes a group whose name is known.

use crate::error::{self, code};
use crate::member::offsets::committed;
use crate::{AmqpTransport, MAX_PARTITIONS, codec, names, topology};
use bytes::Bytes;
use courier_core::admin::{ChannelInfo, GroupInfo, GroupPartition, PartitionInfo};
use courier_core::{
    ChannelName, Error, ErrorKind, ErrorStatus, GroupName, Malformed, Message, Position, Result,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, Consumer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Deliveries a tail holds unacknowledged per partition (the AMQP prefetch).
const TAIL_PREFETCH: u16 = 64;
/// Messages a tail buffers between its partition readers and [`AmqpTail::next`].
const TAIL_BUFFER: usize = 256;
/// A stream is taken as read to its end when nothing more came for this long after a
/// delivery.
const QUIET: Duration = Duration::from_millis(250);
/// A stream is taken as empty when its first delivery did not come within this long
/// (and RabbitMQ's message count, a statistic refreshed every few seconds, is 0).
const FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest [`AmqpTransport::describe`] reads one stream's offsets.
const BOUNDS_TIMEOUT: Duration = Duration::from_secs(3);
/// The prefetch of the consumers that read a stream's offsets.
const BOUNDS_PREFETCH: u16 = 1000;
/// Partitions described at once.
const DESCRIBE_CONCURRENCY: usize = 16;

/// One message read by an [`AmqpTail`]: where it is and what it is.
pub type TailRead = (Position, std::result::Result<Message, Malformed>);

/// Where an [`AmqpTail`] starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmqpTailFrom {
    /// Only messages published from now on (`x-stream-offset = next`).
    Latest,
    /// The oldest retained message of every partition (`x-stream-offset = first`).
    Earliest,
    /// After these stream offsets: partition `p` starts after `offsets[p]`; partitions
    /// past the end of the list start at their oldest retained message.
    After(Vec<u64>),
}

/// Follows a channel without joining a group: one stream consumer per partition, none
/// of which commits an offset or takes a partition from a member. Made by
/// [`AmqpTransport::tail`]; stops (and closes its connection) when dropped.
///
/// Courier's internal markers are skipped. Messages of one partition come in offset
/// order; partitions are interleaved as they arrive. The tail does not reconnect: when
/// its connection fails, [`next`](Self::next) returns a transient error, and a new tail
/// can go on [`After`](AmqpTailFrom::After) the positions seen.
pub struct AmqpTail {
    channel: ChannelName,
    partitions: u32,
    rx: mpsc::Receiver<Result<TailRead>>,
}

impl std::fmt::Debug for AmqpTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTail")
            .field("channel", &self.channel)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl AmqpTail {
    /// The channel's partition count.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The next message, or `None` if none arrived within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<TailRead>> {
        match tokio::time::timeout(wait, self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(Some(Ok(read))) => Ok(Some(read)),
            Ok(Some(Err(e))) => Err(e),
            Ok(None) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "following channel {}: every partition reader has stopped",
                    self.channel
                ),
            )),
        }
    }
}

/// One partition's consumer feeding a tail until the tail is dropped or the consumer
/// fails (the error is passed on).
async fn follow(
    mut consumer: Consumer,
    what: String,
    partition: u32,
    start: u64,
    tx: mpsc::Sender<Result<TailRead>>,
) {
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = consumer.next() => next,
        };
        let d = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                let _ = tx
                    .send(Err(error::map(format!("{what}: consuming"), e)))
                    .await;
                return;
            }
            None => {
                let _ = tx
                    .send(Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("{what}: RabbitMQ ended the stream consumer"),
                    )))
                    .await;
                return;
            }
        };
        // Acknowledging a stream delivery only opens the prefetch window: no offset is
        // stored anywhere.
        let offset = codec::stream_offset(&d.properties);
        let skip = codec::marker_of(&d.properties).is_some() || offset.is_none_or(|o| o < start);
        let read = (!skip).then(|| {
            let position = Position {
                partition,
                offset: offset.unwrap_or_default(),
            };
            (position, codec::decode(&d.properties, Bytes::from(d.data)))
        });
        if let Some(read) = read {
            // Waits while the tail's buffer is full: back-pressure up to the prefetch.
            let permit = tokio::select! {
                _ = tx.closed() => return,
                permit = tx.reserve() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            permit.send(Ok(read));
        }
        if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
            let _ = tx
                .send(Err(error::map(format!("{what}: acknowledging"), e)))
                .await;
            return;
        }
    }
}

/// A passive declaration: the queue's message and consumer counts, `None` when it does
/// not exist, `Some((0, 1))` for an exclusive queue held by another connection.
async fn peek(conn: &Connection, queue: &str) -> Result<Option<(u64, u64)>> {
    let ch = topology::open(conn, "probing a queue").await?;
    let r = ch
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    topology::close(&ch).await;
    match r {
        Ok(q) => Ok(Some((
            u64::from(q.message_count()),
            u64::from(q.consumer_count()),
        ))),
        Err(e) if error::is(&e, code::NOT_FOUND) => Ok(None),
        Err(e) if error::is(&e, code::RESOURCE_LOCKED) => Ok(Some((0, 1))),
        Err(e) => Err(error::map(format!("probing queue {queue}"), e)),
    }
}

/// The partition count of an existing `channel` without creating anything: the marker
/// queue's `x-max-length`, which RabbitMQ names when it refuses a redeclaration with
/// another value (0, never a partition count). `None`: no such channel.
async fn partition_count(conn: &Connection, channel: &ChannelName) -> Result<Option<u32>> {
    let meta = names::meta(channel);
    if peek(conn, &meta).await?.is_none() {
        return Ok(None);
    }
    let ch = topology::open(conn, "reading a channel's partition count").await?;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    let r = ch
        .queue_declare(
            ShortString::from(meta.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await;
    match r {
        // Deleted since the probe: this declaration created a marker of 0 partitions;
        // remove it again.
        Ok(_) => {
            let _ = ch
                .queue_delete(
                    ShortString::from(meta.as_str()),
                    QueueDeleteOptions::default(),
                )
                .await;
            topology::close(&ch).await;
            Ok(None)
        }
        Err(e) if error::is(&e, code::PRECONDITION_FAILED) => {
            let text = error::reply(&e).map(|(_, t)| t).unwrap_or_default();
            match topology::parse_current(&text) {
                Some(n) if (1..=MAX_PARTITIONS).contains(&n) => Ok(Some(n)),
                _ => Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "channel {channel}: the queue {meta} is not a Courier channel's \
                         partition-count marker ({text})"
                    ),
                )),
            }
        }
        Err(e) => Err(error::map(
            format!("reading the partition count of channel {channel} ({meta})"),
            e,
        )),
    }
}

/// The first and last offsets of a stream (`None`: empty). AMQP has no call for them
/// (and the message count of a stream's `queue.declare-ok` is a statistic refreshed
/// every few seconds), so they are read: the last offset is the highest one delivered
/// from the stream's last chunk (`x-stream-offset = last`) before the stream stays
/// quiet for [`QUIET`] (or [`BOUNDS_TIMEOUT`] passed, under a steady flow of
/// publishes), the first one is the first delivery from `first`. A stream is empty when
/// nothing came within [`FIRST_WAIT`], or [`BOUNDS_TIMEOUT`] when RabbitMQ's (lagging)
/// statistic `counted` says it holds messages. Nothing is committed or written.
async fn stream_bounds(
    conn: &Connection,
    stream: &str,
    counted: u64,
) -> Result<Option<(u64, u64)>> {
    let first_wait = if counted > 0 {
        BOUNDS_TIMEOUT
    } else {
        FIRST_WAIT
    };
    let Some(head) = read_offsets(conn, stream, "last", false, first_wait).await? else {
        return Ok(None);
    };
    let first = read_offsets(conn, stream, "first", true, BOUNDS_TIMEOUT).await?;
    Ok(Some((first.unwrap_or(head).min(head), head)))
}

/// The highest offset delivered from `spec` until the stream is quiet (or, with
/// `first_only`, the first offset delivered).
async fn read_offsets(
    conn: &Connection,
    stream: &str,
    spec: &str,
    first_only: bool,
    first_wait: Duration,
) -> Result<Option<u64>> {
    let ch = topology::open(conn, "reading a stream's offsets").await?;
    // Outlives the channel's close (see `topology::close_consumed`).
    let mut started = None;
    let r = async {
        ch.basic_qos(BOUNDS_PREFETCH, BasicQosOptions::default())
            .await
            .map_err(|e| error::map(format!("{stream}: setting the prefetch"), e))?;
        let consumer = started.insert(
            ch.basic_consume(
                ShortString::from(stream),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                stream_offset_arg(AMQPValue::LongString(spec.into())),
            )
            .await
            .map_err(|e| error::map(format!("consuming {stream}"), e))?,
        );
        let deadline = tokio::time::Instant::now() + BOUNDS_TIMEOUT;
        let mut highest = None;
        loop {
            let quiet = if highest.is_some() { QUIET } else { first_wait };
            let wait = quiet.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let d = match tokio::time::timeout(wait, consumer.next()).await {
                Err(_) => break,
                Ok(Some(Ok(d))) => d,
                Ok(Some(Err(e))) => return Err(error::map(format!("consuming {stream}"), e)),
                Ok(None) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("{stream}: RabbitMQ ended the consumer"),
                    ));
                }
            };
            if let Some(o) = codec::stream_offset(&d.properties) {
                highest = Some(highest.map_or(o, |h: u64| h.max(o)));
                if first_only {
                    break;
                }
            }
            d.acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| error::map(format!("{stream}: acknowledging"), e))?;
        }
        Ok(highest)
    }
    .await;
    topology::close_consumed(&ch, started).await;
    r
}

fn stream_offset_arg(value: AMQPValue) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), value);
    args
}

impl AmqpTransport {
    /// Describe the channel named `only`: its partitions, their messages and newest
    /// offsets. Its consumer groups cannot be found over AMQP (see
    /// [`describe_group`](Self::describe_group)), so `groups` is empty. An unknown
    /// channel gives an empty list; nothing is created.
    ///
    /// `only = None` is an error: RabbitMQ lists queues only through its management
    /// plugin's HTTP API, which this transport does not use.
    ///
    /// A partition's `messages` is the span of offsets its stream retains (last minus
    /// first plus one), which includes the markers Courier writes when a consumer group
    /// starts at a partition's end (one per group and partition); `head` is its last
    /// offset. RabbitMQ tells neither over AMQP, so both are read from the stream (see
    /// the crate docs): a describe takes at least a quarter of a second.
    pub async fn describe(&self, only: Option<&str>) -> Result<Vec<ChannelInfo>> {
        let Some(name) = only else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "cannot list the channels of a RabbitMQ broker: AMQP 0-9-1 cannot list \
                 queues (only the management plugin's HTTP API can, and courier-amqp speaks \
                 AMQP only); name the channel (`courier channels --channel NAME`), or run \
                 `rabbitmqctl list_queues name messages consumers` on the broker's host: \
                 Courier's streams are named courier:<channel>:p<N>",
            )
            .with_status(ErrorStatus::Permanent));
        };
        let channel = ChannelName::new(name)?;
        let conn = self.connection().await?;
        Ok(self
            .describe_channel(&conn, &channel)
            .await?
            .into_iter()
            .collect())
    }

    async fn describe_channel(
        &self,
        conn: &Connection,
        channel: &ChannelName,
    ) -> Result<Option<ChannelInfo>> {
        // A count this process already knows needs no probe (the probe's refused
        // redeclaration closes an AMQP channel, which lapin logs as an error).
        let known = match self.inner.cached(channel) {
            Some(n) => peek(conn, &names::meta(channel)).await?.map(|_| n),
            None => None,
        };
        let partitions = match known {
            Some(n) => n,
            None => {
                // The probe's refused redeclaration makes RabbitMQ close that AMQP
                // channel. It runs on a connection of its own: on the shared one, the
                // closing channel's number could be handed to one of the reads below
                // before RabbitMQ has finished closing it, and RabbitMQ then closes the
                // whole connection ("expected 'channel.open'").
                let probe = topology::connect(&self.inner.config, "probing a channel").await?;
                let n = partition_count(&probe, channel).await;
                let _ = probe.close(200, ShortString::from("bye")).await;
                match n? {
                    Some(n) => n,
                    None => return Ok(None),
                }
            }
        };
        let partition_info: Vec<PartitionInfo> = futures::stream::iter(0..partitions)
            .map(|p| async move {
                let stream = names::stream(channel, p);
                let Some((counted, _)) = peek(conn, &stream).await? else {
                    return Err(Error::new(
                        ErrorKind::Storage,
                        format!(
                            "channel {channel} has {partitions} partitions but its stream \
                             {stream} is missing (deleted by hand?)"
                        ),
                    ));
                };
                // Errors name the stream, courier:<channel>:p<partition>.
                let bounds = stream_bounds(conn, &stream, counted).await?;
                Ok(match bounds {
                    None => PartitionInfo {
                        partition: p,
                        messages: 0,
                        head: 0,
                    },
                    Some((first, head)) => PartitionInfo {
                        partition: p,
                        messages: head - first + 1,
                        head,
                    },
                })
            })
            .buffered(DESCRIBE_CONCURRENCY)
            .collect::<Vec<Result<PartitionInfo>>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        Ok(Some(ChannelInfo {
            channel: channel.to_string(),
            partitions,
            messages: partition_info.iter().map(|p| p.messages).sum(),
            partition_info,
            groups: Vec::new(),
        }))
    }

    /// Describe consumer group `group` of `channel` (groups cannot be listed over AMQP:
    /// the name must be known): its live members (the consumers of its members queue),
    /// per partition the committed offset (the group resumes after it), whether a live
    /// member holds the partition's lock (`owner`: the lock queue's name; RabbitMQ does
    /// not say which member holds it) and the lag (the partition's head minus the
    /// committed offset, counting Courier's markers too). `generation` is always 0:
    /// locks have none. `None`: no such channel or group.
    pub async fn describe_group(
        &self,
        channel: &ChannelName,
        group: &GroupName,
    ) -> Result<Option<GroupInfo>> {
        names::group_queues(channel, group, 1, 1)?;
        let conn = self.connection().await?;
        let Some(info) = self.describe_channel(&conn, channel).await? else {
            return Ok(None);
        };
        let members = peek(&conn, &names::members(channel, group)?).await?;
        let mut parts = Vec::new();
        let mut known = members.is_some();
        for p in &info.partition_info {
            let offset_queue = names::offset(channel, group, p.partition)?;
            let committed = match peek(&conn, &offset_queue).await? {
                None => None,
                Some(_) => {
                    known = true;
                    let ch = topology::open(&conn, "reading a committed offset").await?;
                    let c = committed(&ch, &offset_queue).await;
                    topology::close(&ch).await;
                    c?
                }
            };
            let lock = names::lock(channel, group, p.partition)?;
            let owner = peek(&conn, &lock).await?.map(|_| lock);
            let lag = match committed {
                Some(c) => p.head.saturating_sub(c),
                // Not started: a new group starts at the end.
                None => 0,
            };
            parts.push(GroupPartition {
                partition: p.partition,
                committed: committed.unwrap_or_default(),
                owner,
                generation: 0,
                lag,
            });
        }
        if !known {
            return Ok(None);
        }
        Ok(Some(GroupInfo {
            group: group.to_string(),
            members: members.map_or(0, |(_, consumers)| consumers),
            lag: parts.iter().map(|p| p.lag).sum(),
            partitions: parts,
        }))
    }

    /// Follow `channel` from `from` without joining a group (what `courier tail` does),
    /// over a connection of its own. A missing channel is created with the default
    /// partition count, as a publish would.
    pub async fn tail(&self, channel: &ChannelName, from: AmqpTailFrom) -> Result<AmqpTail> {
        let shared = self.connection().await?;
        let partitions = self.inner.partitions(&shared, channel).await?;
        let conn =
            Arc::new(topology::connect(&self.inner.config, &format!("tail of {channel}")).await?);
        let (tx, rx) = mpsc::channel(TAIL_BUFFER);
        let mut readers = Vec::new();
        for p in 0..partitions {
            let (arg, start) = match &from {
                AmqpTailFrom::Latest => (AMQPValue::LongString("next".into()), 0),
                AmqpTailFrom::Earliest => (AMQPValue::LongString("first".into()), 0),
                AmqpTailFrom::After(offsets) => match offsets.get(p as usize) {
                    Some(&o) => {
                        let start = o.saturating_add(1);
                        (
                            AMQPValue::LongLongInt(i64::try_from(start).unwrap_or(i64::MAX)),
                            start,
                        )
                    }
                    None => (AMQPValue::LongString("first".into()), 0),
                },
            };
            let stream = names::stream(channel, p);
            let what = format!("following channel {channel} partition {p}");
            let consumer = async {
                let ch = topology::open(&conn, &what).await?;
                ch.basic_qos(TAIL_PREFETCH, BasicQosOptions::default())
                    .await
                    .map_err(|e| error::map(format!("{what}: setting the prefetch"), e))?;
                ch.basic_consume(
                    ShortString::from(stream.as_str()),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    stream_offset_arg(arg),
                )
                .await
                .map_err(|e| error::map(format!("{what}: consuming stream {stream}"), e))
            }
            .await;
            match consumer {
                Ok(c) => readers.push(follow(c, what, p, start, tx.clone())),
                Err(e) => {
                    let _ = conn.close(200, ShortString::from("bye")).await;
                    return Err(e);
                }
            }
        }
        drop(tx);
        tokio::spawn(async move {
            futures::future::join_all(readers).await;
            let _ = conn.close(200, ShortString::from("bye")).await;
        });
        Ok(AmqpTail {
            channel: channel.clone(),
            partitions,
            rx,
        })
    }
}
