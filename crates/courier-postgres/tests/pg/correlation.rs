//! Correlation rows on PostgreSQL (the sender's half of commands): replies completing a
//! command or a gather, duplicates and late replies, deadlines claimed once across
//! concurrent transactions, timeout retries, pruning, and `Outbox::send_command` writing
//! the row and the message in the caller's transaction.

use crate::support::*;
use courier_core::{
    ChannelName, Codec, Command, Contract, Correlation, CorrelationRecord, CorrelationState,
    DomainEvent, ErrorKind, Message, MessageKind, MessageStore, NewCorrelation, Notification,
    Rejection, ReplyApplied, ReplyRecord, headers, now_ms,
};
use courier_postgres::PgStore;
use serde::{Deserialize, Serialize};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

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

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Remind {
    who: String,
}
impl Contract for Remind {
    const TYPE: &'static str = "test.Remind";
    const KIND: MessageKind = MessageKind::Command;
}
impl Notification for Remind {
    const CHANNEL: &'static str = "test.reminders";
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Opened {
    account: String,
}
impl Contract for Opened {
    const TYPE: &'static str = "test.Opened";
    const KIND: MessageKind = MessageKind::Event;
}
impl DomainEvent for Opened {
    const AGGREGATE: &'static str = "account";
    fn aggregate_id(&self) -> String {
        self.account.clone()
    }
}

/// A store in a schema of its own (the store's pool closes before the schema drops).
struct Db {
    store: PgStore,
    _schema: Schema,
}

async fn db() -> Option<Db> {
    let url = pg_url()?;
    let schema = Schema::create(&url).await;
    Some(Db {
        store: schema.store().await,
        _schema: schema,
    })
}

fn command(id: &str, deadline_ms: Option<u64>) -> NewCorrelation {
    NewCorrelation {
        correlation_id: id.into(),
        command_type: Ping::TYPE.into(),
        channel: Ping::CHANNEL.into(),
        data: r#"{"order":"o-1"}"#.into(),
        deadline_ms,
        expected: vec![],
        expected_count: 1,
        gather: false,
        created_at_ms: now_ms(),
    }
}

fn gather(id: &str, deadline_ms: u64, from: &[&str]) -> NewCorrelation {
    NewCorrelation {
        expected: from.iter().map(|s| s.to_string()).collect(),
        expected_count: from.len() as u32,
        gather: true,
        ..command(id, Some(deadline_ms))
    }
}

fn reply_from(responder: &str, n: u32) -> ReplyRecord {
    let msg = Codec::encode(&Pong { n }).unwrap();
    ReplyRecord::of(&msg, responder)
}

async fn insert(store: &PgStore, rows: &[NewCorrelation]) {
    let mut tx = store.begin().await.unwrap();
    store.correlation_insert(&mut tx, rows).await.unwrap();
    tx.commit().await.unwrap();
}

/// Record one reply in a transaction of its own.
async fn reply(store: &PgStore, id: &str, r: &ReplyRecord) -> ReplyApplied {
    let mut tx = store.begin().await.unwrap();
    let applied = store.correlation_reply(&mut tx, id, r).await.unwrap();
    tx.commit().await.unwrap();
    applied
}

async fn get(store: &PgStore, id: &str) -> CorrelationRecord {
    store
        .correlation_get(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no correlation row {id}"))
}

fn ids(recs: &[CorrelationRecord]) -> Vec<&str> {
    recs.iter()
        .map(|r| r.correlation.correlation_id.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_completes_a_command_and_a_second_one_is_ignored() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    let row = command("c-1", Some(now_ms() + 60_000));
    insert(s, std::slice::from_ref(&row)).await;
    let pending = get(s, "c-1").await;
    assert_eq!(pending.correlation, row, "stored as inserted");
    assert_eq!(pending.state, CorrelationState::Pending);
    assert_eq!((pending.attempts, pending.error), (0, None));
    assert!(pending.completed_at_ms.is_none() && pending.replies.is_empty());

    let first = reply_from("consumer-service", 1);
    let ReplyApplied::Completed(rec) = reply(s, "c-1", &first).await else {
        panic!("the only expected reply completes the command")
    };
    assert_eq!(rec.state, CorrelationState::Done);
    assert!(rec.completed_at_ms.is_some());
    assert_eq!(rec.replies, vec![first.clone()]);
    assert_eq!(
        rec.replies[0].message().unwrap().payload,
        Codec::encode(&Pong { n: 1 }).unwrap().payload
    );
    assert_eq!(get(s, "c-1").await, *rec, "committed as returned");

    // A late or second reply (another responder, or the same one again) changes nothing.
    for late in [
        reply_from("other-service", 2),
        reply_from("consumer-service", 3),
    ] {
        assert_eq!(
            reply(s, "c-1", &late).await,
            ReplyApplied::AlreadyComplete(CorrelationState::Done)
        );
    }
    assert_eq!(get(s, "c-1").await.replies, vec![first]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gather_waits_for_every_responder_and_ignores_duplicates() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    insert(s, &[gather("g-1", now_ms() + 60_000, &["a", "b"])]).await;
    let a = reply_from("a", 1);
    assert_eq!(
        reply(s, "g-1", &a).await,
        ReplyApplied::Waiting {
            received: 1,
            expected: 2
        }
    );
    // The same responder again (a redelivered reply): nothing recorded.
    assert_eq!(
        reply(s, "g-1", &reply_from("a", 9)).await,
        ReplyApplied::Duplicate
    );
    let rec = get(s, "g-1").await;
    assert_eq!(rec.state, CorrelationState::Pending);
    assert_eq!(rec.replies, vec![a.clone()]);

    let b = reply_from("b", 2);
    let ReplyApplied::Completed(rec) = reply(s, "g-1", &b).await else {
        panic!("the second responder completes the gather")
    };
    assert_eq!(rec.state, CorrelationState::Done);
    assert_eq!(rec.replies, vec![a, b], "replies in arrival order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_an_unknown_correlation_is_unknown() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    assert_eq!(
        reply(s, "never-sent", &reply_from("a", 1)).await,
        ReplyApplied::Unknown
    );
    assert!(s.correlation_get("never-sent").await.unwrap().is_none());
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM courier_correlation_replies")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(n, 0, "no reply is kept for an unknown correlation");
}

/// Two instances receive the two replies of one gather at once: the second waits for
/// the first's row lock, then sees its reply and completes the gather (never two
/// `Waiting`, never a lost reply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replies_to_one_gather_take_turns() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    insert(s, &[gather("g-2", now_ms() + 60_000, &["a", "b"])]).await;

    let mut tx1 = s.begin().await.unwrap();
    assert!(matches!(
        s.correlation_reply(&mut tx1, "g-2", &reply_from("a", 1))
            .await
            .unwrap(),
        ReplyApplied::Waiting { received: 1, .. }
    ));
    let mut tx2 = s.begin().await.unwrap();
    let pid2: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx2)
        .await
        .unwrap();
    let s2 = s.clone();
    let second = tokio::spawn(async move {
        let applied = s2
            .correlation_reply(&mut tx2, "g-2", &reply_from("b", 2))
            .await
            .unwrap();
        tx2.commit().await.unwrap();
        applied
    });
    let pool = s.pool().clone();
    wait_until(T, "the second reply waits for the row lock", || {
        let pool = pool.clone();
        async move {
            let wait: Option<String> =
                sqlx::query_scalar("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid2)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            wait.as_deref() == Some("Lock")
        }
    })
    .await;
    assert!(!second.is_finished());
    tx1.commit().await.unwrap();
    let ReplyApplied::Completed(rec) = second.await.unwrap() else {
        panic!("the second reply sees the first and completes the gather")
    };
    let responders: Vec<&str> = rec.replies.iter().map(|r| r.responder.as_str()).collect();
    assert_eq!(responders, ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_claims_only_due_pending_rows_and_each_once() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    let now = now_ms();
    insert(
        s,
        &[
            command("due-1", Some(now - 2_000)),
            gather("due-2", now - 1_000, &["a", "b"]),
            command("later", Some(now + 60_000)),
            command("no-deadline", None),
            command("answered", Some(now - 3_000)),
        ],
    )
    .await;
    let a = reply_from("a", 1);
    assert!(matches!(
        reply(s, "due-2", &a).await,
        ReplyApplied::Waiting { .. }
    ));
    assert!(matches!(
        reply(s, "answered", &reply_from("x", 1)).await,
        ReplyApplied::Completed(_)
    ));

    // Two instances check deadlines at once: the second skips the row the first holds.
    let mut tx1 = s.begin().await.unwrap();
    let first = s.correlation_expire(&mut tx1, now, 1).await.unwrap();
    assert_eq!(
        ids(&first),
        ["due-1"],
        "earliest deadline first, up to the limit"
    );
    let mut tx2 = s.begin().await.unwrap();
    let second = tokio::time::timeout(T, s.correlation_expire(&mut tx2, now, 10))
        .await
        .expect("a second claimer does not wait for the first")
        .unwrap();
    assert_eq!(ids(&second), ["due-2"]);
    assert_eq!(second[0].state, CorrelationState::TimedOut);
    assert_eq!(second[0].completed_at_ms, Some(now));
    assert_eq!(
        second[0].replies,
        vec![a],
        "claimed with the replies so far"
    );
    tx1.commit().await.unwrap();
    tx2.commit().await.unwrap();

    let mut tx3 = s.begin().await.unwrap();
    assert!(
        s.correlation_expire(&mut tx3, now, 10)
            .await
            .unwrap()
            .is_empty(),
        "claimed rows are no longer pending"
    );
    tx3.commit().await.unwrap();
    for (id, state) in [
        ("due-1", CorrelationState::TimedOut),
        ("due-2", CorrelationState::TimedOut),
        ("later", CorrelationState::Pending),
        ("no-deadline", CorrelationState::Pending),
        ("answered", CorrelationState::Done),
    ] {
        assert_eq!(get(s, id).await.state, state, "{id}");
    }
    // A late reply to a timed-out command is ignored.
    assert_eq!(
        reply(s, "due-1", &reply_from("x", 1)).await,
        ReplyApplied::AlreadyComplete(CorrelationState::TimedOut)
    );
    // A claim rolled back leaves the row pending for the next pass.
    let mut tx4 = s.begin().await.unwrap();
    let later = s
        .correlation_expire(&mut tx4, now + 120_000, 10)
        .await
        .unwrap();
    assert_eq!(ids(&later), ["later"]);
    tx4.rollback().await.unwrap();
    assert_eq!(get(s, "later").await.state, CorrelationState::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_timeout_is_retried_later_then_given_up() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    let now = now_ms();
    insert(s, &[command("c-r", Some(now - 1))]).await;

    let mut tx = s.begin().await.unwrap();
    assert_eq!(
        ids(&s.correlation_expire(&mut tx, now, 10).await.unwrap()),
        ["c-r"]
    );
    let retry_at = now + 5_000;
    s.correlation_retry_later(&mut tx, "c-r", "downstream is down", retry_at, false)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rec = get(s, "c-r").await;
    assert_eq!(rec.state, CorrelationState::Pending);
    assert_eq!(rec.correlation.deadline_ms, Some(retry_at));
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.error.as_deref(), Some("downstream is down"));
    assert_eq!(rec.completed_at_ms, None);

    // Not due before its new deadline; due after it.
    let mut tx = s.begin().await.unwrap();
    assert!(
        s.correlation_expire(&mut tx, now, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(&s
            .correlation_expire(&mut tx, retry_at + 1, 10)
            .await
            .unwrap()),
        ["c-r"]
    );
    s.correlation_retry_later(&mut tx, "c-r", "still down", retry_at + 5_000, true)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rec = get(s, "c-r").await;
    assert_eq!(rec.state, CorrelationState::Failed);
    assert_eq!(rec.attempts, 2);
    assert_eq!(rec.error.as_deref(), Some("still down"));
    assert!(rec.completed_at_ms.is_some());
    assert_eq!(
        rec.correlation.deadline_ms,
        Some(retry_at),
        "giving up keeps the last deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_removes_only_old_completed_correlations_and_their_replies() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    let now = now_ms();
    insert(
        s,
        &[
            command("old-done", None),
            command("old-timed-out", Some(now - 1)),
            command("old-failed", Some(now - 1)),
            command("recent-done", None),
            command("pending", Some(now + 60_000)),
            command("pending-old", Some(now + 60_000)),
        ],
    )
    .await;
    for id in ["old-done", "recent-done"] {
        assert!(matches!(
            reply(s, id, &reply_from("x", 1)).await,
            ReplyApplied::Completed(_)
        ));
    }
    let mut tx = s.begin().await.unwrap();
    assert_eq!(
        s.correlation_expire(&mut tx, now, 10).await.unwrap().len(),
        2
    );
    s.correlation_retry_later(&mut tx, "old-failed", "boom", 0, true)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Age the old ones (and a pending row, which must stay whatever its age).
    let hour = 3_600_000;
    sqlx::query(
        "UPDATE courier_correlation SET completed_at_ms = $1, created_at_ms = $1
         WHERE correlation_id = ANY($2)",
    )
    .bind((now - 10 * hour) as i64)
    .bind(vec!["old-done", "old-timed-out", "old-failed"])
    .execute(s.pool())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE courier_correlation SET created_at_ms = 0 WHERE correlation_id = 'pending-old'",
    )
    .execute(s.pool())
    .await
    .unwrap();

    assert_eq!(s.prune_correlations(hour, 2).await.unwrap(), 2, "a batch");
    assert_eq!(s.prune_correlations(hour, 2).await.unwrap(), 1);
    assert_eq!(s.prune_correlations(hour, 2).await.unwrap(), 0);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT correlation_id FROM courier_correlation ORDER BY 1")
            .fetch_all(s.pool())
            .await
            .unwrap();
    assert_eq!(left, ["pending", "pending-old", "recent-done"]);
    let replies: Vec<String> =
        sqlx::query_scalar("SELECT correlation_id FROM courier_correlation_replies")
            .fetch_all(s.pool())
            .await
            .unwrap();
    assert_eq!(replies, ["recent-done"], "the replies went with their rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_command_writes_the_correlation_row_and_the_message_in_the_transaction() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    let replies = ChannelName::new("order-service.replies").unwrap();
    let outbox = s.outbox().replies_to(replies.clone());
    let correlation = || {
        Correlation::new()
            .data(&serde_json::json!({"order_id": "o-1"}))
            .unwrap()
            .deadline_in(Duration::from_secs(30))
            .key("o-1")
    };

    // Rolled back: neither the row nor the message.
    let mut tx = s.begin().await.unwrap();
    let gone = outbox
        .send_command(&mut tx, &Ping { n: 0 }, correlation())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        s.correlation_get(&gone.to_string())
            .await
            .unwrap()
            .is_none()
    );

    let mut tx = s.begin().await.unwrap();
    let id = outbox
        .send_command(&mut tx, &Ping { n: 1 }, correlation())
        .await
        .unwrap();
    assert!(
        s.correlation_get(&id.to_string()).await.unwrap().is_none(),
        "not visible before the commit"
    );
    tx.commit().await.unwrap();

    let rec = get(s, &id.to_string()).await;
    assert_eq!(rec.state, CorrelationState::Pending);
    assert_eq!(rec.correlation.command_type, Ping::TYPE);
    assert_eq!(rec.correlation.channel, Ping::CHANNEL);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&rec.correlation.data).unwrap(),
        serde_json::json!({"order_id": "o-1"})
    );
    let deadline = rec.correlation.deadline_ms.unwrap();
    assert!(deadline > now_ms() + 20_000 && deadline <= now_ms() + 30_000);
    assert!(!rec.correlation.gather && rec.correlation.expected_count == 1);
    assert_eq!(s.outbox_len().await.unwrap(), 1);
    let rows = s.outbox_peek(10, 1 << 20).await.unwrap();
    let msg: &Message = rows[0].message.as_ref().unwrap();
    assert_eq!(msg.id, id);
    assert_eq!(msg.channel().unwrap().as_str(), Ping::CHANNEL);
    assert_eq!(msg.headers.get(headers::REPLY_TO), Some(replies.as_str()));
    let id_text = id.to_string();
    assert_eq!(
        msg.headers.get(headers::CORRELATION_ID),
        Some(id_text.as_str())
    );
    assert_eq!(msg.headers.partition_key(), Some("o-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_command_refuses_before_writing_anything() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    let mut tx = s.begin().await.unwrap();

    let err = s
        .outbox()
        .send_command(&mut tx, &Ping { n: 1 }, Correlation::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("replies_to"), "{err}");

    let outbox = s
        .outbox()
        .replies_to(ChannelName::new("replies").unwrap())
        .max_message_bytes(8);
    assert!(
        outbox
            .send_command(&mut tx, &Ping { n: 1 }, Correlation::new())
            .await
            .is_err(),
        "too large"
    );
    let err = s
        .outbox()
        .replies_to(ChannelName::new("replies").unwrap())
        .send_command(
            &mut tx,
            &Ping { n: 1 },
            Correlation::new().expect_from(["a", "b"]),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("deadline"), "{err}");
    tx.commit().await.unwrap();

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM courier_correlation")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(s.outbox_len().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_and_events_go_through_the_outbox_without_correlation() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    let mut tx = s.begin().await.unwrap();
    let outbox = s.outbox();
    let n = outbox
        .notify(&mut tx, &Remind { who: "ann".into() }, Some("ann"))
        .await
        .unwrap();
    let e = outbox
        .publish_event(
            &mut tx,
            &Opened {
                account: "acc-1".into(),
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let rows = s.outbox_peek(10, 1 << 20).await.unwrap();
    let msgs: Vec<&Message> = rows.iter().map(|r| r.message.as_ref().unwrap()).collect();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].id, n);
    assert_eq!(msgs[0].channel().unwrap().as_str(), Remind::CHANNEL);
    assert_eq!(msgs[0].headers.partition_key(), Some("ann"));
    assert_eq!(msgs[0].headers.get(headers::REPLY_TO), None);
    assert_eq!(msgs[1].id, e);
    assert_eq!(msgs[1].channel().unwrap().as_str(), "account");
    assert_eq!(msgs[1].headers.partition_key(), Some("acc-1"));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM courier_correlation")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
}

/// A batch of many rows goes in (one statement: arrays, not a parameter per row), and a
/// deadline too far in the future to fit a `BIGINT` stays in the future.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_rows_insert_at_once_and_far_deadlines_stay_in_the_future() {
    let Some(db) = db().await else { return };
    let s = &db.store;
    let rows: Vec<NewCorrelation> = (0..5_000)
        .map(|i| command(&format!("m-{i}"), Some(now_ms() + 60_000)))
        .chain([command("far", Some(u64::MAX))])
        .collect();
    insert(s, &rows).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM courier_correlation")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(n, 5_001);
    let mut tx = s.begin().await.unwrap();
    assert!(
        s.correlation_expire(&mut tx, now_ms(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    tx.commit().await.unwrap();
    assert_eq!(
        get(s, "far").await.correlation.deadline_ms,
        Some(i64::MAX as u64)
    );
}
