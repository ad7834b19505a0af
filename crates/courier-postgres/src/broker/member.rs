//! One member of a consumer group: joining, heartbeats, rebalancing, fenced offset
//! commits, leaving. The fetcher and the acker live in `fetch.rs`.
//!
//! - **One clock.** Heartbeats (`last_seen`) and the liveness check use the database's
//!   `clock_timestamp()`, never a process's clock.
//! - **Rebalancing.** Every member computes the same assignment from the same rows: live
//!   members sorted by join time, partition `p` goes to member `p mod n`. A heartbeat
//!   transaction first locks the group's partition rows (`FOR UPDATE`, in partition
//!   order), so the rebalances of one group are serialised; it releases what this member
//!   should no longer own (committing its progress), frees partitions of dead members,
//!   and claims free partitions it should own, bumping the generation each time.
//! - **Fencing.** Every offset commit is `UPDATE .. WHERE owner = me AND generation = g`:
//!   a member paused past its session whose partition moved changes nothing, learns that
//!   it lost the partition, and stops delivering it.
//! - **Progress** per partition is the highest offset below which every delivered message
//!   is acknowledged, so a message waiting for a delayed redelivery is never skipped by a
//!   crash: after a crash everything above the committed offset is delivered again.

use super::PgBroker;
use super::rebalance::rebalance;
use courier_core::{ChannelName, GroupName, Result, StartFrom, SubscribeOptions, Subscription};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, mpsc, watch};

pub(super) struct PartitionState {
    pub(super) generation: i64,
    /// Last offset read from the log.
    pub(super) cursor: i64,
    /// Delivered offsets in order, with whether each was acknowledged.
    pub(super) in_flight: VecDeque<(i64, bool)>,
    /// Progress we may commit.
    pub(super) commit_to: i64,
    /// Progress the database has.
    pub(super) committed: i64,
}

impl PartitionState {
    pub(super) fn ack(&mut self, offset: i64) {
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
pub(super) struct MemberState {
    pub(super) owned: BTreeMap<u32, PartitionState>,
    pub(super) closed: bool,
}

pub(super) struct Shared {
    pub(super) broker: PgBroker,
    pub(super) channel: ChannelName,
    pub(super) group: GroupName,
    pub(super) member: String,
    pub(super) state: Mutex<MemberState>,
    /// Wakes the fetcher when partitions were claimed or in-flight room freed up.
    pub(super) fetch_now: Notify,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, MemberState> {
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

pub(super) async fn join(broker: PgBroker, options: SubscribeOptions) -> Result<Subscription> {
    broker.partitions(&options.channel).await?;
    let latest = matches!(options.start, StartFrom::Latest);
    // A new group starts at offset 0 (earliest) or at each partition's head (latest);
    // an existing group keeps its committed offsets.
    sqlx::query(
        "INSERT INTO courier_broker_groups (channel, grp, partition, committed, owner, generation)
         SELECT p.channel, $2, p.partition, CASE WHEN $3 THEN p.head ELSE 0 END, NULL, 0
         FROM courier_broker_partitions p WHERE p.channel = $1
         ON CONFLICT DO NOTHING",
    )
    .bind(options.channel.as_str())
    .bind(options.group.as_str())
    .bind(latest)
    .execute(&broker.inner.pool)
    .await
    .map_err(broker.err("joining a consumer group"))?;
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
    tokio::spawn(super::fetch::fetcher(shared, tx, stop_rx));
    Ok(Subscription::new(
        rx,
        Box::new(Membership { _stop: stop_tx }),
    ))
}

/// Resolves when the [`Membership`] (the sender) is dropped.
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    while stop.changed().await.is_ok() {}
}

async fn coordinator(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.broker.inner.config.clone();
    let interval = |every| {
        let mut i = tokio::time::interval(every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    };
    let mut heartbeat = interval(cfg.heartbeat_interval);
    let mut commit = interval(cfg.commit_interval);
    let mut prune = interval(cfg.prune_interval);
    heartbeat.tick().await;
    prune.tick().await;
    let mut last_heartbeat = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = heartbeat.tick() => match rebalance(&shared).await {
                Ok(()) => last_heartbeat = tokio::time::Instant::now(),
                Err(e) => {
                    tracing::warn!(channel = %shared.channel, group = %shared.group, error = %e,
                        "heartbeat failed; retrying (partitions move if this lasts longer than the session timeout)");
                    // Self-fencing: past the session timeout the group may have given our
                    // partitions away; stop delivering them (commits are fenced anyway).
                    if last_heartbeat.elapsed() >= cfg.session_timeout {
                        let mut st = shared.lock();
                        if !st.owned.is_empty() {
                            tracing::warn!(channel = %shared.channel, group = %shared.group,
                                "no heartbeat for the session timeout: giving up owned partitions");
                            st.owned.clear();
                        }
                    }
                }
            },
            _ = prune.tick() => {
                if let Err(e) = shared.broker.prune_channel(Some(&shared.channel), cfg.retention).await {
                    tracing::warn!(channel = %shared.channel, error = %e, "pruning consumed messages failed; will try again");
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

/// Write committable progress of owned partitions, fenced by owner and generation.
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
    let e = || b.err("committing offsets");
    let mut tx = b.inner.pool.begin().await.map_err(e())?;
    let mut fenced = Vec::new();
    // Ascending partition order, like the rebalance's row locks: no deadlock.
    for (p, generation, to) in &dirty {
        let r = sqlx::query(
            "UPDATE courier_broker_groups SET committed = greatest(committed, $1)
             WHERE channel = $2 AND grp = $3 AND partition = $4 AND owner = $5 AND generation = $6",
        )
        .bind(to)
        .bind(shared.channel.as_str())
        .bind(shared.group.as_str())
        .bind(*p as i32)
        .bind(&shared.member)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(e())?;
        if r.rows_affected() == 0 {
            fenced.push((*p, *generation));
        } else {
            super::delay::clear_upto(&mut tx, shared, *p, *to).await?;
        }
    }
    tx.commit().await.map_err(e())?;
    let mut st = shared.lock();
    for (p, generation, to) in dirty {
        if let Some(ps) = st.owned.get_mut(&p)
            && ps.generation == generation
        {
            ps.committed = ps.committed.max(to);
        }
    }
    for (p, generation) in fenced {
        b.inner.fenced_commits.fetch_add(1, Ordering::Relaxed);
        if st
            .owned
            .get(&p)
            .is_some_and(|ps| ps.generation == generation)
        {
            tracing::warn!(channel = %shared.channel, group = %shared.group, partition = p,
                "lost partition (fenced): another member owns it now; its commit was refused");
            st.owned.remove(&p);
        }
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
    let e = || b.err("leaving a group");
    let mut tx = b.inner.pool.begin().await.map_err(e())?;
    for (p, generation) in owned {
        sqlx::query(
            "UPDATE courier_broker_groups SET owner = NULL, generation = generation + 1
             WHERE channel = $1 AND grp = $2 AND partition = $3 AND owner = $4 AND generation = $5",
        )
        .bind(shared.channel.as_str())
        .bind(shared.group.as_str())
        .bind(p as i32)
        .bind(&shared.member)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(e())?;
    }
    sqlx::query(
        "DELETE FROM courier_broker_members WHERE channel = $1 AND grp = $2 AND member = $3",
    )
    .bind(shared.channel.as_str())
    .bind(shared.group.as_str())
    .bind(&shared.member)
    .execute(&mut *tx)
    .await
    .map_err(e())?;
    tx.commit().await.map_err(e())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::PartitionState;
    use std::collections::VecDeque;

    fn state(cursor: i64, offsets: &[i64]) -> PartitionState {
        PartitionState {
            generation: 1,
            cursor,
            in_flight: offsets.iter().map(|o| (*o, false)).collect::<VecDeque<_>>(),
            commit_to: 0,
            committed: 0,
        }
    }

    #[test]
    fn progress_stops_at_the_oldest_unacknowledged() {
        let mut s = state(4, &[1, 2, 3, 4]);
        s.ack(2);
        s.ack(4);
        assert_eq!(s.commit_to, 0, "1 is not acknowledged yet");
        s.ack(1);
        assert_eq!(s.commit_to, 2, "3 is still open");
        s.ack(3);
        assert_eq!(s.commit_to, 4);
        assert!(s.in_flight.is_empty());
    }
}
