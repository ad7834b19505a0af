//! The contracts of the two test services.

use courier_core::{Command, Contract, DomainEvent, MessageKind, Notification, Rejection};
use serde::{Deserialize, Serialize};

pub(crate) const REPLIES: &str = "order-service.replies";

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ValidateConsumer {
    pub(crate) consumer_id: String,
}
impl Contract for ValidateConsumer {
    const TYPE: &'static str = "consumer.ValidateConsumer";
    const KIND: MessageKind = MessageKind::Command;
}
impl Command for ValidateConsumer {
    const CHANNEL: &'static str = "consumer-service.commands";
    type Reply = ConsumerValidated;
    type Failure = Rejection;
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ConsumerValidated {
    pub(crate) consumer_id: String,
}
impl Contract for ConsumerValidated {
    const TYPE: &'static str = "consumer.ConsumerValidated";
    const KIND: MessageKind = MessageKind::Reply;
}

/// A command nobody registered a handler for.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct AuditConsumer {
    pub(crate) consumer_id: String,
}
impl Contract for AuditConsumer {
    const TYPE: &'static str = "consumer.AuditConsumer";
    const KIND: MessageKind = MessageKind::Command;
}
impl Command for AuditConsumer {
    const CHANNEL: &'static str = "consumer-service.commands";
    type Reply = ConsumerValidated;
    type Failure = Rejection;
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct SuspendConsumer {
    pub(crate) consumer_id: String,
}
impl Contract for SuspendConsumer {
    const TYPE: &'static str = "consumer.SuspendConsumer";
    const KIND: MessageKind = MessageKind::Command;
}
impl Notification for SuspendConsumer {
    const CHANNEL: &'static str = "consumer-service.commands";
}

/// Version 1 of the event (no reason).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ConsumerSuspendedV1 {
    pub(crate) consumer_id: String,
}
impl Contract for ConsumerSuspendedV1 {
    const TYPE: &'static str = "consumer.ConsumerSuspended";
    const VERSION: u32 = 1;
}
impl DomainEvent for ConsumerSuspendedV1 {
    const AGGREGATE: &'static str = "consumer";
    fn aggregate_id(&self) -> String {
        self.consumer_id.clone()
    }
}

/// Version 2: a required reason.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ConsumerSuspended {
    pub(crate) consumer_id: String,
    pub(crate) reason: String,
}
impl Contract for ConsumerSuspended {
    const TYPE: &'static str = "consumer.ConsumerSuspended";
    const VERSION: u32 = 2;
}
impl DomainEvent for ConsumerSuspended {
    const AGGREGATE: &'static str = "consumer";
    fn aggregate_id(&self) -> String {
        self.consumer_id.clone()
    }
}
impl From<ConsumerSuspendedV1> for ConsumerSuspended {
    fn from(v1: ConsumerSuspendedV1) -> Self {
        Self {
            consumer_id: v1.consumer_id,
            reason: "unknown (v1)".to_owned(),
        }
    }
}

/// Version 3, which the order service does not know.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ConsumerSuspendedV3 {
    pub(crate) id: u64,
}
impl Contract for ConsumerSuspendedV3 {
    const TYPE: &'static str = "consumer.ConsumerSuspended";
    const VERSION: u32 = 3;
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct QuoteRequest {
    pub(crate) item: String,
}
impl Contract for QuoteRequest {
    const TYPE: &'static str = "kitchen.QuoteRequest";
    const KIND: MessageKind = MessageKind::Command;
}
impl Command for QuoteRequest {
    const CHANNEL: &'static str = "kitchens.quotes";
    type Reply = Quote;
    type Failure = Rejection;
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct Quote {
    pub(crate) kitchen: String,
    pub(crate) cents: i64,
}
impl Contract for Quote {
    const TYPE: &'static str = "kitchen.Quote";
    const KIND: MessageKind = MessageKind::Reply;
}
