//! Shared set-up: a schema of its own per test on the real PostgreSQL (the service
//! database), the embedded SQLite broker in a temporary directory (the transport), and a
//! dispatcher running in the background.
#![allow(unreachable_pub, dead_code)]

use courier_core::{
    ChannelName, Codec, Contract, Dispatcher, DispatcherConfig, GroupName, HandlerContext,
    HandlerError, Message, MessageKind, Publisher, RetryPolicy, SubscribeOptions, Subscriber,
};
use courier_postgres::PgStore;
use courier_sqlite::{SqliteBroker, SqliteBrokerConfig};
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

pub const URL_VAR: &str = "COURIER_TEST_POSTGRES_URL";

/// The server's URL, or `None` (after saying why) when the tests should skip.
pub fn pg_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{URL_VAR} must be set in CI")
        }
        _ => {
            println!("skipping: set {URL_VAR}=postgres://postgres@127.0.0.1/test");
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
        let name = format!("courier_t_{}", uuid::Uuid::now_v7().simple());
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

    /// A store on a pool whose connections use this schema.
    pub async fn store(&self) -> PgStore {
        let options: PgConnectOptions = self.url.parse().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options.options([("search_path", self.name.as_str())]))
            .await
            .unwrap();
        PgStore::open(pool).await.unwrap()
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
                    // Never hang a test run on a lock some aborted task still holds.
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

/// A unit of work: `fail_transient` failures before success, or a permanent failure.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Work {
    pub key: String,
    pub n: u32,
    #[serde(default)]
    pub fail_transient: u32,
    #[serde(default)]
    pub permanent: bool,
}

impl Contract for Work {
    const TYPE: &'static str = "test.Work";
    const KIND: MessageKind = MessageKind::Command;
}

/// What the handler produces.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct WorkDone {
    pub key: String,
    pub n: u32,
}

impl Contract for WorkDone {
    const TYPE: &'static str = "test.WorkDone";
}

pub struct Env {
    // Field order: the store's pool goes before its schema is dropped.
    pub store: PgStore,
    pub broker: SqliteBroker,
    pub schema: Schema,
    pub _dir: tempfile::TempDir,
    pub channel: ChannelName,
    pub group: GroupName,
    /// Attempts per (key, n), counted in memory (failed attempts roll back in the db).
    pub attempts: Arc<Mutex<HashMap<(String, u32), u32>>>,
}

/// A fresh environment, or `None` when the tests skip.
pub async fn env() -> Option<Env> {
    let url = pg_url()?;
    let schema = Schema::create(&url).await;
    let store = schema.store().await;
    sqlx::query(
        "CREATE TABLE applied (seq BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, n BIGINT NOT NULL)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = SqliteBroker::open_with(
        dir.path().join("broker.db"),
        SqliteBrokerConfig::default()
            .liveness(Duration::from_millis(100), Duration::from_millis(600)),
    )
    .await
    .unwrap();
    Some(Env {
        store,
        broker,
        schema,
        _dir: dir,
        channel: ChannelName::new("work").unwrap(),
        group: GroupName::new("worker").unwrap(),
        attempts: Arc::default(),
    })
}

pub fn fast_retry(max_attempts: u32) -> DispatcherConfig {
    DispatcherConfig::default()
        .retry(RetryPolicy::exponential(
            max_attempts,
            Duration::from_millis(20),
            Duration::from_millis(100),
        ))
        .redrive_interval(Duration::from_millis(50))
}

impl Env {
    pub fn work(&self, key: &str, n: u32) -> Work {
        Work {
            key: key.into(),
            n,
            fail_transient: 0,
            permanent: false,
        }
    }

    pub fn message(&self, w: &Work) -> Message {
        Codec::encode_to(w, &self.channel)
            .unwrap()
            .with_key(w.key.clone())
            .unwrap()
    }

    pub async fn publish(&self, works: &[Work]) {
        let msgs: Vec<Message> = works.iter().map(|w| self.message(w)).collect();
        self.broker.publish(&msgs).await.unwrap();
    }

    pub async fn publish_raw(&self, msgs: &[Message]) {
        self.broker.publish(msgs).await.unwrap();
    }

    /// The standard dispatcher: applies Work into `applied` and emits WorkDone.
    pub fn dispatcher(&self, config: DispatcherConfig) -> Dispatcher<PgStore> {
        let attempts = self.attempts.clone();
        let done = ChannelName::new("work-done").unwrap();
        Dispatcher::new(self.store.clone(), self.group.clone())
            .with_config(config)
            .on(move |ctx: HandlerContext<PgStore>, w: Work| {
                let attempts = attempts.clone();
                let done = done.clone();
                async move {
                    let attempt = {
                        let mut a = attempts.lock().unwrap();
                        let e = a.entry((w.key.clone(), w.n)).or_insert(0);
                        *e += 1;
                        *e
                    };
                    sqlx::query("INSERT INTO applied (key, n) VALUES ($1, $2)")
                        .bind(&w.key)
                        .bind(i64::from(w.n))
                        .execute(&mut *ctx.tx().await)
                        .await?;
                    ctx.publish(
                        &done,
                        &WorkDone {
                            key: w.key.clone(),
                            n: w.n,
                        },
                    )?;
                    if w.permanent {
                        return Err(HandlerError::permanent(format!(
                            "work {} {} is impossible",
                            w.key, w.n
                        )));
                    }
                    if attempt <= w.fail_transient {
                        return Err(HandlerError::transient(format!("flaky {attempt}")));
                    }
                    Ok(())
                }
            })
    }

    /// Start a dispatcher in the background; drop the returned guard to stop it.
    pub async fn start(&self, d: Dispatcher<PgStore>) -> Running {
        let sub = self
            .broker
            .subscribe(SubscribeOptions::new(
                self.channel.clone(),
                self.group.clone(),
            ))
            .await
            .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(d.run(sub, async move {
            let _ = rx.await;
        }));
        Running {
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn applied(&self) -> Vec<(String, u32)> {
        sqlx::query_as::<_, (String, i64)>("SELECT key, n FROM applied ORDER BY seq")
            .fetch_all(self.store.pool())
            .await
            .unwrap()
            .into_iter()
            .map(|(k, n)| (k, n as u32))
            .collect()
    }

    pub async fn applied_count(&self) -> usize {
        self.applied().await.len()
    }

    pub async fn attempts_of(&self, key: &str, n: u32) -> u32 {
        *self
            .attempts
            .lock()
            .unwrap()
            .get(&(key.to_owned(), n))
            .unwrap_or(&0)
    }
}

pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<courier_core::Result<()>>>,
}

impl Running {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// Poll `f` until it holds or `within` passes.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
