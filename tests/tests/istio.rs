//! The Istio manifests in istio/: every WasmPlugin's pluginConfig is accepted
//! by the filter's own config parser, and the networking resources that pair
//! with a filter read the header the filter writes.

use meshpatterns_tests::paths;
use serde_norway::Value;

/// Every YAML document in istio/*.yaml, with its file name.
fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(paths::repo().join("istio")).unwrap().filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(f).unwrap();
        for d in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    docs
}

fn plugin_json(doc: &Value) -> Vec<u8> {
    let cfg = &doc["spec"]["pluginConfig"];
    serde_json::to_vec(&serde_json::to_value(cfg).unwrap()).unwrap()
}

/// Parse a pluginConfig with the config code of the filter it is for.
fn parse_plugin(filter: &str, json: &[u8]) -> Result<String, String> {
    use meshpatterns_core::error::parse_json;
    match filter {
        "consistent-hash" => parse_json::<consistent_hash::logic::Config>(json)
            .and_then(consistent_hash::logic::Settings::try_from_config)
            .map(|s| s.hash_header)
            .map_err(|e| e.to_string()),
        other => Err(format!("no parser registered for filter {other:?}")),
    }
}

/// Filter name from the module URL: `oci://.../consistent-hash:0.1.0` -> consistent-hash.
fn filter_of(doc: &Value) -> String {
    let url = doc["spec"]["url"].as_str().unwrap_or("");
    let last = url.rsplit('/').next().unwrap_or("");
    last.split([':', '@']).next().unwrap_or("").trim_end_matches(".wasm").replace('_', "-")
}

#[test]
fn every_wasmplugin_config_parses_with_the_filters_own_code() {
    let plugins: Vec<_> = documents().into_iter().filter(|(_, d)| d["kind"] == "WasmPlugin").collect();
    assert!(!plugins.is_empty(), "no WasmPlugin in istio/");
    for (file, doc) in &plugins {
        let filter = filter_of(doc);
        if let Err(e) = parse_plugin(&filter, &plugin_json(doc)) {
            panic!("istio/{file}: WasmPlugin {} ({filter}): {e}", doc["metadata"]["name"].as_str().unwrap_or("?"));
        }
    }
}

#[test]
fn a_misspelt_plugin_field_is_caught() {
    let (_, doc) = documents().into_iter().find(|(_, d)| d["kind"] == "WasmPlugin" && filter_of(d) == "consistent-hash").unwrap();
    let json = String::from_utf8(plugin_json(&doc)).unwrap().replace("hashHeader", "hashHeder");
    let err = parse_plugin("consistent-hash", json.as_bytes()).unwrap_err();
    assert!(err.contains("unknown field `hashHeder`"), "{err}");
}

#[test]
fn destination_rule_hashes_the_header_the_filter_writes() {
    let docs = documents();
    let (_, plugin) = docs.iter().find(|(_, d)| d["kind"] == "WasmPlugin" && filter_of(d) == "consistent-hash").unwrap();
    let header = parse_plugin("consistent-hash", &plugin_json(plugin)).unwrap();
    let rules: Vec<&Value> = docs
        .iter()
        .filter(|(f, d)| f == "consistent-hash.yaml" && d["kind"] == "DestinationRule")
        .map(|(_, d)| &d["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"])
        .collect();
    assert!(!rules.is_empty());
    for r in rules {
        assert_eq!(r["httpHeaderName"].as_str(), Some(header.as_str()));
    }
}
