//! Opening SQLite files with Courier's settings.

use courier_core::{Error, ErrorKind, Result};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How hard a commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sync {
    /// WAL + `synchronous=NORMAL`: survives any process crash; a power cut may lose the
    /// last commits. The default.
    #[default]
    Normal,
    /// WAL + `synchronous=FULL`: every commit is fsync'd.
    Full,
}

impl Sync {
    fn sqlite(self) -> SqliteSynchronous {
        match self {
            Self::Normal => SqliteSynchronous::Normal,
            Self::Full => SqliteSynchronous::Full,
        }
    }

    /// What a commit promises.
    pub fn durability(self) -> courier_core::Durability {
        match self {
            Self::Normal => courier_core::Durability::Written,
            Self::Full => courier_core::Durability::Synced,
        }
    }
}

/// Parse `sqlite:PATH`, `sqlite://PATH` or a bare path.
pub fn parse_sqlite_url(url: &str) -> Result<PathBuf> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{url:?} names no file; expected sqlite:PATH, e.g. sqlite:./broker.db"),
        ));
    }
    Ok(PathBuf::from(path))
}

/// Who waits for the write lock when another process holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockWait {
    /// SQLite's own busy handler (sleeps 1, 2, 5, 10, ... ms): for pools whose
    /// transactions run user statements we cannot retry ourselves.
    InSqlite,
    /// Fail at once with SQLITE_BUSY; our code retries with short async back-off
    /// ([`begin_immediate`]).
    InCourier,
}

/// `BEGIN IMMEDIATE` on `pool`, retrying while another process holds the write lock with
/// short jittered back-off (50 µs doubling to 2 ms) for up to 30 s. Unlike SQLite's busy
/// handler, this never sleeps for tens of milliseconds while the lock is free again.
pub(crate) async fn begin_immediate(
    pool: &SqlitePool,
) -> std::result::Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut delay_us = 50u64;
    loop {
        match pool.begin_with("BEGIN IMMEDIATE").await {
            Err(sqlx::Error::Database(db))
                if is_busy(db.code().as_deref()) && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_micros(
                    delay_us / 2 + fastrand::u64(0..=delay_us / 2),
                ))
                .await;
                delay_us = (delay_us * 2).min(2_000);
            }
            other => return other,
        }
    }
}

fn is_busy(code: Option<&str>) -> bool {
    code.and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| matches!(c & 0xff, 5 | 6))
}

/// Open (or create) a pool on `path` in WAL mode, SQLite waiting for the write lock.
pub(crate) async fn open_pool(path: &Path, sync: Sync, max_connections: u32) -> Result<SqlitePool> {
    open_pool_with(path, sync, max_connections, LockWait::InSqlite).await
}

/// Open (or create) a pool on `path` in WAL mode, choosing who waits for the write lock.
pub(crate) async fn open_pool_with(
    path: &Path,
    sync: Sync,
    max_connections: u32,
    wait: LockWait,
) -> Result<SqlitePool> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "cannot open {}: directory {} does not exist; create it first",
                path.display(),
                dir.display()
            ),
        ));
    }
    let options = connect_options(path, sync, wait);
    // Several processes opening a new file at once race to switch it to WAL, which takes
    // the write lock: the losers see SQLITE_BUSY (at once when Courier does the waiting).
    // Retry with back-off, as `begin_immediate` does, instead of failing the start-up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut delay_ms = 1u64;
    let pool = loop {
        let attempt = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            // A local file cannot drop the connection: skip the ping on every acquire.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await;
        // A file that is not a database only fails on first use: check now, clearly.
        let attempt = match attempt {
            Ok(pool) => match sqlx::query("SELECT count(*) FROM sqlite_master")
                .execute(&pool)
                .await
            {
                Ok(_) => Ok(pool),
                Err(sqlx::Error::Database(db)) if !is_busy(db.code().as_deref()) => {
                    return Err(crate::error::map(
                        format!("{} is not a usable SQLite database", path.display()),
                        sqlx::Error::Database(db),
                    ));
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match attempt {
            Err(sqlx::Error::Database(db))
                if is_busy(db.code().as_deref()) && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(
                    delay_ms / 2 + fastrand::u64(0..=delay_ms / 2 + 1),
                ))
                .await;
                delay_ms = (delay_ms * 2).min(50);
            }
            other => break other,
        }
    }
    .map_err(|e| {
        crate::error::map(
            format!(
                "cannot open SQLite database {} (is it a SQLite file, and writable?)",
                path.display()
            ),
            e,
        )
    })?;
    Ok(pool)
}

/// Courier's connection settings for `path`.
pub(crate) fn connect_options(path: &Path, sync: Sync, wait: LockWait) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(sync.sqlite())
        .busy_timeout(match wait {
            LockWait::InSqlite => Duration::from_secs(10),
            LockWait::InCourier => Duration::ZERO,
        })
        .foreign_keys(false)
        .pragma("temp_store", "memory")
        // Checkpoints (which fsync the database file) run in the background
        // ([`spawn_checkpointer`]), never inside a commit on the hot path.
        .pragma("wal_autocheckpoint", "0")
        .pragma("journal_size_limit", "67108864")
        .pragma("cache_size", "-16000")
}

/// Checkpoint `path`'s WAL every `every` (PASSIVE: never blocks writers or readers) on a
/// connection of its own, while `alive` has a strong reference. Auto-checkpoints are off
/// on Courier's connections, so this keeps the WAL bounded without putting a checkpoint's
/// fsync inside some commit.
pub(crate) fn spawn_checkpointer(
    path: &Path,
    sync: Sync,
    every: Duration,
    alive: std::sync::Weak<()>,
) {
    let options = connect_options(path, sync, LockWait::InSqlite);
    let path = path.to_path_buf();
    tokio::spawn(async move {
        use sqlx::Connection;
        let mut conn: Option<sqlx::SqliteConnection> = None;
        loop {
            tokio::time::sleep(every).await;
            if alive.strong_count() == 0 {
                if let Some(c) = conn.take() {
                    let _ = c.close().await;
                }
                return;
            }
            if conn.is_none() {
                conn = sqlx::SqliteConnection::connect_with(&options).await.ok();
            }
            if let Some(c) = conn.as_mut()
                && let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&mut *c)
                    .await
            {
                tracing::debug!(file = %path.display(), error = %e, "checkpoint failed; will try again");
                conn = None;
            }
        }
    });
}

/// Run schema statements (idempotent `CREATE ... IF NOT EXISTS`).
pub(crate) async fn apply_schema(
    pool: &SqlitePool,
    path: &Path,
    statements: &[&'static str],
) -> Result<()> {
    let mut tx = begin_immediate(pool).await.map_err(|e| {
        crate::error::map(format!("creating Courier tables in {}", path.display()), e)
    })?;
    for s in statements {
        sqlx::query(*s).execute(&mut *tx).await.map_err(|e| {
            crate::error::map(format!("creating Courier tables in {}", path.display()), e)
        })?;
    }
    tx.commit()
        .await
        .map_err(|e| crate::error::map(format!("creating Courier tables in {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_sqlite_url("sqlite:a/b.db").unwrap(),
            PathBuf::from("a/b.db")
        );
        assert_eq!(
            parse_sqlite_url("sqlite:///tmp/x.db").unwrap(),
            PathBuf::from("/tmp/x.db")
        );
        assert_eq!(parse_sqlite_url("x.db").unwrap(), PathBuf::from("x.db"));
        assert!(parse_sqlite_url("sqlite:").is_err());
    }
}
