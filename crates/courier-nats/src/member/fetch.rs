//! The fetcher of one owned partition, and the acker of its deliveries.

use super::{Shared, consumer_config};
use crate::{codec, error, names};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::{self, AckKind};
use courier_core::transport::BoxFuture;
use courier_core::{Acker, Delivery, Position, Result};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Least time waited past a pull request's expiry for the server's answer.
const PULL_GRACE: Duration = Duration::from_millis(100);

/// What a fetcher may do with its partition now.
enum May {
    Pull,
    /// The lease could not be renewed lately: wait for a renewal (or its loss).
    Wait,
    Stop,
}

/// Before pulling a partition just claimed (or after a message could not be delivered):
/// if its consumer has unacknowledged deliveries, recreate it from its ack floor so they
/// come again, in order, before anything newer.
async fn resume_from_ack_floor(shared: &Shared, p: u32) -> Result<()> {
    let name = names::consumer(&shared.group, p);
    let what = || {
        format!(
            "resuming consumer {name} of group {} on channel {}",
            shared.group, shared.channel
        )
    };
    let info = shared
        .stream
        .consumer_info(&name)
        .await
        .map_err(|e| error::map(what(), e))?;
    if info.num_ack_pending == 0 {
        return Ok(());
    }
    let start = info.ack_floor.stream_sequence + 1;
    tracing::debug!(channel = %shared.channel, group = %shared.group, partition = p,
        pending = info.num_ack_pending, start, "resuming partition from its ack floor");
    shared
        .stream
        .delete_consumer(&name)
        .await
        .map_err(|e| error::map(what(), e))?;
    let deliver_policy = DeliverPolicy::ByStartSequence {
        start_sequence: start,
    };
    shared
        .stream
        .create_consumer(consumer_config(
            &shared.channel,
            &shared.group,
            p,
            deliver_policy,
            shared.cfg().ack_wait,
        ))
        .await
        .map_err(|e| error::map(what(), e))?;
    Ok(())
}

/// Pull partition `p` for claim `generation` while it is ours and not being handed over.
pub(super) async fn fetcher(
    shared: Arc<Shared>,
    p: u32,
    generation: u64,
    out: mpsc::Sender<Delivery>,
) {
    let cfg = shared.cfg().clone();
    let Some(consumer) = shared.consumers.get(p as usize) else {
        return;
    };
    let mut failures = 0u32;
    loop {
        let may = {
            let st = shared.lock();
            match st.owned.get(&p) {
                Some(o) if o.generation == generation && o.draining.is_none() && !st.closed => {
                    if o.fresh(&cfg) { May::Pull } else { May::Wait }
                }
                _ => May::Stop,
            }
        };
        match may {
            May::Pull => {
                let resume = shared
                    .lock()
                    .owned
                    .get(&p)
                    .is_some_and(|o| o.generation == generation && o.resume);
                if resume {
                    if let Err(e) = resume_from_ack_floor(&shared, p).await {
                        failures += 1;
                        let delay =
                            Duration::from_millis(20u64 << failures.min(8)).min(cfg.fetch_wait);
                        tracing::warn!(channel = %shared.channel, group = %shared.group, partition = p,
                            error = %e, ?delay, "resuming a partition failed; retrying");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    if let Some(o) = shared.lock().owned.get_mut(&p)
                        && o.generation == generation
                    {
                        o.resume = false;
                    }
                }
            }
            May::Stop => break,
            May::Wait => {
                tokio::time::sleep(cfg.heartbeat_interval).await;
                continue;
            }
        }
        let pulled_at = Instant::now();
        let batch = consumer
            .batch()
            .max_messages(cfg.fetch_batch.max(1))
            .expires(cfg.fetch_wait)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                failures += 1;
                let delay = Duration::from_millis(20u64 << failures.min(8)).min(cfg.fetch_wait);
                tracing::warn!(channel = %shared.channel, group = %shared.group, partition = p, error = %e, ?delay,
                    "pull request failed; retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        // The server ends a pull request after `fetch_wait` with a timeout status, but
        // nats-server 2.9 sometimes drops a fresh request silently (async-nats would then
        // wait 5 s more). Past the server's expiry nothing more can arrive for it, so stop
        // waiting a little after; messages already received are still taken first.
        let deadline = pulled_at + cfg.fetch_wait + (cfg.fetch_wait / 4).max(PULL_GRACE);
        loop {
            let m = match tokio::time::timeout_at(deadline, batch.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => {
                    tracing::trace!(channel = %shared.channel, partition = p, "pull request unanswered; pulling again");
                    break;
                }
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(channel = %shared.channel, partition = p, error = %e, "pull request ended with an error");
                    failures += 1;
                    break;
                }
            };
            failures = 0;
            let deliver = {
                let mut st = shared.lock();
                let closed = st.closed;
                match st.owned.get_mut(&p) {
                    Some(o) if o.generation == generation && !closed && o.fresh(&cfg) => {
                        o.in_flight += 1;
                        true
                    }
                    Some(o) if o.generation == generation && !closed => {
                        // Stale lease: leave it unacknowledged and resume before pulling.
                        o.resume = true;
                        false
                    }
                    // Gone or leaving: the next owner resumes from the ack floor.
                    _ => false,
                }
            };
            if !deliver {
                drop(m);
                continue;
            }
            let d = delivery(&shared, p, generation, m);
            if let Err(mpsc::error::SendError(d)) = out.send(d).await {
                // The subscription is gone: dropping the delivery gives it back.
                shared.lock().closed = true;
                drop(d);
            }
        }
        if failures > 0 {
            // E.g. the consumer or stream was deleted: do not spin.
            let delay = Duration::from_millis(20u64 << failures.min(8)).min(cfg.fetch_wait);
            tokio::time::sleep(delay).await;
        }
    }
    if let Some(o) = shared.lock().owned.get_mut(&p)
        && o.generation == generation
    {
        o.fetching = false;
    }
    tracing::trace!(channel = %shared.channel, partition = p, "fetcher stopped");
    shared.changed.notify_waiters();
}

fn delivery(shared: &Arc<Shared>, p: u32, generation: u64, m: jetstream::Message) -> Delivery {
    let (offset, redeliveries) = match m.info() {
        Ok(info) => (
            info.stream_sequence,
            u32::try_from(info.delivered.saturating_sub(1)).unwrap_or(u32::MAX),
        ),
        Err(_) => (0, 0),
    };
    let message = codec::decode(m.headers.as_ref(), m.payload.clone());
    Delivery::new(
        message,
        shared.channel.clone(),
        Some(Position {
            partition: names::partition_of(&m.subject).unwrap_or(p),
            offset,
        }),
        redeliveries,
        Box::new(NatsAcker {
            shared: shared.clone(),
            partition: p,
            generation,
            message: Some(m),
        }),
    )
}

/// Settles one delivery.
struct NatsAcker {
    shared: Arc<Shared>,
    partition: u32,
    generation: u64,
    message: Option<jetstream::Message>,
}

impl NatsAcker {
    /// What settling `m` was, for an error (written only when one happens).
    fn what(&self, verb: &str, m: &jetstream::Message) -> String {
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(codec::MSG_ID))
            .map(|v| v.as_str())
            .unwrap_or_default();
        format!(
            "{verb} message {id} of channel {} (group {}, partition {})",
            self.shared.channel, self.shared.group, self.partition
        )
    }
}

impl Acker for NatsAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let mut this = self;
            let result = match this.message.take() {
                Some(m) => m
                    .double_ack()
                    .await
                    .map_err(|e| error::map_boxed(this.what("acknowledging", &m), e)),
                None => Ok(()),
            };
            drop(this);
            result
        })
    }

    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let mut this = self;
            let result = match this.message.take() {
                Some(m) => m
                    .ack_with(AckKind::Nak(Some(delay)))
                    .await
                    .map_err(|e| error::map_boxed(this.what("nacking", &m), e)),
                None => Ok(()),
            };
            drop(this);
            result
        })
    }
}

impl Drop for NatsAcker {
    fn drop(&mut self) {
        // Unsettled: it stays unacknowledged on the server; JetStream redelivers it after
        // `ack_wait`, or the partition's next owner resumes from the ack floor.
        self.shared.settled(self.partition, self.generation);
    }
}
