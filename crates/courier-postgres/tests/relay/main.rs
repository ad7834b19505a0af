//! The relay suite on PostgreSQL, twice: the polling source ([`PgStore`]: select, publish,
//! delete, woken by LISTEN/NOTIFY) and the log-tailing source ([`PgLogTailing`]: a logical
//! replication slot), each on a schema of its own, publishing to the embedded SQLite
//! broker. Plus what only log tailing has: its slot (creation, lag, dropping).
//!
//! Needs `COURIER_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1/test`) and, for
//! log tailing, `wal_level = logical`; without the URL the tests skip, except under `CI`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use courier_core::{ChannelName, Message, OutboxSource};
use courier_postgres::PgLogTailing;
use courier_testkit::relay_suite::{OutboxFactory, RunningRelay};
use std::time::Duration;
use support::*;

mod polling {
    courier_testkit::relay_tests!(crate::support::PgFactory::polling());
}

mod log_tailing {
    courier_testkit::relay_tests!(crate::support::PgFactory::tailing());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_created_once_reports_its_lag_and_can_be_dropped() {
    let Some(f) = PgFactory::tailing().await else {
        return;
    };
    let slot = f.slot.clone().unwrap();
    let a = f.tailing_source().await;
    assert_eq!(a.slot_name(), slot);
    assert!(a.describe().contains(&slot));
    // Opening again is idempotent.
    let b = PgLogTailing::with_slot(f.store.clone(), &slot)
        .await
        .unwrap();
    assert!(b.lag_bytes().await.unwrap().is_some());
    // The default name is stable, unique per schema and valid.
    let name = PgLogTailing::default_slot_name(&f.store).await.unwrap();
    assert_eq!(
        name,
        PgLogTailing::default_slot_name(&f.store).await.unwrap()
    );
    assert!(name.starts_with("courier_"), "{name}");
    assert!(
        PgLogTailing::with_slot(f.store.clone(), "Not-Valid")
            .await
            .is_err()
    );

    assert!(a.drop_slot().await.unwrap());
    assert!(!a.drop_slot().await.unwrap(), "already gone");
    assert_eq!(a.lag_bytes().await.unwrap(), None);
    assert!(
        !PgLogTailing::drop_slot_named(&f.store, &slot)
            .await
            .unwrap(),
        "dropping a missing slot is not an error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_outbox_lets_its_slot_move_on() {
    let Some(f) = PgFactory::tailing().await else {
        return;
    };
    let src = f.tailing_source().await;
    let mut cfg = courier_core::RelayConfig::default().instance("idle");
    cfg.poll_interval = Duration::from_millis(50);
    let relay = RunningRelay::start(src.clone(), f.publisher(), cfg);
    // WAL written elsewhere (another table) while the outbox is idle.
    sqlx::query("CREATE TABLE noise (x TEXT)")
        .execute(f.store.pool())
        .await
        .unwrap();
    for _ in 0..5 {
        sqlx::query("INSERT INTO noise SELECT repeat('x', 1000) FROM generate_series(1, 100)")
            .execute(f.store.pool())
            .await
            .unwrap();
    }
    let behind = src.lag_bytes().await.unwrap().unwrap();
    assert!(behind > 100_000, "{behind}");
    courier_testkit::wait_until(
        Duration::from_secs(20),
        "the slot caught up with the end of the log",
        || async { src.lag_bytes().await.unwrap().unwrap() < behind / 2 },
    )
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_fixed_or_deleted_in_the_table_is_relayed_or_skipped() {
    let Some(f) = PgFactory::tailing().await else {
        return;
    };
    let ch = ChannelName::new(courier_testkit::unique("fix")).unwrap();
    let src = f.source().await.unwrap();
    f.commit_unreadable(&ch).await.unwrap();
    f.commit_unreadable(&ch).await.unwrap();
    let good = Message::new("good").to(ch.clone());
    f.commit(std::slice::from_ref(&good)).await.unwrap();
    let relay = RunningRelay::start(src, f.publisher(), courier_core::RelayConfig::default());
    courier_testkit::wait_until(Duration::from_secs(10), "bad row reported", || async {
        relay
            .stats
            .unreadable
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    // The operator fixes the first (a valid id and headers) and deletes the second.
    let fixed = Message::new("fixed").to(ch.clone());
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM courier_outbox ORDER BY seq")
        .fetch_all(f.store.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE courier_outbox SET message_id = $1, headers = $2 WHERE seq = $3")
        .bind(fixed.id.to_string())
        .bind(fixed.headers.to_json())
        .bind(seqs[0])
        .execute(f.store.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM courier_outbox WHERE seq = $1")
        .bind(seqs[1])
        .execute(f.store.pool())
        .await
        .unwrap();
    courier_testkit::wait_until(
        Duration::from_secs(10),
        "fixed and good relayed",
        || async { f.arrived(&ch).await.unwrap().len() == 2 },
    )
    .await;
    let got: Vec<String> = f
        .arrived(&ch)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(got, vec![fixed.id.to_string(), good.id.to_string()]);
    courier_testkit::wait_until(Duration::from_secs(10), "outbox empty", || async {
        f.outbox_len().await.unwrap() == 0
    })
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_slot_name_is_refused_with_the_rule() {
    let Some(f) = PgFactory::polling().await else {
        return;
    };
    let err = PgLogTailing::with_slot(f.store.clone(), "x".repeat(64).as_str())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("slot name"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_committed_before_the_slot_existed_are_relayed_first() {
    let Some(f) = PgFactory::tailing_slot_later().await else {
        return;
    };
    let ch = ChannelName::new(courier_testkit::unique("before")).unwrap();
    let old: Vec<Message> = (0..5)
        .map(|i| Message::new(format!("old{i}")).to(ch.clone()))
        .collect();
    f.commit(&old[..2]).await.unwrap();
    f.commit(&old[2..]).await.unwrap();
    let src = f.tailing_source().await;
    let relay = RunningRelay::start(
        src,
        f.publisher(),
        courier_core::RelayConfig::default().batch_size(2),
    );
    let new = vec![Message::new("new").to(ch.clone())];
    f.commit(&new).await.unwrap();
    let ids = |ms: &[Message]| ms.iter().map(|m| m.id.to_string()).collect::<Vec<_>>();
    let expected: Vec<String> = ids(&old).into_iter().chain(ids(&new)).collect();
    courier_testkit::wait_until(Duration::from_secs(10), "all relayed", || async {
        f.arrived(&ch).await.unwrap().len() >= 6
    })
    .await;
    assert_eq!(ids(&f.arrived(&ch).await.unwrap()), expected);
    courier_testkit::wait_until(Duration::from_secs(10), "outbox empty", || async {
        f.outbox_len().await.unwrap() == 0
    })
    .await;
    relay.stop().await;
    // Done once: a later source does not read the table again.
    let again = f.tailing_source().await;
    let more = vec![Message::new("more").to(ch.clone())];
    f.commit(&more).await.unwrap();
    let rows = again.outbox_peek(10, 1 << 20).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].message.as_ref().unwrap().id, more[0].id);
}

/// A row committed while the relay runs arrives from the replication stream at once:
/// inserted without `NOTIFY`, with the relay's poll a minute away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_committed_while_streaming_arrive_without_notify_or_poll() {
    let Some(f) = PgFactory::tailing().await else {
        return;
    };
    let src = f.tailing_source().await;
    let mut cfg = courier_core::RelayConfig::default()
        .instance("stream")
        .lease_ttl(Duration::from_secs(60));
    cfg.poll_interval = Duration::from_secs(60);
    let relay = RunningRelay::start(src, f.publisher(), cfg);
    courier_testkit::wait_until(Duration::from_secs(10), "relay active", || async {
        relay
            .stats
            .leases_taken
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    let ch = ChannelName::new(courier_testkit::unique("stream")).unwrap();
    for round in 0..3 {
        let m = Message::new(format!("s{round}")).to(ch.clone());
        let t0 = std::time::Instant::now();
        sqlx::query(
            "INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at)
             VALUES ($1, $2, $3, $4, 0)",
        )
        .bind(m.id.to_string())
        .bind(ch.as_str())
        .bind(m.headers.to_json())
        .bind(m.payload.to_vec())
        .execute(f.store.pool())
        .await
        .unwrap();
        courier_testkit::wait_until(
            Duration::from_secs(10),
            "streamed row published",
            || async { f.arrived(&ch).await.unwrap().len() == round + 1 },
        )
        .await;
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "round {round} took {:?} (the poll is 60 s away)",
            t0.elapsed()
        );
    }
    relay.stop().await;
}

/// A transaction larger than the stream's buffer goes through whole and in order: the
/// stream pauses while the buffer is full and goes on as rows are confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_the_buffer_is_relayed_in_order() {
    let Some(f) = PgFactory::tailing().await else {
        return;
    };
    let ch = ChannelName::new(courier_testkit::unique("big")).unwrap();
    let all: Vec<Message> = (0..12_000)
        .map(|i| Message::new(format!("b{i}")).to(ch.clone()))
        .collect();
    let src = f.tailing_source().await;
    f.commit(&all).await.unwrap();
    let relay = RunningRelay::start(src, f.publisher(), courier_core::RelayConfig::default());
    courier_testkit::wait_until(Duration::from_secs(60), "all relayed", || async {
        f.arrived(&ch).await.unwrap().len() >= all.len()
    })
    .await;
    let got: Vec<String> = f
        .arrived(&ch)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    let sent: Vec<String> = all.iter().map(|m| m.id.to_string()).collect();
    assert!(got == sent, "every message once, in order");
    courier_testkit::wait_until(Duration::from_secs(10), "outbox empty", || async {
        f.outbox_len().await.unwrap() == 0
    })
    .await;
    relay.stop().await;
}

/// PostgreSQL sends a commit to the slot once it is in the log, a moment before it is
/// visible (with a synchronous standby, only once the standby confirmed). Here the
/// standby never confirms until the commit's wait is cancelled. The relay publishes the
/// row, cannot delete it yet, must not let the slot move past it, and deletes it once
/// the commit is visible. (Were the slot moved on, the row would stay in the table.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_streamed_before_it_is_visible_is_deleted_once_it_is() {
    let Some(f) = PgFactory::tailing().await else {
        return;
    };
    let slot = f.slot.clone().unwrap();
    let stall = SyncStandbyStall::arm(&f.url()).await;
    let producer = f.store_with(&[("synchronous_commit", "on")]).await;
    let mut tx = producer.pool().begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    // A session takes a reloaded setting in after its next statement: poll (wait_until
    // cannot lend the transaction to its closure).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let names: String = sqlx::query_scalar("SHOW synchronous_standby_names")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        if names == NEVER_STANDBY {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until the producer's session sees the standby list"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let src = f.tailing_source().await;
    let mut cfg = courier_core::RelayConfig::default().instance("stall");
    cfg.poll_interval = Duration::from_millis(50);
    let relay = RunningRelay::start(src, f.publisher(), cfg);
    let ch = ChannelName::new(courier_testkit::unique("stall")).unwrap();
    let m = Message::new("stalled").to(ch.clone());
    producer
        .outbox()
        .send_all(&mut tx, std::slice::from_ref(&m))
        .await
        .unwrap();
    let commit = tokio::spawn(tx.commit());
    courier_testkit::wait_until(
        Duration::from_secs(10),
        "the commit waits for the standby",
        || async {
            let waiting: Option<String> =
                sqlx::query_scalar("SELECT wait_event FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_optional(f.store.pool())
                    .await
                    .unwrap();
            waiting.as_deref() == Some("SyncRep")
        },
    )
    .await;
    // The commit record is in the log by now.
    let logged: String = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn()::text")
        .fetch_one(f.store.pool())
        .await
        .unwrap();
    courier_testkit::wait_until(Duration::from_secs(10), "the row published", || async {
        !f.arrived(&ch).await.unwrap().is_empty()
    })
    .await;
    courier_testkit::wait_until(
        Duration::from_secs(20),
        "the relay waited for the commit, gave up for now and will try again",
        || async {
            relay
                .stats
                .failed_steps
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        },
    )
    .await;
    let slot_past = |lsn: String| {
        let pool = f.store.pool().clone();
        let slot = slot.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots
                 WHERE slot_name = $1",
            )
            .bind(slot)
            .bind(lsn)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(
        !slot_past(logged.clone()).await,
        "the slot moved past a published row that is still in the table"
    );

    // The standby "confirms": the commit becomes visible.
    sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .execute(f.store.pool())
        .await
        .unwrap();
    commit.await.unwrap().unwrap();
    drop(stall);
    courier_testkit::wait_until(Duration::from_secs(20), "outbox empty", || async {
        f.outbox_len().await.unwrap() == 0
    })
    .await;
    courier_testkit::wait_until(
        Duration::from_secs(20),
        "the slot moved past the commit",
        || slot_past(logged.clone()),
    )
    .await;
    let arrived = f.arrived(&ch).await.unwrap();
    assert!(arrived.iter().all(|a| a.id == m.id), "{arrived:?}");
    relay.stop().await;
}
