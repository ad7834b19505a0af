//! Courier's tables, created idempotently in the current schema.

use crate::error::map;
use courier_core::Result;
use sqlx::postgres::PgPool;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS courier_outbox (
        seq BIGSERIAL PRIMARY KEY,
        message_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        headers TEXT NOT NULL,
        payload BYTEA NOT NULL,
        created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS courier_inbox (
        subscriber TEXT NOT NULL,
        message_id TEXT NOT NULL,
        handled_at BIGINT NOT NULL,
        PRIMARY KEY (subscriber, message_id))",
    "CREATE INDEX IF NOT EXISTS courier_inbox_by_time ON courier_inbox (handled_at)",
    "CREATE TABLE IF NOT EXISTS courier_dead_letters (
        id BIGSERIAL PRIMARY KEY,
        subscriber TEXT NOT NULL,
        channel TEXT NOT NULL,
        message_id TEXT NOT NULL,
        partition_key TEXT,
        message_type TEXT,
        headers TEXT NOT NULL,
        payload BYTEA NOT NULL,
        reason TEXT NOT NULL,
        error TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        first_failed_at BIGINT NOT NULL,
        last_failed_at BIGINT NOT NULL,
        status TEXT NOT NULL,
        blocks_key BOOLEAN NOT NULL,
        UNIQUE (subscriber, message_id))",
    "CREATE INDEX IF NOT EXISTS courier_dead_letters_by_key
        ON courier_dead_letters (subscriber, partition_key) WHERE blocks_key",
    "CREATE TABLE IF NOT EXISTS courier_relay_lease (
        outbox TEXT PRIMARY KEY,
        holder TEXT,
        generation BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL)",
];

/// Create Courier's tables in the current schema if they are missing; returns that schema.
///
/// `CREATE ... IF NOT EXISTS` still races with itself (two services starting at once can
/// both try to create the same type), so creation is serialised by an advisory lock.
pub(crate) async fn apply(pool: &PgPool, describe: &str) -> Result<String> {
    let what = || format!("creating Courier tables in {describe}");
    let mut tx = pool.begin().await.map_err(|e| map(what(), e))?;
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| map(what(), e))?;
    let Some(schema) = schema else {
        return Err(courier_core::Error::new(
            courier_core::ErrorKind::Config,
            format!(
                "{}: no schema of the search_path exists; create it or fix search_path",
                what()
            ),
        ));
    };
    // "relation already exists, skipping" notices are noise here.
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await
        .map_err(|e| map(what(), e))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('courier_schema'))")
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
