//! One member of a consumer group on the embedded broker.
//!
//! Two tasks per member:
//! - the **coordinator** heartbeats, rebalances (release / claim partitions with a new
//!   generation each time), and commits acknowledged progress, fenced by generation;
//! - the **fetcher** reads owned partitions after their cursor and sends deliveries into
//!   the bounded subscription channel (back-pressure), woken by commits to the file.
//!
//! Progress per partition is the highest offset below which every delivered message is
//! acknowledged, so a message waiting for a retry is never skipped by a crash.

use super::SqliteBroker;
use courier_core::transport::BoxFuture;
use courier_core::{
    Acker, ChannelName, Delivery, GroupName, Position, Result, StartFrom, SubscribeOptions,
    Subscription,
};
use sqlx::Row;
use sqlx::{Connection, sqlite::SqliteConnection};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};

struct PartitionState {
    generation: i64,
    /// Last offset read from the log.
    cursor: i64,
    /// Delivered offsets in order, with whether each was acknowledged.
    in_flight: VecDeque<(i64, bool)>,
    /// Progress we may commit.
    commit_to: i64,
    /// Progress the database has.
    committed: i64,
}

impl PartitionState {
    fn ack(&mut self, offset: i64) {
        if let Ok(i) = self.in_flight.binary_search_by_key(&offset, |(o, _)| *o) {
            self.in_flight[i].1 = true;
        }
        while let Some((o, true)) = self.in_flight.front().copied() {
            self.commit_to = o;
            self.in_flight.pop_front();
        }
        if self.in_flight.is_empty() {
            self.commit_to = self.cursor;
        }
    }
}

#[derive(Default)]
struct MemberState {
    owned: BTreeMap<u32, PartitionState>,
    closed: bool,
}

struct Shared {
    broker: SqliteBroker,
    channel: ChannelName,
    group: GroupName,
    member: String,
    state: Mutex<MemberState>,
    /// Wakes the fetcher when partitions were claimed or in-flight room freed up.
    fetch_now: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, MemberState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Dropping this stops the member's tasks; the coordinator then commits, releases its
/// partitions and leaves the group.
struct Membership {
    _stop: watch::Sender<bool>,
}

pub(super) async fn join(broker: SqliteBroker, options: SubscribeOptions) -> Result<Subscription> {
    let partitions = broker.partitions(&options.channel).await?;
    let start: i64 = match options.start {
        StartFrom::Earliest => 0,
        StartFrom::Latest => broker.head(&options.channel).await? as i64,
    };
    {
        let mut tx = broker
            .inner
            .write_begin()
            .await
            .map_err(broker.err("joining a consumer group"))?;
        for p in 0..partitions {
            sqlx::query(
                "INSERT INTO courier_groups (channel, grp, partition, committed, owner, generation)
                 VALUES (?, ?, ?, ?, NULL, 0) ON CONFLICT DO NOTHING",
            )
            .bind(options.channel.as_str())
            .bind(options.group.as_str())
            .bind(i64::from(p))
            .bind(start)
            .execute(&mut *tx)
            .await
            .map_err(broker.err("joining a consumer group"))?;
        }
        tx.commit()
            .await
            .map_err(broker.err("joining a consumer group"))?;
    }
    let shared = Arc::new(Shared {
        broker,
        channel: options.channel,
        group: options.group,
        member: format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple()),
        state: Mutex::new(MemberState::default()),
        fetch_now: Notify::new(),
    });
    // First heartbeat now, so a lone member owns its partitions before returning.
    rebalance(&shared).await?;
    let (tx, rx) = mpsc::channel(options.buffer.max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(coordinator(shared.clone(), stop_rx.clone()));
    tokio::spawn(fetcher(shared, tx, stop_rx));
    Ok(Subscription::new(
        rx,
        Box::new(Membership { _stop: stop_tx }),
    ))
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // Resolves when the Membership (sender) is dropped.
    while stop.changed().await.is_ok() {}
}

async fn coordinator(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.broker.inner.config.clone();
    let mut heartbeat = tokio::time::interval(cfg.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut commit = tokio::time::interval(cfg.commit_interval);
    commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval(cfg.prune_interval);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    prune.tick().await;
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = heartbeat.tick() => {
                if let Err(e) = rebalance(&shared).await {
                    tracing::warn!(channel = %shared.channel, group = %shared.group, error = %e,
                        "heartbeat failed; retrying (partitions move if this lasts longer than the session timeout)");
                }
            }
            _ = prune.tick() => {
                if let Err(e) = shared.broker.prune(cfg.retention).await {
                    tracing::warn!(error = %e, "pruning consumed messages failed; will try again");
                }
            }
            _ = commit.tick() => {
                if let Err(e) = commit_progress(&shared).await {
                    tracing::warn!(channel = %shared.channel, group = %shared.group, error = %e, "offset commit failed; retrying");
                }
            }
        }
    }
    if let Err(e) = leave(&shared).await {
        tracing::warn!(channel = %shared.channel, group = %shared.group, error = %e,
            "leaving the group failed; partitions move after the session timeout");
    }
}

/// Write committable progress of owned partitions (fenced by owner and generation).
async fn commit_progress(shared: &Shared) -> Result<()> {
    let dirty: Vec<(u32, i64, i64)> = shared
        .lock()
        .owned
        .iter()
        .filter(|(_, p)| p.commit_to > p.committed)
        .map(|(n, p)| (*n, p.generation, p.commit_to))
        .collect();
    if dirty.is_empty() {
        return Ok(());
    }
    let b = &shared.broker;
    let mut tx = b
        .inner
        .write_begin()
        .await
        .map_err(b.err("committing offsets"))?;
    let mut fenced = Vec::new();
    for (p, generation, to) in &dirty {
        let r = sqlx::query(
            "UPDATE courier_groups SET committed = max(committed, ?)
             WHERE channel = ? AND grp = ? AND partition = ? AND owner = ? AND generation = ?",
        )
        .bind(to)
        .bind(shared.channel.as_str())
        .bind(shared.group.as_str())
        .bind(i64::from(*p))
        .bind(&shared.member)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(b.err("committing offsets"))?;
        if r.rows_affected() == 0 {
            fenced.push((*p, *generation));
        }
    }
    tx.commit().await.map_err(b.err("committing offsets"))?;
    let mut st = shared.lock();
    for (p, generation, to) in dirty {
        if let Some(ps) = st.owned.get_mut(&p)
            && ps.generation == generation
        {
            ps.committed = ps.committed.max(to);
        }
    }
    for (p, generation) in fenced {
        if st
            .owned
            .get(&p)
            .is_some_and(|ps| ps.generation == generation)
        {
            tracing::warn!(channel = %shared.channel, group = %shared.group, partition = p,
                "lost partition (fenced): another member owns it now");
            st.owned.remove(&p);
        }
    }
    Ok(())
}

/// Heartbeat + rebalance in one write transaction, using the database's clock.
async fn rebalance(shared: &Shared) -> Result<()> {
    let b = &shared.broker;
    let cfg = &b.inner.config;
    let ch = shared.channel.as_str();
    let grp = shared.group.as_str();
    let me = shared.member.as_str();
    let err = |what: &'static str| b.err(what);
    let mut tx = b.inner.write_begin().await.map_err(err("heartbeat"))?;
    sqlx::query(
        "INSERT INTO courier_members (channel, grp, member, joined_at, last_seen)
         VALUES (?, ?, ?, unixepoch('subsec'), unixepoch('subsec'))
         ON CONFLICT (channel, grp, member) DO UPDATE SET last_seen = excluded.last_seen",
    )
    .bind(ch)
    .bind(grp)
    .bind(me)
    .execute(&mut *tx)
    .await
    .map_err(err("heartbeat"))?;
    sqlx::query(
        "DELETE FROM courier_members WHERE channel = ? AND grp = ? AND last_seen < unixepoch('subsec') - ?",
    )
    .bind(ch)
    .bind(grp)
    .bind(cfg.session_timeout.as_secs_f64())
    .execute(&mut *tx)
    .await
    .map_err(err("expiring dead members"))?;
    let live: Vec<String> = sqlx::query_scalar(
        "SELECT member FROM courier_members WHERE channel = ? AND grp = ? ORDER BY joined_at, member",
    )
    .bind(ch)
    .bind(grp)
    .fetch_all(&mut *tx)
    .await
    .map_err(err("reading members"))?;
    let rows = sqlx::query(
        "SELECT partition, owner, generation, committed FROM courier_groups
         WHERE channel = ? AND grp = ? ORDER BY partition",
    )
    .bind(ch)
    .bind(grp)
    .fetch_all(&mut *tx)
    .await
    .map_err(err("reading partition owners"))?;

    // Progress of partitions we are about to release, read under the lock once.
    let (mine, progress): (BTreeMap<u32, i64>, BTreeMap<u32, i64>) = {
        let st = shared.lock();
        (
            st.owned.iter().map(|(p, s)| (*p, s.generation)).collect(),
            st.owned.iter().map(|(p, s)| (*p, s.commit_to)).collect(),
        )
    };
    let n = live.len().max(1);
    let mut claimed: Vec<(u32, i64, i64)> = Vec::new();
    let mut keep: Vec<u32> = Vec::new();
    for row in rows {
        let p: i64 = row
            .try_get("partition")
            .map_err(err("reading partition owners"))?;
        let p = p as u32;
        let owner: Option<String> = row
            .try_get("owner")
            .map_err(err("reading partition owners"))?;
        let generation: i64 = row
            .try_get("generation")
            .map_err(err("reading partition owners"))?;
        let committed: i64 = row
            .try_get("committed")
            .map_err(err("reading partition owners"))?;
        let desired = live.get(p as usize % n).map(String::as_str);
        let owner_live = owner
            .as_deref()
            .is_some_and(|o| live.iter().any(|m| m == o));
        let mut free = owner.is_none() || !owner_live;
        if owner.as_deref() == Some(me) {
            if mine.get(&p) != Some(&generation) {
                // We think otherwise: our view is stale; give it up cleanly.
                free = true;
            } else if desired != Some(me) {
                // Someone else should have it: commit our progress and release.
                let to = progress
                    .get(&p)
                    .copied()
                    .unwrap_or(committed)
                    .max(committed);
                sqlx::query(
                    "UPDATE courier_groups SET committed = ?, owner = NULL, generation = generation + 1
                     WHERE channel = ? AND grp = ? AND partition = ? AND owner = ? AND generation = ?",
                )
                .bind(to)
                .bind(ch)
                .bind(grp)
                .bind(p as i64)
                .bind(me)
                .bind(generation)
                .execute(&mut *tx)
                .await
                .map_err(err("releasing a partition"))?;
                continue;
            } else {
                keep.push(p);
                continue;
            }
        }
        if free && desired == Some(me) {
            let new_gen = generation + 1;
            sqlx::query(
                "UPDATE courier_groups SET owner = ?, generation = ?
                 WHERE channel = ? AND grp = ? AND partition = ? AND generation = ?",
            )
            .bind(me)
            .bind(new_gen)
            .bind(ch)
            .bind(grp)
            .bind(p as i64)
            .bind(generation)
            .execute(&mut *tx)
            .await
            .map_err(err("claiming a partition"))?;
            claimed.push((p, new_gen, committed));
        } else if free && owner.is_some() {
            // The owner is dead: free the partition for its desired member.
            sqlx::query(
                "UPDATE courier_groups SET owner = NULL, generation = generation + 1
                 WHERE channel = ? AND grp = ? AND partition = ? AND generation = ?",
            )
            .bind(ch)
            .bind(grp)
            .bind(p as i64)
            .bind(generation)
            .execute(&mut *tx)
            .await
            .map_err(err("freeing a dead member's partition"))?;
        }
    }
    tx.commit().await.map_err(err("heartbeat"))?;

    let mut st = shared.lock();
    st.owned.retain(|p, _| keep.contains(p));
    let any_new = !claimed.is_empty();
    for (p, generation, committed) in claimed {
        tracing::debug!(
            channel = ch,
            group = grp,
            partition = p,
            generation,
            "claimed partition"
        );
        st.owned.insert(
            p,
            PartitionState {
                generation,
                cursor: committed,
                in_flight: VecDeque::new(),
                commit_to: committed,
                committed,
            },
        );
    }
    drop(st);
    if any_new {
        shared.fetch_now.notify_one();
    }
    Ok(())
}

/// Commit, release everything, leave the group.
async fn leave(shared: &Shared) -> Result<()> {
    commit_progress(shared).await?;
    let owned: Vec<(u32, i64)> = {
        let mut st = shared.lock();
        st.closed = true;
        let v = st.owned.iter().map(|(p, s)| (*p, s.generation)).collect();
        st.owned.clear();
        v
    };
    let b = &shared.broker;
    let mut tx = b
        .inner
        .write_begin()
        .await
        .map_err(b.err("leaving a group"))?;
    for (p, generation) in owned {
        sqlx::query(
            "UPDATE courier_groups SET owner = NULL, generation = generation + 1
             WHERE channel = ? AND grp = ? AND partition = ? AND owner = ? AND generation = ?",
        )
        .bind(shared.channel.as_str())
        .bind(shared.group.as_str())
        .bind(i64::from(p))
        .bind(&shared.member)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(b.err("leaving a group"))?;
    }
    sqlx::query("DELETE FROM courier_members WHERE channel = ? AND grp = ? AND member = ?")
        .bind(shared.channel.as_str())
        .bind(shared.group.as_str())
        .bind(&shared.member)
        .execute(&mut *tx)
        .await
        .map_err(b.err("leaving a group"))?;
    tx.commit().await.map_err(b.err("leaving a group"))?;
    b.inner.waker.bump();
    Ok(())
}

struct Fetched {
    partition: u32,
    generation: i64,
    offset: i64,
    message: std::result::Result<courier_core::Message, courier_core::Malformed>,
}

async fn read_partition(
    shared: &Shared,
    partition: u32,
    after: i64,
    limit: u32,
) -> Result<Vec<(i64, String, String, Vec<u8>)>> {
    let b = &shared.broker;
    let rows = sqlx::query(
        "SELECT seq, message_id, headers, payload FROM courier_log
         WHERE channel = ? AND partition = ? AND seq > ? ORDER BY seq LIMIT ?",
    )
    .bind(shared.channel.as_str())
    .bind(i64::from(partition))
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(&b.inner.read)
    .await
    .map_err(b.err("reading a partition"))?;
    rows.into_iter()
        .map(|r| {
            Ok((
                r.try_get("seq").map_err(b.err("reading a partition"))?,
                r.try_get("message_id")
                    .map_err(b.err("reading a partition"))?,
                r.try_get("headers").map_err(b.err("reading a partition"))?,
                r.try_get("payload").map_err(b.err("reading a partition"))?,
            ))
        })
        .collect()
}

/// One round over the owned partitions; returns how many messages were fetched.
/// Read every owned partition after its cursor in ONE query (a `UNION ALL` of indexed
/// range scans) on the fetcher's own connection.
async fn read_owned(
    shared: &Shared,
    conn: &mut SqliteConnection,
    plan: &[(u32, i64, i64, u32)],
) -> Result<Vec<(u32, i64, String, String, Vec<u8>)>> {
    let b = &shared.broker;
    let mut sql = String::new();
    for i in 0..plan.len() {
        if i > 0 {
            sql.push_str(" UNION ALL ");
        }
        sql.push_str(
            "SELECT * FROM (SELECT partition, seq, message_id, headers, payload FROM courier_log \
             WHERE channel = ? AND partition = ? AND seq > ? ORDER BY seq LIMIT ?)",
        );
    }
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (p, _, cursor, limit) in plan {
        q = q
            .bind(shared.channel.as_str())
            .bind(i64::from(*p))
            .bind(*cursor)
            .bind(i64::from(*limit));
    }
    let rows = q
        .fetch_all(&mut *conn)
        .await
        .map_err(b.err("reading partitions"))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let p: i64 = r
            .try_get("partition")
            .map_err(b.err("reading partitions"))?;
        out.push((
            p as u32,
            r.try_get("seq").map_err(b.err("reading partitions"))?,
            r.try_get("message_id")
                .map_err(b.err("reading partitions"))?,
            r.try_get("headers").map_err(b.err("reading partitions"))?,
            r.try_get("payload").map_err(b.err("reading partitions"))?,
        ));
    }
    // Per partition in offset order, whatever order the compound select produced.
    out.sort_by_key(|(p, seq, ..)| (*p, *seq));
    Ok(out)
}

/// One round over the owned partitions; returns how many messages were fetched, or
/// `None` when the subscription is gone.
async fn fetch_round(
    shared: &Arc<Shared>,
    conn: &mut SqliteConnection,
    out: &mpsc::Sender<Delivery>,
) -> Result<Option<usize>> {
    let cfg = &shared.broker.inner.config;
    let plan: Vec<(u32, i64, i64, u32)> = shared
        .lock()
        .owned
        .iter()
        .filter(|(_, s)| s.in_flight.len() < cfg.max_in_flight)
        .map(|(p, s)| {
            let room = cfg.max_in_flight - s.in_flight.len();
            (
                *p,
                s.generation,
                s.cursor,
                (cfg.fetch_batch as usize).min(room) as u32,
            )
        })
        .collect();
    if plan.is_empty() {
        return Ok(Some(0));
    }
    let rows = read_owned(shared, conn, &plan).await?;
    if rows.is_empty() {
        return Ok(Some(0));
    }
    let mut batch = Vec::with_capacity(rows.len());
    {
        let mut st = shared.lock();
        for (p, generation, cursor, _) in &plan {
            let Some(ps) = st.owned.get_mut(p) else {
                continue;
            };
            // Ownership or position changed while we read: drop this partition's rows.
            if ps.generation != *generation || ps.cursor != *cursor {
                continue;
            }
            for (_, seq, id, headers, payload) in rows.iter().filter(|r| r.0 == *p) {
                ps.in_flight.push_back((*seq, false));
                ps.cursor = *seq;
                batch.push(Fetched {
                    partition: *p,
                    generation: *generation,
                    offset: *seq,
                    message: crate::decode_message(id, headers, payload.clone().into()),
                });
            }
        }
    }
    let total = batch.len();
    for f in batch {
        if out.send(delivery(shared, out, f, 0)).await.is_err() {
            return Ok(None);
        }
    }
    Ok(Some(total))
}

fn delivery(
    shared: &Arc<Shared>,
    out: &mpsc::Sender<Delivery>,
    f: Fetched,
    redeliveries: u32,
) -> Delivery {
    Delivery::new(
        f.message,
        shared.channel.clone(),
        Some(Position {
            partition: f.partition,
            offset: f.offset as u64,
        }),
        redeliveries,
        Box::new(SqliteAcker {
            shared: shared.clone(),
            out: out.downgrade(),
            partition: f.partition,
            generation: f.generation,
            offset: f.offset,
            redeliveries,
        }),
    )
}

async fn fetcher(
    shared: Arc<Shared>,
    out: mpsc::Sender<Delivery>,
    mut stop: watch::Receiver<bool>,
) {
    let poll = shared.broker.inner.config.poll_interval;
    let mut wake = shared.broker.inner.waker.subscribe();
    let mut failures = 0u32;
    let mut recheck = courier_core::wakeup::Recheck::default();
    let mut conn: Option<SqliteConnection> = None;
    loop {
        wake.borrow_and_update();
        if conn.is_none() {
            match SqliteConnection::connect_with(&shared.broker.inner.read_options).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    failures += 1;
                    tracing::warn!(channel = %shared.channel, error = %e, "cannot open a read connection; retrying");
                    tokio::select! {
                        _ = stopped(&mut stop) => return,
                        _ = tokio::time::sleep(Duration::from_millis(50u64 << failures.min(6))) => {}
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match fetch_round(&shared, c, &out).await {
            Ok(None) => return,
            Ok(Some(n)) if n > 0 => {
                failures = 0;
                recheck.found();
                continue;
            }
            Ok(Some(_)) => failures = 0,
            Err(e) => {
                conn = None;
                failures += 1;
                let delay =
                    Duration::from_millis(20u64.saturating_mul(1 << failures.min(8)).min(5_000));
                tracing::warn!(channel = %shared.channel, group = %shared.group, error = %e, ?delay, "fetch failed; retrying");
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        }
        let wait = recheck.next_wait(poll);
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = out.closed() => return,
            r = wake.changed() => {
                if r.is_err() { return; }
                recheck.woken();
            }
            _ = shared.fetch_now.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if shared.lock().closed {
            return;
        }
    }
}

struct SqliteAcker {
    shared: Arc<Shared>,
    out: mpsc::WeakSender<Delivery>,
    partition: u32,
    generation: i64,
    offset: i64,
    redeliveries: u32,
}

impl Acker for SqliteAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let room_freed = {
            let mut st = self.shared.lock();
            match st.owned.get_mut(&self.partition) {
                Some(ps) if ps.generation == self.generation => {
                    let was_full =
                        ps.in_flight.len() >= self.shared.broker.inner.config.max_in_flight;
                    ps.ack(self.offset);
                    was_full
                }
                // Not ours any more: the new owner redelivers; the inbox skips it.
                _ => false,
            }
        };
        if room_freed {
            self.shared.fetch_now.notify_one();
        }
        Box::pin(async { Ok(()) })
    }

    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let this = *self;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let still_ours = this
                    .shared
                    .lock()
                    .owned
                    .get(&this.partition)
                    .is_some_and(|ps| ps.generation == this.generation);
                if !still_ours {
                    return;
                }
                let Some(out) = this.out.upgrade() else {
                    return;
                };
                match read_partition(&this.shared, this.partition, this.offset - 1, 1).await {
                    Ok(rows) => {
                        if let Some((seq, id, headers, payload)) = rows.into_iter().next()
                            && seq == this.offset
                        {
                            let f = Fetched {
                                partition: this.partition,
                                generation: this.generation,
                                offset: seq,
                                message: crate::decode_message(&id, &headers, payload.into()),
                            };
                            let d = delivery(&this.shared, &out, f, this.redeliveries + 1);
                            let _ = out.send(d).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "redelivery read failed; the message comes back after a restart or rebalance")
                    }
                }
            });
            Ok(())
        })
    }
}
