//! Courier on a real PostgreSQL service database (a schema per test), with the embedded
//! SQLite broker as the transport: inbox, retries, dead letters, parking, redrive, outbox
//! writes, LISTEN/NOTIFY wake-ups and connection errors. The relay itself (order,
//! fencing, take-over) runs the shared relay suite in tests/relay.
//!
//! Needs `COURIER_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1/test`); without
//! it the tests skip, except under `CI`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod correlation;
mod support;

use courier_core::{
    ChannelName, DeadLetterReason, DeadLetterStatus, ErrorKind, Message, MessageStore, OutboxSource,
};
use courier_postgres::{PgStore, Relay, RelayConfig};
use courier_sqlite::SqliteBroker;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(10);

// ---- dispatcher: inbox, retries, dead letters --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_each_message_once_and_produces_in_the_same_transaction() {
    let Some(e) = env().await else { return };
    let works: Vec<_> = (0..50).map(|i| e.work(&format!("k{}", i % 5), i)).collect();
    e.publish(&works).await;
    let run = e.start(e.dispatcher(fast_retry(3))).await;
    wait_until(T, "50 applied", || async { e.applied_count().await == 50 }).await;
    // Every handled message produced exactly one WorkDone through the outbox.
    assert_eq!(e.store.outbox_len().await.unwrap(), 50);
    let applied = e.applied().await;
    for k in 0..5 {
        let ns: Vec<u32> = applied
            .iter()
            .filter(|(key, _)| key == &format!("k{k}"))
            .map(|(_, n)| *n)
            .collect();
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "key k{k} out of order: {ns:?}"
        );
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_delivery_is_skipped_by_the_inbox() {
    let Some(e) = env().await else { return };
    let m = e.message(&e.work("dup", 1));
    // The same message (same id) published twice: the relay's crash-before-delete case.
    e.publish_raw(std::slice::from_ref(&m)).await;
    e.publish_raw(std::slice::from_ref(&m)).await;
    e.publish_raw(&[e.message(&e.work("dup", 2))]).await;
    let d = e.dispatcher(fast_retry(3));
    let stats = d.stats();
    let run = e.start(d).await;
    wait_until(T, "second message applied", || async {
        e.applied_count().await == 2
    })
    .await;
    wait_until(T, "duplicate counted", || async {
        stats.duplicates.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(
        e.applied().await,
        vec![("dup".into(), 1), ("dup".into(), 2)]
    );
    assert!(
        e.store
            .inbox_contains("worker", &m.id.to_string())
            .await
            .unwrap()
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_is_retried_and_holds_only_its_own_key() {
    let Some(e) = env().await else { return };
    let mut slow = e.work("slow", 1);
    slow.fail_transient = 2;
    let works = vec![
        slow,
        e.work("slow", 2),
        e.work("fast", 1),
        e.work("fast", 2),
    ];
    e.publish(&works).await;
    let run = e.start(e.dispatcher(fast_retry(5))).await;
    wait_until(T, "all 4 applied", || async {
        e.applied_count().await == 4
    })
    .await;
    let applied = e.applied().await;
    let pos = |k: &str, n: u32| {
        applied
            .iter()
            .position(|a| a == &(k.to_owned(), n))
            .unwrap()
    };
    assert!(
        pos("fast", 2) < pos("slow", 1),
        "fast key was stalled: {applied:?}"
    );
    assert!(pos("slow", 1) < pos("slow", 2));
    assert_eq!(e.attempts_of("slow", 1).await, 3);
    assert_eq!(e.attempts_of("slow", 2).await, 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_dead_lettered_with_its_history_and_parks_its_key() {
    let Some(e) = env().await else { return };
    let mut poison = e.work("bad", 1);
    poison.fail_transient = 100;
    e.publish(&[poison, e.work("bad", 2), e.work("good", 1)])
        .await;
    let run = e.start(e.dispatcher(fast_retry(3))).await;
    wait_until(T, "poison and follower stored", || async {
        e.store.dead_letters(None, 10).await.unwrap().len() == 2
    })
    .await;
    wait_until(T, "good key applied", || async {
        e.applied_count().await == 1
    })
    .await;
    assert_eq!(e.applied().await, vec![("good".into(), 1)]);
    let dls = e.store.dead_letters(Some("worker"), 10).await.unwrap();
    let root = &dls[0].record;
    assert_eq!(root.reason, DeadLetterReason::Exhausted);
    assert_eq!(root.status, DeadLetterStatus::Dead);
    assert_eq!(root.attempts, 3);
    assert_eq!(e.attempts_of("bad", 1).await, 3);
    assert!(root.first_failed_at_ms <= root.last_failed_at_ms);
    assert!(root.error.contains("flaky"), "{}", root.error);
    assert_eq!(root.partition_key.as_deref(), Some("bad"));
    assert_eq!(dls[1].record.reason, DeadLetterReason::Parked);
    assert_eq!(dls[1].record.status, DeadLetterStatus::Parked);
    let w: Work = serde_json::from_slice(&root.payload).unwrap();
    assert_eq!(w.n, 1);
    assert!(
        e.store
            .dead_letters(Some("other"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Nothing the failed handler wrote or sent survived.
    assert_eq!(e.store.outbox_len().await.unwrap(), 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_after_discard_releases_the_parked_messages_in_order() {
    let Some(e) = env().await else { return };
    let mut poison = e.work("k", 1);
    poison.permanent = true;
    e.publish(&[poison, e.work("k", 2)]).await;
    let run = e.start(e.dispatcher(fast_retry(3))).await;
    wait_until(T, "dead and parked", || async {
        e.store.dead_letters(None, 10).await.unwrap().len() == 2
    })
    .await;
    // A message arriving while the key is blocked is parked too.
    e.publish(&[e.work("k", 3)]).await;
    wait_until(T, "third parked", || async {
        e.store.dead_letters(None, 10).await.unwrap().len() == 3
    })
    .await;
    let root = e.store.dead_letters(None, 10).await.unwrap()[0].clone();
    assert_eq!(root.record.reason, DeadLetterReason::Permanent);
    assert_eq!(root.record.attempts, 1, "permanent errors are not retried");
    let parked_id = e.store.dead_letters(None, 10).await.unwrap()[1].id;
    let err = e.store.retry_dead_letter(parked_id).await.unwrap_err();
    assert!(err.to_string().contains("parked"), "{err}");

    // Still failing: back to dead, the others parked again, the key still held.
    e.store.retry_dead_letter(root.id).await.unwrap();
    wait_until(T, "retry failed again", || async {
        e.store
            .dead_letter(root.id)
            .await
            .unwrap()
            .is_some_and(|d| d.record.status == DeadLetterStatus::Dead && d.record.attempts == 2)
    })
    .await;
    assert_eq!(e.applied_count().await, 0);
    assert_eq!(e.store.blocking_dead_letters("worker").await.unwrap(), 3);

    // The operator discards the poison: the parked ones are handled, in order.
    e.store.discard_dead_letter(root.id).await.unwrap();
    wait_until(T, "parked ones applied", || async {
        e.applied_count().await == 2
    })
    .await;
    assert_eq!(e.applied().await, vec![("k".into(), 2), ("k".into(), 3)]);
    wait_until(T, "dead letters gone", || async {
        e.store.dead_letters(None, 10).await.unwrap().is_empty()
    })
    .await;
    e.publish(&[e.work("k", 4)]).await;
    wait_until(T, "k4 applied", || async { e.applied_count().await == 3 }).await;
    assert!(e.store.dead_letter(root.id).await.unwrap().is_none());
    assert!(e.store.retry_dead_letter(root.id).await.is_err());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_records_in_one_statement_and_prunes_in_batches() {
    let Some(e) = env().await else { return };
    let mut tx = e.store.begin().await.unwrap();
    assert!(e.store.inbox_record(&mut tx, "s", "m0").await.unwrap());
    assert!(!e.store.inbox_record(&mut tx, "s", "m0").await.unwrap());
    let ids: Vec<String> = (0..250)
        .map(|i| format!("m{i}"))
        .chain(["m1".into()])
        .collect();
    let new = e.store.inbox_record_many(&mut tx, "s", &ids).await.unwrap();
    assert_eq!(new.len(), 249, "m0 was there, m1 came twice");
    assert!(!new.contains("m0"));
    e.store.commit(tx).await.unwrap();
    assert!(e.store.inbox_contains("s", "m249").await.unwrap());
    assert!(!e.store.inbox_contains("t", "m249").await.unwrap());
    assert_eq!(
        e.store.prune_inbox(60_000, 100).await.unwrap(),
        0,
        "young rows are kept"
    );
    assert_eq!(e.store.prune_inbox(0, 100).await.unwrap(), 250);
    assert!(!e.store.inbox_contains("s", "m0").await.unwrap());
}

// ---- the outbox and its wake-ups -------------------------------------------------------------

async fn write_outbox(store: &PgStore, channel: &ChannelName, from: u32, to: u32) -> Vec<Message> {
    let mut all = Vec::new();
    for i in from..to {
        let mut tx = store.begin().await.unwrap();
        let m = Message::new(format!("{i}"))
            .to(channel.clone())
            .with_key(format!("k{}", i % 3))
            .unwrap();
        store.outbox().send(&mut tx, m.clone()).await.unwrap();
        tx.commit().await.unwrap();
        all.push(m);
    }
    all
}

async fn published(broker: &SqliteBroker, channel: &ChannelName) -> Vec<String> {
    broker
        .read_after(channel, 0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, m)| m.unwrap().id.to_string())
        .collect()
}

/// Writing to the outbox (the relay itself runs the shared relay suite in tests/relay):
/// `send_all` inside a transaction, a rolled-back send leaves nothing, refusals happen
/// before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_writes_join_the_transaction_and_refuse_bad_messages() {
    let Some(e) = env().await else { return };
    let (store, ch) = (&e.store, ChannelName::new("orders").unwrap());
    write_outbox(store, &ch, 0, 2).await;
    let batch: Vec<Message> = (2..5)
        .map(|i| Message::new(format!("{i}")).to(ch.clone()))
        .collect();
    let mut tx = store.begin().await.unwrap();
    store.outbox().send_all(&mut *tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    store
        .outbox()
        .send(&mut tx, Message::new("never").to(ch.clone()))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    assert!(
        store
            .outbox()
            .send(&mut tx, Message::new("nowhere"))
            .await
            .is_err()
    );
    let big = Message::new(vec![0u8; 2048]).to(ch.clone());
    assert!(
        store
            .outbox()
            .max_message_bytes(1024)
            .send(&mut tx, big)
            .await
            .is_err()
    );
    drop(tx);
    assert_eq!(store.outbox_len().await.unwrap(), 5);
    let ids: Vec<String> = store
        .outbox_peek(10, 1 << 20)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.message.unwrap().id.to_string())
        .collect();
    assert_eq!(
        ids[2..],
        batch.iter().map(|m| m.id.to_string()).collect::<Vec<_>>()[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_written_with_the_commit_keep_every_byte() {
    let Some(e) = env().await else { return };
    let (store, ch) = (&e.store, ChannelName::new("orders").unwrap());
    sqlx::query("CREATE TABLE business (n INT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    // Headers and payloads that an SQL literal must escape: quotes, backslashes, `E'`
    // look-alikes, a semicolon with a statement after it, non-ASCII, every byte value.
    let tricky = "it's a \\'quote\\' E'\\x00' ; DROP TABLE business; -- ünïcødé ✓ \\\\";
    let payload: Vec<u8> = (0..=255u8).chain(b"'\\;".iter().copied()).collect();
    let m = Message::new(payload.clone())
        .to(ch.clone())
        .with_key(tricky)
        .unwrap()
        .with_header("x-note", tricky)
        .unwrap();
    let mut tx = store.begin().await.unwrap();
    sqlx::query("INSERT INTO business (n) VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    store.outbox().send(&mut tx, m.clone()).await.unwrap();
    // Nothing is written before the commit: the rows go with it, in its round trip.
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    tx.commit().await.unwrap();
    let rows = store.outbox_peek(10, 1 << 20).await.unwrap();
    assert_eq!(rows.len(), 1);
    let got = rows[0].message.as_ref().unwrap();
    assert_eq!(got.id, m.id);
    assert_eq!(got.payload.as_ref(), &payload[..]);
    assert_eq!(got.headers.get_raw("x-note"), Some(tricky));
    assert_eq!(got.headers.partition_key(), Some(tricky));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM business")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(n, 1, "the business row committed with the message");

    // A statement of the commit's query fails (here a constraint on the outbox): the
    // transaction rolls back whole, the error says so, and the connection is clean for
    // the next transaction.
    sqlx::query("ALTER TABLE courier_outbox ADD CONSTRAINT no_poison CHECK (channel <> 'poison')")
        .execute(store.pool())
        .await
        .unwrap();
    for _ in 0..3 {
        let mut tx = store.begin().await.unwrap();
        sqlx::query("INSERT INTO business (n) VALUES (2)")
            .execute(&mut *tx)
            .await
            .unwrap();
        let poison = Message::new("x").to(ChannelName::new("poison").unwrap());
        store.outbox().send(&mut tx, poison).await.unwrap();
        let err = tx.commit().await.unwrap_err();
        assert!(err.to_string().contains("committing"), "{err}");
        assert!(err.to_string().contains("no_poison"), "{err}");
    }
    let mut tx = store.begin().await.unwrap();
    sqlx::query("INSERT INTO business (n) VALUES (3)")
        .execute(&mut *tx)
        .await
        .unwrap();
    store
        .outbox()
        .send(&mut tx, Message::new("y").to(ch.clone()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ns: Vec<i32> = sqlx::query_scalar("SELECT n FROM business ORDER BY n")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(ns, vec![1, 3]);
    assert_eq!(store.outbox_len().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_survive_their_parked_connections_dying() {
    let Some(e) = env().await else { return };
    let (store, ch) = (&e.store, ChannelName::new("orders").unwrap());
    // Park a few connections (noting their server processes), then kill them.
    let mut txs = Vec::new();
    let mut pids: Vec<i32> = Vec::new();
    for _ in 0..3 {
        let mut tx = store.begin().await.unwrap();
        pids.push(
            sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *tx)
                .await
                .unwrap(),
        );
        txs.push(tx);
    }
    for tx in txs {
        tx.commit().await.unwrap();
    }
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM unnest($1::int[]) AS t(pid)",
    )
    .bind(&pids)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(killed, 3);
    wait_until(T, "the killed connections gone", || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])")
                .bind(&pids)
                .fetch_one(store.pool())
                .await
                .unwrap();
        left == 0
    })
    .await;
    // Each transaction finds its parked connection dead at BEGIN and takes a fresh one.
    write_outbox(store, &ch, 0, 4).await;
    assert_eq!(store.outbox_len().await.unwrap(), 4);
    // The relay's statements too.
    assert_eq!(store.outbox_peek(10, 1 << 20).await.unwrap().len(), 4);
}

/// Whether the store's `LISTEN` connection is up (its application_name names the schema).
async fn listening(e: &Env) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query ILIKE 'LISTEN%'",
    )
    .bind(format!("courier-listen {}", e.schema.name))
    .fetch_one(e.store.pool())
    .await
    .unwrap();
    n > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_wakes_the_relay_long_before_its_poll() {
    let Some(e) = env().await else { return };
    let (store, broker, ch) = (&e.store, &e.broker, ChannelName::new("orders").unwrap());

    // The signal itself: one bump after connecting (catch-up), then one per commit.
    let mut changes = store.outbox_changes();
    wait_until(T, "listener connected", || listening(&e)).await;
    wait_until(T, "catch-up bump after connecting", || {
        let n = *changes.borrow();
        async move { n >= 1 }
    })
    .await;
    changes.borrow_and_update();
    // Writers notify only while a relay waits: it arms the signal first.
    assert!(
        store.outbox_arm().await,
        "nothing in flight: the signal arms"
    );
    write_outbox(store, &ch, 0, 1).await;
    tokio::time::timeout(Duration::from_secs(1), changes.changed())
        .await
        .expect("a commit to the outbox notifies within 1 s")
        .unwrap();

    // The listener's connection dies: it reconnects, bumps once to catch up (what was
    // notified meanwhile is lost), and is woken by commits again.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("courier-listen {}", e.schema.name))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(killed, 1);
    let before = *changes.borrow_and_update();
    wait_until(T, "catch-up bump after reconnecting", || {
        let n = *changes.borrow();
        async move { n > before }
    })
    .await;
    wait_until(T, "listener reconnected", || listening(&e)).await;
    changes.borrow_and_update();
    assert!(store.outbox_arm().await, "the reconnected listener arms");
    write_outbox(store, &ch, 0, 1).await;
    tokio::time::timeout(Duration::from_secs(1), changes.changed())
        .await
        .expect("a commit notifies the reconnected listener within 1 s")
        .unwrap();

    // End to end: a relay polling only every 5 s publishes a commit at once.
    let mut cfg = RelayConfig::default()
        .lease_ttl(Duration::from_secs(30))
        .instance("idle");
    cfg.poll_interval = Duration::from_secs(5);
    let relay = Relay::new(store.clone(), broker.clone()).with_config(cfg);
    let stats = relay.stats();
    let h = tokio::spawn(relay.run(std::future::pending::<()>()));
    wait_until(T, "first messages relayed", || async {
        stats.published.load(Ordering::Relaxed) == 2
    })
    .await;
    for i in 2..5u32 {
        let t0 = std::time::Instant::now();
        write_outbox(store, &ch, i, i + 1).await;
        wait_until(Duration::from_secs(1), "woken by NOTIFY", || async {
            stats.published.load(Ordering::Relaxed) == u64::from(i) + 1
        })
        .await;
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }
    assert_eq!(published(broker, &ch).await.len(), 5);
    h.abort();
}

// ---- connecting ----------------------------------------------------------------------------

/// `url` with `password` set and `database` as its path.
fn with_password(url: &str, password: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, _) = rest.split_once('/').unwrap_or((rest, ""));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap();
            format!("{user}:{password}@{host}")
        }
        None => format!("postgres:{password}@{authority}"),
    };
    format!("{scheme}://{authority}/{database}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_name_the_url_without_its_password() {
    let Some(url) = pg_url() else { return };
    let secret = "hunter2-not-shown";

    // Nothing listens on port 1.
    let unreachable = "postgres://postgres:hunter2-not-shown@127.0.0.1:1/test";
    let err = PgStore::connect(unreachable).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        text.contains("postgres://postgres:***@127.0.0.1:1/test"),
        "{text}"
    );
    assert!(!text.contains(secret), "{text}");
    assert!(text.contains("running and reachable"), "{text}");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.is_retryable());

    // No such database: a configuration error, not worth retrying.
    let missing = with_password(&url, secret, "courier_no_such_database");
    let err = PgStore::connect(&missing).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        text.contains(&courier_postgres::redact_url(&missing)),
        "{text}"
    );
    assert!(text.contains(":***@"), "{text}");
    assert!(!text.contains(secret), "{text}");
    assert!(
        text.contains("check the user, password and database"),
        "{text}"
    );
    assert!(!err.is_retryable());

    // A wrong password: refused where the server checks passwords; where it trusts the
    // client, the store connects and still never shows it.
    // Its own schema, so a trusting server gets no tables in `public`.
    let schema = Schema::create(&url).await;
    let database = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    let wrong = format!(
        "{}?options[search_path]={}",
        with_password(&url, secret, database),
        schema.name
    );
    match PgStore::connect(&wrong).await {
        Err(err) => {
            let text = format!("{err} {err:?}");
            assert!(text.contains(":***@"), "{text}");
            assert!(!text.contains(secret), "{text}");
        }
        Ok(store) => {
            let shown = format!("{} {store:?}", store.describe());
            assert!(shown.contains(":***@"), "{shown}");
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    assert!(PgStore::connect("mysql://nope").await.is_err());
}
