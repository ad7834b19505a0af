//! The raw reference for benchmarks: single-row `INSERT` commits on this PostgreSQL
//! server with the driver Courier uses, so `courier bench` can print it next to
//! Courier's own figure.

use crate::error::{connect_error, map};
use crate::redact_url;
use courier_core::Result;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection};
use std::time::{Duration, Instant};

/// Commit one `payload_bytes`-byte row per transaction (autocommit `INSERT` on one held
/// connection, the server's `synchronous_commit` setting as configured) into a scratch
/// table for `duration` (or `max_rows`), and return commits per second. The table lives
/// in the URL's current schema and is dropped afterwards. A short warm-up runs first and
/// is not counted.
pub async fn raw_commit_rate(
    url: &str,
    payload_bytes: usize,
    duration: Duration,
    max_rows: u64,
) -> Result<f64> {
    let shown = redact_url(url);
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| map(format!("{shown} is not a PostgreSQL URL"), e))?;
    let mut conn = PgConnection::connect_with(&options)
        .await
        .map_err(|e| connect_error(&shown, e))?;
    let err = |e| map("measuring the raw commit rate", e);
    let table = format!("courier_raw_rows_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)"
    )))
    .execute(&mut conn)
    .await
    .map_err(err)?;
    let insert = format!("INSERT INTO {table} (payload) VALUES ($1)");
    let payload = vec![7u8; payload_bytes];
    let run = async {
        for _ in 0..200 {
            sqlx::query(AssertSqlSafe(insert.as_str()))
                .bind(&payload)
                .execute(&mut conn)
                .await?;
        }
        let start = Instant::now();
        let mut n = 0u64;
        while n < max_rows && start.elapsed() < duration {
            sqlx::query(AssertSqlSafe(insert.as_str()))
                .bind(&payload)
                .execute(&mut conn)
                .await?;
            n += 1;
        }
        Ok::<_, sqlx::Error>(n as f64 / start.elapsed().as_secs_f64().max(1e-9))
    }
    .await
    .map_err(err);
    let dropped = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(&mut conn)
        .await;
    if let Err(e) = dropped {
        tracing::warn!(table = %table, error = %e, "could not drop the scratch table");
    }
    let _ = conn.close().await;
    run
}
