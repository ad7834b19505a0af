//! Reading a channel without joining a group (what `courier tail` uses): per-partition
//! cursors, since offsets are per partition, and wake-ups on new messages.

use super::PgBroker;
use courier_core::{ChannelName, Malformed, Message, Position, Result};
use sqlx::Row;
use tokio::sync::watch;

impl PgBroker {
    /// The newest offset of each partition of `channel` (index = partition; 0 when
    /// nothing was published there). Empty when the channel does not exist.
    pub async fn heads(&self, channel: &ChannelName) -> Result<Vec<u64>> {
        let rows: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, head FROM courier_broker_partitions WHERE channel = $1
             ORDER BY partition",
        )
        .bind(channel.as_str())
        .fetch_all(&self.inner.pool)
        .await
        .map_err(self.err("reading a channel"))?;
        Ok(rows
            .into_iter()
            .map(|(_, h)| u64::try_from(h).unwrap_or(0))
            .collect())
    }

    /// Up to `limit` messages of each partition `p` of `channel` after offset
    /// `after[p]` (missing entries count as 0: from the oldest retained), in partition
    /// then offset order, without joining a group (no offsets change). Only committed
    /// messages are read, and offsets follow commit order, so advancing `after[p]` to the
    /// last position seen never skips a message.
    pub async fn read_after(
        &self,
        channel: &ChannelName,
        after: &[u64],
        limit: u32,
    ) -> Result<Vec<(Position, std::result::Result<Message, Malformed>)>> {
        let e = || self.err("reading a channel");
        let partitions = self.heads(channel).await?.len();
        let parts: Vec<i32> = (0..partitions as i32).collect();
        let from: Vec<i64> = (0..partitions)
            .map(|p| {
                after
                    .get(p)
                    .map_or(0, |o| i64::try_from(*o).unwrap_or(i64::MAX))
            })
            .collect();
        let rows = sqlx::query(
            "SELECT o.p AS partition, l.seq, l.message_id, l.headers, l.payload
             FROM unnest($2::int[], $3::bigint[]) AS o(p, after)
             CROSS JOIN LATERAL (
               SELECT seq, message_id, headers, payload FROM courier_broker_log
               WHERE channel = $1 AND partition = o.p AND seq > o.after
               ORDER BY seq LIMIT $4) AS l
             ORDER BY 1, 2",
        )
        .bind(channel.as_str())
        .bind(&parts)
        .bind(&from)
        .bind(i64::from(limit.max(1)))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(e())?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let partition: i32 = r.try_get("partition").map_err(e())?;
            let seq: i64 = r.try_get("seq").map_err(e())?;
            let id: String = r.try_get("message_id").map_err(e())?;
            let headers: String = r.try_get("headers").map_err(e())?;
            let payload: Vec<u8> = r.try_get("payload").map_err(e())?;
            let position = Position {
                partition: u32::try_from(partition).unwrap_or(0),
                offset: u64::try_from(seq).unwrap_or(0),
            };
            out.push((position, super::fetch::decode(id, headers, payload)));
        }
        Ok(out)
    }

    /// Wake-ups for new messages on `channel` (from this process's publishes and, by
    /// `LISTEN`, other processes'). Take it BEFORE reading; `changed()` then also covers
    /// a commit in between. Notifications can be lost while the listener reconnects, so
    /// callers still poll now and then.
    pub fn changes(&self, channel: &ChannelName) -> PgBrokerChanges {
        PgBrokerChanges {
            rx: self.inner.wakes.subscribe(channel.as_str()),
        }
    }
}

/// Wake-ups for one channel, from [`PgBroker::changes`].
#[derive(Debug)]
pub struct PgBrokerChanges {
    rx: watch::Receiver<u64>,
}

impl PgBrokerChanges {
    /// Resolve when messages may have been published since the last call (or since this
    /// handle was made).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The broker is gone: nothing will change any more.
            std::future::pending::<()>().await;
        }
    }
}
