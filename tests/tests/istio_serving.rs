//! The Istio manifests for the Envoy-native patterns (istio/tls.yaml,
//! istio/cache.yaml, istio/replicated-service.yaml) say what the tested
//! Envoy configs in envoy/ do: same TLS versions, same cache filter, same
//! outlier-detection and retry settings, same deep health endpoint. (Schema
//! validity is checked for every manifest by tests/tests/manifests.rs.)

use meshpatterns_tests::filters::istio_documents;
use meshpatterns_tests::{paths, EnvoyBuilder};
use serde_norway::Value;

fn docs(file: &str, kind: &str) -> Vec<Value> {
    let found: Vec<Value> = istio_documents().into_iter().filter(|(f, d)| f == file && d["kind"] == kind).map(|(_, d)| d).collect();
    assert!(!found.is_empty(), "no {kind} in istio/{file}");
    found
}

/// An envoy/ config rendered with dummy endpoints and fixtures, as YAML.
fn envoy_config(name: &str) -> Value {
    let template = std::fs::read_to_string(paths::envoy_config(name)).unwrap();
    let mut b = EnvoyBuilder::new(name);
    for part in template.split("{{").skip(1) {
        let key = part.split("}}").next().unwrap().trim();
        if let Some(cluster) = key.strip_prefix("ENDPOINTS_") {
            b = b.endpoint_ports(cluster, &[1]);
        } else if let Some(dir) = meshpatterns_tests::fixtures::placeholder(key) {
            b = b.var(key, dir);
        }
    }
    serde_norway::from_str(&b.render()).unwrap()
}

fn http_filter<'a>(cfg: &'a Value, name: &str) -> &'a Value {
    cfg["static_resources"]["listeners"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|l| l["filter_chains"].as_sequence().into_iter().flatten())
        .flat_map(|c| c["filters"].as_sequence().into_iter().flatten())
        .flat_map(|f| f["typed_config"]["http_filters"].as_sequence().into_iter().flatten())
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no http filter {name}"))
}

#[test]
fn edge_gateway_serves_tls_1_2_to_1_3_with_a_credential_per_host() {
    let gw = &docs("tls.yaml", "Gateway")[0];
    let servers = gw["spec"]["servers"].as_sequence().unwrap();
    let https: Vec<&Value> = servers.iter().filter(|s| s["port"]["protocol"] == "HTTPS").collect();
    assert!(https.len() >= 2, "two hostnames at least, each with its certificate");
    let mut credentials = std::collections::BTreeSet::new();
    for s in &https {
        let tls = &s["tls"];
        assert!(matches!(tls["mode"].as_str(), Some("SIMPLE" | "MUTUAL")), "{s:?}");
        assert_eq!((tls["minProtocolVersion"].as_str(), tls["maxProtocolVersion"].as_str()), (Some("TLSV1_2"), Some("TLSV1_3")));
        credentials.insert(tls["credentialName"].as_str().expect("credentialName").to_string());
    }
    assert_eq!(credentials.len(), https.len(), "one certificate per hostname");
    assert!(https.iter().any(|s| s["tls"]["mode"] == "MUTUAL"), "the mTLS variant");
    for s in servers.iter().filter(|s| s["port"]["protocol"] == "HTTP") {
        assert_eq!(s["tls"]["httpsRedirect"], Value::Bool(true), "plain HTTP only redirects");
    }
    // The Envoy sidecar config tested in tests/tests/tls.rs uses the same bounds.
    let sidecar = std::fs::read_to_string(paths::envoy_config("tls-sidecar.yaml")).unwrap();
    assert!(sidecar.contains("tls_minimum_protocol_version: TLSv1_2") && sidecar.contains("tls_maximum_protocol_version: TLSv1_3"));
}

#[test]
fn legacy_namespace_requires_mutual_tls() {
    let pa = &docs("tls.yaml", "PeerAuthentication")[0];
    assert_eq!(pa["spec"]["mtls"]["mode"], "STRICT");
    let app = &docs("tls.yaml", "Deployment")[0];
    assert_eq!(pa["metadata"]["namespace"], app["metadata"]["namespace"], "STRICT where the legacy app runs");
}

#[test]
fn envoyfilter_inserts_the_tested_cache_filter_before_the_router() {
    let ef = &docs("cache.yaml", "EnvoyFilter")[0];
    let patch = &ef["spec"]["configPatches"][0];
    assert_eq!(patch["applyTo"], "HTTP_FILTER");
    assert_eq!(patch["patch"]["operation"], "INSERT_BEFORE");
    assert_eq!(patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"], "envoy.filters.http.router");
    let tested = envoy_config("cache.yaml");
    assert_eq!(&patch["patch"]["value"], http_filter(&tested, "envoy.filters.http.cache"), "same filter and config as envoy/cache.yaml");
}

#[test]
fn destination_rule_and_retries_match_the_tested_envoy_config() {
    let dr = &docs("replicated-service.yaml", "DestinationRule")[0]["spec"]["trafficPolicy"];
    let od = &dr["outlierDetection"];
    let cfg = envoy_config("replicated.yaml");
    let cluster = &cfg["static_resources"]["clusters"][0];
    let envoy_od = &cluster["outlier_detection"];
    assert_eq!(od["consecutive5xxErrors"], envoy_od["consecutive_5xx"]);
    assert_eq!(od["baseEjectionTime"], envoy_od["base_ejection_time"]);
    assert_eq!(od["maxEjectionPercent"], envoy_od["max_ejection_percent"]);
    assert!(dr["connectionPool"]["tcp"]["maxConnections"].as_u64().is_some_and(|n| n > 0));
    assert!(dr["connectionPool"]["http"]["http1MaxPendingRequests"].as_u64().is_some_and(|n| n > 0));

    let vs = &docs("replicated-service.yaml", "VirtualService")[0]["spec"]["http"][0]["retries"];
    let retry = &cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
        [0]["routes"][0]["route"]["retry_policy"];
    assert_eq!(vs["retryOn"], retry["retry_on"]);
    assert_eq!(vs["attempts"], retry["num_retries"]);
}

#[test]
fn readiness_probes_use_the_deep_health_endpoint() {
    let deployments = docs("replicated-service.yaml", "Deployment");
    let catalog = deployments.iter().find(|d| d["metadata"]["name"] == "catalog").unwrap();
    assert_eq!(catalog["spec"]["replicas"].as_u64(), Some(3));
    let c = &catalog["spec"]["template"]["spec"]["containers"][0];
    let health = envoy_config("health.yaml");
    let deep = &health["static_resources"]["clusters"][0]["health_checks"][0]["http_health_check"]["path"];
    assert_eq!(&c["readinessProbe"]["httpGet"]["path"], deep, "Kubernetes readiness and Envoy's deep check probe the same endpoint");
    assert_ne!(c["livenessProbe"]["httpGet"]["path"], *deep, "liveness stays shallow");
    for d in
        docs("replicated-service.yaml", "Deployment").iter().chain(&docs("cache.yaml", "Deployment")).chain(&docs("tls.yaml", "Deployment"))
    {
        for c in d["spec"]["template"]["spec"]["containers"].as_sequence().unwrap() {
            assert!(c.get("readinessProbe").is_some(), "{} has no readiness probe", d["metadata"]["name"].as_str().unwrap_or("?"));
        }
    }
}
