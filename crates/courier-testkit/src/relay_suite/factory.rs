//! What a service-database backend hands the relay suite, and a publisher that fails on
//! demand.

use courier_core::transport::BoxFuture;
use courier_core::{
    Capabilities, ChannelName, Error, ErrorKind, Message, OutboxSource, Publisher, Receipt, Result,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A transaction left open on purpose (its outbox rows are written, not committed).
pub trait OpenTransaction: Send {
    /// Commit it.
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<()>>;
}

/// Makes outbox sources on ONE service database and a destination broker, for the relay
/// suite.
///
/// Every [`source`](Self::source) call must behave like another relay process on the same
/// outbox (its own connections and in-memory state, the same table and lease).
pub trait OutboxFactory: Send + Sync + 'static {
    /// The outbox as a relay reads it.
    type Source: OutboxSource;

    /// A new source on the outbox, as another relay process would open it.
    fn source(&self) -> BoxFuture<'_, Result<Self::Source>>;

    /// Write `messages` into the outbox and commit them, in ONE real transaction.
    fn commit<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>>;

    /// Write `messages` in a transaction and leave it open, or `None` where a
    /// transaction's rows always commit in the order they were numbered (SQLite: writers
    /// are serialised), so a late-committing lower sequence cannot happen.
    fn begin_open<'a>(
        &'a self,
        messages: &'a [Message],
    ) -> BoxFuture<'a, Result<Option<Box<dyn OpenTransaction>>>>;

    /// Commit a row to `channel` that cannot be read as a message (a bad message id), as
    /// another program writing the table badly would.
    fn commit_unreadable<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<()>>;

    /// Rows in the outbox table.
    fn outbox_len(&self) -> BoxFuture<'_, Result<u64>>;

    /// The destination broker: a real one.
    fn publisher(&self) -> Arc<dyn Publisher>;

    /// Every message on `channel` of the destination, in the order it was stored.
    fn arrived<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<Vec<Message>>>;
}

/// A [`Publisher`] that passes batches to a real one, or fails them (transiently) while
/// [`set_failing`](Self::set_failing) is on.
#[derive(Clone)]
pub struct FailingPublisher {
    inner: Arc<dyn Publisher>,
    failing: Arc<AtomicBool>,
    attempts: Arc<AtomicU64>,
}

impl std::fmt::Debug for FailingPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailingPublisher")
            .field("failing", &self.failing.load(Ordering::Relaxed))
            .field("attempts", &self.attempts.load(Ordering::Relaxed))
            .finish()
    }
}

impl FailingPublisher {
    /// Wrap `inner`, passing everything through until told to fail.
    pub fn new(inner: Arc<dyn Publisher>) -> Self {
        Self {
            inner,
            failing: Arc::default(),
            attempts: Arc::default(),
        }
    }

    /// Fail every publish from now on (`true`) or pass them through again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Publish calls so far (failed ones included).
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst)
    }
}

impl Publisher for FailingPublisher {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<Receipt>> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(Error::new(
                    ErrorKind::Unavailable,
                    "the test broker is down (FailingPublisher)",
                ))
            });
        }
        self.inner.publish(messages)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}
