//! A schema of its own per test on the real PostgreSQL, the embedded SQLite broker as the
//! destination, and the relay suite's factory for both PostgreSQL outbox sources.
#![allow(unreachable_pub, dead_code)]

use courier_core::transport::BoxFuture;
use courier_core::{ChannelName, Error, ErrorKind, Message, Publisher, Result};
use courier_postgres::{PgLogTailing, PgStore};
use courier_sqlite::SqliteBroker;
use courier_testkit::relay_suite::{OpenTransaction, OutboxFactory};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const URL_VAR: &str = "COURIER_TEST_POSTGRES_URL";

/// Test slots are named `courier_test_<unix seconds>_<random>`; older than this and
/// inactive, they are left-overs of a crashed run and dropped.
const STALE_SLOT: Duration = Duration::from_secs(300);

/// The server's URL, or `None` (after saying why) when the tests should skip.
pub fn pg_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!("{URL_VAR} must be set in CI"),
        _ => {
            println!("skipping: set {URL_VAR}=postgres://postgres@127.0.0.1/test");
            None
        }
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Which PostgreSQL outbox source the factory makes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Polling,
    Tailing,
}

/// One schema (outbox, lease), one broker, and for log tailing one slot; all dropped
/// with it (the slot first).
pub struct PgFactory {
    pub store: PgStore,
    pub broker: SqliteBroker,
    pub kind: Kind,
    pub slot: Option<String>,
    url: String,
    schema: String,
    _dir: tempfile::TempDir,
}

impl PgFactory {
    pub async fn polling() -> Option<PgFactory> {
        Self::new(Kind::Polling).await
    }

    pub async fn tailing() -> Option<PgFactory> {
        Self::new(Kind::Tailing).await
    }

    /// A log-tailing factory whose slot is only named: the first source creates it.
    pub async fn tailing_slot_later() -> Option<PgFactory> {
        Self::build(Kind::Tailing, false).await
    }

    async fn new(kind: Kind) -> Option<PgFactory> {
        Self::build(kind, true).await
    }

    async fn build(kind: Kind, create_slot: bool) -> Option<PgFactory> {
        let url = pg_url()?;
        let schema = format!("courier_t_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let broker = SqliteBroker::open(dir.path().join("broker.db"))
            .await
            .unwrap();
        let store = store_on(&url, &schema).await;
        let slot = if kind == Kind::Tailing {
            drop_stale_slots(&store).await;
            let name = format!(
                "courier_test_{}_{}",
                now_s(),
                &uuid::Uuid::now_v7().simple().to_string()[20..]
            );
            // Create it now, before any scenario holds a transaction open.
            if create_slot {
                PgLogTailing::with_slot(store.clone(), &name).await.unwrap();
            }
            Some(name)
        } else {
            None
        };
        Some(PgFactory {
            store,
            broker,
            kind,
            slot,
            url,
            schema,
            _dir: dir,
        })
    }
}

impl PgFactory {
    /// A log-tailing source on the factory's slot, as another process would open it.
    pub async fn tailing_source(&self) -> PgLogTailing {
        let slot = self.slot.as_deref().expect("a log-tailing factory");
        PgLogTailing::with_slot(store_on(&self.url, &self.schema).await, slot)
            .await
            .unwrap()
    }
}

impl PgFactory {
    /// The server's URL.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A store on the factory's schema whose connections set `settings` too.
    pub async fn store_with(&self, settings: &[(&str, &str)]) -> PgStore {
        store_with(&self.url, &self.schema, settings).await
    }
}

/// A store on a pool of its own whose connections use `schema` (like another process).
async fn store_on(url: &str, schema: &str) -> PgStore {
    store_with(url, schema, &[]).await
}

async fn store_with(url: &str, schema: &str, settings: &[(&str, &str)]) -> PgStore {
    let options: PgConnectOptions = url.parse().unwrap();
    let options = options
        .options([("search_path", schema)])
        .options(settings.iter().copied());
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    PgStore::open(pool).await.unwrap()
}

/// The standby name [`SyncStandbyStall`] waits for; no server has it.
pub const NEVER_STANDBY: &str = "courier_test_never";

/// While it lives, commits of sessions that set `synchronous_commit = on` wait for a
/// synchronous standby that never comes (until their wait is cancelled): such a commit
/// is in the log, and sent to logical replication slots, but not yet visible. Every other
/// session runs with `synchronous_commit = local` meanwhile (the server's default is
/// changed with the standby list, in one reload), so other tests do not wait. Dropping it
/// puts both settings back; `.ci/run` does too, after a run that was killed.
pub struct SyncStandbyStall {
    url: String,
}

impl SyncStandbyStall {
    pub async fn arm(url: &str) -> SyncStandbyStall {
        let mut conn = PgConnection::connect(url).await.unwrap();
        let names: String = sqlx::query_scalar("SHOW synchronous_standby_names")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert!(
            names.is_empty() || names == NEVER_STANDBY,
            "this test needs a server without synchronous standbys; it has \
             synchronous_standby_names = '{names}'"
        );
        for statement in [
            "ALTER SYSTEM SET synchronous_commit = local",
            "ALTER SYSTEM SET synchronous_standby_names = 'courier_test_never'",
            "SELECT pg_reload_conf()",
        ] {
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        }
        conn.close().await.unwrap();
        SyncStandbyStall {
            url: url.to_owned(),
        }
    }
}

impl Drop for SyncStandbyStall {
    fn drop(&mut self) {
        let url = self.url.clone();
        // Drop runs inside the test's runtime: reset on a runtime of our own.
        let reset = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                for statement in [
                    "ALTER SYSTEM RESET synchronous_standby_names",
                    "ALTER SYSTEM RESET synchronous_commit",
                    "SELECT pg_reload_conf()",
                ] {
                    sqlx::query(statement).execute(&mut conn).await.unwrap();
                }
                let _ = conn.close().await;
            });
        });
        if reset.join().is_err() {
            eprintln!(
                "could not reset synchronous_standby_names: run ALTER SYSTEM RESET \
                 synchronous_standby_names; ALTER SYSTEM RESET synchronous_commit; SELECT \
                 pg_reload_conf();"
            );
        }
    }
}

/// Drop inactive `courier_test_*` slots older than [`STALE_SLOT`] (and their publications).
async fn drop_stale_slots(store: &PgStore) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT slot_name::text FROM pg_replication_slots
         WHERE slot_name LIKE 'courier\\_test\\_%' AND NOT active",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    for name in names {
        let born = name
            .split('_')
            .nth(2)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        if now_s().saturating_sub(born) > STALE_SLOT.as_secs() {
            let _ = PgLogTailing::drop_slot_named(store, &name).await;
        }
    }
}

impl Drop for PgFactory {
    fn drop(&mut self) {
        let url = self.url.clone();
        let schema = self.schema.clone();
        let slot = self.slot.clone();
        // Drop runs inside the test's runtime: clean up on a runtime of our own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(mut conn) = PgConnection::connect(&url).await else {
                    return;
                };
                let _ = sqlx::query("SET lock_timeout = '5s'")
                    .execute(&mut conn)
                    .await;
                if let Some(slot) = slot {
                    // A relay task that was killed may still hold the slot for a moment.
                    for _ in 0..50 {
                        let _ = sqlx::query(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                             WHERE slot_name = $1 AND active_pid IS NOT NULL",
                        )
                        .bind(&slot)
                        .execute(&mut conn)
                        .await;
                        let dropped = sqlx::query(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                             WHERE slot_name = $1",
                        )
                        .bind(&slot)
                        .execute(&mut conn)
                        .await;
                        if dropped.is_ok() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP PUBLICATION IF EXISTS \"{slot}\""
                    )))
                    .execute(&mut conn)
                    .await;
                }
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .execute(&mut conn)
                .await;
                let _ = conn.close().await;
            });
        });
        let _ = cleanup.join();
    }
}

/// One of the two PostgreSQL sources, so one factory type serves both.
#[derive(Clone, Debug)]
pub enum PgSource {
    Polling(PgStore),
    Tailing(PgLogTailing),
}

impl courier_core::OutboxSource for PgSource {
    async fn outbox_peek(
        &self,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<courier_core::OutboxRow>> {
        match self {
            PgSource::Polling(s) => s.outbox_peek(limit, max_bytes).await,
            PgSource::Tailing(s) => s.outbox_peek(limit, max_bytes).await,
        }
    }
    async fn outbox_delete(&self, seqs: &[i64], holder: &str, generation: i64) -> Result<bool> {
        match self {
            PgSource::Polling(s) => s.outbox_delete(seqs, holder, generation).await,
            PgSource::Tailing(s) => s.outbox_delete(seqs, holder, generation).await,
        }
    }
    async fn relay_lease(&self, holder: &str, ttl_ms: u64) -> Result<Option<i64>> {
        match self {
            PgSource::Polling(s) => s.relay_lease(holder, ttl_ms).await,
            PgSource::Tailing(s) => {
                courier_core::OutboxSource::relay_lease(s, holder, ttl_ms).await
            }
        }
    }
    async fn relay_release(&self, holder: &str) -> Result<()> {
        match self {
            PgSource::Polling(s) => s.relay_release(holder).await,
            PgSource::Tailing(s) => courier_core::OutboxSource::relay_release(s, holder).await,
        }
    }
    async fn outbox_arm(&self) -> bool {
        match self {
            PgSource::Polling(s) => s.outbox_arm().await,
            PgSource::Tailing(s) => s.outbox_arm().await,
        }
    }
    fn outbox_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        match self {
            PgSource::Polling(s) => s.outbox_changes(),
            PgSource::Tailing(s) => s.outbox_changes(),
        }
    }
    fn describe(&self) -> String {
        match self {
            PgSource::Polling(s) => courier_core::OutboxSource::describe(s),
            PgSource::Tailing(s) => s.describe(),
        }
    }
}

struct OpenPg(sqlx::Transaction<'static, sqlx::Postgres>);

impl OpenTransaction for OpenPg {
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            self.0
                .commit()
                .await
                .map_err(|e| Error::new(ErrorKind::Storage, e.to_string()))
        })
    }
}

impl OutboxFactory for PgFactory {
    type Source = PgSource;

    fn source(&self) -> BoxFuture<'_, Result<PgSource>> {
        Box::pin(async move {
            let store = store_on(&self.url, &self.schema).await;
            Ok(match &self.slot {
                None => PgSource::Polling(store),
                Some(slot) => PgSource::Tailing(PgLogTailing::with_slot(store, slot).await?),
            })
        })
    }

    fn commit<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut tx = self.store.begin().await?;
            self.store.outbox().send_all(&mut tx, messages).await?;
            tx.commit()
                .await
                .map_err(|e| Error::new(ErrorKind::Storage, e.to_string()))
        })
    }

    fn begin_open<'a>(
        &'a self,
        messages: &'a [Message],
    ) -> BoxFuture<'a, Result<Option<Box<dyn OpenTransaction>>>> {
        Box::pin(async move {
            // A sqlx transaction of the pool: its outbox rows are inserted (and take their
            // keys) now, not at the commit as on a `PgStoreTx`, so a transaction that
            // commits late holds lower keys than rows committed before it.
            let mut tx = self
                .store
                .pool()
                .begin()
                .await
                .map_err(|e| Error::new(ErrorKind::Storage, e.to_string()))?;
            self.store.outbox().send_all(&mut tx, messages).await?;
            Ok(Some(Box::new(OpenPg(tx)) as Box<dyn OpenTransaction>))
        })
    }

    fn commit_unreadable<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at)
                 VALUES ('not-a-uuid', $1, '{}', '\\x00', 0)",
            )
            .bind(channel.as_str())
            .execute(self.store.pool())
            .await
            .map_err(|e| Error::new(ErrorKind::Storage, e.to_string()))?;
            Ok(())
        })
    }

    fn outbox_len(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.store.outbox_len())
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.broker.clone())
    }

    fn arrived<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<Vec<Message>>> {
        Box::pin(async move {
            self.broker
                .read_after(channel, 0, 100_000)
                .await?
                .into_iter()
                .map(|(_, m)| m.map_err(|e| Error::new(ErrorKind::Decode, e.reason)))
                .collect()
        })
    }
}
