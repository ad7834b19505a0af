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
        // Courier's own names are static: as NATS header names they need no allocation.
        let known = courier_core::headers::WELL_KNOWN
            .iter()
            .find(|k| k.as_str() == name);
        let n = match known {
            Some(k) => Ok(HeaderName::from_static(k.as_str())),
            None => HeaderName::from_str(name),
        }
        .map_err(|e| {
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

/// A stored NATS message as a Courier message, or what is wrong with it. The headers
/// go straight into the message's map; the raw form of all of them (for the dead letter)
/// is written only when something is wrong.
pub(crate) fn decode(headers: Option<&HeaderMap>, payload: Bytes) -> Result<Message, Malformed> {
    let raw_id = headers
        .and_then(|h| h.get(MSG_ID))
        .map(|v| v.as_str())
        .unwrap_or_default();
    let malformed = |reason: String| Malformed {
        raw_id: raw_id.to_owned(),
        raw_headers: raw_json(headers),
        payload: payload.clone(),
        reason,
    };
    if raw_id.is_empty() {
        return Err(malformed(format!(
            "no {MSG_ID} header: the message id is missing (not published by Courier?)"
        )));
    }
    let id = MessageId::parse(raw_id).map_err(|e| malformed(e.to_string()))?;
    let mut map = BTreeMap::new();
    for (name, values) in headers.iter().flat_map(|h| h.iter()) {
        let name: &str = name.as_ref();
        if is_nats_header(name) {
            continue;
        }
        match values.as_slice() {
            [one] => {
                map.insert(name.to_owned(), one.as_str().to_owned());
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

/// Every NATS header as a JSON object of arrays of strings (sorted by name), as a dead
/// letter keeps them.
fn raw_json(headers: Option<&HeaderMap>) -> String {
    let raw: BTreeMap<String, Vec<&str>> = headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(name, values)| {
            (
                name.to_string(),
                values.iter().map(|v| v.as_str()).collect(),
            )
        })
        .collect();
    serde_json::to_string(&raw).unwrap_or_else(|_| "{}".to_owned())
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
        let id = h.get(MSG_ID).map(|v| v.to_string()).unwrap_or_default();
        let bad = decode(Some(&h), Bytes::from_static(b"p")).err();
        let Some(bad) = bad else {
            panic!("a header name Courier does not allow must be malformed")
        };
        assert!(bad.reason.contains("Bad-Name"), "{}", bad.reason);
        // The dead letter keeps every header as it came, sorted, and the payload.
        assert_eq!(
            bad.raw_headers,
            format!(r#"{{"Bad-Name":["v"],"Nats-Msg-Id":["{id}"]}}"#)
        );
        assert_eq!(bad.raw_id, id);
        assert_eq!(&bad.payload[..], b"p");
    }

    #[test]
    fn well_known_names_and_nats_headers() {
        let m = Message::new("hi")
            .with_key("k")
            .and_then(|m| m.with_header("x-custom", "1"))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut h = encode(&m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            h.get("partition-key").map(|v| v.as_str()),
            Some("k"),
            "a well-known name encodes as itself"
        );
        // NATS' own headers (other than the id) are not Courier headers.
        h.insert("Nats-Expected-Stream", "S");
        let back = decode(Some(&h), m.payload.clone()).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(back, m);
    }
}
