//! The transport conformance suite (`courier-testkit`) against the embedded SQLite broker,
//! plus SQLite-specific checks. Each test gets its own broker file in a temp dir; a new
//! subscriber instance opens the same file again (its own pools, like another process).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use courier_core::transport::BoxFuture;
use courier_core::{
    Capabilities, ChannelName, Message, Publisher, Result, SubscribeOptions, Subscriber,
};
use courier_sqlite::{SqliteBroker, SqliteBrokerConfig};
use courier_testkit::{TIMEOUT, TransportFactory, collect, group, keyed, unique_channel};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Fresh brokers on one temp file; short liveness so rebalances take ~100 ms.
struct SqliteFactory {
    _dir: tempfile::TempDir,
    path: PathBuf,
    broker: SqliteBroker,
}

fn config() -> SqliteBrokerConfig {
    SqliteBrokerConfig::default().liveness(Duration::from_millis(100), Duration::from_millis(600))
}

impl SqliteFactory {
    async fn open(&self) -> Result<SqliteBroker> {
        SqliteBroker::open_with(&self.path, config()).await
    }
}

async fn factory() -> SqliteFactory {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
    let path = dir.path().join("broker.db");
    let broker = SqliteBroker::open_with(&path, config())
        .await
        .unwrap_or_else(|e| panic!("opening the broker failed: {e}"));
    SqliteFactory {
        _dir: dir,
        path,
        broker,
    }
}

impl TransportFactory for SqliteFactory {
    fn publisher(&self) -> BoxFuture<'_, Result<Arc<dyn Publisher>>> {
        Box::pin(async move { Ok(Arc::new(self.broker.clone()) as Arc<dyn Publisher>) })
    }

    fn subscriber(&self) -> BoxFuture<'_, Result<Arc<dyn Subscriber>>> {
        Box::pin(async move { Ok(Arc::new(self.open().await?) as Arc<dyn Subscriber>) })
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    fn create_channel<'a>(
        &'a self,
        channel: &'a ChannelName,
        partitions: u32,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.broker.create_channel(channel, partitions))
    }
}

courier_testkit::conformance_tests!(factory());

/// The whole suite on ONE broker, as `run_conformance` runs it for other backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_suite_on_one_broker() {
    courier_testkit::run_conformance(factory().await).await;
}

/// Rows that are not valid Courier messages (written by a foreign or broken writer)
/// arrive as `Err(Malformed)` with a reason and the raw columns, and do not block the
/// valid messages behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_log() {
    let f = factory().await;
    let ch = unique_channel("garbage");
    f.broker
        .create_channel(&ch, 1)
        .await
        .unwrap_or_else(|e| panic!("create channel: {e}"));

    let raw = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&f.path)
                .busy_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap_or_else(|e| panic!("raw pool: {e}"));
    let bad_id = uuid::Uuid::now_v7().to_string();
    let rows: [(&str, &str, &[u8]); 2] = [
        (&bad_id, "{not json", b"p1"),
        ("not-a-uuid", r#"{"destination":"x"}"#, b"p2"),
    ];
    for (id, headers, payload) in rows {
        sqlx::query(
            "INSERT INTO courier_log (channel, partition, message_id, headers, payload, published_at)
             VALUES (?, 0, ?, ?, ?, unixepoch('subsec'))",
        )
        .bind(ch.as_str())
        .bind(id)
        .bind(headers)
        .bind(payload)
        .execute(&raw)
        .await
        .unwrap_or_else(|e| panic!("raw insert: {e}"));
    }
    raw.close().await;

    let valid: Message = keyed(&ch, "k", 0);
    f.broker
        .publish(std::slice::from_ref(&valid))
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));

    let sub_broker = f.open().await.unwrap_or_else(|e| panic!("open: {e}"));
    let mut sub = sub_broker
        .subscribe(SubscribeOptions::new(ch.clone(), group("garbage")))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let got = collect(&mut sub, 3, TIMEOUT).await;
    let mut it = got.into_iter();

    let d = it.next().unwrap_or_else(|| unreachable!());
    let bad = d
        .message
        .as_ref()
        .err()
        .unwrap_or_else(|| panic!("bad headers decoded: {d:?}"));
    assert_eq!(bad.raw_id, bad_id);
    assert_eq!(bad.raw_headers, "{not json");
    assert_eq!(&bad.payload[..], b"p1");
    assert!(
        bad.reason.contains("headers"),
        "reason does not say what is wrong: {}",
        bad.reason
    );
    d.ack().await.unwrap_or_else(|e| panic!("ack: {e}"));

    let d = it.next().unwrap_or_else(|| unreachable!());
    let bad = d
        .message
        .as_ref()
        .err()
        .unwrap_or_else(|| panic!("bad id decoded: {d:?}"));
    assert_eq!(bad.raw_id, "not-a-uuid");
    assert!(
        bad.reason.contains("not-a-uuid"),
        "reason does not name the bad id: {}",
        bad.reason
    );
    d.ack().await.unwrap_or_else(|e| panic!("ack: {e}"));

    let d = it.next().unwrap_or_else(|| unreachable!());
    assert_eq!(
        d.message.as_ref().ok(),
        Some(&valid),
        "the valid message after the garbage"
    );
    d.ack().await.unwrap_or_else(|e| panic!("ack: {e}"));
}
