//! One owned partition: reads its stream from the group's committed offset, hands
//! deliveries to the subscription in order, tracks the ack floor and commits it, and on
//! hand-over waits until every delivery is settled before committing and unlocking.

use super::acker::Settle;
use super::offsets::{committed, declare_offset_queue};
use super::progress::Progress;
use super::retry::RetryQueues;
use crate::error::{self, code};
use crate::{codec, topology};
use bytes::Bytes;
use courier_core::{ChannelName, Delivery, Error, ErrorKind, Result};
use futures::StreamExt;
use lapin::Connection;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// What a partition reader needs.
pub(crate) struct Reader {
    pub(crate) conn: Arc<Connection>,
    pub(crate) channel: ChannelName,
    pub(crate) partition: u32,
    pub(crate) stream: String,
    pub(crate) lock: String,
    pub(crate) offset_queue: String,
    pub(crate) prefetch: u16,
    pub(crate) tx: mpsc::Sender<Delivery>,
    pub(crate) retry: RetryQueues,
}

impl Reader {
    /// Run until `stop` fires (then hand over cleanly) or the connection fails. A reader
    /// that fails on a live connection still gives up its lock, so that the partition's
    /// rightful owner (maybe another member by now) can claim it and resume at the
    /// committed floor.
    pub(crate) async fn run(self, stop: oneshot::Receiver<()>) -> Result<()> {
        let r = self.read(stop).await;
        if r.is_err() && self.conn.status().connected() {
            let _ = self.unlock().await;
        }
        r
    }

    async fn unlock(&self) -> Result<()> {
        let unlock = topology::open(&self.conn, "releasing a partition").await?;
        let r = unlock
            .queue_delete(
                ShortString::from(self.lock.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
        topology::close(&unlock).await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if error::is(&e, code::NOT_FOUND) => Ok(()),
            Err(e) => Err(error::map(
                format!(
                    "channel {} partition {}: unlocking",
                    self.channel, self.partition
                ),
                e,
            )),
        }
    }

    async fn read(&self, mut stop: oneshot::Receiver<()>) -> Result<()> {
        let ch = topology::open(&self.conn, "reading a partition").await?;
        let what = format!("channel {} partition {}", self.channel, self.partition);
        ch.basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| error::map(format!("{what}: setting the prefetch"), e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| error::map(format!("{what}: enabling confirms"), e))?;
        declare_offset_queue(&ch, &self.offset_queue)
            .await
            .map_err(|e| error::map(format!("{what}: declaring {}", self.offset_queue), e))?;
        let floor = committed(&ch, &self.offset_queue).await?;
        let start = floor.map_or(0, |f| f + 1);
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            match floor {
                Some(_) => AMQPValue::LongLongInt(i64::try_from(start).unwrap_or(i64::MAX)),
                None => AMQPValue::LongString("first".into()),
            },
        );
        let mut consumer = ch
            .basic_consume(
                ShortString::from(self.stream.as_str()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(|e| error::map(format!("{what}: consuming stream {}", self.stream), e))?;
        tracing::debug!(%what, ?floor, "partition claimed");

        let cap = usize::from(self.prefetch) * 2 + 16;
        let (settle_tx, mut settle_rx) = mpsc::channel::<Settle>(cap);
        let mut p = Progress::new(
            self.channel.clone(),
            self.partition,
            self.offset_queue.clone(),
            settle_tx,
            floor,
        );
        let prefetch = usize::from(self.prefetch);
        while !p.drained() {
            tokio::select! {
                _ = &mut stop, if !p.stopping => {
                    let _ = ch.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                    p.abandon();
                }
                permit = self.tx.reserve(), if !p.pending.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(d) = p.pending.pop_front() {
                            permit.send(d);
                        }
                    }
                    // The subscription is gone: hand over.
                    Err(_) => {
                        let _ = ch.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                        p.abandon();
                    }
                },
                next = consumer.next(), if !p.stopping && p.pending.len() < prefetch => {
                    let d = match next {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => return Err(error::map(format!("{what}: consuming"), e)),
                        None => return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!("{what}: RabbitMQ ended the stream consumer"),
                        )),
                    };
                    let Some(offset) = codec::stream_offset(&d.properties) else {
                        tracing::warn!(%what, "a stream delivery without x-stream-offset; skipped");
                        let _ = d.acker.ack(BasicAckOptions::default()).await;
                        continue;
                    };
                    if offset < start || codec::marker_of(&d.properties).is_some() {
                        let _ = d.acker.ack(BasicAckOptions::default()).await;
                        p.skipped(offset);
                        continue;
                    }
                    let message = codec::decode(&d.properties, Bytes::from(d.data));
                    p.received(offset, d.acker, message);
                }
                Some(s) = settle_rx.recv() => {
                    let more = !settle_rx.is_empty();
                    if let Err(e) = p.settle(s, &ch, &self.retry, more).await
                        && !ch.status().connected()
                    {
                        return Err(e);
                    }
                }
            }
        }
        // Every delivery is settled or left for the next owner: commit, then unlock.
        p.commit_waiting(&ch).await?;
        topology::close(&ch).await;
        self.unlock().await?;
        tracing::debug!(%what, floor = ?p.floor, "partition handed over");
        Ok(())
    }
}
