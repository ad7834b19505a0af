//! The outbox as the relay sees it: committed rows, the lease (database clock, fencing
//! generation), and wake-ups by `LISTEN courier_outbox`.

use crate::PgStore;
use crate::outbox::CHANNEL;
use courier_core::{OutboxRow, OutboxSource, Result};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How long [`PgStore::outbox_arm`] waits for the listener's answer (one round trip when
/// it is connected; while it reconnects the relay goes on polling instead).
const ARM_ANSWER: Duration = Duration::from_millis(250);

impl PgStore {
    /// Read up to `limit` outbox rows (and at most about `max_bytes`, at least one row),
    /// oldest first.
    pub async fn outbox_peek(&self, limit: u32, max_bytes: usize) -> Result<Vec<OutboxRow>> {
        self.outbox_peek_excluding(limit, max_bytes, &[]).await
    }

    /// Like [`outbox_peek`](Self::outbox_peek), leaving out the rows `exclude` (batches
    /// the relay is publishing or deleting while it reads the next one): the rows after
    /// the last one in flight, read by key range (no per-row comparison with the whole
    /// list). A row with a lower key whose transaction committed late (keys are taken at
    /// insert, not at commit) is not lost: the relay's next plain
    /// [`outbox_peek`](Self::outbox_peek), a few batches later, finds it.
    pub async fn outbox_peek_excluding(
        &self,
        limit: u32,
        max_bytes: usize,
        exclude: &[i64],
    ) -> Result<Vec<OutboxRow>> {
        let after = exclude.iter().copied().max().unwrap_or(i64::MIN);
        let mut conn = self.held().await.map_err(self.err("reading the outbox"))?;
        let mut retried = false;
        let rows: Vec<(i64, String, String, Vec<u8>)> = loop {
            let r = sqlx::query_as(
                "SELECT seq, message_id, headers, payload FROM courier_outbox
                 WHERE seq > $2 ORDER BY seq LIMIT $1",
            )
            .bind(i64::from(limit))
            .bind(after)
            .fetch_all(&mut *conn)
            .await;
            match r {
                Ok(rows) => break rows,
                Err(e) => {
                    conn = self
                        .after_error(conn, e, &mut retried, "reading the outbox")
                        .await?
                }
            }
        };
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for (seq, id, headers, payload) in rows {
            bytes += payload.len();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            let message = crate::decode_message(&id, &headers, payload.into());
            out.push(OutboxRow { seq, message });
        }
        Ok(out)
    }

    /// Delete published outbox rows `seqs`, if `holder` still holds the relay lease of
    /// generation `generation` (fencing). Returns `false` only when the lease was lost.
    pub async fn outbox_delete(&self, seqs: &[i64], holder: &str, generation: i64) -> Result<bool> {
        Ok(self
            .outbox_delete_rows(seqs, holder, generation)
            .await?
            .is_some())
    }

    /// Like [`outbox_delete`](Self::outbox_delete), saying which of `seqs` it deleted
    /// (`None`: the lease was lost).
    pub(crate) async fn outbox_delete_rows(
        &self,
        seqs: &[i64],
        holder: &str,
        generation: i64,
    ) -> Result<Option<Vec<i64>>> {
        if seqs.is_empty() {
            return Ok(Some(Vec::new()));
        }
        // One statement: the lease check and the delete are atomic. `FOR SHARE` makes a
        // concurrent take-over wait for this delete (or this delete see the take-over).
        let what = "deleting published outbox rows";
        let mut conn = self.held().await.map_err(self.err(what))?;
        let mut retried = false;
        let deleted: Vec<i64> = loop {
            let r = sqlx::query_scalar(
                "DELETE FROM courier_outbox WHERE seq = ANY($1) AND EXISTS (
                   SELECT 1 FROM courier_relay_lease
                   WHERE outbox = 'default' AND holder = $2 AND generation = $3 FOR SHARE)
                 RETURNING seq",
            )
            .bind(seqs)
            .bind(holder)
            .bind(generation)
            .fetch_all(&mut *conn)
            .await;
            match r {
                Ok(rows) => break rows,
                // Deleting again is harmless: a retry after a lost connection is safe.
                Err(e) => conn = self.after_error(conn, e, &mut retried, what).await?,
            }
        };
        drop(conn);
        // Nothing deleted: either the lease was lost, or the rows were already gone.
        if deleted.is_empty() && !self.holds_lease(holder, generation).await? {
            return Ok(None);
        }
        Ok(Some(deleted))
    }

    /// A held connection (no pool round trip) for one of the relay's statements.
    async fn held(&self) -> std::result::Result<crate::held::HeldConn, sqlx::Error> {
        self.inner.held.get().await
    }

    /// After statement error `e` on `conn`: a fresh connection to run it again on, once,
    /// when `conn` was parked and turned out dead (the statements given here are safe to
    /// repeat); otherwise the error, with `conn` closed if it is broken.
    async fn after_error(
        &self,
        mut conn: crate::held::HeldConn,
        e: sqlx::Error,
        retried: &mut bool,
        what: &str,
    ) -> Result<crate::held::HeldConn> {
        if !*retried && conn.reused && crate::held::is_stale(&e) {
            *retried = true;
            conn.renew().await.map_err(self.err(what))?;
            return Ok(conn);
        }
        if crate::held::is_broken(&e) {
            conn.discard();
        }
        Err(self.err(what)(e))
    }

    async fn holds_lease(&self, holder: &str, generation: i64) -> Result<bool> {
        let held: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM courier_relay_lease
             WHERE outbox = 'default' AND holder = $1 AND generation = $2",
        )
        .bind(holder)
        .bind(generation)
        .fetch_optional(self.pool())
        .await
        .map_err(self.err("checking the relay lease"))?;
        Ok(held.is_some())
    }

    /// Take or renew the relay lease for `ttl_ms`, by the database's clock. Returns the
    /// generation when `holder` holds it (renewing keeps it; taking over a free or expired
    /// lease bumps it), `None` when another live relay holds it.
    pub async fn relay_lease(&self, holder: &str, ttl_ms: u64) -> Result<Option<i64>> {
        let ttl_s = ttl_ms as f64 / 1000.0;
        sqlx::query_scalar(
            "INSERT INTO courier_relay_lease AS l (outbox, holder, generation, expires_at)
             VALUES ('default', $1, 1, now() + make_interval(secs => $2))
             ON CONFLICT (outbox) DO UPDATE SET
               generation = CASE WHEN l.holder = $1 THEN l.generation ELSE l.generation + 1 END,
               holder = $1,
               expires_at = now() + make_interval(secs => $2)
             WHERE l.holder = $1 OR l.holder IS NULL OR l.expires_at < now()
             RETURNING generation",
        )
        .bind(holder)
        .bind(ttl_s)
        .fetch_optional(self.pool())
        .await
        .map_err(self.err("taking the relay lease"))
    }

    /// Give the relay lease up (clean shutdown: a standby takes over at once).
    pub async fn relay_release(&self, holder: &str) -> Result<()> {
        sqlx::query(
            "UPDATE courier_relay_lease SET holder = NULL, expires_at = '-infinity'
             WHERE outbox = 'default' AND holder = $1",
        )
        .bind(holder)
        .execute(self.pool())
        .await
        .map_err(self.err("releasing the relay lease"))?;
        Ok(())
    }

    /// Arm the outbox signal: from now until the next notification, every commit to the
    /// outbox sends `NOTIFY courier_outbox` (see the outbox module: writers notify only
    /// while a relay waits). `true` when armed (then look at the outbox once more: rows
    /// committed before arming were not announced); `false` when it cannot be armed now
    /// (writers are in flight, or the listener is not connected): look again shortly.
    pub async fn outbox_arm(&self) -> bool {
        self.ensure_listener();
        let arm = match self.inner.listener.lock() {
            Ok(slot) => slot
                .as_ref()
                .filter(|h| h.connected.load(Ordering::Acquire))
                .map(|h| h.arm.clone()),
            Err(_) => None,
        };
        let Some(arm) = arm else { return false };
        let (tx, rx) = oneshot::channel();
        // Never wait for room: while the listener reconnects, requests are not read, and
        // the relay must go on polling rather than stall here.
        if arm.try_send(tx).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(ARM_ANSWER, rx).await, Ok(Ok(true)))
    }

    /// Start the `LISTEN` task once (needs a tokio runtime; without one the relay polls).
    fn ensure_listener(&self) {
        let Ok(mut slot) = self.inner.listener.lock() else {
            return;
        };
        if slot.is_some() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let (arm_tx, arm_rx) = mpsc::channel(4);
        let connected = Arc::new(AtomicBool::new(false));
        *slot = Some(ListenerHandle {
            _stop: stop_tx,
            arm: arm_tx,
            connected: connected.clone(),
        });
        let options = (*self.pool().connect_options()).clone();
        rt.spawn(listen(
            options,
            self.inner.schema.clone(),
            self.inner.changes.clone(),
            stop_rx,
            Arming {
                requests: arm_rx,
                connected,
            },
            self.inner.describe.clone(),
        ));
    }
}

/// The store's side of its `LISTEN` task.
pub(crate) struct ListenerHandle {
    /// Stops the task when dropped.
    _stop: oneshot::Sender<()>,
    /// Asks the task to arm the signal; it answers whether it is armed.
    arm: mpsc::Sender<oneshot::Sender<bool>>,
    /// Whether the task is listening (else arming fails at once: the relay polls).
    connected: Arc<AtomicBool>,
}

/// The task's side of arming.
struct Arming {
    requests: mpsc::Receiver<oneshot::Sender<bool>>,
    connected: Arc<AtomicBool>,
}

/// `LISTEN courier_outbox` on a connection of its own (not one of the store's pool) and
/// bump `changes` on every notification for `schema`, and once after every (re)connect:
/// notifications sent while the listener was away are lost, so the relay looks once.
/// The same connection holds the schema's signal lock while armed (asked on `arm`), and
/// lets it go at the first notification (the relay is awake: writers stop notifying).
/// Ends when `stop` resolves (the store was dropped).
async fn listen(
    options: PgConnectOptions,
    schema: String,
    changes: Arc<watch::Sender<u64>>,
    mut stop: oneshot::Receiver<()>,
    arming: Arming,
    describe: String,
) {
    let Arming {
        requests: mut arm,
        connected,
    } = arming;
    let options = options.application_name(&listener_name(&schema));
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options);
    let bump = || changes.send_modify(|v| *v = v.wrapping_add(1));
    let mut failures = 0u32;
    loop {
        let connect = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let error = tokio::select! {
            _ = &mut stop => return,
            r = connect => match r {
                Ok(mut listener) => {
                    failures = 0;
                    connected.store(true, Ordering::Release);
                    bump();
                    let mut armed = false;
                    loop {
                        tokio::select! {
                            _ = &mut stop => return,
                            Some(reply) = arm.recv() => {
                                if !armed {
                                    match signal_lock(&mut listener, &schema, true).await {
                                        Ok(got) => armed = got,
                                        Err(e) => {
                                            let _ = reply.send(false);
                                            break e;
                                        }
                                    }
                                }
                                let _ = reply.send(armed);
                            }
                            r = listener.try_recv() => match r {
                                Ok(Some(n)) => {
                                    if n.payload().is_empty() || n.payload() == schema {
                                        bump();
                                        if armed {
                                            armed = false;
                                            if let Err(e) = signal_lock(&mut listener, &schema, false).await {
                                                break e;
                                            }
                                        }
                                    }
                                }
                                // The connection dropped and was re-established (and
                                // re-listened): catch up on what may have been missed.
                                // The lock went with the old session.
                                Ok(None) => {
                                    armed = false;
                                    bump();
                                }
                                Err(e) => break e,
                            },
                        }
                    }
                }
                Err(e) => e,
            },
        };
        connected.store(false, Ordering::Release);
        failures += 1;
        let delay = Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)).min(5_000));
        tracing::warn!(database = %describe, error = %error, ?delay,
            "LISTEN {CHANNEL} failed; the relay polls until it is back");
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Take (`true`: without waiting; whether it was granted) or let go of the signal lock
/// of `schema` on the listener's session.
async fn signal_lock(
    listener: &mut PgListener,
    schema: &str,
    take: bool,
) -> std::result::Result<bool, sqlx::Error> {
    let sql = if take {
        "SELECT pg_try_advisory_lock($1, hashtext($2))"
    } else {
        "SELECT pg_advisory_unlock($1, hashtext($2))"
    };
    sqlx::query_scalar(sql)
        .bind(crate::outbox::SIGNAL_LOCK_CLASS)
        .bind(schema)
        .fetch_one(listener)
        .await
}

/// The `application_name` of the listener connection (visible in `pg_stat_activity`).
fn listener_name(schema: &str) -> String {
    let mut name = format!("courier-listen {schema}");
    // PostgreSQL keeps 63 bytes.
    while name.len() > 63 {
        name.pop();
    }
    name
}

impl OutboxSource for PgStore {
    async fn outbox_peek(&self, limit: u32, max_bytes: usize) -> Result<Vec<OutboxRow>> {
        PgStore::outbox_peek(self, limit, max_bytes).await
    }

    async fn outbox_peek_excluding(
        &self,
        limit: u32,
        max_bytes: usize,
        exclude: &[i64],
    ) -> Result<Vec<OutboxRow>> {
        PgStore::outbox_peek_excluding(self, limit, max_bytes, exclude).await
    }

    async fn outbox_delete(&self, seqs: &[i64], holder: &str, generation: i64) -> Result<bool> {
        PgStore::outbox_delete(self, seqs, holder, generation).await
    }

    async fn relay_lease(&self, holder: &str, ttl_ms: u64) -> Result<Option<i64>> {
        PgStore::relay_lease(self, holder, ttl_ms).await
    }

    async fn relay_release(&self, holder: &str) -> Result<()> {
        PgStore::relay_release(self, holder).await
    }

    async fn outbox_arm(&self) -> bool {
        PgStore::outbox_arm(self).await
    }

    fn outbox_changes(&self) -> watch::Receiver<u64> {
        let rx = self.inner.changes.subscribe();
        self.ensure_listener();
        rx
    }

    fn describe(&self) -> String {
        self.inner.describe.clone()
    }
}
