//! The CLI on every broker and service database by URL: `courier bench` end to end with
//! PostgreSQL service databases and NATS JetStream / RabbitMQ / PostgreSQL brokers, and
//! `publish`, `channels`, `tail` on PostgreSQL, NATS and RabbitMQ brokers. Needs
//! COURIER_TEST_POSTGRES_URL, COURIER_TEST_NATS_URL and COURIER_TEST_AMQP_URL (set by
//! `.ci/run`); without them the tests skip, except under CI where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::process::{Command, Output};

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

fn pg() -> Option<String> {
    env_url(
        "COURIER_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

fn nats() -> Option<String> {
    env_url("COURIER_TEST_NATS_URL", "nats://127.0.0.1:4222")
}

fn amqp() -> Option<String> {
    env_url(
        "COURIER_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

fn courier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .output()
        .expect("running the courier binary")
}

fn unique() -> String {
    uuid::Uuid::now_v7().simple().to_string()[16..].to_owned()
}

/// `url` with its connections' search_path set to `schema`.
fn in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options[search_path]={schema}")
}

/// Run `courier bench --json` with `extra` arguments and check the report contract.
fn bench(extra: &[&str]) -> Value {
    let prefix = format!("courier_t_{}", unique());
    let mut args = vec![
        "bench",
        "--messages",
        "300",
        "--relay-messages",
        "1000",
        "--keys",
        "20",
        "--timeout-secs",
        "120",
        "--schema-prefix",
        &prefix,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = courier(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "courier {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bench printed no JSON object ({e}): {stdout}"));
    for key in [
        "messages",
        "seconds",
        "throughput_msgs_per_s",
        "raw_commit_rate_per_s",
        "raw_publish_rate_per_s",
        "latency_ms",
        "lost",
        "duplicates_applied",
    ] {
        assert!(report.get(key).is_some(), "no {key} in {report}");
    }
    for key in ["p50", "p99", "max"] {
        assert!(report["latency_ms"][key].as_f64().is_some(), "{report}");
    }
    assert_eq!(report["messages"], 300, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicates_applied"], 0, "{report}");
    for key in [
        "throughput_msgs_per_s",
        "raw_commit_rate_per_s",
        "raw_publish_rate_per_s",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }
    report
}

#[test]
fn bench_on_postgres_with_nats() {
    let (Some(pg), Some(nats)) = (pg(), nats()) else {
        return;
    };
    let report = bench(&["--db", &pg, "--broker", &nats]);
    assert!(report["db"].as_str().unwrap().starts_with("postgres://"));
    assert!(report["broker"].as_str().unwrap().starts_with("nats://"));
    // On NATS, the like-with-like reference of the relay: publishes with the headers.
    assert!(
        report["raw_publish_with_headers_rate_per_s"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{report}"
    );
    assert!(
        report["relay_only_vs_raw_publish_with_headers"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{report}"
    );
}

#[test]
fn bench_with_the_log_tailing_relay() {
    let (Some(pg), Some(nats)) = (pg(), nats()) else {
        return;
    };
    let report = bench(&["--db", &pg, "--broker", &nats, "--relay", "log-tailing"]);
    assert_eq!(report["relay"], "log-tailing", "{report}");
    assert!(report["relay_only_msgs_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_refuses_log_tailing_on_sqlite() {
    let out = courier(&["bench", "--messages", "1", "--relay", "log-tailing"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--relay log-tailing needs --db postgres://"),
        "{stderr}"
    );
}

#[test]
fn bench_on_postgres_with_rabbitmq() {
    let (Some(pg), Some(amqp)) = (pg(), amqp()) else {
        return;
    };
    let report = bench(&["--db", &pg, "--broker", &amqp]);
    assert!(report["broker"].as_str().unwrap().starts_with("amqp://"));
    assert!(
        !report["broker"].as_str().unwrap().contains("guest:guest"),
        "the password is redacted: {report}"
    );
}

#[test]
fn bench_on_postgres_with_the_postgres_broker() {
    let Some(pg) = pg() else {
        return;
    };
    let report = bench(&["--db", &pg, "--broker", &pg]);
    assert!(
        report["broker"]
            .as_str()
            .unwrap()
            .starts_with("postgres://")
    );
}

#[test]
fn bench_on_sqlite_with_nats() {
    let Some(nats) = nats() else {
        return;
    };
    let report = bench(&["--broker", &nats]);
    assert_eq!(report["db"], "sqlite", "{report}");
    // The SQLite-only references are there too.
    assert!(report["raw_autocommit_rate_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_refuses_an_unknown_database_scheme() {
    let out = courier(&["bench", "--messages", "1", "--db", "mysql://x@y/z"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--db mysql://x@y/z"), "{stderr}");
    assert!(stderr.contains("postgres://"), "{stderr}");
}

/// Publish three messages (two with one key), then check `channels` and `tail` on
/// `broker`, where `channel` is a fresh channel.
fn publish_channels_and_tail(broker: &str, channel: &str) {
    // RabbitMQ's publisher confirms carry no stream offset: its receipts have no
    // positions, so `publish` prints none (the tail below shows them).
    let receipts_have_positions = !broker.starts_with("amqp://");
    let publish = |key: &str, payload: &str| {
        let out = courier(&[
            "publish",
            "--broker",
            broker,
            "--channel",
            channel,
            "--partitions",
            "3",
            "--key",
            key,
            "--type",
            "order.OrderPlaced",
            "--json",
            payload,
        ]);
        assert!(
            out.status.success(),
            "publish failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["channel"], channel);
        if receipts_have_positions {
            assert!(v["partition"].as_u64().unwrap() < 3, "{v}");
        } else {
            assert!(v["partition"].is_null() && v["offset"].is_null(), "{v}");
        }
        v
    };
    let first = publish("order-1", r#"{"n":1}"#);
    let second = publish("order-1", r#"{"n":2}"#);
    publish("order-2", r#"{"n":3}"#);
    if receipts_have_positions {
        assert_eq!(
            first["partition"], second["partition"],
            "one key, one partition"
        );
        assert!(second["offset"].as_u64().unwrap() > first["offset"].as_u64().unwrap());
    }

    let out = courier(&[
        "channels",
        "--broker",
        broker,
        "--channel",
        channel,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let channels: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(channels[0]["channel"], channel, "{channels}");
    assert_eq!(channels[0]["partitions"], 3, "{channels}");
    assert_eq!(channels[0]["messages"], 3, "{channels}");
    let per_partition: u64 = channels[0]["partition_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["messages"].as_u64().unwrap())
        .sum();
    assert_eq!(per_partition, 3, "{channels}");

    let out = courier(&[
        "tail",
        "--broker",
        broker,
        "--channel",
        channel,
        "--from-beginning",
        "--count",
        "3",
        "--timeout-ms",
        "10000",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let order_1: Vec<i64> = lines
        .iter()
        .filter(|l| l["headers"]["partition-key"] == "order-1")
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(order_1, vec![1, 2], "per-key order in {lines:?}");
    let order_1_partitions: Vec<u64> = lines
        .iter()
        .filter(|l| l["headers"]["partition-key"] == "order-1")
        .map(|l| l["partition"].as_u64().unwrap())
        .collect();
    assert!(order_1_partitions[0] < 3, "{lines:?}");
    assert_eq!(
        order_1_partitions[0], order_1_partitions[1],
        "one key, one partition: {lines:?}"
    );
    if receipts_have_positions {
        assert_eq!(
            lines
                .iter()
                .find(|l| l["payload"]["n"] == 1)
                .map(|l| l["partition"].clone()),
            Some(first["partition"].clone()),
            "publish and tail agree on the partition: {lines:?}"
        );
    }
}

#[test]
fn publish_channels_and_tail_on_a_postgres_broker() {
    let Some(pg) = pg() else {
        return;
    };
    let schema = format!("courier_t_{}", unique());
    let sql = |statement: String| {
        let pg = pg.clone();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let pool = sqlx::PgPool::connect(&pg).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
            })
    };
    sql(format!("CREATE SCHEMA {schema}"));
    publish_channels_and_tail(&in_schema(&pg, &schema), "orders");
    sql(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
}

#[test]
fn publish_channels_and_tail_on_nats() {
    let Some(nats) = nats() else {
        return;
    };
    let channel = format!("cli-orders-{}", unique());
    publish_channels_and_tail(&nats, &channel);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let t = courier::nats::NatsTransport::connect(&nats).await.unwrap();
        t.delete_channel(&courier::ChannelName::new(channel.as_str()).unwrap())
            .await
            .unwrap();
    });
}

#[test]
fn publish_channels_and_tail_on_rabbitmq() {
    let Some(amqp) = amqp() else {
        return;
    };
    let channel = format!("cli-orders-{}", unique());
    publish_channels_and_tail(&amqp, &channel);

    // Without --channel, RabbitMQ cannot list channels: a clear error saying what to pass.
    let out = courier(&["channels", "--broker", &amqp, "--json"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--channel"), "{stderr}");
    assert!(
        !stderr.contains("guest:guest"),
        "the password is redacted: {stderr}"
    );

    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let t = courier::amqp::AmqpTransport::connect(&amqp).await.unwrap();
        t.delete_channel(&courier::ChannelName::new(channel.as_str()).unwrap())
            .await
            .unwrap();
    });
}
