//! The filters this repository ships, discovered rather than listed: the
//! `FILTERS :=` line of the Makefile names them, `make build` writes
//! `target/meshpatterns/<name_with_underscores>.wasm`, and istio/*.yaml holds
//! the WasmPlugins that load them. Tests and the `validate` command iterate
//! over these, so a new filter is picked up as soon as it is in `FILTERS`.
//!
//! The one place a new filter must be registered by hand is the `registry!`
//! list below (one line), because parsing a config needs the filter crate's
//! own types.

use crate::paths;
use meshpatterns_core::error::ConfigError;
use std::path::PathBuf;

/// The filters, as the Makefile's `FILTERS` finds them: the folders of
/// filters/ with a config.schema.json (`consistent-hash`, ..., `meshpatterns`).
pub fn names() -> Vec<String> {
    let dir = paths::repo().join("filters");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.schema.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// `rate-limiter` -> `rate_limiter.wasm`.
pub fn module_file(name: &str) -> String {
    format!("{}.wasm", name.replace('-', "_"))
}

/// The optimised module `make build` writes (what `make image` packages).
pub fn built_module(name: &str) -> PathBuf {
    paths::repo().join("target/meshpatterns").join(module_file(name))
}

/// Filter name from a WasmPlugin URL: `oci://.../consistent-hash:0.1.0`,
/// `https://.../consistent_hash.wasm` or `file:///.../consistent_hash.wasm`
/// -> `consistent-hash`.
pub fn filter_of_url(url: &str) -> String {
    let last = url.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    last.split([':', '@']).next().unwrap_or("").trim_end_matches(".wasm").replace('_', "-")
}

/// Every YAML file in istio/, sorted.
pub fn istio_files() -> Vec<PathBuf> {
    let dir = paths::repo().join("istio");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// The non-empty YAML documents of one file.
pub fn yaml_documents(text: &str) -> Result<Vec<serde_norway::Value>, String> {
    let mut docs = Vec::new();
    for d in serde_norway::Deserializer::from_str(text) {
        let v: serde_norway::Value = serde::Deserialize::deserialize(d).map_err(|e| e.to_string())?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Every document of every file in istio/, with the file name.
pub fn istio_documents() -> Vec<(String, serde_norway::Value)> {
    let mut out = Vec::new();
    for f in istio_files() {
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for d in yaml_documents(&text).unwrap_or_else(|e| panic!("istio/{name}: {e}")) {
            out.push((name.clone(), d));
        }
    }
    out
}

/// The filters whose config code the tests crate links, each as
/// `"name" => crate_ident`. Every filter crate follows the same shape:
/// `logic::Config` (serde, deny_unknown_fields, camelCase; with
/// `#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]`) validated by
/// `logic::Settings::try_from_config`. Registering a filter is one line here,
/// plus its path dependency with `features = ["schema"]` in tests/Cargo.toml.
/// Parse a plugin config (JSON bytes, as Envoy hands it to `on_configure`)
/// with the parser of the module it is for, exactly as the module does
/// (the registry is the pipeline's `stages!` list). `None`: no such filter.
pub fn parse_config(filter: &str, json: &[u8]) -> Option<Result<(), ConfigError>> {
    meshpatterns::parse_module(filter, json)
}

/// The `match` block's schema, stored as `$defs/match` (its `not` refers
/// to itself) with its own definitions beside it.
fn match_schema(defs: &mut serde_json::Map<String, serde_json::Value>) {
    let mut m = serde_json::to_value(schemars::schema_for!(meshpatterns_core::scope::MatchConfig)).unwrap_or_default();
    hoist_defs(&mut m, "match", defs);
    root_ref_to(&mut m, "#/$defs/match");
    if let Some(o) = m.as_object_mut() {
        o.remove("$schema");
        o.remove("title");
    }
    defs.insert("match".into(), m);
}

/// `{"$ref": "#"}` (the schema itself) -> `{"$ref": target}`.
fn root_ref_to(v: &mut serde_json::Value, target: &str) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("$ref").and_then(|r| r.as_str()) == Some("#") {
                m.insert("$ref".into(), target.into());
            }
            m.values_mut().for_each(|c| root_ref_to(c, target));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|c| root_ref_to(c, target)),
        _ => {}
    }
}

/// The schema of the stage-level keys every filter accepts (`match`, `filterState`).
fn scope_properties() -> serde_json::Value {
    serde_json::json!({
        "match": {"$ref": "#/$defs/match", "description": "Which requests this filter acts on; others pass through untouched (counted in meshpatterns.<filter>.skipped)."},
        "filterState": {"type": "boolean", "default": true, "description": "Record the decisions as filter state for access logs (one hostcall per value; false skips it)."}
    })
}

/// Move a schema's `$defs` into `defs`, renaming them `<prefix>.<name>` and
/// rewriting its `$ref`s to match.
fn hoist_defs(v: &mut serde_json::Value, prefix: &str, defs: &mut serde_json::Map<String, serde_json::Value>) {
    if let Some(serde_json::Value::Object(own)) = v.as_object_mut().and_then(|m| m.remove("$defs")) {
        for (k, mut d) in own {
            rewrite_refs(&mut d, prefix);
            defs.insert(format!("{prefix}.{k}"), d);
        }
    }
    rewrite_refs(v, prefix);
}

fn rewrite_refs(v: &mut serde_json::Value, prefix: &str) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::String(r)) = m.get_mut("$ref") {
                if let Some(name) = r.strip_prefix("#/$defs/") {
                    *r = format!("#/$defs/{prefix}.{name}");
                }
            }
            for c in m.values_mut() {
                rewrite_refs(c, prefix);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|c| rewrite_refs(c, prefix)),
        _ => {}
    }
}

/// A pattern's config schema with `match` and `filterState` added.
fn pattern_schema_with_scope(filter: &str) -> Option<serde_json::Value> {
    let mut v = serde_json::to_value(meshpatterns::pattern_schema(filter)?).ok()?;
    let mut defs = serde_json::Map::new();
    let scope = scope_properties();
    match_schema(&mut defs);
    if let Some(m) = v.as_object_mut() {
        if let Some(serde_json::Value::Object(own)) = m.remove("$defs") {
            defs.extend(own);
        }
        if let Some(serde_json::Value::Object(props)) = m.get_mut("properties") {
            if let serde_json::Value::Object(extra) = scope {
                props.extend(extra);
            }
        }
        if !defs.is_empty() {
            m.insert("$defs".into(), defs.into());
        }
    }
    Some(v)
}

fn generated_schema(filter: &str) -> Option<serde_json::Value> {
    if filter != "meshpatterns" {
        return pattern_schema_with_scope(filter);
    }
    // The pipeline: each stage is one pattern's config under its stage key.
    let mut defs = serde_json::Map::new();
    let mut variants = Vec::new();
    for (name, key) in meshpatterns::PATTERNS {
        let mut s = pattern_schema_with_scope(name)?;
        hoist_defs(&mut s, key, &mut defs);
        if let Some(m) = s.as_object_mut() {
            m.remove("$schema");
            m.remove("title");
        }
        defs.insert((*key).to_string(), s);
        variants.push(serde_json::json!({
            "type": "object",
            "properties": {(*key): {"$ref": format!("#/$defs/{key}")}},
            "required": [key],
            "additionalProperties": false
        }));
    }
    Some(serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": "The meshpatterns pipeline: ordered stages, each one pattern with exactly that filter's config.",
        "type": "object",
        "properties": {"stages": {"type": "array", "minItems": 1, "maxItems": meshpatterns::MAX_STAGES, "items": {"oneOf": variants}}},
        "required": ["stages"],
        "additionalProperties": false,
        "$defs": defs
    }))
}

/// The JSON Schema of a filter's pluginConfig, generated from its serde
/// config type (`schemars`, behind the filter crate's `schema` feature, so the
/// wasm module never carries it). `None`: the filter is not registered.
pub fn config_schema(filter: &str) -> Option<serde_json::Value> {
    let mut v = generated_schema(filter)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("title".into(), format!("{filter} pluginConfig").into());
        m.insert("$comment".into(), "Generated from the filter's Rust config type by `make schemas`; do not edit.".into());
    }
    Some(v)
}

/// Where a filter's committed schema lives: `filters/<name>/config.schema.json`.
pub fn schema_path(filter: &str) -> PathBuf {
    paths::repo().join("filters").join(filter).join("config.schema.json")
}

/// The schema file's text: pretty JSON with a final newline.
pub fn schema_text(filter: &str) -> Option<String> {
    config_schema(filter).and_then(|v| serde_json::to_string_pretty(&v).ok()).map(|s| s + "\n")
}

/// One checked plugin config: where it is and what its filter's parser said.
#[derive(Debug, Clone)]
pub struct Finding {
    /// `WasmPlugin consistent-hash (document 1)` or the YAML path of an Envoy wasm filter.
    pub at: String,
    pub filter: String,
    pub result: Result<(), String>,
}

/// Check every Istio WasmPlugin and every Envoy Wasm filter/service config in
/// a YAML or JSON file (several documents allowed) with the filters' own
/// parsers. Envoy templates of this repository may contain `{{PLACEHOLDER}}`s.
pub fn check_file_text(text: &str) -> Result<Vec<Finding>, String> {
    let text = replace_placeholders(text);
    let docs = yaml_documents(&text).map_err(|e| format!("not YAML/JSON: {e}"))?;
    let json: Vec<serde_json::Value> =
        docs.iter().map(|d| serde_json::to_value(d).map_err(|e| format!("cannot convert YAML to JSON: {e}"))).collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (i, doc) in json.iter().enumerate() {
        if doc["kind"] == "WasmPlugin" {
            let name = doc["metadata"]["name"].as_str().unwrap_or("?");
            let at = format!("WasmPlugin {name} (document {})", i + 1);
            let url = doc["spec"]["url"].as_str().unwrap_or("");
            let filter = filter_of_url(url);
            // Istio hands pluginConfig to the module as its JSON text; absent means empty.
            let config = match doc["spec"].get("pluginConfig") {
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(v) => serde_json::to_vec(v).unwrap_or_default(),
            };
            let mut f = finding(format!("{at} spec.pluginConfig"), filter, &config);
            // serde's position points into the JSON we made from the YAML, not into the file.
            f.result = f.result.map_err(|e| strip_position(&e));
            out.push(f);
        } else {
            walk_envoy(doc, &format!("document {}", i + 1), &mut out);
        }
    }
    Ok(out)
}

const WASM_TYPES: [&str; 2] =
    ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "type.googleapis.com/envoy.extensions.wasm.v3.WasmService"];

fn walk_envoy(v: &serde_json::Value, path: &str, out: &mut Vec<Finding>) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("@type").and_then(|t| t.as_str()).is_some_and(|t| WASM_TYPES.contains(&t)) {
                let plugin = &m["config"];
                let file = plugin["vm_config"]["code"]["local"]["filename"].as_str().unwrap_or("");
                let root = plugin["root_id"].as_str().unwrap_or("");
                let base = file.rsplit('/').next().unwrap_or("");
                let filter = if base.ends_with(".wasm") { filter_of_url(base) } else { root.replace('_', "-") };
                let config = &plugin["configuration"];
                let bytes = match config.get("value") {
                    Some(serde_json::Value::String(s)) => s.as_bytes().to_vec(),
                    Some(other) => serde_json::to_vec(other).unwrap_or_default(),
                    None => Vec::new(),
                };
                if !config.is_null() && config["@type"] != "type.googleapis.com/google.protobuf.StringValue" {
                    out.push(Finding {
                        at: format!("{path}.config.configuration"),
                        filter,
                        result: Err(format!(
                            "\"@type\" is {}; the filters read their JSON config from a type.googleapis.com/google.protobuf.StringValue",
                            config["@type"]
                        )),
                    });
                    return;
                }
                out.push(finding(format!("{path}.config.configuration.value"), filter, &bytes));
                return;
            }
            for (k, child) in m {
                walk_envoy(child, &format!("{path}.{k}"), out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                walk_envoy(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn finding(at: String, filter: String, json: &[u8]) -> Finding {
    let result = match parse_config(&filter, json) {
        Some(r) => r.map_err(|e| e.to_string()),
        None if filter == "noop" => Ok(()),
        None => Err(format!("no config parser registered for filter {filter:?} (known: {})", registered().join(", "))),
    };
    Finding { at, filter, result }
}

/// Filters in `FILTERS` whose config parser is registered.
pub fn registered() -> Vec<String> {
    names().into_iter().filter(|f| parse_config(f, b"").is_some()).collect()
}

/// `... at line 1 column 12` -> `...`.
fn strip_position(e: &str) -> String {
    match e.rfind(" at line ") {
        Some(i) if e[i + 9..].split(" column ").all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) => e[..i].to_string(),
        _ => e.to_string(),
    }
}

/// `{{NAME}}` -> `0`, so the templates in envoy/ parse as YAML.
fn replace_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else { break };
        let name = &rest[start + 2..start + len];
        if name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') && !name.is_empty() {
            out.push_str(&rest[..start]);
            out.push('0');
        } else {
            out.push_str(&rest[..start + len + 2]);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}
