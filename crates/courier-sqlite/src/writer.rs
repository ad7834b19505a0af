//! Dedicated connections behind an async lock: the service database's writer (and its
//! reader for the relay).
//!
//! SQLite has one writer at a time. Queuing the service's write transactions on one
//! connection in-process is faster than a pool (no per-transaction acquire and release
//! ping) and never sleeps in SQLite's busy handler waiting for another connection of the
//! same process.

use crate::error::map;
use courier_core::Result;
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Clone)]
pub(crate) struct LockedConnection {
    conn: Arc<Mutex<SqliteConnection>>,
    path: Arc<PathBuf>,
}

impl LockedConnection {
    pub(crate) async fn open(options: &SqliteConnectOptions, path: PathBuf) -> Result<Self> {
        let conn = SqliteConnection::connect_with(options).await.map_err(|e| {
            map(
                format!("opening the writer connection of {}", path.display()),
                e,
            )
        })?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
        })
    }

    /// Wait for the writer (for one autocommit statement).
    pub(crate) async fn lock(&self) -> OwnedMutexGuard<SqliteConnection> {
        self.conn.clone().lock_owned().await
    }

    /// Wait for the writer, then `BEGIN IMMEDIATE`.
    pub(crate) async fn begin(&self) -> Result<StoreTx> {
        let mut guard = self.conn.clone().lock_owned().await;
        if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *guard).await {
            // A transaction left open (its rollback could not run): close it and retry once.
            if e.to_string().contains("within a transaction") {
                let _ = sqlx::query("ROLLBACK").execute(&mut *guard).await;
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut *guard)
                    .await
                    .map_err(|e| {
                        map(
                            format!("beginning a transaction in {}", self.path.display()),
                            e,
                        )
                    })?;
            } else {
                return Err(map(
                    format!("beginning a transaction in {}", self.path.display()),
                    e,
                ));
            }
        }
        Ok(StoreTx {
            guard: Some(guard),
            path: self.path.clone(),
            outbox: Vec::new(),
        })
    }
}

/// A write transaction on a [`SqliteStore`](crate::SqliteStore)'s writer connection, from
/// [`SqliteStore::begin`](crate::SqliteStore::begin). Run your statements on
/// `&mut *tx`, pass `&mut tx` to the outbox, then [`commit`](Self::commit). Dropped
/// without a commit, it rolls back.
pub struct StoreTx {
    guard: Option<OwnedMutexGuard<SqliteConnection>>,
    path: Arc<PathBuf>,
    /// Messages sent through the outbox on this transaction: written with the commit.
    outbox: Vec<courier_core::Message>,
}

impl fmt::Debug for StoreTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreTx")
            .field("path", &self.path)
            .field("open", &self.guard.is_some())
            .finish()
    }
}

impl StoreTx {
    fn conn(&mut self) -> Result<&mut SqliteConnection> {
        self.guard.as_deref_mut().ok_or_else(|| {
            courier_core::Error::new(
                courier_core::ErrorKind::Closed,
                "transaction already finished",
            )
        })
    }

    /// Queue outbox messages: they are inserted by [`commit`](Self::commit), in the same
    /// round trip as the `COMMIT`.
    pub(crate) fn buffer_outbox(&mut self, messages: &[courier_core::Message]) {
        self.outbox.extend_from_slice(messages);
    }

    /// Write the queued outbox messages and commit, in one round trip; release the writer.
    /// On error nothing of the transaction is committed (dropping it rolls back).
    pub async fn commit(mut self) -> Result<()> {
        let path = self.path.clone();
        let outbox = std::mem::take(&mut self.outbox);
        let conn = self.conn()?;
        let r = if outbox.is_empty() {
            sqlx::query("COMMIT").execute(&mut *conn).await.map(|_| ())
        } else {
            match crate::store::insert_outbox_then(conn, &outbox, Some("COMMIT")).await {
                Ok(()) => Ok(()),
                Err(e) => return Err(e.context(format!("committing in {}", path.display()))),
            }
        };
        match r {
            Ok(()) => {
                self.guard = None;
                Ok(())
            }
            // Drop rolls back whatever is left.
            Err(e) => Err(map(format!("committing in {}", path.display()), e)),
        }
    }

    /// Roll back and release the writer.
    pub async fn rollback(mut self) -> Result<()> {
        let path = self.path.clone();
        let conn = self.conn()?;
        let r = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        self.guard = None;
        r.map(|_| ())
            .map_err(|e| map(format!("rolling back in {}", path.display()), e))
    }
}

impl Deref for StoreTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        // Only `commit`/`rollback` (which consume self) take the guard.
        match self.guard.as_deref() {
            Some(c) => c,
            None => unreachable!("StoreTx used after commit"),
        }
    }
}

impl DerefMut for StoreTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        match self.guard.as_deref_mut() {
            Some(c) => c,
            None => unreachable!("StoreTx used after commit"),
        }
    }
}

impl Drop for StoreTx {
    fn drop(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            // Roll back before anyone else gets the writer (the guard moves into the task).
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = sqlx::query("ROLLBACK").execute(&mut *guard).await;
                });
            }
            // Without a runtime the next `begin` finds the open transaction and closes it.
        }
    }
}
