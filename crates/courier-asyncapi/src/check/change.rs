//! What a contract check finds: breaking changes and notes.

use std::fmt;

/// A change in NEW that breaks consumers (or producers) written against OLD.
///
/// Its `Display` is one line naming the message, the field path and what changed, e.g.
/// `restaurant.MenuRevised v1: field items[].price: type changed from integer to string`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaking {
    /// The message type name, e.g. `restaurant.MenuRevised`.
    pub message: String,
    /// Its major version, when the document says it.
    pub major: Option<u64>,
    /// `None` for the message as a whole; `Some("")` for the payload's root; else the
    /// field path: `a.b` for properties, `a[]` for array items, `a.*` for map values,
    /// `a(Variant)` for an enum variant.
    pub path: Option<String>,
    /// What changed.
    pub change: Change,
}

impl fmt::Display for Breaking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(major) = self.major {
            write!(f, " v{major}")?;
        }
        match self.path.as_deref() {
            None => write!(f, ": {}", self.change),
            Some("") => write!(f, ": payload: {}", self.change),
            Some(path) => write!(f, ": field {path}: {}", self.change),
        }
    }
}

/// The kinds of breaking change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// The message type is gone, and NEW has no later major version of it.
    MessageRemoved,
    /// The message is sent with another content type.
    ContentTypeChanged {
        /// The content type in OLD.
        old: String,
        /// The content type in NEW.
        new: String,
    },
    /// A required field is gone.
    RequiredFieldRemoved,
    /// A required field is gone and NEW has one new field with the same schema.
    FieldRenamed {
        /// The new field's name.
        to: String,
    },
    /// An optional field is gone and NEW rejects unknown fields
    /// (`additionalProperties: false`), so messages written against OLD are refused.
    OptionalFieldRemoved,
    /// A required field became optional: consumers of OLD rely on it being there.
    NoLongerRequired,
    /// An optional field became required: messages written against OLD may lack it.
    BecameRequired,
    /// A new required field: messages written against OLD lack it.
    RequiredFieldAdded,
    /// The JSON type changed (after following `$ref`s).
    TypeChanged {
        /// OLD's type, e.g. `integer`, `string`, `oneOf`, `any`.
        old: String,
        /// NEW's type.
        new: String,
    },
    /// The value may now be `null`.
    NullAdded,
    /// The value may no longer be `null`.
    NullRemoved,
    /// The `format` changed (e.g. `uint32` to `uint64`, `date-time` added).
    FormatChanged {
        /// OLD's format.
        old: Option<String>,
        /// NEW's format.
        new: Option<String>,
    },
    /// An enum value (or `const`) is gone: messages written against OLD may hold it.
    EnumValueRemoved {
        /// The value, as JSON.
        value: String,
    },
    /// A new enum value: consumers of OLD cannot read it.
    EnumValueAdded {
        /// The value, as JSON.
        value: String,
    },
    /// Any value was allowed; NEW allows only these.
    ValuesRestricted {
        /// NEW's values, as JSON.
        values: String,
    },
    /// Only some values were allowed; NEW allows any.
    ValuesUnrestricted {
        /// OLD's values, as JSON.
        values: String,
    },
    /// An enum variant (a `oneOf` branch) is gone.
    VariantRemoved {
        /// The variant's name (its tag or key).
        variant: String,
    },
    /// A new enum variant: consumers of OLD cannot read it.
    VariantAdded {
        /// The variant's name (its tag or key).
        variant: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MessageRemoved => {
                f.write_str("message type removed (NEW has no later major version of it)")
            }
            Self::ContentTypeChanged { old, new } => {
                write!(f, "content type changed from {old} to {new}")
            }
            Self::RequiredFieldRemoved => f.write_str("required field removed"),
            Self::FieldRenamed { to } => write!(f, "required field renamed to {to}"),
            Self::OptionalFieldRemoved => f.write_str(
                "optional field removed while NEW rejects unknown fields (additionalProperties: false)",
            ),
            Self::NoLongerRequired => {
                f.write_str("required field became optional (consumers of OLD rely on it)")
            }
            Self::BecameRequired => f.write_str(
                "optional field became required (messages written against OLD may lack it)",
            ),
            Self::RequiredFieldAdded => {
                f.write_str("new required field (messages written against OLD lack it)")
            }
            Self::TypeChanged { old, new } => write!(f, "type changed from {old} to {new}"),
            Self::NullAdded => f.write_str("may now be null (consumers of OLD cannot read null)"),
            Self::NullRemoved => {
                f.write_str("no longer nullable (messages written against OLD may hold null)")
            }
            Self::FormatChanged { old, new } => write!(
                f,
                "format changed from {} to {}",
                old.as_deref().unwrap_or("none"),
                new.as_deref().unwrap_or("none")
            ),
            Self::EnumValueRemoved { value } => write!(f, "enum value {value} removed"),
            Self::EnumValueAdded { value } => write!(
                f,
                "enum value {value} added (consumers of OLD cannot read it)"
            ),
            Self::ValuesRestricted { values } => write!(f, "values restricted to {values}"),
            Self::ValuesUnrestricted { values } => {
                write!(f, "no longer restricted to {values}")
            }
            Self::VariantRemoved { variant } => write!(f, "variant {variant} removed"),
            Self::VariantAdded { variant } => write!(
                f,
                "variant {variant} added (consumers of OLD cannot read it)"
            ),
        }
    }
}

/// A change worth telling that breaks nobody by the rules: a message type whose major
/// version went up, with the old major gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The message type name.
    pub message: String,
    /// The major version in OLD.
    pub old_major: u64,
    /// The lowest later major version in NEW.
    pub new_major: u64,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} v{} replaced by v{} (a major bump: consumers of v{} must upcast or upgrade)",
            self.message, self.old_major, self.new_major, self.old_major
        )
    }
}
