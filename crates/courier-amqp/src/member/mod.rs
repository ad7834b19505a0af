//! Group membership: presence, rank (slot), partition locks, rebalancing and
//! reconnection. One connection per subscription: its exclusive queues are the member's
//! claims, and RabbitMQ drops them when the connection dies.

mod acker;
pub(crate) mod offsets;
mod partition;
mod progress;
mod retry;

use crate::error::{self, code};
use crate::publish::backoff;
use crate::{Inner, names, topology};
use courier_core::{
    ChannelName, Delivery, Error, GroupName, Result, StartFrom, SubscribeOptions, Subscription,
};
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Highest slot a member tries (a group of more members than this is refused).
const MAX_SLOTS: u32 = 1024;

/// A session that lasted this long resets the reconnection backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// How long a new group may take to find the end of each partition.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops the member when the subscription is dropped.
struct Leave(Option<oneshot::Sender<()>>);

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            let _ = s.send(());
        }
    }
}

/// Join `options.group` on `options.channel` over a connection of its own.
pub(crate) async fn join(inner: Arc<Inner>, options: SubscribeOptions) -> Result<Subscription> {
    // Validate every name once, up front.
    names::group_queues(&options.channel, &options.group, 1, 1)?;
    let purpose = format!("member of {} on {}", options.group, options.channel);
    let conn = Arc::new(topology::connect(&inner.config, &purpose).await?);
    join_on(inner, options, conn).await
}

/// Join over `conn` (the member reconnects on its own when `conn` fails).
pub(crate) async fn join_on(
    inner: Arc<Inner>,
    options: SubscribeOptions,
    conn: Arc<Connection>,
) -> Result<Subscription> {
    let channel = options.channel.clone();
    let group = options.group.clone();
    let n = inner.partitions(&conn, &channel).await?;
    if options.start == StartFrom::Latest {
        start_new_group_at_end(&conn, &channel, &group, n).await?;
    }
    let (tx, rx) = mpsc::channel(options.buffer.max(1));
    let (stop_tx, stop_rx) = oneshot::channel();
    let member = Member {
        inner,
        channel,
        group,
        partitions: n,
        prefetch: u16::try_from(options.buffer.clamp(1, 1000)).unwrap_or(1000),
        tx,
    };
    tokio::spawn(member.run(conn, stop_rx));
    Ok(Subscription::new(rx, Box::new(Leave(Some(stop_tx)))))
}

/// For each partition the group has no committed offset for, commit the current end.
async fn start_new_group_at_end(
    conn: &Connection,
    channel: &ChannelName,
    group: &GroupName,
    n: u32,
) -> Result<()> {
    for p in 0..n {
        let queue = names::offset(channel, group, p)?;
        if !topology::exists(conn, &queue).await? {
            offsets::start_at_end(conn, &names::stream(channel, p), &queue, START_TIMEOUT).await?;
        }
    }
    Ok(())
}

struct Owned {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

struct Member {
    inner: Arc<Inner>,
    channel: ChannelName,
    group: GroupName,
    partitions: u32,
    prefetch: u16,
    tx: mpsc::Sender<Delivery>,
}

enum Ended {
    Stopped,
    Lost(Error),
}

impl Member {
    async fn run(self, first: Arc<Connection>, mut stop: oneshot::Receiver<()>) {
        let mut conn = Some(first);
        let mut failures = 0u32;
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => {
                    let purpose = format!("member of {} on {}", self.group, self.channel);
                    match topology::connect(&self.inner.config, &purpose).await {
                        Ok(c) => Arc::new(c),
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            tracing::warn!(error = %e, "member could not reconnect");
                            if self.pause(failures, &mut stop).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            let began = std::time::Instant::now();
            let ended = self.session(&c, &mut stop).await;
            // A session that held up for a while starts the backoff afresh; one that
            // fails at once (e.g. refused permissions) keeps backing off.
            if began.elapsed() >= HEALTHY_SESSION {
                failures = 0;
            }
            let _ = c.close(200, ShortString::from("bye")).await;
            match ended {
                Ended::Stopped => return,
                Ended::Lost(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(channel = %self.channel, group = %self.group, error = %e,
                        "member lost its connection; reconnecting");
                    if self.pause(failures, &mut stop).await {
                        return;
                    }
                }
            }
            if self.tx.is_closed() {
                return;
            }
        }
    }

    /// Wait out the backoff; true when told to stop meanwhile.
    async fn pause(&self, failures: u32, stop: &mut oneshot::Receiver<()>) -> bool {
        let wait = backoff(failures, self.inner.config.max_reconnect_backoff);
        tokio::select! {
            _ = stop => true,
            _ = tokio::time::sleep(wait) => false,
        }
    }

    /// One connected session: join, rebalance every interval, leave or fail.
    async fn session(&self, conn: &Arc<Connection>, stop: &mut oneshot::Receiver<()>) -> Ended {
        let mut owned: HashMap<u32, Owned> = HashMap::new();
        let (retry_stop, retry_stopped) = oneshot::channel();
        let retries = match retry::RetryQueues::new(&self.channel, &self.group) {
            Ok(q) => tokio::spawn(retry::run(
                conn.clone(),
                q,
                self.prefetch,
                self.tx.clone(),
                retry_stopped,
                self.inner.config.rebalance_interval,
            )),
            Err(e) => return Ended::Lost(e),
        };
        let ended = self.rebalance_loop(conn, stop, &mut owned).await;
        let _ = retry_stop.send(());
        if let Ok(Err(e)) = retries.await {
            tracing::warn!(channel = %self.channel, group = %self.group, error = %e,
                "consuming the retry queue failed");
        }
        // Hand over whatever is still owned (a no-op wait when the connection is gone).
        for o in owned.values_mut() {
            if let Some(s) = o.stop.take() {
                let _ = s.send(());
            }
        }
        for (_, o) in owned.drain() {
            let _ = o.task.await;
        }
        ended
    }

    async fn rebalance_loop(
        &self,
        conn: &Arc<Connection>,
        stop: &mut oneshot::Receiver<()>,
        owned: &mut HashMap<u32, Owned>,
    ) -> Ended {
        let presence = match self.presence(conn).await {
            Ok(p) => p,
            Err(e) => return Ended::Lost(e),
        };
        let mut slot: Option<u32> = None;
        let mut tick = tokio::time::interval(self.inner.config.rebalance_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut *stop => return Ended::Stopped,
                _ = tick.tick() => {}
            }
            if self.tx.is_closed() {
                return Ended::Stopped;
            }
            if let Err(e) = self.step(conn, &presence, &mut slot, owned).await {
                if conn.status().connected() {
                    tracing::warn!(channel = %self.channel, group = %self.group, error = %e,
                        "rebalance step failed; retrying at the next interval");
                } else {
                    return Ended::Lost(e);
                }
            }
        }
    }

    /// Declare the presence queue and consume from it (the consumer is our presence).
    async fn presence(&self, conn: &Connection) -> Result<(Channel, String, lapin::Consumer)> {
        let name = names::members(&self.channel, &self.group)?;
        let ch = topology::open(conn, "joining a group").await?;
        self.count_members(&ch, &name).await?;
        let consumer = ch
            .basic_consume(
                ShortString::from(name.as_str()),
                ShortString::from(""),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| error::map(format!("joining group {} via {name}", self.group), e))?;
        // Dropping the consumer would cancel it: it lives as long as the session.
        Ok((ch, name, consumer))
    }

    async fn count_members(&self, ch: &Channel, name: &str) -> Result<u32> {
        let mut args = FieldTable::default();
        // Removed by RabbitMQ after an hour without members.
        args.insert("x-expires".into(), AMQPValue::LongLongInt(3_600_000));
        let q = ch
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions::default(),
                args,
            )
            .await
            .map_err(|e| error::map(format!("counting the members of group {}", self.group), e))?;
        Ok(q.consumer_count())
    }

    /// One rebalance step: read the group size, settle our rank, release partitions
    /// that are no longer ours and claim those that are.
    async fn step(
        &self,
        conn: &Arc<Connection>,
        presence: &(Channel, String, lapin::Consumer),
        slot: &mut Option<u32>,
        owned: &mut HashMap<u32, Owned>,
    ) -> Result<()> {
        // Reap readers that ended (handed over, or failed).
        let done: Vec<u32> = owned
            .iter()
            .filter(|(_, o)| o.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in done {
            if let Some(o) = owned.remove(&p)
                && let Ok(Err(e)) = o.task.await
            {
                tracing::warn!(channel = %self.channel, group = %self.group, partition = p,
                    error = %e, "partition reader failed; the partition is claimed again");
                if !conn.status().connected() {
                    return Err(e);
                }
            }
        }
        let members = self.count_members(&presence.0, &presence.1).await?.max(1);
        let me = self.settle_slot(conn, slot, members).await?;
        let size = members.max(me + 1);
        tracing::trace!(group = %self.group, members, slot = me, owned = owned.len(), "rebalance");
        for p in 0..self.partitions {
            let mine = p % size == me;
            match owned.get_mut(&p) {
                Some(o) if !mine => {
                    if let Some(s) = o.stop.take() {
                        tracing::debug!(partition = p, "handing over");
                        let _ = s.send(());
                    }
                }
                None if mine => {
                    let lock = names::lock(&self.channel, &self.group, p)?;
                    if try_exclusive(conn, &lock).await? {
                        owned.insert(p, self.spawn_reader(conn, p, lock)?);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Hold the lowest free slot: our rank among the members. A lower slot can only be
    /// free when our slot is not below the member count, so only then is it probed (a
    /// failed probe is a closed AMQP channel, which lapin logs as an error).
    async fn settle_slot(
        &self,
        conn: &Connection,
        slot: &mut Option<u32>,
        members: u32,
    ) -> Result<u32> {
        if let Some(k) = *slot
            && k < members
        {
            return Ok(k);
        }
        let upto = slot.unwrap_or(MAX_SLOTS);
        for k in 0..upto {
            let name = names::slot(&self.channel, &self.group, k)?;
            if try_exclusive(conn, &name).await? {
                if let Some(old) = slot.replace(k) {
                    let old = names::slot(&self.channel, &self.group, old)?;
                    let ch = topology::open(conn, "leaving a slot").await?;
                    let _ = ch
                        .queue_delete(
                            ShortString::from(old.as_str()),
                            QueueDeleteOptions::default(),
                        )
                        .await;
                    topology::close(&ch).await;
                }
                return Ok(k);
            }
        }
        slot.ok_or_else(|| {
            Error::invalid(format!(
                "group {} on channel {} has more than {MAX_SLOTS} members",
                self.group, self.channel
            ))
        })
    }

    fn spawn_reader(&self, conn: &Arc<Connection>, p: u32, lock: String) -> Result<Owned> {
        let reader = partition::Reader {
            conn: conn.clone(),
            channel: self.channel.clone(),
            partition: p,
            stream: names::stream(&self.channel, p),
            lock,
            offset_queue: names::offset(&self.channel, &self.group, p)?,
            prefetch: self.prefetch,
            tx: self.tx.clone(),
            retry: retry::RetryQueues::new(&self.channel, &self.group)?,
        };
        let (stop, stopped) = oneshot::channel();
        Ok(Owned {
            stop: Some(stop),
            task: tokio::spawn(reader.run(stopped)),
        })
    }
}

/// Declare `name` as an exclusive queue of this connection: true when we hold it now,
/// false when another connection does.
async fn try_exclusive(conn: &Connection, name: &str) -> Result<bool> {
    let ch = topology::open(conn, "claiming a lock").await?;
    let r = ch
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    topology::close(&ch).await;
    match r {
        Ok(_) => Ok(true),
        Err(e) if error::is(&e, code::RESOURCE_LOCKED) => Ok(false),
        Err(e) => Err(error::map(format!("claiming {name}"), e)),
    }
}
