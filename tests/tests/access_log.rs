//! Normalised logging: every access log in envoy/ and the Istio access-log
//! provider use the one schema of envoy/ACCESS_LOG.md, and two different apps
//! behind two sidecars write lines of the same shape.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use meshpatterns_tests::upstream::{Reply, Request};
use meshpatterns_tests::{access_log, filters, paths, wait_for, Client, EnvoyBuilder, Upstream};

/// An Envoy template parsed as YAML, placeholders filled with dummies
/// (ports 0, an empty endpoint list, `x` for anything else).
fn envoy_yaml(name: &str) -> serde_norway::Value {
    let text = std::fs::read_to_string(paths::envoy_config(name)).unwrap();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("}}") else { break };
        let key = rest[start + 2..start + end].trim();
        out.push_str(if key.ends_with("_PORT") {
            "0"
        } else if key.starts_with("ENDPOINTS_") {
            "[]"
        } else {
            "x"
        });
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    serde_norway::from_str(&out).unwrap_or_else(|e| panic!("envoy/{name}: {e}"))
}

#[test]
fn every_envoy_access_log_uses_the_documented_schema() {
    let schema = access_log::schema();
    let mut names: Vec<String> = std::fs::read_dir(paths::repo().join("envoy"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    let mut problems = Vec::new();
    let mut checked = 0;
    for name in &names {
        for (at, format) in access_log::access_logs(&envoy_yaml(name)) {
            checked += 1;
            let Some(format) = format else {
                problems.push(format!("envoy/{name} {at}: not a json_format access log"));
                continue;
            };
            let missing: Vec<&String> = schema.keys().filter(|k| !format.contains_key(*k)).collect();
            let extra: Vec<&String> = format.keys().filter(|k| !schema.contains_key(*k)).collect();
            let differ: Vec<String> = schema
                .iter()
                .filter_map(|(k, v)| format.get(k).filter(|got| *got != v).map(|got| format!("{k}: {got:?} (documented {v:?})")))
                .collect();
            if !missing.is_empty() || !extra.is_empty() || !differ.is_empty() {
                problems.push(format!(
                    "envoy/{name} {at}:\n    missing {missing:?}\n    not documented {extra:?}\n    other command {differ:?}"
                ));
            }
        }
    }
    eprintln!("checked {checked} access logs in {} configs", names.len());
    assert!(checked >= 2, "expected access logs in envoy/ (found {checked})");
    assert!(
        problems.is_empty(),
        "access logs that differ from envoy/ACCESS_LOG.md (copy its json_format block):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn istio_access_log_provider_uses_the_documented_schema() {
    let schema = access_log::schema();
    let docs = filters::istio_documents();
    let mut providers = 0;
    for (file, doc) in &docs {
        let mesh = &doc["data"]["mesh"];
        let mesh: serde_norway::Value = match mesh.as_str() {
            Some(text) => serde_norway::from_str(text).unwrap_or_else(|e| panic!("istio/{file}: data.mesh: {e}")),
            None => doc["spec"]["meshConfig"].clone(),
        };
        for p in mesh["extensionProviders"].as_sequence().into_iter().flatten() {
            let labels = &p["envoyFileAccessLog"]["logFormat"]["labels"];
            let Some(labels) = labels.as_mapping() else { continue };
            providers += 1;
            let got: std::collections::BTreeMap<String, String> =
                labels.iter().map(|(k, v)| (k.as_str().unwrap_or("?").to_string(), v.as_str().unwrap_or("?").to_string())).collect();
            assert_eq!(got, schema, "istio/{file}: extension provider {:?}", p["name"]);
        }
    }
    assert!(providers >= 1, "no envoyFileAccessLog provider with logFormat.labels in istio/");
}

#[test]
fn two_apps_behind_two_sidecars_log_lines_of_the_same_shape() {
    // App one: a JSON API behind the metrics-adapter sidecar.
    let api = Upstream::start("orders-api");
    let one = EnvoyBuilder::new("metrics-adapter.yaml").endpoints("APP", std::slice::from_ref(&api)).start();
    // App two: a plain-text service with a different handler, behind the
    // consistent-hash sidecar with its replicas.
    let text_app = |name: &str, r: &Request| {
        if r.path.starts_with("/gone") {
            Reply::new(404, "gone\n")
        } else {
            Reply::new(200, format!("hello from {name}\n")).header("content-type", "text/plain").header("x-replica", name)
        }
    };
    let replicas: Vec<Upstream> = (0..2).map(|i| Upstream::with_handler(&format!("greeter-{i}"), Arc::new(text_app))).collect();
    let two = EnvoyBuilder::new("consistent-hash.yaml").endpoints("REPLICAS", &replicas).start();
    two.wait_healthy("replicas", 2);

    let mut c1 = Client::new(one.port("ingress"));
    assert_eq!(c1.get("/orders/1?verbose=1", &[("user-agent", "probe/1")]).status, 200);
    assert_eq!(c1.request("POST", "/orders", &[], b"{\"item\": 7}").status, 200);
    let mut c2 = Client::new(two.port("ingress"));
    assert_eq!(c2.get("/hello", &[("x-user-id", "alice")]).status, 200);
    assert_eq!(c2.get("/gone", &[]).status, 404);

    let read = |e: &meshpatterns_tests::Envoy| {
        wait_for("2 access-log lines", Duration::from_secs(10), || {
            let l = access_log::lines(&e.stdout());
            (l.len() >= 2).then_some(l)
        })
    };
    let (l1, l2) = (read(&one), read(&two));
    let shape = |l: &serde_json::Value| l.as_object().unwrap().keys().cloned().collect::<BTreeSet<String>>();
    let want: BTreeSet<String> = access_log::schema().into_keys().collect();
    for l in l1.iter().chain(&l2) {
        access_log::check_line(l).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shape(l), want);
    }
    // Same shape, each app's own values.
    let get = &l1[0];
    assert_eq!(get["url.path"], "/orders/1");
    assert_eq!(get["user_agent.original"], "probe/1");
    assert_eq!(get["upstream.address"], api.addr());
    assert_eq!(get["upstream.cluster"], "app");
    assert!(get["meshpatterns.session.source"].is_null(), "no consistent-hash in sidecar one");
    assert!(get["http.request.header.x-request-id"].as_str().is_some_and(|id| id.len() >= 16));
    assert!(get["timestamp"].as_str().is_some_and(|t| t.len() == 24 && t.ends_with('Z')), "{}", get["timestamp"]);
    assert_eq!((l1[1]["http.request.method"].as_str(), l1[1]["http.request.body.size"].as_u64()), (Some("POST"), Some(11)));
    let hello = l2.iter().find(|l| l["url.path"] == "/hello").unwrap();
    assert_eq!(hello["meshpatterns.session.source"], "header:x-user-id");
    assert_eq!(hello["upstream.cluster"], "replicas");
    let gone = l2.iter().find(|l| l["url.path"] == "/gone").unwrap();
    assert_eq!(gone["http.response.status_code"], 404);
    assert_eq!(gone["meshpatterns.session.source"], "issued");
}
