//! Tests with one member per group: confirmation, order, fan-out, delays, bad input, sizes.

use super::{ids, interleaved, publish, publisher, skip, subscribe, subscriber};
use crate::TransportFactory;
use crate::support::{
    TIMEOUT, assert_per_key_order, collect, collect_acked, group, keyed, unique_channel,
};
use courier_core::{Message, Position, StartFrom, SubscribeOptions};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A batch is confirmed with one position per message (partitioned backends: one key
/// stays in one partition with increasing offsets), and a subscriber then gets every
/// message unchanged, at the confirmed position.
pub async fn publish_confirms_and_positions(f: &dyn TransportFactory) {
    let caps = f.capabilities();
    let p = publisher(f).await;
    let ch = unique_channel("confirms");

    let empty = p
        .publish(&[])
        .await
        .unwrap_or_else(|e| panic!("publishing an empty batch failed: {e}"));
    assert!(
        empty.positions.is_empty(),
        "an empty batch got positions: {empty:?}"
    );

    let sent: Vec<Message> = interleaved(&ch, 5, 0, 4);
    let receipt = publish(&*p, &sent).await;
    assert_eq!(
        receipt.durability, caps.durability,
        "the receipt promises other than the capabilities say"
    );
    assert_eq!(
        receipt.positions.len(),
        sent.len(),
        "a receipt must have one position per message: {receipt:?}"
    );
    let mut at: HashMap<_, Position> = HashMap::new();
    if caps.partitions {
        let mut last_per_key: HashMap<&str, Position> = HashMap::new();
        for (m, pos) in sent.iter().zip(&receipt.positions) {
            let pos = pos.unwrap_or_else(|| {
                panic!("partitioned backend gave no position for message {}", m.id)
            });
            let key = m.headers.partition_key().unwrap_or_default();
            if let Some(prev) = last_per_key.insert(key, pos) {
                assert_eq!(
                    prev.partition, pos.partition,
                    "key {key:?} landed in two partitions"
                );
                assert!(
                    pos.offset > prev.offset,
                    "key {key:?}: offsets not increasing: {prev:?} then {pos:?}"
                );
            }
            at.insert(m.id, pos);
        }
        let distinct: HashSet<_> = at.values().collect();
        assert_eq!(
            distinct.len(),
            sent.len(),
            "two messages got one position: {receipt:?}"
        );
    }

    let s = subscriber(f).await;
    let mut sub = subscribe(&*s, &ch, &group("confirms")).await;
    let by_id: HashMap<_, _> = sent.iter().map(|m| (m.id, m)).collect();
    let mut got = HashSet::new();
    for d in collect(&mut sub, sent.len(), TIMEOUT).await {
        assert_eq!(d.channel, ch, "delivery names the wrong channel");
        let m = d
            .message
            .as_ref()
            .unwrap_or_else(|bad| panic!("malformed delivery: {bad:?}"));
        let original = by_id
            .get(&m.id)
            .unwrap_or_else(|| panic!("received message {} that was never published", m.id));
        assert_eq!(m, *original, "the message changed on its way");
        assert_eq!(
            d.redeliveries, 0,
            "first delivery of {} counts redeliveries",
            m.id
        );
        if let Some(pos) = at.get(&m.id) {
            assert_eq!(
                d.position,
                Some(*pos),
                "message {} delivered at another position than confirmed",
                m.id
            );
        }
        assert!(got.insert(m.id), "message {} delivered twice", m.id);
        let id = m.id;
        d.ack()
            .await
            .unwrap_or_else(|e| panic!("ack of {id} failed: {e}"));
    }
    assert_eq!(got, ids(&sent));
}

/// ~500 messages over 10 interleaved keys reach one member once each, in order per key.
pub async fn per_key_order(f: &dyn TransportFactory) {
    let caps = f.capabilities();
    let p = publisher(f).await;
    let ch = unique_channel("order");
    let sent = interleaved(&ch, 10, 0, 50);
    for batch in sent.chunks(100) {
        publish(&*p, batch).await;
    }
    let s = subscriber(f).await;
    let mut sub = subscribe(&*s, &ch, &group("order")).await;
    let got = collect_acked(&mut sub, sent.len(), TIMEOUT).await;
    let distinct = ids(&got);
    assert_eq!(
        distinct.len(),
        got.len(),
        "a lone member that acks everything got duplicates"
    );
    assert_eq!(
        distinct,
        ids(&sent),
        "received other messages than published"
    );
    if caps.ordered_per_key {
        assert_per_key_order(&got);
    } else {
        skip(
            "per_key_order (order check)",
            "the backend does not promise order per key",
        );
    }
}

/// Two groups on one channel each receive every message (one subscribed before the
/// publish, one after).
pub async fn fan_out_to_groups(f: &dyn TransportFactory) {
    if !f.capabilities().consumer_groups {
        return skip("fan_out_to_groups", "the backend has no consumer groups");
    }
    let p = publisher(f).await;
    let ch = unique_channel("fanout");
    let (s1, s2) = (subscriber(f).await, subscriber(f).await);
    let mut early = subscribe(&*s1, &ch, &group("fanout-early")).await;
    let sent = interleaved(&ch, 5, 0, 6);
    publish(&*p, &sent).await;
    let mut late = subscribe(&*s2, &ch, &group("fanout-late")).await;
    let a = collect_acked(&mut early, sent.len(), TIMEOUT).await;
    let b = collect_acked(&mut late, sent.len(), TIMEOUT).await;
    assert_eq!(
        ids(&a),
        ids(&sent),
        "the group subscribed before the publish missed messages"
    );
    assert_eq!(
        ids(&b),
        ids(&sent),
        "the group subscribed after the publish missed messages"
    );
}

/// A nacked message comes back after its delay (not before), counted as a redelivery,
/// while messages with other keys keep flowing.
pub async fn nack_with_delay(f: &dyn TransportFactory) {
    if !f.capabilities().delayed_redelivery {
        return skip("nack_with_delay", "the backend has no delayed redelivery");
    }
    const DELAY: Duration = Duration::from_millis(200);
    let p = publisher(f).await;
    let s = subscriber(f).await;
    let ch = unique_channel("nack");
    let mut sub = subscribe(&*s, &ch, &group("nack")).await;
    let slow = keyed(&ch, "slow", 0);
    publish(&*p, std::slice::from_ref(&slow)).await;
    let first = collect(&mut sub, 1, TIMEOUT).await.remove(0);
    assert_eq!(first.message.as_ref().ok().map(|m| m.id), Some(slow.id));
    let nacked_at = Instant::now();
    first
        .nack(DELAY)
        .await
        .unwrap_or_else(|e| panic!("nack failed: {e}"));

    let others: Vec<Message> = (0..5)
        .map(|i| keyed(&ch, &format!("fast-{i}"), 0))
        .collect();
    publish(&*p, &others).await;
    let mut before = HashSet::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let again = loop {
        let d = match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(d)) => d,
            Ok(None) => panic!("subscription ended while waiting for the nacked message"),
            Err(_) => panic!("the nacked message did not come back within {TIMEOUT:?}"),
        };
        let m = d
            .message
            .as_ref()
            .unwrap_or_else(|bad| panic!("malformed delivery {bad:?}"))
            .clone();
        if m.id == slow.id {
            break (d, nacked_at.elapsed());
        }
        before.insert(m.id);
        d.ack().await.unwrap_or_else(|e| panic!("ack failed: {e}"));
    };
    let (d, elapsed) = again;
    assert!(
        d.redeliveries >= 1,
        "a redelivered message has redeliveries = {}",
        d.redeliveries
    );
    assert!(
        elapsed >= DELAY.mul_f32(0.75),
        "nacked with a {DELAY:?} delay, it came back after only {elapsed:?}"
    );
    assert_eq!(
        before,
        ids(&others),
        "messages with other keys must flow while one message waits for its retry"
    );
    d.ack().await.unwrap_or_else(|e| panic!("ack failed: {e}"));
}

/// Publishing refuses a message without destination and an oversized one, permanently
/// and with an actionable reason, and stores neither; unknown headers round-trip as is.
pub async fn bad_input(f: &dyn TransportFactory) {
    let caps = f.capabilities();
    let p = publisher(f).await;
    let ch = unique_channel("bad");

    let nowhere = Message::new("lost");
    let e = p
        .publish(&[nowhere])
        .await
        .err()
        .unwrap_or_else(|| panic!("a message without a destination header was accepted"));
    assert!(
        e.to_string().contains("destination"),
        "error does not name the destination header: {e}"
    );
    assert!(
        !e.is_retryable(),
        "a missing destination must be a permanent error: {e:?}"
    );

    let limit = caps.max_message_bytes;
    let big = keyed(&ch, "k", 0);
    let big = Message {
        payload: vec![b'x'; limit + 1].into(),
        ..big
    };
    let e = p
        .publish(&[big])
        .await
        .err()
        .unwrap_or_else(|| panic!("a message above max_message_bytes ({limit}) was accepted"));
    assert!(
        e.to_string().contains(&limit.to_string()),
        "error does not mention the limit {limit}: {e}"
    );
    assert!(
        !e.is_retryable(),
        "an oversized message must be a permanent error: {e:?}"
    );

    let custom = keyed(&ch, "k", 1)
        .with_header("x-tenant", "acme")
        .and_then(|m| {
            m.with_header(
                "x.note_2",
                "a value: with / punctuation, spaces and ünïcödé",
            )
        })
        .unwrap_or_else(|e| panic!("valid custom headers refused: {e}"));
    publish(&*p, std::slice::from_ref(&custom)).await;
    let s = subscriber(f).await;
    let mut sub = subscribe(&*s, &ch, &group("bad")).await;
    // Same key as the refused message: had it been stored, it would come first.
    let got = collect_acked(&mut sub, 1, TIMEOUT).await.remove(0);
    assert_eq!(got.id, custom.id, "a refused message was stored");
    assert_eq!(
        got.headers, custom.headers,
        "headers did not round-trip unchanged"
    );
    assert_eq!(got.payload, custom.payload);
}

/// 20 channels with 10 messages each, published in one mixed batch: each channel's
/// subscription gets exactly its own messages.
pub async fn many_channels(f: &dyn TransportFactory) {
    let p = publisher(f).await;
    let s = subscriber(f).await;
    let grp = group("many");
    let channels: Vec<_> = (0..20)
        .map(|i| unique_channel(&format!("many{i}")))
        .collect();
    let mut subs = Vec::new();
    for ch in &channels {
        subs.push(super::subscribe(&*s, ch, &grp).await);
    }
    let per_channel: Vec<Vec<Message>> =
        channels.iter().map(|ch| interleaved(ch, 2, 0, 5)).collect();
    let mixed: Vec<Message> = (0..10)
        .flat_map(|i| per_channel.iter().map(move |msgs| msgs[i].clone()))
        .collect();
    publish(&*p, &mixed).await;
    for ((ch, sub), sent) in channels.iter().zip(&mut subs).zip(&per_channel) {
        let got = collect_acked(sub, sent.len(), TIMEOUT).await;
        assert_eq!(
            ids(&got),
            ids(sent),
            "channel {ch} got other messages than its own"
        );
    }
}

/// A message just under the size limit round-trips byte for byte.
pub async fn large_messages(f: &dyn TransportFactory) {
    let limit = f.capabilities().max_message_bytes;
    let p = publisher(f).await;
    let ch = unique_channel("large");
    let len = limit.saturating_sub(1024);
    // Pseudo-random bytes (xorshift): no compressible pattern, no external generator.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let payload: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let sent = Message {
        payload: payload.into(),
        ..keyed(&ch, "big", 0)
    };
    publish(&*p, std::slice::from_ref(&sent)).await;
    let s = subscriber(f).await;
    let mut sub = subscribe(&*s, &ch, &group("large")).await;
    let got = collect_acked(&mut sub, 1, TIMEOUT).await.remove(0);
    assert_eq!(got.id, sent.id);
    assert_eq!(got.headers, sent.headers);
    assert_eq!(
        got.payload.len(),
        sent.payload.len(),
        "payload length changed"
    );
    assert!(
        got.payload == sent.payload,
        "payload of {len} bytes changed on its way"
    );
}

/// A new group that starts from the latest message sees only what is published after it
/// subscribed.
pub async fn start_from_latest(f: &dyn TransportFactory) {
    let p = publisher(f).await;
    let s = subscriber(f).await;
    let ch = unique_channel("latest");
    // One key: had the old messages been delivered, they would come first.
    let old: Vec<Message> = (0..5).map(|i| keyed(&ch, "k", i)).collect();
    publish(&*p, &old).await;
    let options = SubscribeOptions::new(ch.clone(), group("latest")).start(StartFrom::Latest);
    let mut sub = s
        .subscribe(options)
        .await
        .unwrap_or_else(|e| panic!("subscribing from the latest message failed: {e}"));
    let new: Vec<Message> = (5..10).map(|i| keyed(&ch, "k", i)).collect();
    publish(&*p, &new).await;
    let got = collect_acked(&mut sub, new.len(), TIMEOUT).await;
    assert_eq!(
        ids(&got),
        ids(&new),
        "a group starting at the latest message got older ones"
    );
}
