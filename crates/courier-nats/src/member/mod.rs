//! One member of a consumer group on JetStream.
//!
//! - The **coordinator** task heartbeats: it renews the member's key in the leases bucket,
//!   lists the group's live members, and per partition computes the desired owner
//!   (`sorted live members[p % n]`, as the SQLite broker does). It claims free partitions
//!   it should own (`create`: fails if the key exists), renews the leases it holds
//!   (`update` with the last revision: the revision is the fencing token; a failed renewal
//!   means the lease is lost and the partition's fetcher stops at once), and hands over
//!   partitions it should not own: it stops pulling, waits until every message it
//!   delivered from the partition was settled (bounded by `ack_wait`), then deletes the
//!   lease (with the expected revision). The next owner thus starts exactly after what
//!   this member processed: order per key holds across rebalances.
//! - One **fetcher** task per owned partition pulls that partition's durable consumer in
//!   batches and sends deliveries, in order, into the bounded subscription channel.
//!
//! Order across a change of owner: JetStream redelivers unacknowledged messages after
//! `ack_wait`, behind newer ones. So when a member claims a partition whose consumer
//! still has unacknowledged deliveries (a crashed or departed owner's, or its own that
//! it could not deliver), it first recreates the consumer from the consumer's ack floor
//! (the lowest unacknowledged position, like the SQLite broker's committed offset): the
//! messages come again in order; acknowledged ones after the floor may come twice, which
//! the inbox absorbs.

mod fetch;

use crate::{NatsTransport, error, names};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, Consumer, DeliverPolicy, pull};
use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
use courier_core::{
    ChannelName, Delivery, GroupName, Result, StartFrom, SubscribeOptions, Subscription,
};
use fetch::fetcher;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

struct Owned {
    /// KV revision of our lease: the fencing token.
    revision: u64,
    /// Local claim counter: deliveries of an older claim do not count for this one.
    generation: u64,
    /// Delivered and not yet settled.
    in_flight: usize,
    /// The fetcher task is running (it may still be inside a pull request).
    fetching: bool,
    /// Stop pulling: the partition is being handed over.
    draining: Option<Instant>,
    /// A fetched message could not be delivered: recreate the consumer from its ack
    /// floor before the next pull, so it comes again before newer ones.
    resume: bool,
    /// When the last successful renewal was sent: past `session_timeout - heartbeat`
    /// the lease may have expired on the broker, so this member stops delivering.
    renewed_at: Instant,
}

impl Owned {
    fn fresh(&self, cfg: &crate::NatsConfig) -> bool {
        self.renewed_at.elapsed() < cfg.session_timeout.saturating_sub(cfg.heartbeat_interval)
    }
}

#[derive(Default)]
struct State {
    owned: BTreeMap<u32, Owned>,
    next_generation: u64,
    closed: bool,
}

struct Shared {
    transport: NatsTransport,
    channel: ChannelName,
    group: GroupName,
    member: String,
    partitions: u32,
    stream: jetstream::stream::Stream,
    consumers: Vec<Consumer<pull::Config>>,
    leases: jetstream::kv::Store,
    leases_stream: jetstream::stream::Stream,
    state: Mutex<State>,
    /// Wakes the leaving coordinator when a fetcher ended or a delivery was settled.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn cfg(&self) -> &crate::NatsConfig {
        &self.transport.inner.config
    }

    fn lease_key(&self, p: u32) -> String {
        names::lease_key(&self.channel, &self.group, p)
    }

    /// A delivery of claim `generation` of `p` was settled.
    fn settled(&self, p: u32, generation: u64) {
        if let Some(o) = self.lock().owned.get_mut(&p)
            && o.generation == generation
        {
            o.in_flight = o.in_flight.saturating_sub(1);
        }
        self.changed.notify_waiters();
    }
}

/// Dropping this stops the member: its coordinator hands its partitions over and leaves.
struct Membership {
    _stop: watch::Sender<bool>,
}

pub(crate) async fn join(
    transport: NatsTransport,
    options: SubscribeOptions,
) -> Result<Subscription> {
    let started = Instant::now();
    let cfg = transport.inner.config.clone();
    let channel = options.channel;
    let group = options.group;
    let (stream, partitions) = transport
        .stream(&channel, cfg.default_partitions.max(1))
        .await?;
    let leases = transport.leases().await?;
    let leases_stream = transport
        .inner
        .js
        .get_stream(format!("KV_{}", cfg.leases_bucket))
        .await
        .map_err(|e| error::map("opening the leases bucket's stream", e))?;
    let deliver_policy = match options.start {
        StartFrom::Earliest => DeliverPolicy::All,
        StartFrom::Latest => DeliverPolicy::New,
    };
    let mut consumers = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        let name = names::consumer(&group, p);
        let consumer = stream
            .get_or_create_consumer(
                &name,
                consumer_config(&channel, &group, p, deliver_policy, cfg.ack_wait),
            )
            .await
            .map_err(|e| {
                error::map(
                    format!("creating consumer {name} of group {group} on channel {channel}"),
                    e,
                )
            })?;
        consumers.push(consumer);
    }
    let shared = Arc::new(Shared {
        transport,
        member: uuid::Uuid::now_v7().simple().to_string(),
        channel,
        group,
        partitions,
        stream,
        consumers,
        leases,
        leases_stream,
        state: Mutex::new(State::default()),
        changed: Notify::new(),
    });
    let (tx, rx) = mpsc::channel(options.buffer.max(1));
    // First heartbeat now, so a lone member owns its partitions before returning.
    heartbeat(&shared, &tx).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tracing::debug!(channel = %shared.channel, group = %shared.group, member = %shared.member,
        owned = shared.lock().owned.len(), elapsed = ?started.elapsed(), "joined group");
    tokio::spawn(coordinator(shared, tx, stop_rx));
    Ok(Subscription::new(
        rx,
        Box::new(Membership { _stop: stop_tx }),
    ))
}

/// The durable pull consumer of one partition of a group.
fn consumer_config(
    channel: &ChannelName,
    group: &GroupName,
    p: u32,
    deliver_policy: DeliverPolicy,
    ack_wait: Duration,
) -> pull::Config {
    let name = names::consumer(group, p);
    pull::Config {
        durable_name: Some(name),
        description: Some(format!(
            "courier group {group} on channel {channel}, partition {p}"
        )),
        filter_subject: names::subject(channel, p),
        ack_policy: AckPolicy::Explicit,
        deliver_policy,
        ack_wait,
        // Unlimited: Courier dead-letters in the service database.
        max_deliver: -1,
        ..Default::default()
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // Resolves when the Membership (sender) is dropped.
    while stop.changed().await.is_ok() {}
}

async fn coordinator(
    shared: Arc<Shared>,
    out: mpsc::Sender<Delivery>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(shared.cfg().heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = out.closed() => break,
            _ = tick.tick() => {
                if let Err(e) = heartbeat(&shared, &out).await {
                    tracing::warn!(channel = %shared.channel, group = %shared.group, error = %e,
                        "heartbeat failed; retrying (partitions move if this lasts longer than the session timeout)");
                }
            }
        }
    }
    drop(out);
    leave(&shared).await;
}

/// The group's live members, sorted (always including this one).
async fn live_members(shared: &Shared) -> Result<Vec<String>> {
    let bucket = &shared.cfg().leases_bucket;
    let filter = names::members_filter(bucket, &shared.channel, &shared.group);
    let prefix = filter.trim_end_matches('*').to_owned();
    let mut info = shared
        .leases_stream
        .info_with_subjects(&filter)
        .await
        .map_err(|e| error::map("listing group members", e))?;
    let mut live = vec![shared.member.clone()];
    while let Some(item) = info.next().await {
        let (subject, _) = item.map_err(|e| error::map("listing group members", e))?;
        if let Some(m) = subject.strip_prefix(&prefix)
            && m != shared.member
        {
            live.push(m.to_owned());
        }
    }
    live.sort();
    Ok(live)
}

/// Renew membership and leases, hand over, claim.
async fn heartbeat(shared: &Arc<Shared>, out: &mpsc::Sender<Delivery>) -> Result<()> {
    let me = shared.member.as_str();
    shared
        .leases
        .put(
            names::member_key(&shared.channel, &shared.group, me),
            bytes::Bytes::new(),
        )
        .await
        .map_err(|e| error::map("renewing group membership", e))?;
    let live = live_members(shared).await?;
    let n = live.len().max(1);
    for p in 0..shared.partitions {
        let desired_me = live.get(p as usize % n).map(String::as_str) == Some(me);
        step(shared, out, p, desired_me).await;
    }
    Ok(())
}

/// One partition's part of a heartbeat (also used while leaving, with `desired_me` false).
async fn step(shared: &Arc<Shared>, out: &mpsc::Sender<Delivery>, p: u32, desired_me: bool) {
    let key = shared.lease_key(p);
    let ack_wait = shared.cfg().ack_wait;
    enum Do {
        Claim,
        Renew(u64, u64),
        Release(u64, u64),
        Nothing,
    }
    let mut restart = None;
    let todo = {
        let mut st = shared.lock();
        let closed = st.closed;
        match st.owned.get_mut(&p) {
            None if desired_me && !closed => Do::Claim,
            None => Do::Nothing,
            Some(o) => {
                if desired_me && !closed {
                    if o.draining.take().is_some() && !o.fetching {
                        o.fetching = true;
                        restart = Some(o.generation);
                    }
                } else if o.draining.is_none() {
                    o.draining = Some(Instant::now());
                }
                let ready = o.draining.is_some_and(|since| {
                    !o.fetching && (o.in_flight == 0 || since.elapsed() >= ack_wait)
                });
                if ready {
                    Do::Release(o.revision, o.generation)
                } else {
                    Do::Renew(o.revision, o.generation)
                }
            }
        }
    };
    if let Some(generation) = restart {
        tokio::spawn(fetcher(shared.clone(), p, generation, out.clone()));
    }
    let sent = Instant::now();
    match todo {
        Do::Nothing => {}
        Do::Claim => match shared
            .leases
            .create(&key, shared.member.clone().into())
            .await
        {
            Ok(revision) => {
                let renewed_at = sent;
                let generation = {
                    let mut st = shared.lock();
                    st.next_generation += 1;
                    let generation = st.next_generation;
                    st.owned.insert(
                        p,
                        Owned {
                            revision,
                            generation,
                            in_flight: 0,
                            fetching: true,
                            draining: None,
                            // A previous owner may have left deliveries unacknowledged.
                            resume: true,
                            renewed_at,
                        },
                    );
                    generation
                };
                tracing::debug!(channel = %shared.channel, group = %shared.group, partition = p, revision, "claimed partition");
                tokio::spawn(fetcher(shared.clone(), p, generation, out.clone()));
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::warn!(channel = %shared.channel, group = %shared.group, partition = p, error = %e, "claiming a partition failed");
            }
        },
        Do::Renew(revision, generation) => {
            match shared
                .leases
                .update(&key, shared.member.clone().into(), revision)
                .await
            {
                Ok(new) => {
                    if let Some(o) = shared.lock().owned.get_mut(&p)
                        && o.generation == generation
                    {
                        o.revision = new;
                        o.renewed_at = sent;
                    }
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    let mut st = shared.lock();
                    if st.owned.get(&p).is_some_and(|o| o.generation == generation) {
                        tracing::warn!(channel = %shared.channel, group = %shared.group, partition = p,
                            "lost partition (lease expired or taken): stopped pulling it");
                        st.owned.remove(&p);
                    }
                    drop(st);
                    shared.changed.notify_waiters();
                }
                Err(e) => {
                    tracing::warn!(channel = %shared.channel, group = %shared.group, partition = p, error = %e,
                        "renewing a lease failed; retrying");
                }
            }
        }
        Do::Release(revision, generation) => {
            if let Err(e) = shared
                .leases
                .delete_expect_revision(&key, Some(revision))
                .await
            {
                tracing::debug!(channel = %shared.channel, group = %shared.group, partition = p, error = %e,
                    "releasing a lease failed (it expires by itself)");
            }
            let mut st = shared.lock();
            if st.owned.get(&p).is_some_and(|o| o.generation == generation) {
                st.owned.remove(&p);
                tracing::debug!(channel = %shared.channel, group = %shared.group, partition = p, "released partition");
            }
            drop(st);
            shared.changed.notify_waiters();
        }
    }
}

/// Hand every partition over, then leave the group.
async fn leave(shared: &Arc<Shared>) {
    shared.lock().closed = true;
    let member_subject = format!(
        "$KV.{}.{}",
        shared.cfg().leases_bucket,
        names::member_key(&shared.channel, &shared.group, &shared.member)
    );
    if let Err(e) = shared.leases_stream.purge().filter(&member_subject).await {
        tracing::debug!(error = %e, "removing the membership failed (it expires by itself)");
    }
    let cfg = shared.cfg();
    let give_up = Instant::now() + cfg.ack_wait + cfg.fetch_wait * 2 + cfg.heartbeat_interval;
    // A sender nobody receives from: a closed member spawns no fetcher.
    let (out, _) = mpsc::channel(1);
    loop {
        let owned: Vec<u32> = shared.lock().owned.keys().copied().collect();
        if owned.is_empty() || Instant::now() >= give_up {
            break;
        }
        for p in owned {
            step(shared, &out, p, false).await;
        }
        let changed = shared.changed.notified();
        let _ = tokio::time::timeout(
            cfg.heartbeat_interval.min(Duration::from_millis(50)),
            changed,
        )
        .await;
    }
}
