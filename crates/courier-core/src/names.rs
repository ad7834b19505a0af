//! Validated names: channels, consumer groups, message types.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

const MAX_NAME_LEN: usize = 200;

fn validate(what: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(format!("{what} must not be empty")));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{what} {s:?} is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            s.len()
        )));
    }
    let first = s.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err(Error::invalid(format!(
            "{what} {s:?} must start with a letter or digit"
        )));
    }
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(Error::invalid(format!(
            "{what} {s:?} contains {bad:?}; expected letters, digits, '.', '-' or '_'"
        )));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validate and wrap a name: ASCII letters, digits, `.`, `-`, `_`, starting
            /// with a letter or digit, at most 200 bytes.
            pub fn new(name: impl Into<String>) -> Result<Self> {
                let name = name.into();
                validate($what, &name)?;
                Ok(Self(name))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The name of a channel: a partitioned, durable log (e.g. `restaurant`, `consumer-service`).
    ChannelName,
    "channel name"
);
name_type!(
    /// The name of a consumer group; members of one group compete for a channel's partitions.
    GroupName,
    "consumer group name"
);
name_type!(
    /// The stable name of a message type (e.g. `restaurant.MenuRevised`).
    MessageType,
    "message type"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_usual_names() {
        for n in [
            "orders",
            "restaurant.MenuRevised",
            "consumer-service",
            "a_1",
        ] {
            assert!(ChannelName::new(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_bad_names_with_a_reason() {
        let e = ChannelName::new("").unwrap_err();
        assert!(e.to_string().contains("must not be empty"));
        let e = ChannelName::new("a b").unwrap_err();
        assert!(e.to_string().contains("' '"), "{e}");
        let e = MessageType::new("-x").unwrap_err();
        assert!(e.to_string().contains("start with"), "{e}");
        assert!(GroupName::new("x".repeat(201)).is_err());
    }

    proptest! {
        #[test]
        fn valid_names_round_trip(s in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,50}") {
            let n = ChannelName::new(s.clone()).unwrap();
            prop_assert_eq!(n.as_str(), s.as_str());
            prop_assert_eq!(n.to_string().parse::<ChannelName>().unwrap(), n);
        }

        #[test]
        fn arbitrary_input_never_panics(s in ".*") {
            let _ = ChannelName::new(s);
        }
    }
}
