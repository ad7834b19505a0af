//! The conformance tests, one `pub async fn` each. Every test makes its own channels and
//! groups (unique names), so tests can share a broker; a test that does not fit the
//! backend's capabilities prints why and returns.

mod basics;
mod groups;

pub use basics::{
    bad_input, fan_out_to_groups, large_messages, many_channels, nack_with_delay, per_key_order,
    publish_confirms_and_positions, start_from_latest,
};
pub use groups::{
    acked_not_redelivered, competing_consumers, rebalance_on_join, rebalance_on_leave,
    redelivery_after_crash,
};

use crate::TransportFactory;
use crate::member::Journal;
use crate::support::{TIMEOUT, keyed};
use courier_core::{
    ChannelName, GroupName, Message, MessageId, Publisher, Receipt, SubscribeOptions, Subscriber,
    Subscription,
};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn skip(test: &str, reason: &str) {
    eprintln!("conformance: {test} skipped: {reason}");
}

async fn publisher(f: &dyn TransportFactory) -> Arc<dyn Publisher> {
    f.publisher()
        .await
        .unwrap_or_else(|e| panic!("the factory could not make a publisher: {e}"))
}

async fn subscriber(f: &dyn TransportFactory) -> Arc<dyn Subscriber> {
    f.subscriber()
        .await
        .unwrap_or_else(|e| panic!("the factory could not make a subscriber: {e}"))
}

async fn create_channel(f: &dyn TransportFactory, channel: &ChannelName, partitions: u32) {
    f.create_channel(channel, partitions)
        .await
        .unwrap_or_else(|e| {
            panic!("creating channel {channel} with {partitions} partitions failed: {e}")
        });
}

async fn subscribe(s: &dyn Subscriber, channel: &ChannelName, group: &GroupName) -> Subscription {
    s.subscribe(SubscribeOptions::new(channel.clone(), group.clone()))
        .await
        .unwrap_or_else(|e| panic!("subscribing group {group} to channel {channel} failed: {e}"))
}

async fn publish(p: &dyn Publisher, messages: &[Message]) -> Receipt {
    p.publish(messages)
        .await
        .unwrap_or_else(|e| panic!("publishing {} messages failed: {e}", messages.len()))
}

fn ids(messages: &[Message]) -> HashSet<MessageId> {
    messages.iter().map(|m| m.id).collect()
}

/// `per_key` messages for each of `keys` keys (`key-0`..), interleaved:
/// key-0:0, key-1:0, ..., key-0:1, ... — sequence numbers start at `from`.
fn interleaved(channel: &ChannelName, keys: usize, from: u64, per_key: u64) -> Vec<Message> {
    (from..from + per_key)
        .flat_map(|seq| (0..keys).map(move |k| (k, seq)))
        .map(|(k, seq)| keyed(channel, &format!("key-{k}"), seq))
        .collect()
}

/// Publish warm-up messages (fresh keys each round, so they spread over partitions)
/// until every member in `members` processed at least one of them: from then on, the
/// group's ownership is settled (every member owns its share). Warm-up messages use keys
/// starting with `warm-`; tests ignore them by asserting only on their own ids.
async fn settle(p: &dyn Publisher, channel: &ChannelName, journal: &Journal, members: &[&str]) {
    let started = Instant::now();
    let mut warm = HashSet::new();
    for round in 0u64.. {
        let batch: Vec<Message> = (0..16)
            .map(|i| keyed(channel, &format!("warm-{round}-{i}"), 0))
            .collect();
        publish(p, &batch).await;
        warm.extend(ids(&batch));
        let round_deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < round_deadline {
            if members.iter().all(|m| journal.count_by_among(m, &warm) > 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "the group never settled: after {TIMEOUT:?} of warm-up not every member of {members:?} \
             received a message (processed so far: {})",
            members
                .iter()
                .map(|m| format!("{m}={}", journal.count_by_among(m, &warm)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
