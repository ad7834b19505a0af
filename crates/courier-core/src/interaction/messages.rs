//! Building the messages of each interaction style.

use super::{Command, Correlation, DomainEvent, Notification};
use crate::codec::{Codec, Contract};
use crate::correlation::NewCorrelation;
use crate::error::{Error, Result};
use crate::headers::{self, MessageKind};
use crate::message::{Message, now_ms};
use crate::names::ChannelName;

/// The message of command `cmd` and its correlation row: `reply-to` is `reply_to`,
/// `correlation-id` the command's own id, `deadline` and partition key from
/// `correlation`. Insert both in one transaction (the backends' outboxes do:
/// `send_command`).
pub fn command_message<C: Command>(
    cmd: &C,
    reply_to: &ChannelName,
    correlation: &Correlation,
) -> Result<(Message, NewCorrelation)> {
    let channel =
        ChannelName::new(C::CHANNEL).map_err(|e| e.context(format!("{}::CHANNEL", C::TYPE)))?;
    let mut msg = Codec::encode(cmd)?.to(channel.clone());
    msg.headers
        .insert(headers::MESSAGE_KIND, MessageKind::Command.as_str())?;
    msg.headers.insert(headers::REPLY_TO, reply_to.as_str())?;
    msg.headers
        .insert(headers::CORRELATION_ID, msg.id.to_string())?;
    if let Some(deadline) = correlation.deadline_ms {
        msg.headers
            .insert(headers::DEADLINE, deadline.to_string())?;
    }
    if let Some(key) = &correlation.key {
        msg = msg.with_key(key.clone())?;
    }
    let row = NewCorrelation {
        correlation_id: msg.id.to_string(),
        command_type: C::TYPE.to_owned(),
        channel: channel.to_string(),
        data: correlation
            .data
            .clone()
            .unwrap_or_else(|| "null".to_owned()),
        deadline_ms: correlation.deadline_ms,
        expected: correlation.expected.clone(),
        expected_count: correlation.count(),
        gather: correlation.is_gather(),
        created_at_ms: now_ms(),
    };
    if row.gather && row.deadline_ms.is_none() {
        return Err(Error::invalid(format!(
            "scatter-gather of {} needs a deadline (Correlation::deadline_in): without one, \
             a missing responder would keep it open forever",
            C::TYPE
        )));
    }
    Ok((msg, row))
}

/// The message of notification `n` (a one-way command), keyed by `key` when given.
pub fn notification_message<N: Notification>(n: &N, key: Option<&str>) -> Result<Message> {
    let channel =
        ChannelName::new(N::CHANNEL).map_err(|e| e.context(format!("{}::CHANNEL", N::TYPE)))?;
    let mut msg = Codec::encode(n)?.to(channel);
    msg.headers
        .insert(headers::MESSAGE_KIND, MessageKind::Command.as_str())?;
    if let Some(key) = key {
        msg = msg.with_key(key)?;
    }
    Ok(msg)
}

/// The message of domain event `e`: channel = its aggregate type, key = its aggregate id.
pub fn event_message<E: DomainEvent>(e: &E) -> Result<Message> {
    let channel = ChannelName::new(E::AGGREGATE)
        .map_err(|err| err.context(format!("{}::AGGREGATE", E::TYPE)))?;
    let id = e.aggregate_id();
    if id.is_empty() {
        return Err(Error::invalid(format!(
            "{}: aggregate_id() is empty; an event needs the id of its {}",
            E::TYPE,
            E::AGGREGATE
        )));
    }
    let mut msg = Codec::encode(e)?.to(channel).with_key(id)?;
    msg.headers
        .insert(headers::MESSAGE_KIND, MessageKind::Event.as_str())?;
    Ok(msg)
}

/// The reply to `command` (success or failure), from `responder`.
pub(crate) fn reply_message<T: Contract>(
    value: &T,
    success: bool,
    command: &Message,
    reply_to: ChannelName,
    responder: &str,
) -> Result<Message> {
    let correlation = command
        .headers
        .correlation_id()
        .map(str::to_owned)
        .unwrap_or_else(|| command.id.to_string());
    let mut msg = Codec::encode(value)?.to(reply_to);
    msg.headers
        .insert(headers::MESSAGE_KIND, MessageKind::Reply.as_str())?;
    msg.headers.insert(
        headers::REPLY_OUTCOME,
        if success { "success" } else { "failure" },
    )?;
    msg.headers.insert(headers::RESPONDER, responder)?;
    msg.headers
        .insert(headers::CORRELATION_ID, correlation.clone())?;
    msg.with_key(correlation)
}
