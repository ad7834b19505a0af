//! Building the AsyncAPI document of a [`ServiceDescription`].

use crate::document::{
    ASYNCAPI_VERSION, Action, Channel, Components, CorrelationId, Document, Info, Message,
    Operation, Reference, Reply, ReplyAddress,
};
use crate::ids::{self, Ids, sanitize};
use crate::schema::Schemas;
use courier_core::MessageKind;
use courier_core::describe::{
    Action as CoreAction, MessageDescription, OperationDescription, ServiceDescription, Style,
};
use courier_core::headers;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// The runtime expression of the reply address: the command's `reply-to` header.
pub const REPLY_TO_LOCATION: &str = "$message.header#/reply-to";
/// The runtime expression of the correlation id.
pub const CORRELATION_ID_LOCATION: &str = "$message.header#/correlation-id";

/// The AsyncAPI 3.0 document of `description`.
///
/// - `info`: title = the service name, its version and description.
/// - `channels`: one per channel name (`address` = the name); a channel with a `null`
///   address for replies whose channel is only known at run time (`reply-to`), and one
///   per consumer group for plain `on::<T>()` handlers (their channel is the
///   subscription's).
/// - `operations`: one per operation (`send` / `receive`); a command's operation has a
///   `reply` with its success and failure types: on the service's own reply channel when
///   the description knows it (its `Style::Reply` operations carry it), else at the
///   address in the command's `reply-to` header (`$message.header#/reply-to`).
/// - `components.messages`: one per message name and major version, id
///   `<name>_v<major>` (e.g. `restaurant_MenuRevised_v1`), with the JSON Schema of the
///   payload and of Courier's headers; nested types in `components.schemas`.
/// - `x-courier-*` extensions keep the message version, kind, partition key, and the
///   operation's style and consumer group.
///
/// ```
/// use courier_core::{Contract, MessageKind, ServiceDescription};
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct MenuRevised { restaurant_id: String }
/// impl Contract for MenuRevised {
///     const TYPE: &'static str = "restaurant.MenuRevised";
///     const KIND: MessageKind = MessageKind::Event;
/// }
/// let doc = courier_asyncapi::asyncapi(
///     &ServiceDescription::new("restaurant-service").sends::<MenuRevised>("restaurant"),
/// );
/// assert!(doc.components.messages.contains_key("restaurant_MenuRevised_v1"));
/// println!("{}", doc.to_yaml()?);
/// # Ok::<(), courier_asyncapi::Error>(())
/// ```
pub fn asyncapi(description: &ServiceDescription) -> Document {
    Builder::default().build(description)
}

/// Where a channel comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ChannelKey {
    /// A channel with a known name.
    Named(String),
    /// The channel in a command's `reply-to` header.
    ReplyTo,
    /// The subscription channel of a consumer group's plain handlers.
    Runtime(Option<String>),
}

/// The roles a message plays, for its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Command,
    Reply,
    Event,
}

#[derive(Debug)]
struct MessageEntry {
    description: MessageDescription,
    roles: BTreeSet<Role>,
}

#[derive(Debug)]
struct Builder {
    channel_ids: Ids<ChannelKey>,
    channels: BTreeMap<String, Channel>,
    message_ids: Ids<(String, String)>,
    messages: BTreeMap<String, MessageEntry>,
    operation_ids: Ids<usize>,
    operations: BTreeMap<String, Operation>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            channel_ids: Ids::new(),
            channels: BTreeMap::new(),
            message_ids: Ids::new(),
            messages: BTreeMap::new(),
            operation_ids: Ids::new(),
            operations: BTreeMap::new(),
        }
    }
}

impl Builder {
    fn build(mut self, d: &ServiceDescription) -> Document {
        let reply_channels: BTreeSet<&str> = d
            .operations
            .iter()
            .filter(|op| op.style == Style::Reply)
            .filter_map(|op| op.channel.as_deref())
            .collect();
        // Named channels first, so they keep their names.
        for name in d.operations.iter().filter_map(|op| op.channel.as_deref()) {
            self.channel(&ChannelKey::Named(name.to_owned()));
        }
        let own_reply_channel = match reply_channels.len() {
            1 => reply_channels.first().map(|c| (*c).to_owned()),
            _ => None,
        };
        for (index, op) in d.operations.iter().enumerate() {
            self.operation(index, op, own_reply_channel.as_deref());
        }

        let mut schemas = Schemas::default();
        let messages = std::mem::take(&mut self.messages)
            .into_iter()
            .map(|(id, entry)| {
                let message = component_message(&id, &entry, &mut schemas);
                (id, message)
            })
            .collect();
        Document {
            asyncapi: ASYNCAPI_VERSION.to_owned(),
            info: Info {
                title: d.service.clone(),
                version: d.version.clone(),
                description: d.description.clone(),
            },
            channels: self.channels,
            operations: self.operations,
            components: Components {
                messages,
                schemas: schemas.schemas,
            },
        }
    }

    fn operation(&mut self, index: usize, op: &OperationDescription, own_reply: Option<&str>) {
        let key = match (&op.channel, op.style) {
            (Some(name), _) => ChannelKey::Named(name.clone()),
            (None, Style::Reply) => ChannelKey::ReplyTo,
            (None, _) => ChannelKey::Runtime(op.group.clone()),
        };
        let channel_id = self.channel(&key);
        let role = match op.style {
            Style::Command => Some(Role::Command),
            Style::Reply => Some(Role::Reply),
            Style::Event => Some(Role::Event),
            Style::Notification | Style::Message => None,
        };
        let message_id = self.message(&op.message, role);
        let message_ref = self.add_to_channel(&channel_id, &message_id);

        let reply = (!op.replies.is_empty()).then(|| {
            let (reply_key, address) = match (op.action, own_reply) {
                (CoreAction::Send, Some(name)) => (ChannelKey::Named(name.to_owned()), None),
                _ => (
                    ChannelKey::ReplyTo,
                    Some(ReplyAddress {
                        description: "The channel named in the command's reply-to header."
                            .to_owned(),
                        location: REPLY_TO_LOCATION.to_owned(),
                    }),
                ),
            };
            let reply_channel = self.channel(&reply_key);
            let messages = op
                .replies
                .iter()
                .map(|m| {
                    let id = self.message(m, Some(Role::Reply));
                    self.add_to_channel(&reply_channel, &id)
                })
                .collect();
            Reply {
                address,
                channel: Reference::to(format!("#/channels/{reply_channel}")),
                messages,
            }
        });

        let action = match op.action {
            CoreAction::Send => Action::Send,
            CoreAction::Receive => Action::Receive,
        };
        let verb = match action {
            Action::Send => "send",
            Action::Receive => "receive",
        };
        let base = format!("{verb}_{message_id}");
        let id = self
            .operation_ids
            .id(&index, &[base.clone(), format!("{base}_on_{channel_id}")]);
        self.operations.insert(
            id,
            Operation {
                action,
                channel: Reference::to(format!("#/channels/{channel_id}")),
                summary: summary(op),
                messages: vec![message_ref],
                reply,
                style: style_name(op.style).to_owned(),
                group: op.group.clone(),
            },
        );
    }

    /// The id of the channel of `key`, created on first use.
    fn channel(&mut self, key: &ChannelKey) -> String {
        let candidates = match key {
            ChannelKey::Named(name) => vec![sanitize(name)],
            ChannelKey::ReplyTo => vec!["reply-to".to_owned()],
            ChannelKey::Runtime(Some(group)) => vec![format!("subscription.{}", sanitize(group))],
            ChannelKey::Runtime(None) => vec!["subscription".to_owned()],
        };
        let id = self.channel_ids.id(key, &candidates);
        self.channels.entry(id.clone()).or_insert_with(|| {
            let (address, description) = match key {
                ChannelKey::Named(name) => (Some(name.clone()), None),
                ChannelKey::ReplyTo => (
                    None,
                    Some(
                        "Replies to commands: the channel named in each command's reply-to \
                         header, chosen by the command's sender at run time."
                            .to_owned(),
                    ),
                ),
                ChannelKey::Runtime(group) => (
                    None,
                    Some(format!(
                        "The channel this service subscribes to{}: chosen when it subscribes, \
                         not by its handlers.",
                        group
                            .as_deref()
                            .map(|g| format!(" with consumer group {g}"))
                            .unwrap_or_default()
                    )),
                ),
            };
            Channel {
                address,
                description,
                messages: BTreeMap::new(),
            }
        });
        id
    }

    /// The id of message `m`, registered on first use.
    fn message(&mut self, m: &MessageDescription, role: Option<Role>) -> String {
        let major = ids::major(&m.version).to_owned();
        let id = self.message_ids.id(
            &(m.name.clone(), major),
            &[ids::message_id(&m.name, &m.version)],
        );
        let entry = self
            .messages
            .entry(id.clone())
            .or_insert_with(|| MessageEntry {
                description: m.clone(),
                roles: BTreeSet::new(),
            });
        entry.roles.extend(role);
        id
    }

    /// Put message `message_id` on channel `channel_id`; the `$ref` an operation uses.
    fn add_to_channel(&mut self, channel_id: &str, message_id: &str) -> Reference {
        if let Some(channel) = self.channels.get_mut(channel_id) {
            channel.messages.insert(
                message_id.to_owned(),
                Reference::to(format!("#/components/messages/{message_id}")),
            );
        }
        Reference::to(format!("#/channels/{channel_id}/messages/{message_id}"))
    }
}

fn style_name(style: Style) -> &'static str {
    match style {
        Style::Command => "command",
        Style::Notification => "notification",
        Style::Event => "event",
        Style::Reply => "reply",
        Style::Message => "message",
    }
}

fn summary(op: &OperationDescription) -> String {
    let name = &op.message.name;
    let replies = op
        .replies
        .iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    let mut s = match (op.style, op.action) {
        (Style::Command, CoreAction::Send) => {
            format!("Sends command {name} and receives its reply ({replies}).")
        }
        (Style::Command, CoreAction::Receive) => format!(
            "Handles command {name} and replies ({replies}) to the channel in its reply-to header."
        ),
        (Style::Notification, CoreAction::Send) => {
            format!("Sends notification {name} (a one-way command: no reply).")
        }
        (Style::Notification, CoreAction::Receive) => {
            format!("Handles notification {name} (a one-way command: no reply).")
        }
        (Style::Event, CoreAction::Send) => format!(
            "Publishes domain event {name}, keyed by {}.",
            op.message.key.as_deref().unwrap_or("its aggregate id")
        ),
        (Style::Event, CoreAction::Receive) => format!("Consumes domain event {name}."),
        (Style::Reply, CoreAction::Send) => format!("Sends reply {name}."),
        (Style::Reply, CoreAction::Receive) => {
            format!("Receives reply {name} to a command this service sent.")
        }
        (Style::Message, CoreAction::Send) => format!("Sends {name}."),
        (Style::Message, CoreAction::Receive) => format!("Handles {name}."),
    };
    if let Some(group) = &op.group {
        s.push_str(&format!(" Consumer group: {group}."));
    }
    s
}

fn kind_summary(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Command => "A command: asks one receiver to do something.",
        MessageKind::Event => "An event: tells subscribers that something happened.",
        MessageKind::Reply => "A reply: answers a command.",
        MessageKind::Document => "A document: carries data with no intent attached.",
    }
}

fn component_message(id: &str, entry: &MessageEntry, schemas: &mut Schemas) -> Message {
    let m = &entry.description;
    let correlated = entry.roles.contains(&Role::Command) || entry.roles.contains(&Role::Reply);
    Message {
        name: m.name.clone(),
        title: format!("{} v{}", m.name, m.version),
        summary: kind_summary(m.kind).to_owned(),
        description: m
            .schema
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned),
        content_type: m.content_type.clone(),
        correlation_id: correlated.then(|| CorrelationId {
            description: "Ties a command to its replies: the command's id.".to_owned(),
            location: CORRELATION_ID_LOCATION.to_owned(),
        }),
        headers: headers_schema(entry),
        payload: schemas.hoist(id, &m.schema),
        courier_type: m.name.clone(),
        version: m.version.clone(),
        kind: m.kind.as_str().to_owned(),
        partition_key: m.key.clone(),
    }
}

/// The JSON Schema of Courier's headers on a message (every header is a string).
fn headers_schema(entry: &MessageEntry) -> Value {
    let m = &entry.description;
    let text = |description: &str| json!({"type": "string", "description": description});
    let number = |description: &str| json!({"type": "string", "pattern": "^[0-9]+$", "description": description});
    let mut properties = Map::new();
    let mut put = |name: headers::HeaderName, schema: Value| {
        properties.insert(name.as_str().to_owned(), schema);
    };
    put(
        headers::TYPE,
        json!({"type": "string", "const": m.name, "description": "The message type name."}),
    );
    put(
        headers::TYPE_VERSION,
        json!({
            "type": "string",
            "pattern": format!("^{}(\\.[0-9]+)?$", regex_escape(ids::major(&m.version))),
            "description": format!("MAJOR or MAJOR.MINOR; this document describes {}.", m.version),
        }),
    );
    put(
        headers::MESSAGE_KIND,
        json!({
            "type": "string",
            "enum": ["command", "event", "reply", "document"],
            "description": "The role of the message.",
        }),
    );
    put(
        headers::CONTENT_TYPE,
        text(&format!("The payload encoding: {}.", m.content_type)),
    );
    put(
        headers::DESTINATION,
        text("The channel the message is published to."),
    );
    put(
        headers::PARTITION_KEY,
        text(&match &m.key {
            Some(key) => format!("Picks the partition: {key}. One key is consumed in order."),
            None => "Picks the partition; one key is consumed in order.".to_owned(),
        }),
    );
    put(
        headers::CORRELATION_ID,
        text("Ties replies to their command."),
    );
    put(headers::REPLY_TO, text("The channel replies go to."));
    put(
        headers::CAUSATION_ID,
        text("The id of the message whose handling caused this one."),
    );
    put(
        headers::DEADLINE,
        number("Milliseconds since the Unix epoch after which the message must not be acted upon."),
    );
    put(headers::TRACEPARENT, text("W3C trace context."));
    put(
        headers::CREATED_AT,
        number("Milliseconds since the Unix epoch when the message was created."),
    );
    put(
        headers::ATTEMPT,
        number("How many times delivery was attempted before this one."),
    );
    let mut required = vec![
        headers::TYPE,
        headers::TYPE_VERSION,
        headers::MESSAGE_KIND,
        headers::CONTENT_TYPE,
    ];
    if entry.roles.contains(&Role::Reply) {
        put(
            headers::REPLY_OUTCOME,
            json!({
                "type": "string",
                "enum": ["success", "failure"],
                "description": "Whether this is the command's reply type or its failure type.",
            }),
        );
        put(
            headers::RESPONDER,
            text("Who answered (the responder's consumer group)."),
        );
        required.extend([headers::CORRELATION_ID, headers::REPLY_OUTCOME]);
    }
    if entry.roles.contains(&Role::Command) {
        required.extend([headers::CORRELATION_ID, headers::REPLY_TO]);
    }
    if entry.roles.contains(&Role::Event) {
        required.push(headers::PARTITION_KEY);
    }
    let required: BTreeSet<&str> = required.iter().map(|h| h.as_str()).collect();
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": {"type": "string"},
    })
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escape = !c.is_ascii_alphanumeric();
            escape.then_some('\\').into_iter().chain([c])
        })
        .collect()
}
