//! Shared set-up: a service database, a broker file, a dispatcher running in the background.
#![allow(unreachable_pub, dead_code)]

use courier_core::{
    ChannelName, Codec, Contract, Dispatcher, DispatcherConfig, GroupName, HandlerContext,
    HandlerError, Message, MessageKind, Publisher, RetryPolicy, SubscribeOptions, Subscriber,
};
use courier_sqlite::{SqliteBroker, SqliteBrokerConfig, SqliteStore};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

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
    pub _dir: tempfile::TempDir,
    pub store: SqliteStore,
    pub broker: SqliteBroker,
    pub channel: ChannelName,
    pub group: GroupName,
    /// Attempts per (key, n), counted in memory (failed attempts roll back in the db).
    pub attempts: Arc<Mutex<HashMap<(String, u32), u32>>>,
}

pub async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("service.db"))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE applied (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, n INTEGER NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    let broker = SqliteBroker::open_with(
        dir.path().join("broker.db"),
        SqliteBrokerConfig::default()
            .liveness(Duration::from_millis(100), Duration::from_millis(600)),
    )
    .await
    .unwrap();
    Env {
        _dir: dir,
        store,
        broker,
        channel: ChannelName::new("work").unwrap(),
        group: GroupName::new("worker").unwrap(),
        attempts: Arc::default(),
    }
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
    pub fn dispatcher(&self, config: DispatcherConfig) -> Dispatcher<SqliteStore> {
        let attempts = self.attempts.clone();
        let done = ChannelName::new("work-done").unwrap();
        Dispatcher::new(self.store.clone(), self.group.clone())
            .with_config(config)
            .on(move |ctx: HandlerContext<SqliteStore>, w: Work| {
                let attempts = attempts.clone();
                let done = done.clone();
                async move {
                    let attempt = {
                        let mut a = attempts.lock().unwrap();
                        let e = a.entry((w.key.clone(), w.n)).or_insert(0);
                        *e += 1;
                        *e
                    };
                    sqlx::query("INSERT INTO applied (key, n) VALUES (?, ?)")
                        .bind(&w.key)
                        .bind(w.n)
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
    pub async fn start(&self, d: Dispatcher<SqliteStore>) -> Running {
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
        sqlx::query_as::<_, (String, u32)>("SELECT key, n FROM applied ORDER BY seq")
            .fetch_all(self.store.pool())
            .await
            .unwrap()
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
