//! Helpers: unique names, keyed messages, waiting for conditions with a deadline.

use courier_core::{ChannelName, Delivery, GroupName, Message, Subscription};
use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

/// The deadline the suite gives any single condition: generous, since a correct backend
/// meets it in a fraction of it.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`wait_until`] re-checks its condition.
const POLL: Duration = Duration::from_millis(5);

/// `prefix` followed by a fresh UUIDv7 (simple form): unique across tests sharing a broker.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A unique channel name starting with `prefix`.
pub fn unique_channel(prefix: &str) -> ChannelName {
    ChannelName::new(unique(prefix))
        .unwrap_or_else(|e| panic!("bad channel prefix {prefix:?}: {e}"))
}

/// A unique consumer group name starting with `prefix`.
pub fn group(prefix: &str) -> GroupName {
    GroupName::new(unique(prefix)).unwrap_or_else(|e| panic!("bad group prefix {prefix:?}: {e}"))
}

/// A message to `channel` with partition key `key` and payload `"{key}:{seq}"`.
pub fn keyed(channel: &ChannelName, key: &str, seq: u64) -> Message {
    Message::new(format!("{key}:{seq}"))
        .to(channel.clone())
        .with_key(key)
        .unwrap_or_else(|e| panic!("bad partition key {key:?}: {e}"))
}

/// The key and sequence number of a message made by [`keyed`].
pub fn parse_keyed(message: &Message) -> (String, u64) {
    let text = std::str::from_utf8(&message.payload)
        .unwrap_or_else(|_| panic!("message {} has a non-UTF-8 payload", message.id));
    let (key, seq) = text
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("message {} payload {text:?} is not KEY:SEQ", message.id));
    let seq = seq
        .parse()
        .unwrap_or_else(|_| panic!("message {} payload {text:?} is not KEY:SEQ", message.id));
    (key.to_owned(), seq)
}

/// Wait until `condition` holds, checking every few milliseconds; panics with `what` when
/// it still does not hold after `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return;
        }
        if started.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Receive exactly `n` deliveries from `subscription` within `timeout`, without settling
/// them. Panics when they do not all arrive in time or the subscription ends.
pub async fn collect(
    subscription: &mut Subscription,
    n: usize,
    timeout: Duration,
) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(d)) => got.push(d),
            Ok(None) => panic!("subscription ended after {} of {n} deliveries", got.len()),
            Err(_) => panic!(
                "received {} of {n} deliveries within {timeout:?}",
                got.len()
            ),
        }
    }
    got
}

/// Receive exactly `n` deliveries within `timeout`, acknowledging each as it arrives
/// (so backends with a small unacknowledged window keep delivering). Panics on a
/// malformed delivery, a failed ack, or a timeout.
pub async fn collect_acked(
    subscription: &mut Subscription,
    n: usize,
    timeout: Duration,
) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let d = match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(d)) => d,
            Ok(None) => panic!("subscription ended after {} of {n} deliveries", got.len()),
            Err(_) => panic!(
                "received {} of {n} deliveries within {timeout:?}",
                got.len()
            ),
        };
        let message = match &d.message {
            Ok(m) => m.clone(),
            Err(bad) => panic!("unexpected malformed delivery: {bad:?}"),
        };
        d.ack()
            .await
            .unwrap_or_else(|e| panic!("ack of message {} failed: {e}", message.id));
        got.push(message);
    }
    got
}

/// Assert that, per key, the sequence numbers (see [`keyed`]) of `messages` — in the
/// order they were processed, duplicates already removed — strictly increase.
pub fn assert_per_key_order<'a>(messages: impl IntoIterator<Item = &'a Message>) {
    let mut last: HashMap<String, u64> = HashMap::new();
    for m in messages {
        let (key, seq) = parse_keyed(m);
        if let Some(prev) = last.get(&key) {
            assert!(
                seq > *prev,
                "key {key:?}: message #{seq} was processed after #{prev} (out of order)"
            );
        }
        last.insert(key, seq);
    }
}
