//! What reply handlers receive, and the type-erased handlers the dispatcher stores.

use super::{Command, Outcome};
use crate::codec::{Codec, Contract};
use crate::correlation::{CorrelationRecord, CorrelationState, ReplyRecord};
use crate::error::{Error, ErrorKind, Result};
use crate::handler::{HandlerContext, HandlerError};
use crate::headers;
use crate::message::Message;
use crate::store::MessageStore;
use crate::transport::BoxFuture;
use serde::de::DeserializeOwned;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

/// A command's outcome as its reply handler receives it, with the data the sender stored.
pub struct CommandReply<C: Command> {
    /// The command's id (its `correlation-id`).
    pub correlation_id: String,
    /// Replied, failed or timed out.
    pub outcome: Outcome<C::Reply, C::Failure>,
    /// Who answered (`None` on a timeout).
    pub responder: Option<String>,
    data: String,
}

impl<C: Command> CommandReply<C> {
    /// The data stored with the command ([`Correlation::data`](super::Correlation::data)).
    pub fn data<D: DeserializeOwned>(&self) -> Result<D> {
        decode_data(&self.correlation_id, &self.data)
    }

    /// The stored data as JSON text.
    pub fn raw_data(&self) -> &str {
        &self.data
    }

    pub(crate) fn from_record(rec: &CorrelationRecord) -> Result<Self> {
        let (outcome, responder) = match (rec.state, rec.replies.first()) {
            (CorrelationState::Done, Some(r)) => {
                (decode_outcome::<C>(r)?, Some(r.responder.clone()))
            }
            _ => (Outcome::TimedOut, None),
        };
        Ok(Self {
            correlation_id: rec.correlation.correlation_id.clone(),
            outcome,
            responder,
            data: rec.correlation.data.clone(),
        })
    }
}

impl<C: Command> fmt::Debug for CommandReply<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match &self.outcome {
            Outcome::Replied(_) => "replied",
            Outcome::Failed(_) => "failed",
            Outcome::TimedOut => "timed out",
        };
        f.debug_struct("CommandReply")
            .field("command", &C::TYPE)
            .field("correlation_id", &self.correlation_id)
            .field("outcome", &outcome)
            .field("responder", &self.responder)
            .finish()
    }
}

/// One answer of a scatter-gather.
pub struct GatheredReply<C: Command> {
    /// Who answered.
    pub responder: String,
    /// What it answered (never `TimedOut`).
    pub outcome: Outcome<C::Reply, C::Failure>,
}

impl<C: Command> fmt::Debug for GatheredReply<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatheredReply")
            .field("responder", &self.responder)
            .field("failed", &matches!(self.outcome, Outcome::Failed(_)))
            .finish()
    }
}

/// The result of a scatter-gather: who answered what, who did not, and whether the
/// deadline ended it.
pub struct Gathered<C: Command> {
    /// The request's id (its `correlation-id`).
    pub correlation_id: String,
    /// Answers in arrival order.
    pub replies: Vec<GatheredReply<C>>,
    /// Expected responders that did not answer (empty when only a count was expected).
    pub missing: Vec<String>,
    /// Answers that could not be read as `C`'s reply or failure: (responder, error).
    pub invalid: Vec<(String, String)>,
    /// True when the deadline passed before every expected answer arrived.
    pub timed_out: bool,
    data: String,
}

impl<C: Command> Gathered<C> {
    /// The data stored with the request.
    pub fn data<D: DeserializeOwned>(&self) -> Result<D> {
        decode_data(&self.correlation_id, &self.data)
    }

    /// Who answered, in arrival order.
    pub fn responders(&self) -> Vec<&str> {
        self.replies.iter().map(|r| r.responder.as_str()).collect()
    }

    pub(crate) fn from_record(rec: &CorrelationRecord) -> Self {
        let mut replies = Vec::new();
        let mut invalid = Vec::new();
        for r in &rec.replies {
            match decode_outcome::<C>(r) {
                Ok(outcome) => replies.push(GatheredReply {
                    responder: r.responder.clone(),
                    outcome,
                }),
                Err(e) => invalid.push((r.responder.clone(), e.to_string())),
            }
        }
        let missing = rec
            .correlation
            .expected
            .iter()
            .filter(|who| !rec.replies.iter().any(|r| &&r.responder == who))
            .cloned()
            .collect();
        Self {
            correlation_id: rec.correlation.correlation_id.clone(),
            replies,
            missing,
            invalid,
            timed_out: rec.state != CorrelationState::Done,
            data: rec.correlation.data.clone(),
        }
    }
}

impl<C: Command> fmt::Debug for Gathered<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gathered")
            .field("command", &C::TYPE)
            .field("correlation_id", &self.correlation_id)
            .field("replies", &self.replies)
            .field("missing", &self.missing)
            .field("invalid", &self.invalid)
            .field("timed_out", &self.timed_out)
            .finish()
    }
}

fn decode_data<D: DeserializeOwned>(correlation_id: &str, data: &str) -> Result<D> {
    serde_json::from_str(data).map_err(|e| {
        Error::new(
            ErrorKind::Decode,
            format!("correlation {correlation_id}: stored data does not decode: {e}"),
        )
    })
}

/// Read a stored reply as `C`'s success or failure, by its `reply-outcome` header (or its
/// type when the header is missing).
pub(crate) fn decode_outcome<C: Command>(r: &ReplyRecord) -> Result<Outcome<C::Reply, C::Failure>> {
    let msg = r.message()?;
    decode_reply_message::<C>(&msg)
}

pub(crate) fn decode_reply_message<C: Command>(
    msg: &Message,
) -> Result<Outcome<C::Reply, C::Failure>> {
    let ty = msg.headers.get(headers::TYPE).unwrap_or("");
    let success = match msg.headers.get(headers::REPLY_OUTCOME) {
        Some("success") => true,
        Some("failure") => false,
        _ => ty == <C::Reply as Contract>::TYPE,
    };
    let expected = if success {
        <C::Reply as Contract>::TYPE
    } else {
        <C::Failure as Contract>::TYPE
    };
    if ty != expected {
        return Err(Error::new(
            ErrorKind::Decode,
            format!(
                "reply {} has type {ty:?}; command {} expects {:?} (success) or {:?} (failure)",
                msg.id,
                C::TYPE,
                <C::Reply as Contract>::TYPE,
                <C::Failure as Contract>::TYPE
            ),
        ));
    }
    Ok(if success {
        Outcome::Replied(Codec::decode::<C::Reply>(msg)?)
    } else {
        Outcome::Failed(Codec::decode::<C::Failure>(msg)?)
    })
}

/// A reply handler without its types (what the dispatcher stores per command type).
pub(crate) trait ErasedReplyHandler<S: MessageStore>: Send + Sync {
    /// Why `reply` cannot be an answer to this command, if it cannot.
    fn check(&self, reply: &Message) -> std::result::Result<(), String>;
    /// Run the handler on a completed (or timed out) correlation.
    fn call(
        &self,
        ctx: HandlerContext<S>,
        record: CorrelationRecord,
    ) -> BoxFuture<'static, std::result::Result<(), HandlerError>>;
}

/// What a reply handler receives, built from a finished correlation: a
/// [`CommandReply`] (request/reply) or a [`Gathered`] (scatter-gather).
pub(crate) trait FromRecord<C: Command>: Sized + Send + 'static {
    fn from_correlation(record: &CorrelationRecord) -> Result<Self>;
}

impl<C: Command> FromRecord<C> for CommandReply<C> {
    fn from_correlation(record: &CorrelationRecord) -> Result<Self> {
        Self::from_record(record)
    }
}

impl<C: Command> FromRecord<C> for Gathered<C> {
    fn from_correlation(record: &CorrelationRecord) -> Result<Self> {
        Ok(Self::from_record(record))
    }
}

/// A typed reply handler of command `C` taking `A` ([`CommandReply`] or [`Gathered`]).
pub(crate) struct ReplyHandlerFn<C, A, F> {
    f: F,
    _types: PhantomData<fn() -> (C, A)>,
}

impl<C, A, F> ReplyHandlerFn<C, A, F> {
    pub(crate) fn new(f: F) -> Self {
        Self {
            f,
            _types: PhantomData,
        }
    }
}

impl<S, C, A, F, Fut> ErasedReplyHandler<S> for ReplyHandlerFn<C, A, F>
where
    S: MessageStore,
    C: Command,
    A: FromRecord<C>,
    F: Fn(HandlerContext<S>, A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
{
    fn check(&self, reply: &Message) -> std::result::Result<(), String> {
        decode_reply_message::<C>(reply)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn call(
        &self,
        ctx: HandlerContext<S>,
        record: CorrelationRecord,
    ) -> BoxFuture<'static, std::result::Result<(), HandlerError>> {
        match A::from_correlation(&record) {
            Ok(arg) => Box::pin((self.f)(ctx, arg)),
            Err(e) => Box::pin(async move { Err(HandlerError::undecodable(e)) }),
        }
    }
}
