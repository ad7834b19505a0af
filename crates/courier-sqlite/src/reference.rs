//! The raw reference for benchmarks: single-row commits on a SQLite file with exactly the
//! driver and settings Courier uses, so figures compare like with like.

use crate::connect::{self, Sync};
use courier_core::Result;
use std::path::Path;
use std::time::{Duration, Instant};

/// How the reference reaches SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawPath {
    /// One connection held for the whole run: the driver's floor, and how Courier's
    /// writer commits.
    Connection,
    /// `execute(&pool)` per row: what a plain sqlx pool user pays per commit (acquire,
    /// statement, release with its ping).
    Pool,
    /// `BEGIN; INSERT; COMMIT` per row on one held connection: an explicit transaction per
    /// row, as Python's `sqlite3` module commits (the design's reference measurement).
    Transaction,
}

/// Commit one `payload_bytes`-byte row per transaction (autocommit `INSERT`) into a fresh
/// table at `path` for `duration` (or `max_rows`), and return commits per second. A short
/// warm-up runs first and is not counted.
pub async fn raw_commit_rate(
    path: &Path,
    sync: Sync,
    via: RawPath,
    payload_bytes: usize,
    duration: Duration,
    max_rows: u64,
) -> Result<f64> {
    let pool = connect::open_pool(path, sync, 1).await?;
    let err = |e| crate::error::map("measuring the raw commit rate", e);
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS raw_rows (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)",
    )
    .execute(&pool)
    .await
    .map_err(err)?;
    let payload = vec![7u8; payload_bytes];
    // Pool mode must not hold the pool's only connection.
    let mut conn = match via {
        RawPath::Pool => None,
        RawPath::Connection | RawPath::Transaction => Some(pool.acquire().await.map_err(err)?),
    };
    let mut one = async || -> std::result::Result<(), sqlx::Error> {
        let insert = sqlx::query("INSERT INTO raw_rows (payload) VALUES (?)").bind(&payload);
        match (via, conn.as_mut()) {
            (RawPath::Connection, Some(c)) => insert.execute(&mut **c).await.map(drop),
            (RawPath::Transaction, Some(c)) => {
                sqlx::query("BEGIN").execute(&mut **c).await?;
                insert.execute(&mut **c).await?;
                sqlx::query("COMMIT").execute(&mut **c).await.map(drop)
            }
            _ => insert.execute(&pool).await.map(drop),
        }
    };
    for _ in 0..200 {
        one().await.map_err(err)?;
    }
    let start = Instant::now();
    let mut n = 0u64;
    while n < max_rows && start.elapsed() < duration {
        one().await.map_err(err)?;
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(conn);
    pool.close().await;
    Ok(n as f64 / secs.max(1e-9))
}
