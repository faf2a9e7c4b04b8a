//! Checks every HTTP answer the tests receive against `openapi.yaml`: the path and method
//! must be documented (an unknown path must be the documented 404 error shape), the status
//! must be listed for the operation, and a JSON body must validate against its schema. A
//! response the document does not describe fails the test that received it.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::{Value, json};

static SPEC: LazyLock<Value> = LazyLock::new(|| {
    let text = include_str!("../../../openapi.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).expect("openapi.yaml parses");
    serde_json::to_value(yaml).expect("openapi.yaml is JSON-compatible")
});

type Validators = Mutex<HashMap<String, Arc<jsonschema::Validator>>>;
static VALIDATORS: LazyLock<Validators> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Follows a local `$ref` (`#/components/...`) of the document.
fn resolve(value: &Value) -> &Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(pointer) => {
            let target = SPEC
                .pointer(pointer.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("openapi.yaml: dangling $ref {pointer}"));
            resolve(target)
        }
        None => value,
    }
}

/// A validator for `schema`, whose `$ref`s point into the document's components.
fn validator(key: &str, schema: &Value) -> Arc<jsonschema::Validator> {
    let mut cache = VALIDATORS.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .entry(key.to_owned())
        .or_insert_with(|| {
            // The schema becomes the root of a document that also holds the components, so
            // `#/components/schemas/...` resolves as in openapi.yaml.
            let mut root = match schema {
                Value::Object(map) => Value::Object(map.clone()),
                other => json!({"allOf": [other]}),
            };
            root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
            root["components"] = SPEC["components"].clone();
            // Formats (date-time, date) are only annotations in 2020-12 unless asked for.
            Arc::new(
                jsonschema::options()
                    .should_validate_formats(true)
                    .build(&root)
                    .unwrap_or_else(|e| panic!("openapi.yaml: bad schema for {key}: {e}")),
            )
        })
        .clone()
}

fn validate(key: &str, schema: &Value, body: &str) {
    let instance: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{key}: the body is not JSON ({e}): {body:?}"));
    let validator = validator(key, schema);
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{key}: the response does not match openapi.yaml:\n  {}\nbody: {body}",
        errors.join("\n  ")
    );
}

/// Checks one answer to `method path` (query included or not).
pub fn check(method: &str, path: &str, status: u16, content_type: Option<&str>, body: &str) {
    let path = path.split('?').next().unwrap_or(path);
    let error_schema = json!({"$ref": "#/components/schemas/Error"});
    let Some(item) = SPEC["paths"].get(path) else {
        assert_eq!(
            status, 404,
            "{method} {path}: not in openapi.yaml, yet answered {status}"
        );
        validate("unknown path 404", &error_schema, body);
        return;
    };
    let Some(operation) = item.get(method.to_ascii_lowercase()) else {
        assert_eq!(
            status, 405,
            "{method} {path}: the method is not in openapi.yaml, yet answered {status}"
        );
        validate("wrong method 405", &error_schema, body);
        return;
    };
    let key = format!("{method} {path} {status}");
    let response = operation["responses"]
        .get(status.to_string())
        .or_else(|| operation["responses"].get("default"))
        .unwrap_or_else(|| panic!("{key}: status {status} is not documented in openapi.yaml"));
    let response = resolve(response);
    let Some(content) = response.get("content") else {
        return;
    };
    let media = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim().to_ascii_lowercase())
        .unwrap_or_default();
    let Some(documented) = content.get(&media) else {
        panic!("{key}: Content-Type {media:?} is not documented in openapi.yaml");
    };
    if media == "application/json" {
        let schema = documented
            .get("schema")
            .unwrap_or_else(|| panic!("{key}: no schema in openapi.yaml"));
        validate(&key, schema, body);
    }
}

/// Checks a raw HTTP/1.1 exchange: the request's first line and the answer.
pub fn check_raw(request: &[u8], status: u16, head: &str, body: &str) {
    let first_line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let Ok(first_line) = std::str::from_utf8(first_line) else {
        return;
    };
    let mut parts = first_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    // Requests that are not HTTP/1.1 with a path (the bad-input corpus sends some) are
    // answered by hyper itself, outside the API.
    if version != "HTTP/1.1" || !target.starts_with('/') || parts.next().is_some() {
        return;
    }
    let content_type = head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.eq_ignore_ascii_case("content-type").then(|| v.trim())
    });
    // hyper answers malformed heads itself (400, 431), with an empty body and no type.
    if (400..500).contains(&status) && body.is_empty() && content_type.is_none() {
        return;
    }
    check(method, target, status, content_type, body);
}
