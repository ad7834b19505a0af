//! Settings of the RabbitMQ transport.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Settings of [`AmqpTransport`](crate::AmqpTransport). Build with
/// [`AmqpTransport::builder`](crate::AmqpTransport::builder) or deserialize; the URL's
/// password never appears in `Debug` output or error messages.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// Server URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f` (`%2f` is the vhost `/`).
    /// Query parameters are passed to the client: `heartbeat=10` sets the AMQP
    /// heartbeat (seconds), which bounds how long a hung (not crashed) member keeps its
    /// partitions: RabbitMQ closes its connection, and with it its locks, after about
    /// two missed heartbeats. A crashed process loses them at once (closed socket).
    pub url: String,
    /// Partitions of a channel created implicitly (by a publish or subscribe).
    pub default_partitions: u32,
    /// How often a group member re-reads the group size and claims or hands over
    /// partitions. Rebalances take a few of these.
    pub rebalance_interval: Duration,
    /// Largest message accepted by `publish` (payload + Courier headers).
    pub max_message_bytes: usize,
    /// Stream retention by age, as RabbitMQ's `x-max-age` (`None`: kept until the
    /// channel is deleted or `stream_max_bytes` is reached). Every process must agree.
    pub stream_max_age: Option<Duration>,
    /// Stream retention by size per partition, as `x-max-length-bytes` (`None`: no
    /// limit). Every process must agree.
    pub stream_max_bytes: Option<u64>,
    /// How long to wait for the server when connecting.
    pub connect_timeout: Duration,
    /// Longest pause between two reconnection attempts (the pause doubles from 100 ms).
    pub max_reconnect_backoff: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://127.0.0.1:5672/%2f".to_owned(),
            default_partitions: 4,
            rebalance_interval: Duration::from_millis(500),
            max_message_bytes: courier_core::message::DEFAULT_MAX_MESSAGE_BYTES,
            stream_max_age: None,
            stream_max_bytes: None,
            connect_timeout: Duration::from_secs(5),
            max_reconnect_backoff: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &crate::error::redact(&self.url))
            .field("default_partitions", &self.default_partitions)
            .field("rebalance_interval", &self.rebalance_interval)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("stream_max_age", &self.stream_max_age)
            .field("stream_max_bytes", &self.stream_max_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_reconnect_backoff", &self.max_reconnect_backoff)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_password() {
        let c = AmqpConfig {
            url: "amqp://bob:hunter2@localhost:5672/%2f".to_owned(),
            ..AmqpConfig::default()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("localhost:5672"), "{s}");
    }

    #[test]
    fn deserializes_with_defaults() {
        let c: AmqpConfig = serde_json::from_str(r#"{"url":"amqp://h/%2f"}"#).unwrap();
        assert_eq!(c.url, "amqp://h/%2f");
        assert_eq!(c.default_partitions, 4);
    }
}
