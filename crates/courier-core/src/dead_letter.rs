//! Dead letters: messages that could not be handled, kept with their error until an
//! operator retries or discards them.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The handler failed transiently more often than the retry policy allows.
    Exhausted,
    /// The handler said retrying cannot help.
    Permanent,
    /// The payload could not be decoded into the handler's type (or wrong major version).
    Undecodable,
    /// No handler is registered for the message type (or it has none).
    UnknownType,
    /// The envelope itself is broken (headers, id).
    Malformed,
    /// Larger than the configured limit.
    Oversized,
    /// Its `deadline` had passed on arrival: not executed late.
    Expired,
    /// Held back because an earlier message with the same key is dead-lettered.
    Parked,
}

impl DeadLetterReason {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exhausted => "exhausted",
            Self::Permanent => "permanent",
            Self::Undecodable => "undecodable",
            Self::UnknownType => "unknown-type",
            Self::Malformed => "malformed",
            Self::Oversized => "oversized",
            Self::Expired => "expired",
            Self::Parked => "parked",
        }
    }

    /// Parse the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "exhausted" => Self::Exhausted,
            "permanent" => Self::Permanent,
            "undecodable" => Self::Undecodable,
            "unknown-type" => Self::UnknownType,
            "malformed" => Self::Malformed,
            "oversized" => Self::Oversized,
            "expired" => Self::Expired,
            "parked" => Self::Parked,
            _ => return None,
        })
    }

    /// Whether a dead letter for this reason holds back later messages with the same key.
    /// Handler failures do (the key's order matters to the handler); messages that were
    /// never valid input do not.
    pub fn blocks_key(self) -> bool {
        matches!(self, Self::Exhausted | Self::Permanent | Self::Parked)
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DeadLetterStatus {
    /// Waiting for an operator.
    Dead,
    /// Waiting behind an earlier dead letter with the same key.
    Parked,
    /// An operator asked for it to be handled again; the subscriber picks it up.
    Retry,
}

impl DeadLetterStatus {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dead => "dead",
            Self::Parked => "parked",
            Self::Retry => "retry",
        }
    }

    /// Parse the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "dead" => Self::Dead,
            "parked" => Self::Parked,
            "retry" => Self::Retry,
            _ => return None,
        })
    }
}

/// A dead letter to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    /// The subscriber (consumer group) that failed to handle it.
    pub subscriber: String,
    /// The channel it came from.
    pub channel: String,
    /// The message id as received.
    pub message_id: String,
    /// Its partition key.
    pub partition_key: Option<String>,
    /// Its type, if known.
    pub message_type: Option<String>,
    /// The headers as JSON (as received, even when malformed).
    pub headers_json: String,
    /// The payload as received.
    pub payload: Bytes,
    /// Why.
    pub reason: DeadLetterReason,
    /// The last error, for a person to read.
    pub error: String,
    /// Handling attempts made.
    pub attempts: u32,
    /// When handling first failed (ms since the Unix epoch).
    pub first_failed_at_ms: u64,
    /// When handling last failed (ms since the Unix epoch).
    pub last_failed_at_ms: u64,
    /// Dead or parked.
    pub status: DeadLetterStatus,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The row id: `courier dlq show/retry/discard ID`.
    pub id: i64,
    /// Everything that was stored.
    #[serde(flatten)]
    pub record: DeadLetterRecord,
}

impl DeadLetter {
    /// Whether an operator may ask for this dead letter to be handled again: only `dead`
    /// ones (a `parked` one follows the dead letter its key waits behind).
    pub fn ensure_retryable(&self) -> crate::Result<()> {
        match self.record.status {
            DeadLetterStatus::Dead => Ok(()),
            DeadLetterStatus::Parked => Err(crate::Error::invalid(format!(
                "dead letter {} is parked: only dead letters can be retried; \
                 retry or discard the dead letter its key waits behind",
                self.id
            ))),
            other => Err(crate::Error::invalid(format!(
                "dead letter {} is {}: only dead letters can be retried",
                self.id,
                other.as_str()
            ))),
        }
    }
}

/// The stored fields of a dead letter (serialisable for `--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterRecord {
    /// See [`NewDeadLetter::subscriber`].
    pub subscriber: String,
    /// See [`NewDeadLetter::channel`].
    pub channel: String,
    /// See [`NewDeadLetter::message_id`].
    pub message_id: String,
    /// See [`NewDeadLetter::partition_key`].
    pub partition_key: Option<String>,
    /// See [`NewDeadLetter::message_type`].
    pub message_type: Option<String>,
    /// See [`NewDeadLetter::headers_json`].
    pub headers: serde_json::Value,
    /// The payload, as text when it is UTF-8.
    #[serde(skip)]
    pub payload: Bytes,
    /// See [`NewDeadLetter::reason`].
    pub reason: DeadLetterReason,
    /// See [`NewDeadLetter::error`].
    pub error: String,
    /// See [`NewDeadLetter::attempts`].
    pub attempts: u32,
    /// See [`NewDeadLetter::first_failed_at_ms`].
    pub first_failed_at_ms: u64,
    /// See [`NewDeadLetter::last_failed_at_ms`].
    pub last_failed_at_ms: u64,
    /// Dead, parked or retry.
    pub status: DeadLetterStatus,
}
