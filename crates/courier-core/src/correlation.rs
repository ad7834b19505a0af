//! Correlation state: what a sender keeps, in its own database, about commands it sent
//! and the replies that came back (`courier_correlation` and
//! `courier_correlation_replies`). Stores implement the storage half in
//! [`MessageStore`](crate::MessageStore); the dispatcher and the
//! [`Requester`](crate::Requester) use it.

use crate::error::{Error, Result};
use crate::headers::Headers;
use crate::message::{Message, MessageId};
use bytes::Bytes;
use std::fmt;

/// A correlation row to insert with a command, in the sender's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCorrelation {
    /// The command's message id (also its `correlation-id`).
    pub correlation_id: String,
    /// The command's type name: selects the reply handler.
    pub command_type: String,
    /// Where the command went.
    pub channel: String,
    /// The sender's data, as JSON text (`null` when none).
    pub data: String,
    /// Milliseconds since the epoch after which the command times out.
    pub deadline_ms: Option<u64>,
    /// Scatter-gather: responders expected (empty for a plain command).
    pub expected: Vec<String>,
    /// Replies that complete it (1 for a plain command).
    pub expected_count: u32,
    /// True for scatter-gather (the handler gets every reply).
    pub gather: bool,
    /// When the command was sent.
    pub created_at_ms: u64,
}

/// Where a correlation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CorrelationState {
    /// Waiting for replies.
    Pending,
    /// Enough replies arrived.
    Done,
    /// The deadline passed first.
    TimedOut,
    /// Its timeout handler kept failing; kept with the error for an operator.
    Failed,
}

impl CorrelationState {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Done => "done",
            Self::TimedOut => "timed-out",
            Self::Failed => "failed",
        }
    }

    /// Parse the stored form.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => Self::Pending,
            "done" => Self::Done,
            "timed-out" => Self::TimedOut,
            "failed" => Self::Failed,
            other => {
                return Err(Error::invalid(format!(
                    "correlation state {other:?} is not one of pending, done, timed-out, failed"
                )));
            }
        })
    }
}

impl fmt::Display for CorrelationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reply, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRecord {
    /// Who answered (the `responder` header, or `unknown`).
    pub responder: String,
    /// The reply's message id.
    pub message_id: String,
    /// The reply's headers as JSON.
    pub headers_json: String,
    /// The reply's payload.
    pub payload: Bytes,
    /// When it was recorded.
    pub received_at_ms: u64,
}

impl ReplyRecord {
    /// Record `reply` from `responder`.
    pub fn of(reply: &Message, responder: &str) -> Self {
        Self {
            responder: responder.to_owned(),
            message_id: reply.id.to_string(),
            headers_json: reply.headers.to_json(),
            payload: reply.payload.clone(),
            received_at_ms: crate::now_ms(),
        }
    }

    /// The reply as a message again.
    pub fn message(&self) -> Result<Message> {
        Ok(Message {
            id: MessageId::parse(&self.message_id)?,
            headers: Headers::from_json(&self.headers_json)?,
            payload: self.payload.clone(),
        })
    }
}

/// A correlation row with the replies recorded so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorrelationRecord {
    /// What was inserted.
    pub correlation: NewCorrelation,
    /// Where it stands.
    pub state: CorrelationState,
    /// Failed runs of its timeout handler.
    pub attempts: u32,
    /// The last error of its timeout handler.
    pub error: Option<String>,
    /// When it completed (done, timed out or failed).
    pub completed_at_ms: Option<u64>,
    /// Replies, in arrival order.
    pub replies: Vec<ReplyRecord>,
}

/// What recording a reply did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyApplied {
    /// No correlation row has this id (never sent from here, or pruned).
    Unknown,
    /// The correlation had already completed (a late or second reply).
    AlreadyComplete(CorrelationState),
    /// This responder had already answered (a redelivered reply).
    Duplicate,
    /// Recorded; more replies are expected.
    Waiting {
        /// Replies so far.
        received: u32,
        /// Replies that complete it.
        expected: u32,
    },
    /// Recorded, and the correlation is now done.
    Completed(Box<CorrelationRecord>),
}
