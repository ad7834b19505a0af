//! Handlers: plain async functions on typed messages, their context and their errors.

use crate::codec::{Codec, Contract};
use crate::correlation::NewCorrelation;
use crate::error::{Error, ErrorStatus, Result};
use crate::headers;
use crate::interaction::{
    Command, Correlation, DomainEvent, Notification, command_message, event_message,
    notification_message,
};
use crate::message::{Message, MessageId};
use crate::names::ChannelName;
use crate::store::MessageStore;
use crate::transport::BoxFuture;
use std::fmt;
use std::sync::Arc;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

/// A handler's failure: transient (retry with backoff) or permanent (dead-letter now).
///
/// `?` on any error makes a transient `HandlerError`, except Courier's own [`Error`],
/// which keeps its status. Say [`HandlerError::permanent`] when retrying cannot help.
pub struct HandlerError {
    status: ErrorStatus,
    undecodable: bool,
    error: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl HandlerError {
    /// Retrying later may succeed.
    pub fn transient(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self {
            status: ErrorStatus::Transient,
            undecodable: false,
            error: error.into(),
        }
    }

    /// Retrying cannot help: dead-letter at once.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self {
            status: ErrorStatus::Permanent,
            undecodable: false,
            error: error.into(),
        }
    }

    pub(crate) fn undecodable(error: Error) -> Self {
        Self {
            status: ErrorStatus::Permanent,
            undecodable: true,
            error: Box::new(error),
        }
    }

    /// True for transient errors.
    pub fn is_transient(&self) -> bool {
        self.status == ErrorStatus::Transient
    }

    pub(crate) fn is_undecodable(&self) -> bool {
        self.undecodable
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        let boxed: Box<dyn std::error::Error + Send + Sync + 'static> = Box::new(error);
        match boxed.downcast::<Error>() {
            Ok(courier) => Self {
                status: courier.status(),
                undecodable: false,
                error: courier,
            },
            Err(other) => Self {
                status: ErrorStatus::Transient,
                undecodable: false,
                error: other,
            },
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("status", &self.status)
            .field("error", &self.error)
            .finish()
    }
}

/// What a handler receives besides the message: the transaction its writes join, the
/// envelope, and a sender whose messages commit with that transaction.
pub struct HandlerContext<S: MessageStore> {
    pub(crate) tx: Arc<Mutex<S::Tx>>,
    envelope: Arc<Message>,
    pub(crate) outgoing: Arc<std::sync::Mutex<Outgoing>>,
    attempt: u32,
    reply_to: Option<ChannelName>,
}

/// Messages and correlation rows a handler sent; written only if it succeeds.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub(crate) messages: Vec<Message>,
    pub(crate) correlations: Vec<NewCorrelation>,
}

/// What the dispatcher keeps to take the transaction and the outgoing messages back.
pub(crate) type ContextParts<S> = (
    HandlerContext<S>,
    Arc<Mutex<<S as MessageStore>::Tx>>,
    Arc<std::sync::Mutex<Outgoing>>,
);

impl<S: MessageStore> HandlerContext<S> {
    pub(crate) fn new(
        tx: S::Tx,
        envelope: Arc<Message>,
        attempt: u32,
        reply_to: Option<ChannelName>,
    ) -> ContextParts<S> {
        let tx = Arc::new(Mutex::new(tx));
        let outgoing = Arc::new(std::sync::Mutex::new(Outgoing::default()));
        (
            Self {
                tx: tx.clone(),
                envelope,
                outgoing: outgoing.clone(),
                attempt,
                reply_to,
            },
            tx,
            outgoing,
        )
    }

    /// A second handle on the same transaction and outbox (the dispatcher's wrappers use
    /// it to send replies after the user's handler returns).
    pub(crate) fn handle(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            envelope: self.envelope.clone(),
            outgoing: self.outgoing.clone(),
            attempt: self.attempt,
            reply_to: self.reply_to.clone(),
        }
    }

    /// The service database connection inside the handler's transaction. Run your own
    /// queries on it: they commit together with the inbox record and outgoing messages.
    pub async fn tx(&self) -> MappedMutexGuard<'_, S::Conn> {
        MutexGuard::map(self.tx.lock().await, |tx| S::conn(tx))
    }

    /// The message being handled.
    pub fn envelope(&self) -> &Message {
        &self.envelope
    }

    /// 1 on the first attempt, 2 on the first retry, ...
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    fn outgoing(&self) -> Result<std::sync::MutexGuard<'_, Outgoing>> {
        self.outgoing
            .lock()
            .map_err(|_| Error::new(crate::ErrorKind::Closed, "handler context poisoned"))
    }

    /// Send a message in the handler's transaction (through the outbox): it is published
    /// only if the handler succeeds. `causation-id` is set to the handled message, and its
    /// `correlation-id` is carried over unless the message has its own.
    pub fn send(&self, mut message: Message) -> Result<MessageId> {
        message.channel()?;
        message
            .headers
            .insert(headers::CAUSATION_ID, self.envelope.id.to_string())?;
        if message.headers.correlation_id().is_none()
            && let Some(c) = self.envelope.headers.correlation_id()
        {
            message.headers.insert(headers::CORRELATION_ID, c)?;
        }
        let id = message.id;
        self.outgoing()?.messages.push(message);
        Ok(id)
    }

    /// Encode `value` and [`send`](Self::send) it to `channel`.
    pub fn publish<T: Contract>(&self, channel: &ChannelName, value: &T) -> Result<MessageId> {
        self.send(Codec::encode_to(value, channel)?)
    }

    /// Send command `cmd` in the handler's transaction, with its correlation row; the
    /// reply comes back on the dispatcher's reply channel
    /// ([`Dispatcher::replies_to`](crate::Dispatcher::replies_to)) to the reply handler
    /// of `C`. Returns the command's id (its correlation id).
    pub fn send_command<C: Command>(&self, cmd: &C, correlation: Correlation) -> Result<MessageId> {
        let reply_to = self.reply_to.as_ref().ok_or_else(|| {
            Error::new(
                crate::ErrorKind::Config,
                format!(
                    "cannot send command {}: this dispatcher has no reply channel \
                     (set Dispatcher::replies_to)",
                    C::TYPE
                ),
            )
        })?;
        let (mut msg, row) = command_message(cmd, reply_to, &correlation)?;
        msg.headers
            .insert(headers::CAUSATION_ID, self.envelope.id.to_string())?;
        let id = msg.id;
        let mut out = self.outgoing()?;
        out.messages.push(msg);
        out.correlations.push(row);
        Ok(id)
    }

    /// Send notification `n` (a one-way command) in the handler's transaction.
    pub fn notify<N: Notification>(&self, n: &N, key: Option<&str>) -> Result<MessageId> {
        self.send(notification_message(n, key)?)
    }

    /// Publish domain event `e` in the handler's transaction.
    pub fn publish_event<E: DomainEvent>(&self, e: &E) -> Result<MessageId> {
        self.send(event_message(e)?)
    }
}

impl<S: MessageStore> fmt::Debug for HandlerContext<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerContext")
            .field("message", &self.envelope.id)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// A type-erased handler (what the dispatcher stores).
pub(crate) trait ErasedHandler<S: MessageStore>: Send + Sync {
    fn call(
        &self,
        ctx: HandlerContext<S>,
        message: &Message,
    ) -> BoxFuture<'static, Result<(), HandlerError>>;
}

pub(crate) struct TypedHandler<T, F> {
    pub(crate) f: F,
    pub(crate) _t: std::marker::PhantomData<fn() -> T>,
}

impl<S, T, F, Fut> ErasedHandler<S> for TypedHandler<T, F>
where
    S: MessageStore,
    T: Contract,
    F: Fn(HandlerContext<S>, T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn call(
        &self,
        ctx: HandlerContext<S>,
        message: &Message,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        match Codec::decode::<T>(message) {
            Ok(value) => Box::pin((self.f)(ctx, value)),
            Err(e) => Box::pin(async move { Err(HandlerError::undecodable(e)) }),
        }
    }
}

/// A command handler: its return value becomes the reply, sent to the command's
/// `reply-to` through the handler's transaction.
pub(crate) struct CommandHandler<C, F> {
    pub(crate) f: F,
    pub(crate) responder: String,
    pub(crate) _c: std::marker::PhantomData<fn() -> C>,
}

impl<S, C, F, Fut> ErasedHandler<S> for CommandHandler<C, F>
where
    S: MessageStore,
    C: Command,
    F: Fn(HandlerContext<S>, C) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Result<C::Reply, C::Failure>, HandlerError>>
        + Send
        + 'static,
{
    fn call(
        &self,
        ctx: HandlerContext<S>,
        message: &Message,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let cmd = match Codec::decode::<C>(message) {
            Ok(c) => c,
            Err(e) => return Box::pin(async move { Err(HandlerError::undecodable(e)) }),
        };
        let handle = ctx.handle();
        let fut = (self.f)(ctx, cmd);
        let responder = self.responder.clone();
        Box::pin(async move {
            let outcome = fut.await?;
            let envelope = handle.envelope.clone();
            let reply_to = match envelope.headers.reply_to() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    tracing::debug!(message = %envelope.id, command = C::TYPE,
                        "command has no reply-to header; its reply is not sent");
                    return Ok(());
                }
                Err(e) => return Err(HandlerError::permanent(e)),
            };
            let reply = match &outcome {
                Ok(r) => {
                    crate::interaction::reply_message(r, true, &envelope, reply_to, &responder)
                }
                Err(f) => {
                    crate::interaction::reply_message(f, false, &envelope, reply_to, &responder)
                }
            }
            .map_err(HandlerError::permanent)?;
            handle.send(reply)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Io;
    impl fmt::Display for Io {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("io")
        }
    }
    impl std::error::Error for Io {}

    #[test]
    fn question_mark_is_transient_but_keeps_courier_status() {
        let e: HandlerError = Io.into();
        assert!(e.is_transient());
        let e: HandlerError = Error::invalid("bad").into();
        assert!(!e.is_transient());
        let e: HandlerError = Error::new(crate::ErrorKind::Storage, "busy").into();
        assert!(e.is_transient());
        assert!(!HandlerError::permanent("no such order").is_transient());
    }
}
