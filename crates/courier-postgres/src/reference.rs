//! The raw reference for benchmarks: single-row `INSERT` commits on this PostgreSQL
//! server with the driver Courier uses, so `courier bench` can print it next to
//! Courier's own figure.

use crate::error::{connect_error, map};
use crate::redact_url;
use courier_core::Result;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection};
use std::time::{Duration, Instant};

/// Inserts before the measured window starts (connections warm, statements prepared).
const WARM_UP: Duration = Duration::from_millis(200);

/// Commit one `payload_bytes`-byte row per transaction (autocommit `INSERT`, the
/// server's `synchronous_commit` setting as configured) from `clients` connections at
/// once, each with its own held connection, into one scratch table for `duration` (or
/// `max_rows` in all), and return commits per second over all clients. Concurrent
/// clients share WAL flushes (group commit), so the rate grows with `clients`: compare a
/// figure with the reference of the same client count. The table lives in the URL's
/// current schema and is dropped afterwards. A short warm-up runs first and is not
/// counted.
///
/// With `explicit_tx`, each row is `BEGIN; INSERT; COMMIT` (three round trips, as an
/// application's transaction pays) instead of one autocommit `INSERT`.
pub async fn raw_commit_rate(
    url: &str,
    clients: usize,
    explicit_tx: bool,
    payload_bytes: usize,
    duration: Duration,
    max_rows: u64,
) -> Result<f64> {
    let shown = redact_url(url);
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| map(format!("{shown} is not a PostgreSQL URL"), e))?;
    let err = |e| map("measuring the raw commit rate", e);
    let mut conns = Vec::with_capacity(clients.max(1));
    for _ in 0..clients.max(1) {
        conns.push(
            PgConnection::connect_with(&options)
                .await
                .map_err(|e| connect_error(&shown, e))?,
        );
    }
    let table = format!("courier_raw_rows_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)"
    )))
    .execute(&mut conns[0])
    .await
    .map_err(err)?;
    let insert = format!("INSERT INTO {table} (payload) VALUES ($1)");
    let payload = vec![7u8; payload_bytes];
    let start = Instant::now() + WARM_UP;
    let per_client = (max_rows / conns.len() as u64).max(1);
    let runs = conns.iter_mut().map(|conn| {
        let (insert, payload) = (&insert, &payload);
        async move {
            let mut n = 0u64;
            loop {
                let now = Instant::now();
                if now >= start && (n >= per_client || now - start >= duration) {
                    return Ok::<_, sqlx::Error>(n);
                }
                if explicit_tx {
                    sqlx::query("BEGIN").execute(&mut *conn).await?;
                }
                sqlx::query(AssertSqlSafe(insert.as_str()))
                    .bind(payload)
                    .execute(&mut *conn)
                    .await?;
                if explicit_tx {
                    sqlx::query("COMMIT").execute(&mut *conn).await?;
                }
                if Instant::now() > start {
                    n += 1;
                }
            }
        }
    });
    let counted = futures::future::try_join_all(runs).await.map_err(err);
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let dropped = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(&mut conns[0])
        .await;
    if let Err(e) = dropped {
        tracing::warn!(table = %table, error = %e, "could not drop the scratch table");
    }
    for conn in conns {
        let _ = conn.close().await;
    }
    Ok(counted?.iter().sum::<u64>() as f64 / secs)
}
