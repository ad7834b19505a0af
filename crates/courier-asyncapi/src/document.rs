//! The part of AsyncAPI 3.0 that Courier writes, as serde structs.
//!
//! Field order is the order in the written document. Schemas (payloads, headers,
//! `components.schemas`) stay [`serde_json::Value`]s: they are JSON Schema draft-07 from
//! schemars. What AsyncAPI has no field for is kept in `x-courier-*` extensions, which
//! [`check`](crate::check) reads back.

use crate::Result;
use crate::io;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The AsyncAPI version Courier writes.
pub const ASYNCAPI_VERSION: &str = "3.0.0";

/// A whole AsyncAPI 3.0 document, as [`asyncapi`](crate::asyncapi) builds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Always [`ASYNCAPI_VERSION`].
    pub asyncapi: String,
    /// Title (the service name), version and description.
    pub info: Info,
    /// The channels, keyed by channel id (the sanitized channel name).
    pub channels: BTreeMap<String, Channel>,
    /// The operations, keyed by operation id (`send_<message id>`, ...).
    pub operations: BTreeMap<String, Operation>,
    /// The message types and the schemas their payloads share.
    pub components: Components,
}

impl Document {
    /// The document as YAML.
    pub fn to_yaml(&self) -> Result<String> {
        io::to_yaml(self)
    }

    /// The document as pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        io::to_json(self)
    }

    /// The document as a JSON value (what [`check`](crate::check) compares).
    pub fn to_value(&self) -> Result<Value> {
        serde_json::to_value(self).map_err(|e| crate::Error::Write {
            format: "JSON",
            message: e.to_string(),
        })
    }
}

/// The `info` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// The service name.
    pub title: String,
    /// The version of the service's message API.
    pub version: String,
    /// A sentence about the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A channel: where messages go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    /// The channel name; `null` when it is only known at run time (the `reply-to` of a
    /// command, the channel of a plain subscription).
    pub address: Option<String>,
    /// What the channel is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The messages sent on it, keyed by message id, each a `$ref` to
    /// `#/components/messages/<id>`.
    pub messages: BTreeMap<String, Reference>,
}

/// Send or receive (AsyncAPI's `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The service sends these messages.
    Send,
    /// The service receives these messages.
    Receive,
}

/// An operation: the service sends or receives messages on one channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// Send or receive.
    pub action: Action,
    /// `$ref` to the channel.
    pub channel: Reference,
    /// One sentence: what the service does.
    pub summary: String,
    /// `$ref`s to the messages, in the channel's `messages` (`#/channels/<c>/messages/<m>`).
    pub messages: Vec<Reference>,
    /// For commands: where the replies go and which messages they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    /// The Courier interaction style: `command`, `notification`, `event`, `reply`,
    /// `message`.
    #[serde(rename = "x-courier-style")]
    pub style: String,
    /// The consumer group of a receive operation.
    #[serde(
        rename = "x-courier-group",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub group: Option<String>,
}

/// An operation's reply (AsyncAPI's Operation Reply Object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Where the reply goes when the channel's address is only known at run time: the
    /// command's `reply-to` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<ReplyAddress>,
    /// `$ref` to the reply channel (its address is `null` when `address` is set).
    pub channel: Reference,
    /// `$ref`s to the reply messages in that channel: success type, then failure type.
    pub messages: Vec<Reference>,
}

/// A runtime expression that locates the reply address in the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyAddress {
    /// What the address is.
    pub description: String,
    /// The runtime expression, e.g. `$message.header#/reply-to`.
    pub location: String,
}

/// A `$ref`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    /// The JSON pointer, e.g. `#/components/messages/restaurant_MenuRevised_v1`.
    #[serde(rename = "$ref")]
    pub reference: String,
}

impl Reference {
    /// A reference to `pointer`.
    pub fn to(pointer: impl Into<String>) -> Self {
        Self {
            reference: pointer.into(),
        }
    }
}

/// The `components` object.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Components {
    /// The message types, keyed by message id (`<sanitized name>_v<major>`).
    pub messages: BTreeMap<String, Message>,
    /// The nested types of payloads (schemars' `definitions`), referenced as
    /// `#/components/schemas/<name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub schemas: BTreeMap<String, Value>,
}

/// A message type (AsyncAPI's Message Object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The stable type name, e.g. `restaurant.MenuRevised` (the `type` header).
    pub name: String,
    /// The name and version, for people.
    pub title: String,
    /// Command, event, reply or document, in a sentence.
    pub summary: String,
    /// The Rust type's doc comment (the payload schema's `description`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The content type it is sent with.
    #[serde(rename = "contentType")]
    pub content_type: String,
    /// Where the correlation id is, for commands and replies.
    #[serde(
        rename = "correlationId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub correlation_id: Option<CorrelationId>,
    /// JSON Schema of Courier's headers on this message (all strings).
    pub headers: Value,
    /// JSON Schema (draft-07) of the payload, generated from the Rust type.
    pub payload: Value,
    /// The stable type name (same as `name`, kept for tools that rename messages).
    #[serde(rename = "x-courier-type")]
    pub courier_type: String,
    /// `MAJOR.MINOR`.
    #[serde(rename = "x-courier-version")]
    pub version: String,
    /// `command`, `event`, `reply` or `document`.
    #[serde(rename = "x-courier-kind")]
    pub kind: String,
    /// What the partition key is, when the style fixes it (an event's aggregate id).
    #[serde(
        rename = "x-courier-partition-key",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub partition_key: Option<String>,
}

/// AsyncAPI's Correlation ID Object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrelationId {
    /// What ties the messages together.
    pub description: String,
    /// The runtime expression, e.g. `$message.header#/correlation-id`.
    pub location: String,
}
