//! Courier messages as NATS messages: Courier headers become NATS headers, the message
//! id travels in `Nats-Msg-Id` (which JetStream also uses to drop duplicate publishes).

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use bytes::Bytes;
use courier_core::{Error, Headers, Malformed, Message, MessageId};
use std::collections::BTreeMap;
use std::str::FromStr;

/// The NATS header carrying the message id.
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";

/// NATS' own headers (`Nats-...`) are not Courier headers.
fn is_nats_header(name: &str) -> bool {
    name.starts_with("Nats-")
}

/// The NATS headers of `message`.
pub(crate) fn encode(message: &Message) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::new();
    for (name, value) in message.headers.iter() {
        let n = HeaderName::from_str(name).map_err(|e| {
            Error::invalid(format!(
                "message {}: header name {name:?} is not valid in NATS: {e}",
                message.id
            ))
        })?;
        let v = HeaderValue::from_str(value).map_err(|e| {
            Error::invalid(format!(
                "message {}: header {name} has a value NATS cannot carry: {e}",
                message.id
            ))
        })?;
        map.insert(n, v);
    }
    map.insert(MSG_ID, message.id.to_string());
    Ok(map)
}

/// A stored NATS message as a Courier message, or what is wrong with it.
pub(crate) fn decode(headers: Option<&HeaderMap>, payload: Bytes) -> Result<Message, Malformed> {
    let mut raw: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(h) = headers {
        for (name, values) in h.iter() {
            raw.insert(
                name.to_string(),
                values.iter().map(|v| v.as_str().to_owned()).collect(),
            );
        }
    }
    let raw_headers = serde_json::to_string(&raw).unwrap_or_else(|_| "{}".to_owned());
    let raw_id = raw
        .get(MSG_ID)
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or_default();
    let malformed = |reason: String| Malformed {
        raw_id: raw_id.clone(),
        raw_headers: raw_headers.clone(),
        payload: payload.clone(),
        reason,
    };
    if raw_id.is_empty() {
        return Err(malformed(format!(
            "no {MSG_ID} header: the message id is missing (not published by Courier?)"
        )));
    }
    let id = MessageId::parse(&raw_id).map_err(|e| malformed(e.to_string()))?;
    let mut map = BTreeMap::new();
    for (name, values) in &raw {
        if is_nats_header(name) {
            continue;
        }
        match values.as_slice() {
            [one] => {
                map.insert(name.clone(), one.clone());
            }
            _ => {
                return Err(malformed(format!(
                    "header {name} has {} values; Courier headers have exactly one",
                    values.len()
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
            .unwrap_or_else(|e| panic!("{e}"));
        let h = encode(&m).unwrap_or_else(|e| panic!("{e}"));
        let back = decode(Some(&h), m.payload.clone()).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(back, m);
    }

    #[test]
    fn garbage_is_malformed_with_a_reason() {
        let bad = decode(None, Bytes::from_static(b"x")).err();
        assert!(bad.is_some_and(|b| b.reason.contains(MSG_ID)));
        let mut h = HeaderMap::new();
        h.insert(MSG_ID, "not-a-uuid");
        let bad = decode(Some(&h), Bytes::new()).err();
        assert!(bad.is_some_and(|b| b.reason.contains("not-a-uuid") && b.raw_id == "not-a-uuid"));
        let mut h = HeaderMap::new();
        h.insert(MSG_ID, MessageId::new().to_string());
        h.insert("Bad-Name", "v");
        let bad = decode(Some(&h), Bytes::new()).err();
        assert!(bad.is_some_and(|b| b.reason.contains("Bad-Name")), "");
    }
}
