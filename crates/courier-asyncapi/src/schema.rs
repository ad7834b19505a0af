//! Moving the nested types of payload schemas into `components.schemas`.
//!
//! schemars (draft-07) puts nested types in the root schema's `definitions` and refers to
//! them as `#/definitions/X`, and to a recursive root type as `#`. Inside an AsyncAPI
//! document those pointers would resolve against the document, so each definition moves
//! to `#/components/schemas/X` and every `$ref` is rewritten. Two messages share a schema
//! when it is the same type (same definition and same nested definitions); a different
//! type with the same name gets the message id as a prefix.

use crate::ids::sanitize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

const COMPONENTS: &str = "#/components/schemas/";

/// The shared `components.schemas` being built.
#[derive(Debug, Default)]
pub(crate) struct Schemas {
    /// Target name → rewritten schema.
    pub(crate) schemas: BTreeMap<String, Value>,
    /// Target name → the raw definitions it was made from (to tell same type from same
    /// name).
    origins: BTreeMap<String, BTreeMap<String, Value>>,
}

impl Schemas {
    /// The payload schema of message `message_id` with its definitions moved out. The
    /// `$schema` keyword goes too: the document says which schema format payloads use.
    pub(crate) fn hoist(&mut self, message_id: &str, schema: &Value) -> Value {
        let mut root = schema.clone();
        let Some(obj) = root.as_object_mut() else {
            return root;
        };
        obj.remove("$schema");
        let mut defs: BTreeMap<String, Value> = BTreeMap::new();
        for key in ["definitions", "$defs"] {
            if let Some(Value::Object(map)) = obj.remove(key) {
                defs.extend(map);
            }
        }
        let recursive_root =
            has_ref(&root, |r| r == "#") || defs.values().any(|d| has_ref(d, |r| r == "#"));

        let mut targets: BTreeMap<String, String> = BTreeMap::new();
        for name in defs.keys() {
            let closure = closure(name, &defs, &root);
            let base = sanitize(name);
            let target = self.claim(&[base.clone(), format!("{message_id}_{base}")], closure);
            targets.insert(name.clone(), target);
        }
        let root_target = recursive_root.then(|| {
            let mut origin = BTreeMap::new();
            origin.insert("#".to_owned(), root.clone());
            origin.extend(defs.clone());
            self.claim(&[message_id.to_owned()], origin)
        });

        let rewrite = |value: &mut Value| rewrite_refs(value, &targets, root_target.as_deref());
        for (name, mut def) in defs {
            rewrite(&mut def);
            if let Some(target) = targets.get(&name) {
                self.schemas.entry(target.clone()).or_insert(def);
            }
        }
        rewrite(&mut root);
        match root_target {
            Some(target) => {
                self.schemas.entry(target.clone()).or_insert(root);
                let mut reference = Map::new();
                reference.insert(
                    "$ref".to_owned(),
                    Value::String(format!("{COMPONENTS}{target}")),
                );
                Value::Object(reference)
            }
            None => root,
        }
    }

    /// The first of `candidates` (then `<first>_2`, ...) that is free or already holds the
    /// same `origin`.
    fn claim(&mut self, candidates: &[String], origin: BTreeMap<String, Value>) -> String {
        let fits = |s: &Self, c: &String| s.origins.get(c).is_none_or(|o| *o == origin);
        let first = candidates
            .first()
            .cloned()
            .unwrap_or_else(|| "_".to_owned());
        let target = candidates
            .iter()
            .find(|c| fits(self, c))
            .cloned()
            .unwrap_or_else(|| {
                (2..)
                    .map(|n| format!("{first}_{n}"))
                    .find(|c| fits(self, c))
                    .unwrap_or(first)
            });
        self.origins.entry(target.clone()).or_insert(origin);
        target
    }
}

/// Definition `name` and every definition it reaches (with the root when it reaches `#`),
/// by original name: what makes two same-named definitions the same type.
fn closure(name: &str, defs: &BTreeMap<String, Value>, root: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut todo = vec![name.to_owned()];
    while let Some(n) = todo.pop() {
        if out.contains_key(&n) {
            continue;
        }
        let schema = if n == "#" { Some(root) } else { defs.get(&n) };
        let Some(schema) = schema else { continue };
        collect_refs(schema, &mut |r| {
            if r == "#" {
                todo.push("#".to_owned());
            } else if let Some((def, _)) = local_definition(r) {
                todo.push(def);
            }
        });
        out.insert(n, schema.clone());
    }
    out
}

/// For `#/definitions/NAME[/rest]` or `#/$defs/NAME[/rest]`: the unescaped NAME and the
/// rest of the pointer (empty or starting with `/`).
fn local_definition(reference: &str) -> Option<(String, &str)> {
    let tail = reference
        .strip_prefix("#/definitions/")
        .or_else(|| reference.strip_prefix("#/$defs/"))?;
    let (token, rest) = match tail.find('/') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, ""),
    };
    Some((token.replace("~1", "/").replace("~0", "~"), rest))
}

fn collect_refs(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                f(r);
            }
            for v in map.values() {
                collect_refs(v, f);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, f)),
        _ => {}
    }
}

fn has_ref(value: &Value, pred: impl Fn(&str) -> bool) -> bool {
    let mut found = false;
    collect_refs(value, &mut |r| found |= pred(r));
    found
}

fn rewrite_refs(value: &mut Value, targets: &BTreeMap<String, String>, root: Option<&str>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get_mut("$ref") {
                let new = if r == "#" {
                    root.map(|t| format!("{COMPONENTS}{t}"))
                } else {
                    local_definition(r).and_then(|(name, rest)| {
                        targets.get(&name).map(|t| format!("{COMPONENTS}{t}{rest}"))
                    })
                };
                if let Some(new) = new {
                    *r = new;
                }
            }
            for (key, v) in map.iter_mut() {
                if key != "$ref" {
                    rewrite_refs(v, targets, root);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| rewrite_refs(v, targets, root)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn definitions_move_to_components_and_refs_follow() {
        let mut s = Schemas::default();
        let payload = s.hoist(
            "m_v1",
            &json!({
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "properties": {"a": {"$ref": "#/definitions/A"}},
                "definitions": {
                    "A": {"type": "object", "properties": {"b": {"$ref": "#/definitions/B"}}},
                    "B": {"type": "string"}
                }
            }),
        );
        assert_eq!(
            payload,
            json!({"type": "object", "properties": {"a": {"$ref": "#/components/schemas/A"}}})
        );
        assert_eq!(
            s.schemas["A"],
            json!({"type": "object", "properties": {"b": {"$ref": "#/components/schemas/B"}}})
        );
        assert_eq!(s.schemas["B"], json!({"type": "string"}));
    }

    #[test]
    fn same_type_is_shared_and_a_different_one_is_prefixed() {
        let mut s = Schemas::default();
        let with = |item: Value| {
            json!({
                "type": "object",
                "properties": {"i": {"$ref": "#/definitions/Item"}},
                "definitions": {"Item": item}
            })
        };
        s.hoist("a_v1", &with(json!({"type": "string"})));
        let same = s.hoist("b_v1", &with(json!({"type": "string"})));
        let other = s.hoist("c_v1", &with(json!({"type": "integer"})));
        assert_eq!(same["properties"]["i"]["$ref"], "#/components/schemas/Item");
        assert_eq!(
            other["properties"]["i"]["$ref"],
            "#/components/schemas/c_v1_Item"
        );
        assert_eq!(s.schemas.len(), 2);
    }

    #[test]
    fn a_recursive_root_becomes_a_component() {
        let mut s = Schemas::default();
        let payload = s.hoist(
            "t_Tree_v1",
            &json!({
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}
            }),
        );
        assert_eq!(payload, json!({"$ref": "#/components/schemas/t_Tree_v1"}));
        assert_eq!(
            s.schemas["t_Tree_v1"]["properties"]["children"]["items"]["$ref"],
            "#/components/schemas/t_Tree_v1"
        );
    }
}
