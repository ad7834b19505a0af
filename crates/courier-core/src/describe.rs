//! What a service sends and receives, as data: the input of its AsyncAPI document
//! (`courier-asyncapi`) and of contract checks.
//!
//! A [`Dispatcher`](crate::Dispatcher) describes what it receives (and the replies it
//! sends) from its registrations; the sending side is declared with the builder methods
//! ([`sends_command`](ServiceDescription::sends_command),
//! [`publishes`](ServiceDescription::publishes), ...), since an outbox sender registers
//! nothing.

use crate::codec::Contract;
use crate::headers::MessageKind;
use crate::interaction::{Command, DomainEvent, Notification};
use serde::{Deserialize, Serialize};

/// A service's channels, operations and message types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceDescription {
    /// The service's name, e.g. `order-service`.
    pub service: String,
    /// The version of the service's message API (semver), `1.0.0` by default.
    pub version: String,
    /// A sentence about the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// What it sends and receives.
    #[serde(default)]
    pub operations: Vec<OperationDescription>,
}

/// Whether the service sends or receives on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The service writes these messages (through its outbox).
    Send,
    /// The service consumes these messages (with a consumer group).
    Receive,
}

/// The interaction style of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    /// A command with a reply.
    Command,
    /// A one-way command.
    Notification,
    /// A domain event.
    Event,
    /// A reply (on the sender's reply channel).
    Reply,
    /// A plain typed message.
    Message,
}

/// One operation: send or receive one message type on one channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationDescription {
    /// Send or receive.
    pub action: Action,
    /// The channel name; `None` when it is only known at run time (a plain `on::<T>()`
    /// registration, whose channel is the subscription's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The interaction style.
    pub style: Style,
    /// The message.
    pub message: MessageDescription,
    /// The replies a command gets (success, then failure); empty otherwise. Replies go
    /// to the channel in the command's `reply-to` header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replies: Vec<MessageDescription>,
    /// The consumer group of a receive operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// One message type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageDescription {
    /// The stable type name (`type` header).
    pub name: String,
    /// `MAJOR.MINOR`.
    pub version: String,
    /// Command, event, reply or document.
    pub kind: MessageKind,
    /// The content type it is sent with.
    pub content_type: String,
    /// The JSON Schema (draft-07) of the payload.
    pub schema: serde_json::Value,
    /// What the partition key is, when the style fixes it (the aggregate id of an event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl MessageDescription {
    /// The description of `T`.
    pub fn of<T: Contract>() -> Self {
        Self {
            name: T::TYPE.to_owned(),
            version: format!("{}.{}", T::VERSION, T::MINOR),
            kind: T::KIND,
            content_type: T::CONTENT_TYPE.to_owned(),
            schema: T::schema(),
            key: None,
        }
    }
}

impl ServiceDescription {
    /// An empty description of `service`, API version `1.0.0`.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            version: "1.0.0".to_owned(),
            description: None,
            operations: Vec::new(),
        }
    }

    /// Set the API version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Set the description.
    pub fn describe(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// Add an operation (duplicates are kept once).
    pub fn operation(mut self, op: OperationDescription) -> Self {
        self.push(op);
        self
    }

    /// Add an operation in place (duplicates are kept once).
    pub fn push(&mut self, op: OperationDescription) {
        if !self.operations.contains(&op) {
            self.operations.push(op);
        }
    }

    /// Add every operation of `other` (e.g. a dispatcher's).
    pub fn merge(mut self, other: ServiceDescription) -> Self {
        for op in other.operations {
            self.push(op);
        }
        self
    }

    /// The service sends command `C` (and receives its replies on its reply channel).
    pub fn sends_command<C: Command>(self) -> Self {
        self.operation(command_op::<C>(Action::Send, None))
    }

    /// The service sends notification `N`.
    pub fn sends_notification<N: Notification>(self) -> Self {
        self.operation(OperationDescription {
            action: Action::Send,
            channel: Some(N::CHANNEL.to_owned()),
            style: Style::Notification,
            message: MessageDescription::of::<N>(),
            replies: Vec::new(),
            group: None,
        })
    }

    /// The service publishes domain event `E`.
    pub fn publishes<E: DomainEvent>(self) -> Self {
        self.operation(event_op::<E>(Action::Send, None))
    }

    /// The service sends plain message `T` to `channel`.
    pub fn sends<T: Contract>(self, channel: &str) -> Self {
        self.operation(OperationDescription {
            action: Action::Send,
            channel: Some(channel.to_owned()),
            style: Style::Message,
            message: MessageDescription::of::<T>(),
            replies: Vec::new(),
            group: None,
        })
    }

    /// The service handles command `C` as consumer group `group` (and replies).
    pub fn handles_command<C: Command>(self, group: &str) -> Self {
        self.operation(command_op::<C>(Action::Receive, Some(group.to_owned())))
    }

    /// The service handles notification `N` as consumer group `group`.
    pub fn handles_notification<N: Notification>(self, group: &str) -> Self {
        self.operation(OperationDescription {
            action: Action::Receive,
            channel: Some(N::CHANNEL.to_owned()),
            style: Style::Notification,
            message: MessageDescription::of::<N>(),
            replies: Vec::new(),
            group: Some(group.to_owned()),
        })
    }

    /// The service subscribes to domain event `E` as consumer group `group`.
    pub fn subscribes<E: DomainEvent>(self, group: &str) -> Self {
        self.operation(event_op::<E>(Action::Receive, Some(group.to_owned())))
    }

    /// The service receives the replies of command `C` on `reply_channel`.
    pub fn receives_replies<C: Command>(mut self, reply_channel: &str, group: &str) -> Self {
        for message in [
            MessageDescription::of::<C::Reply>(),
            MessageDescription::of::<C::Failure>(),
        ] {
            self.push(OperationDescription {
                action: Action::Receive,
                channel: Some(reply_channel.to_owned()),
                style: Style::Reply,
                message: MessageDescription {
                    kind: MessageKind::Reply,
                    ..message
                },
                replies: Vec::new(),
                group: Some(group.to_owned()),
            });
        }
        self
    }

    /// Serialize as pretty JSON (what `courier asyncapi --from` reads).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

pub(crate) fn command_op<C: Command>(
    action: Action,
    group: Option<String>,
) -> OperationDescription {
    OperationDescription {
        action,
        channel: Some(C::CHANNEL.to_owned()),
        style: Style::Command,
        message: MessageDescription {
            kind: MessageKind::Command,
            ..MessageDescription::of::<C>()
        },
        replies: vec![
            MessageDescription {
                kind: MessageKind::Reply,
                ..MessageDescription::of::<C::Reply>()
            },
            MessageDescription {
                kind: MessageKind::Reply,
                ..MessageDescription::of::<C::Failure>()
            },
        ],
        group,
    }
}

pub(crate) fn event_op<E: DomainEvent>(
    action: Action,
    group: Option<String>,
) -> OperationDescription {
    OperationDescription {
        action,
        channel: Some(E::AGGREGATE.to_owned()),
        style: Style::Event,
        message: MessageDescription {
            kind: MessageKind::Event,
            key: Some(format!("the {} id", E::AGGREGATE)),
            ..MessageDescription::of::<E>()
        },
        replies: Vec::new(),
        group,
    }
}
