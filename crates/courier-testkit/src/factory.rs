//! What a backend hands the conformance suite: fresh transports on one broker.

use courier_core::transport::BoxFuture;
use courier_core::{
    Capabilities, ChannelName, Delivery, Publisher, Result, Subscriber, Subscription,
};
use std::sync::Arc;

/// Makes fresh transports on the SAME broker for the conformance suite.
///
/// Every subscriber it returns must behave like another process: two subscriptions made
/// from two [`subscriber`](Self::subscriber) calls in one group are two competing members.
pub trait TransportFactory: Send + Sync + 'static {
    /// A publisher on the broker.
    fn publisher(&self) -> BoxFuture<'_, Result<Arc<dyn Publisher>>>;

    /// A new subscriber instance on the broker (like another process).
    fn subscriber(&self) -> BoxFuture<'_, Result<Arc<dyn Subscriber>>>;

    /// What the transport can do; tests that do not fit are skipped.
    fn capabilities(&self) -> Capabilities;

    /// Create `channel` with `partitions` partitions, for backends where channels are
    /// created explicitly or partition counts are set per channel. The default does
    /// nothing (channels appear on first use).
    fn create_channel<'a>(
        &'a self,
        channel: &'a ChannelName,
        partitions: u32,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = (channel, partitions);
        Box::pin(async { Ok(()) })
    }

    /// Simulate a crash of the member behind `subscription`: `unacked` deliveries are
    /// never settled. The default drops the deliveries without acking them, then drops
    /// the subscription; a backend that can kill a member harder (a real process, a
    /// connection without a goodbye) overrides this. Either way the group must redeliver
    /// every unacked message to the next member.
    fn crash(&self, subscription: Subscription, unacked: Vec<Delivery>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            drop(unacked);
            drop(subscription);
        })
    }
}
