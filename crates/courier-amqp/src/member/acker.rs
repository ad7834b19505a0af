//! The settlement of one delivery, sent back to its partition's reader.

use courier_core::transport::BoxFuture;
use courier_core::{Acker, ChannelName, Error, ErrorKind, Result};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What a member's code did with a delivery.
#[derive(Debug)]
pub(crate) enum Settle {
    /// Acked: the floor may move; reply when the new floor is committed.
    Ack(u64, oneshot::Sender<Result<()>>),
    /// Nacked: deliver again after the delay; reply once that is arranged.
    Nack(u64, Duration, oneshot::Sender<Result<()>>),
    /// The delay of a nack ran out: deliver it again.
    Redeliver(u64),
    /// Dropped unsettled: leave it below the floor for the next owner.
    Dropped(u64),
}

/// Settles one delivery of one partition.
pub(crate) struct PartitionAcker {
    pub(crate) offset: u64,
    pub(crate) partition: u32,
    pub(crate) channel: ChannelName,
    pub(crate) settle: mpsc::Sender<Settle>,
    pub(crate) settled: bool,
}

impl PartitionAcker {
    fn gone(&self) -> Error {
        Error::new(
            ErrorKind::Fenced,
            format!(
                "channel {} partition {}: this member no longer owns the partition (handed \
                 over, unsubscribed or the connection was lost); offset {} will be \
                 delivered again",
                self.channel, self.partition, self.offset
            ),
        )
        .with_status(courier_core::ErrorStatus::Transient)
    }
}

impl Acker for PartitionAcker {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        self.settled = true;
        Box::pin(async move {
            let (reply, done) = oneshot::channel();
            if self
                .settle
                .send(Settle::Ack(self.offset, reply))
                .await
                .is_err()
            {
                return Err(self.gone());
            }
            match done.await {
                Ok(r) => r,
                Err(_) => Err(self.gone()),
            }
        })
    }

    fn nack(mut self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<()>> {
        self.settled = true;
        Box::pin(async move {
            let (reply, done) = oneshot::channel();
            if self
                .settle
                .send(Settle::Nack(self.offset, delay, reply))
                .await
                .is_err()
            {
                return Err(self.gone());
            }
            match done.await {
                Ok(r) => r,
                Err(_) => Err(self.gone()),
            }
        })
    }
}

impl Drop for PartitionAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let offset = self.offset;
        if let Err(mpsc::error::TrySendError::Full(_)) =
            self.settle.try_send(Settle::Dropped(offset))
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let settle = self.settle.clone();
            rt.spawn(async move {
                let _ = settle.send(Settle::Dropped(offset)).await;
            });
        }
    }
}
