//! Connections held outside the pool for Courier's hot paths: service transactions
//! ([`PgStoreTx`](crate::PgStoreTx)) and the relay's reads and deletes.
//!
//! A sqlx pool pings every connection it gets back (one more round trip per transaction
//! or statement, about as costly as the statement itself on loopback). These connections
//! come from the store's pool (so its connect options and `after_connect` hook apply),
//! are detached from it, and are parked in a list of their own when free. A connection
//! that failed is closed instead of parked; a parked one that died meanwhile (server
//! restart) is noticed by its first statement, which is run once more on a fresh one when
//! repeating it is harmless (see [`is_stale`]).

use sqlx::postgres::{PgConnection, PgPool};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The held connections of one store.
pub(crate) struct Held {
    pool: PgPool,
    idle: Mutex<Vec<PgConnection>>,
    permits: Arc<Semaphore>,
    acquire_timeout: Duration,
}

impl Held {
    /// At most as many connections as `pool` may open (they do not count against it).
    pub(crate) fn new(pool: PgPool) -> Arc<Self> {
        let n = pool.options().get_max_connections().max(1) as usize;
        let acquire_timeout = pool.options().get_acquire_timeout();
        Arc::new(Self {
            pool,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(n)),
            acquire_timeout,
        })
    }

    /// A free connection: a parked one if any (`reused`), else a new one.
    pub(crate) async fn get(self: &Arc<Self>) -> Result<HeldConn, sqlx::Error> {
        let permit =
            tokio::time::timeout(self.acquire_timeout, self.permits.clone().acquire_owned())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?
                .map_err(|_| sqlx::Error::PoolClosed)?;
        let parked = self.idle.lock().ok().and_then(|mut v| v.pop());
        let (conn, reused) = match parked {
            Some(c) => (c, true),
            None => (self.open().await?, false),
        };
        Ok(HeldConn {
            conn: Some(conn),
            home: self.clone(),
            reused,
            _permit: permit,
        })
    }

    async fn open(&self) -> Result<PgConnection, sqlx::Error> {
        Ok(self.pool.acquire().await?.detach())
    }
}

impl Drop for Held {
    /// The store is gone: close the parked connections properly (a `Terminate` message,
    /// not a reset socket that the server would log).
    fn drop(&mut self) {
        let parked = self.idle.get_mut().map(std::mem::take).unwrap_or_default();
        for c in parked {
            close_in_background(c);
        }
    }
}

/// One held connection; parked again when dropped (unless [`discard`](Self::discard)ed).
pub(crate) struct HeldConn {
    conn: Option<PgConnection>,
    home: Arc<Held>,
    /// It was parked before: it may have died while it waited.
    pub(crate) reused: bool,
    _permit: OwnedSemaphorePermit,
}

impl HeldConn {
    /// Close it instead of parking it (it failed, or its state is unknown).
    pub(crate) fn discard(mut self) {
        if let Some(c) = self.conn.take() {
            close_in_background(c);
        }
    }

    /// Replace a connection that turned out stale with a new one (same permit).
    pub(crate) async fn renew(&mut self) -> Result<(), sqlx::Error> {
        if let Some(c) = self.conn.take() {
            close_in_background(c);
        }
        self.conn = Some(self.home.open().await?);
        self.reused = false;
        Ok(())
    }
}

fn close_in_background(c: PgConnection) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), sqlx::Connection::close(c)).await;
        });
    }
}

impl std::ops::Deref for HeldConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self.conn.as_ref() {
            Some(c) => c,
            None => unreachable!("a held connection is only emptied when it is given up"),
        }
    }
}

impl std::ops::DerefMut for HeldConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self.conn.as_mut() {
            Some(c) => c,
            None => unreachable!("a held connection is only emptied when it is given up"),
        }
    }
}

impl Drop for HeldConn {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            match self.home.idle.lock() {
                Ok(mut v) => v.push(c),
                Err(_) => close_in_background(c),
            }
        }
    }
}

/// Whether `e` says the connection itself is gone (server restarted, connection
/// terminated), not that the statement was refused. Whether the statement ran is then
/// unknown: callers run it again on a fresh connection only when repeating it is
/// harmless (`BEGIN`, a read, a delete of given rows).
pub(crate) fn is_stale(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
        _ => false,
    }
}

/// Whether the connection should be closed after `e` rather than parked.
pub(crate) fn is_broken(e: &sqlx::Error) -> bool {
    is_stale(e) || matches!(e, sqlx::Error::WorkerCrashed)
}
