//! The generated documents pass the official AsyncAPI parser (`@asyncapi/parser`, run by
//! `tools/asyncapi-parser/validate.mjs` with the machine's `node`), and a broken one
//! does not.
//!
//! `COURIER_TEST_ASYNCAPI_PARSER` is the path of `validate.mjs` (after
//! `npm ci --prefix tools/asyncapi-parser`). Unset, the test is skipped with a printed
//! reason, except when `CI` is set, where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use courier_asyncapi::{Document, asyncapi, to_yaml};
use courier_core::describe::{
    Action, MessageDescription, OperationDescription, ServiceDescription, Style,
};
use courier_core::{Command, Contract, DomainEvent, MessageKind, Notification, Rejection};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

const SCRIPT_VAR: &str = "COURIER_TEST_ASYNCAPI_PARSER";
const REPLY_CHANNEL: &str = "order-service.replies";
const GROUP: &str = "order-service";

/// The validator script, or `None` (skip) when it is not configured outside CI.
fn validator() -> Option<PathBuf> {
    match std::env::var_os(SCRIPT_VAR) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "{SCRIPT_VAR}={} is not a file; it must be tools/asyncapi-parser/validate.mjs",
                path.display()
            );
            Some(path)
        }
        None if std::env::var_os("CI").is_some() => panic!(
            "{SCRIPT_VAR} is not set, and CI is: set it to the path of \
             tools/asyncapi-parser/validate.mjs (after `npm ci --prefix tools/asyncapi-parser`)"
        ),
        None => {
            eprintln!(
                "skipped: {SCRIPT_VAR} is not set (the path of tools/asyncapi-parser/validate.mjs, \
                 after `npm ci --prefix tools/asyncapi-parser`)"
            );
            None
        }
    }
}

/// Run the validator on `text` written to `file_name`; (success, stdout + stderr).
/// Warnings count as failures for the documents Courier writes (`strict`); the broken
/// documents must fail on errors alone.
fn validate(script: &Path, file_name: &str, text: &str, strict: bool) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(file_name);
    std::fs::write(&file, text).unwrap();
    let mut node = Process::new("node");
    node.arg(script).arg(&file);
    if strict {
        node.arg("--strict");
    }
    let out = node
        .output()
        .expect("cannot run `node`: is Node.js installed and on PATH?");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "the validator did not run ({}): {report}",
        out.status
    );
    (out.status.success(), report)
}

// --- The messages of a realistic order service -------------------------------------

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct Money {
    cents: i64,
    currency: Currency,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
enum Currency {
    Eur,
    Usd,
}

/// One line of an order.
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct LineItem {
    /// The menu item.
    menu_item_id: String,
    quantity: u32,
    /// The price of one, when the restaurant gave it.
    unit_price: Option<Money>,
    options: Vec<String>,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "method", rename_all = "snake_case")]
enum Payment {
    Card { last4: String, expires: String },
    Voucher { code: String },
    OnDelivery,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
enum Delivery {
    Pickup,
    Courier { address: Address },
    Locker(String),
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct Address {
    street: String,
    city: String,
    postal_code: Option<String>,
}

/// A category tree (recursive).
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct Category {
    name: String,
    children: Vec<Category>,
}

/// An order was placed.
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct OrderPlaced {
    order_id: String,
    consumer_id: String,
    items: Vec<LineItem>,
    total: Money,
    payment: Payment,
    delivery: Delivery,
    note: Option<String>,
    tags: BTreeMap<String, String>,
}
impl Contract for OrderPlaced {
    const TYPE: &'static str = "order.OrderPlaced";
    const VERSION: u32 = 2;
    const MINOR: u32 = 3;
    const KIND: MessageKind = MessageKind::Event;
}
impl DomainEvent for OrderPlaced {
    const AGGREGATE: &'static str = "order";
    fn aggregate_id(&self) -> String {
        self.order_id.clone()
    }
}

/// Ask the kitchen for a ticket.
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct CreateTicket {
    order_id: String,
    items: Vec<LineItem>,
    ready_by: Option<u64>,
}
impl Contract for CreateTicket {
    const TYPE: &'static str = "kitchen.CreateTicket";
    const KIND: MessageKind = MessageKind::Command;
}
impl Command for CreateTicket {
    const CHANNEL: &'static str = "kitchen";
    type Reply = TicketCreated;
    type Failure = Rejection;
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct TicketCreated {
    ticket_id: u64,
}
impl Contract for TicketCreated {
    const TYPE: &'static str = "kitchen.TicketCreated";
    const KIND: MessageKind = MessageKind::Reply;
}

/// Approve an order (this service handles it).
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct ApproveOrder {
    order_id: String,
}
impl Contract for ApproveOrder {
    const TYPE: &'static str = "order.ApproveOrder";
    const KIND: MessageKind = MessageKind::Command;
}
impl Command for ApproveOrder {
    const CHANNEL: &'static str = "order-commands";
    type Reply = OrderApproved;
    type Failure = Rejection;
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct OrderApproved {
    order_id: String,
    approved_at_ms: u64,
}
impl Contract for OrderApproved {
    const TYPE: &'static str = "order.OrderApproved";
    const KIND: MessageKind = MessageKind::Reply;
}

/// Tell the consumer something (no reply).
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct NotifyConsumer {
    consumer_id: String,
    text: String,
}
impl Contract for NotifyConsumer {
    const TYPE: &'static str = "notification.NotifyConsumer";
    const KIND: MessageKind = MessageKind::Command;
}
impl Notification for NotifyConsumer {
    const CHANNEL: &'static str = "notifications";
}

/// A restaurant changed its menu (another service's event this one consumes).
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct MenuRevised {
    restaurant_id: String,
    categories: Vec<Category>,
}
impl Contract for MenuRevised {
    const TYPE: &'static str = "restaurant.MenuRevised";
    const KIND: MessageKind = MessageKind::Event;
}
impl DomainEvent for MenuRevised {
    const AGGREGATE: &'static str = "restaurant";
    fn aggregate_id(&self) -> String {
        self.restaurant_id.clone()
    }
}

/// A plain message handled with `on::<T>()` (its channel is the subscription's).
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct AuditNote {
    text: String,
}
impl Contract for AuditNote {
    const TYPE: &'static str = "audit.Note";
    const KIND: MessageKind = MessageKind::Document;
}

/// An order service as its dispatcher (replies on its own reply channel, handles a
/// command, subscribes to another service's event, a plain `on::<T>()` handler) merged
/// with what it sends through its outbox.
fn order_service() -> ServiceDescription {
    ServiceDescription::new("order-service")
        .version("2.3.0")
        .describe("Takes orders and follows them until delivery.")
        .sends_command::<CreateTicket>()
        .publishes::<OrderPlaced>()
        .sends_notification::<NotifyConsumer>()
        .receives_replies::<CreateTicket>(REPLY_CHANNEL, GROUP)
        .handles_command::<ApproveOrder>(GROUP)
        .subscribes::<MenuRevised>(GROUP)
        // What `Dispatcher::on::<AuditNote>()` describes: the channel is the subscription's.
        .operation(OperationDescription {
            action: Action::Receive,
            channel: None,
            style: Style::Message,
            message: MessageDescription::of::<AuditNote>(),
            replies: Vec::new(),
            group: Some(GROUP.to_owned()),
        })
}

/// A service whose reply channel is not known: command replies use the runtime
/// expression on a channel with a null address.
fn sender_without_reply_channel() -> ServiceDescription {
    ServiceDescription::new("kitchen-client").sends_command::<CreateTicket>()
}

fn value(doc: &Document) -> Value {
    doc.to_value().unwrap()
}

#[test]
fn generated_documents_pass_the_asyncapi_parser() {
    let Some(script) = validator() else { return };
    for description in [order_service(), sender_without_reply_channel()] {
        let doc = asyncapi(&description);
        let yaml = doc.to_yaml().unwrap();
        let (ok, report) = validate(&script, "asyncapi.yaml", &yaml, true);
        assert!(
            ok,
            "{} (YAML) is invalid:\n{report}\n{yaml}",
            description.service
        );
        let json = doc.to_json().unwrap();
        let (ok, report) = validate(&script, "asyncapi.json", &json, true);
        assert!(ok, "{} (JSON) is invalid:\n{report}", description.service);
    }
}

#[test]
fn the_document_has_what_the_description_says() {
    let doc = value(&asyncapi(&order_service()));
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["info"]["title"], "order-service");
    assert_eq!(doc["info"]["version"], "2.3.0");

    // The command this service sends: replies on its own reply channel.
    let send = &doc["operations"]["send_kitchen_CreateTicket_v1"];
    assert_eq!(send["action"], "send");
    assert_eq!(send["channel"]["$ref"], "#/channels/kitchen");
    assert_eq!(
        send["reply"]["channel"]["$ref"],
        "#/channels/order-service.replies"
    );
    assert_eq!(
        doc["channels"]["order-service.replies"]["address"],
        REPLY_CHANNEL
    );
    assert_eq!(
        send["reply"]["messages"][0]["$ref"],
        "#/channels/order-service.replies/messages/kitchen_TicketCreated_v1"
    );

    // The command it handles: replies go to the reply-to header's channel.
    let handle = &doc["operations"]["receive_order_ApproveOrder_v1"];
    assert_eq!(handle["x-courier-group"], GROUP);
    assert_eq!(
        handle["reply"]["address"]["location"],
        "$message.header#/reply-to"
    );
    assert_eq!(handle["reply"]["channel"]["$ref"], "#/channels/reply-to");
    assert_eq!(doc["channels"]["reply-to"]["address"], Value::Null);

    // The event: major version in the id, extensions, headers, nested schemas moved out.
    let event = &doc["components"]["messages"]["order_OrderPlaced_v2"];
    assert_eq!(event["name"], "order.OrderPlaced");
    assert_eq!(event["x-courier-version"], "2.3");
    assert_eq!(event["x-courier-kind"], "event");
    assert_eq!(event["x-courier-partition-key"], "the order id");
    assert_eq!(event["description"], "An order was placed.");
    assert!(
        event["headers"]["required"]
            .as_array()
            .unwrap()
            .contains(&"partition-key".into())
    );
    assert_eq!(
        event["payload"]["properties"]["total"]["$ref"],
        "#/components/schemas/Money"
    );
    assert!(doc["components"]["schemas"]["LineItem"].is_object());
    assert!(!doc.to_string().contains("#/definitions/"));

    // The recursive type became a component that refers to itself.
    assert_eq!(
        doc["components"]["schemas"]["Category"]["properties"]["children"]["items"]["$ref"],
        "#/components/schemas/Category"
    );

    // A sender whose reply channel the description does not know: the reply goes to the
    // address in the reply-to header, on a channel with a null address.
    let doc = value(&asyncapi(&sender_without_reply_channel()));
    let reply = &doc["operations"]["send_kitchen_CreateTicket_v1"]["reply"];
    assert_eq!(
        reply["address"]["location"],
        courier_asyncapi::REPLY_TO_LOCATION
    );
    assert_eq!(reply["channel"]["$ref"], "#/channels/reply-to");
    assert_eq!(doc["channels"]["reply-to"]["address"], Value::Null);
    assert_eq!(
        reply["messages"][1]["$ref"],
        "#/channels/reply-to/messages/courier_Rejection_v1"
    );
}

#[test]
fn a_plain_handler_gets_a_channel_with_a_null_address() {
    let doc = value(&asyncapi(&order_service()));
    // The plain handler's channel is only known at run time.
    let audit = &doc["operations"]["receive_audit_Note_v1"];
    let channel = audit["channel"]["$ref"].as_str().unwrap();
    let id = channel.trim_start_matches("#/channels/");
    assert_eq!(doc["channels"][id]["address"], Value::Null);
}

#[test]
fn a_broken_document_fails_the_parser() {
    let Some(script) = validator() else { return };
    let mut doc = value(&asyncapi(&order_service()));
    doc["operations"]["send_order_OrderPlaced_v2"]["channel"]["$ref"] =
        "#/channels/no-such-channel".into();
    let (ok, report) = validate(&script, "broken.yaml", &to_yaml(&doc).unwrap(), false);
    assert!(
        !ok,
        "the parser accepted an operation on a missing channel:\n{report}"
    );
    assert!(report.contains("no-such-channel"), "{report}");

    // A payload whose reference was not moved out of `definitions` is caught too.
    let mut doc = value(&asyncapi(&order_service()));
    doc["components"]["messages"]["order_OrderPlaced_v2"]["payload"]["properties"]["total"]["$ref"] =
        "#/definitions/Money".into();
    let (ok, report) = validate(&script, "dangling.yaml", &to_yaml(&doc).unwrap(), false);
    assert!(!ok, "the parser accepted a dangling $ref:\n{report}");
}
