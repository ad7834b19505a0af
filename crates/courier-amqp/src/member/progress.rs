//! The bookkeeping of one owned partition: which deliveries are out, where the ack floor
//! is, and which acks wait for the commit that covers them.

use super::acker::{PartitionAcker, Settle};
use super::offsets::commit;
use super::retry::RetryQueues;
use courier_core::{ChannelName, Delivery, Error, Malformed, Message, Position, Result};
use lapin::Acker as AmqpAcker;
use lapin::Channel;
use lapin::options::BasicAckOptions;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// When a delivery dropped without settlement comes again (to the same member).
const DROPPED_AGAIN: Duration = Duration::from_secs(1);

/// Most acks answered by one commit.
const MAX_WAITING: usize = 256;

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Queued for or held by the member's code.
    InHand,
    /// Nacked (or dropped), waiting to be delivered again.
    Waiting,
    /// Left for the next owner at hand-over: stays below the floor.
    Abandoned,
}

struct Entry {
    amqp: AmqpAcker,
    message: std::result::Result<Message, Malformed>,
    redeliveries: u32,
    state: State,
}

/// Deliveries out, floor, waiting acks of one partition.
pub(crate) struct Progress {
    pub(crate) channel: ChannelName,
    pub(crate) partition: u32,
    pub(crate) offset_queue: String,
    pub(crate) settle: mpsc::Sender<Settle>,
    entries: BTreeMap<u64, Entry>,
    /// Deliveries not yet handed to the subscription (bounded by the prefetch).
    pub(crate) pending: VecDeque<Delivery>,
    last_seen: Option<u64>,
    pub(crate) floor: Option<u64>,
    pub(crate) stopping: bool,
    waiting: Vec<oneshot::Sender<Result<()>>>,
}

impl Progress {
    pub(crate) fn new(
        channel: ChannelName,
        partition: u32,
        offset_queue: String,
        settle: mpsc::Sender<Settle>,
        floor: Option<u64>,
    ) -> Self {
        Self {
            channel,
            partition,
            offset_queue,
            settle,
            entries: BTreeMap::new(),
            pending: VecDeque::new(),
            last_seen: floor,
            floor,
            stopping: false,
            waiting: Vec::new(),
        }
    }

    /// True once handing over and nothing is left in the member's hands.
    pub(crate) fn drained(&self) -> bool {
        self.stopping && self.entries.values().all(|e| e.state == State::Abandoned)
    }

    /// An offset that is not handed out (before the start, a marker): progress only.
    pub(crate) fn skipped(&mut self, offset: u64) {
        self.last_seen = self.last_seen.max(Some(offset));
    }

    /// A new delivery from the stream, queued for the subscription.
    pub(crate) fn received(
        &mut self,
        offset: u64,
        amqp: AmqpAcker,
        message: std::result::Result<Message, Malformed>,
    ) {
        self.skipped(offset);
        let d = self.delivery(offset, message.clone(), 0);
        self.pending.push_back(d);
        self.entries.insert(
            offset,
            Entry {
                amqp,
                message,
                redeliveries: 0,
                state: State::InHand,
            },
        );
    }

    fn delivery(
        &self,
        offset: u64,
        message: std::result::Result<Message, Malformed>,
        redeliveries: u32,
    ) -> Delivery {
        Delivery::new(
            message,
            self.channel.clone(),
            Some(Position {
                partition: self.partition,
                offset,
            }),
            redeliveries,
            Box::new(PartitionAcker {
                offset,
                partition: self.partition,
                channel: self.channel.clone(),
                settle: self.settle.clone(),
                settled: false,
            }),
        )
    }

    /// Stop handing out: deliveries not yet handed to the member and those waiting to
    /// come again stay below the floor for the next owner; those in the member's hands
    /// are waited for.
    pub(crate) fn abandon(&mut self) {
        self.stopping = true;
        for d in self.pending.drain(..) {
            if let Some(e) = d.position.and_then(|p| self.entries.get_mut(&p.offset)) {
                e.state = State::Abandoned;
            }
        }
        for e in self.entries.values_mut() {
            if e.state == State::Waiting {
                e.state = State::Abandoned;
            }
        }
    }

    /// Handle one settlement; `ch` is the partition's channel (commits, delays).
    pub(crate) async fn settle(
        &mut self,
        s: Settle,
        ch: &Channel,
        retry: &RetryQueues,
        more_waiting: bool,
    ) -> Result<()> {
        match s {
            Settle::Ack(offset, reply) => {
                self.remove(offset).await;
                self.waiting.push(reply);
            }
            Settle::Nack(offset, delay, reply) => {
                let r = self.nack(offset, delay, ch, retry).await;
                let _ = reply.send(r);
            }
            Settle::Dropped(offset) => self.later(offset, DROPPED_AGAIN),
            Settle::Redeliver(offset) => {
                if self.stopping {
                    return Ok(());
                }
                if let Some(e) = self.entries.get_mut(&offset)
                    && e.state == State::Waiting
                {
                    e.state = State::InHand;
                    e.redeliveries = e.redeliveries.saturating_add(1);
                    let (m, n) = (e.message.clone(), e.redeliveries);
                    let d = self.delivery(offset, m, n);
                    self.pending.push_back(d);
                }
            }
        }
        // One commit for every ack that arrived meanwhile (an ack resolves once the
        // floor it moved is confirmed).
        if !self.waiting.is_empty() && (!more_waiting || self.waiting.len() >= MAX_WAITING) {
            return self.commit_waiting(ch).await;
        }
        Ok(())
    }

    /// Commit the floor and answer every waiting ack with the outcome.
    pub(crate) async fn commit_waiting(&mut self, ch: &Channel) -> Result<()> {
        let outcome = self.advance(ch).await;
        for reply in self.waiting.drain(..) {
            let _ = reply.send(match &outcome {
                Ok(()) => Ok(()),
                Err(e) => Err(Error::new(e.kind(), e.message().to_owned()).with_status(e.status())),
            });
        }
        outcome
    }

    async fn remove(&mut self, offset: u64) {
        if let Some(e) = self.entries.remove(&offset) {
            let _ = e.amqp.ack(BasicAckOptions::default()).await;
        }
    }

    /// Arrange a redelivery on the broker (then the message is settled here), or, should
    /// the broker refuse, from memory.
    async fn nack(
        &mut self,
        offset: u64,
        delay: Duration,
        ch: &Channel,
        retry: &RetryQueues,
    ) -> Result<()> {
        let message = self
            .entries
            .get(&offset)
            .filter(|e| e.state == State::InHand)
            .and_then(|e| e.message.as_ref().ok().map(|m| (m.clone(), e.redeliveries)));
        let Some((m, n)) = message else {
            self.later(offset, delay);
            return Ok(());
        };
        let at = Some(Position {
            partition: self.partition,
            offset,
        });
        match retry.schedule(ch, &m, at, n.saturating_add(1), delay).await {
            Ok(()) => {
                self.remove(offset).await;
                self.advance(ch).await
            }
            Err(e) => {
                tracing::warn!(channel = %self.channel, partition = self.partition, error = %e,
                    "scheduling a redelivery on the broker failed; redelivering from memory");
                self.later(offset, delay);
                Ok(())
            }
        }
    }

    /// Deliver `offset` again after `delay` (or leave it for the next owner when handing
    /// over). Only a delivery in the member's hands moves; a late settle is ignored.
    fn later(&mut self, offset: u64, delay: Duration) {
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        if e.state != State::InHand {
            return;
        }
        if self.stopping {
            e.state = State::Abandoned;
            return;
        }
        e.state = State::Waiting;
        let tx = self.settle.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Settle::Redeliver(offset)).await;
        });
    }

    /// Commit the floor if it moved: the offset below the first unsettled entry, or the
    /// last offset seen when none is outstanding.
    pub(crate) async fn advance(&mut self, ch: &Channel) -> Result<()> {
        let candidate = match self.entries.keys().next() {
            Some(&first) => first.checked_sub(1),
            None => self.last_seen,
        };
        if let Some(c) = candidate
            && self.floor.is_none_or(|f| c > f)
        {
            commit(ch, &self.offset_queue, c).await?;
            self.floor = Some(c);
        }
        Ok(())
    }
}
