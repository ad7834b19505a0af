//! The relay scenarios: each a `pub async fn` generic over an [`OutboxFactory`].

use super::{FailingPublisher, OutboxFactory, RunningRelay};
use crate::support::{TIMEOUT, unique_channel, wait_until};
use courier_core::{ChannelName, Message, OutboxSource, RelayConfig};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `n` messages to `channel`, keyed by `i % 3`, payload `"{tag}{i}"`.
fn messages(channel: &ChannelName, tag: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::new(format!("{tag}{i}"))
                .to(channel.clone())
                .with_key(format!("k{}", i % 3))
                .unwrap_or_else(|e| panic!("bad key: {e}"))
        })
        .collect()
}

fn ids(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|m| m.id.to_string()).collect()
}

async fn arrived_ids<F: OutboxFactory>(f: &F, channel: &ChannelName) -> Vec<String> {
    ids(&f
        .arrived(channel)
        .await
        .unwrap_or_else(|e| panic!("reading the destination: {e}")))
}

async fn outbox_len<F: OutboxFactory>(f: &F) -> u64 {
    f.outbox_len()
        .await
        .unwrap_or_else(|e| panic!("counting the outbox: {e}"))
}

async fn commit<F: OutboxFactory>(f: &F, messages: &[Message]) {
    f.commit(messages)
        .await
        .unwrap_or_else(|e| panic!("committing to the outbox: {e}"));
}

async fn source<F: OutboxFactory>(f: &F) -> F::Source {
    f.source()
        .await
        .unwrap_or_else(|e| panic!("opening the outbox source: {e}"))
}

fn config(instance: &str, lease: Duration) -> RelayConfig {
    RelayConfig::default()
        .lease_ttl(lease)
        .instance(crate::unique(instance))
}

/// Wait until `channel` holds exactly the messages `expected`, in that order.
async fn wait_arrived_in_order<F: OutboxFactory>(
    f: &F,
    channel: &ChannelName,
    expected: &[String],
) {
    wait_until(TIMEOUT, "every message arrived", || async {
        arrived_ids(f, channel).await.len() >= expected.len()
    })
    .await;
    assert_eq!(
        arrived_ids(f, channel).await,
        expected,
        "the destination has every message once, in commit order"
    );
}

/// Messages committed in transactions of different sizes arrive once each, in commit
/// order; the outbox is emptied; a clean stop releases the lease.
pub async fn order_kept_nothing_lost<F: OutboxFactory>(f: &F) {
    let ch = unique_channel("relay-order");
    let all = messages(&ch, "m", 200);
    let src = source(f).await;
    for chunk in all.chunks(17) {
        commit(f, chunk).await;
    }
    let relay = RunningRelay::start(
        src.clone(),
        f.publisher(),
        config("order", Duration::from_secs(3)),
    );
    wait_arrived_in_order(f, &ch, &ids(&all)).await;
    wait_until(TIMEOUT, "outbox empty", || async {
        outbox_len(f).await == 0
    })
    .await;
    wait_until(TIMEOUT, "200 counted as published", || async {
        relay.stats.published.load(Ordering::Relaxed) == 200
    })
    .await;
    relay.stop().await;
    let next = crate::unique("next");
    assert!(
        src.relay_lease(&next, 1_000)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some(),
        "a clean stop gives the lease up at once"
    );
    src.relay_release(&next)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(arrived_ids(f, &ch).await.len(), 200, "nothing more arrived");
}

/// Batches are bounded by count: a transaction larger than a batch is split, in order,
/// without loss or duplicates.
pub async fn small_batches_split_large_transactions<F: OutboxFactory>(f: &F) {
    let ch = unique_channel("relay-batches");
    let all = messages(&ch, "b", 100);
    let src = source(f).await;
    commit(f, &all[..3]).await;
    commit(f, &all[3..40]).await;
    commit(f, &all[40..41]).await;
    commit(f, &all[41..100]).await;
    let relay = RunningRelay::start(
        src,
        f.publisher(),
        config("batches", Duration::from_secs(3)).batch_size(7),
    );
    wait_arrived_in_order(f, &ch, &ids(&all)).await;
    wait_until(TIMEOUT, "outbox empty", || async {
        outbox_len(f).await == 0
    })
    .await;
    wait_until(
        TIMEOUT,
        "100 rows counted in batches of at most 7",
        || async {
            relay.stats.published.load(Ordering::Relaxed) == 100
                && relay.stats.batches.load(Ordering::Relaxed) >= 15
        },
    )
    .await;
    relay.stop().await;
}

/// An idle relay publishes rows committed while it runs promptly (woken by the
/// backend's signal, well before a slow poll).
pub async fn rows_committed_while_running_are_picked_up<F: OutboxFactory>(f: &F) {
    let ch = unique_channel("relay-live");
    let src = source(f).await;
    let mut cfg = config("live", Duration::from_secs(30));
    cfg.poll_interval = Duration::from_secs(2);
    let relay = RunningRelay::start(src, f.publisher(), cfg);
    wait_until(TIMEOUT, "relay active", || async {
        relay.stats.leases_taken.load(Ordering::Relaxed) == 1
    })
    .await;
    let mut expected = Vec::new();
    for (round, n) in [1usize, 3, 1].into_iter().enumerate() {
        let batch = messages(&ch, &format!("r{round}-"), n);
        let t0 = Instant::now();
        commit(f, &batch).await;
        expected.extend(ids(&batch));
        wait_until(TIMEOUT, "committed rows published", || async {
            arrived_ids(f, &ch).await.len() == expected.len()
        })
        .await;
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "round {round} took {:?}",
            t0.elapsed()
        );
    }
    assert_eq!(arrived_ids(f, &ch).await, expected);
    relay.stop().await;
}

/// While the broker fails, nothing is deleted and nothing is lost; once it is back the
/// relay retries and every row arrives once, in order.
pub async fn delete_only_after_confirmed_publish<F: OutboxFactory>(f: &F) {
    let ch = unique_channel("relay-confirm");
    let all = messages(&ch, "c", 5);
    let src = source(f).await;
    let publisher = FailingPublisher::new(f.publisher());
    publisher.set_failing(true);
    commit(f, &all).await;
    let relay = RunningRelay::start(
        src,
        publisher.clone(),
        config("confirm", Duration::from_secs(3)),
    );
    wait_until(TIMEOUT, "publish attempted and failed twice", || async {
        publisher.attempts() >= 2
    })
    .await;
    assert_eq!(
        outbox_len(f).await,
        5,
        "no row deleted without a confirmation"
    );
    assert!(arrived_ids(f, &ch).await.is_empty());
    assert_eq!(relay.stats.published.load(Ordering::Relaxed), 0);
    publisher.set_failing(false);
    wait_arrived_in_order(f, &ch, &ids(&all)).await;
    wait_until(TIMEOUT, "outbox empty", || async {
        outbox_len(f).await == 0
    })
    .await;
    relay.stop().await;
}

/// One relay is active per outbox; a standby takes over after the active one dies
/// without releasing its lease; nothing is lost (duplicates may only repeat an id).
pub async fn standby_takes_over<F: OutboxFactory>(f: &F) {
    let ch = unique_channel("relay-standby");
    let lease = Duration::from_millis(400);
    let a = RunningRelay::start(source(f).await, f.publisher(), config("a", lease));
    wait_until(TIMEOUT, "a active", || async {
        a.stats.leases_taken.load(Ordering::Relaxed) == 1
    })
    .await;
    let b = RunningRelay::start(source(f).await, f.publisher(), config("b", lease));
    let first = messages(&ch, "first", 50);
    commit(f, &first).await;
    wait_arrived_in_order(f, &ch, &ids(&first)).await;
    assert_eq!(
        b.stats.published.load(Ordering::Relaxed),
        0,
        "b stands by while a lives"
    );
    assert_eq!(b.stats.leases_taken.load(Ordering::Relaxed), 0);

    a.kill();
    let killed_at = Instant::now();
    let second = messages(&ch, "second", 50);
    commit(f, &second).await;
    let sent: HashSet<String> = ids(&first).into_iter().chain(ids(&second)).collect();
    wait_until(TIMEOUT, "b took over and published the rest", || async {
        arrived_ids(f, &ch)
            .await
            .into_iter()
            .collect::<HashSet<_>>()
            == sent
    })
    .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(5),
        "take-over took {:?}",
        killed_at.elapsed()
    );
    assert_eq!(b.stats.leases_taken.load(Ordering::Relaxed), 1);
    wait_until(TIMEOUT, "b counted what it published", || async {
        b.stats.published.load(Ordering::Relaxed) >= 50
    })
    .await;
    wait_until(TIMEOUT, "outbox empty", || async {
        outbox_len(f).await == 0
    })
    .await;
    b.stop().await;
}

/// Peek (up to 10 rows) until at least `n` are there, or the deadline passes: a streaming
/// source may hand out a transaction's first rows before the rest have arrived (all of
/// them committed).
async fn peek_at_least<S: OutboxSource>(src: &S, n: usize) -> Vec<courier_core::OutboxRow> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let peeked = src
            .outbox_peek(10, 1 << 20)
            .await
            .unwrap_or_else(|e| panic!("peek: {e}"));
        if peeked.len() >= n || Instant::now() > deadline {
            return peeked;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A relay whose lease was taken over can neither delete nor move the outbox on: the new
/// holder still reads every row. A live lease is not stolen; renewing keeps the
/// generation; the byte bound still returns one row.
pub async fn fenced_relay_cannot_confirm<F: OutboxFactory>(f: &F) {
    let ch = unique_channel("relay-fenced");
    let old_src = source(f).await;
    let new_src = source(f).await;
    let all = messages(&ch, "f", 3);
    commit(f, &all).await;
    let (old, new) = (crate::unique("old"), crate::unique("new"));
    let ok = |r: courier_core::Result<Option<i64>>| r.unwrap_or_else(|e| panic!("lease: {e}"));
    let g1 =
        ok(old_src.relay_lease(&old, 100).await).unwrap_or_else(|| panic!("a free lease is taken"));
    assert_eq!(
        ok(old_src.relay_lease(&old, 100).await),
        Some(g1),
        "renewing keeps it"
    );
    let peeked = peek_at_least(&old_src, 3).await;
    let seqs: Vec<i64> = peeked.iter().map(|r| r.seq).collect();
    assert_eq!(seqs.len(), 3);
    assert_eq!(
        peeked
            .iter()
            .map(|r| r
                .message
                .as_ref()
                .map(|m| m.id.to_string())
                .unwrap_or_default())
            .collect::<Vec<_>>(),
        ids(&all)
    );

    // The old holder stalls past its lease; the new one takes over with a new generation.
    let deadline = Instant::now() + TIMEOUT;
    let g2 = loop {
        if let Some(g) = ok(new_src.relay_lease(&new, 10_000).await) {
            break g;
        }
        assert!(
            Instant::now() < deadline,
            "the new relay never took the expired lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(g2 > g1, "a take-over bumps the generation");
    assert!(
        !old_src
            .outbox_delete(&seqs, &old, g1)
            .await
            .unwrap_or_else(|e| panic!("delete: {e}")),
        "a stale generation must be refused"
    );
    assert_eq!(
        outbox_len(f).await,
        3,
        "nothing deleted by the fenced relay"
    );
    assert_eq!(
        ok(old_src.relay_lease(&old, 100).await),
        None,
        "a live lease is not stolen"
    );

    let seen = peek_at_least(&new_src, 3).await;
    assert_eq!(
        seen.iter().map(|r| r.seq).collect::<Vec<_>>(),
        seqs,
        "the new holder still reads every row"
    );
    assert_eq!(
        new_src
            .outbox_peek(10, 0)
            .await
            .unwrap_or_else(|e| panic!("peek: {e}"))
            .len(),
        1,
        "the byte bound returns at least one row"
    );
    let seen = peek_at_least(&new_src, 3).await;
    assert_eq!(seen.len(), 3);
    assert!(
        new_src
            .outbox_delete(&seqs, &new, g2)
            .await
            .unwrap_or_else(|e| panic!("delete: {e}"))
    );
    assert_eq!(outbox_len(f).await, 0);
    assert!(
        new_src
            .outbox_delete(&seqs, &new, g2)
            .await
            .unwrap_or_else(|e| panic!("delete: {e}")),
        "rows already gone are not a lost lease"
    );
    assert!(
        new_src
            .outbox_peek(10, 1 << 20)
            .await
            .unwrap_or_else(|e| panic!("peek: {e}"))
            .is_empty(),
        "confirmed rows do not come back"
    );
    new_src
        .relay_release(&new)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A row whose transaction took the lower sequence but commits later is still published
/// (never a high-water mark). Skipped where writers are serialised.
pub async fn late_commit_of_a_lower_sequence<F: OutboxFactory>(f: &F) {
    let ch = unique_channel("relay-late");
    let src = source(f).await;
    let a = messages(&ch, "a", 1);
    let b = messages(&ch, "b", 1);
    let Some(tx_a) = f
        .begin_open(&a)
        .await
        .unwrap_or_else(|e| panic!("opening a transaction: {e}"))
    else {
        eprintln!("relay: late_commit_of_a_lower_sequence does not apply (serialised writers)");
        return;
    };
    commit(f, &b).await;
    let relay = RunningRelay::start(src, f.publisher(), config("late", Duration::from_secs(3)));
    wait_arrived_in_order(f, &ch, &ids(&b)).await;
    tx_a.commit()
        .await
        .unwrap_or_else(|e| panic!("commit: {e}"));
    let expected: Vec<String> = ids(&b).into_iter().chain(ids(&a)).collect();
    wait_arrived_in_order(f, &ch, &expected).await;
    wait_until(TIMEOUT, "outbox empty", || async {
        outbox_len(f).await == 0
    })
    .await;
    relay.stop().await;
}

/// A row that cannot be read as a message is never dropped nor skipped: the rows before
/// it are published, then the relay stops there, loudly (counted), keeping it and what
/// follows.
pub async fn unreadable_row_stops_the_relay_loudly<F: OutboxFactory>(f: &F) {
    let ch = unique_channel("relay-unreadable");
    let src = source(f).await;
    let before = messages(&ch, "before", 2);
    let after = messages(&ch, "after", 1);
    commit(f, &before).await;
    f.commit_unreadable(&ch)
        .await
        .unwrap_or_else(|e| panic!("writing a bad row: {e}"));
    commit(f, &after).await;
    let relay = RunningRelay::start(src, f.publisher(), config("bad", Duration::from_secs(3)));
    wait_arrived_in_order(f, &ch, &ids(&before)).await;
    wait_until(
        TIMEOUT,
        "bad row reported, the rows before it deleted",
        || async {
            relay.stats.unreadable.load(Ordering::Relaxed) >= 2 && outbox_len(f).await == 2
        },
    )
    .await;
    let reported = relay.stats.unreadable.load(Ordering::Relaxed);
    wait_until(TIMEOUT, "bad row reported again (retried)", || async {
        relay.stats.unreadable.load(Ordering::Relaxed) > reported
    })
    .await;
    assert_eq!(
        outbox_len(f).await,
        2,
        "the bad row and the one after it stay"
    );
    assert_eq!(arrived_ids(f, &ch).await, ids(&before), "nothing after it");
    relay.stop().await;
}
