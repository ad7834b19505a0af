//! The raw reference for benchmarks: single-row commits on a SQLite file with exactly the
//! driver and settings Courier uses, so figures compare like with like.

use crate::connect::{self, Sync};
use courier_core::Result;
use std::path::Path;
use std::time::{Duration, Instant};

/// Commit one `payload_bytes`-byte row per transaction (autocommit `INSERT`) into a fresh
/// table at `path` for `duration` (or `max_rows`), and return commits per second.
pub async fn raw_commit_rate(
    path: &Path,
    sync: Sync,
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
    let start = Instant::now();
    let mut n = 0u64;
    while n < max_rows && start.elapsed() < duration {
        sqlx::query("INSERT INTO raw_rows (payload) VALUES (?)")
            .bind(&payload)
            .execute(&pool)
            .await
            .map_err(err)?;
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    pool.close().await;
    Ok(n as f64 / secs.max(1e-9))
}
