//! Courier messages as AMQP messages: Courier headers become AMQP header-table entries
//! (long strings), the message id travels as the `message_id` property.
//!
//! Courier header names are lower-case; the headers Courier itself adds for its own
//! bookkeeping (`Courier-Marker`, `Courier-Redeliveries`, `Courier-Partition`,
//! `Courier-Offset`) start with upper-case `Courier-`, so they can never clash with an
//! application's header, and are removed on decoding. RabbitMQ adds `x-stream-offset`
//! (an integer) to stream deliveries and `x-death` (an array) when dead-lettering:
//! non-string `x-` headers are never Courier headers and are skipped.

use bytes::Bytes;
use courier_core::{Error, Headers, Malformed, Message, MessageId};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::collections::BTreeMap;

/// The header of the markers Courier writes to find a stream's end (value: a UUID).
pub(crate) const MARKER: &str = "Courier-Marker";

/// How often a message came back through the retry queue (integer).
pub(crate) const REDELIVERIES: &str = "Courier-Redeliveries";
/// The partition a retried message came from (integer).
pub(crate) const PARTITION: &str = "Courier-Partition";
/// The stream offset a retried message came from (integer).
pub(crate) const OFFSET: &str = "Courier-Offset";

/// Headers Courier adds for itself: never application headers (those are lower-case).
fn is_internal(name: &str) -> bool {
    name.starts_with("Courier-")
}

/// The header RabbitMQ adds to every stream delivery: the message's offset.
pub(crate) const STREAM_OFFSET: &str = "x-stream-offset";

/// AMQP `delivery_mode` of persistent messages.
const PERSISTENT: u8 = 2;

/// The AMQP properties of `message`: persistent, its id, its headers.
pub(crate) fn encode(message: &Message) -> Result<BasicProperties, Error> {
    let mut table = FieldTable::default();
    for (name, value) in message.headers.iter() {
        table.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
    }
    Ok(BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(ShortString::from(message.id.to_string()))
        .with_headers(table))
}

/// The properties of a marker message carrying `marker`.
pub(crate) fn marker(marker: &str) -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(
        ShortString::from(MARKER),
        AMQPValue::LongString(LongString::from(marker.as_bytes().to_vec())),
    );
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(table)
}

/// The marker value of a delivery, if it is one of Courier's markers.
pub(crate) fn marker_of(properties: &BasicProperties) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(MARKER)?;
    let s = value.as_long_string()?;
    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
}

/// The stream offset RabbitMQ attached to a delivery.
pub(crate) fn stream_offset(properties: &BasicProperties) -> Option<u64> {
    let value = properties.headers().as_ref()?.inner().get(STREAM_OFFSET)?;
    let n = match value {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        _ => return None,
    };
    u64::try_from(n).ok()
}

/// The properties of `message` on its way to a delay queue: its own, plus where it came
/// from and how often it was redelivered.
pub(crate) fn retried(
    message: &Message,
    partition: u32,
    offset: u64,
    redeliveries: u32,
) -> Result<BasicProperties, Error> {
    let props = encode(message)?;
    let mut table = props.headers().clone().unwrap_or_default();
    table.insert(
        REDELIVERIES.into(),
        AMQPValue::LongLongInt(i64::from(redeliveries)),
    );
    table.insert(
        PARTITION.into(),
        AMQPValue::LongLongInt(i64::from(partition)),
    );
    table.insert(
        OFFSET.into(),
        AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX)),
    );
    Ok(props.with_headers(table))
}

/// The headers RabbitMQ adds when it dead-letters a message (here: out of a delay
/// queue into the retry queue); they are not the message's own.
const DEAD_LETTER_HEADERS: [&str; 6] = [
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// Remove what dead-lettering added to a message that came through a delay queue.
pub(crate) fn strip_dead_letter_headers(message: &mut Message) {
    for name in DEAD_LETTER_HEADERS {
        message
            .headers
            .remove(courier_core::headers::HeaderName::from_static(name));
    }
}

/// An integer header of Courier's own.
pub(crate) fn internal_int(properties: &BasicProperties, name: &str) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// A text rendering of any AMQP value, for `Malformed::raw_headers`.
fn show(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

/// A delivered AMQP message as a Courier message, or what is wrong with it.
pub(crate) fn decode(properties: &BasicProperties, payload: Bytes) -> Result<Message, Malformed> {
    let empty = FieldTable::default();
    let table = properties.headers().as_ref().unwrap_or(&empty);
    let raw: BTreeMap<String, String> = table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), show(v)))
        .collect();
    let raw_headers = serde_json::to_string(&raw).unwrap_or_else(|_| "{}".to_owned());
    let raw_id = properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default();
    let malformed = |reason: String| Malformed {
        raw_id: raw_id.clone(),
        raw_headers: raw_headers.clone(),
        payload: payload.clone(),
        reason,
    };
    if raw_id.is_empty() {
        return Err(malformed(
            "no message_id property: the message id is missing (not published by Courier?)"
                .to_owned(),
        ));
    }
    let id = MessageId::parse(&raw_id).map_err(|e| malformed(e.to_string()))?;
    let mut map = BTreeMap::new();
    for (name, value) in table.inner() {
        let name = name.as_str();
        if is_internal(name) {
            continue;
        }
        match value {
            AMQPValue::LongString(s) => {
                let text = std::str::from_utf8(s.as_bytes())
                    .map_err(|_| malformed(format!("header {name} is not valid UTF-8")))?;
                map.insert(name.to_owned(), text.to_owned());
            }
            AMQPValue::ShortString(s) => {
                map.insert(name.to_owned(), s.as_str().to_owned());
            }
            // Broker-added integers (x-stream-offset, x-delivery-count) and other
            // clients' typed values are not Courier headers.
            _ if name.starts_with("x-") => {}
            other => {
                return Err(malformed(format!(
                    "header {name} has a {:?} value; Courier headers are strings",
                    other.get_type()
                )));
            }
        }
    }
    let headers = Headers::from_map(map).map_err(|e| malformed(format!("headers: {e}")))?;
    Ok(Message {
        id,
        headers,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Message::new("hi")
            .with_key("k")
            .and_then(|m| m.with_header("x.note_2", "ünïcödé: a/b, c"))
            .and_then(|m| m.with_header("x-tenant", "acme"))
            .unwrap();
        let p = encode(&m).unwrap();
        assert_eq!(p.delivery_mode(), &Some(PERSISTENT));
        let back = decode(&p, m.payload.clone()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn broker_headers_are_skipped_and_offsets_read() {
        let m = Message::new("x");
        let mut p = encode(&m).unwrap();
        let mut h = p.headers().clone().unwrap_or_default();
        h.insert(STREAM_OFFSET.into(), AMQPValue::LongLongInt(42));
        p = p.with_headers(h);
        assert_eq!(stream_offset(&p), Some(42));
        assert_eq!(decode(&p, m.payload.clone()).unwrap(), m);
    }

    #[test]
    fn foreign_messages_are_malformed_with_a_reason() {
        let bad = decode(&BasicProperties::default(), Bytes::from_static(b"x")).unwrap_err();
        assert!(bad.reason.contains("message_id"), "{}", bad.reason);
        let p = BasicProperties::default().with_message_id("not-a-uuid".into());
        let bad = decode(&p, Bytes::new()).unwrap_err();
        assert_eq!(bad.raw_id, "not-a-uuid");
        let mut h = FieldTable::default();
        h.insert("Bad-Name".into(), AMQPValue::LongString("v".into()));
        let p = BasicProperties::default()
            .with_message_id(MessageId::new().to_string().into())
            .with_headers(h);
        let bad = decode(&p, Bytes::new()).unwrap_err();
        assert!(bad.reason.contains("Bad-Name"), "{}", bad.reason);
        assert!(bad.raw_headers.contains("Bad-Name"));
    }

    #[test]
    fn retried_messages_decode_unchanged_and_carry_their_origin() {
        let m = Message::new("x").with_key("k").unwrap();
        let p = retried(&m, 3, 77, 2).unwrap();
        assert_eq!(decode(&p, m.payload.clone()).unwrap(), m);
        assert_eq!(internal_int(&p, PARTITION), Some(3));
        assert_eq!(internal_int(&p, OFFSET), Some(77));
        assert_eq!(internal_int(&p, REDELIVERIES), Some(2));
    }

    #[test]
    fn markers_are_recognised() {
        assert_eq!(marker_of(&marker("abc")).as_deref(), Some("abc"));
        assert_eq!(marker_of(&encode(&Message::new("x")).unwrap()), None);
    }
}
