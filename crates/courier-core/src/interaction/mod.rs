//! Interaction styles on top of the outbox and the dispatcher: commands with replies,
//! one-way notifications, domain events, scatter-gather and `request().await`.
//!
//! Declarations are types. A message type implements [`Contract`] plus one of
//! [`Command`] (names its channel, its reply and its failure), [`Notification`] (a
//! command with no reply) or [`DomainEvent`] (an event of an aggregate: channel = the
//! aggregate type, partition key = the aggregate id).
//!
//! Sending a command writes the message AND a correlation row (`courier_correlation`)
//! into the caller's transaction, so the reply can be handled by any instance of the
//! sender, even after a restart: nothing lives only in memory. The receiving
//! dispatcher's command handler returns `Ok(Ok(reply))` or `Ok(Err(failure))`; the reply
//! is sent through the handler's transaction. The sender's dispatcher matches the reply
//! to its correlation row (first reply wins) and calls the reply handler registered for
//! the command type with the [`Outcome`] and the data stored at send time. A command
//! whose deadline passes unanswered produces [`Outcome::TimedOut`] through the same
//! handler (a durable timer over the correlation rows); an expired command is never
//! executed late. See `docs/adr/0006-interaction-styles.md`.

mod messages;
mod reply;
mod request;

pub(crate) use messages::reply_message;
pub use messages::{command_message, event_message, notification_message};
pub use reply::{CommandReply, Gathered, GatheredReply};
pub(crate) use reply::{ErasedReplyHandler, ReplyHandlerFn};
pub use request::Requester;

use crate::codec::Contract;
use crate::error::{Error, Result};
use crate::message::now_ms;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A message that asks one receiver to do something and answers with a reply.
///
/// ```
/// use courier_core::{Command, Contract, MessageKind, Rejection};
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct ValidateConsumer { consumer_id: String }
/// impl Contract for ValidateConsumer {
///     const TYPE: &'static str = "consumer.ValidateConsumer";
///     const KIND: MessageKind = MessageKind::Command;
/// }
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct ConsumerValidated { consumer_id: String }
/// impl Contract for ConsumerValidated {
///     const TYPE: &'static str = "consumer.ConsumerValidated";
///     const KIND: MessageKind = MessageKind::Reply;
/// }
/// impl Command for ValidateConsumer {
///     const CHANNEL: &'static str = "consumer-service.commands";
///     type Reply = ConsumerValidated;
///     type Failure = Rejection;
/// }
/// ```
pub trait Command: Contract {
    /// The channel the receiving service consumes commands from.
    const CHANNEL: &'static str;
    /// What a successful handler answers.
    type Reply: Contract;
    /// What a handler answers when it refuses (a business outcome, not an error).
    /// [`Rejection`] when a reason is enough.
    type Failure: Contract;
}

/// A one-way command: asks a receiver to do something, expects no reply.
pub trait Notification: Contract {
    /// The channel the receiving service consumes notifications from.
    const CHANNEL: &'static str;
}

/// An event of an aggregate, published on the channel named after the aggregate type,
/// keyed by the aggregate id (so one aggregate's events are consumed in order).
pub trait DomainEvent: Contract {
    /// The aggregate type, e.g. `restaurant`: also the channel name.
    const AGGREGATE: &'static str;
    /// The id of the aggregate this event belongs to (the partition key).
    fn aggregate_id(&self) -> String;
}

/// A ready-made failure type: the command was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Rejection {
    /// Why, in words a person (or the sender's log) can act on.
    pub reason: String,
}

impl Rejection {
    /// A rejection with `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl Contract for Rejection {
    const TYPE: &'static str = "courier.Rejection";
    const KIND: crate::MessageKind = crate::MessageKind::Reply;
}

/// How a command ended, as its sender sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<R, F> {
    /// The handler succeeded and answered this.
    Replied(R),
    /// The handler refused with this failure.
    Failed(F),
    /// No reply before the deadline (the command expired unexecuted, or the answer came
    /// too late, or nobody handles it).
    TimedOut,
}

impl<R, F> Outcome<R, F> {
    /// The reply, if the command succeeded.
    pub fn replied(self) -> Option<R> {
        match self {
            Self::Replied(r) => Some(r),
            _ => None,
        }
    }

    /// True when no reply came in time.
    pub fn is_timed_out(&self) -> bool {
        matches!(self, Self::TimedOut)
    }
}

/// What the sender keeps about a command it sends: its own data (given back with the
/// reply), a deadline, the partition key of the command, and for scatter-gather who is
/// expected to answer.
///
/// ```
/// # use courier_core::Correlation;
/// # use std::time::Duration;
/// let c = Correlation::new()
///     .data(&serde_json::json!({"order_id": "o-1"}))?
///     .deadline_in(Duration::from_secs(30))
///     .key("o-1");
/// # Ok::<(), courier_core::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Correlation {
    pub(crate) data: Option<String>,
    pub(crate) deadline_ms: Option<u64>,
    pub(crate) key: Option<String>,
    pub(crate) expected: Vec<String>,
    pub(crate) expected_count: Option<u32>,
}

impl Correlation {
    /// No data, no deadline, one reply expected.
    pub fn new() -> Self {
        Self::default()
    }

    /// Data the reply handler gets back (stored as JSON in the sender's database).
    pub fn data(mut self, data: &impl Serialize) -> Result<Self> {
        self.data = Some(serde_json::to_string(data).map_err(|e| {
            Error::invalid(format!("correlation data cannot be stored as JSON: {e}"))
        })?);
        Ok(self)
    }

    /// Answer within `d` from now, or the command times out (and is not executed late).
    pub fn deadline_in(mut self, d: Duration) -> Self {
        self.deadline_ms = Some(now_ms().saturating_add(d.as_millis() as u64));
        self
    }

    /// Answer before `ms` (milliseconds since the Unix epoch).
    pub fn deadline_at_ms(mut self, ms: u64) -> Self {
        self.deadline_ms = Some(ms);
        self
    }

    /// The command's partition key (commands with the same key are handled in order).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Scatter-gather: these responders (their consumer groups) are expected to answer.
    /// The gather completes when all have answered or the deadline passes.
    pub fn expect_from<I, T>(mut self, responders: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.expected = responders.into_iter().map(Into::into).collect();
        self
    }

    /// Scatter-gather: complete after `n` replies (from anyone) or at the deadline.
    pub fn expect_count(mut self, n: u32) -> Self {
        self.expected_count = Some(n.max(1));
        self
    }

    pub(crate) fn is_gather(&self) -> bool {
        !self.expected.is_empty() || self.expected_count.is_some()
    }

    pub(crate) fn count(&self) -> u32 {
        self.expected_count
            .unwrap_or(u32::try_from(self.expected.len()).unwrap_or(u32::MAX))
            .max(1)
    }
}
