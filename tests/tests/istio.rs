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

/// Parse a pluginConfig with the config code of the filter it is for,
/// exactly as the module's `on_configure` does (`match` and `filterState`
/// included), and return what the pairing checks need.
fn parse_plugin(filter: &str, json: &[u8]) -> Result<String, String> {
    use meshpatterns_host::stage::parse_single;
    let e = |e: meshpatterns_core::ConfigError| e.to_string();
    match filter {
        "consistent-hash" => parse_single::<consistent_hash::ConsistentHash>(json)
            .map(|p| p.stages.iter().map(|s| s.stage.settings.hash_header.clone()).collect::<Vec<_>>().join(","))
            .map_err(e),
        "experiment-splitter" => parse_single::<experiment_splitter::ExperimentSplitter>(json)
            .map(|p| {
                p.stages
                    .iter()
                    .flat_map(|s| s.stage.settings.experiments.iter().map(|e| e.routing_header.clone()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .map_err(e),
        "metrics-adapter" => parse_single::<metrics_adapter::MetricsAdapter>(json)
            .map(|p| p.stages.iter().flat_map(|s| s.stage.settings.labels().into_iter().map(|l| l.name)).collect::<Vec<_>>().join(","))
            .map_err(e),
        "shard-router" => parse_single::<shard_router::ShardRouter>(json)
            .map(|p| p.stages.iter().map(|s| s.stage.settings.shard_header.clone()).collect::<Vec<_>>().join(","))
            .map_err(e),
        "rate-limiter" => parse_single::<rate_limiter::RateLimiter>(json)
            .map(|p| p.stages.iter().flat_map(|s| s.stage.settings.policies.iter().map(|p| p.name.clone())).collect::<Vec<_>>().join(","))
            .map_err(e),
        "meshpatterns" => meshpatterns::parse(json).map(|p| format!("{} stages", p.stages.len())).map_err(e),
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

#[test]
fn virtual_service_routes_every_shard_the_shard_router_writes() {
    let docs: Vec<(String, Value)> = documents().into_iter().filter(|(f, _)| f == "shard-router.yaml").collect();
    let (_, plugin) = docs.iter().find(|(_, d)| d["kind"] == "WasmPlugin").unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&plugin_json(plugin)).unwrap();
    if let Some(m) = v.as_object_mut() {
        m.remove("match");
        m.remove("filterState");
    }
    let c: shard_router::logic::Config = serde_json::from_value(v).unwrap();
    let s = shard_router::logic::Settings::try_from_config(c).unwrap();
    let routes: Vec<&Value> =
        docs.iter().filter(|(_, d)| d["kind"] == "VirtualService").flat_map(|(_, d)| d["spec"]["http"].as_sequence().unwrap()).collect();
    let rule_hosts: Vec<&str> =
        docs.iter().filter(|(_, d)| d["kind"] == "DestinationRule").filter_map(|(_, d)| d["spec"]["host"].as_str()).collect();
    for shard in &s.current.shards {
        // The route whose header match is exactly this shard's value...
        let route = routes
            .iter()
            .find(|r| {
                r["match"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|m| m["headers"][s.shard_header.as_str()]["exact"].as_str() == Some(shard.cluster.as_str()))
            })
            .unwrap_or_else(|| panic!("no VirtualService route matches {}: {}", s.shard_header, shard.cluster));
        // ...sends it to one Service, which has a DestinationRule, and which is
        // the one the resharding fallback calls (outbound|<port>||<host>).
        let dest = &route["route"][0]["destination"];
        let host = dest["host"].as_str().unwrap();
        assert!(rule_hosts.contains(&host), "no DestinationRule for {host}");
        let port = dest["port"]["number"].as_u64().unwrap();
        assert_eq!(shard.dispatch_cluster, format!("outbound|{port}||{host}"), "shard {}", shard.name);
    }
}
