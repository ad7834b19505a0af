//! Shared set-up: the server URL (skip logic), a schema of its own per test, and the
//! transport factory the conformance suite runs on.
#![allow(unreachable_pub, dead_code)]

use courier_core::transport::BoxFuture;
use courier_core::{Capabilities, ChannelName, Publisher, Result, Subscriber};
use courier_postgres::{PgBroker, PgBrokerConfig};
use courier_testkit::TransportFactory;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use std::sync::Arc;
use std::time::Duration;

pub const URL_VAR: &str = "COURIER_TEST_POSTGRES_URL";

/// The server URL, or `None` (with a printed reason) when the tests should skip; a
/// failure under `CI`.
pub fn pg_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!("{URL_VAR} must be set in CI"),
        _ => {
            eprintln!("skipped: {URL_VAR} is not set (e.g. postgres://postgres@127.0.0.1/test)");
            None
        }
    }
}

/// A schema of its own on the test server, dropped (best effort) with this value.
pub struct Schema {
    pub url: String,
    pub name: String,
}

impl Schema {
    pub async fn create(url: &str) -> Schema {
        let name = format!("courier_b_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnection::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        Schema {
            url: url.to_owned(),
            name,
        }
    }

    /// A raw connection whose `search_path` is this schema.
    pub async fn connection(&self) -> PgConnection {
        let options: sqlx::postgres::PgConnectOptions = self.url.parse().unwrap();
        PgConnection::connect_with(&options.options([("search_path", self.name.as_str())]))
            .await
            .unwrap()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: clean up on a runtime of our own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&url).await {
                    let _ = sqlx::query("SET lock_timeout = '5s'")
                        .execute(&mut conn)
                        .await;
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {name} CASCADE"
                    )))
                    .execute(&mut conn)
                    .await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Short liveness so rebalances take ~100 ms; small pools (tests run in parallel).
pub fn config(url: &str, schema: &str) -> PgBrokerConfig {
    PgBrokerConfig::new(url)
        .schema(schema)
        .max_connections(4)
        .liveness(Duration::from_millis(100), Duration::from_millis(600))
        .poll_interval(Duration::from_millis(200))
}

/// Brokers on one schema: a shared publisher, and a new broker (own pool and listener,
/// like another process) per subscriber. Field order: brokers go before the schema.
pub struct PgFactory {
    pub broker: PgBroker,
    pub schema: Schema,
}

impl PgFactory {
    pub async fn start() -> Option<PgFactory> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let url = pg_url()?;
        let schema = Schema::create(&url).await;
        let broker = PgBroker::connect_with(config(&url, &schema.name))
            .await
            .unwrap_or_else(|e| panic!("connecting the broker failed: {e}"));
        Some(PgFactory { broker, schema })
    }

    /// Another broker on the same schema (another process).
    pub async fn open(&self) -> Result<PgBroker> {
        PgBroker::connect_with(config(&self.schema.url, &self.schema.name)).await
    }
}

impl TransportFactory for PgFactory {
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
