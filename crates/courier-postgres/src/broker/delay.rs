//! Durable delays of nacked messages: `courier_broker_delays` holds, per group and
//! message, when it may be delivered again (database clock) and how often it was
//! redelivered. The member that nacked redelivers from a timer; the table matters when
//! that member dies first: the next owner reads the row with the message and waits out
//! the rest of the delay instead of delivering at once. Rows go when the group's
//! committed offset passes their message.

use super::member::Shared;
use courier_core::Result;
use std::time::Duration;

/// Store that message `offset` of `partition` may come back after `delay`, as
/// redelivery number `redeliveries`; only while this member owns the partition at
/// `generation` (fenced like an offset commit).
pub(super) async fn record(
    shared: &Shared,
    partition: u32,
    generation: i64,
    offset: i64,
    delay: Duration,
    redeliveries: u32,
) -> Result<()> {
    let b = &shared.broker;
    sqlx::query(
        "INSERT INTO courier_broker_delays AS d
           (channel, grp, partition, seq, not_before, redeliveries)
         SELECT $1, $2, $3, $4, clock_timestamp() + make_interval(secs => $5), $6
         WHERE EXISTS (SELECT 1 FROM courier_broker_groups g
                       WHERE g.channel = $1 AND g.grp = $2 AND g.partition = $3
                         AND g.owner = $7 AND g.generation = $8)
         ON CONFLICT (channel, grp, partition, seq) DO UPDATE
           SET not_before = excluded.not_before, redeliveries = excluded.redeliveries",
    )
    .bind(shared.channel.as_str())
    .bind(shared.group.as_str())
    .bind(partition as i32)
    .bind(offset)
    .bind(delay.as_secs_f64())
    .bind(i32::try_from(redeliveries).unwrap_or(i32::MAX))
    .bind(&shared.member)
    .bind(generation)
    .execute(&b.inner.pool)
    .await
    .map_err(b.err("storing the delay of a nacked message"))?;
    Ok(())
}

/// Forget the delays of messages up to `to` in `partition` (they are committed).
pub(super) async fn clear_upto(
    tx: &mut sqlx::PgConnection,
    shared: &Shared,
    partition: u32,
    to: i64,
) -> Result<()> {
    let b = &shared.broker;
    sqlx::query(
        "DELETE FROM courier_broker_delays
         WHERE channel = $1 AND grp = $2 AND partition = $3 AND seq <= $4",
    )
    .bind(shared.channel.as_str())
    .bind(shared.group.as_str())
    .bind(partition as i32)
    .bind(to)
    .execute(tx)
    .await
    .map_err(b.err("clearing delays of committed messages"))?;
    Ok(())
}
