//! Reading and writing documents as YAML or JSON.

use crate::{Error, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// Write `doc` (a [`Document`](crate::Document) or a [`Value`]) as YAML.
pub fn to_yaml<T: Serialize + ?Sized>(doc: &T) -> Result<String> {
    serde_yaml_ng::to_string(doc).map_err(|e| Error::Write {
        format: "YAML",
        message: e.to_string(),
    })
}

/// Write `doc` as pretty JSON (with a final newline).
pub fn to_json<T: Serialize + ?Sized>(doc: &T) -> Result<String> {
    let mut text = serde_json::to_string_pretty(doc).map_err(|e| Error::Write {
        format: "JSON",
        message: e.to_string(),
    })?;
    text.push('\n');
    Ok(text)
}

/// Parse a YAML or JSON text (JSON is YAML) into a value; `origin` names the text in
/// errors.
fn parse_value(text: &str, origin: &str) -> Result<Value> {
    serde_yaml_ng::from_str(text).map_err(|e| Error::Parse {
        origin: origin.to_owned(),
        expected: "YAML or JSON",
        message: e.to_string(),
    })
}

/// Parse an AsyncAPI 3 document from YAML or JSON; `origin` names the text in errors.
///
/// ```
/// let doc = courier_asyncapi::parse("asyncapi: 3.0.0\ninfo: {title: t, version: 1.0.0}\n", "inline")?;
/// assert_eq!(doc["info"]["title"], "t");
/// assert!(courier_asyncapi::parse("asyncapi: 2.6.0\n", "old").is_err());
/// # Ok::<(), courier_asyncapi::Error>(())
/// ```
pub fn parse(text: &str, origin: &str) -> Result<Value> {
    let doc = parse_value(text, origin)?;
    let not_asyncapi = |message: String| Error::Parse {
        origin: origin.to_owned(),
        expected: "an AsyncAPI 3 document",
        message,
    };
    match doc.get("asyncapi") {
        Some(Value::String(v)) if v.starts_with("3.") => {}
        Some(Value::String(v)) => {
            return Err(not_asyncapi(format!(
                "it is AsyncAPI {v}; only 3.x documents are supported"
            )));
        }
        Some(other) => {
            return Err(not_asyncapi(format!(
                "its `asyncapi` field is {other}, not a version string like \"3.0.0\""
            )));
        }
        None => return Err(not_asyncapi("it has no `asyncapi` field".to_owned())),
    }
    if !doc.get("info").is_some_and(Value::is_object) {
        return Err(not_asyncapi("it has no `info` object".to_owned()));
    }
    Ok(doc)
}

/// Read and [`parse`] an AsyncAPI 3 document file (YAML or JSON).
pub fn load(path: impl AsRef<Path>) -> Result<Value> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}
