//! The replication connection: a background task streams the slot (`START_REPLICATION`,
//! `pgoutput`, binary columns) into the [`Buffer`], wakes the relay when rows arrive,
//! reports how far the slot may be confirmed, and reconnects with backoff.
//!
//! A slot serves one session at a time. The stream runs while its source is used (the
//! relay peeks only while it holds the lease) and stops when the source learns that its
//! lease is gone. A lease holder that finds the slot held by another session (a relay
//! that lost its lease and has not noticed yet) ends that session.

use super::buffer::Buffer;
use super::pgoutput::{self, Change, Column, Relation};
use crate::PgStore;
use courier_core::{Error, ErrorKind, ErrorStatus, Message, Result};
use pgwire_replication::{
    FeedbackObserver, Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use sqlx::postgres::PgSslMode;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, oneshot, watch};

/// How often the position the slot may be confirmed at is reported to the server, at
/// most (a kill loses at most this much progress: those rows are published again).
const STATUS_INTERVAL: Duration = Duration::from_millis(50);

/// How long a stopping stream waits for its last position to reach the server.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// Replication events queued between the connection's reader and the buffer; with the
/// buffer full, the reader stops and TCP flow control holds the server.
const QUEUED_EVENTS: usize = 64;

/// Longest pause between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where the outbox's columns are in a `pgoutput` row.
#[derive(Debug, Clone, Copy)]
struct Columns {
    seq: usize,
    message_id: usize,
    headers: usize,
    payload: usize,
}

impl Columns {
    fn of(rel: &Relation, schema: &str) -> Option<Columns> {
        if rel.namespace != schema || rel.name != "courier_outbox" {
            return None;
        }
        let at = |name: &str| rel.columns.iter().position(|c| c == name);
        Some(Columns {
            seq: at("seq")?,
            message_id: at("message_id")?,
            headers: at("headers")?,
            payload: at("payload")?,
        })
    }
}

/// An error kept for the next peek (Courier's [`Error`] is not `Clone`).
#[derive(Debug, Clone)]
struct Failure {
    kind: ErrorKind,
    status: ErrorStatus,
    message: String,
}

impl Failure {
    fn of(e: &Error) -> Self {
        Self {
            kind: e.kind(),
            status: e.status(),
            message: e.message().to_owned(),
        }
    }

    fn error(&self) -> Error {
        Error::new(self.kind, self.message.clone()).with_status(self.status)
    }
}

/// The stream's state, shared by the source and its background task.
#[derive(Debug, Default)]
pub(super) struct TailState {
    /// Rows received and not confirmed.
    pub(super) buf: Buffer,
    /// The lease this source's relay holds (holder, generation).
    pub(super) lease: Option<(String, i64)>,
    /// Since the current connection started, everything committed before it started
    /// has been received.
    pub(super) caught_up: bool,
    /// When the running stream was started.
    pub(super) started: Option<tokio::time::Instant>,
    /// Bumped when a stream starts or stops; a task of another epoch changes nothing.
    epoch: u64,
    /// Stops the running task when dropped.
    stop: Option<oneshot::Sender<()>>,
    /// Why the last connection attempt failed (cleared once streaming).
    failure: Option<Failure>,
}

impl TailState {
    /// Why the stream is not streaming, if it failed.
    pub(super) fn failure(&self) -> Option<Error> {
        self.failure.as_ref().map(Failure::error)
    }
}

/// What the source and its stream task share.
#[derive(Debug)]
pub(super) struct Shared {
    state: Mutex<TailState>,
    /// Bumped when rows arrive, the stream catches up or fails: peeks wait on it.
    pub(super) signal: watch::Sender<u64>,
    /// The outbox's wake-up (the store's): bumped when rows arrive.
    changes: Arc<watch::Sender<u64>>,
    /// The position the slot may be confirmed at, raised by confirmations.
    flush: watch::Sender<u64>,
    /// Confirmations made room in a full buffer.
    room: Notify,
}

impl Shared {
    pub(super) fn new(changes: Arc<watch::Sender<u64>>) -> Self {
        Self {
            state: Mutex::new(TailState::default()),
            signal: watch::Sender::new(0),
            changes,
            flush: watch::Sender::new(0),
            room: Notify::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, TailState> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump(&self) {
        self.signal.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn wake_relay(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        self.bump();
    }

    /// Rows were confirmed: `flush` is where the slot may now be confirmed, if it moved.
    pub(super) fn confirmed(&self, flush: Option<u64>) {
        if let Some(lsn) = flush {
            self.flush.send_if_modified(|v| {
                let moved = lsn > *v;
                *v = (*v).max(lsn);
                moved
            });
        }
        self.room.notify_one();
    }

    /// Stop the stream (if running; its session ends in the background) and forget what
    /// it received: the next stream starts from the slot's confirmed position.
    pub(super) fn stop(&self) {
        {
            let mut s = self.lock();
            s.stop = None;
            s.started = None;
            s.epoch = s.epoch.wrapping_add(1);
            s.buf = Buffer::default();
            s.caught_up = false;
            s.failure = None;
        }
        self.bump();
    }
}

/// What a stream task needs to (re)connect.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) store: PgStore,
    pub(super) slot: String,
    pub(super) config: ReplicationConfig,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the config: it holds the password.
        f.debug_struct("Target")
            .field("store", &self.store)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Target {
    fn describe(&self) -> &str {
        &self.store.inner.describe
    }

    /// `e`, met on the replication connection, as an error naming the database (no
    /// password) and the slot, saying what to check.
    fn error(&self, e: PgWireError) -> Error {
        stream_error(self.describe(), &self.slot, e)
    }
}

/// Start the stream unless it runs.
pub(super) fn ensure_running(shared: &Arc<Shared>, target: &Target) {
    let mut s = shared.lock();
    if s.stop.is_some() {
        return;
    }
    let (stop_tx, stop_rx) = oneshot::channel();
    s.stop = Some(stop_tx);
    s.started = Some(tokio::time::Instant::now());
    s.epoch = s.epoch.wrapping_add(1);
    s.caught_up = false;
    s.failure = None;
    let epoch = s.epoch;
    drop(s);
    tokio::spawn(run(shared.clone(), target.clone(), epoch, stop_rx));
}

/// Stream until `stop` resolves, reconnecting with backoff.
async fn run(shared: Arc<Shared>, target: Target, epoch: u64, mut stop: oneshot::Receiver<()>) {
    let mut failures = 0u32;
    loop {
        let error = match session(&shared, &target, epoch, &mut failures, &mut stop).await {
            Ok(()) => return,
            Err(e) => e,
        };
        failures = failures.saturating_add(1);
        let delay = backoff(failures);
        {
            let mut s = shared.lock();
            if s.epoch != epoch {
                return;
            }
            s.caught_up = false;
            s.failure = Some(Failure::of(&error));
        }
        shared.bump();
        tracing::warn!(slot = %target.slot, error = %error, ?delay,
            "log tailing: replication stream failed; reconnecting");
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(25u64.saturating_mul(1 << failures.min(8))).min(MAX_BACKOFF)
}

/// One replication connection, until it fails (`Err`), is stopped or belongs to an old
/// epoch (`Ok`).
async fn session(
    shared: &Shared,
    target: &Target,
    epoch: u64,
    failures: &mut u32,
    stop: &mut oneshot::Receiver<()>,
) -> Result<()> {
    // Told when a position was reported to the server (for a clean stop).
    let reported = Arc::new(Notify::new());
    let observer = {
        let reported = reported.clone();
        FeedbackObserver::new(move |_| reported.notify_one())
    };
    let config = target.config.clone().with_feedback_observer(observer);
    let start = async {
        let mut client = ReplicationClient::connect(config)
            .await
            .map_err(|e| target.error(e))?;
        if let Err(e) = client.wait_started().await {
            if sqlstate(&e) == Some("55006") {
                take_slot_over(shared, target).await;
            }
            return Err(target.error(e));
        }
        // Everything committed before the stream started, and so before a peek that
        // started it, commits before this position.
        let until = wal_flush_lsn(&target.store).await?;
        Ok((client, until))
    };
    let (mut client, until) = tokio::select! {
        _ = &mut *stop => return Ok(()),
        started = start => started?,
    };
    let mut flush = shared.flush.subscribe();
    let mut caught_up = {
        let mut s = shared.lock();
        if s.epoch != epoch {
            return Ok(());
        }
        *failures = 0;
        s.failure = None;
        s.buf.session_started();
        s.caught_up = s.buf.received() >= until;
        s.caught_up
    };
    shared.bump();
    if caught_up {
        let lsn = shared.lock().buf.flushed().max(*flush.borrow());
        client.update_applied_lsn(Lsn(lsn));
    }
    let schema = target.store.schema();
    let mut relations: HashMap<u32, Option<Columns>> = HashMap::new();
    let mut unannounced = 0usize;
    loop {
        let room = shared.lock().buf.has_room();
        if !room && unannounced > 0 {
            unannounced = 0;
            shared.wake_relay();
        }
        let event = tokio::select! {
            biased;
            changed = flush.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let lsn = *flush.borrow_and_update();
                // Until caught up the server must see an old position: it then sends a
                // keep-alive once it has sent everything (how catching up is noticed).
                if caught_up && lsn > 0 {
                    client.update_applied_lsn(Lsn(lsn));
                }
                continue;
            }
            _ = &mut *stop => {
                // Report the last confirmed position before leaving, so the next stream
                // does not resend what was published.
                client.update_applied_lsn(Lsn(*flush.borrow()));
                let deadline = tokio::time::Instant::now() + STOP_WAIT;
                while client.feedback_pending_since().is_some()
                    && tokio::time::timeout_at(deadline, reported.notified()).await.is_ok()
                {}
                return Ok(());
            }
            () = shared.room.notified(), if !room => continue,
            event = client.recv(), if room => event,
        };
        let event = event.map_err(|e| target.error(e))?.ok_or_else(|| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the replication stream of slot {} on {} ended",
                    target.slot,
                    target.describe()
                ),
            )
        })?;
        let mut s = shared.lock();
        if s.epoch != epoch {
            return Ok(());
        }
        let mut report = None;
        match event {
            ReplicationEvent::Begin { final_lsn, xid, .. } => s.buf.begin(final_lsn.as_u64(), xid),
            ReplicationEvent::Commit { end_lsn, .. } => {
                report = s.buf.commit(end_lsn.as_u64());
                if unannounced > 0 {
                    unannounced = 0;
                    shared.wake_relay();
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                report = s.buf.keepalive(wal_end.as_u64());
            }
            ReplicationEvent::XLogData { data, .. } => {
                match pgoutput::parse(&data).map_err(|e| protocol(target, e))? {
                    Change::Relation(rel) => {
                        relations.insert(rel.id, Columns::of(&rel, schema));
                    }
                    Change::Insert { relation, columns } => {
                        let map = relations.get(&relation).ok_or_else(|| {
                            protocol(
                                target,
                                format!("an insert into unknown relation {relation}"),
                            )
                        })?;
                        if let Some(map) = *map {
                            let seq = columns
                                .get(map.seq)
                                .ok_or_else(|| protocol(target, "an outbox insert without seq"))?
                                .int8()
                                .map_err(|e| {
                                    protocol(target, format!("an outbox insert's seq: {e}"))
                                })?;
                            let added = s
                                .buf
                                .insert(seq, || decode_row(map, columns))
                                .map_err(|e| protocol(target, e.0))?;
                            if added {
                                unannounced += 1;
                                // A large transaction is published while it arrives.
                                if unannounced >= 256 {
                                    unannounced = 0;
                                    shared.wake_relay();
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        if !caught_up && s.buf.received() >= until {
            caught_up = true;
            s.caught_up = true;
            report = Some(s.buf.flushed().max(*flush.borrow()));
            shared.bump();
        }
        drop(s);
        if caught_up && let Some(lsn) = report.filter(|l| *l > 0) {
            client.update_applied_lsn(Lsn(lsn));
        }
    }
}

/// The slot is held by another session. When this source's relay holds the lease, that
/// session belongs to a relay that lost it: end it (under the lease, like a delete).
async fn take_slot_over(shared: &Shared, target: &Target) {
    let Some((holder, generation)) = shared.lock().lease.clone() else {
        return;
    };
    match super::peek::end_slot_holder(&target.store, &target.slot, &holder, generation).await {
        Ok(true) => tracing::info!(slot = %target.slot,
            "log tailing: ended the session of a relay that lost the lease"),
        Ok(false) => {}
        Err(e) => tracing::warn!(slot = %target.slot, error = %e,
            "log tailing: cannot end the session holding the slot"),
    }
}

/// The end of the WAL flushed so far.
async fn wal_flush_lsn(store: &PgStore) -> Result<u64> {
    let lsn: i64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0')::int8")
            .fetch_one(store.pool())
            .await
            .map_err(store.err("reading the end of the WAL"))?;
    Ok(u64::try_from(lsn).unwrap_or(0))
}

fn protocol(target: &Target, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Decode,
        format!(
            "reading replication slot {} on {}: {e}",
            target.slot,
            target.describe()
        ),
    )
}

/// The size and message of an inserted row.
fn decode_row(
    map: Columns,
    mut columns: Vec<Column>,
) -> (usize, std::result::Result<Message, String>) {
    let mut take = |i: usize, name: &str| {
        columns
            .get_mut(i)
            .map(|c| std::mem::replace(c, Column::Null))
            .ok_or_else(|| format!("column {name} is missing"))
    };
    let (id, headers, payload) = (
        take(map.message_id, "message_id"),
        take(map.headers, "headers"),
        take(map.payload, "payload"),
    );
    let size = [&id, &headers, &payload]
        .iter()
        .map(|c| c.as_ref().map_or(0, Column::len))
        .sum();
    let message = (|| {
        let id = id?.text().map_err(|e| format!("message_id: {e}"))?;
        let headers = headers?.text().map_err(|e| format!("headers: {e}"))?;
        let payload = payload?.bytea().map_err(|e| format!("payload: {e}"))?;
        crate::decode_message(&id, &headers, payload.into())
    })();
    (size, message)
}

/// The replication connection's settings, from the store's connection options: same
/// host (or socket directory), port, user, password and database; binary columns. A URL
/// that requires TLS is refused: this build streams without TLS.
pub(super) fn config(store: &PgStore, slot: &str) -> Result<ReplicationConfig> {
    let o = store.pool().connect_options();
    let describe = &store.inner.describe;
    if matches!(
        o.get_ssl_mode(),
        PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
    ) {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{describe} requires TLS (sslmode), but log tailing streams the replication \
                 slot over a connection without TLS in this build; use sslmode=prefer or \
                 disable on a trusted network, or the polling relay"
            ),
        ));
    }
    let url = sqlx::ConnectOptions::to_url_lossy(&*o);
    let password = url.password().map(percent_decode).unwrap_or_default();
    let user = o.get_username();
    let database = o.get_database().unwrap_or(user);
    let mut config = match o.get_socket() {
        Some(dir) => ReplicationConfig::unix(
            dir.to_string_lossy(),
            o.get_port(),
            user,
            password,
            database,
            slot,
            slot,
        ),
        None => ReplicationConfig::new(o.get_host(), user, password, database, slot, slot)
            .with_port(o.get_port()),
    }
    .with_binary(true)
    .with_status_interval(STATUS_INTERVAL)
    .with_buffer_size(QUEUED_EVENTS);
    let mut name = format!("courier-tail {slot}");
    name.truncate(63);
    config.application_name = Some(name);
    Ok(config)
}

/// Connect and authenticate once, without taking the slot: wrong credentials, a role
/// without `REPLICATION` or an unreachable server fail here, naming the URL.
pub(super) async fn check(target: &Target) -> Result<()> {
    let attempt = async {
        let mut client = ReplicationClient::connect_gated(target.config.clone()).await?;
        client.identify_system().await.map(|_| ())
    };
    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
        Ok(r) => r.map_err(|e| target.error(e)),
        Err(_) => Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "cannot open a replication connection to {} within 30 s (check that PostgreSQL \
                 is running and reachable at that host and port)",
                target.describe()
            ),
        )),
    }
}

/// The SQLSTATE of a server error (`"... (SQLSTATE 28P01)"`).
fn sqlstate(e: &PgWireError) -> Option<&str> {
    let PgWireError::Server(m) = e else {
        return None;
    };
    let code = m.strip_suffix(')')?.rsplit_once("(SQLSTATE ")?.1;
    Some(code)
}

/// `e`, met on the replication connection to `describe` (no password) for `slot`.
pub(super) fn stream_error(describe: &str, slot: &str, e: PgWireError) -> Error {
    use ErrorKind::*;
    use ErrorStatus::*;
    const CREDENTIALS: &str = "check the user, password and database name in the URL";
    const REACH: &str = "check that PostgreSQL is running and reachable at that host and port";
    let (kind, status, hint) = match &e {
        PgWireError::Io(_) => (Unavailable, Transient, REACH),
        PgWireError::Auth(_) => (Config, Permanent, CREDENTIALS),
        PgWireError::Tls(_) => (Config, Permanent, "this build streams without TLS"),
        PgWireError::Server(_) => match sqlstate(&e).unwrap_or_default() {
            "42501" => (
                Config,
                Permanent,
                "the role needs the REPLICATION attribute (or superuser)",
            ),
            c if c.starts_with("28") || c == "3D000" => (Config, Permanent, CREDENTIALS),
            "55006" => (
                Unavailable,
                Transient,
                "another session reads this slot; it is taken over once its relay's lease ends",
            ),
            "42704" => (
                Config,
                Permanent,
                "the slot was dropped; restart the relay to create it again",
            ),
            c if c.starts_with("08") || c.starts_with("57") || c.starts_with("53") => {
                (Unavailable, Transient, REACH)
            }
            _ => (Storage, Transient, "the stream is retried"),
        },
        _ => (Storage, Transient, "the stream is retried"),
    };
    Error::new(
        kind,
        format!("replication connection to {describe} for slot {slot}: {e} ({hint})"),
    )
    .with_status(status)
    .with_source(e)
}

/// `s` with `%XX` escapes decoded (a URL's password).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aw%25rd"), "p@ss:w%rd");
        assert_eq!(percent_decode("plain%"), "plain%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn errors_name_the_url_and_say_whether_to_retry() {
        let url = "postgres://app@db:5432/orders";
        let auth = PgWireError::Server(
            "password authentication failed for user \"app\" (SQLSTATE 28P01)".into(),
        );
        assert_eq!(sqlstate(&auth), Some("28P01"));
        let e = stream_error(url, "s", auth);
        assert!(e.message().contains(url), "{e}");
        assert!(e.message().contains("password"), "{e}");
        assert!(!e.is_retryable());
        assert_eq!(e.kind(), ErrorKind::Config);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = stream_error(url, "s", PgWireError::Io(Arc::new(io)));
        assert!(e.is_retryable());
        assert!(e.message().contains("reachable"), "{e}");
        let busy = PgWireError::Server(
            "replication slot \"s\" is active for PID 7 (SQLSTATE 55006)".into(),
        );
        assert!(stream_error(url, "s", busy).is_retryable());
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert!(backoff(3) > backoff(2));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
