//! `request().await`: send a command through the outbox and wait for its reply.

use super::reply::{Gathered, decode_outcome};
use super::{Command, Correlation, Outcome, command_message};
use crate::correlation::{CorrelationRecord, CorrelationState};
use crate::error::{Error, ErrorKind, Result};
use crate::names::ChannelName;
use crate::store::MessageStore;
use std::fmt;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Sends commands and waits for their replies: a convenience for callers that must
/// answer synchronously (an HTTP handler, a CLI). Still messaging underneath: the command
/// goes through the outbox with a correlation row, the reply comes back on the service's
/// reply channel and is recorded by the dispatcher consuming it (any instance), and the
/// requester reads it from the database. Get one from
/// [`Dispatcher::requester`](crate::Dispatcher::requester), which wakes it as soon as a
/// reply is recorded; it also polls, so a reply recorded by another instance is found.
pub struct Requester<S: MessageStore> {
    store: S,
    reply_to: ChannelName,
    wake: watch::Receiver<u64>,
    max_poll: Duration,
}

impl<S: MessageStore> Clone for Requester<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            reply_to: self.reply_to.clone(),
            wake: self.wake.clone(),
            max_poll: self.max_poll,
        }
    }
}

impl<S: MessageStore> fmt::Debug for Requester<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Requester")
            .field("reply_to", &self.reply_to)
            .finish_non_exhaustive()
    }
}

impl<S: MessageStore> Requester<S> {
    pub(crate) fn new(store: S, reply_to: ChannelName, wake: watch::Receiver<u64>) -> Self {
        Self {
            store,
            reply_to,
            wake,
            max_poll: Duration::from_millis(200),
        }
    }

    /// Send `cmd` and wait up to `timeout` for its outcome. The command carries the same
    /// deadline, so a receiver that gets it too late does not execute it.
    ///
    /// ```no_run
    /// # async fn f<S: courier_core::MessageStore, C: courier_core::Command>(
    /// #     requester: courier_core::Requester<S>, cmd: C) -> courier_core::Result<()> {
    /// use std::time::Duration;
    /// match requester.request(&cmd, Duration::from_secs(5)).await? {
    ///     courier_core::Outcome::Replied(reply) => { /* ... */ }
    ///     courier_core::Outcome::Failed(why) => { /* ... */ }
    ///     courier_core::Outcome::TimedOut => { /* ... */ }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn request<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<Outcome<C::Reply, C::Failure>> {
        self.request_with(cmd, Correlation::new().deadline_in(timeout))
            .await
    }

    /// Like [`request`](Self::request) with your own correlation (key, data, deadline;
    /// without a deadline it waits until a reply comes).
    pub async fn request_with<C: Command>(
        &self,
        cmd: &C,
        correlation: Correlation,
    ) -> Result<Outcome<C::Reply, C::Failure>> {
        let deadline = correlation.deadline_ms;
        let id = self.send(cmd, &correlation).await?;
        let rec = self.wait(&id, deadline).await?;
        match (rec.state, rec.replies.first()) {
            (CorrelationState::Done, Some(r)) => decode_outcome::<C>(r),
            _ => Ok(Outcome::TimedOut),
        }
    }

    /// Scatter-gather: publish `cmd` (to a channel several services consume) and wait
    /// until the expected answers arrive or the correlation's deadline passes.
    pub async fn gather<C: Command>(
        &self,
        cmd: &C,
        correlation: Correlation,
    ) -> Result<Gathered<C>> {
        if !correlation.is_gather() {
            return Err(Error::invalid(
                "gather needs Correlation::expect_from or expect_count (who should answer)",
            ));
        }
        let deadline = correlation.deadline_ms;
        let id = self.send(cmd, &correlation).await?;
        let mut rec = self.wait(&id, deadline).await?;
        if rec.state == CorrelationState::Pending {
            // Nobody ran the timer yet: report what arrived so far as timed out.
            rec.state = CorrelationState::TimedOut;
        }
        Ok(Gathered::from_record(&rec))
    }

    async fn send<C: Command>(&self, cmd: &C, correlation: &Correlation) -> Result<String> {
        let (msg, row) = command_message(cmd, &self.reply_to, correlation)?;
        let mut tx = self.store.begin().await?;
        self.store
            .correlation_insert(&mut tx, std::slice::from_ref(&row))
            .await?;
        self.store
            .outbox_insert(&mut tx, std::slice::from_ref(&msg))
            .await?;
        self.store.commit(tx).await?;
        Ok(row.correlation_id)
    }

    /// Wait until the correlation completes or `deadline_ms` passes (then return it as
    /// it stands).
    async fn wait(&self, id: &str, deadline_ms: Option<u64>) -> Result<CorrelationRecord> {
        let mut wake = self.wake.clone();
        let until = deadline_ms.map(|ms| {
            let left = ms.saturating_sub(crate::now_ms());
            Instant::now() + Duration::from_millis(left)
        });
        let mut poll = Duration::from_millis(5);
        let mut can_wake = true;
        loop {
            wake.borrow_and_update();
            let rec = self.store.correlation_get(id).await?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Storage,
                    format!("correlation {id} disappeared while waiting for its reply"),
                )
            })?;
            if rec.state != CorrelationState::Pending {
                return Ok(rec);
            }
            if until.is_some_and(|t| Instant::now() >= t) {
                return Ok(rec);
            }
            let sleep_until = match until {
                Some(t) => (Instant::now() + poll).min(t),
                None => Instant::now() + poll,
            };
            tokio::select! {
                r = wake.changed(), if can_wake => can_wake = r.is_ok(),
                _ = tokio::time::sleep_until(sleep_until) => {}
            }
            poll = (poll * 2).min(self.max_poll);
        }
    }
}
