//! Each service's OpenAPI 3.1 document (served at `/openapi.json`), with the JSON Schemas
//! of its request and response bodies generated from the Rust types.

use schemars::JsonSchema;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};

/// Builds an OpenAPI document operation by operation.
pub(crate) struct OpenApi {
    title: String,
    paths: Map<String, Value>,
    generator: SchemaGenerator,
}

impl OpenApi {
    pub(crate) fn new(title: &str) -> Self {
        let mut settings = SchemaSettings::openapi3();
        settings.definitions_path = "#/components/schemas/".into();
        Self {
            title: title.to_owned(),
            paths: Map::new(),
            generator: settings.into_generator(),
        }
    }

    /// The schema of `T` (a `$ref` into `components.schemas` for named types).
    pub(crate) fn schema<T: JsonSchema>(&mut self) -> Value {
        self.generator.subschema_for::<T>().to_value()
    }

    /// Add `method path` with an optional JSON request body and its responses
    /// `(status, description, schema)`.
    pub(crate) fn op(
        &mut self,
        method: &str,
        path: &str,
        summary: &str,
        request: Option<Value>,
        responses: &[(u16, &str, Option<Value>)],
    ) -> &mut Self {
        let mut op = json!({ "summary": summary, "responses": {} });
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if let Some(schema) = request {
            op["requestBody"] = json!({
                "required": true,
                "content": { "application/json": { "schema": schema } }
            });
        }
        for (status, description, schema) in responses {
            let mut r = json!({ "description": description });
            if let Some(s) = schema {
                r["content"] = json!({ "application/json": { "schema": s } });
            }
            op["responses"][status.to_string()] = r;
        }
        let entry = self
            .paths
            .entry(path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[method] = op;
        self
    }

    /// The document.
    pub(crate) fn build(mut self) -> Value {
        let error = json!({
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "What is wrong, in words."},
                "field": {"type": "string", "description": "The field at fault, e.g. lineItems[0].quantity."}
            }
        });
        let mut schemas: Map<String, Value> =
            self.generator.take_definitions(true).into_iter().collect();
        schemas.insert("Error".to_owned(), error);
        json!({
            "openapi": "3.1.0",
            "info": { "title": self.title, "version": "1.0.0" },
            "paths": self.paths,
            "components": { "schemas": schemas }
        })
    }
}

/// The `$ref` of the shared error body.
pub(crate) fn error_ref() -> Value {
    json!({ "$ref": "#/components/schemas/Error" })
}
