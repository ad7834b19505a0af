//! The sender's side of commands in one process: timeouts that keep failing end as
//! `failed` after the policy's attempts (no hot loop), and a reply after the timeout, or a
//! second one, is ignored.

use crate::support::*;
use courier_core::{
    Codec, Command, CommandReply, Contract, CorrelationState, HandlerContext, HandlerError,
    MessageKind, MessageStore, NewCorrelation, Rejection, headers, now_ms,
};
use courier_sqlite::SqliteStore;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Ping {
    n: u32,
}
impl Contract for Ping {
    const TYPE: &'static str = "test.Ping";
    const KIND: MessageKind = MessageKind::Command;
}
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Pong {
    n: u32,
}
impl Contract for Pong {
    const TYPE: &'static str = "test.Pong";
    const KIND: MessageKind = MessageKind::Reply;
}
impl Command for Ping {
    const CHANNEL: &'static str = "test.pings";
    type Reply = Pong;
    type Failure = Rejection;
}

async fn pending(store: &SqliteStore, id: &str, deadline_ms: u64) {
    let mut tx = store.begin().await.unwrap();
    store
        .correlation_insert(
            &mut tx,
            &[NewCorrelation {
                correlation_id: id.into(),
                command_type: Ping::TYPE.into(),
                channel: Ping::CHANNEL.into(),
                data: "null".into(),
                deadline_ms: Some(deadline_ms),
                expected: vec![],
                expected_count: 1,
                gather: false,
                created_at_ms: now_ms(),
            }],
        )
        .await
        .unwrap();
    MessageStore::commit(store, tx).await.unwrap();
}

#[tokio::test]
async fn a_failing_timeout_handler_is_retried_then_marked_failed() {
    let e = env().await;
    pending(&e.store, "c-1", now_ms() - 1).await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let d = e
        .dispatcher(fast_retry(3).deadline_poll_interval(Duration::from_millis(10)))
        .replies_to(e.channel.clone())
        .on_reply(
            move |_ctx: HandlerContext<SqliteStore>, r: CommandReply<Ping>| {
                let c = c.clone();
                async move {
                    assert!(r.outcome.is_timed_out());
                    c.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::transient("downstream is down"))
                }
            },
        );
    let running = e.start(d).await;
    let store = e.store.clone();
    wait_until(T, "correlation failed", || async {
        store.correlation_get("c-1").await.unwrap().unwrap().state == CorrelationState::Failed
    })
    .await;
    let rec = e.store.correlation_get("c-1").await.unwrap().unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "one call per allowed attempt"
    );
    assert_eq!(rec.attempts, 3);
    assert!(rec.error.unwrap().contains("downstream is down"));
    running.stop().await;
}

#[tokio::test]
async fn a_reply_after_the_timeout_and_a_second_reply_are_ignored() {
    let e = env().await;
    pending(&e.store, "c-2", now_ms() - 1).await;
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let o = outcomes.clone();
    let d = e
        .dispatcher(fast_retry(3).deadline_poll_interval(Duration::from_millis(10)))
        .replies_to(e.channel.clone())
        .on_reply(
            move |_ctx: HandlerContext<SqliteStore>, r: CommandReply<Ping>| {
                let o = o.clone();
                async move {
                    o.lock().unwrap().push(format!("{:?}", r.outcome));
                    Ok(())
                }
            },
        );
    let stats = d.stats();
    let running = e.start(d).await;
    wait_until(T, "timeout handled", || async {
        outcomes.lock().unwrap().len() == 1
    })
    .await;
    let mut late = Codec::encode_to(&Pong { n: 1 }, &e.channel).unwrap();
    late.headers.insert(headers::MESSAGE_KIND, "reply").unwrap();
    late.headers.insert(headers::CORRELATION_ID, "c-2").unwrap();
    late.headers
        .insert(headers::RESPONDER, "pong-service")
        .unwrap();
    let mut again = late.clone();
    again.id = courier_core::MessageId::new();
    e.publish_raw(&[late, again]).await;
    wait_until(T, "late replies consumed", || async {
        stats.handled.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(*outcomes.lock().unwrap(), vec!["TimedOut".to_owned()]);
    let rec = e.store.correlation_get("c-2").await.unwrap().unwrap();
    assert_eq!(rec.state, CorrelationState::TimedOut);
    assert!(rec.replies.is_empty());
    assert!(e.store.dead_letters(None, 10).await.unwrap().is_empty());
    running.stop().await;
}
