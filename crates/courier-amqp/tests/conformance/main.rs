//! The transport conformance suite (`courier-testkit`) against a real RabbitMQ at
//! `COURIER_TEST_AMQP_URL`, plus RabbitMQ-specific checks.
//!
//! Without `COURIER_TEST_AMQP_URL` every test prints why it skips and passes, except when
//! `CI` is set: there a missing server is a failure. Each subscriber is its own
//! transport and each subscription its own connection (like another process). Channels
//! and groups have unique names; the queues and streams a test created are deleted when
//! its factory is dropped (and streams expire after an hour should a run be killed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod extra;
mod support;

use support::factory;

courier_testkit::conformance_tests!(match factory().await {
    Some(f) => std::future::ready(f),
    None => return,
});
