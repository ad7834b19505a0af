//! Opening SQLite files with Courier's settings.

use courier_core::{Error, ErrorKind, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
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

/// Open (creating if missing) a pool on `path` in WAL mode.
pub(crate) async fn open_pool(path: &Path, sync: Sync, max_connections: u32) -> Result<SqlitePool> {
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
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(sync.sqlite())
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(false)
        .pragma("temp_store", "memory")
        .pragma("cache_size", "-16000");
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections.max(1))
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .map_err(|e| {
            crate::error::map(
                format!(
                    "cannot open SQLite database {} (is it a SQLite file, and writable?)",
                    path.display()
                ),
                e,
            )
        })?;
    // A file that is not a database only fails on first use: check now, clearly.
    sqlx::query("SELECT count(*) FROM sqlite_master")
        .execute(&pool)
        .await
        .map_err(|e| {
            crate::error::map(
                format!("{} is not a usable SQLite database", path.display()),
                e,
            )
        })?;
    Ok(pool)
}

/// Run schema statements (idempotent `CREATE ... IF NOT EXISTS`).
pub(crate) async fn apply_schema(pool: &SqlitePool, path: &Path, statements: &[&'static str]) -> Result<()> {
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| crate::error::map(format!("creating Courier tables in {}", path.display()), e))?;
    for s in statements {
        sqlx::query(*s)
            .execute(&mut *tx)
            .await
            .map_err(|e| crate::error::map(format!("creating Courier tables in {}", path.display()), e))?;
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
        assert_eq!(parse_sqlite_url("sqlite:a/b.db").unwrap(), PathBuf::from("a/b.db"));
        assert_eq!(parse_sqlite_url("sqlite:///tmp/x.db").unwrap(), PathBuf::from("/tmp/x.db"));
        assert_eq!(parse_sqlite_url("x.db").unwrap(), PathBuf::from("x.db"));
        assert!(parse_sqlite_url("sqlite:").is_err());
    }
}
