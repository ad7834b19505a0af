//! Heartbeat + rebalance of one member, in one transaction on the database's clock
//! (see `member.rs` for the rules).

use super::member::{PartitionState, Shared};
use courier_core::Result;
use sqlx::Row;
use std::collections::{BTreeMap, VecDeque};

/// Heartbeat + rebalance in one transaction on the database's clock.
pub(super) async fn rebalance(shared: &Shared) -> Result<()> {
    let b = &shared.broker;
    let cfg = &b.inner.config;
    let (ch, grp, me) = (
        shared.channel.as_str(),
        shared.group.as_str(),
        shared.member.as_str(),
    );
    let e = |what: &'static str| b.err(what);
    let mut tx = b.inner.pool.begin().await.map_err(e("heartbeat"))?;
    // Lock the group first: one rebalance of this group at a time.
    let rows = sqlx::query(
        "SELECT partition, owner, generation, committed FROM courier_broker_groups
         WHERE channel = $1 AND grp = $2 ORDER BY partition FOR UPDATE",
    )
    .bind(ch)
    .bind(grp)
    .fetch_all(&mut *tx)
    .await
    .map_err(e("reading partition owners"))?;
    sqlx::query(
        "INSERT INTO courier_broker_members (channel, grp, member, joined_at, last_seen)
         VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp())
         ON CONFLICT (channel, grp, member) DO UPDATE SET last_seen = clock_timestamp()",
    )
    .bind(ch)
    .bind(grp)
    .bind(me)
    .execute(&mut *tx)
    .await
    .map_err(e("heartbeat"))?;
    sqlx::query(
        "DELETE FROM courier_broker_members WHERE channel = $1 AND grp = $2
         AND last_seen < clock_timestamp() - make_interval(secs => $3)",
    )
    .bind(ch)
    .bind(grp)
    .bind(cfg.session_timeout.as_secs_f64())
    .execute(&mut *tx)
    .await
    .map_err(e("expiring dead members"))?;
    let live: Vec<String> = sqlx::query_scalar(
        "SELECT member FROM courier_broker_members WHERE channel = $1 AND grp = $2
         ORDER BY joined_at, member",
    )
    .bind(ch)
    .bind(grp)
    .fetch_all(&mut *tx)
    .await
    .map_err(e("reading members"))?;

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
        let p: i32 = row
            .try_get("partition")
            .map_err(e("reading partition owners"))?;
        let owner: Option<String> = row
            .try_get("owner")
            .map_err(e("reading partition owners"))?;
        let generation: i64 = row
            .try_get("generation")
            .map_err(e("reading partition owners"))?;
        let committed: i64 = row
            .try_get("committed")
            .map_err(e("reading partition owners"))?;
        let p = p as u32;
        let desired = live.get(p as usize % n).map(String::as_str);
        let owner_live = owner
            .as_deref()
            .is_some_and(|o| live.iter().any(|m| m == o));
        let mut free = owner.is_none() || !owner_live;
        if owner.as_deref() == Some(me) {
            if mine.get(&p) != Some(&generation) {
                // Our view is stale (e.g. a restart of this member's state): start over.
                free = true;
            } else if desired != Some(me) {
                // Someone else should have it: commit our progress and release it.
                let to = progress
                    .get(&p)
                    .copied()
                    .unwrap_or(committed)
                    .max(committed);
                set_owner(&mut tx, shared, p, None, generation, Some(to)).await?;
                continue;
            } else {
                keep.push(p);
                continue;
            }
        }
        if free && desired == Some(me) {
            set_owner(&mut tx, shared, p, Some(me), generation, None).await?;
            claimed.push((p, generation + 1, committed));
        } else if free && owner.is_some() {
            // The owner is dead: free the partition for its desired member.
            set_owner(&mut tx, shared, p, None, generation, None).await?;
        }
    }
    tx.commit().await.map_err(e("heartbeat"))?;

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

/// Hand partition `p` (at `generation`, locked by the caller) to `owner`, bumping the
/// generation, and optionally commit progress `to` in the same statement.
async fn set_owner(
    tx: &mut sqlx::PgConnection,
    shared: &Shared,
    p: u32,
    owner: Option<&str>,
    generation: i64,
    to: Option<i64>,
) -> Result<()> {
    let b = &shared.broker;
    sqlx::query(
        "UPDATE courier_broker_groups
         SET owner = $1, generation = generation + 1, committed = greatest(committed, coalesce($2, committed))
         WHERE channel = $3 AND grp = $4 AND partition = $5 AND generation = $6",
    )
    .bind(owner)
    .bind(to)
    .bind(shared.channel.as_str())
    .bind(shared.group.as_str())
    .bind(p as i32)
    .bind(generation)
    .execute(tx)
    .await
    .map_err(b.err("handing a partition over"))?;
    Ok(())
}
