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
    let insert = "INSERT INTO raw_rows (payload) VALUES (?)";
    let mut n = 0u64;
    let secs = match via {
        RawPath::Connection => {
            let mut conn = pool.acquire().await.map_err(err)?;
            for _ in 0..200 {
                sqlx::query(insert)
                    .bind(&payload)
                    .execute(&mut *conn)
                    .await
                    .map_err(err)?;
            }
            let start = Instant::now();
            while n < max_rows && start.elapsed() < duration {
                sqlx::query(insert)
                    .bind(&payload)
                    .execute(&mut *conn)
                    .await
                    .map_err(err)?;
                n += 1;
            }
            start.elapsed().as_secs_f64()
        }
        RawPath::Transaction => {
            let mut conn = pool.acquire().await.map_err(err)?;
            let start = Instant::now();
            while n < max_rows && start.elapsed() < duration {
                sqlx::query("BEGIN")
                    .execute(&mut *conn)
                    .await
                    .map_err(err)?;
                sqlx::query(insert)
                    .bind(&payload)
                    .execute(&mut *conn)
                    .await
                    .map_err(err)?;
                sqlx::query("COMMIT")
                    .execute(&mut *conn)
                    .await
                    .map_err(err)?;
                n += 1;
            }
            start.elapsed().as_secs_f64()
        }
        RawPath::Pool => {
            for _ in 0..200 {
                sqlx::query(insert)
                    .bind(&payload)
                    .execute(&pool)
                    .await
                    .map_err(err)?;
            }
            let start = Instant::now();
            while n < max_rows && start.elapsed() < duration {
                sqlx::query(insert)
                    .bind(&payload)
                    .execute(&pool)
                    .await
                    .map_err(err)?;
                n += 1;
            }
            start.elapsed().as_secs_f64()
        }
    };
    pool.close().await;
    Ok(n as f64 / secs.max(1e-9))
}
