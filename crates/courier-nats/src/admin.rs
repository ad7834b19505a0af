//! What operators and `courier channels` / `courier tail` read of a NATS broker without
//! joining a group: channels (Courier's streams), partitions, groups (durable consumers),
//! members and owners (the leases bucket), lag, and a group-less follower of a channel.

use crate::{NatsTransport, codec, error, names};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use courier_core::admin::{ChannelInfo, GroupInfo, GroupPartition, PartitionInfo};
use courier_core::{ChannelName, Malformed, Message, Position, Result};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::time::Duration;

/// The inverse of [`names::token`]: a stream or consumer name part back to a Courier name.
fn untoken(token: &str) -> String {
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        match (c, c == '_') {
            (_, true) => match chars.next() {
                Some('_') => out.push('_'),
                Some('d') => out.push('.'),
                Some(other) => {
                    out.push('_');
                    out.push(other);
                }
                None => out.push('_'),
            },
            (c, false) => out.push(c),
        }
    }
    out
}

/// Where a [`NatsTail`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailFrom {
    /// Only messages published from now on.
    Latest,
    /// The oldest retained message.
    Earliest,
    /// The first message after this position (a stream sequence, as in [`Position::offset`]).
    After(u64),
}

/// Follows a channel without joining a group (an ordered, ephemeral consumer): no
/// offsets change and no partitions are taken from members. Made by
/// [`NatsTransport::tail`].
pub struct NatsTail {
    channel: ChannelName,
    messages: pull::Ordered,
}

impl std::fmt::Debug for NatsTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTail")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl NatsTail {
    /// The next message, or `None` if none arrived within `wait`.
    pub async fn next(
        &mut self,
        wait: Duration,
    ) -> Result<Option<(Position, std::result::Result<Message, Malformed>)>> {
        let item = match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) | Ok(None) => return Ok(None),
            Ok(Some(item)) => item,
        };
        let m = item.map_err(|e| {
            error::map_boxed(format!("following channel {}", self.channel), e.into())
        })?;
        let offset = m.info().map(|i| i.stream_sequence).unwrap_or_default();
        let position = Position {
            partition: names::partition_of(&m.subject).unwrap_or(0),
            offset,
        };
        let message = codec::decode(m.headers.as_ref(), m.payload.clone());
        Ok(Some((position, message)))
    }
}

impl NatsTransport {
    /// Follow `channel` from `from` without joining a group (what `courier tail` does).
    pub async fn tail(&self, channel: &ChannelName, from: TailFrom) -> Result<NatsTail> {
        let partitions = self.partitions(channel).await?;
        let (stream, _) = self.stream(channel, partitions).await?;
        let deliver_policy = match from {
            TailFrom::Latest => DeliverPolicy::New,
            TailFrom::Earliest => DeliverPolicy::All,
            TailFrom::After(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
        };
        let what = || format!("following channel {channel}");
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: names::subjects(channel),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| error::map(what(), e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| error::map(what(), e))?;
        Ok(NatsTail {
            channel: channel.clone(),
            messages,
        })
    }

    /// Describe every Courier channel on the server (or only `only`): partitions and
    /// their messages, and per consumer group its live members, committed positions (ack
    /// floors), owners and lag (messages not yet acknowledged).
    pub async fn describe(&self, only: Option<&str>) -> Result<Vec<ChannelInfo>> {
        let js = &self.inner.js;
        let mut names_stream = js.stream_names();
        let mut channels = Vec::new();
        while let Some(name) = names_stream.next().await {
            let name = name.map_err(|e| error::map("listing streams", e))?;
            let Some(token) = name.strip_prefix("COURIER_") else {
                continue;
            };
            let Ok(channel) = ChannelName::new(untoken(token)) else {
                continue;
            };
            if only.is_some_and(|o| o != channel.as_str()) || names::stream(&channel) != name {
                continue;
            }
            channels.push(channel);
        }
        channels.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut out = Vec::new();
        for channel in channels {
            match self.describe_channel(&channel).await {
                Ok(Some(info)) => out.push(info),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// How many members of `group` renewed their membership within the session timeout
    /// (0 when it cannot be read).
    async fn live_members(&self, channel: &ChannelName, group: &courier_core::GroupName) -> u64 {
        let bucket = &self.inner.config.leases_bucket;
        let Ok(stream) = self.inner.js.get_stream(format!("KV_{bucket}")).await else {
            return 0;
        };
        let Ok(mut subjects) = stream
            .info_with_subjects(names::members_filter(bucket, channel, group))
            .await
        else {
            return 0;
        };
        let mut n = 0;
        while let Some(Ok(_)) = subjects.next().await {
            n += 1;
        }
        n
    }

    async fn describe_channel(&self, channel: &ChannelName) -> Result<Option<ChannelInfo>> {
        let what = || format!("describing channel {channel}");
        let mut stream = match self.inner.js.get_stream(names::stream(channel)).await {
            Ok(s) => s,
            Err(_) => return Ok(None),
        };
        let info = stream.info().await.map_err(|e| error::map(what(), e))?;
        let Some(partitions) = info
            .config
            .description
            .as_deref()
            .and_then(names::parse_description)
        else {
            return Ok(None);
        };
        let messages = info.state.messages;
        let mut per_subject = BTreeMap::new();
        let mut subjects = stream
            .info_with_subjects(names::subjects(channel))
            .await
            .map_err(|e| error::map(what(), e))?;
        while let Some(item) = subjects.next().await {
            let (subject, n) = item.map_err(|e| error::map(what(), e))?;
            if let Some(p) = names::partition_of(&subject) {
                per_subject.insert(p, n as u64);
            }
        }
        let mut partition_info = Vec::new();
        for p in 0..partitions {
            let n = per_subject.get(&p).copied().unwrap_or(0);
            let head = if n == 0 {
                0
            } else {
                stream
                    .get_last_raw_message_by_subject(&names::subject(channel, p))
                    .await
                    .map(|m| m.sequence)
                    .unwrap_or(0)
            };
            partition_info.push(PartitionInfo {
                partition: p,
                messages: n,
                head,
            });
        }

        // Groups: durable consumers named `<group>_p<partition>`.
        let mut groups: BTreeMap<String, Vec<GroupPartition>> = BTreeMap::new();
        let mut consumers = stream.consumers();
        while let Some(c) = consumers.next().await {
            let c = c.map_err(|e| error::map(what(), e))?;
            let Some((group, p)) = c.name.rsplit_once("_p") else {
                continue;
            };
            let Ok(partition) = p.parse::<u32>() else {
                continue;
            };
            groups
                .entry(untoken(group))
                .or_default()
                .push(GroupPartition {
                    partition,
                    committed: c.ack_floor.stream_sequence,
                    owner: None,
                    generation: 0,
                    lag: c.num_pending + c.num_ack_pending as u64,
                });
        }
        let leases = self.leases().await.ok();
        let mut group_info = Vec::new();
        for (group, mut parts) in groups {
            parts.sort_by_key(|p| p.partition);
            let mut members = 0;
            if let (Some(kv), Ok(g)) = (&leases, courier_core::GroupName::new(group.as_str())) {
                for part in &mut parts {
                    if let Ok(Some(entry)) = kv
                        .entry(names::lease_key(channel, &g, part.partition))
                        .await
                        && !entry.value.is_empty()
                    {
                        part.owner = Some(String::from_utf8_lossy(&entry.value).into_owned());
                        part.generation = entry.revision;
                    }
                }
                members = self.live_members(channel, &g).await;
            }
            group_info.push(GroupInfo {
                group,
                members,
                lag: parts.iter().map(|p| p.lag).sum(),
                partitions: parts,
            });
        }
        Ok(Some(ChannelInfo {
            channel: channel.to_string(),
            partitions,
            messages,
            partition_info,
            groups: group_info,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untoken_inverts_token() {
        for name in ["orders", "a_b", "a.b", "a__b", "x_d", "_._", "bench-1"] {
            assert_eq!(untoken(&names::token(name)), name, "{name}");
        }
    }
}
