//! Every WasmPlugin in istio/ on a shared gateway: Istio inserts a plugin into
//! every HTTP connection manager of the proxies it selects, so a gateway
//! plugin sees every host the gateway serves. Each shipped pluginConfig
//! (taken from istio/*.yaml exactly as Istio hands it to the module) is put in
//! front of one listener serving several hosts; requests to other hosts must
//! reach the upstream unchanged (no local reply, no added request header, no
//! cookie or rate-limit header), counted only in the filter's `skipped`
//! counter, and requests to the plugin's own host must get the pattern.

use meshpatterns_tests::filters::{filter_of_url, istio_documents, module_file};
use meshpatterns_tests::{wait_for, Client, EnvoyBuilder, Upstream};
use std::time::Duration;

const TEMPLATE: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: {{ADMIN_PORT}}}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: {{LISTENER_PORT}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: local
            virtual_hosts:
            - name: every-host
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: app}
          http_filters:
          - name: plugin
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                root_id: plugin
                vm_config:
                  vm_id: plugin
                  runtime: envoy.wasm.runtime.v8
                  code: {local: {filename: "{{WASM_DIR}}/{{MODULE}}"}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{{CONFIG}}'
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: app
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints: {{ENDPOINTS_APP}}
"#;

/// Headers Envoy itself adds to a proxied request.
const ENVOY_ADDS: [&str; 4] = ["x-request-id", "x-forwarded-proto", "x-envoy-expected-rq-timeout-ms", "content-length"];

/// The hosts a pluginConfig scopes itself to: its own `match.hosts`, or those
/// of its stages (the pipeline).
fn scoped_hosts(config: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> =
        config["match"]["hosts"].as_array().into_iter().flatten().filter_map(|h| h.as_str().map(str::to_string)).collect();
    for stage in config["stages"].as_array().into_iter().flatten() {
        for (_, c) in stage.as_object().into_iter().flatten() {
            out.extend(c["match"]["hosts"].as_array().into_iter().flatten().filter_map(|h| h.as_str().map(str::to_string)));
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn gateway_plugins_touch_only_their_own_host() {
    let mut checked = 0;
    for (file, doc) in istio_documents() {
        if doc["kind"].as_str() != Some("WasmPlugin") {
            continue;
        }
        let spec = serde_json::to_value(&doc["spec"]).unwrap();
        let gateway = spec["selector"]["matchLabels"]["istio"].as_str().is_some_and(|l| l.contains("gateway"));
        let filter = filter_of_url(spec["url"].as_str().unwrap_or(""));
        let config = spec["pluginConfig"].clone();
        let hosts = scoped_hosts(&config);
        if !gateway {
            continue;
        }
        assert!(!hosts.is_empty(), "istio/{file}: the {filter} plugin runs on a shared gateway but its pluginConfig has no match.hosts");
        let own = hosts[0].replace("*.", "www.");
        let up = Upstream::start("app");
        let envoy = EnvoyBuilder::from_template(&format!("istio-scoped-{filter}"), TEMPLATE)
            .var("MODULE", module_file(&filter))
            .var("CONFIG", config.to_string().replace('\'', "''"))
            .endpoints("APP", std::slice::from_ref(&up))
            .start();
        let mut c = Client::new(envoy.port("ingress"));
        let sent = [("x-user-id", "u-1"), ("x-api-key", "k-1")];
        for other in ["other.example.net", "unrelated.example.org"] {
            c.host = other.to_string();
            for i in 0..5 {
                let path = format!("/checkout/cart/{i}");
                let r = c.get(&path, &sent);
                assert_eq!(
                    r.status, 200,
                    "istio/{file} {filter}: {other}{path} got {} (the plugin answered for a host it does not serve)",
                    r.status
                );
                assert!(r.header("set-cookie").is_none(), "istio/{file} {filter}: cookie issued on {other}");
                assert!(
                    r.header("x-ratelimit-limit").is_none() && r.header("ratelimit").is_none(),
                    "istio/{file} {filter}: rate-limit headers on {other}"
                );
                let seen = r.json();
                let got: Vec<String> = seen["headers"].as_object().unwrap().keys().cloned().collect();
                for h in &got {
                    let expected = ["host", "user-agent", "accept"].contains(&h.as_str())
                        || ENVOY_ADDS.contains(&h.as_str())
                        || sent.iter().any(|(k, _)| k == h)
                        || h.starts_with(':');
                    assert!(expected, "istio/{file} {filter}: request to {other} reached the upstream with {h} added: {seen}");
                }
            }
        }
        // The plugin's own host gets the pattern: it is not skipped.
        let skipped = format!(
            "meshpatterns.{}.skipped",
            if filter == "meshpatterns" { "consistent_hash".to_string() } else { filter.replace('-', "_") }
        );
        wait_for(&format!("{filter}: 10 skipped requests counted"), Duration::from_secs(10), || {
            (envoy.stats().iter().any(|(k, v)| k.ends_with(&skipped) && *v == 10)).then_some(())
        });
        c.host = own.clone();
        for i in 0..3 {
            let _ = c.get(&format!("/checkout/cart/{i}"), &sent);
        }
        std::thread::sleep(Duration::from_millis(1200));
        let s = envoy.stats().into_iter().find(|(k, _)| k.ends_with(&skipped)).map(|(_, v)| v).unwrap_or(0);
        assert_eq!(s, 10, "istio/{file} {filter}: requests to its own host {own} were skipped");
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} gateway WasmPlugins checked");
}
