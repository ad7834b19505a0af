//! What an operator sees of a broker (`courier channels`): channels, partitions, consumer
//! groups, members, committed offsets, owners and lag. Every broker that can describe
//! itself returns these types, so tools print all of them the same way.

use serde::Serialize;

/// One partition of a channel.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionInfo {
    /// Partition number.
    pub partition: u32,
    /// Messages stored in it (not yet pruned).
    pub messages: u64,
    /// Newest offset (0 when nothing was ever published).
    pub head: u64,
}

/// One consumer group of a channel.
#[derive(Debug, Clone, Serialize)]
pub struct GroupInfo {
    /// Group name.
    pub group: String,
    /// Live members (heartbeat within the session timeout, by the database's clock).
    pub members: u64,
    /// Messages not yet committed, over all partitions.
    pub lag: u64,
    /// Per partition.
    pub partitions: Vec<GroupPartition>,
}

/// A group's view of one partition.
#[derive(Debug, Clone, Serialize)]
pub struct GroupPartition {
    /// Partition number.
    pub partition: u32,
    /// Committed offset: every message up to it is done for this group.
    pub committed: u64,
    /// Owning member, if any.
    pub owner: Option<String>,
    /// Lease generation (grows each time the partition changes hands).
    pub generation: u64,
    /// Messages after the committed offset.
    pub lag: u64,
}

/// A channel with its partitions and groups.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelInfo {
    /// Channel name.
    pub channel: String,
    /// Partition count.
    pub partitions: u32,
    /// Messages stored.
    pub messages: u64,
    /// Per partition.
    pub partition_info: Vec<PartitionInfo>,
    /// Consumer groups.
    pub groups: Vec<GroupInfo>,
}
