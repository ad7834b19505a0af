//! Typed message headers over a string map; unknown headers pass through untouched.

use crate::error::{Error, Result};
use crate::message::MessageId;
use crate::names::{ChannelName, MessageType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The name of a header. Well-known names are constants of this module.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeaderName(&'static str);

impl HeaderName {
    /// A header name known at compile time. Names are lower-case ASCII letters, digits and `-`.
    pub const fn from_static(name: &'static str) -> Self {
        Self(name)
    }

    /// The name as a string.
    pub const fn as_str(&self) -> &'static str {
        self.0
    }
}

impl fmt::Debug for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeaderName({})", self.0)
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// `command`, `event`, `reply` or `document`.
pub const MESSAGE_KIND: HeaderName = HeaderName::from_static("message-type");
/// The message type name, e.g. `restaurant.MenuRevised`.
pub const TYPE: HeaderName = HeaderName::from_static("type");
/// The version of the message type (`MAJOR` or `MAJOR.MINOR`).
pub const TYPE_VERSION: HeaderName = HeaderName::from_static("type-version");
/// The payload encoding, e.g. `application/json`.
pub const CONTENT_TYPE: HeaderName = HeaderName::from_static("content-type");
/// The channel the message is published to.
pub const DESTINATION: HeaderName = HeaderName::from_static("destination");
/// The key that picks the partition; one key is always consumed in order.
pub const PARTITION_KEY: HeaderName = HeaderName::from_static("partition-key");
/// Ties replies to their command.
pub const CORRELATION_ID: HeaderName = HeaderName::from_static("correlation-id");
/// The channel replies go to.
pub const REPLY_TO: HeaderName = HeaderName::from_static("reply-to");
/// The id of the message whose handling caused this one.
pub const CAUSATION_ID: HeaderName = HeaderName::from_static("causation-id");
/// Milliseconds since the Unix epoch after which the message must not be acted upon.
pub const DEADLINE: HeaderName = HeaderName::from_static("deadline");
/// W3C trace context.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Milliseconds since the Unix epoch when the message was created.
pub const CREATED_AT: HeaderName = HeaderName::from_static("created-at");
/// How many times delivery was attempted before this one (0 on the first delivery).
pub const ATTEMPT: HeaderName = HeaderName::from_static("attempt");

/// On a reply: `success` (the command's reply type) or `failure` (its failure type).
pub const REPLY_OUTCOME: HeaderName = HeaderName::from_static("reply-outcome");
/// On a reply: who answered (the responding service's consumer group).
pub const RESPONDER: HeaderName = HeaderName::from_static("responder");

/// Every header name above: the names Courier itself sets and reads.
pub const WELL_KNOWN: [HeaderName; 15] = [
    MESSAGE_KIND,
    TYPE,
    TYPE_VERSION,
    CONTENT_TYPE,
    DESTINATION,
    PARTITION_KEY,
    CORRELATION_ID,
    REPLY_TO,
    CAUSATION_ID,
    DEADLINE,
    TRACEPARENT,
    CREATED_AT,
    ATTEMPT,
    REPLY_OUTCOME,
    RESPONDER,
];

/// What role a message plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    /// Asks one receiver to do something.
    Command,
    /// Tells subscribers that something happened.
    Event,
    /// Answers a command.
    Reply,
    /// Carries data with no intent attached.
    Document,
}

impl MessageKind {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Command => "command",
            Self::Event => "event",
            Self::Reply => "reply",
            Self::Document => "document",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "command" => Ok(Self::Command),
            "event" => Ok(Self::Event),
            "reply" => Ok(Self::Reply),
            "document" => Ok(Self::Document),
            other => Err(Error::invalid(format!(
                "header {MESSAGE_KIND}: {other:?} is not one of command, event, reply, document"
            ))),
        }
    }
}

/// A message type version: `MAJOR` or `MAJOR.MINOR`. Minor versions are compatible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    /// Incompatible changes bump this.
    pub major: u32,
    /// Compatible additions bump this.
    pub minor: u32,
}

impl Version {
    /// A version.
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Parse `MAJOR` or `MAJOR.MINOR`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(format!(
                "header {TYPE_VERSION}: {s:?} is not a version; expected MAJOR or MAJOR.MINOR, e.g. \"1\" or \"2.1\""
            ))
        };
        let (major, minor) = match s.split_once('.') {
            Some((a, b)) => (a, b),
            None => (s, "0"),
        };
        Ok(Self {
            major: major.parse().map_err(|_| bad())?,
            minor: minor.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Longest header name accepted.
pub const MAX_HEADER_NAME_LEN: usize = 128;
/// Longest header value accepted.
pub const MAX_HEADER_VALUE_LEN: usize = 8 * 1024;

/// Check a header name: lower-case ASCII letters, digits, `-`, `_`, `.`.
pub fn validate_header_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN {
        return Err(Error::invalid(format!(
            "header name {name:?} must be 1 to {MAX_HEADER_NAME_LEN} bytes long"
        )));
    }
    let allowed =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.');
    // Bytes first (every allowed character is one byte); the character only for the error.
    if name.bytes().all(|b| allowed(char::from(b))) {
        return Ok(());
    }
    if let Some(bad) = name.chars().find(|c| !allowed(*c)) {
        return Err(Error::invalid(format!(
            "header name {name:?} contains {bad:?}; expected lower-case letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// Check a header value: at most 8 KiB, no control characters.
pub fn validate_header_value(name: &str, value: &str) -> Result<()> {
    if value.len() > MAX_HEADER_VALUE_LEN {
        return Err(Error::invalid(format!(
            "header {name}: value is {} bytes; at most {MAX_HEADER_VALUE_LEN} are allowed",
            value.len()
        )));
    }
    // ASCII (the usual case) checked by bytes; other text by character (`is_control` also
    // covers U+0080..U+009F).
    let control = if value.is_ascii() {
        value.bytes().any(|b| b.is_ascii_control())
    } else {
        value.chars().any(char::is_control)
    };
    if control {
        return Err(Error::invalid(format!(
            "header {name}: value contains a control character"
        )));
    }
    Ok(())
}

/// The headers of a message: a sorted string map with typed accessors.
///
/// ```
/// use courier_core::headers::{Headers, PARTITION_KEY};
/// let mut h = Headers::new();
/// h.insert(PARTITION_KEY, "order-17").unwrap();
/// assert_eq!(h.partition_key(), Some("order-17"));
/// h.insert_raw("x-tenant", "acme").unwrap(); // unknown headers pass through
/// assert_eq!(h.get_raw("x-tenant"), Some("acme"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headers(BTreeMap<String, String>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Build from a raw map, validating every name and value.
    pub fn from_map(map: BTreeMap<String, String>) -> Result<Self> {
        for (k, v) in &map {
            validate_header_name(k)?;
            validate_header_value(k, v)?;
        }
        Ok(Self(map))
    }

    /// Set a well-known header.
    pub fn insert(&mut self, name: HeaderName, value: impl Into<String>) -> Result<()> {
        self.insert_raw(name.as_str(), value)
    }

    /// Set any header, validating name and value.
    pub fn insert_raw(&mut self, name: &str, value: impl Into<String>) -> Result<()> {
        let value = value.into();
        validate_header_name(name)?;
        validate_header_value(name, &value)?;
        self.0.insert(name.to_owned(), value);
        Ok(())
    }

    /// Remove a header, returning its value.
    pub fn remove(&mut self, name: HeaderName) -> Option<String> {
        self.0.remove(name.as_str())
    }

    /// A well-known header's raw value.
    pub fn get(&self, name: HeaderName) -> Option<&str> {
        self.0.get(name.as_str()).map(String::as_str)
    }

    /// Any header's raw value.
    pub fn get_raw(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Iterate over all headers, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw map.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Serialise to compact JSON (the storage form of the SQLite backends).
    pub fn to_json(&self) -> String {
        // A map of strings always serialises.
        serde_json::to_string(&self.0).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Parse the JSON form, validating every header.
    pub fn from_json(s: &str) -> Result<Self> {
        let map: BTreeMap<String, String> = serde_json::from_str(s).map_err(|e| {
            Error::new(
                crate::error::ErrorKind::Decode,
                format!("headers are not a JSON object of strings: {e}"),
            )
        })?;
        Self::from_map(map)
    }

    /// `message-type`: command, event, reply or document.
    pub fn message_kind(&self) -> Result<Option<MessageKind>> {
        self.get(MESSAGE_KIND).map(MessageKind::parse).transpose()
    }

    /// `type`: the message type name.
    pub fn message_type(&self) -> Result<Option<MessageType>> {
        self.get(TYPE)
            .map(|s| MessageType::new(s).map_err(|e| e.context(format!("header {TYPE}"))))
            .transpose()
    }

    /// `type-version`.
    pub fn type_version(&self) -> Result<Option<Version>> {
        self.get(TYPE_VERSION).map(Version::parse).transpose()
    }

    /// `content-type`.
    pub fn content_type(&self) -> Option<&str> {
        self.get(CONTENT_TYPE)
    }

    /// `destination`: the channel.
    pub fn destination(&self) -> Result<Option<ChannelName>> {
        self.get(DESTINATION)
            .map(|s| ChannelName::new(s).map_err(|e| e.context(format!("header {DESTINATION}"))))
            .transpose()
    }

    /// `partition-key`.
    pub fn partition_key(&self) -> Option<&str> {
        self.get(PARTITION_KEY)
    }

    /// `correlation-id`.
    pub fn correlation_id(&self) -> Option<&str> {
        self.get(CORRELATION_ID)
    }

    /// `reply-to`: the channel for replies.
    pub fn reply_to(&self) -> Result<Option<ChannelName>> {
        self.get(REPLY_TO)
            .map(|s| ChannelName::new(s).map_err(|e| e.context(format!("header {REPLY_TO}"))))
            .transpose()
    }

    /// `causation-id`.
    pub fn causation_id(&self) -> Result<Option<MessageId>> {
        self.get(CAUSATION_ID)
            .map(|s| MessageId::parse(s).map_err(|e| e.context(format!("header {CAUSATION_ID}"))))
            .transpose()
    }

    /// `deadline`, in milliseconds since the Unix epoch.
    pub fn deadline_ms(&self) -> Result<Option<u64>> {
        self.parse_u64(DEADLINE)
    }

    /// `traceparent`.
    pub fn traceparent(&self) -> Option<&str> {
        self.get(TRACEPARENT)
    }

    /// `created-at`, in milliseconds since the Unix epoch.
    pub fn created_at_ms(&self) -> Result<Option<u64>> {
        self.parse_u64(CREATED_AT)
    }

    /// `attempt`: deliveries before this one.
    pub fn attempt(&self) -> Result<Option<u32>> {
        self.get(ATTEMPT)
            .map(|s| {
                s.parse::<u32>().map_err(|_| {
                    Error::invalid(format!(
                        "header {ATTEMPT}: {s:?} is not a non-negative whole number"
                    ))
                })
            })
            .transpose()
    }

    fn parse_u64(&self, name: HeaderName) -> Result<Option<u64>> {
        self.get(name)
            .map(|s| {
                s.parse::<u64>().map_err(|_| {
                    Error::invalid(format!(
                        "header {name}: {s:?} is not milliseconds since the Unix epoch"
                    ))
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn well_known_names_are_valid_and_distinct() {
        let names: std::collections::BTreeSet<&str> =
            WELL_KNOWN.iter().map(HeaderName::as_str).collect();
        assert_eq!(names.len(), WELL_KNOWN.len());
        for n in names {
            assert!(validate_header_name(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn names_and_values_are_checked_character_by_character() {
        for ok in ["a", "x-tenant", "a.b_c-9"] {
            assert!(validate_header_name(ok).is_ok(), "{ok}");
        }
        for (bad, shown) in [("Bad", "'B'"), ("é-x", "'é'"), ("a b", "' '")] {
            let e = validate_header_name(bad).unwrap_err().to_string();
            assert!(e.contains(shown), "{bad}: {e}");
        }
        for ok in ["plain", "ünïcödé: a/b, c", "tab-free \u{a0} text"] {
            assert!(validate_header_value("n", ok).is_ok(), "{ok:?}");
        }
        // ASCII controls, DEL, and the C1 controls of non-ASCII text.
        for bad in ["a\tb", "line\n", "del\u{7f}", "ünï\u{85}", "\u{9f}"] {
            let e = validate_header_value("n", bad).unwrap_err().to_string();
            assert!(e.contains("control character"), "{bad:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn value_check_matches_the_character_rule(v in "\\PC{0,12}|[\\x00-\\x{a0}]{0,6}") {
            prop_assert_eq!(
                validate_header_value("n", &v).is_ok(),
                !v.chars().any(char::is_control)
            );
        }
    }

    #[test]
    fn typed_accessors_parse_and_report_bad_values() {
        let mut h = Headers::new();
        h.insert(MESSAGE_KIND, "event").unwrap();
        h.insert(TYPE, "restaurant.MenuRevised").unwrap();
        h.insert(TYPE_VERSION, "2").unwrap();
        h.insert(DEADLINE, "1700000000000").unwrap();
        assert_eq!(h.message_kind().unwrap(), Some(MessageKind::Event));
        assert_eq!(
            h.message_type().unwrap().unwrap().as_str(),
            "restaurant.MenuRevised"
        );
        assert_eq!(h.type_version().unwrap(), Some(Version::new(2, 0)));
        assert_eq!(h.deadline_ms().unwrap(), Some(1_700_000_000_000));
        assert_eq!(h.attempt().unwrap(), None);

        h.insert(ATTEMPT, "-1").unwrap();
        let e = h.attempt().unwrap_err();
        assert!(e.to_string().contains("attempt"), "{e}");
        h.insert(MESSAGE_KIND, "gossip").unwrap();
        assert!(h.message_kind().unwrap_err().to_string().contains("gossip"));
        h.insert(TYPE_VERSION, "x.1").unwrap();
        assert!(h.type_version().is_err());
    }

    #[test]
    fn bad_names_and_values_are_refused() {
        let mut h = Headers::new();
        assert!(h.insert_raw("Upper", "v").is_err());
        assert!(h.insert_raw("", "v").is_err());
        assert!(h.insert_raw("ok", "line\nbreak").is_err());
        assert!(Headers::from_json("[1,2]").is_err());
        assert!(Headers::from_json(r#"{"a": 1}"#).is_err());
    }

    #[test]
    fn unknown_headers_survive_json() {
        let mut h = Headers::new();
        h.insert_raw("x-custom.thing", "v").unwrap();
        h.insert(PARTITION_KEY, "k").unwrap();
        let back = Headers::from_json(&h.to_json()).unwrap();
        assert_eq!(back, h);
    }

    proptest! {
        #[test]
        fn json_round_trip(map in proptest::collection::btree_map("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}", 0..10)) {
            let h = Headers::from_map(map).unwrap();
            prop_assert_eq!(Headers::from_json(&h.to_json()).unwrap(), h);
        }

        #[test]
        fn parsing_arbitrary_json_never_panics(s in ".*") {
            let _ = Headers::from_json(&s);
        }

        #[test]
        fn versions_round_trip(major in 0u32..1000, minor in 0u32..1000) {
            let v = Version::new(major, minor);
            prop_assert_eq!(Version::parse(&v.to_string()).unwrap(), v);
        }
    }
}
