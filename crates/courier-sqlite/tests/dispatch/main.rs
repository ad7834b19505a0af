//! The dispatcher on a real SQLite service database and the embedded broker: inbox,
//! retries, dead letters, parking, redrive, bad input, atomic consume → produce.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod correlations;
mod support;

use courier_core::{Codec, DeadLetterReason, DeadLetterStatus, Message, MessageStore, headers};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_each_message_once_and_produces_in_the_same_transaction() {
    let e = env().await;
    let works: Vec<_> = (0..50).map(|i| e.work(&format!("k{}", i % 5), i)).collect();
    e.publish(&works).await;
    let run = e.start(e.dispatcher(fast_retry(3))).await;
    wait_until(T, "50 applied", || async { e.applied_count().await == 50 }).await;
    // Every handled message produced exactly one WorkDone through the outbox.
    assert_eq!(e.store.outbox_len().await.unwrap(), 50);
    // Per key, in publish order.
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
    let e = env().await;
    let m = e.message(&e.work("dup", 1));
    // The same message (same id) published twice: the relay's crash-before-delete case.
    e.publish_raw(std::slice::from_ref(&m)).await;
    e.publish_raw(std::slice::from_ref(&m)).await;
    let next = e.message(&e.work("dup", 2));
    e.publish_raw(&[next]).await;
    let d = e.dispatcher(fast_retry(3));
    let stats = d.stats();
    let run = e.start(d).await;
    wait_until(T, "second message applied", || async {
        e.applied_count().await == 2
    })
    .await;
    wait_until(T, "duplicate counted", || async {
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed) == 1
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
    let e = env().await;
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
    // The other key did not wait for the retries...
    assert!(
        pos("fast", 2) < pos("slow", 1),
        "fast key was stalled: {applied:?}"
    );
    // ... and the failing key kept its order.
    assert!(pos("slow", 1) < pos("slow", 2));
    assert_eq!(e.attempts_of("slow", 1).await, 3);
    assert_eq!(e.attempts_of("slow", 2).await, 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_dead_lettered_with_its_history_and_parks_its_key() {
    let e = env().await;
    let mut poison = e.work("bad", 1);
    poison.fail_transient = 100;
    let works = vec![poison, e.work("bad", 2), e.work("good", 1)];
    e.publish(&works).await;
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
    let dls = e.store.dead_letters(None, 10).await.unwrap();
    let root = &dls[0].record;
    assert_eq!(root.reason, DeadLetterReason::Exhausted);
    assert_eq!(root.status, DeadLetterStatus::Dead);
    assert_eq!(root.attempts, 3);
    assert_eq!(
        e.attempts_of("bad", 1).await,
        3,
        "the handler ran more often than max_attempts"
    );
    assert!(root.first_failed_at_ms <= root.last_failed_at_ms);
    assert!(root.error.contains("flaky"), "{}", root.error);
    assert_eq!(root.partition_key.as_deref(), Some("bad"));
    assert_eq!(dls[1].record.reason, DeadLetterReason::Parked);
    assert_eq!(dls[1].record.status, DeadLetterStatus::Parked);
    // The original message is kept whole.
    let w: Work = serde_json::from_slice(&root.payload).unwrap();
    assert_eq!(w.n, 1);
    // Nothing the failed handler wrote or sent survived.
    assert_eq!(e.store.outbox_len().await.unwrap(), 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_runs_the_dead_letter_then_its_parked_messages_in_order() {
    let e = env().await;
    let mut poison = e.work("k", 1);
    poison.permanent = true;
    e.publish(&[poison.clone(), e.work("k", 2)]).await;
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
    // Retrying a parked one is refused with a reason.
    let parked_id = e.store.dead_letters(None, 10).await.unwrap()[1].id;
    let err = e.store.retry_dead_letter(parked_id).await.unwrap_err();
    assert!(err.to_string().contains("parked"), "{err}");

    // Still failing: the retry puts it back to dead and keeps the others parked.
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

    // Operator discards the poison: the parked ones are handled, in order.
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
    // The key flows normally again.
    e.publish(&[e.work("k", 4)]).await;
    wait_until(T, "k4 applied", || async { e.applied_count().await == 3 }).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_after_fix_handles_the_dead_letter() {
    let e = env().await;
    let mut flaky = e.work("x", 1);
    flaky.fail_transient = 2; // fails both attempts allowed, succeeds on the third
    e.publish(&[flaky]).await;
    let run = e.start(e.dispatcher(fast_retry(2))).await;
    wait_until(T, "dead-lettered", || async {
        e.store.dead_letters(None, 10).await.unwrap().len() == 1
    })
    .await;
    let id = e.store.dead_letters(None, 10).await.unwrap()[0].id;
    e.store.retry_dead_letter(id).await.unwrap();
    wait_until(T, "redriven", || async { e.applied_count().await == 1 }).await;
    assert!(e.store.dead_letter(id).await.unwrap().is_none());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_a_reason_and_the_consumer_keeps_going() {
    let e = env().await;
    // Unknown type.
    let unknown = Message::new("{}").to(e.channel.clone()).with_type(
        &courier_core::MessageType::new("test.Nobody").unwrap(),
        courier_core::Version::new(1, 0),
        courier_core::MessageKind::Event,
    );
    // Undecodable payload.
    let mut garbage = e.message(&e.work("g", 1));
    garbage.payload = bytes::Bytes::from_static(b"{not json");
    // Unsupported major version.
    let mut v9 = e.message(&e.work("v", 1));
    v9.headers.insert(headers::TYPE_VERSION, "9").unwrap();
    // No type at all.
    let untyped = Message::new("hello").to(e.channel.clone());
    // Expired deadline.
    let mut expired = e.message(&e.work("late", 1));
    expired.headers.insert(headers::DEADLINE, "1000").unwrap();
    e.publish_raw(&[unknown, garbage, v9, untyped, expired])
        .await;
    e.publish(&[e.work("g", 2)]).await;
    let run = e
        .start(e.dispatcher(
            fast_retry(3).max_message_bytes(courier_core::message::DEFAULT_MAX_MESSAGE_BYTES),
        ))
        .await;
    wait_until(T, "5 dead letters", || async {
        e.store.dead_letters(None, 10).await.unwrap().len() == 5
    })
    .await;
    // Bad input does not block its key: g/2 was handled.
    wait_until(T, "good message applied", || async {
        e.applied_count().await == 1
    })
    .await;
    // Partitions are consumed independently: find each dead letter by what it was.
    let dls = e.store.dead_letters(None, 10).await.unwrap();
    let find = |pred: &dyn Fn(&courier_core::DeadLetter) -> bool| {
        dls.iter()
            .find(|d| pred(d))
            .map(|d| (d.record.reason, d.record.error.clone()))
            .unwrap()
    };
    let (reason, error) = find(&|d| d.record.message_type.as_deref() == Some("test.Nobody"));
    assert_eq!(reason, DeadLetterReason::UnknownType);
    assert!(error.contains("test.Nobody"), "{error}");
    let (reason, error) = find(&|d| d.record.partition_key.as_deref() == Some("g"));
    assert_eq!(reason, DeadLetterReason::Undecodable);
    assert!(error.contains("JSON"), "{error}");
    let (reason, error) = find(&|d| d.record.partition_key.as_deref() == Some("v"));
    assert_eq!(reason, DeadLetterReason::Undecodable);
    assert!(error.contains("major version 9"), "{error}");
    let (reason, error) = find(&|d| d.record.message_type.is_none());
    assert_eq!(reason, DeadLetterReason::UnknownType);
    assert!(error.contains("no 'type' header"), "{error}");
    let (reason, _) = find(&|d| d.record.partition_key.as_deref() == Some("late"));
    assert_eq!(reason, DeadLetterReason::Expired);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_dead_lettered_not_handled() {
    let e = env().await;
    let mut big = e.work("big", 1);
    big.key = "big".into();
    let mut m = e.message(&big);
    m = m.with_header("x-padding", "p".repeat(4000)).unwrap();
    e.publish_raw(&[m]).await;
    e.publish(&[e.work("big", 2)]).await;
    let run = e
        .start(e.dispatcher(fast_retry(3).max_message_bytes(2000)))
        .await;
    wait_until(T, "oversized dead-lettered", || async {
        e.store.dead_letters(None, 10).await.unwrap().len() == 1
    })
    .await;
    wait_until(T, "next applied", || async { e.applied_count().await == 1 }).await;
    let dl = &e.store.dead_letters(None, 10).await.unwrap()[0];
    assert_eq!(dl.record.reason, DeadLetterReason::Oversized);
    assert!(
        dl.record.error.contains("limit is 2000"),
        "{}",
        dl.record.error
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_is_a_transient_failure_not_a_crash() {
    use courier_core::{Dispatcher, HandlerContext};
    let e = env().await;
    e.publish(&[e.work("p", 1), e.work("q", 1)]).await;
    let d = Dispatcher::new(e.store.clone(), e.group.clone())
        .with_config(fast_retry(2))
        .on(
            |_ctx: HandlerContext<courier_sqlite::SqliteStore>, w: Work| async move {
                if w.key == "p" {
                    panic!("boom in handler");
                }
                Ok(())
            },
        );
    let stats = d.stats();
    let run = e.start(d).await;
    wait_until(T, "panicking message dead-lettered", || async {
        e.store.dead_letters(None, 10).await.unwrap().len() == 1
    })
    .await;
    let dl = &e.store.dead_letters(None, 10).await.unwrap()[0];
    assert!(
        dl.record.error.contains("boom in handler"),
        "{}",
        dl.record.error
    );
    wait_until(T, "other key handled", || async {
        stats.handled.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_dispatcher_resumes_without_loss_or_double_effects() {
    let e = env().await;
    let works: Vec<_> = (0..200)
        .map(|i| e.work(&format!("k{}", i % 7), i))
        .collect();
    e.publish(&works[..100]).await;
    let run = e.start(e.dispatcher(fast_retry(3))).await;
    wait_until(T, "some applied", || async {
        e.applied_count().await >= 30
    })
    .await;
    drop(run); // abort mid-stream: no clean shutdown
    e.publish(&works[100..]).await;
    let run = e.start(e.dispatcher(fast_retry(3))).await;
    wait_until(T, "all applied", || async {
        e.applied_count().await >= 200
    })
    .await;
    run.stop().await;
    let mut ns: Vec<u32> = e.applied().await.into_iter().map(|(_, n)| n).collect();
    ns.sort_unstable();
    assert_eq!(
        ns,
        (0..200).collect::<Vec<_>>(),
        "each message applied exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_rows_are_pruned_in_batches() {
    let e = env().await;
    let mut tx = e.store.begin().await.unwrap();
    for i in 0..250 {
        assert!(
            e.store
                .inbox_record(&mut tx, "s", &format!("m{i}"))
                .await
                .unwrap()
        );
    }
    assert!(!e.store.inbox_record(&mut tx, "s", "m0").await.unwrap());
    e.store.commit(tx).await.unwrap();
    assert_eq!(
        e.store.prune_inbox(60_000, 100).await.unwrap(),
        0,
        "young rows are kept"
    );
    assert_eq!(e.store.prune_inbox(0, 100).await.unwrap(), 250);
    let _ = Codec;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_prunes_its_inbox_after_the_retention_window() {
    let e = env().await;
    e.publish(&[e.work("a", 1), e.work("b", 1)]).await;
    let d = e.dispatcher(
        fast_retry(3)
            .inbox_retention(Duration::ZERO)
            .maintenance_interval(Duration::from_millis(20)),
    );
    let stats = d.stats();
    let run = e.start(d).await;
    wait_until(T, "both applied", || async { e.applied_count().await == 2 }).await;
    wait_until(T, "inbox pruned", || async {
        stats
            .inbox_pruned
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM courier_inbox")
        .fetch_one(e.store.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_prunes_only_what_every_group_consumed() {
    use courier_core::{SubscribeOptions, Subscriber};
    let e = env().await;
    let works: Vec<_> = (0..20).map(|i| e.work(&format!("k{i}"), i)).collect();
    e.publish(&works).await;
    // Group "worker" consumes everything; group "slow" joins but acks nothing.
    let slow = e
        .broker
        .subscribe(SubscribeOptions::new(
            e.channel.clone(),
            courier_core::GroupName::new("slow").unwrap(),
        ))
        .await
        .unwrap();
    let run = e.start(e.dispatcher(fast_retry(3))).await;
    wait_until(T, "all applied", || async { e.applied_count().await == 20 }).await;
    run.stop().await;
    assert_eq!(
        e.broker.prune(Duration::ZERO).await.unwrap(),
        0,
        "the slow group still needs them"
    );
    drop(slow);
    // The slow group consumes everything now.
    let mut sub = e
        .broker
        .subscribe(SubscribeOptions::new(
            e.channel.clone(),
            courier_core::GroupName::new("slow").unwrap(),
        ))
        .await
        .unwrap();
    for _ in 0..20 {
        let d = tokio::time::timeout(T, sub.next()).await.unwrap().unwrap();
        d.ack().await.unwrap();
    }
    drop(sub); // leaving commits the progress
    wait_until(T, "consumed messages pruned", || async {
        e.broker.prune(Duration::ZERO).await.unwrap();
        e.broker
            .read_after(&e.channel, 0, 100)
            .await
            .unwrap()
            .is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_database_outage_stalls_without_loss_and_shutdown_still_works() {
    let e = env().await;
    e.publish(&[e.work("a", 1)]).await;
    let d = e.dispatcher(fast_retry(3));
    let stats = d.stats();
    let run = e.start(d).await;
    wait_until(T, "first applied", || async {
        e.applied_count().await == 1
    })
    .await;
    // The inbox table disappears (an operator's mistake, a broken migration).
    sqlx::query("ALTER TABLE courier_inbox RENAME TO courier_inbox_away")
        .execute(e.store.pool())
        .await
        .unwrap();
    e.publish(&[e.work("a", 2), e.work("b", 1)]).await;
    wait_until(T, "batch failed and stalled", || async {
        stats
            .store_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    assert_eq!(
        e.applied_count().await,
        1,
        "nothing applied without the inbox"
    );
    run.stop().await; // shutdown is honoured while stalled
    sqlx::query("ALTER TABLE courier_inbox_away RENAME TO courier_inbox")
        .execute(e.store.pool())
        .await
        .unwrap();
    let run = e.start(e.dispatcher(fast_retry(3))).await;
    wait_until(T, "the rest applied after the outage", || async {
        e.applied_count().await == 3
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_keeps_its_context_stops_the_dispatcher_with_a_clear_error() {
    use courier_core::{Dispatcher, HandlerContext, SubscribeOptions, Subscriber};
    let e = env().await;
    e.publish(&[e.work("leak", 1)]).await;
    let (_keep, held) = tokio::sync::oneshot::channel::<()>();
    let held = std::sync::Arc::new(tokio::sync::Mutex::new(Some(held)));
    let d = Dispatcher::new(e.store.clone(), e.group.clone())
        .with_config(fast_retry(3))
        .on(
            move |ctx: HandlerContext<courier_sqlite::SqliteStore>, _w: Work| {
                let held = held.clone();
                async move {
                    let rx = held.lock().await.take();
                    // Misuse: the context escapes into a task that outlives the handler.
                    tokio::spawn(async move {
                        let _ctx = ctx;
                        if let Some(rx) = rx {
                            let _ = rx.await;
                        }
                    });
                    Ok(())
                }
            },
        );
    let sub = e
        .broker
        .subscribe(SubscribeOptions::new(e.channel.clone(), e.group.clone()))
        .await
        .unwrap();
    let err = tokio::time::timeout(T, d.run(sub, std::future::pending()))
        .await
        .expect("the dispatcher must stop, not hang")
        .unwrap_err();
    assert!(err.to_string().contains("kept its HandlerContext"), "{err}");
}
