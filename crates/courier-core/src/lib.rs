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
pub mod dead_letter;
pub mod dispatcher;
pub mod error;
pub mod handler;
pub mod headers;
pub mod message;
pub mod names;
pub mod outbox;
pub mod partition;
pub mod relay;
pub mod retry;
pub mod store;
pub mod transport;
pub mod wakeup;

pub use codec::{Contract, JsonCodec};
pub use dead_letter::{DeadLetter, DeadLetterReason, DeadLetterStatus, NewDeadLetter};
pub use dispatcher::{Dispatcher, DispatcherConfig, DispatcherStats};
pub use error::{Error, ErrorKind, ErrorStatus, Result};
pub use handler::{HandlerContext, HandlerError};
pub use headers::{HeaderName, Headers, MessageKind, Version};
pub use message::{Message, MessageId, now_ms};
pub use names::{ChannelName, GroupName, MessageType};
pub use outbox::{OutboxRow, OutboxSource};
pub use relay::{Relay, RelayConfig, RelayStats};
pub use retry::RetryPolicy;
pub use store::MessageStore;
pub use transport::{
    Acker, BoxFuture, Capabilities, Delivery, Durability, Malformed, Position, Publisher, Receipt,
    StartFrom, SubscribeOptions, Subscriber, Subscription,
};
