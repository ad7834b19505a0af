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
    // Commands this service sent and the replies that came back: the sender's half of
    // request/reply, so any instance can handle a reply or a deadline, even after a
    // restart. `expected` is a JSON array of responder names; `state` is one of pending,
    // done, timed-out, failed.
    "CREATE TABLE IF NOT EXISTS courier_correlation (
        correlation_id TEXT PRIMARY KEY,
        command_type TEXT NOT NULL,
        channel TEXT NOT NULL,
        data TEXT NOT NULL,
        deadline_ms BIGINT NULL,
        expected TEXT NOT NULL,
        expected_count INTEGER NOT NULL,
        gather BOOLEAN NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT NULL,
        created_at_ms BIGINT NOT NULL,
        completed_at_ms BIGINT NULL)",
    // The deadline timer's scan, and pruning: both only touch the rows they look for.
    "CREATE INDEX IF NOT EXISTS courier_correlation_due
        ON courier_correlation (deadline_ms) WHERE state = 'pending' AND deadline_ms IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS courier_correlation_done
        ON courier_correlation (completed_at_ms) WHERE state <> 'pending'",
    // One reply per responder (a redelivered reply is a conflict); `seq` keeps arrival
    // order.
    "CREATE TABLE IF NOT EXISTS courier_correlation_replies (
        correlation_id TEXT NOT NULL,
        responder TEXT NOT NULL,
        message_id TEXT NOT NULL,
        headers TEXT NOT NULL,
        payload BYTEA NOT NULL,
        received_at_ms BIGINT NOT NULL,
        seq BIGSERIAL,
        PRIMARY KEY (correlation_id, responder))",
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
