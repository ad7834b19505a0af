//! Delayed redelivery on the broker: a nacked message is published (confirmed) to the
//! group's delay queue of the right bucket, whose queue TTL dead-letters it into the
//! group's retry queue after the delay; every member consumes the retry queue.
//! Only then is the original acknowledged, so the message is never only in memory.

use crate::error;
use crate::{codec, names, topology};
use bytes::Bytes;
use courier_core::transport::BoxFuture;
use courier_core::{
    Acker, ChannelName, Delivery, Error, ErrorKind, GroupName, Message, Position, Result,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Where a group's nacked messages wait and come back.
#[derive(Debug, Clone)]
pub(crate) struct RetryQueues {
    pub(crate) channel: ChannelName,
    pub(crate) group: GroupName,
    pub(crate) retry: String,
}

impl RetryQueues {
    pub(crate) fn new(channel: &ChannelName, group: &GroupName) -> Result<Self> {
        Ok(Self {
            channel: channel.clone(),
            group: group.clone(),
            retry: names::retry(channel, group)?,
        })
    }

    /// Publish `message` (confirmed) so that it reaches the retry queue after `delay`.
    pub(crate) async fn schedule(
        &self,
        ch: &Channel,
        message: &Message,
        from: Option<Position>,
        redeliveries: u32,
        delay: Duration,
    ) -> Result<()> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let target = match names::bucket_for(delay_ms) {
            None => self.retry.clone(),
            Some(bucket) => {
                let q = names::delay(&self.channel, &self.group, bucket)?;
                let mut args = FieldTable::default();
                args.insert(
                    "x-message-ttl".into(),
                    AMQPValue::LongLongInt(i64::try_from(bucket).unwrap_or(i64::MAX)),
                );
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString("".into()),
                );
                args.insert(
                    "x-dead-letter-routing-key".into(),
                    AMQPValue::LongString(self.retry.as_str().into()),
                );
                ch.queue_declare(ShortString::from(q.as_str()), durable(), args)
                    .await
                    .map_err(|e| error::map(format!("declaring the delay queue {q}"), e))?;
                q
            }
        };
        let (partition, offset) = from.map_or((0, 0), |p| (p.partition, p.offset));
        let props = codec::retried(message, partition, offset, redeliveries)?;
        let what = || {
            format!(
                "scheduling message {} for redelivery via {target}",
                message.id
            )
        };
        let confirm = ch
            .basic_publish(
                ShortString::from(""),
                ShortString::from(target.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.payload,
                props,
            )
            .await
            .map_err(|e| error::map(what(), e))?;
        match confirm.await {
            Ok(lapin::Confirmation::Ack(None)) => Ok(()),
            Ok(_) => Err(Error::new(
                ErrorKind::Storage,
                format!("RabbitMQ refused {}", what()),
            )),
            Err(e) => Err(error::map(what(), e)),
        }
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Consume the group's retry queue into the subscription until `stop` fires or the
/// connection is lost; a failure on a live connection is retried every `pause`.
pub(crate) async fn run(
    conn: Arc<Connection>,
    queues: RetryQueues,
    prefetch: u16,
    tx: mpsc::Sender<Delivery>,
    mut stop: oneshot::Receiver<()>,
    pause: Duration,
) -> Result<()> {
    loop {
        match pump(&conn, queues.clone(), prefetch, tx.clone(), &mut stop).await {
            Ok(()) => return Ok(()),
            Err(e) if !conn.status().connected() => return Err(e),
            Err(e) => {
                tracing::warn!(queue = %queues.retry, error = %e,
                    "consuming the retry queue failed; retrying");
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Consume the group's retry queue into the subscription until `stop` fires.
async fn pump(
    conn: &Connection,
    queues: RetryQueues,
    prefetch: u16,
    tx: mpsc::Sender<Delivery>,
    stop: &mut oneshot::Receiver<()>,
) -> Result<()> {
    let what = format!("the retry queue {}", queues.retry);
    let ch = topology::open(conn, "consuming retries").await?;
    // Outlives the channel's close (see `topology::close_consumed`).
    let mut started = None;
    let r = async {
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| error::map(format!("{what}: setting the prefetch"), e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| error::map(format!("{what}: enabling confirms"), e))?;
        ch.queue_declare(
            ShortString::from(queues.retry.as_str()),
            durable(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| error::map(format!("declaring {what}"), e))?;
        let consumer = started.insert(
            ch.basic_consume(
                ShortString::from(queues.retry.as_str()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| error::map(format!("consuming {what}"), e))?,
        );
        let queues = Arc::new(queues);
        loop {
            let d = tokio::select! {
                _ = &mut *stop => return Ok(()),
                d = consumer.next() => match d {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(error::map(format!("consuming {what}"), e)),
                    None => return Ok(()),
                },
            };
            let position = match (
                codec::internal_int(&d.properties, codec::PARTITION),
                codec::internal_int(&d.properties, codec::OFFSET),
            ) {
                (Some(p), Some(offset)) => u32::try_from(p)
                    .ok()
                    .map(|partition| Position { partition, offset }),
                _ => None,
            };
            let redeliveries = codec::internal_int(&d.properties, codec::REDELIVERIES)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(1);
            let message = codec::decode(&d.properties, Bytes::from(d.data)).map(|mut m| {
                codec::strip_dead_letter_headers(&mut m);
                m
            });
            let delivery = Delivery::new(
                message.clone(),
                queues.channel.clone(),
                position,
                redeliveries,
                Box::new(RetryAcker {
                    amqp: d.acker,
                    ch: ch.clone(),
                    queues: queues.clone(),
                    message: message.ok(),
                    position,
                    redeliveries,
                    settled: false,
                }),
            );
            tokio::select! {
                _ = &mut *stop => return Ok(()),
                sent = tx.send(delivery) => if sent.is_err() { return Ok(()) },
            }
        }
    }
    .await;
    topology::close_consumed(&ch, started).await;
    r
}

/// Settles a delivery that came through the retry queue.
struct RetryAcker {
    amqp: lapin::Acker,
    ch: Channel,
    queues: Arc<RetryQueues>,
    message: Option<Message>,
    position: Option<Position>,
    redeliveries: u32,
    settled: bool,
}

impl Acker for RetryAcker {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        self.settled = true;
        Box::pin(async move {
            self.amqp
                .ack(BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(|e| {
                    error::map(
                        format!("acking a retried message of {}", self.queues.retry),
                        e,
                    )
                })
        })
    }

    fn nack(mut self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<()>> {
        self.settled = true;
        Box::pin(async move {
            let Some(m) = &self.message else {
                // Not a Courier message: back to the retry queue as it is.
                return self
                    .amqp
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| error::map("requeueing a malformed retried message", e));
            };
            let next = self.redeliveries.saturating_add(1);
            self.queues
                .schedule(&self.ch, m, self.position, next, delay)
                .await?;
            self.amqp
                .ack(BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(|e| {
                    error::map(
                        format!("acking a retried message of {}", self.queues.retry),
                        e,
                    )
                })
        })
    }
}

impl Drop for RetryAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Dropped unsettled: back to the retry queue.
        let amqp = self.amqp.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = amqp
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await;
            });
        }
    }
}
