//! # courier-testkit
//!
//! The ONE transport conformance suite every Courier backend runs (in the style of
//! Watermill's `pubsub/tests/test_pubsub.go`), and the helpers it is written with.
//!
//! A backend implements [`TransportFactory`] (fresh publishers and subscribers on the
//! SAME broker; a second subscriber behaves like another process joining the group) and
//! either calls [`run_conformance`] once, or — better, so a failure names its test —
//! generates one `#[tokio::test]` per conformance test with [`conformance_tests!`]:
//!
//! ```text
//! async fn factory() -> MyFactory { MyFactory::start().await }
//! courier_testkit::conformance_tests!(factory());
//! ```
//!
//! Every test picks unique channel and group names, so tests may share one broker, and
//! skips itself (with a printed reason) when the backend's [`Capabilities`](courier_core::Capabilities) say it does
//! not apply. Tests never sleep to synchronise: they wait for conditions with a deadline.
#![deny(missing_docs)]

mod factory;
mod member;
pub mod relay_suite;
pub mod suite;
mod support;

pub use factory::TransportFactory;
pub use member::{Journal, Member, Seen};
pub use support::{
    TIMEOUT, assert_per_key_order, collect, collect_acked, group, keyed, parse_keyed, unique,
    unique_channel, wait_until,
};

use courier_core::transport::BoxFuture;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

/// One conformance test: takes the factory, panics on failure.
pub type ConformanceTest = for<'a> fn(&'a dyn TransportFactory) -> BoxFuture<'a, ()>;

/// How long one conformance test may take in total before it counts as hung.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Lists every conformance test, calling back `$mac!($($prefix)* ; name, name, ...)`.
/// The single source of the list behind [`ALL`] and [`conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __with_conformance_tests {
    ($mac:path, $($prefix:tt)*) => {
        $mac!($($prefix)* ;
            publish_confirms_and_positions,
            per_key_order,
            competing_consumers,
            fan_out_to_groups,
            redelivery_after_crash,
            acked_not_redelivered,
            rebalance_on_join,
            rebalance_on_leave,
            nack_with_delay,
            bad_input,
            many_channels,
            large_messages,
            start_from_latest,
        );
    };
}

macro_rules! table {
    (; $($name:ident),+ $(,)?) => {
        /// Every conformance test with its name, in the order [`run_conformance`] runs them.
        pub const ALL: &[(&str, ConformanceTest)] =
            &[$((stringify!($name), |f| Box::pin(suite::$name(f)))),+];
    };
}
__with_conformance_tests!(table,);

/// Generate one `#[tokio::test]` (multi-threaded runtime, 2 workers) per conformance test.
///
/// `$factory` is an expression evaluated afresh in each test that yields a future of a
/// [`TransportFactory`] (e.g. a call of an `async fn`), so each test may get its own
/// broker. The calling crate needs `tokio` with the `macros` and `rt-multi-thread`
/// features. Pass names after a `;` to generate only those tests.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::__with_conformance_tests!($crate::conformance_tests, $factory);
    };
    ($factory:expr ; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let factory = $factory.await;
                $crate::run_test(
                    stringify!($name),
                    &factory,
                    |f| ::std::boxed::Box::pin($crate::suite::$name(f)),
                )
                .await;
            }
        )+
    };
}

/// Run one conformance test with the [`TEST_TIMEOUT`]; panics naming the test when it
/// fails or hangs.
pub async fn run_test(name: &str, factory: &dyn TransportFactory, test: ConformanceTest) {
    let started = Instant::now();
    match tokio::time::timeout(TEST_TIMEOUT, AssertUnwindSafe(test(factory)).catch_unwind()).await {
        Ok(Ok(())) => eprintln!("conformance: {name} ok in {:?}", started.elapsed()),
        Ok(Err(panic)) => {
            eprintln!("conformance: {name} FAILED after {:?}", started.elapsed());
            std::panic::resume_unwind(panic)
        }
        Err(_) => panic!("conformance: {name} did not finish within {TEST_TIMEOUT:?}"),
    }
}

/// Run every conformance test that fits the factory's capabilities, one after the other
/// on the same factory (so on the same broker). Panics at the end, naming every test that
/// failed.
pub async fn run_conformance(factory: impl TransportFactory) {
    let mut failed = Vec::new();
    for (name, test) in ALL {
        let outcome = AssertUnwindSafe(run_test(name, &factory, *test))
            .catch_unwind()
            .await;
        if let Err(panic) = outcome {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "(no message)".to_owned());
            failed.push(format!("{name}: {why}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} conformance tests failed:\n  {}",
        failed.len(),
        ALL.len(),
        failed.join("\n  ")
    );
}
