//! The fetcher of a group member and its acker.
//!
//! The fetcher reads every owned partition after its cursor in ONE query (a lateral join
//! over the partitions' index ranges), sends the deliveries into the bounded subscription
//! channel (back-pressure: a slow consumer stops the fetcher, at most `max_in_flight`
//! unacknowledged messages per partition), and sleeps until a `NOTIFY` for its channel, a
//! claimed partition, freed in-flight room, or the fallback poll.
//!
//! `nack(delay)`: the message stays unacknowledged (the committed offset cannot pass it,
//! so a crash redelivers it) and the member delivers it again after `delay` while
//! messages with other keys keep flowing. The delay is also stored (`delay.rs`), so a
//! member that takes the partition over after a crash waits out the rest of it.

use super::member::{Shared, stopped};
use courier_core::transport::BoxFuture;
use courier_core::{Acker, Delivery, Malformed, Message, Position, Result};
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

struct Fetched {
    partition: u32,
    generation: i64,
    offset: i64,
    message: std::result::Result<Message, Malformed>,
}

/// One stored row: partition, offset, id, headers, payload, and a stored delay (seconds
/// left, redeliveries) if the message was nacked.
type Row7 = (u32, i64, String, String, Vec<u8>, Option<f64>, Option<i32>);

pub(super) fn decode(
    id: String,
    headers: String,
    payload: Vec<u8>,
) -> std::result::Result<Message, Malformed> {
    crate::decode_message(&id, &headers, payload.clone().into()).map_err(|reason| Malformed {
        raw_id: id,
        raw_headers: headers,
        payload: payload.into(),
        reason,
    })
}

/// Read up to `limit` rows of each planned partition after its cursor, in one query.
async fn read_owned(shared: &Shared, plan: &[(u32, i64, i64, u32)]) -> Result<Vec<Row7>> {
    let b = &shared.broker;
    let e = || b.err("reading partitions");
    let parts: Vec<i32> = plan.iter().map(|p| p.0 as i32).collect();
    let after: Vec<i64> = plan.iter().map(|p| p.2).collect();
    let limit: Vec<i64> = plan.iter().map(|p| i64::from(p.3)).collect();
    let rows = sqlx::query(
        "SELECT o.p AS partition, l.seq, l.message_id, l.headers, l.payload,
           extract(epoch FROM d.not_before - clock_timestamp())::float8 AS wait,
           d.redeliveries
         FROM unnest($2::int[], $3::bigint[], $4::bigint[]) AS o(p, after, lim)
         CROSS JOIN LATERAL (
           SELECT seq, message_id, headers, payload FROM courier_broker_log
           WHERE channel = $1 AND partition = o.p AND seq > o.after
           ORDER BY seq LIMIT o.lim) AS l
         LEFT JOIN courier_broker_delays d
           ON d.channel = $1 AND d.grp = $5 AND d.partition = o.p AND d.seq = l.seq",
    )
    .bind(shared.channel.as_str())
    .bind(&parts)
    .bind(&after)
    .bind(&limit)
    .bind(shared.group.as_str())
    .fetch_all(&b.inner.pool)
    .await
    .map_err(e())?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let p: i32 = r.try_get("partition").map_err(e())?;
        out.push((
            p as u32,
            r.try_get("seq").map_err(e())?,
            r.try_get("message_id").map_err(e())?,
            r.try_get("headers").map_err(e())?,
            r.try_get("payload").map_err(e())?,
            r.try_get("wait").map_err(e())?,
            r.try_get("redeliveries").map_err(e())?,
        ));
    }
    out.sort_by_key(|(p, seq, ..)| (*p, *seq));
    Ok(out)
}

/// One round over the owned partitions: how many messages were fetched, or `None` when
/// the subscription is gone.
async fn fetch_round(shared: &Arc<Shared>, out: &mpsc::Sender<Delivery>) -> Result<Option<usize>> {
    let cfg = &shared.broker.inner.config;
    let plan: Vec<(u32, i64, i64, u32)> = shared
        .lock()
        .owned
        .iter()
        .filter(|(_, s)| s.in_flight.len() < cfg.max_in_flight)
        .map(|(p, s)| {
            let room = cfg.max_in_flight - s.in_flight.len();
            let limit = (cfg.fetch_batch.max(1) as usize).min(room) as u32;
            (*p, s.generation, s.cursor, limit)
        })
        .collect();
    if plan.is_empty() {
        return Ok(Some(0));
    }
    let rows = read_owned(shared, &plan).await?;
    if rows.is_empty() {
        return Ok(Some(0));
    }
    let mut batch = Vec::with_capacity(rows.len());
    let mut later = Vec::new();
    {
        let mut st = shared.lock();
        let mut rows = rows.into_iter().peekable();
        for (p, generation, cursor, _) in &plan {
            let mine: Vec<Row7> = std::iter::from_fn(|| rows.next_if(|r| r.0 == *p)).collect();
            let Some(ps) = st.owned.get_mut(p) else {
                continue;
            };
            // Ownership or position changed while we read: drop this partition's rows.
            if ps.generation != *generation || ps.cursor != *cursor {
                continue;
            }
            for (_, seq, id, headers, payload, wait, redeliveries) in mine {
                ps.in_flight.push_back((seq, false));
                ps.cursor = seq;
                let redeliveries = redeliveries.map_or(0, |n| u32::try_from(n).unwrap_or(0));
                match wait {
                    // Nacked before (by a member that is gone): wait out the rest.
                    Some(w) if w > 0.0 => later.push((
                        PgAcker {
                            shared: shared.clone(),
                            out: out.downgrade(),
                            partition: *p,
                            generation: *generation,
                            offset: seq,
                            redeliveries: redeliveries.saturating_sub(1),
                        },
                        Duration::from_secs_f64(w.min(1e9)),
                    )),
                    _ => batch.push((
                        Fetched {
                            partition: *p,
                            generation: *generation,
                            offset: seq,
                            message: decode(id, headers, payload),
                        },
                        redeliveries,
                    )),
                }
            }
        }
    }
    let total = batch.len() + later.len();
    for (acker, wait) in later {
        acker.schedule(wait);
    }
    for (f, redeliveries) in batch {
        if out
            .send(delivery(shared, out, f, redeliveries))
            .await
            .is_err()
        {
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
        Box::new(PgAcker {
            shared: shared.clone(),
            out: out.downgrade(),
            partition: f.partition,
            generation: f.generation,
            offset: f.offset,
            redeliveries,
        }),
    )
}

pub(super) async fn fetcher(
    shared: Arc<Shared>,
    out: mpsc::Sender<Delivery>,
    mut stop: watch::Receiver<bool>,
) {
    let poll = shared.broker.inner.config.poll_interval;
    let mut wake = shared.broker.inner.wakes.subscribe(shared.channel.as_str());
    let mut failures = 0u32;
    loop {
        wake.borrow_and_update();
        match fetch_round(&shared, &out).await {
            Ok(None) => return,
            Ok(Some(n)) => {
                failures = 0;
                if n > 0 {
                    continue;
                }
            }
            Err(e) => {
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
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = out.closed() => return,
            r = wake.changed() => if r.is_err() { return },
            _ = shared.fetch_now.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
        if shared.lock().closed {
            return;
        }
    }
}

pub(super) struct PgAcker {
    shared: Arc<Shared>,
    out: mpsc::WeakSender<Delivery>,
    partition: u32,
    generation: i64,
    offset: i64,
    redeliveries: u32,
}

impl PgAcker {
    fn still_ours(&self) -> bool {
        self.shared
            .lock()
            .owned
            .get(&self.partition)
            .is_some_and(|ps| ps.generation == self.generation)
    }

    /// Read the nacked message again and deliver it to this member.
    async fn redeliver(self) -> Result<()> {
        let Some(out) = self.out.upgrade() else {
            return Ok(());
        };
        let b = &self.shared.broker;
        let row: Option<(String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT message_id, headers, payload FROM courier_broker_log
             WHERE channel = $1 AND partition = $2 AND seq = $3",
        )
        .bind(self.shared.channel.as_str())
        .bind(self.partition as i32)
        .bind(self.offset)
        .fetch_optional(&b.inner.pool)
        .await
        .map_err(b.err("reading a message to redeliver"))?;
        // Gone only if pruned, which needs every group past it: nothing to redeliver.
        let Some((id, headers, payload)) = row else {
            return Ok(());
        };
        if !self.still_ours() {
            return Ok(());
        }
        let f = Fetched {
            partition: self.partition,
            generation: self.generation,
            offset: self.offset,
            message: decode(id, headers, payload),
        };
        let d = delivery(&self.shared, &out, f, self.redeliveries.saturating_add(1));
        let _ = out.send(d).await;
        Ok(())
    }
}

impl PgAcker {
    /// Deliver the message again to this member after `delay`, if it still owns it.
    fn schedule(self, delay: Duration) {
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if !self.still_ours() {
                return;
            }
            if let Err(e) = self.redeliver().await {
                tracing::warn!(error = %e,
                    "redelivery read failed; the message comes back after a restart or rebalance");
            }
        });
    }
}

impl Acker for PgAcker {
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
        let this = *self;
        Box::pin(async move {
            let stored = super::delay::record(
                &this.shared,
                this.partition,
                this.generation,
                this.offset,
                delay,
                this.redeliveries.saturating_add(1),
            )
            .await;
            // Redelivered by this member either way; only a crash needs the stored delay.
            this.schedule(delay);
            stored
        })
    }
}
