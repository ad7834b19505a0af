//! What `courier channels` shows: channels, partitions, groups, members, committed
//! offsets, owners and lag — the same shape as `courier_sqlite`'s `describe()`.

use super::PgBroker;
use courier_core::Result;
use sqlx::Row;

pub use courier_core::admin::{ChannelInfo, GroupInfo, GroupPartition, PartitionInfo};

impl PgBroker {
    /// Describe every channel (or only the one named `only`). Read-only; offsets are
    /// dense per partition, so lag is `head - committed`.
    pub async fn describe(&self, only: Option<&str>) -> Result<Vec<ChannelInfo>> {
        let e = || self.err("describing channels");
        let pool = &self.inner.pool;
        let channels = sqlx::query(
            "SELECT name, partitions FROM courier_broker_channels
             WHERE $1::text IS NULL OR name = $1 ORDER BY name",
        )
        .bind(only)
        .fetch_all(pool)
        .await
        .map_err(e())?;
        let timeout = self.inner.config.session_timeout.as_secs_f64();
        let mut out = Vec::with_capacity(channels.len());
        for c in channels {
            let name: String = c.try_get("name").map_err(e())?;
            let partitions: i32 = c.try_get("partitions").map_err(e())?;
            let rows = sqlx::query(
                "SELECT p.partition, p.head,
                   (SELECT count(*) FROM courier_broker_log l
                    WHERE l.channel = p.channel AND l.partition = p.partition) AS n
                 FROM courier_broker_partitions p WHERE p.channel = $1 ORDER BY p.partition",
            )
            .bind(&name)
            .fetch_all(pool)
            .await
            .map_err(e())?;
            let mut partition_info = Vec::with_capacity(rows.len());
            for r in rows {
                partition_info.push(PartitionInfo {
                    partition: r.try_get::<i32, _>("partition").map_err(e())? as u32,
                    messages: u(r.try_get("n").map_err(e())?),
                    head: u(r.try_get("head").map_err(e())?),
                });
            }
            let rows = sqlx::query(
                "SELECT g.grp, g.partition, g.committed, g.owner, g.generation,
                   greatest(p.head - g.committed, 0) AS lag,
                   (SELECT count(*) FROM courier_broker_members m
                    WHERE m.channel = g.channel AND m.grp = g.grp
                      AND m.last_seen >= clock_timestamp() - make_interval(secs => $2)) AS members
                 FROM courier_broker_groups g
                 JOIN courier_broker_partitions p
                   ON p.channel = g.channel AND p.partition = g.partition
                 WHERE g.channel = $1 ORDER BY g.grp, g.partition",
            )
            .bind(&name)
            .bind(timeout)
            .fetch_all(pool)
            .await
            .map_err(e())?;
            let mut groups: Vec<GroupInfo> = Vec::new();
            for r in rows {
                let grp: String = r.try_get("grp").map_err(e())?;
                let part = GroupPartition {
                    partition: r.try_get::<i32, _>("partition").map_err(e())? as u32,
                    committed: u(r.try_get("committed").map_err(e())?),
                    owner: r.try_get("owner").map_err(e())?,
                    generation: u(r.try_get("generation").map_err(e())?),
                    lag: u(r.try_get("lag").map_err(e())?),
                };
                let members = u(r.try_get("members").map_err(e())?);
                match groups.last_mut() {
                    Some(g) if g.group == grp => {
                        g.lag += part.lag;
                        g.partitions.push(part);
                    }
                    _ => groups.push(GroupInfo {
                        group: grp,
                        members,
                        lag: part.lag,
                        partitions: vec![part],
                    }),
                }
            }
            out.push(ChannelInfo {
                channel: name,
                partitions: u32::try_from(partitions).unwrap_or(0),
                messages: partition_info.iter().map(|p| p.messages).sum(),
                partition_info,
                groups,
            });
        }
        Ok(out)
    }
}

/// A count or offset read from a BIGINT column.
fn u(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
