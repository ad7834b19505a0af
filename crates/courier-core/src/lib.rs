//! # courier-core
//!
//! The backend-free heart of Courier: the message model (ids, typed headers, validated
//! names), codecs for typed messages, the two transport traits ([`Publisher`],
//! [`Subscriber`]) with their [`Capabilities`], the service-database trait
//! ([`MessageStore`]) behind outbox, inbox and dead letters, and the [`Dispatcher`] that
//! runs handlers with retries and dead-lettering.
//!
//! Users depend on the `courier` facade, which re-exports this crate and the backends.
#![deny(missing_docs)]

pub mod admin;
pub mod codec;
pub mod correlation;
pub mod dead_letter;
pub mod describe;
pub mod dispatcher;
pub mod error;
pub mod handler;
pub mod headers;
pub mod interaction;
pub mod message;
pub mod names;
pub mod outbox;
pub mod partition;
#[cfg(feature = "protobuf")]
pub mod protobuf;
pub mod relay;
pub mod retry;
pub mod store;
pub mod transport;
pub mod wakeup;

pub use codec::{Codec, Contract, JSON, PROTOBUF};
pub use correlation::{
    CorrelationRecord, CorrelationState, NewCorrelation, ReplyApplied, ReplyRecord,
};
pub use dead_letter::{DeadLetter, DeadLetterReason, DeadLetterStatus, NewDeadLetter};
pub use describe::ServiceDescription;
pub use dispatcher::{Dispatcher, DispatcherConfig, DispatcherStats};
pub use error::{Error, ErrorKind, ErrorStatus, Result};
pub use handler::{HandlerContext, HandlerError};
pub use headers::{HeaderName, Headers, MessageKind, Version};
pub use interaction::{
    Command, CommandReply, Correlation, DomainEvent, Gathered, GatheredReply, Notification,
    Outcome, Rejection, Requester,
};
pub use message::{Message, MessageId, now_ms};
pub use names::{ChannelName, GroupName, MessageType};
pub use outbox::{OutboxRow, OutboxSource};
pub use relay::{Relay, RelayConfig, RelayStats};
pub use retry::RetryPolicy;
pub use schemars;
pub use store::MessageStore;
pub use transport::{
    Acker, BoxFuture, Capabilities, Delivery, Durability, Malformed, Position, Publisher, Receipt,
    StartFrom, SubscribeOptions, Subscriber, Subscription,
};
