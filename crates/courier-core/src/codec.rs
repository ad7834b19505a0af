//! Typed messages and the JSON codec.

use crate::error::{Error, ErrorKind, Result};
use crate::headers::{self, MessageKind, Version};
use crate::message::Message;
use crate::names::{ChannelName, MessageType};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The content type of the JSON codec.
pub const JSON: &str = "application/json";

/// A message type with a stable name and a version.
///
/// ```
/// use courier_core::{Contract, MessageKind};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct MenuRevised { restaurant_id: String }
/// impl Contract for MenuRevised {
///     const TYPE: &'static str = "restaurant.MenuRevised";
///     const VERSION: u32 = 1;
///     const KIND: MessageKind = MessageKind::Event;
/// }
/// ```
pub trait Contract: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Stable type name, e.g. `restaurant.MenuRevised`. Never change it once published.
    const TYPE: &'static str;
    /// Major version: bump it when old consumers can no longer read the message.
    const VERSION: u32 = 1;
    /// Command, event, reply or document.
    const KIND: MessageKind = MessageKind::Event;

    /// The validated type name.
    fn message_type() -> Result<MessageType> {
        MessageType::new(Self::TYPE)
    }
}

/// Encode and decode typed messages as JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl JsonCodec {
    /// Encode `value` into a message with `type`, `type-version`, `message-type` and
    /// `content-type` set. Add a destination with [`Message::to`].
    pub fn encode<T: Contract>(value: &T) -> Result<Message> {
        let ty = T::message_type()?;
        let payload = serde_json::to_vec(value)
            .map_err(|e| Error::invalid(format!("cannot encode {} as JSON: {e}", T::TYPE)))?;
        let mut msg = Message::new(payload).with_type(&ty, Version::new(T::VERSION, 0), T::KIND);
        msg.headers
            .insert_unchecked(headers::CONTENT_TYPE, JSON.to_owned());
        Ok(msg)
    }

    /// Encode and address in one step.
    pub fn encode_to<T: Contract>(value: &T, channel: &ChannelName) -> Result<Message> {
        Ok(Self::encode(value)?.to(channel.clone()))
    }

    /// Decode a message into `T`, checking type, major version and content type.
    /// Unknown JSON fields are ignored (robustness principle).
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
        if let Some(ct) = msg.headers.content_type()
            && !ct.starts_with(JSON)
        {
            return Err(decode_err(format!(
                "has content-type {ct:?}, the JSON codec reads {JSON:?}"
            )));
        }
        serde_json::from_slice(&msg.payload)
            .map_err(|e| decode_err(format!("bad JSON payload: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
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
        let m = JsonCodec::encode(&v).unwrap();
        assert_eq!(m.headers.get(headers::TYPE), Some("order.OrderCreated"));
        assert_eq!(m.headers.get(headers::TYPE_VERSION), Some("2.0"));
        assert_eq!(m.headers.get(headers::MESSAGE_KIND), Some("event"));
        assert_eq!(JsonCodec::decode::<OrderCreated>(&m).unwrap(), v);
    }

    #[test]
    fn unknown_fields_ignored_missing_optional_defaulted() {
        let mut m = JsonCodec::encode(&OrderCreated {
            order_id: "o".into(),
            total_cents: 1,
            note: None,
        })
        .unwrap();
        m.payload = br#"{"order_id":"o","total_cents":1,"extra":true}"#.to_vec().into();
        let v: OrderCreated = JsonCodec::decode(&m).unwrap();
        assert_eq!(v.note, None);
    }

    #[test]
    fn wrong_major_version_or_type_or_json_is_a_decode_error() {
        let mut m = JsonCodec::encode(&OrderCreated {
            order_id: "o".into(),
            total_cents: 1,
            note: None,
        })
        .unwrap();
        m.headers.insert(headers::TYPE_VERSION, "3").unwrap();
        let e = JsonCodec::decode::<OrderCreated>(&m).unwrap_err();
        assert!(e.to_string().contains("major version 3"), "{e}");
        m.headers.insert(headers::TYPE_VERSION, "2.7").unwrap();
        assert!(JsonCodec::decode::<OrderCreated>(&m).is_ok());
        m.payload = b"{not json".to_vec().into();
        let e = JsonCodec::decode::<OrderCreated>(&m).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
        assert!(e.to_string().contains(&m.id.to_string()));
    }

    proptest! {
        #[test]
        fn json_round_trip_any_values(id in ".*", cents in any::<i64>(), note in proptest::option::of(".*")) {
            let v = OrderCreated { order_id: id, total_cents: cents, note };
            let m = JsonCodec::encode(&v).unwrap();
            prop_assert_eq!(JsonCodec::decode::<OrderCreated>(&m).unwrap(), v);
        }

        #[test]
        fn garbage_payload_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut m = JsonCodec::encode(&OrderCreated { order_id: "o".into(), total_cents: 1, note: None }).unwrap();
            m.payload = bytes.into();
            let _ = JsonCodec::decode::<OrderCreated>(&m);
        }
    }
}
