//! Connection recovery against the real server at `COURIER_TEST_AMQP_URL` (skipped with
//! a printed reason when unset, a failure when `CI` is set). The connections are closed
//! from the client side, so no other user of the shared server is disturbed.

use crate::{AmqpTransport, Inner, member, publish, topology};
use courier_core::{ErrorKind, Publisher, SubscribeOptions};
use courier_testkit::{TIMEOUT, collect_acked, group, keyed, unique_channel};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn url() -> Option<String> {
    match std::env::var("COURIER_TEST_AMQP_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() => panic!("COURIER_TEST_AMQP_URL must be set in CI"),
        _ => {
            eprintln!("skipped: COURIER_TEST_AMQP_URL is not set");
            None
        }
    }
}

async fn transport(url: String) -> AmqpTransport {
    AmqpTransport::builder()
        .url(url)
        .rebalance_interval(Duration::from_millis(100))
        .stream_max_age(Some(Duration::from_secs(3600)))
        .connect()
        .await
        .unwrap()
}

/// The publisher's connection dies: publishing fails with retryable errors only, and
/// succeeds again once reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_reconnects_after_the_connection_dies() {
    let Some(url) = url() else { return };
    let t = transport(url).await;
    let ch = unique_channel("recover-pub");
    t.publish(&[keyed(&ch, "k", 0)]).await.unwrap();
    let conn = t
        .inner
        .publisher
        .lock()
        .await
        .link(&t.inner)
        .await
        .unwrap()
        .0;
    conn.close(320, "test: forced close".into()).await.unwrap();
    let started = Instant::now();
    let mut seq = 1;
    loop {
        match t.publish(&[keyed(&ch, "k", seq)]).await {
            Ok(_) => break,
            Err(e) => assert!(
                e.is_retryable(),
                "a lost connection gave a permanent error: {e:?}"
            ),
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "the publisher never reconnected"
        );
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.delete_channel(&ch).await.unwrap();
}

/// An unreachable server: the first attempt fails transiently, and an immediate retry
/// is answered from the backoff without a new connection attempt (no hot loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnection_attempts_back_off() {
    if url().is_none() {
        return;
    }
    let config = crate::AmqpConfig {
        url: "amqp://guest:guest@127.0.0.1:1/%2f".to_owned(),
        ..crate::AmqpConfig::default()
    };
    let inner = Inner::new(config);
    let mut state = publish::PublishState::default();
    let first = state.link(&inner).await.err().unwrap();
    assert!(first.is_retryable(), "{first:?}");
    let started = Instant::now();
    let second = state.link(&inner).await.err().unwrap();
    assert_eq!(second.kind(), ErrorKind::Unavailable);
    assert!(second.to_string().contains("next attempt in"), "{second}");
    assert!(started.elapsed() < Duration::from_millis(50));
}

/// A member's connection dies: it reconnects on its own, claims its partitions again
/// and delivers what was published meanwhile, from the committed floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_reconnects_and_resumes() {
    let Some(url) = url() else { return };
    let t = transport(url).await;
    let ch = unique_channel("recover-sub");
    let grp = group("recover-sub");
    t.create_channel(&ch, 2).await.unwrap();
    let conn = Arc::new(
        topology::connect(&t.inner.config, "test member")
            .await
            .unwrap(),
    );
    let mut sub = member::join_on(
        t.inner.clone(),
        SubscribeOptions::new(ch.clone(), grp.clone()),
        conn.clone(),
    )
    .await
    .unwrap();
    let first: Vec<_> = (0..5).map(|i| keyed(&ch, &format!("k{i}"), 0)).collect();
    t.publish(&first).await.unwrap();
    collect_acked(&mut sub, first.len(), TIMEOUT).await;

    conn.close(320, "test: forced close".into()).await.unwrap();
    let second: Vec<_> = (0..5).map(|i| keyed(&ch, &format!("k{i}"), 1)).collect();
    t.publish(&second).await.unwrap();
    let got = collect_acked(&mut sub, second.len(), TIMEOUT).await;
    let want: std::collections::HashSet<_> = second.iter().map(|m| m.id).collect();
    assert!(
        got.iter().all(|m| want.contains(&m.id)),
        "acknowledged messages came again after the reconnection"
    );
    drop(sub);
    t.delete_group(&ch, &grp).await.unwrap();
    t.delete_channel(&ch).await.unwrap();
}

/// A member's connection dies with deliveries in hand (a hard crash: no goodbye, no
/// settlement): RabbitMQ drops its locks, and the next member gets every message it
/// left unacknowledged, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_members_unacked_messages_move_in_order() {
    let Some(url) = url() else { return };
    let t = transport(url).await;
    let ch = unique_channel("hard-crash");
    let grp = group("hard-crash");
    t.create_channel(&ch, 2).await.unwrap();
    let conn = Arc::new(
        topology::connect(&t.inner.config, "test member")
            .await
            .unwrap(),
    );
    let mut sub_a = member::join_on(
        t.inner.clone(),
        SubscribeOptions::new(ch.clone(), grp.clone()),
        conn.clone(),
    )
    .await
    .unwrap();
    let sent: Vec<_> = (0..6)
        .flat_map(|seq| (0..4).map(move |k| (k, seq)))
        .map(|(k, seq)| keyed(&ch, &format!("key-{k}"), seq))
        .collect();
    t.publish(&sent).await.unwrap();
    let mut left = std::collections::HashSet::new();
    let mut held = Vec::new();
    for (i, d) in courier_testkit::collect(&mut sub_a, sent.len(), TIMEOUT)
        .await
        .into_iter()
        .enumerate()
    {
        if i % 3 == 1 {
            d.ack().await.unwrap();
        } else {
            left.insert(d.message.as_ref().unwrap().id);
            held.push(d);
        }
    }
    conn.close(320, "test: crash".into()).await.unwrap();
    drop(held);
    drop(sub_a);

    let b = AmqpTransport::connect_with(t.inner.config.clone())
        .await
        .unwrap();
    let mut sub_b =
        courier_core::Subscriber::subscribe(&b, SubscribeOptions::new(ch.clone(), grp.clone()))
            .await
            .unwrap();
    let mut seen = Vec::new();
    let mut ids = std::collections::HashSet::new();
    while !left.iter().all(|id| ids.contains(id)) {
        let got = collect_acked(&mut sub_b, 1, TIMEOUT).await.remove(0);
        if ids.insert(got.id) {
            seen.push(got);
        }
    }
    courier_testkit::assert_per_key_order(&seen);
    drop(sub_b);
    t.delete_group(&ch, &grp).await.unwrap();
    t.delete_channel(&ch).await.unwrap();
}
