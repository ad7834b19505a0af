//! `courier relay` selected by URL: a PostgreSQL outbox relayed to NATS JetStream by a real
//! relay process, and relay processes (polling and log tailing) killed with SIGKILL
//! mid-stream. Needs COURIER_TEST_POSTGRES_URL (and COURIER_TEST_NATS_URL for NATS), set
//! by `.ci/run`; without them the tests skip, except under CI where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use courier::nats::NatsTransport;
use courier::postgres::PgStore;
use courier::{ChannelName, GroupName, Message, SubscribeOptions, Subscriber};
use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

fn server_urls() -> Option<(String, String)> {
    let pg = std::env::var("COURIER_TEST_POSTGRES_URL").ok();
    let nats = std::env::var("COURIER_TEST_NATS_URL").ok();
    match (pg, nats) {
        (Some(pg), Some(nats)) => Some((pg, nats)),
        _ if std::env::var_os("CI").is_some() => {
            panic!("COURIER_TEST_POSTGRES_URL and COURIER_TEST_NATS_URL must be set in CI")
        }
        _ => {
            eprintln!(
                "skipping: set COURIER_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1/test and \
                 COURIER_TEST_NATS_URL=nats://127.0.0.1:4222"
            );
            None
        }
    }
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_process_moves_a_postgres_outbox_to_nats() {
    let Some((pg, nats)) = server_urls() else {
        return;
    };
    let id = uuid::Uuid::now_v7().simple().to_string();
    let schema = format!("courier_cli_{id}");
    let base = PgStore::connect(&pg).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(base.pool())
        .await
        .unwrap();
    let sep = if pg.contains('?') { '&' } else { '?' };
    let url = format!("{pg}{sep}options=-c%20search_path%3D{schema}");
    let store = PgStore::connect(&url).await.unwrap();

    let channel = ChannelName::new(format!("cli-relay-{id}")).unwrap();
    let mut sent = HashSet::new();
    for i in 0..20 {
        let mut tx = store.begin().await.unwrap();
        let m = Message::new(format!("{i}"))
            .to(channel.clone())
            .with_key(format!("k{}", i % 3))
            .unwrap();
        sent.insert(m.id.to_string());
        store.outbox().send(&mut tx, m).await.unwrap();
        tx.commit().await.unwrap();
    }

    let _relay = Killed(
        Command::new(env!("CARGO_BIN_EXE_courier"))
            .args([
                "relay",
                "--db",
                &url,
                "--broker",
                &nats,
                "--lease-ms",
                "1000",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );

    let transport = NatsTransport::connect(&nats).await.unwrap();
    let mut sub = transport
        .subscribe(SubscribeOptions::new(
            channel.clone(),
            GroupName::new("cli-check").unwrap(),
        ))
        .await
        .unwrap();
    let mut got = HashSet::new();
    while got.len() < sent.len() {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("the relay process published every outbox row")
            .unwrap();
        got.insert(d.message.as_ref().unwrap().id.to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(got, sent);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.outbox_len().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the outbox drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sub);
    let _ = transport.delete_channel(&channel).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(base.pool())
        .await;
}

// ---- `courier relay` killed with SIGKILL mid-stream ----------------------------------------

fn pg_url() -> Option<String> {
    match std::env::var("COURIER_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("COURIER_TEST_POSTGRES_URL must be set in CI")
        }
        _ => {
            eprintln!("skipping: set COURIER_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1/test");
            None
        }
    }
}

/// Drops the test's replication slot (if any) and schema, also when the test fails.
struct Cleanup {
    base: PgStore,
    schema: String,
    slot: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let base = self.base.clone();
        let schema = self.schema.clone();
        let slot = self.slot.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Some(slot) = slot {
                    // A killed relay's backend may hold the slot for a moment.
                    for _ in 0..50 {
                        let _ = sqlx::query(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                             WHERE slot_name = $1 AND active_pid IS NOT NULL",
                        )
                        .bind(&slot)
                        .execute(base.pool())
                        .await;
                        if courier::postgres::PgLogTailing::drop_slot_named(&base, &slot)
                            .await
                            .is_ok()
                        {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .execute(base.pool())
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Messages written while a `courier relay --relay <how>` process runs; it is killed with
/// SIGKILL mid-stream and a second relay finishes: every message arrives, a repeat only
/// ever carries an id that was sent, none is missing, the outbox ends empty.
async fn relay_killed_mid_stream_loses_nothing(how: &str) {
    let Some(pg) = pg_url() else { return };
    let id = uuid::Uuid::now_v7().simple().to_string();
    let schema = format!("courier_cli_{id}");
    let base = PgStore::connect(&pg).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(base.pool())
        .await
        .unwrap();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let slot = (how == "log-tailing").then(|| format!("courier_test_{secs}_{}", &id[20..]));
    let _cleanup = Cleanup {
        base: base.clone(),
        schema: schema.clone(),
        slot: slot.clone(),
    };
    let sep = if pg.contains('?') { '&' } else { '?' };
    let url = format!("{pg}{sep}options=-c%20search_path%3D{schema}");
    let store = PgStore::connect(&url).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker_path = dir.path().join("broker.db");
    let broker_url = format!("sqlite:{}", broker_path.display());
    let broker = courier::sqlite::SqliteBroker::open(&broker_path)
        .await
        .unwrap();
    let channel = ChannelName::new(format!("kill-{how}")).unwrap();

    let spawn = |instance: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
        cmd.args([
            "relay",
            "--relay",
            how,
            "--db",
            &url,
            "--broker",
            &broker_url,
        ])
        .args([
            "--lease-ms",
            "1000",
            "--batch-size",
            "20",
            "--instance",
            instance,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        if let Some(slot) = &slot {
            cmd.args(["--slot", slot]);
        }
        Killed(cmd.spawn().unwrap())
    };
    let mut first = spawn("first");

    // 1500 messages in 75 transactions of 20, written while the relays run; batches of 7
    // cut transactions, so the kill may land inside one.
    let writer = {
        let store = store.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for t in 0..75 {
                let batch: Vec<Message> = (0..20)
                    .map(|i| {
                        Message::new(format!("{t}-{i}"))
                            .to(channel.clone())
                            .with_key(format!("k{}", i % 4))
                            .unwrap()
                    })
                    .collect();
                let mut tx = store.begin().await.unwrap();
                store.outbox().send_all(&mut tx, &batch).await.unwrap();
                tx.commit().await.unwrap();
                sent.extend(batch.iter().map(|m| m.id.to_string()));
                tokio::task::yield_now().await;
            }
            sent
        })
    };
    let arrived = || async {
        broker
            .read_after(&channel, 0, 1_000_000)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, m)| m.unwrap().id.to_string())
            .collect::<Vec<_>>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while arrived().await.len() < 300 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first relay published 300 messages"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SIGKILL: no lease release, no clean end of a batch.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let second = spawn("second");
    let sent = writer.await.unwrap();
    let sent_set: HashSet<String> = sent.iter().cloned().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = arrived().await;
        let got_set: HashSet<String> = got.iter().cloned().collect();
        assert!(got_set.is_subset(&sent_set), "only sent ids arrive");
        if got_set == sent_set && store.outbox_len().await.unwrap() == 0 {
            eprintln!(
                "relay {how}: {} messages, {} arrivals ({} repeated after the kill)",
                sent.len(),
                got.len(),
                got.len() - sent.len()
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every message arrived ({} of {}) and the outbox drained",
            got_set.len(),
            sent_set.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
    if let Some(slot) = &slot {
        // Giving log tailing up: the CLI drops the slot and its publication (once the
        // killed relay's session has let go of the slot).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let out = loop {
            let out = Command::new(env!("CARGO_BIN_EXE_courier"))
                .args([
                    "relay",
                    "--relay",
                    how,
                    "--db",
                    &url,
                    "--drop-slot",
                    "--slot",
                    slot,
                ])
                .output()
                .unwrap();
            if out.status.success() || tokio::time::Instant::now() > deadline {
                break out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("dropped replication slot {slot}")),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_one(base.pool())
                .await
                .unwrap();
        assert_eq!(left, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_tailing_relay_killed_mid_stream_loses_nothing() {
    relay_killed_mid_stream_loses_nothing("log-tailing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_relay_killed_mid_stream_loses_nothing() {
    relay_killed_mid_stream_loses_nothing("polling").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_tailing_needs_a_postgres_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("svc.db").display());
    let broker = format!("sqlite:{}", dir.path().join("broker.db").display());
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args([
            "relay",
            "--relay",
            "log-tailing",
            "--db",
            &db,
            "--broker",
            &broker,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a PostgreSQL service database"), "{err}");
    let help = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["relay", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "log-tailing",
        "wal_level = logical",
        "--drop-slot",
        "--slot",
    ] {
        assert!(help.contains(needle), "--help mentions {needle}");
    }
}
