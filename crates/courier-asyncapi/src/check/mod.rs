//! The contract check: does NEW break what was written against OLD?
//!
//! The rules are in the [crate documentation](crate#contract-check).

mod change;
mod schema;
#[cfg(test)]
mod tests;

pub use change::{Breaking, Change, Note};

use schema::SchemaDiff;
use serde_json::Value;
use std::collections::BTreeMap;

/// What [`compare`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Changes that break consumers or producers written against OLD: the check fails.
    pub breaking: Vec<Breaking>,
    /// Changes worth telling that break nobody by the rules (a major version bump).
    pub notes: Vec<Note>,
}

impl Comparison {
    /// Whether NEW is compatible with OLD.
    pub fn is_compatible(&self) -> bool {
        self.breaking.is_empty()
    }
}

/// The breaking changes from `old` to `new` (two AsyncAPI 3 documents, e.g. from
/// [`load`](crate::load)); empty when compatible. [`compare`] also gives the notes.
pub fn check(old: &Value, new: &Value) -> Vec<Breaking> {
    compare(old, new).breaking
}

/// Compare two AsyncAPI 3 documents' message types (`components.messages`), matched by
/// message name and major version.
///
/// ```
/// use courier_asyncapi::{Change, parse};
/// let doc = |required: &str| format!(
///     "asyncapi: 3.0.0\ninfo: {{title: t, version: 1.0.0}}\ncomponents:\n  messages:\n    \
///      m_v1:\n      name: m\n      x-courier-version: '1.0'\n      payload:\n        \
///      type: object\n        properties: {{a: {{type: string}}}}\n        required: {required}\n");
/// let old = parse(&doc("[a]"), "old")?;
/// let new = parse(&doc("[]"), "new")?;
/// let found = courier_asyncapi::compare(&old, &new);
/// assert_eq!(found.breaking[0].change, Change::NoLongerRequired);
/// assert_eq!(found.breaking[0].to_string(),
///     "m v1: field a: required field became optional (consumers of OLD rely on it)");
/// assert!(courier_asyncapi::check(&old, &old).is_empty());
/// # Ok::<(), courier_asyncapi::Error>(())
/// ```
pub fn compare(old: &Value, new: &Value) -> Comparison {
    let old_messages = messages(old);
    let new_messages = messages(new);
    let mut out = Comparison::default();
    for ((name, major), old_message) in &old_messages {
        let key = (name.clone(), *major);
        if let Some(new_message) = new_messages.get(&key) {
            compare_message(name, *major, old, old_message, new, new_message, &mut out);
            continue;
        }
        let successor = major.and_then(|m| {
            new_messages
                .keys()
                .filter(|(n, _)| n == name)
                .filter_map(|(_, nm)| nm.filter(|nm| *nm > m))
                .min()
                .map(|nm| (m, nm))
        });
        match successor {
            Some((old_major, new_major)) => out.notes.push(Note {
                message: name.clone(),
                old_major,
                new_major,
            }),
            None => out.breaking.push(Breaking {
                message: name.clone(),
                major: *major,
                path: None,
                change: Change::MessageRemoved,
            }),
        }
    }
    out
}

fn compare_message(
    name: &str,
    major: Option<u64>,
    old_doc: &Value,
    old: &Value,
    new_doc: &Value,
    new: &Value,
    out: &mut Comparison,
) {
    let breaking = |path: Option<String>, change: Change| Breaking {
        message: name.to_owned(),
        major,
        path,
        change,
    };
    let (old_ct, new_ct) = (content_type(old_doc, old), content_type(new_doc, new));
    if old_ct != new_ct {
        out.breaking.push(breaking(
            None,
            Change::ContentTypeChanged {
                old: old_ct.to_owned(),
                new: new_ct.to_owned(),
            },
        ));
    }
    let mut diff = SchemaDiff::new(old_doc, new_doc);
    diff.compare("", payload(old), payload(new), false);
    out.breaking.extend(
        diff.found
            .into_iter()
            .map(|(path, change)| breaking(Some(path), change)),
    );
}

/// The message types of `doc` by (name, major version): the name is `x-courier-type`,
/// else `name`, else the component key; the major comes from `x-courier-version`, else
/// from a `_v<N>` suffix of the key.
fn messages(doc: &Value) -> BTreeMap<(String, Option<u64>), &Value> {
    let mut out = BTreeMap::new();
    let Some(components) = doc
        .pointer("/components/messages")
        .and_then(Value::as_object)
    else {
        return out;
    };
    for (key, message) in components {
        let message = follow(doc, message);
        let name = ["x-courier-type", "name"]
            .iter()
            .find_map(|f| message.get(*f).and_then(Value::as_str))
            .unwrap_or(key)
            .to_owned();
        let major = message
            .get("x-courier-version")
            .and_then(version_major)
            .or_else(|| key.rsplit_once("_v").and_then(|(_, n)| n.parse().ok()));
        out.entry((name, major)).or_insert(message);
    }
    out
}

fn version_major(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.split('.').next()?.trim().parse().ok(),
        Value::Number(n) => n.as_f64().map(|f| f.trunc() as u64),
        _ => None,
    }
}

/// The payload schema; a multi-format schema object gives its `schema`.
fn payload(message: &Value) -> &Value {
    static ANY: Value = Value::Bool(true);
    match message.get("payload") {
        Some(p) if p.get("schemaFormat").is_some() => p.get("schema").unwrap_or(&ANY),
        Some(p) => p,
        None => &ANY,
    }
}

fn content_type<'a>(doc: &'a Value, message: &'a Value) -> &'a str {
    message
        .get("contentType")
        .or_else(|| doc.get("defaultContentType"))
        .and_then(Value::as_str)
        .unwrap_or(courier_core::JSON)
}

/// `value`, or what its `$ref` points to within `doc`.
fn follow<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    let mut current = value;
    for _ in 0..8 {
        match current
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|p| doc.pointer(p))
        {
            Some(next) => current = next,
            None => break,
        }
    }
    current
}
