//! # courier-asyncapi
//!
//! AsyncAPI 3.0 documents for Courier services, and a contract check between two
//! documents.
//!
//! A service describes what it sends and receives as a
//! [`ServiceDescription`](courier_core::ServiceDescription): its
//! [`Dispatcher::description`](courier_core::Dispatcher::description) (what it handles,
//! and the replies it sends) merged with what it sends through its outbox
//! ([`sends_command`](courier_core::ServiceDescription::sends_command),
//! [`publishes`](courier_core::ServiceDescription::publishes), ...). [`asyncapi`] turns
//! that into an AsyncAPI 3.0.0 [`Document`] whose message payloads are the JSON Schemas
//! schemars generates from the Rust types; write it with [`Document::to_yaml`] or
//! [`Document::to_json`]. `courier asyncapi --from description.json` does the same from
//! the shell, with the JSON of
//! [`ServiceDescription::to_json`](courier_core::ServiceDescription::to_json).
//!
//! ```
//! use courier_core::{Command, Contract, MessageKind, Rejection, ServiceDescription};
//!
//! #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! struct CreateTicket { order_id: String, items: Vec<String> }
//! impl Contract for CreateTicket {
//!     const TYPE: &'static str = "kitchen.CreateTicket";
//!     const KIND: MessageKind = MessageKind::Command;
//! }
//! impl Command for CreateTicket {
//!     const CHANNEL: &'static str = "kitchen";
//!     type Reply = TicketCreated;
//!     type Failure = Rejection;
//! }
//! #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! struct TicketCreated { ticket_id: u64 }
//! impl Contract for TicketCreated {
//!     const TYPE: &'static str = "kitchen.TicketCreated";
//!     const KIND: MessageKind = MessageKind::Reply;
//! }
//!
//! let description = ServiceDescription::new("order-service").sends_command::<CreateTicket>();
//! let doc = courier_asyncapi::asyncapi(&description);
//! let yaml = doc.to_yaml()?;
//! assert!(yaml.starts_with("asyncapi: 3.0.0\n"));
//! # Ok::<(), courier_asyncapi::Error>(())
//! ```
//!
//! See [`asyncapi`] for the layout of the document (channels, operations, replies,
//! `x-courier-*` extensions).
//!
//! # Contract check
//!
//! [`check`] (and `courier contract check OLD NEW`) compares two documents and lists the
//! changes in NEW that break what was written against OLD. It looks at the message types
//! (`components.messages`), matched by name (`x-courier-type`, else `name`) and major
//! version (`x-courier-version`, else the `_v<N>` suffix of the message id), and compares
//! their payload schemas, following `$ref`s in each document.
//!
//! A message type is read by consumers and written by producers, and the check does not
//! assume which side an old program is on: a change is breaking when consumers of OLD
//! cannot read NEW's messages **or** NEW's consumers cannot read messages written against
//! OLD (schema registries call this *full* compatibility). This is the rule of
//! [`Contract`](courier_core::Contract): adding an optional field is a MINOR change,
//! anything else a MAJOR one.
//!
//! Breaking ([`Change`]):
//! - a message type of OLD is missing from NEW, unless NEW has the same name with a higher
//!   major version: that is a deliberate major bump, reported as a [`Note`], not a
//!   failure (consumers of the old major must upcast or upgrade, which the bump says);
//! - the content type changed;
//! - a required field was removed, or renamed (one required field gone and one new field
//!   with the same schema is reported once, as a rename);
//! - a required field became optional, or an optional field became required;
//! - a new required field;
//! - a field's type changed (`integer` → `string`, struct → enum, any value → a type),
//!   compared after following `$ref`s; a field that may now be `null` or no longer may
//!   (a nullability change that comes with a required-ness change is reported once);
//! - a `format` changed (`uint32` → `uint64`, `int32` → `int64`, `date-time` added);
//! - an enum value removed **or added** (a consumer of OLD fails on a value it does not
//!   know: serde rejects unknown enum variants), the same for `oneOf` variants of enums
//!   with data; values restricted where any was allowed, or the reverse;
//! - an optional field removed while NEW rejects unknown fields
//!   (`additionalProperties: false`, serde's `deny_unknown_fields`).
//!
//! Compatible: new optional fields, removed optional fields (readers default them, and
//! unknown fields are ignored), new message types, new major versions beside the old
//! ones, new channels and operations, and documentation (`description`, `title`,
//! summaries, examples). Channels and operations themselves are not compared: moving a
//! message to another channel is not caught.
#![deny(missing_docs)]

mod check;
mod document;
mod error;
mod generate;
mod ids;
mod io;
mod schema;

pub use check::{Breaking, Change, Comparison, Note, check, compare};
pub use document::{
    ASYNCAPI_VERSION, Action, Channel, Components, CorrelationId, Document, Info, Message,
    Operation, Reference, Reply, ReplyAddress,
};
pub use error::{Error, Result};
pub use generate::{CORRELATION_ID_LOCATION, REPLY_TO_LOCATION, asyncapi};
pub use io::{load, parse, to_json, to_yaml};
