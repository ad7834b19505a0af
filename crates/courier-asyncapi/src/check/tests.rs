//! One test per kind of change, on documents built from Rust types.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use super::*;
use crate::asyncapi;
use courier_core::{Contract, MessageKind, ServiceDescription};
use serde::{Deserialize, Serialize};

/// The document of a service that sends `T` on channel `orders`.
fn doc_of<T: Contract>() -> Value {
    asyncapi(&ServiceDescription::new("order-service").sends::<T>("orders"))
        .to_value()
        .unwrap()
}

fn lines(old: &Value, new: &Value) -> Vec<String> {
    check(old, new).iter().map(ToString::to_string).collect()
}

fn changes(old: &Value, new: &Value) -> Vec<(Option<String>, Change)> {
    check(old, new)
        .into_iter()
        .map(|b| (b.path, b.change))
        .collect()
}

fn field(path: &str, change: Change) -> (Option<String>, Change) {
    (Some(path.to_owned()), change)
}

macro_rules! contract {
    ($t:ty, $name:literal) => {
        contract!($t, $name, 1, 0);
    };
    ($t:ty, $name:literal, $major:literal, $minor:literal) => {
        impl Contract for $t {
            const TYPE: &'static str = $name;
            const VERSION: u32 = $major;
            const MINOR: u32 = $minor;
            const KIND: MessageKind = MessageKind::Event;
        }
    };
}

mod v1 {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct Item {
        pub sku: String,
        pub qty: u32,
        pub price_cents: i64,
    }

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) enum Status {
        Placed,
        Paid,
        Shipped,
    }

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) enum Payment {
        Card { last4: String },
        Voucher(String),
        Cash,
    }

    /// An order was placed.
    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        pub order_id: String,
        pub customer: String,
        pub items: Vec<Item>,
        pub status: Status,
        pub payment: Payment,
        pub note: Option<String>,
    }
    contract!(OrderPlaced, "order.OrderPlaced");
}

#[test]
fn the_same_document_is_compatible() {
    let doc = doc_of::<v1::OrderPlaced>();
    assert_eq!(compare(&doc, &doc), Comparison::default());
}

mod added_optional {
    use super::*;

    /// An order was placed (now with a coupon and better docs).
    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        /// The order's id.
        pub order_id: String,
        pub customer: String,
        pub items: Vec<v1::Item>,
        pub status: v1::Status,
        pub payment: v1::Payment,
        pub note: Option<String>,
        pub coupon: Option<String>,
        #[serde(default)]
        pub gift: bool,
    }
    contract!(OrderPlaced, "order.OrderPlaced", 1, 1);
}

#[test]
fn added_optional_fields_and_docs_are_compatible() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = doc_of::<added_optional::OrderPlaced>();
    assert_eq!(lines(&old, &new), Vec::<String>::new());
}

mod removed_required {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        pub order_id: String,
        pub items: Vec<v1::Item>,
        pub status: v1::Status,
        pub payment: v1::Payment,
    }
    contract!(OrderPlaced, "order.OrderPlaced");
}

#[test]
fn a_removed_required_field_breaks_and_a_removed_optional_one_does_not() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = doc_of::<removed_required::OrderPlaced>();
    assert_eq!(
        lines(&old, &new),
        ["order.OrderPlaced v1: field customer: required field removed"]
    );
}

mod renamed {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        pub order_id: String,
        pub customer_id: String,
        pub items: Vec<v1::Item>,
        pub status: v1::Status,
        pub payment: v1::Payment,
        pub note: Option<String>,
    }
    contract!(OrderPlaced, "order.OrderPlaced");
}

#[test]
fn a_renamed_required_field_is_one_change() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = doc_of::<renamed::OrderPlaced>();
    assert_eq!(
        changes(&old, &new),
        [field(
            "customer",
            Change::FieldRenamed {
                to: "customer_id".into()
            }
        )]
    );
}

mod nested_type {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct Item {
        pub sku: String,
        pub qty: u32,
        pub price_cents: String,
    }

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        pub order_id: String,
        pub customer: u64,
        pub items: Vec<Item>,
        pub status: v1::Status,
        pub payment: v1::Payment,
        pub note: Option<String>,
    }
    contract!(OrderPlaced, "order.OrderPlaced");
}

#[test]
fn a_changed_type_breaks_also_inside_referenced_types() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = doc_of::<nested_type::OrderPlaced>();
    assert_eq!(
        lines(&old, &new),
        [
            "order.OrderPlaced v1: field customer: type changed from string to integer",
            "order.OrderPlaced v1: field items[].price_cents: type changed from integer to string",
        ]
    );
}

mod optionality {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        pub order_id: String,
        pub customer: Option<String>,
        pub items: Vec<v1::Item>,
        pub status: v1::Status,
        pub payment: v1::Payment,
        pub note: String,
    }
    contract!(OrderPlaced, "order.OrderPlaced");
}

#[test]
fn required_ness_changes_break_both_ways_once_per_field() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = doc_of::<optionality::OrderPlaced>();
    assert_eq!(
        changes(&old, &new),
        [
            field("customer", Change::NoLongerRequired),
            field("note", Change::BecameRequired),
        ]
    );
}

mod new_required {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        pub order_id: String,
        pub customer: String,
        pub items: Vec<v1::Item>,
        pub status: v1::Status,
        pub payment: v1::Payment,
        pub note: Option<String>,
        pub total_cents: i64,
    }
    contract!(OrderPlaced, "order.OrderPlaced", 1, 1);
}

#[test]
fn a_new_required_field_breaks() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = doc_of::<new_required::OrderPlaced>();
    assert_eq!(
        changes(&old, &new),
        [field("total_cents", Change::RequiredFieldAdded)]
    );
}

mod enums {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) enum Status {
        Placed,
        Shipped,
        Cancelled,
    }

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) enum Payment {
        Card { last4: u16 },
        Cash,
        Invoice(String),
    }

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        pub order_id: String,
        pub customer: String,
        pub items: Vec<v1::Item>,
        pub status: Status,
        pub payment: Payment,
        pub note: Option<String>,
    }
    contract!(OrderPlaced, "order.OrderPlaced");
}

#[test]
fn enum_values_and_variants_removed_or_added_break() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = doc_of::<enums::OrderPlaced>();
    assert_eq!(
        lines(&old, &new),
        [
            "order.OrderPlaced v1: field payment(Card).last4: type changed from string to integer",
            "order.OrderPlaced v1: field payment: variant Voucher removed",
            "order.OrderPlaced v1: field payment: variant Invoice added (consumers of OLD cannot read it)",
            "order.OrderPlaced v1: field status: enum value \"Paid\" removed",
            "order.OrderPlaced v1: field status: enum value \"Cancelled\" added (consumers of OLD cannot read it)",
        ]
    );
}

mod formats {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct Item {
        pub sku: String,
        pub qty: u64,
        pub price_cents: i64,
    }

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        pub order_id: String,
        pub customer: String,
        pub items: Vec<Item>,
        pub status: v1::Status,
        pub payment: v1::Payment,
        pub note: Option<String>,
    }
    contract!(OrderPlaced, "order.OrderPlaced");
}

#[test]
fn a_changed_integer_width_breaks() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = doc_of::<formats::OrderPlaced>();
    assert_eq!(
        lines(&old, &new),
        ["order.OrderPlaced v1: field items[].qty: format changed from uint32 to uint64"]
    );
}

mod major_two {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct OrderPlaced {
        pub id: u64,
    }
    contract!(OrderPlaced, "order.OrderPlaced", 2, 0);
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct OrderShipped {
    order_id: String,
}
contract!(OrderShipped, "order.OrderShipped");

#[test]
fn a_removed_message_breaks_unless_a_later_major_replaces_it() {
    let both = asyncapi(
        &ServiceDescription::new("order-service")
            .sends::<v1::OrderPlaced>("orders")
            .sends::<OrderShipped>("orders"),
    )
    .to_value()
    .unwrap();
    let placed_only = doc_of::<v1::OrderPlaced>();
    assert_eq!(
        lines(&both, &placed_only),
        ["order.OrderShipped v1: message type removed (NEW has no later major version of it)"]
    );

    let v2 = doc_of::<major_two::OrderPlaced>();
    let found = compare(&placed_only, &v2);
    assert!(found.is_compatible(), "{:?}", found.breaking);
    assert_eq!(
        found.notes,
        [Note {
            message: "order.OrderPlaced".into(),
            old_major: 1,
            new_major: 2
        }]
    );

    // Going back down is a removal.
    assert_eq!(changes(&v2, &placed_only), [(None, Change::MessageRemoved)]);
}

#[test]
fn added_messages_channels_and_majors_are_compatible() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = asyncapi(
        &ServiceDescription::new("order-service")
            .sends::<v1::OrderPlaced>("orders")
            .sends::<major_two::OrderPlaced>("orders-v2")
            .sends::<OrderShipped>("shipping"),
    )
    .to_value()
    .unwrap();
    assert_eq!(compare(&old, &new), Comparison::default());
}

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
struct Tree {
    name: String,
    children: Vec<Tree>,
}
contract!(Tree, "doc.Tree");

mod tree2 {
    use super::*;

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    pub(super) struct Tree {
        pub name: u32,
        pub children: Vec<Tree>,
    }
    contract!(Tree, "doc.Tree");
}

#[test]
fn recursive_types_are_compared_once() {
    let old = doc_of::<Tree>();
    let new = doc_of::<tree2::Tree>();
    assert!(check(&old, &old).is_empty());
    assert_eq!(
        lines(&old, &new),
        ["doc.Tree v1: field name: type changed from string to integer"]
    );
}

#[test]
fn a_changed_content_type_breaks() {
    let old = doc_of::<OrderShipped>();
    let mut new = old.clone();
    new["components"]["messages"]["order_OrderShipped_v1"]["contentType"] =
        "application/x-protobuf".into();
    assert_eq!(
        lines(&old, &new),
        [
            "order.OrderShipped v1: content type changed from application/json to application/x-protobuf"
        ]
    );
}

#[test]
fn removing_an_optional_field_breaks_only_when_unknown_fields_are_rejected() {
    let old = serde_json::json!({
        "asyncapi": "3.0.0",
        "components": {"messages": {"m_v1": {"payload": {
            "type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
            "required": ["a"]
        }}}}
    });
    let mut new = old.clone();
    new["components"]["messages"]["m_v1"]["payload"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("b");
    assert!(check(&old, &new).is_empty());
    new["components"]["messages"]["m_v1"]["payload"]["additionalProperties"] = false.into();
    assert_eq!(
        lines(&old, &new),
        [
            "m_v1 v1: field b: optional field removed while NEW rejects unknown fields (additionalProperties: false)"
        ]
    );
}

#[test]
fn yaml_documents_give_the_same_answer() {
    let old = doc_of::<v1::OrderPlaced>();
    let new = doc_of::<nested_type::OrderPlaced>();
    let reload = |v: &Value| crate::parse(&crate::to_yaml(v).unwrap(), "yaml").unwrap();
    assert_eq!(check(&reload(&old), &reload(&new)), check(&old, &new));
}
