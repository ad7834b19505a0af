//! Writing the log (publish, offsets in commit order) and pruning it (retention).

use super::{PgBroker, listen};
use courier_core::partition::partition_for;
use courier_core::{
    ChannelName, Error, ErrorKind, ErrorStatus, Message, Position, Receipt, Result,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// Most messages and bytes per `INSERT` of a publish (bounded statement size).
const INSERT_CHUNK: usize = 256;
const INSERT_CHUNK_BYTES: usize = 8 << 20;

impl PgBroker {
    /// Publish a non-empty batch in one transaction; resolves after `COMMIT`.
    pub(super) async fn publish_batch(&self, messages: &[Message]) -> Result<Receipt> {
        // Route every message first: a bad one refuses the whole batch, storing nothing.
        let mut routed = Vec::with_capacity(messages.len());
        for m in messages {
            m.check_size(self.inner.config.max_message_bytes)?;
            let channel = m.channel()?;
            let n = self.partitions(&channel).await?;
            let partition = match m.headers.partition_key() {
                Some(k) => partition_for(k, n),
                None => partition_for(&m.id.to_string(), n),
            };
            routed.push((channel, partition));
        }
        let mut counts: BTreeMap<(&str, u32), i64> = BTreeMap::new();
        for (channel, partition) in &routed {
            *counts.entry((channel.as_str(), *partition)).or_default() += 1;
        }
        let e = || self.err("publishing");
        let mut tx = self.inner.pool.begin().await.map_err(e())?;
        // Take the counter rows in one order (no deadlock between two batches), then bump
        // them; the locks are held until COMMIT (see the module docs).
        let (chs, parts, ns): (Vec<&str>, Vec<i32>, Vec<i64>) = counts
            .iter()
            .map(|((c, p), n)| (*c, *p as i32, *n))
            .collect();
        if counts.len() > 1 {
            sqlx::query(
                "SELECT 1 FROM courier_broker_partitions p
                 JOIN unnest($1::text[], $2::int[]) AS u(c, pt)
                   ON p.channel = u.c AND p.partition = u.pt
                 ORDER BY p.channel, p.partition FOR UPDATE OF p",
            )
            .bind(&chs)
            .bind(&parts)
            .execute(&mut *tx)
            .await
            .map_err(e())?;
        }
        let heads: Vec<(String, i32, i64)> = sqlx::query_as(
            "UPDATE courier_broker_partitions p SET head = p.head + u.n
             FROM unnest($1::text[], $2::int[], $3::bigint[]) AS u(c, pt, n)
             WHERE p.channel = u.c AND p.partition = u.pt
             RETURNING p.channel, p.partition, p.head",
        )
        .bind(&chs)
        .bind(&parts)
        .bind(&ns)
        .fetch_all(&mut *tx)
        .await
        .map_err(e())?;
        // Next offset to hand out per partition: head - n + 1.
        let mut next: HashMap<(String, u32), i64> = HashMap::new();
        for (c, p, head) in heads {
            let n = counts.get(&(c.as_str(), p as u32)).copied().unwrap_or(0);
            next.insert((c, p as u32), head - n + 1);
        }
        let mut positions = Vec::with_capacity(messages.len());
        for (channel, partition) in &routed {
            let Some(slot) = next.get_mut(&(channel.to_string(), *partition)) else {
                return Err(Error::new(
                    ErrorKind::Storage,
                    format!(
                        "publishing in broker {}: partition {partition} of channel {channel} \
                         has no counter row (was the channel deleted by hand?)",
                        self.inner.describe
                    ),
                )
                .with_status(ErrorStatus::Permanent));
            };
            positions.push(Position {
                partition: *partition,
                offset: *slot as u64,
            });
            *slot += 1;
        }
        let rows: Vec<_> = messages.iter().zip(&routed).zip(&positions).collect();
        let mut chunks: Vec<&[_]> = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, ((m, _), _)) in rows.iter().enumerate() {
            if i > start && (i - start >= INSERT_CHUNK || bytes >= INSERT_CHUNK_BYTES) {
                chunks.push(&rows[start..i]);
                (start, bytes) = (i, 0);
            }
            bytes += m.payload.len();
        }
        chunks.push(&rows[start..]);
        // The last INSERT also sends the wake-ups (one round trip less); NOTIFY is
        // delivered on COMMIT only.
        let touched: BTreeSet<&str> = routed.iter().map(|(c, _)| c.as_str()).collect();
        let wakeups: Vec<String> = touched
            .iter()
            .map(|c| listen::payload(c, &self.inner.schema))
            .collect();
        let last = chunks.len() - 1;
        for (n, chunk) in chunks.into_iter().enumerate() {
            let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut headers, mut payloads) = (Vec::new(), Vec::new());
            for ((m, (channel, _)), pos) in chunk {
                cols.0.push(channel.as_str());
                cols.1.push(pos.partition as i32);
                cols.2.push(pos.offset as i64);
                cols.3.push(m.id.to_string());
                headers.push(m.headers.to_json());
                payloads.push(m.payload.to_vec());
            }
            let wake: &[String] = if n == last { &wakeups } else { &[] };
            sqlx::query(
                "WITH stored AS (
                   INSERT INTO courier_broker_log
                     (channel, partition, seq, message_id, headers, payload)
                   SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[], $4::text[],
                                        $5::text[], $6::bytea[])
                   RETURNING 1)
                 SELECT pg_notify($7, x) FROM unnest($8::text[]) AS x",
            )
            .bind(&cols.0)
            .bind(&cols.1)
            .bind(&cols.2)
            .bind(&cols.3)
            .bind(&headers)
            .bind(&payloads)
            .bind(listen::NOTIFY_CHANNEL)
            .bind(wake)
            .execute(&mut *tx)
            .await
            .map_err(e())?;
        }
        tx.commit().await.map_err(e())?;
        for c in touched {
            self.inner.wakes.bump(c);
        }
        Ok(Receipt {
            durability: self.inner.durability,
            positions: positions.into_iter().map(Some).collect(),
        })
    }

    /// Delete messages that every group of their channel has committed past and that are
    /// older than `retention`, in batches of the configured size (short locks). A channel
    /// that no group reads keeps its messages. Returns how many were deleted.
    pub async fn prune(&self, retention: Duration) -> Result<u64> {
        self.prune_channel(None, retention).await
    }

    pub(super) async fn prune_channel(
        &self,
        channel: Option<&ChannelName>,
        retention: Duration,
    ) -> Result<u64> {
        let batch = i64::from(self.inner.config.prune_batch.max(1));
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM courier_broker_log WHERE ctid = ANY(ARRAY(
                   SELECT l.ctid FROM courier_broker_log l
                   JOIN (SELECT channel, partition, min(committed) AS upto
                         FROM courier_broker_groups
                         WHERE $1::text IS NULL OR channel = $1
                         GROUP BY channel, partition) g
                     ON l.channel = g.channel AND l.partition = g.partition AND l.seq <= g.upto
                   WHERE l.published_at < clock_timestamp() - make_interval(secs => $2)
                   LIMIT $3))",
            )
            .bind(channel.map(ChannelName::as_str))
            .bind(retention.as_secs_f64())
            .bind(batch)
            .execute(&self.inner.pool)
            .await
            .map_err(self.err("pruning consumed messages"))?
            .rows_affected();
            total += n;
            if (n as i64) < batch {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }
}
