//! Handlers: plain async functions on typed messages, their context and their errors.

use crate::codec::{Contract, JsonCodec};
use crate::error::{Error, ErrorStatus, Result};
use crate::headers;
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
    tx: Arc<Mutex<S::Tx>>,
    envelope: Arc<Message>,
    outgoing: Arc<std::sync::Mutex<Vec<Message>>>,
    attempt: u32,
}

/// What the dispatcher keeps to take the transaction and the outgoing messages back.
pub(crate) type ContextParts<S> = (
    HandlerContext<S>,
    Arc<Mutex<<S as MessageStore>::Tx>>,
    Arc<std::sync::Mutex<Vec<Message>>>,
);

impl<S: MessageStore> HandlerContext<S> {
    pub(crate) fn new(tx: S::Tx, envelope: Arc<Message>, attempt: u32) -> ContextParts<S> {
        let tx = Arc::new(Mutex::new(tx));
        let outgoing = Arc::new(std::sync::Mutex::new(Vec::new()));
        (
            Self {
                tx: tx.clone(),
                envelope,
                outgoing: outgoing.clone(),
                attempt,
            },
            tx,
            outgoing,
        )
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
        self.outgoing
            .lock()
            .map_err(|_| Error::new(crate::ErrorKind::Closed, "handler context poisoned"))?
            .push(message);
        Ok(id)
    }

    /// Encode `value` as JSON and [`send`](Self::send) it to `channel`.
    pub fn publish<T: Contract>(&self, channel: &ChannelName, value: &T) -> Result<MessageId> {
        self.send(JsonCodec::encode_to(value, channel)?)
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
        match JsonCodec::decode::<T>(message) {
            Ok(value) => Box::pin((self.f)(ctx, value)),
            Err(e) => Box::pin(async move { Err(HandlerError::undecodable(e)) }),
        }
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
