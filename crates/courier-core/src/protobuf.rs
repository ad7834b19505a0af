//! Protobuf payloads (prost) next to JSON, chosen by content type (feature `protobuf`).
//!
//! A message type that speaks both formats derives [`prost::Message`] *and* serde and
//! `JsonSchema` on the same struct, and lets [`protobuf_payload!`](crate::protobuf_payload)
//! write its [`Contract::to_payload`] / [`Contract::from_payload`]. Set
//! [`Contract::CONTENT_TYPE`] to [`PROTOBUF`] to send protobuf by default:
//!
//! ```
//! use courier_core::{Codec, Contract, JSON, MessageKind, PROTOBUF};
//!
//! // `prost = "0.14"` in your Cargo.toml (or see "Without a prost dependency" below).
//! // No `Debug` or `Default` derive: `prost::Message` writes both.
//! #[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! struct TicketCreated {
//!     #[prost(string, tag = "1")]
//!     order_id: String,
//!     #[prost(int64, tag = "2")]
//!     total_cents: i64,
//!     #[prost(string, optional, tag = "3")]
//!     #[serde(default)]
//!     note: Option<String>,
//! }
//!
//! impl Contract for TicketCreated {
//!     const TYPE: &'static str = "kitchen.TicketCreated";
//!     const KIND: MessageKind = MessageKind::Event;
//!     const CONTENT_TYPE: &'static str = PROTOBUF; // send protobuf by default
//!     courier_core::protobuf_payload!();           // to_payload + from_payload
//! }
//!
//! let ticket = TicketCreated { order_id: "o-1".into(), total_cents: 1250, note: None };
//! let as_protobuf = Codec::encode(&ticket)?;           // content-type: application/x-protobuf
//! let as_json = Codec::encode_as(&ticket, JSON)?;      // content-type: application/json
//! // One consumer reads both: decoding follows the received message's content-type.
//! assert_eq!(Codec::decode::<TicketCreated>(&as_protobuf)?, ticket);
//! assert_eq!(Codec::decode::<TicketCreated>(&as_json)?, ticket);
//! # Ok::<(), courier_core::Error>(())
//! ```
//!
//! Through the `courier` facade, turn on its `protobuf` feature and write
//! `courier::protobuf_payload!()`.
//!
//! Decoding picks the format from the received message's `content-type` header (JSON when
//! it has none), so a consumer reads producers of either format, and a producer can move
//! from JSON to protobuf without a flag day. Keep the two schemas evolving together: a
//! new field gets a new, never reused prost `tag` and `#[serde(default)]` (an `optional`
//! or `repeated` prost field), which is a MINOR change in both formats. Enumerations are
//! `i32` fields in prost (`#[prost(enumeration = "Kind", tag = "4")]`), so they are
//! numbers in the JSON form too.
//!
//! # Without a prost dependency
//!
//! The derive refers to `::prost`; point it at the re-export below instead, so your
//! prost always matches Courier's:
//!
//! ```
//! use courier_core::protobuf::prost;
//!
//! #[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! #[prost(prost_path = "::courier_core::protobuf::prost")] // `::courier::protobuf::prost` via the facade
//! struct Ping {
//!     #[prost(uint64, tag = "1")]
//!     seq: u64,
//! }
//! # let _ = Ping { seq: 1 };
//! ```

use crate::codec::{JSON, PROTOBUF, is_json};
use crate::error::{Error, ErrorKind, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(doc)]
use crate::codec::Contract;

/// The prost version Courier is built with (for `#[prost(prost_path = ...)]`).
pub use prost;

/// Whether `content_type` names protobuf ([`PROTOBUF`], with or without parameters such as
/// `; proto=kitchen.TicketCreated`).
pub fn is_protobuf(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(PROTOBUF))
}

/// Encode `value` (a message of type `type_name`) as `content_type`: protobuf for
/// [`PROTOBUF`], JSON for [`JSON`], an [`ErrorKind::InvalidInput`] error otherwise.
///
/// This is the body of [`Contract::to_payload`] for a type that speaks both; see
/// [`protobuf_payload!`](crate::protobuf_payload).
pub fn to_payload<T>(value: &T, type_name: &str, content_type: &str) -> Result<Vec<u8>>
where
    T: prost::Message + Serialize,
{
    if is_protobuf(content_type) {
        Ok(value.encode_to_vec())
    } else if is_json(content_type) {
        serde_json::to_vec(value)
            .map_err(|e| Error::invalid(format!("cannot encode {type_name} as JSON: {e}")))
    } else {
        Err(Error::invalid(format!(
            "{type_name} cannot be encoded as {content_type:?}: it speaks {PROTOBUF} and {JSON}"
        )))
    }
}

/// Decode a payload of `content_type` (the received message's `content-type`) into a `T`
/// named `type_name`. Bad bytes and unknown content types are [`ErrorKind::Decode`]
/// errors naming the type; nothing the peer sends can make this panic.
///
/// This is the body of [`Contract::from_payload`] for a type that speaks both; see
/// [`protobuf_payload!`](crate::protobuf_payload).
pub fn from_payload<T>(type_name: &str, content_type: &str, bytes: &[u8]) -> Result<T>
where
    T: prost::Message + Default + DeserializeOwned,
{
    if is_protobuf(content_type) {
        T::decode(bytes).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!("bad protobuf payload for {type_name}: {e}"),
            )
            .with_source(e)
        })
    } else if is_json(content_type) {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!("bad JSON payload for {type_name}: {e}"),
            )
            .with_source(e)
        })
    } else {
        Err(Error::new(
            ErrorKind::Decode,
            format!(
                "content-type {content_type:?} is not readable as {type_name}: it speaks {PROTOBUF} and {JSON}"
            ),
        ))
    }
}

/// Inside an `impl Contract for T`, write `to_payload` and `from_payload` with
/// [`to_payload`](crate::protobuf::to_payload) and
/// [`from_payload`](crate::protobuf::from_payload), so `T` speaks protobuf and JSON.
///
/// `T` must derive `prost::Message` next to serde and `JsonSchema`; see the
/// [module docs](crate::protobuf) for the full declaration. Without the macro, the same
/// two overrides are one line each:
///
/// ```
/// # use courier_core::{Contract, PROTOBUF};
/// # #[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # struct Ping { #[prost(uint64, tag = "1")] seq: u64 }
/// impl Contract for Ping {
///     const TYPE: &'static str = "health.Ping";
///     const CONTENT_TYPE: &'static str = PROTOBUF;
///     fn to_payload(&self, ct: &str) -> courier_core::Result<Vec<u8>> {
///         courier_core::protobuf::to_payload(self, Self::TYPE, ct)
///     }
///     fn from_payload(ct: &str, bytes: &[u8]) -> courier_core::Result<Self> {
///         courier_core::protobuf::from_payload(Self::TYPE, ct, bytes)
///     }
/// }
/// ```
#[macro_export]
macro_rules! protobuf_payload {
    () => {
        fn to_payload(&self, content_type: &str) -> $crate::Result<::std::vec::Vec<u8>> {
            $crate::protobuf::to_payload(self, <Self as $crate::Contract>::TYPE, content_type)
        }

        fn from_payload(content_type: &str, payload: &[u8]) -> $crate::Result<Self> {
            $crate::protobuf::from_payload(<Self as $crate::Contract>::TYPE, content_type, payload)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Codec, Contract};
    use crate::headers;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize, schemars::JsonSchema)]
    struct TicketCreated {
        #[prost(string, tag = "1")]
        order_id: String,
        #[prost(int64, tag = "2")]
        total_cents: i64,
        #[prost(string, optional, tag = "3")]
        #[serde(default)]
        note: Option<String>,
        #[prost(string, repeated, tag = "4")]
        #[serde(default)]
        items: Vec<String>,
        #[prost(uint32, tag = "5")]
        #[serde(default)]
        prep_minutes: u32,
    }

    impl Contract for TicketCreated {
        const TYPE: &'static str = "kitchen.TicketCreated";
        const VERSION: u32 = 2;
        const CONTENT_TYPE: &'static str = PROTOBUF;
        crate::protobuf_payload!();
    }

    fn ticket() -> TicketCreated {
        TicketCreated {
            order_id: "0190f5a2-7c1e-7b3a-9f44-2c1d5e6a8b90".into(),
            total_cents: 4_250,
            note: Some("no onions".into()),
            items: vec!["margherita".into(), "tiramisu".into()],
            prep_minutes: 15,
        }
    }

    fn with_content_type(mut m: crate::Message, ct: &str) -> crate::Message {
        m.headers
            .insert_unchecked(headers::CONTENT_TYPE, ct.to_owned());
        m
    }

    #[test]
    fn protobuf_by_default_round_trips() {
        let v = ticket();
        let m = Codec::encode(&v).unwrap();
        assert_eq!(m.headers.content_type(), Some(PROTOBUF));
        assert_eq!(m.headers.get(headers::TYPE), Some("kitchen.TicketCreated"));
        assert_eq!(m.headers.get(headers::TYPE_VERSION), Some("2.0"));
        assert_eq!(&m.payload[..], &prost::Message::encode_to_vec(&v)[..]);
        assert_eq!(Codec::decode::<TicketCreated>(&m).unwrap(), v);
    }

    #[test]
    fn same_consumer_reads_json_producers() {
        let v = ticket();
        let m = Codec::encode_as(&v, JSON).unwrap();
        assert_eq!(m.headers.content_type(), Some(JSON));
        assert!(serde_json::from_slice::<serde_json::Value>(&m.payload).is_ok());
        assert_eq!(Codec::decode::<TicketCreated>(&m).unwrap(), v);

        // No content-type header at all means JSON.
        let mut bare = m.clone();
        bare.headers.remove(headers::CONTENT_TYPE);
        assert_eq!(Codec::decode::<TicketCreated>(&bare).unwrap(), v);
    }

    #[test]
    fn content_type_parameters_are_accepted() {
        let v = ticket();
        let pb = with_content_type(
            Codec::encode(&v).unwrap(),
            "Application/X-Protobuf ; proto=kitchen.TicketCreated",
        );
        assert_eq!(Codec::decode::<TicketCreated>(&pb).unwrap(), v);
        let json = with_content_type(
            Codec::encode_as(&v, JSON).unwrap(),
            "application/json; charset=utf-8",
        );
        assert_eq!(Codec::decode::<TicketCreated>(&json).unwrap(), v);
        assert!(is_protobuf("application/x-protobuf;proto=x"));
        assert!(!is_protobuf("application/x-protobuffer"));
        assert!(!is_protobuf(JSON));
    }

    #[test]
    fn unknown_content_type_is_an_error_naming_it() {
        let e = Codec::encode_as(&ticket(), "text/csv").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let text = e.to_string();
        assert!(
            text.contains("text/csv") && text.contains("kitchen.TicketCreated"),
            "{text}"
        );

        let m = with_content_type(Codec::encode(&ticket()).unwrap(), "application/xml");
        let e = Codec::decode::<TicketCreated>(&m).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
        let text = e.to_string();
        assert!(
            text.contains("application/xml") && text.contains("kitchen.TicketCreated"),
            "{text}"
        );
    }

    #[test]
    fn bad_bytes_are_a_decode_error_naming_the_type() {
        let mut m = Codec::encode(&ticket()).unwrap();
        // Field 1, length-delimited, claims 127 bytes that are not there.
        m.payload = vec![0x0a, 0x7f, b'x'].into();
        let e = Codec::decode::<TicketCreated>(&m).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
        assert!(!e.is_retryable());
        let text = e.to_string();
        assert!(
            text.contains("kitchen.TicketCreated") && text.contains("protobuf"),
            "{text}"
        );
        assert!(text.contains(&m.id.to_string()), "{text}");

        let e = from_payload::<TicketCreated>("kitchen.TicketCreated", JSON, b"{nope").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
        assert!(e.to_string().contains("kitchen.TicketCreated"), "{e}");
    }

    #[test]
    fn protobuf_is_smaller_than_json_for_a_typical_message() {
        let v = ticket();
        let pb = Codec::encode(&v).unwrap().payload.len();
        let json = Codec::encode_as(&v, JSON).unwrap().payload.len();
        println!("typical message: protobuf {pb} bytes, JSON {json} bytes");
        assert!(pb < json, "protobuf {pb} bytes, JSON {json} bytes");
        assert!(pb * 3 < json * 2, "protobuf {pb} bytes, JSON {json} bytes");
    }

    fn any_ticket() -> impl Strategy<Value = TicketCreated> {
        (
            ".*",
            any::<i64>(),
            proptest::option::of(".*"),
            proptest::collection::vec(".*", 0..4),
            any::<u32>(),
        )
            .prop_map(
                |(order_id, total_cents, note, items, prep_minutes)| TicketCreated {
                    order_id,
                    total_cents,
                    note,
                    items,
                    prep_minutes,
                },
            )
    }

    proptest! {
        #[test]
        fn both_formats_round_trip_any_value(v in any_ticket()) {
            let pb = Codec::encode(&v).unwrap();
            prop_assert_eq!(Codec::decode::<TicketCreated>(&pb).unwrap(), v.clone());
            let json = Codec::encode_as(&v, JSON).unwrap();
            prop_assert_eq!(Codec::decode::<TicketCreated>(&json).unwrap(), v);
        }

        #[test]
        fn garbage_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut m = Codec::encode(&ticket()).unwrap();
            m.payload = bytes.into();
            // Some byte strings are valid protobuf; the rest must be Decode errors.
            if let Err(e) = Codec::decode::<TicketCreated>(&m) {
                prop_assert_eq!(e.kind(), ErrorKind::Decode);
                prop_assert!(e.to_string().contains("kitchen.TicketCreated"));
            }
        }
    }
}
