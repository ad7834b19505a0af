//! The transport conformance suite (`courier-testkit`) against PostgreSQL as a broker
//! (`PgBroker`) on the real server at `COURIER_TEST_POSTGRES_URL`, plus broker-specific
//! checks: fencing, offsets in commit order under concurrent publishers, retention,
//! introspection, malformed rows and connection errors.
//!
//! Without `COURIER_TEST_POSTGRES_URL` every test prints why it skips and passes, except
//! when `CI` is set: there a missing server is a failure. Each test uses a schema of its
//! own, so tests run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod broker;
mod support;

use support::PgFactory;

// Skip-aware: with no server configured, each test returns before building a factory.
courier_testkit::conformance_tests!(match PgFactory::start().await {
    Some(f) => std::future::ready(f),
    None => return,
});

/// The whole suite on ONE broker, one test after the other, as `run_conformance` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_suite_on_one_broker() {
    let Some(f) = PgFactory::start().await else {
        return;
    };
    courier_testkit::run_conformance(f).await;
}
