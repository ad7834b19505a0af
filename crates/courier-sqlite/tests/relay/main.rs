//! The relay: publishes committed outbox rows in order and then deletes them; one active
//! relay per outbox; a standby takes over when the active one dies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use courier_core::{ChannelName, Message, Publisher};
use courier_sqlite::{Relay, RelayConfig, SqliteBroker, SqliteStore};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

async fn wait_until<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn setup() -> (tempfile::TempDir, SqliteStore, SqliteBroker, ChannelName) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("svc.db")).await.unwrap();
    let broker = SqliteBroker::open(dir.path().join("broker.db"))
        .await
        .unwrap();
    (dir, store, broker, ChannelName::new("orders").unwrap())
}

async fn write_outbox(
    store: &SqliteStore,
    channel: &ChannelName,
    from: u32,
    to: u32,
) -> Vec<Message> {
    let mut all = Vec::new();
    for i in from..to {
        let mut tx = store.pool().begin().await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_commit_order_then_empties_the_outbox() {
    let (_d, store, broker, ch) = setup().await;
    let sent = write_outbox(&store, &ch, 0, 300).await;
    let relay = Relay::new(store.clone(), broker.clone());
    let stats = relay.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    wait_until(T, "outbox empty", || async {
        store.outbox_len().await.unwrap() == 0
    })
    .await;
    assert_eq!(
        published(&broker, &ch).await,
        sent.iter().map(|m| m.id.to_string()).collect::<Vec<_>>(),
        "the broker has every message once, in commit order"
    );
    assert_eq!(stats.published.load(Ordering::Relaxed), 300);
    // Woken by later commits without a fixed poll.
    let more = write_outbox(&store, &ch, 300, 301).await;
    wait_until(T, "late message relayed", || async {
        published(&broker, &ch).await.len() == 301
    })
    .await;
    assert_eq!(
        published(&broker, &ch).await.last(),
        Some(&more[0].id.to_string())
    );
    stop.send(()).unwrap();
    h.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_active_relay_dies() {
    let (_d, store, broker, ch) = setup().await;
    let cfg = |name: &str| {
        RelayConfig::default()
            .lease_ttl(Duration::from_millis(300))
            .instance(name)
    };
    let a = Relay::new(store.clone(), broker.clone()).with_config(cfg("a"));
    let a_stats = a.stats();
    let a_task = tokio::spawn(a.run(std::future::pending::<()>()));
    wait_until(T, "a active", || async {
        a_stats.leases_taken.load(Ordering::Relaxed) == 1
    })
    .await;
    let b = Relay::new(store.clone(), broker.clone()).with_config(cfg("b"));
    let b_stats = b.stats();
    let b_task = tokio::spawn(b.run(std::future::pending::<()>()));
    write_outbox(&store, &ch, 0, 50).await;
    wait_until(T, "first batch relayed by a", || async {
        store.outbox_len().await.unwrap() == 0
    })
    .await;
    assert_eq!(
        b_stats.published.load(Ordering::Relaxed),
        0,
        "b stands by while a lives"
    );

    // Kill a: no clean release; b must take over after the lease expires.
    a_task.abort();
    let killed_at = std::time::Instant::now();
    write_outbox(&store, &ch, 50, 100).await;
    wait_until(T, "b took over", || async {
        store.outbox_len().await.unwrap() == 0
    })
    .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(3),
        "takeover took {:?}",
        killed_at.elapsed()
    );
    assert_eq!(b_stats.leases_taken.load(Ordering::Relaxed), 1);
    let ids = published(&broker, &ch).await;
    assert_eq!(ids.len(), 100, "no loss, no duplicate on a clean hand-over");
    b_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_relay_cannot_delete() {
    let (_d, store, _broker, ch) = setup().await;
    write_outbox(&store, &ch, 0, 3).await;
    let g1 = store.relay_lease("old", 50).await.unwrap().unwrap();
    // The old holder stalls past its lease; a new relay takes over with a new generation.
    wait_until(T, "new relay takes the expired lease", || async {
        store.relay_lease("new", 5_000).await.unwrap().is_some()
    })
    .await;
    let seqs: Vec<i64> = store
        .outbox_peek(10, 1 << 20)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert!(
        !store.outbox_delete(&seqs, "old", g1).await.unwrap(),
        "stale generation must be refused"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 3);
    assert_eq!(
        store.relay_lease("old", 50).await.unwrap(),
        None,
        "live lease is not stolen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_outbox_row_stops_the_relay_loudly_instead_of_dropping_it() {
    let (_d, store, broker, ch) = setup().await;
    sqlx::query("INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at) VALUES ('not-a-uuid', 'orders', '{}', x'00', 0)")
        .execute(store.pool())
        .await
        .unwrap();
    let relay = Relay::new(store.clone(), broker.clone());
    let stats = relay.stats();
    let h = tokio::spawn(relay.run(std::future::pending::<()>()));
    wait_until(T, "row reported", || async {
        stats.unreadable.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert_eq!(store.outbox_len().await.unwrap(), 1, "never dropped");
    assert_eq!(broker.head(&ch).await.unwrap(), 0);
    assert!(broker.capabilities().partitions);
    h.abort();
}
