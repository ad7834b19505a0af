//! Typed messages and the JSON codec.

use crate::error::{Error, ErrorKind, Result};
use crate::headers::{self, MessageKind, Version};
use crate::message::Message;
use crate::names::{ChannelName, MessageType};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The content type of the JSON codec (the default).
pub const JSON: &str = "application/json";
/// The content type of protobuf payloads (see [`Contract::to_payload`]).
pub const PROTOBUF: &str = "application/x-protobuf";

/// A message type with a stable name and a semver version.
///
/// Derive `Serialize`, `Deserialize` and `JsonSchema` (re-exported as
/// `courier::schemars`), name the type, and say its version:
///
/// ```
/// use courier_core::{Contract, MessageKind};
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct MenuRevised { restaurant_id: String }
/// impl Contract for MenuRevised {
///     const TYPE: &'static str = "restaurant.MenuRevised";
///     const VERSION: u32 = 1;
///     const KIND: MessageKind = MessageKind::Event;
/// }
/// ```
///
/// Compatibility rules (the robustness principle): a consumer ignores fields it does not
/// know and defaults missing optional ones (`#[serde(default)]`), so adding an optional
/// field is a MINOR change; removing or renaming a required field, or changing a type, is
/// a MAJOR one. A consumer reads older majors through `From` upcasts
/// ([`Dispatcher::upcast`](crate::Dispatcher::upcast)) and dead-letters majors it does not
/// know with that reason.
pub trait Contract:
    Serialize + DeserializeOwned + schemars::JsonSchema + Send + Sync + 'static
{
    /// Stable type name, e.g. `restaurant.MenuRevised`. Never change it once published.
    const TYPE: &'static str;
    /// Major version: bump it when old consumers can no longer read the message.
    const VERSION: u32 = 1;
    /// Minor version: bump it for compatible additions (new optional fields).
    const MINOR: u32 = 0;
    /// Command, event, reply or document.
    const KIND: MessageKind = MessageKind::Event;
    /// The content type this type is sent with ([`JSON`] unless overridden).
    const CONTENT_TYPE: &'static str = JSON;

    /// The validated type name.
    fn message_type() -> Result<MessageType> {
        MessageType::new(Self::TYPE)
    }

    /// `MAJOR.MINOR`.
    fn version() -> Version {
        Version::new(Self::VERSION, Self::MINOR)
    }

    /// Encode the payload for `content_type`. The default speaks JSON only; a type that
    /// also speaks protobuf overrides this and [`from_payload`](Self::from_payload) (with
    /// the `protobuf` feature, `courier_core::protobuf_payload!()` writes both).
    fn to_payload(&self, content_type: &str) -> Result<Vec<u8>> {
        if !is_json(content_type) {
            return Err(Error::invalid(format!(
                "{} cannot be encoded as {content_type:?}: it only speaks {JSON}",
                Self::TYPE
            )));
        }
        serde_json::to_vec(self)
            .map_err(|e| Error::invalid(format!("cannot encode {} as JSON: {e}", Self::TYPE)))
    }

    /// Decode a payload of `content_type` (the message's `content-type` header; JSON when
    /// it has none).
    fn from_payload(content_type: &str, payload: &[u8]) -> Result<Self> {
        if !is_json(content_type) {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "content-type {content_type:?} is not readable as {}: it only speaks {JSON}",
                    Self::TYPE
                ),
            ));
        }
        serde_json::from_slice(payload)
            .map_err(|e| Error::new(ErrorKind::Decode, format!("bad JSON payload: {e}")))
    }

    /// The JSON Schema (draft-07) of the payload, for AsyncAPI documents.
    fn schema() -> serde_json::Value {
        let generator = schemars::generate::SchemaSettings::draft07().into_generator();
        generator.into_root_schema_for::<Self>().to_value()
    }
}

/// Whether `content_type` names JSON (`application/json`, with or without parameters).
pub fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(JSON))
}

/// Encode and decode typed messages, by content type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Codec;

impl Codec {
    /// Encode `value` into a message with `type`, `type-version`, `message-type` and
    /// `content-type` set, in the type's own content type ([`Contract::CONTENT_TYPE`]).
    /// Add a destination with [`Message::to`].
    pub fn encode<T: Contract>(value: &T) -> Result<Message> {
        Self::encode_as(value, T::CONTENT_TYPE)
    }

    /// Encode `value` in `content_type` (e.g. [`PROTOBUF`] for a type that speaks it).
    pub fn encode_as<T: Contract>(value: &T, content_type: &str) -> Result<Message> {
        let ty = T::message_type()?;
        let payload = value.to_payload(content_type)?;
        let mut msg = Message::new(payload).with_type(&ty, T::version(), T::KIND);
        msg.headers
            .insert_unchecked(headers::CONTENT_TYPE, content_type.to_owned());
        Ok(msg)
    }

    /// Encode and address in one step.
    pub fn encode_to<T: Contract>(value: &T, channel: &ChannelName) -> Result<Message> {
        Ok(Self::encode(value)?.to(channel.clone()))
    }

    /// Decode a message into `T`, checking type and major version, and choosing the
    /// format by its `content-type` (JSON when absent). Unknown JSON fields are ignored
    /// (robustness principle).
    pub fn decode<T: Contract>(msg: &Message) -> Result<T> {
        let decode_err = |what: String| {
            Error::new(
                ErrorKind::Decode,
                format!("message {} ({}): {what}", msg.id, T::TYPE),
            )
        };
        if let Some(ty) = msg.headers.get(headers::TYPE)
            && ty != T::TYPE
        {
            return Err(decode_err(format!(
                "has type {ty:?}, expected {:?}",
                T::TYPE
            )));
        }
        if let Some(version) = msg.headers.type_version()?
            && version.major != T::VERSION
        {
            return Err(decode_err(format!(
                "has major version {}, this consumer reads version {}",
                version.major,
                T::VERSION
            )));
        }
        let ct = msg.headers.content_type().unwrap_or(JSON);
        T::from_payload(ct, &msg.payload).map_err(|e| decode_err(e.message().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    struct OrderCreated {
        order_id: String,
        total_cents: i64,
        #[serde(default)]
        note: Option<String>,
    }
    impl Contract for OrderCreated {
        const TYPE: &'static str = "order.OrderCreated";
        const VERSION: u32 = 2;
    }

    #[test]
    fn round_trip_sets_headers() {
        let v = OrderCreated {
            order_id: "o1".into(),
            total_cents: 1250,
            note: None,
        };
        let m = Codec::encode(&v).unwrap();
        assert_eq!(m.headers.get(headers::TYPE), Some("order.OrderCreated"));
        assert_eq!(m.headers.get(headers::TYPE_VERSION), Some("2.0"));
        assert_eq!(m.headers.get(headers::MESSAGE_KIND), Some("event"));
        assert_eq!(Codec::decode::<OrderCreated>(&m).unwrap(), v);
    }

    #[test]
    fn unknown_fields_ignored_missing_optional_defaulted() {
        let mut m = Codec::encode(&OrderCreated {
            order_id: "o".into(),
            total_cents: 1,
            note: None,
        })
        .unwrap();
        m.payload = br#"{"order_id":"o","total_cents":1,"extra":true}"#.to_vec().into();
        let v: OrderCreated = Codec::decode(&m).unwrap();
        assert_eq!(v.note, None);
    }

    #[test]
    fn wrong_major_version_or_type_or_json_is_a_decode_error() {
        let mut m = Codec::encode(&OrderCreated {
            order_id: "o".into(),
            total_cents: 1,
            note: None,
        })
        .unwrap();
        m.headers.insert(headers::TYPE_VERSION, "3").unwrap();
        let e = Codec::decode::<OrderCreated>(&m).unwrap_err();
        assert!(e.to_string().contains("major version 3"), "{e}");
        m.headers.insert(headers::TYPE_VERSION, "2.7").unwrap();
        assert!(Codec::decode::<OrderCreated>(&m).is_ok());
        m.payload = b"{not json".to_vec().into();
        let e = Codec::decode::<OrderCreated>(&m).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
        assert!(e.to_string().contains(&m.id.to_string()));
    }

    proptest! {
        #[test]
        fn json_round_trip_any_values(id in ".*", cents in any::<i64>(), note in proptest::option::of(".*")) {
            let v = OrderCreated { order_id: id, total_cents: cents, note };
            let m = Codec::encode(&v).unwrap();
            prop_assert_eq!(Codec::decode::<OrderCreated>(&m).unwrap(), v);
        }

        #[test]
        fn garbage_payload_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut m = Codec::encode(&OrderCreated { order_id: "o".into(), total_cents: 1, note: None }).unwrap();
            m.payload = bytes.into();
            let _ = Codec::decode::<OrderCreated>(&m);
        }
    }
}
