//! Crash test with real OS processes: two consumer processes (one group, one service
//! database) and two relay processes (one outbox) run while messages are written; the
//! active relay and one consumer are killed with SIGKILL mid-stream. Afterwards the
//! databases must show every message applied exactly once and none missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use courier::sqlite::SqliteStore;
use courier::{ChannelName, Contract, JsonCodec, MessageKind};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const N: u64 = 3000;

#[derive(Serialize, serde::Deserialize)]
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

fn consumer(dir: &Path, name: &'static str) -> Proc {
    let mut child = courier()
        .args(["bench", "--internal-consumer", "--messages"])
        .arg(N.to_string())
        .args(["--partitions", "4", "--sync", "normal", "--dir"])
        .arg(dir)
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

fn relay(dir: &Path, name: &'static str) -> Proc {
    let child = courier()
        .arg("relay")
        .arg("--db")
        .arg(format!("sqlite:{}", dir.join("producer.db").display()))
        .arg("--broker")
        .arg(format!("sqlite:{}", dir.join("broker.db").display()))
        .args(["--lease-ms", "600", "--instance", name])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc { name, child }
}

async fn write(store: &SqliteStore, channel: &ChannelName, from: u64, to: u64) {
    let mut n = from;
    while n < to {
        let mut tx = store.begin().await.unwrap();
        for _ in 0..25.min(to - n) {
            let ping = Ping {
                n,
                ts_us: 0,
                pad: "x".repeat(100),
            };
            let msg = JsonCodec::encode_to(&ping, channel)
                .unwrap()
                .with_key(format!("key-{}", n % 37))
                .unwrap();
            store.outbox().send(&mut tx, msg).await.unwrap();
            n += 1;
        }
        tx.commit().await.unwrap();
    }
}

async fn effects(pool: &sqlx::SqlitePool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT n) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap_or((0, 0))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_consumer_and_the_active_relay_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = SqliteStore::open(d.join("producer.db")).await.unwrap();
    let channel = ChannelName::new("bench").unwrap();
    write(&store, &channel, 0, N / 3).await;

    let mut c1 = consumer(d, "consumer-1");
    let _c2 = consumer(d, "consumer-2");
    let mut r1 = relay(d, "relay-1");
    let lease = |holder: &'static str| {
        let store = store.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>("SELECT holder FROM courier_relay_lease")
                .fetch_optional(store.pool())
                .await
                .ok()
                .flatten()
                .flatten()
                .as_deref()
                == Some(holder)
        }
    };
    wait_for(Duration::from_secs(20), "relay-1 active", async || {
        lease("relay-1").await
    })
    .await;
    let _r2 = relay(d, "relay-2");

    let fx = sqlx::SqlitePool::connect(&format!("sqlite:{}", d.join("consumer.db").display()))
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "a quarter applied", async || {
        effects(&fx).await.1 >= (N / 4) as i64
    })
    .await;

    // Mid-stream: more messages arrive while the active relay and a consumer die.
    write(&store, &channel, N / 3, 2 * N / 3).await;
    r1.kill9();
    c1.kill9();
    write(&store, &channel, 2 * N / 3, N).await;

    wait_for(
        Duration::from_secs(60),
        "every message applied",
        async || effects(&fx).await.1 == N as i64,
    )
    .await;
    assert!(lease("relay-2").await, "the standby relay took over");
    let (rows, distinct) = effects(&fx).await;
    assert_eq!(distinct, N as i64, "a message is missing");
    assert_eq!(rows, N as i64, "a message was applied twice");
    assert_eq!(store.outbox_len().await.unwrap(), 0, "the outbox drained");
    let n_max: i64 = sqlx::query_scalar("SELECT max(n) FROM effects")
        .fetch_one(&fx)
        .await
        .unwrap();
    assert_eq!(n_max, N as i64 - 1);
}
