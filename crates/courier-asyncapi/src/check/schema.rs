//! Comparing two payload schemas (JSON Schema draft-07, as schemars writes them).

use super::change::Change;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

/// How many `$ref`s in a row are followed before giving up (a ref cycle).
const MAX_REF_HOPS: usize = 32;

/// Compares schemas of OLD and NEW, each within its own document (for `$ref`s).
pub(super) struct SchemaDiff<'a> {
    old_doc: &'a Value,
    new_doc: &'a Value,
    /// Pairs of refs being compared up the stack: a recursive type is compared once.
    visiting: BTreeSet<(String, String)>,
    /// What was found: path and change.
    pub(super) found: Vec<(String, Change)>,
}

/// A schema with `$ref`s followed and the `Option` wrapper (`anyOf: [X, null]`) removed.
struct Resolved<'a> {
    schema: &'a Value,
    nullable: bool,
    /// The refs followed to get here (for cycle detection).
    refs: Vec<&'a str>,
}

impl<'a> SchemaDiff<'a> {
    pub(super) fn new(old_doc: &'a Value, new_doc: &'a Value) -> Self {
        Self {
            old_doc,
            new_doc,
            visiting: BTreeSet::new(),
            found: Vec::new(),
        }
    }

    /// Compare `old` with `new` at `path`. `optionality_reported`: the field's
    /// required-ness change was already reported, so a nullability change that comes with
    /// it (an `Option` field) is not reported again.
    pub(super) fn compare(
        &mut self,
        path: &str,
        old: &'a Value,
        new: &'a Value,
        optionality_reported: bool,
    ) {
        let old = resolve(self.old_doc, old);
        let new = resolve(self.new_doc, new);
        let key = (old.refs.join(" "), new.refs.join(" "));
        let tracked = !old.refs.is_empty() || !new.refs.is_empty();
        if tracked && !self.visiting.insert(key.clone()) {
            return;
        }
        self.compare_resolved(path, &old, &new, optionality_reported);
        if tracked {
            self.visiting.remove(&key);
        }
    }

    fn compare_resolved(
        &mut self,
        path: &str,
        old: &Resolved<'a>,
        new: &Resolved<'a>,
        optionality_reported: bool,
    ) {
        let (old_shape, new_shape) = (shape(old.schema), shape(new.schema));
        if old_shape != new_shape {
            self.push(
                path,
                Change::TypeChanged {
                    old: old_shape,
                    new: new_shape,
                },
            );
            return;
        }
        if !optionality_reported {
            match (old.nullable, new.nullable) {
                (false, true) => self.push(path, Change::NullAdded),
                (true, false) => self.push(path, Change::NullRemoved),
                _ => {}
            }
        }
        let (old_format, new_format) = (
            str_field(old.schema, "format"),
            str_field(new.schema, "format"),
        );
        if old_format != new_format {
            self.push(
                path,
                Change::FormatChanged {
                    old: old_format.map(str::to_owned),
                    new: new_format.map(str::to_owned),
                },
            );
        }
        self.compare_values(path, old.schema, new.schema);
        self.compare_object(path, old.schema, new.schema);
        self.compare_items(path, old.schema, new.schema);
        self.compare_variants(path, old.schema, new.schema);
        if let (Some(Value::Array(o)), Some(Value::Array(n))) =
            (old.schema.get("allOf"), new.schema.get("allOf"))
        {
            for (o, n) in o.iter().zip(n) {
                self.compare(path, o, n, optionality_reported);
            }
        }
    }

    fn push(&mut self, path: &str, change: Change) {
        self.found.push((path.to_owned(), change));
    }

    /// `enum` and `const`.
    fn compare_values(&mut self, path: &str, old: &Value, new: &Value) {
        match (allowed_values(old), allowed_values(new)) {
            (Some(o), Some(n)) => {
                for value in o.iter().filter(|v| !n.contains(v)) {
                    self.push(
                        path,
                        Change::EnumValueRemoved {
                            value: value.to_string(),
                        },
                    );
                }
                for value in n.iter().filter(|v| !o.contains(v)) {
                    self.push(
                        path,
                        Change::EnumValueAdded {
                            value: value.to_string(),
                        },
                    );
                }
            }
            (None, Some(n)) => self.push(path, Change::ValuesRestricted { values: list(&n) }),
            (Some(o), None) => self.push(path, Change::ValuesUnrestricted { values: list(&o) }),
            (None, None) => {}
        }
    }

    fn compare_object(&mut self, path: &str, old: &'a Value, new: &'a Value) {
        static EMPTY: LazyLock<Map<String, Value>> = LazyLock::new(Map::new);
        let old_props = old
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&EMPTY);
        let new_props = new
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&EMPTY);
        let (old_req, new_req) = (required(old), required(new));

        let removed: Vec<&String> = old_props
            .keys()
            .filter(|k| !new_props.contains_key(*k))
            .collect();
        let added: Vec<&String> = new_props
            .keys()
            .filter(|k| !old_props.contains_key(*k))
            .collect();
        // One required field gone and one new field with the same schema: a rename.
        let renamed = match (removed.as_slice(), added.as_slice()) {
            ([from], [to])
                if old_req.contains(from.as_str()) && old_props[*from] == new_props[*to] =>
            {
                Some((*from, *to))
            }
            _ => None,
        };
        let rejects_unknown = new.get("additionalProperties") == Some(&Value::Bool(false));
        for name in removed {
            let field = join(path, name);
            if let Some((_, to)) = renamed.filter(|(from, _)| *from == name) {
                self.push(&field, Change::FieldRenamed { to: to.clone() });
            } else if old_req.contains(name.as_str()) {
                self.push(&field, Change::RequiredFieldRemoved);
            } else if rejects_unknown {
                self.push(&field, Change::OptionalFieldRemoved);
            }
        }
        for name in added {
            if new_req.contains(name.as_str()) && renamed.is_none_or(|(_, to)| to != name) {
                self.push(&join(path, name), Change::RequiredFieldAdded);
            }
        }
        for (name, old_schema) in old_props {
            let Some(new_schema) = new_props.get(name) else {
                continue;
            };
            let field = join(path, name);
            let (was, is) = (
                old_req.contains(name.as_str()),
                new_req.contains(name.as_str()),
            );
            match (was, is) {
                (true, false) => self.push(&field, Change::NoLongerRequired),
                (false, true) => self.push(&field, Change::BecameRequired),
                _ => {}
            }
            self.compare(&field, old_schema, new_schema, was != is);
        }
        // Maps: the schema of their values.
        if let (Some(o @ Value::Object(_)), Some(n @ Value::Object(_))) = (
            old.get("additionalProperties"),
            new.get("additionalProperties"),
        ) {
            self.compare(&format!("{}.*", root_or(path)), o, n, false);
        }
    }

    fn compare_items(&mut self, path: &str, old: &'a Value, new: &'a Value) {
        match (old.get("items"), new.get("items")) {
            (Some(Value::Array(o)), Some(Value::Array(n))) => {
                for (i, (o, n)) in o.iter().zip(n).enumerate() {
                    self.compare(&format!("{}[{i}]", root_or(path)), o, n, false);
                }
                if o.len() != n.len() {
                    self.push(
                        path,
                        Change::TypeChanged {
                            old: format!("tuple of {}", o.len()),
                            new: format!("tuple of {}", n.len()),
                        },
                    );
                }
            }
            (Some(o), Some(n)) => self.compare(&format!("{}[]", root_or(path)), o, n, false),
            _ => {}
        }
    }

    /// `oneOf` / `anyOf` branches (Rust enums with data), matched by variant name.
    fn compare_variants(&mut self, path: &str, old: &'a Value, new: &'a Value) {
        for keyword in ["oneOf", "anyOf"] {
            let (Some(Value::Array(o)), Some(Value::Array(n))) =
                (old.get(keyword), new.get(keyword))
            else {
                continue;
            };
            let (o, n) = (variants(self.old_doc, o), variants(self.new_doc, n));
            for (name, old_branch) in &o {
                match n.get(name) {
                    None => self.push(
                        path,
                        Change::VariantRemoved {
                            variant: name.clone(),
                        },
                    ),
                    Some(new_branch) => {
                        if let (Some(ob), Some(nb)) = (old_branch, new_branch) {
                            self.compare(&format!("{}({name})", root_or(path)), ob, nb, false);
                        }
                    }
                }
            }
            for name in n.keys().filter(|k| !o.contains_key(*k)) {
                self.push(
                    path,
                    Change::VariantAdded {
                        variant: name.clone(),
                    },
                );
            }
        }
    }
}

/// The branches of a `oneOf`, by variant name: a unit variant (`const` or an `enum` of
/// names) has no schema to compare; an externally tagged one is named by its single
/// property, an internally or adjacently tagged one by its tag's `const`; anything
/// else by its position.
fn variants<'a>(doc: &'a Value, branches: &'a [Value]) -> BTreeMap<String, Option<&'a Value>> {
    let mut out = BTreeMap::new();
    for (i, branch) in branches.iter().enumerate() {
        let resolved = resolve(doc, branch).schema;
        if let Some(values) = allowed_values(resolved) {
            for v in values {
                out.insert(value_name(&v), None);
            }
            continue;
        }
        let props = resolved.get("properties").and_then(Value::as_object);
        // Internally or adjacently tagged: the whole branch, tag included.
        if let Some(tag) = props.and_then(|p| p.values().find_map(|s| s.get("const"))) {
            out.insert(value_name(tag), Some(branch));
            continue;
        }
        // Externally tagged: `{"Variant": content}`; compare the contents.
        match props {
            Some(p) if p.len() == 1 && required(resolved).len() == 1 => {
                for (name, content) in p {
                    out.insert(name.clone(), Some(content));
                }
            }
            _ => {
                out.insert(format!("#{i}"), Some(branch));
            }
        }
    }
    out
}

/// Follow `$ref`s (within `doc`), `Option`'s `anyOf: [X, {type: null}]` and a lone
/// `allOf: [X]` (how schemars attaches a description to a `$ref`).
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> Resolved<'a> {
    let mut current = schema;
    let mut nullable = false;
    let mut refs = Vec::new();
    for _ in 0..MAX_REF_HOPS {
        if let Some(Value::String(r)) = current.get("$ref") {
            let target = r.strip_prefix('#').and_then(|pointer| doc.pointer(pointer));
            match target {
                Some(t) => {
                    refs.push(r.as_str());
                    current = t;
                    continue;
                }
                None => break,
            }
        }
        if let Some(Value::Array(branches)) = current.get("anyOf").or_else(|| current.get("oneOf"))
            && branches.len() == 2
            && let Some(null_at) = branches.iter().position(is_null_schema)
        {
            nullable = true;
            current = &branches[1 - null_at];
            continue;
        }
        if let Some(Value::Array(parts)) = current.get("allOf")
            && parts.len() == 1
            && current.get("type").is_none()
            && current.get("properties").is_none()
        {
            current = &parts[0];
            continue;
        }
        break;
    }
    if let Some(Value::Array(types)) = current.get("type")
        && types.iter().any(|t| t == "null")
        && types.len() > 1
    {
        nullable = true;
    }
    Resolved {
        schema: current,
        nullable,
        refs,
    }
}

fn is_null_schema(schema: &Value) -> bool {
    schema.get("type").is_some_and(|t| t == "null")
}

/// What kind of value a schema describes, ignoring `null`: `string`, `integer|string`,
/// `object`, `oneOf`, `any`, ...
fn shape(schema: &Value) -> String {
    match schema {
        Value::Bool(true) => return "any".to_owned(),
        Value::Bool(false) => return "nothing".to_owned(),
        _ => {}
    }
    let types: BTreeSet<&str> = match schema.get("type") {
        Some(Value::String(t)) => [t.as_str()].into(),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => BTreeSet::new(),
    };
    let without_null: Vec<&str> = types.iter().copied().filter(|t| *t != "null").collect();
    if !without_null.is_empty() {
        return without_null.join("|");
    }
    if !types.is_empty() {
        return "null".to_owned();
    }
    for keyword in ["oneOf", "anyOf", "allOf"] {
        if schema.get(keyword).is_some() {
            return keyword.to_owned();
        }
    }
    if let Some(values) = allowed_values(schema) {
        let kinds: BTreeSet<&str> = values.iter().map(json_type).collect();
        return kinds.into_iter().collect::<Vec<_>>().join("|");
    }
    if schema.get("properties").is_some() {
        return "object".to_owned();
    }
    if schema.get("items").is_some() {
        return "array".to_owned();
    }
    "any".to_owned()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `enum` values, or the `const` as a one-value list.
fn allowed_values(schema: &Value) -> Option<Vec<Value>> {
    if let Some(Value::Array(values)) = schema.get("enum") {
        return Some(values.clone());
    }
    schema.get("const").map(|v| vec![v.clone()])
}

fn value_name(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn list(values: &[Value]) -> String {
    Value::Array(values.to_vec()).to_string()
}

fn required(schema: &Value) -> BTreeSet<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn str_field<'v>(schema: &'v Value, key: &str) -> Option<&'v str> {
    schema.get(key).and_then(Value::as_str)
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// How the payload's root is written in a path that goes deeper (`[]` alone reads badly).
fn root_or(path: &str) -> &str {
    if path.is_empty() { "payload" } else { path }
}
