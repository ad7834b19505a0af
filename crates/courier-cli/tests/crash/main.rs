//! Crash test with real OS processes: two consumer processes (one group, one service
//! database) and two relay processes (one outbox) run while messages are written; the
//! active relay and one consumer are killed with SIGKILL mid-stream. Afterwards the
//! databases must show every message applied exactly once and none missing. Run on the
//! embedded default (SQLite files + SQLite broker) and on PostgreSQL service databases
//! with NATS JetStream (COURIER_TEST_POSTGRES_URL, COURIER_TEST_NATS_URL; without them
//! that variant skips, except under CI where it fails).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use courier::postgres::PgStore;
use courier::sqlite::SqliteStore;
use courier::{ChannelName, Codec, Contract, MessageKind};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const N: u64 = 3000;

#[derive(Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Ping {
    n: u64,
    ts_us: u64,
    pad: String,
}

impl Contract for Ping {
    const TYPE: &'static str = "bench.Ping";
    const KIND: MessageKind = MessageKind::Event;
}

struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// SIGKILL: no clean shutdown, no lease release, no final offset commit.
    fn kill9(&mut self) {
        self.child
            .kill()
            .unwrap_or_else(|e| panic!("kill -9 {}: {e}", self.name));
        self.child.wait().unwrap();
    }
}

fn courier() -> Command {
    Command::new(env!("CARGO_BIN_EXE_courier"))
}

/// Where the run's databases and broker are.
struct Backends {
    /// Extra `bench --internal-consumer` arguments (database, broker, channel).
    consumer: Vec<String>,
    /// The producer's service database, as `courier relay --db` takes it.
    relay_db: String,
    /// The broker, as `courier relay --broker` takes it.
    broker: String,
}

impl Backends {
    fn sqlite(dir: &Path) -> Self {
        Self {
            consumer: Vec::new(),
            relay_db: format!("sqlite:{}", dir.join("producer.db").display()),
            broker: format!("sqlite:{}", dir.join("broker.db").display()),
        }
    }
}

/// The producer's store, with what the test reads of both sides.
enum Stores {
    Sqlite(SqliteStore, sqlx::SqlitePool),
    Postgres(PgStore, sqlx::PgPool),
}

impl Stores {
    async fn write(&self, channel: &ChannelName, from: u64, to: u64) {
        let mut n = from;
        while n < to {
            let batch: Vec<_> = (n..to.min(n + 25))
                .map(|n| {
                    let ping = Ping {
                        n,
                        ts_us: 0,
                        pad: "x".repeat(100),
                    };
                    Codec::encode_to(&ping, channel)
                        .unwrap()
                        .with_key(format!("key-{}", n % 37))
                        .unwrap()
                })
                .collect();
            n += batch.len() as u64;
            match self {
                Self::Sqlite(store, _) => {
                    let mut tx = store.begin().await.unwrap();
                    store.outbox().send_all(&mut tx, &batch).await.unwrap();
                    tx.commit().await.unwrap();
                }
                Self::Postgres(store, _) => {
                    let mut tx = store.begin().await.unwrap();
                    store.outbox().send_all(&mut tx, &batch).await.unwrap();
                    tx.commit().await.unwrap();
                }
            }
        }
    }

    /// (effects, distinct messages applied) in the consumers' database.
    async fn effects(&self) -> (i64, i64) {
        let q = "SELECT count(*), count(DISTINCT n) FROM effects";
        match self {
            Self::Sqlite(_, fx) => sqlx::query_as(q).fetch_one(fx).await,
            Self::Postgres(_, fx) => sqlx::query_as(q).fetch_one(fx).await,
        }
        .unwrap_or((0, 0))
    }

    async fn max_n(&self) -> i64 {
        let q = "SELECT max(n) FROM effects";
        match self {
            Self::Sqlite(_, fx) => sqlx::query_scalar(q).fetch_one(fx).await,
            Self::Postgres(_, fx) => sqlx::query_scalar(q).fetch_one(fx).await,
        }
        .unwrap()
    }

    async fn lease_holder(&self) -> Option<String> {
        let q = "SELECT holder FROM courier_relay_lease";
        match self {
            Self::Sqlite(store, _) => sqlx::query_scalar::<_, Option<String>>(q)
                .fetch_optional(store.pool())
                .await
                .ok()
                .flatten()
                .flatten(),
            Self::Postgres(store, _) => sqlx::query_scalar::<_, Option<String>>(q)
                .fetch_optional(store.pool())
                .await
                .ok()
                .flatten()
                .flatten(),
        }
    }

    async fn outbox_len(&self) -> u64 {
        match self {
            Self::Sqlite(store, _) => store.outbox_len().await.unwrap(),
            Self::Postgres(store, _) => store.outbox_len().await.unwrap(),
        }
    }
}

fn consumer(dir: &Path, backends: &Backends, name: &'static str) -> Proc {
    let mut child = courier()
        .args(["bench", "--internal-consumer", "--messages"])
        .arg(N.to_string())
        .args(["--partitions", "4", "--sync", "normal", "--dir"])
        .arg(dir)
        .args(&backends.consumer)
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "consumer {name} did not start");
    Proc { name, child }
}

fn relay(backends: &Backends, name: &'static str) -> Proc {
    let child = courier()
        .arg("relay")
        .arg("--db")
        .arg(&backends.relay_db)
        .arg("--broker")
        .arg(&backends.broker)
        .args(["--lease-ms", "600", "--instance", name])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc { name, child }
}

async fn wait_for(within: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The scenario: a third of the messages written, two consumers and the active relay
/// up, a standby relay started, then more messages while the active relay and a consumer
/// are killed with SIGKILL; every message must be applied exactly once.
async fn kill_9_scenario(dir: &Path, backends: &Backends, stores: &Stores, channel: &ChannelName) {
    stores.write(channel, 0, N / 3).await;
    let mut c1 = consumer(dir, backends, "consumer-1");
    let _c2 = consumer(dir, backends, "consumer-2");
    let mut r1 = relay(backends, "relay-1");
    wait_for(Duration::from_secs(20), "relay-1 active", async || {
        stores.lease_holder().await.as_deref() == Some("relay-1")
    })
    .await;
    let _r2 = relay(backends, "relay-2");

    wait_for(Duration::from_secs(30), "a quarter applied", async || {
        stores.effects().await.1 >= (N / 4) as i64
    })
    .await;

    // Mid-stream: more messages arrive while the active relay and a consumer die.
    stores.write(channel, N / 3, 2 * N / 3).await;
    r1.kill9();
    c1.kill9();
    stores.write(channel, 2 * N / 3, N).await;

    wait_for(
        Duration::from_secs(60),
        "every message applied",
        async || stores.effects().await.1 == N as i64,
    )
    .await;
    assert_eq!(
        stores.lease_holder().await.as_deref(),
        Some("relay-2"),
        "the standby relay took over"
    );
    let (rows, distinct) = stores.effects().await;
    assert_eq!(distinct, N as i64, "a message is missing");
    assert_eq!(rows, N as i64, "a message was applied twice");
    assert_eq!(stores.outbox_len().await, 0, "the outbox drained");
    assert_eq!(stores.max_n().await, N as i64 - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_consumer_and_the_active_relay_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = SqliteStore::open(d.join("producer.db")).await.unwrap();
    // The consumers create their database; the test reads it once it exists.
    let backends = Backends::sqlite(d);
    let channel = ChannelName::new("bench").unwrap();
    let fx_url = format!("sqlite:{}?mode=rwc", d.join("consumer.db").display());
    let fx = sqlx::SqlitePool::connect(&fx_url).await.unwrap();
    let stores = Stores::Sqlite(store, fx);
    kill_9_scenario(d, &backends, &stores, &channel).await;
}

fn env_url(var: &str, example: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() => panic!("{var} must be set in CI"),
        _ => {
            eprintln!("skipping: set {var}={example}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_postgres_and_nats_loses_nothing_and_applies_nothing_twice() {
    let Some(pg) = env_url(
        "COURIER_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    ) else {
        return;
    };
    let Some(nats) = env_url("COURIER_TEST_NATS_URL", "nats://127.0.0.1:4222") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let id = uuid::Uuid::now_v7().simple().to_string()[16..].to_owned();
    let prefix = format!("courier_crash_{id}");
    let in_schema = |schema: &str| {
        let sep = if pg.contains('?') { '&' } else { '?' };
        format!("{pg}{sep}options[search_path]={schema}")
    };
    let admin = sqlx::PgPool::connect(&pg).await.unwrap();
    for side in ["producer", "consumer"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA {prefix}_{side}"
        )))
        .execute(&admin)
        .await
        .unwrap();
    }
    let store = PgStore::connect(&in_schema(&format!("{prefix}_producer")))
        .await
        .unwrap();
    // The consumers create their tables; the test reads them once they exist.
    let fx = sqlx::PgPool::connect(&in_schema(&format!("{prefix}_consumer")))
        .await
        .unwrap();
    let channel = ChannelName::new(format!("crash-{id}")).unwrap();
    let transport = courier::nats::NatsTransport::connect(&nats).await.unwrap();
    transport.create_channel(&channel, 4).await.unwrap();
    let backends = Backends {
        consumer: vec![
            "--db".into(),
            pg.clone(),
            "--schema-prefix".into(),
            prefix.clone(),
            "--broker".into(),
            nats.clone(),
            "--internal-channel".into(),
            channel.to_string(),
        ],
        relay_db: in_schema(&format!("{prefix}_producer")),
        broker: nats.clone(),
    };
    let stores = Stores::Postgres(store, fx);
    kill_9_scenario(dir.path(), &backends, &stores, &channel).await;

    transport.delete_channel(&channel).await.unwrap();
    for side in ["producer", "consumer"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {prefix}_{side} CASCADE"
        )))
        .execute(&admin)
        .await
        .unwrap();
    }
}
