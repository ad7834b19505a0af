//! The message: an id, headers and payload bytes.

use crate::error::{Error, ErrorKind, Result};
use crate::headers::{self, Headers, MessageKind, Version};
use crate::names::{ChannelName, MessageType};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Default largest message accepted (payload plus headers): 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// A message id: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A fresh UUIDv7 id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parse the hyphenated form.
    pub fn parse(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|e| Error::invalid(format!("message id {s:?} is not a UUID: {e}")))
    }

    /// The UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for MessageId {
    fn from(u: Uuid) -> Self {
        Self(u)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0.hyphenated())
    }
}

/// Milliseconds since the Unix epoch, by this process's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A message: id, headers, payload.
///
/// ```
/// use courier_core::{Message, ChannelName};
/// let msg = Message::new("hello")
///     .to(ChannelName::new("greetings").unwrap())
///     .with_key("user-7").unwrap();
/// assert_eq!(msg.channel().unwrap().as_str(), "greetings");
/// assert_eq!(msg.headers.partition_key(), Some("user-7"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Fixed when the message is created; a re-published duplicate keeps it.
    pub id: MessageId,
    /// Typed headers over a string map.
    pub headers: Headers,
    /// The encoded body.
    pub payload: Bytes,
}

impl Message {
    /// A message with a fresh id, a `created-at` header and the given payload.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        let mut headers = Headers::new();
        headers.insert_unchecked(headers::CREATED_AT, now_ms().to_string());
        Self {
            id: MessageId::new(),
            headers,
            payload: payload.into(),
        }
    }

    /// Set the destination channel.
    pub fn to(mut self, channel: ChannelName) -> Self {
        self.headers
            .insert_unchecked(headers::DESTINATION, channel.as_str().to_owned());
        self
    }

    /// Set the partition key (one key is always consumed in order).
    pub fn with_key(mut self, key: impl Into<String>) -> Result<Self> {
        self.headers.insert(headers::PARTITION_KEY, key)?;
        Ok(self)
    }

    /// Set any header.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Result<Self> {
        self.headers.insert_raw(name, value)?;
        Ok(self)
    }

    /// Set the message type, its version and its kind.
    pub fn with_type(mut self, ty: &MessageType, version: Version, kind: MessageKind) -> Self {
        self.headers
            .insert_unchecked(headers::TYPE, ty.as_str().to_owned());
        self.headers
            .insert_unchecked(headers::TYPE_VERSION, version.to_string());
        self.headers
            .insert_unchecked(headers::MESSAGE_KIND, kind.as_str().to_owned());
        self
    }

    /// The destination channel, or an error naming the message when it has none.
    pub fn channel(&self) -> Result<ChannelName> {
        self.headers.destination()?.ok_or_else(|| {
            Error::invalid(format!(
                "message {} has no {} header: say which channel it goes to",
                self.id,
                headers::DESTINATION
            ))
        })
    }

    /// Payload plus header bytes: what the size limit is checked against.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// What every outbox checks before accepting a message: it names its channel and is
    /// at most `max_bytes` (payload + headers).
    pub fn check_outgoing(&self, max_bytes: usize) -> Result<()> {
        self.check_size(max_bytes)?;
        self.channel()?;
        Ok(())
    }

    /// Refuse a message larger than `max_bytes`.
    pub fn check_size(&self, max_bytes: usize) -> Result<()> {
        let size = self.size();
        if size > max_bytes {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "message {} is {size} bytes (payload + headers); the limit is {max_bytes} bytes",
                    self.id
                ),
            ));
        }
        Ok(())
    }
}

impl Headers {
    /// Insert a header whose name is well-known and whose value we produced.
    pub(crate) fn insert_unchecked(&mut self, name: headers::HeaderName, value: String) {
        // Well-known names are valid; values we produce have no control characters.
        let _ = self.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_sort_by_time() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!(a < b);
        assert_eq!(MessageId::parse(&a.to_string()).unwrap(), a);
        assert!(MessageId::parse("nope").is_err());
    }

    #[test]
    fn missing_destination_names_the_message() {
        let m = Message::new("x");
        let e = m.channel().unwrap_err();
        assert!(e.to_string().contains(&m.id.to_string()));
        assert!(e.to_string().contains("destination"));
    }

    #[test]
    fn size_limit() {
        let m = Message::new(vec![0u8; 100]);
        assert!(m.check_size(1000).is_ok());
        let e = m.check_size(50).unwrap_err();
        assert!(e.to_string().contains("limit is 50"));
    }
}
