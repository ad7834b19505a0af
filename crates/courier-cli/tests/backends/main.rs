//! `courier relay` selected by URL: a PostgreSQL outbox relayed to NATS JetStream by a real
//! relay process. Needs COURIER_TEST_POSTGRES_URL and COURIER_TEST_NATS_URL (set by
//! `.ci/run`); without them the test skips, except under CI where it fails.
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
