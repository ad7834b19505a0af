//! How Courier names map to RabbitMQ queue names.
//!
//! Courier names use letters, digits, `.`, `-` and `_`; the separator `:` can appear in
//! none of them, so the mapping is injective: `courier:<channel>:...`. RabbitMQ limits
//! queue names to 255 bytes; longer combinations are refused with a clear error.

use courier_core::{ChannelName, Error, GroupName, Result};

/// RabbitMQ's limit on queue names.
const MAX_QUEUE_NAME: usize = 255;

fn checked(name: String) -> Result<String> {
    if name.len() > MAX_QUEUE_NAME {
        return Err(Error::invalid(format!(
            "the RabbitMQ queue name {name:?} would be {} bytes; RabbitMQ allows \
             {MAX_QUEUE_NAME}: use shorter channel or group names",
            name.len()
        )));
    }
    Ok(name)
}

/// The stream holding one partition of `channel`.
pub(crate) fn stream(channel: &ChannelName, partition: u32) -> String {
    format!("courier:{channel}:p{partition}")
}

/// The marker queue whose `x-max-length` argument is the channel's partition count.
pub(crate) fn meta(channel: &ChannelName) -> String {
    format!("courier:{channel}:meta")
}

/// The queue whose consumers are the live members of a group.
pub(crate) fn members(channel: &ChannelName, group: &GroupName) -> Result<String> {
    checked(format!("courier:{channel}:{group}:members"))
}

/// The exclusive queue that holds member slot `slot` of a group (a member's rank).
pub(crate) fn slot(channel: &ChannelName, group: &GroupName, slot: u32) -> Result<String> {
    checked(format!("courier:{channel}:{group}:slot{slot}"))
}

/// The exclusive queue whose owner owns partition `partition` of a group.
pub(crate) fn lock(channel: &ChannelName, group: &GroupName, partition: u32) -> Result<String> {
    checked(format!("courier:{channel}:{group}:p{partition}:lock"))
}

/// The queue holding the group's committed offset of one partition (its last message).
pub(crate) fn offset(channel: &ChannelName, group: &GroupName, partition: u32) -> Result<String> {
    checked(format!("courier:{channel}:{group}:p{partition}:offset"))
}

/// The queue nacked messages of a group come back to (competing members consume it).
pub(crate) fn retry(channel: &ChannelName, group: &GroupName) -> Result<String> {
    checked(format!("courier:{channel}:{group}:retry"))
}

/// The delay queue of one bucket: messages wait `bucket_ms` there, then move to
/// [`retry`] (RabbitMQ's queue TTL + dead-lettering).
pub(crate) fn delay(channel: &ChannelName, group: &GroupName, bucket_ms: u64) -> Result<String> {
    checked(format!("courier:{channel}:{group}:delay{bucket_ms}"))
}

/// The delay buckets: 100 ms doubling up to about 29 hours. A delay is rounded up to a
/// bucket, so a message never comes back early and at most twice as late (every
/// message of a bucket waits equally long, so a bucket's FIFO order is its expiry
/// order: no message waits behind a longer one).
pub(crate) const BUCKETS_MS: [u64; 21] = {
    let mut b = [0u64; 21];
    let mut i = 0;
    while i < 21 {
        b[i] = 100 << i;
        i += 1;
    }
    b
};

/// The bucket for `delay_ms` (`None`: no delay, straight to the retry queue).
pub(crate) fn bucket_for(delay_ms: u64) -> Option<u64> {
    if delay_ms == 0 {
        return None;
    }
    Some(
        BUCKETS_MS
            .iter()
            .copied()
            .find(|b| *b >= delay_ms)
            .unwrap_or(BUCKETS_MS[BUCKETS_MS.len() - 1]),
    )
}

/// Every queue of a group, given the partition count and the highest slot to consider.
pub(crate) fn group_queues(
    channel: &ChannelName,
    group: &GroupName,
    partitions: u32,
    slots: u32,
) -> Result<Vec<String>> {
    let mut out = vec![members(channel, group)?, retry(channel, group)?];
    for b in BUCKETS_MS {
        out.push(delay(channel, group, b)?);
    }
    for p in 0..partitions {
        out.push(lock(channel, group, p)?);
        out.push(offset(channel, group, p)?);
    }
    for s in 0..slots {
        out.push(slot(channel, group, s)?);
    }
    Ok(out)
}

/// The channel a partition stream belongs to and the partition, parsed back.
#[cfg(test)]
fn parse_stream(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix("courier:")?;
    let (channel, p) = rest.rsplit_once(":p")?;
    Some((channel, p.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    #[test]
    fn names_are_injective() {
        let g = GroupName::new("billing").unwrap();
        assert_eq!(stream(&ch("orders.v1"), 3), "courier:orders.v1:p3");
        assert_eq!(parse_stream(&stream(&ch("a.p1"), 2)), Some(("a.p1", 2)));
        assert_eq!(meta(&ch("orders")), "courier:orders:meta");
        assert_ne!(
            lock(&ch("a"), &g, 1).unwrap(),
            offset(&ch("a"), &g, 1).unwrap()
        );
        // Channel "a.b" + group "c" never collides with channel "a" + group "b.c".
        assert_ne!(
            members(&ch("a.b"), &GroupName::new("c").unwrap()).unwrap(),
            members(&ch("a"), &GroupName::new("b.c").unwrap()).unwrap()
        );
    }

    #[test]
    fn overlong_names_are_refused() {
        let long = "x".repeat(200);
        let e = lock(&ch(&long), &GroupName::new(&long).unwrap(), 0).unwrap_err();
        assert!(e.to_string().contains("255"), "{e}");
        assert_eq!(
            group_queues(&ch("a"), &GroupName::new("g").unwrap(), 2, 1)
                .unwrap()
                .len(),
            7 + BUCKETS_MS.len()
        );
    }

    #[test]
    fn delays_round_up_to_a_bucket() {
        assert_eq!(bucket_for(0), None);
        assert_eq!(bucket_for(1), Some(100));
        assert_eq!(bucket_for(200), Some(200));
        assert_eq!(bucket_for(201), Some(400));
        assert_eq!(bucket_for(u64::MAX), Some(100 << 20));
    }
}
