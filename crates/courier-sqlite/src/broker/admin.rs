//! What `courier channels` shows: channels, partitions, groups, members, lag.

use super::SqliteBroker;
use courier_core::Result;
use sqlx::Row;

pub use courier_core::admin::{ChannelInfo, GroupInfo, GroupPartition, PartitionInfo};

impl SqliteBroker {
    /// Describe every channel (or one).
    pub async fn describe(&self, only: Option<&str>) -> Result<Vec<ChannelInfo>> {
        let e = || self.err("describing channels");
        let pool = &self.inner.read;
        let channels = sqlx::query(
            "SELECT name, partitions FROM courier_channels WHERE (?1 IS NULL OR name = ?1) ORDER BY name",
        )
        .bind(only)
        .fetch_all(pool)
        .await
        .map_err(e())?;
        let timeout = self.inner.config.session_timeout.as_secs_f64();
        let mut out = Vec::new();
        for c in channels {
            let name: String = c.try_get("name").map_err(e())?;
            let partitions: i64 = c.try_get("partitions").map_err(e())?;
            let mut partition_info = Vec::new();
            for p in 0..partitions {
                let row = sqlx::query(
                    "SELECT count(*) AS n, coalesce(max(seq), 0) AS head FROM courier_log
                     WHERE channel = ? AND partition = ?",
                )
                .bind(&name)
                .bind(p)
                .fetch_one(pool)
                .await
                .map_err(e())?;
                partition_info.push(PartitionInfo {
                    partition: p as u32,
                    messages: row.try_get::<i64, _>("n").map_err(e())? as u64,
                    head: row.try_get::<i64, _>("head").map_err(e())? as u64,
                });
            }
            let group_names: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT grp FROM courier_groups WHERE channel = ? ORDER BY grp",
            )
            .bind(&name)
            .fetch_all(pool)
            .await
            .map_err(e())?;
            let mut groups = Vec::new();
            for g in group_names {
                let members: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM courier_members WHERE channel = ? AND grp = ?
                     AND last_seen >= unixepoch('subsec') - ?",
                )
                .bind(&name)
                .bind(&g)
                .bind(timeout)
                .fetch_one(pool)
                .await
                .map_err(e())?;
                let rows = sqlx::query(
                    "SELECT g.partition, g.committed, g.owner, g.generation,
                       (SELECT count(*) FROM courier_log l WHERE l.channel = g.channel
                          AND l.partition = g.partition AND l.seq > g.committed) AS lag
                     FROM courier_groups g WHERE g.channel = ? AND g.grp = ? ORDER BY g.partition",
                )
                .bind(&name)
                .bind(&g)
                .fetch_all(pool)
                .await
                .map_err(e())?;
                let mut parts = Vec::new();
                for r in rows {
                    parts.push(GroupPartition {
                        partition: r.try_get::<i64, _>("partition").map_err(e())? as u32,
                        committed: r.try_get::<i64, _>("committed").map_err(e())? as u64,
                        owner: r.try_get("owner").map_err(e())?,
                        generation: r.try_get::<i64, _>("generation").map_err(e())? as u64,
                        lag: r.try_get::<i64, _>("lag").map_err(e())? as u64,
                    });
                }
                groups.push(GroupInfo {
                    group: g,
                    members: members as u64,
                    lag: parts.iter().map(|p| p.lag).sum(),
                    partitions: parts,
                });
            }
            out.push(ChannelInfo {
                channel: name,
                partitions: partitions as u32,
                messages: partition_info.iter().map(|p| p.messages).sum(),
                partition_info,
                groups,
            });
        }
        Ok(out)
    }
}
