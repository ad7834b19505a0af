//! [`PgStoreTx`]: a service transaction on a held connection, with the outbox rows
//! written in the `COMMIT`'s round trip.

use crate::error::map;
use crate::held::{HeldConn, is_broken, is_stale};
use courier_core::{Error, ErrorKind, Message, Result};
use sqlx::Executor;
use sqlx::postgres::PgConnection;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// A transaction on a [`PgStore`](crate::PgStore), from
/// [`PgStore::begin`](crate::PgStore::begin): run your statements on `&mut *tx` (it
/// derefs to a `PgConnection`), pass `&mut tx` to the [`Outbox`](crate::Outbox), then
/// [`commit`](Self::commit). Dropped without a commit, it rolls back.
///
/// The same shape as `courier_sqlite::StoreTx`. Outbox messages sent on it are kept
/// until the commit and written in the `COMMIT`'s round trip, and its connection is held
/// by the store rather than taken from the pool, so a transaction with one business
/// statement costs three round trips (`BEGIN`, the statement, outbox + `COMMIT`), as the
/// same transaction without Courier does.
pub struct PgStoreTx {
    conn: Option<HeldConn>,
    outbox: Vec<Message>,
    describe: Arc<str>,
}

impl fmt::Debug for PgStoreTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStoreTx")
            .field("database", &self.describe)
            .field("open", &self.conn.is_some())
            .field("outbox_messages", &self.outbox.len())
            .finish()
    }
}

impl PgStoreTx {
    /// `BEGIN` on `conn` (once more on a fresh connection if a parked one turned out dead).
    pub(crate) async fn begin(mut conn: HeldConn, describe: Arc<str>) -> Result<Self> {
        let what = || format!("beginning a transaction in {describe}");
        match conn.execute("BEGIN").await {
            Ok(_) => {}
            Err(e) if conn.reused && is_stale(&e) => {
                conn.renew().await.map_err(|e| map(what(), e))?;
                if let Err(e) = conn.execute("BEGIN").await {
                    conn.discard();
                    return Err(map(what(), e));
                }
            }
            Err(e) => {
                if is_broken(&e) {
                    conn.discard();
                } else {
                    // Whatever state it is in, leave none behind.
                    let _ = conn.execute("ROLLBACK").await;
                }
                return Err(map(what(), e));
            }
        }
        Ok(Self {
            conn: Some(conn),
            outbox: Vec::new(),
            describe,
        })
    }

    /// Queue outbox messages (already checked): [`commit`](Self::commit) writes them.
    pub(crate) fn buffer_outbox(&mut self, messages: &[Message]) {
        self.outbox.extend_from_slice(messages);
    }

    /// Write the queued outbox messages and commit, in one round trip. On error nothing
    /// of the transaction is committed, except when the connection broke during the
    /// `COMMIT` itself: then, as with any database, the outcome is unknown (the error
    /// says so by its kind, `Unavailable`).
    pub async fn commit(mut self) -> Result<()> {
        let what = format!("committing in {}", self.describe);
        let sql = if self.outbox.is_empty() {
            "COMMIT".to_owned()
        } else {
            let mut sql =
                crate::outbox::insert_sql(&self.outbox).map_err(|e| e.context(what.clone()))?;
            sql.push_str("COMMIT");
            sql
        };
        let Some(mut conn) = self.conn.take() else {
            return Err(finished());
        };
        match conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql))).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // A statement before COMMIT failed: the rest of the query string was
                // skipped and the transaction is aborted; close it before parking.
                if is_broken(&e) || conn.execute("ROLLBACK").await.is_err() {
                    conn.discard();
                }
                Err(map(what, e))
            }
        }
    }

    /// Roll back (dropping the transaction does the same, in the background).
    pub async fn rollback(mut self) -> Result<()> {
        let Some(mut conn) = self.conn.take() else {
            return Err(finished());
        };
        match conn.execute("ROLLBACK").await {
            Ok(_) => Ok(()),
            Err(e) => {
                conn.discard();
                Err(map(format!("rolling back in {}", self.describe), e))
            }
        }
    }
}

fn finished() -> Error {
    Error::new(ErrorKind::Closed, "transaction already finished")
}

impl Deref for PgStoreTx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        // Only `commit`/`rollback` (which consume self) take the connection.
        match self.conn.as_deref() {
            Some(c) => c,
            None => unreachable!("PgStoreTx used after commit"),
        }
    }
}

impl DerefMut for PgStoreTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self.conn.as_deref_mut() {
            Some(c) => c,
            None => unreachable!("PgStoreTx used after commit"),
        }
    }
}

impl Drop for PgStoreTx {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            // Roll back before the connection is parked (the task owns it until then):
            // an open transaction must not keep its locks while the connection waits.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        if conn.execute("ROLLBACK").await.is_err() {
                            conn.discard();
                        }
                    });
                }
                // No runtime to roll back on: close the connection (the server rolls back).
                Err(_) => conn.discard(),
            }
        }
    }
}
