//! The broker's tables, created idempotently in the current schema.

use crate::error::map;
use courier_core::{Error, ErrorKind, Result};
use sqlx::postgres::PgPool;

/// `courier_broker_partitions.head` is the last offset handed out in a partition: a
/// publish bumps it with `UPDATE .. RETURNING` in its own transaction, so publishers of
/// one partition are serialised by that row lock and offsets follow commit order.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS courier_broker_channels (
        name TEXT PRIMARY KEY,
        partitions INTEGER NOT NULL CHECK (partitions BETWEEN 1 AND 1024),
        created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE IF NOT EXISTS courier_broker_partitions (
        channel TEXT NOT NULL,
        partition INTEGER NOT NULL,
        head BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (channel, partition))",
    "CREATE TABLE IF NOT EXISTS courier_broker_log (
        channel TEXT NOT NULL,
        partition INTEGER NOT NULL,
        seq BIGINT NOT NULL,
        message_id TEXT NOT NULL,
        headers TEXT NOT NULL,
        payload BYTEA NOT NULL,
        published_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (channel, partition, seq))",
    "CREATE TABLE IF NOT EXISTS courier_broker_groups (
        channel TEXT NOT NULL,
        grp TEXT NOT NULL,
        partition INTEGER NOT NULL,
        committed BIGINT NOT NULL,
        owner TEXT,
        generation BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (channel, grp, partition))",
    "CREATE TABLE IF NOT EXISTS courier_broker_delays (
        channel TEXT NOT NULL,
        grp TEXT NOT NULL,
        partition INTEGER NOT NULL,
        seq BIGINT NOT NULL,
        not_before TIMESTAMPTZ NOT NULL,
        redeliveries INTEGER NOT NULL,
        PRIMARY KEY (channel, grp, partition, seq))",
    "CREATE TABLE IF NOT EXISTS courier_broker_members (
        channel TEXT NOT NULL,
        grp TEXT NOT NULL,
        member TEXT NOT NULL,
        joined_at TIMESTAMPTZ NOT NULL,
        last_seen TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (channel, grp, member))",
];

/// Create the broker's tables in the current schema if missing; returns that schema.
/// Serialised by an advisory lock (`CREATE .. IF NOT EXISTS` races with itself).
pub(super) async fn apply(pool: &PgPool, describe: &str) -> Result<String> {
    let what = || format!("creating the broker's tables in {describe}");
    let mut tx = pool.begin().await.map_err(|e| map(what(), e))?;
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| map(what(), e))?;
    let Some(schema) = schema else {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{}: no schema of the search_path exists; create it or fix search_path",
                what()
            ),
        ));
    };
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await
        .map_err(|e| map(what(), e))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('courier_broker_schema'))")
        .execute(&mut *tx)
        .await
        .map_err(|e| map(what(), e))?;
    for s in SCHEMA {
        sqlx::query(*s)
            .execute(&mut *tx)
            .await
            .map_err(|e| map(what(), e))?;
    }
    tx.commit().await.map_err(|e| map(what(), e))?;
    Ok(schema)
}
