//! The messages the three services exchange (their public contract).

use courier::{Command, Contract, DomainEvent, MessageKind, Rejection};
use serde::{Deserialize, Serialize};

/// The order service's reply channel.
pub(crate) const ORDER_REPLIES: &str = "order-service.replies";

/// A menu item as the restaurant service publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct MenuItem {
    /// The item's id, unique within the restaurant.
    pub(crate) id: String,
    /// What the consumer sees.
    pub(crate) name: String,
    /// Price in cents.
    pub(crate) price_cents: i64,
}

/// A restaurant was created (aggregate `restaurant`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct RestaurantCreated {
    pub(crate) restaurant_id: String,
    pub(crate) name: String,
    /// Delivery zones served.
    pub(crate) zones: Vec<String>,
    pub(crate) menu: Vec<MenuItem>,
}
impl Contract for RestaurantCreated {
    const TYPE: &'static str = "restaurant.RestaurantCreated";
}
impl DomainEvent for RestaurantCreated {
    const AGGREGATE: &'static str = "restaurant";
    fn aggregate_id(&self) -> String {
        self.restaurant_id.clone()
    }
}

/// A restaurant's menu was replaced.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct MenuRevised {
    pub(crate) restaurant_id: String,
    pub(crate) menu: Vec<MenuItem>,
}
impl Contract for MenuRevised {
    const TYPE: &'static str = "restaurant.MenuRevised";
}
impl DomainEvent for MenuRevised {
    const AGGREGATE: &'static str = "restaurant";
    fn aggregate_id(&self) -> String {
        self.restaurant_id.clone()
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct LineItem {
    pub(crate) menu_item_id: String,
    pub(crate) quantity: u32,
}

/// Asks the restaurant service whether it can take an order (items on its current menu,
/// delivery zone served).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ValidateOrderDetails {
    pub(crate) order_id: String,
    pub(crate) restaurant_id: String,
    pub(crate) delivery_zone: String,
    pub(crate) line_items: Vec<LineItem>,
}
impl Contract for ValidateOrderDetails {
    const TYPE: &'static str = "restaurant.ValidateOrderDetails";
    const KIND: MessageKind = MessageKind::Command;
}
impl Command for ValidateOrderDetails {
    const CHANNEL: &'static str = "restaurant-service.commands";
    type Reply = OrderDetailsValidated;
    type Failure = Rejection;
}

/// The restaurant service accepts the order's details.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct OrderDetailsValidated {
    pub(crate) order_id: String,
    /// The total by the restaurant's current prices.
    pub(crate) total_cents: i64,
}
impl Contract for OrderDetailsValidated {
    const TYPE: &'static str = "restaurant.OrderDetailsValidated";
    const KIND: MessageKind = MessageKind::Reply;
}

/// Asks the consumer service whether a consumer may order.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ValidateConsumerInfo {
    pub(crate) order_id: String,
    pub(crate) consumer_id: String,
}
impl Contract for ValidateConsumerInfo {
    const TYPE: &'static str = "consumer.ValidateConsumerInfo";
    const KIND: MessageKind = MessageKind::Command;
}
impl Command for ValidateConsumerInfo {
    const CHANNEL: &'static str = "consumer-service.commands";
    type Reply = ConsumerValidated;
    type Failure = Rejection;
}

/// The consumer exists and is not suspended.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ConsumerValidated {
    pub(crate) consumer_id: String,
}
impl Contract for ConsumerValidated {
    const TYPE: &'static str = "consumer.ConsumerValidated";
    const KIND: MessageKind = MessageKind::Reply;
}

/// An order moved to a new state (aggregate `order`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct OrderStateChanged {
    pub(crate) order_id: String,
    /// PENDING, CONSUMER_VALIDATED, ORDER_DETAILS_VALIDATED, VALIDATED or REJECTED.
    pub(crate) state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}
impl Contract for OrderStateChanged {
    const TYPE: &'static str = "order.OrderStateChanged";
}
impl DomainEvent for OrderStateChanged {
    const AGGREGATE: &'static str = "order";
    fn aggregate_id(&self) -> String {
        self.order_id.clone()
    }
}
