//! `describe`, `describe_group` and `tail` (what `courier channels` and `courier tail`
//! use) against the real server.

use crate::support::factory;
use courier_amqp::{AmqpTail, AmqpTailFrom, TailRead};
use courier_core::{ErrorKind, Message, Publisher, StartFrom, SubscribeOptions, Subscriber};
use courier_testkit::{TIMEOUT, assert_per_key_order, collect_acked, group, keyed, unique_channel};
use std::collections::HashSet;
use std::time::Duration;
use tokio::time::Instant;

/// Read exactly `n` messages from `tail` within [`TIMEOUT`].
async fn read(tail: &mut AmqpTail, n: usize) -> Vec<TailRead> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "the tail gave {} of {n} messages within {TIMEOUT:?}: {got:?}",
            got.len()
        );
        if let Some(r) = tail.next(Duration::from_millis(100)).await.unwrap() {
            got.push(r);
        }
    }
    got
}

fn messages(reads: &[TailRead]) -> Vec<Message> {
    reads
        .iter()
        .map(|(p, m)| match m {
            Ok(m) => m.clone(),
            Err(bad) => panic!("a malformed read at {p:?} (a marker not skipped?): {bad:?}"),
        })
        .collect()
}

/// Without a channel name, describe is a clear error; an unknown channel is an empty
/// list and is not created by describing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_needs_a_channel_name_and_creates_nothing() {
    let Some(f) = factory().await else { return };
    let e = f.transport.describe(None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("--channel"), "{e}");
    let ch = unique_channel("nothing");
    assert!(
        f.transport
            .describe(Some(ch.as_str()))
            .await
            .unwrap()
            .is_empty()
    );
    // Still absent: a second look would otherwise find the marker queue.
    assert!(
        f.transport
            .describe(Some(ch.as_str()))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        f.transport
            .describe_group(&ch, &group("none"))
            .await
            .unwrap()
            .is_none()
    );
}

/// Describe counts a channel's messages per partition; a tail from the beginning reads
/// them all in per-key order, skips the markers a new group writes, and a tail from the
/// end or after positions reads only what follows; a named group shows its members,
/// committed offsets and lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_and_tail_a_channel() {
    let Some(f) = factory().await else { return };
    let ch = unique_channel("admin");
    f.created.lock().unwrap().channels.insert(ch.clone());
    f.transport.create_channel(&ch, 3).await.unwrap();
    let first: Vec<Message> = (1..=2)
        .flat_map(|seq| ["a", "b", "c"].map(|k| keyed(&ch, k, seq)))
        .collect();
    f.transport.publish(&first).await.unwrap();

    let info = f.transport.describe(Some(ch.as_str())).await.unwrap();
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0].channel, ch.as_str());
    assert_eq!(info[0].partitions, 3);
    assert_eq!(info[0].messages, 6, "{info:?}");
    assert_eq!(info[0].partition_info.len(), 3);
    for p in &info[0].partition_info {
        // Offsets start at 0 in a fresh stream.
        assert_eq!(p.head, p.messages.saturating_sub(1), "{info:?}");
    }
    assert!(info[0].groups.is_empty());

    let mut tail = f.transport.tail(&ch, AmqpTailFrom::Earliest).await.unwrap();
    assert_eq!(tail.partitions(), 3);
    let reads = read(&mut tail, 6).await;
    let got = messages(&reads);
    assert_eq!(
        got.iter().map(|m| m.id).collect::<HashSet<_>>(),
        first.iter().map(|m| m.id).collect::<HashSet<_>>()
    );
    assert_per_key_order(&got);
    let mut after = vec![0u64; 3];
    for (p, _) in &reads {
        assert!(p.partition < 3, "{p:?}");
        after[p.partition as usize] = after[p.partition as usize].max(p.offset);
    }
    drop(tail);

    // A new group starts at the end: it writes a marker to each partition.
    let grp = group("admin");
    f.created
        .lock()
        .unwrap()
        .groups
        .insert((ch.clone(), grp.clone()));
    let member = courier_amqp::AmqpTransport::connect_with(f.config.clone())
        .await
        .unwrap();
    let mut sub = member
        .subscribe(SubscribeOptions::new(ch.clone(), grp.clone()).start(StartFrom::Latest))
        .await
        .unwrap();
    let latest = f.transport.tail(&ch, AmqpTailFrom::Latest).await.unwrap();
    let second: Vec<Message> = ["a", "b", "c"].map(|k| keyed(&ch, k, 3)).into();
    f.transport.publish(&second).await.unwrap();
    let acked = collect_acked(&mut sub, 3, TIMEOUT).await;
    assert_eq!(
        acked.iter().map(|m| m.id).collect::<HashSet<_>>(),
        second.iter().map(|m| m.id).collect::<HashSet<_>>()
    );

    let mut latest = latest;
    let got = messages(&read(&mut latest, 3).await);
    assert_eq!(
        got.iter().map(|m| m.id).collect::<HashSet<_>>(),
        second.iter().map(|m| m.id).collect::<HashSet<_>>(),
        "a tail from the end reads only what was published after it started"
    );
    let mut from_start = f.transport.tail(&ch, AmqpTailFrom::Earliest).await.unwrap();
    let all = messages(&read(&mut from_start, 9).await);
    assert_per_key_order(&all);
    let mut resumed = f
        .transport
        .tail(&ch, AmqpTailFrom::After(after))
        .await
        .unwrap();
    let got = messages(&read(&mut resumed, 3).await);
    assert_eq!(
        got.iter().map(|m| m.id).collect::<HashSet<_>>(),
        second.iter().map(|m| m.id).collect::<HashSet<_>>(),
        "a tail after positions reads what follows them"
    );

    // The group acknowledged everything: once its floors are committed, no lag.
    let deadline = Instant::now() + TIMEOUT;
    let g = loop {
        let g = f.transport.describe_group(&ch, &grp).await.unwrap();
        if let Some(g) = g.as_ref()
            && g.lag == 0
            && g.members == 1
            && g.partitions.iter().all(|p| p.owner.is_some())
        {
            break g.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the group did not show 0 lag, 1 member and owned partitions within {TIMEOUT:?}: {g:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(g.group, grp.as_str());
    assert_eq!(g.partitions.len(), 3);
    let info = f.transport.describe(Some(ch.as_str())).await.unwrap();
    // 9 messages and one start marker per partition.
    assert_eq!(info[0].messages, 12, "{info:?}");
    for (gp, p) in g.partitions.iter().zip(&info[0].partition_info) {
        assert_eq!(gp.committed, p.head, "{g:?} {info:?}");
    }
    drop(sub);
}
