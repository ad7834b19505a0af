//! # Courier
//!
//! Reliable asynchronous messaging for Rust microservices: a service commits its change
//! and the messages it must send in ONE local transaction (transactional outbox), answers,
//! and finishes the work through a broker. Consumers are idempotent (inbox), failures are
//! retried and dead-lettered.
//!
//! This facade re-exports [`courier_core`] (message model, transport traits, dispatcher)
//! and, behind features, the backends:
//! - `sqlite` (default): [`sqlite::SqliteStore`] (outbox, inbox, dead letters) and the
//!   embedded broker [`sqlite::SqliteBroker`];
//! - `postgres`: `postgres::PgStore`, the same service-database API on PostgreSQL;
//! - `nats`: the NATS JetStream transport (`nats::NatsTransport`);
//! - `amqp`: the RabbitMQ transport (`amqp::AmqpTransport`).
//!
//! The [`Relay`] publishes any store's outbox through any [`Publisher`].
//!
//! ```no_run
//! use courier::{ChannelName, Contract, Codec, MessageKind};
//! use courier::sqlite::{SqliteBroker, SqliteStore};
//!
//! #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! struct OrderPlaced { order_id: String }
//! impl Contract for OrderPlaced {
//!     const TYPE: &'static str = "order.OrderPlaced";
//!     const KIND: MessageKind = MessageKind::Event;
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteStore::open("orders.db").await?;
//! let orders = ChannelName::new("order")?;
//! let mut tx = store.begin().await?;
//! // ... the business change on &mut *tx ...
//! let msg = Codec::encode_to(&OrderPlaced { order_id: "o-1".into() }, &orders)?.with_key("o-1")?;
//! store.outbox().send(&mut tx, msg).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod connect;

pub use courier_core as core;
pub use courier_core::*;

/// SQLite: service database (outbox, inbox, dead letters), relay, embedded broker.
#[cfg(feature = "sqlite")]
pub use courier_sqlite as sqlite;

/// PostgreSQL: service database (outbox, inbox, dead letters) with LISTEN/NOTIFY wake-ups.
#[cfg(feature = "postgres")]
pub use courier_postgres as postgres;

/// NATS JetStream: a partitioned transport with consumer groups.
#[cfg(feature = "nats")]
pub use courier_nats as nats;

/// RabbitMQ: a partitioned transport (one stream per partition) with consumer groups.
#[cfg(feature = "amqp")]
pub use courier_amqp as amqp;

/// The README's code, compiled as doctests so the tour never drifts from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
