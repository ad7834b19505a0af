//! `--broker URL`: the broker behind a command, whatever its backend.

use super::common::{Access, open_broker, redact};
use anyhow::{Context, Result, bail};
use courier::amqp::{AmqpTailFrom, AmqpTransport};
use courier::core::admin::ChannelInfo;
use courier::core::{ChannelName, Malformed, Message, Position, Publisher, Subscriber};
use courier::nats::NatsTransport;
use courier::nats::TailFrom;
use courier::postgres::PgBroker;
use courier::sqlite::SqliteBroker;
use std::sync::Arc;
use std::time::Duration;

/// How long a NATS or RabbitMQ tail read waits for a first message.
const FOLLOWER_WAIT: Duration = Duration::from_millis(250);

/// A broker of any backend this build has.
#[derive(Debug, Clone)]
pub(crate) enum Broker {
    /// The embedded broker in a SQLite file.
    Sqlite(SqliteBroker),
    /// NATS JetStream.
    Nats(NatsTransport),
    /// PostgreSQL as a broker (tables in the URL's current schema).
    Postgres(PgBroker),
    /// RabbitMQ (a stream per partition).
    Amqp(AmqpTransport),
}

/// Where `courier tail` is in a channel.
#[derive(Debug)]
pub(crate) enum Cursor {
    /// The embedded broker: one position across partitions.
    Global(u64),
    /// One offset per partition (index = partition).
    PerPartition(Vec<u64>),
    /// A NATS follower (an ordered, ephemeral consumer) and the last position seen.
    Nats(Box<courier::nats::NatsTail>, Option<u64>),
    /// A RabbitMQ follower (a group-less consumer per partition stream).
    Amqp(Box<courier::amqp::AmqpTail>),
}

/// Wake-ups for new messages, for `courier tail`.
pub(crate) enum Changes {
    Sqlite(courier::sqlite::Changes),
    Postgres(courier::postgres::PgBrokerChanges),
    /// Reads wait for messages themselves.
    Never,
}

impl Changes {
    /// Resolves when something may have been published since this was taken (or the
    /// last call).
    pub(crate) async fn changed(&mut self) {
        match self {
            Self::Sqlite(c) => c.changed().await,
            Self::Postgres(c) => c.changed().await,
            Self::Never => {}
        }
    }
}

/// One message read by `courier tail`.
pub(crate) type Read = (Position, std::result::Result<Message, Malformed>);

/// The lower-case scheme of `url` (`sqlite` for `sqlite:PATH`).
pub(crate) fn scheme(url: &str) -> String {
    url.split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default()
}

impl Broker {
    /// Open the broker named by `url` (a `--broker` value).
    pub(crate) async fn open(url: &str, access: Access) -> Result<Self> {
        match scheme(url).as_str() {
            "nats" => Ok(Self::Nats(
                NatsTransport::connect(url)
                    .await
                    .context("cannot connect to the NATS broker")?,
            )),
            "amqp" | "amqps" => Ok(Self::Amqp(
                AmqpTransport::connect(url)
                    .await
                    .context("cannot connect to the RabbitMQ broker")?,
            )),
            "postgres" | "postgresql" => Ok(Self::Postgres(
                PgBroker::connect(url)
                    .await
                    .context("cannot open the PostgreSQL broker")?,
            )),
            _ => Ok(Self::Sqlite(open_broker(url, access).await?)),
        }
    }

    /// The file path, or the URL without its password.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Sqlite(b) => b.path().display().to_string(),
            Self::Nats(t) => redact(&t.config().url),
            Self::Postgres(b) => redact(&b.config().url),
            Self::Amqp(t) => redact(&t.config().url),
        }
    }

    /// The broker as a publisher.
    pub(crate) fn publisher(&self) -> Arc<dyn Publisher> {
        match self {
            Self::Sqlite(b) => Arc::new(b.clone()),
            Self::Nats(t) => Arc::new(t.clone()),
            Self::Postgres(b) => Arc::new(b.clone()),
            Self::Amqp(t) => Arc::new(t.clone()),
        }
    }

    /// The broker as a subscriber (one group member per subscription).
    pub(crate) fn subscriber(&self) -> Arc<dyn Subscriber> {
        match self {
            Self::Sqlite(b) => Arc::new(b.clone()),
            Self::Nats(t) => Arc::new(t.clone()),
            Self::Postgres(b) => Arc::new(b.clone()),
            Self::Amqp(t) => Arc::new(t.clone()),
        }
    }

    /// Create `channel` with `partitions` partitions (an existing channel keeps its own).
    pub(crate) async fn create_channel(
        &self,
        channel: &ChannelName,
        partitions: u32,
    ) -> courier::Result<()> {
        match self {
            Self::Sqlite(b) => b.create_channel(channel, partitions).await,
            Self::Nats(t) => t.create_channel(channel, partitions).await,
            Self::Postgres(b) => b.create_channel(channel, partitions).await,
            Self::Amqp(t) => t.create_channel(channel, partitions).await,
        }
    }

    /// Remove what consumer `group` left on `channel` (its progress and helper queues)
    /// where the backend keeps that apart from the channel; elsewhere nothing to do.
    pub(crate) async fn delete_group(
        &self,
        channel: &ChannelName,
        group: &courier::core::GroupName,
    ) -> courier::Result<()> {
        match self {
            Self::Amqp(t) => t.delete_group(channel, group).await,
            Self::Sqlite(_) | Self::Nats(_) | Self::Postgres(_) => Ok(()),
        }
    }

    /// Remove `channel` and what it stores, where the backend can (the embedded broker
    /// keeps it: its file is the user's).
    pub(crate) async fn delete_channel(&self, channel: &ChannelName) -> courier::Result<()> {
        match self {
            Self::Sqlite(_) | Self::Postgres(_) => Ok(()),
            Self::Nats(t) => t.delete_channel(channel).await,
            Self::Amqp(t) => t.delete_channel(channel).await,
        }
    }

    /// Channels, partitions, groups, owners and lag (`courier channels`).
    pub(crate) async fn describe_channels(&self, only: Option<&str>) -> Result<Vec<ChannelInfo>> {
        let what = || format!("cannot describe the channels of {}", self.describe());
        match self {
            Self::Sqlite(b) => b.describe(only).await.with_context(what),
            Self::Postgres(b) => b.describe(only).await.with_context(what),
            Self::Nats(t) => t.describe(only).await.with_context(what),
            // Named channels only: AMQP cannot list queues (the error says so).
            Self::Amqp(t) => t.describe(only).await.with_context(what),
        }
    }

    /// Where a tail of `channel` starts: its current end, or its oldest retained message.
    pub(crate) async fn tail_start(
        &self,
        channel: &ChannelName,
        from_beginning: bool,
    ) -> Result<Cursor> {
        match self {
            Self::Sqlite(b) => Ok(Cursor::Global(if from_beginning {
                0
            } else {
                b.head(channel).await?
            })),
            Self::Postgres(b) => Ok(Cursor::PerPartition(if from_beginning {
                Vec::new()
            } else {
                b.heads(channel).await?
            })),
            Self::Nats(t) => {
                let from = if from_beginning {
                    TailFrom::Earliest
                } else {
                    TailFrom::Latest
                };
                Ok(Cursor::Nats(Box::new(t.tail(channel, from).await?), None))
            }
            Self::Amqp(t) => {
                let from = if from_beginning {
                    AmqpTailFrom::Earliest
                } else {
                    AmqpTailFrom::Latest
                };
                Ok(Cursor::Amqp(Box::new(t.tail(channel, from).await?)))
            }
        }
    }

    /// Wake-ups for new messages on `channel`; take them BEFORE reading.
    pub(crate) fn tail_changes(&self, channel: &ChannelName) -> Changes {
        match self {
            Self::Sqlite(b) => Changes::Sqlite(b.changes()),
            Self::Postgres(b) => Changes::Postgres(b.changes(channel)),
            // The NATS and RabbitMQ followers wait in `tail_read` themselves.
            Self::Nats(_) | Self::Amqp(_) => Changes::Never,
        }
    }

    /// Up to `limit` messages after `cursor`, advancing it past what is returned.
    pub(crate) async fn tail_read(
        &self,
        channel: &ChannelName,
        cursor: &mut Cursor,
        limit: u32,
    ) -> Result<Vec<Read>> {
        match (self, cursor) {
            (Self::Sqlite(b), Cursor::Global(after)) => {
                let batch = b.read_after(channel, *after, limit).await?;
                if let Some((p, _)) = batch.last() {
                    *after = p.offset;
                }
                Ok(batch)
            }
            (Self::Postgres(b), Cursor::PerPartition(after)) => {
                let batch = b.read_after(channel, after, limit).await?;
                for (p, _) in &batch {
                    let i = p.partition as usize;
                    if after.len() <= i {
                        after.resize(i + 1, 0);
                    }
                    after[i] = after[i].max(p.offset);
                }
                Ok(batch)
            }
            (Self::Nats(_), Cursor::Nats(tail, last)) => {
                let mut batch = Vec::new();
                // Wait a little for the first message, then take what is there.
                let mut wait = FOLLOWER_WAIT;
                while batch.len() < limit as usize {
                    let Some(read) = tail.next(wait).await? else {
                        break;
                    };
                    // The ordered consumer may redeliver after a reconnect: skip what
                    // was printed already.
                    if last.is_some_and(|l| read.0.offset <= l) {
                        continue;
                    }
                    *last = Some(read.0.offset);
                    batch.push(read);
                    wait = Duration::from_millis(1);
                }
                Ok(batch)
            }
            (Self::Amqp(_), Cursor::Amqp(tail)) => {
                let mut batch = Vec::new();
                // Wait a little for the first message, then take what is there. The
                // follower never redelivers: no positions to skip.
                let mut wait = FOLLOWER_WAIT;
                while batch.len() < limit as usize {
                    let Some(read) = tail.next(wait).await? else {
                        break;
                    };
                    batch.push(read);
                    wait = Duration::from_millis(1);
                }
                Ok(batch)
            }
            _ => bail!("internal error: a tail cursor of another broker"),
        }
    }
}
