//! The ONE relay suite every outbox source runs (SQLite, PostgreSQL polling, PostgreSQL
//! log tailing): the generic [`Relay`] on the backend's [`OutboxSource`], publishing to a
//! real broker.
//!
//! A backend implements [`OutboxFactory`] and generates one `#[tokio::test]` per
//! scenario with [`relay_tests!`](crate::relay_tests):
//!
//! ```text
//! async fn factory() -> Option<MyFactory> { Some(MyFactory::start().await) }
//! courier_testkit::relay_tests!(factory());
//! ```
//!
//! The factory future yields `None` to skip (a server that is not configured); every
//! scenario uses unique channel names. Scenarios wait for conditions with a deadline.

mod factory;
mod scenarios;

pub use factory::{FailingPublisher, OpenTransaction, OutboxFactory};
pub use scenarios::*;

use courier_core::{OutboxSource, Publisher, Relay, RelayConfig, RelayStats, Result};
use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long one relay scenario may take before it counts as hung.
pub const RELAY_TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Lists every relay scenario, calling back `$mac!($($prefix)* ; name, ...)`.
#[doc(hidden)]
#[macro_export]
macro_rules! __with_relay_tests {
    ($mac:path, $($prefix:tt)*) => {
        $mac!($($prefix)* ;
            order_kept_nothing_lost,
            small_batches_split_large_transactions,
            rows_committed_while_running_are_picked_up,
            delete_only_after_confirmed_publish,
            standby_takes_over,
            fenced_relay_cannot_confirm,
            late_commit_of_a_lower_sequence,
            unreadable_row_stops_the_relay_loudly,
        );
    };
}

/// Generate one `#[tokio::test]` (multi-threaded runtime, 2 workers) per relay scenario.
///
/// `$factory` is evaluated afresh in each test and yields a future of
/// `Option<impl OutboxFactory>` (`None`: skip, after printing why). Pass names after a
/// `;` to generate only those. The calling crate needs `tokio` with `macros` and
/// `rt-multi-thread`.
#[macro_export]
macro_rules! relay_tests {
    ($factory:expr) => {
        $crate::__with_relay_tests!($crate::relay_tests, $factory);
    };
    ($factory:expr ; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(factory) = $factory.await else { return };
                $crate::relay_suite::run_scenario(
                    stringify!($name),
                    $crate::relay_suite::$name(&factory),
                )
                .await;
            }
        )+
    };
}

/// Run one scenario with [`RELAY_TEST_TIMEOUT`]; panics naming it when it fails or hangs.
pub async fn run_scenario(name: &str, scenario: impl Future<Output = ()>) {
    let started = Instant::now();
    match tokio::time::timeout(
        RELAY_TEST_TIMEOUT,
        AssertUnwindSafe(scenario).catch_unwind(),
    )
    .await
    {
        Ok(Ok(())) => eprintln!("relay: {name} ok in {:?}", started.elapsed()),
        Ok(Err(panic)) => {
            eprintln!("relay: {name} FAILED after {:?}", started.elapsed());
            std::panic::resume_unwind(panic)
        }
        Err(_) => panic!("relay: {name} did not finish within {RELAY_TEST_TIMEOUT:?}"),
    }
}

/// A relay running in the background: stop it cleanly or kill it (abort, no release).
#[derive(Debug)]
pub struct RunningRelay {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<()>>>,
    /// Its counters.
    pub stats: Arc<RelayStats>,
}

impl RunningRelay {
    /// Start `Relay::new(source, publisher)` with `config` on the current runtime.
    pub fn start<S: OutboxSource, P: Publisher + 'static>(
        source: S,
        publisher: P,
        config: RelayConfig,
    ) -> Self {
        let relay = Relay::new(source, publisher).with_config(config);
        let stats = relay.stats();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(relay.run(async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            handle: Some(handle),
            stats,
        }
    }

    /// Stop cleanly (the lease is released) and wait for it; panics if it failed.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            match h.await {
                Ok(r) => r.unwrap_or_else(|e| panic!("the relay stopped with an error: {e}")),
                Err(e) => panic!("the relay task failed: {e}"),
            }
        }
    }

    /// Kill it: the task is aborted without releasing its lease (like kill -9).
    pub fn kill(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}
