//! Settings of the NATS JetStream transport.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Settings of [`NatsTransport`](crate::NatsTransport). Build with
/// [`NatsTransport::builder`](crate::NatsTransport::builder) or deserialize; the URL's
/// credentials never appear in `Debug` output or error messages.
#[derive(Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URL(s), comma separated, e.g. `nats://127.0.0.1:4222`. May carry
    /// `user:password@` or a token.
    pub url: String,
    /// Partitions of a channel created implicitly (by a publish or subscribe).
    pub default_partitions: u32,
    /// The KV bucket holding group memberships and partition leases. Its `max_age` is
    /// the session timeout, so every process of a deployment must agree on both.
    pub leases_bucket: String,
    /// How often a member renews its membership and leases and rebalances.
    pub heartbeat_interval: Duration,
    /// A member not heard from for this long is dead; its partitions move (the broker's
    /// clock decides: it is the lease bucket's `max_age`).
    pub session_timeout: Duration,
    /// A delivered message that is neither acked nor nacked comes back after this long
    /// (to the partition's owner at the time).
    pub ack_wait: Duration,
    /// Most messages asked for in one pull request.
    pub fetch_batch: usize,
    /// How long one pull request waits for messages. A member hands a partition over
    /// only after its outstanding pull request ended, so this bounds hand-over latency.
    pub fetch_wait: Duration,
    /// Largest message accepted by `publish` (payload + Courier headers); also capped by
    /// the server's `max_payload` less room for NATS' own headers.
    pub max_message_bytes: usize,
    /// Messages older than this are removed from channel streams (`None`: kept until
    /// the stream is deleted).
    pub stream_max_age: Option<Duration>,
    /// Stream replicas (1 on a single server).
    pub replicas: usize,
    /// How long to wait for the server when connecting.
    pub connect_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            default_partitions: 4,
            leases_bucket: "COURIER_LEASES".to_owned(),
            heartbeat_interval: Duration::from_millis(500),
            session_timeout: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
            fetch_batch: 256,
            fetch_wait: Duration::from_secs(1),
            max_message_bytes: courier_core::message::DEFAULT_MAX_MESSAGE_BYTES,
            stream_max_age: None,
            replicas: 1,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &crate::error::redact(&self.url))
            .field("default_partitions", &self.default_partitions)
            .field("leases_bucket", &self.leases_bucket)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("session_timeout", &self.session_timeout)
            .field("ack_wait", &self.ack_wait)
            .field("fetch_batch", &self.fetch_batch)
            .field("fetch_wait", &self.fetch_wait)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("stream_max_age", &self.stream_max_age)
            .field("replicas", &self.replicas)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_credentials() {
        let c = NatsConfig {
            url: "nats://bob:hunter2@localhost:4222".to_owned(),
            ..NatsConfig::default()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("localhost:4222"), "{s}");
    }
}
