//! How Courier names map to JetStream names: streams, subjects, consumers, lease keys.
//!
//! Courier names may contain `.`, which NATS uses as a token separator (and forbids in
//! stream and consumer names), so they are escaped injectively: `_` becomes `__` and `.`
//! becomes `_d`; `-` and alphanumerics stay.

use courier_core::{ChannelName, GroupName};

/// Escape a Courier name into one NATS token (no `.`), injectively.
pub(crate) fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            c => out.push(c),
        }
    }
    out
}

/// The stream holding `channel`: `COURIER_<escaped channel>`.
pub(crate) fn stream(channel: &ChannelName) -> String {
    format!("COURIER_{}", token(channel.as_str()))
}

/// The subject of one partition of `channel`.
pub(crate) fn subject(channel: &ChannelName, partition: u32) -> String {
    format!("courier.{}.{partition}", token(channel.as_str()))
}

/// The subjects of all partitions of `channel` (the stream's one subject filter).
pub(crate) fn subjects(channel: &ChannelName) -> String {
    format!("courier.{}.*", token(channel.as_str()))
}

/// The partition a subject names (its last token).
pub(crate) fn partition_of(subject: &str) -> Option<u32> {
    subject.rsplit_once('.').and_then(|(_, p)| p.parse().ok())
}

/// The durable pull consumer of `group` for one partition.
pub(crate) fn consumer(group: &GroupName, partition: u32) -> String {
    format!("{}_p{partition}", token(group.as_str()))
}

/// The lease key of one partition of a group (value: the owner's member id).
pub(crate) fn lease_key(channel: &ChannelName, group: &GroupName, partition: u32) -> String {
    format!(
        "{}.{}.p{partition}",
        token(channel.as_str()),
        token(group.as_str())
    )
}

/// The liveness key of one member of a group.
pub(crate) fn member_key(channel: &ChannelName, group: &GroupName, member: &str) -> String {
    format!(
        "{}.{}.m.{member}",
        token(channel.as_str()),
        token(group.as_str())
    )
}

/// The subject filter matching every member key of a group in the leases bucket.
pub(crate) fn members_filter(bucket: &str, channel: &ChannelName, group: &GroupName) -> String {
    format!(
        "$KV.{bucket}.{}.{}.m.*",
        token(channel.as_str()),
        token(group.as_str())
    )
}

/// The partition count stored in a stream's description.
pub(crate) fn description(partitions: u32) -> String {
    format!("courier channel; partitions={partitions}")
}

/// Parse [`description`].
pub(crate) fn parse_description(description: &str) -> Option<u32> {
    description
        .split(';')
        .find_map(|part| part.trim().strip_prefix("partitions="))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_and_dot_free() {
        assert_eq!(token("a.b"), "a_db");
        assert_eq!(token("a_b"), "a__b");
        assert_ne!(token("a.d"), token("a_dd"));
        assert!(!token("x.y.z").contains('.'));
        let ch = ChannelName::new("orders.v1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stream(&ch), "COURIER_orders_dv1");
        assert_eq!(subject(&ch, 3), "courier.orders_dv1.3");
        assert_eq!(partition_of(&subject(&ch, 3)), Some(3));
    }

    #[test]
    fn description_round_trips() {
        assert_eq!(parse_description(&description(7)), Some(7));
        assert_eq!(parse_description("something else"), None);
    }
}
