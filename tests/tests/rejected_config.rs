//! "A rejected config update keeps the old config serving", for every filter
//! and the pipeline module, from one table, through a real Envoy with the
//! real modules.
//!
//! Each row takes the module's shipped Envoy config (`envoy/<module>.yaml`)
//! and moves its wasm filter's config into an ECDS resource file in a watched
//! directory ([`meshpatterns_tests::xds::dynamic_filter`]). Under continuous
//! load on one keep-alive connection:
//!
//! 1. v1 (valid) serves, with an effect of that filter a response shows;
//! 2. v2 holds a value of the wrong type (a string where a number belongs).
//!    The module's `on_configure` refuses it, so Envoy rejects the ECDS
//!    update: `update_rejected` and `config_fail` go up by one,
//!    `update_success` does not, the log carries the module's error naming
//!    the field's path (`policies[0].rate`) and Envoy's "config update
//!    rejected" line, and every request answered after the update was
//!    written still shows v1's effect;
//! 3. v3 (valid, another effect) then applies.
//!
//! Not one request of the load fails (anything but a 200 counts), and the
//! same Envoy process serves throughout.

use std::sync::Arc;
use std::time::Duration;

use meshpatterns_tests::load::Load;
use meshpatterns_tests::upstream::{echo, Reply, Request};
use meshpatterns_tests::xds::dynamic_filter;
use meshpatterns_tests::{filters, wait_for, EnvoyBuilder, Response, Upstream};

struct Row {
    /// The folder in filters/ (`meshpatterns`: the pipeline module).
    module: &'static str,
    /// The shipped Envoy config that loads it.
    template: &'static str,
    /// `{{ENDPOINTS_<X>}}` placeholders; the cluster is `x` lowercased, its
    /// upstreams `x-0` and `x-1`.
    clusters: &'static [&'static str],
    /// The upstreams' answer to everything but health checks.
    handler: fn(&str, &Request) -> Reply,
    /// What the load sends.
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// What a response shows of the config in force.
    effect: fn(&Response) -> String,
    v1: &'static str,
    v1_effect: &'static str,
    /// Invalid: one field holds a value of the wrong type.
    v2: &'static str,
    /// The path of that field, as the module's error names it.
    v2_field: &'static str,
    v3: &'static str,
    v3_effect: &'static str,
}

const USER: &[(&str, &str)] = &[("x-user-id", "alice"), ("x-tenant", "acme"), ("x-api-key", "key-1")];

const ROWS: [Row; 6] = [
    Row {
        module: "consistent-hash",
        template: "consistent-hash.yaml",
        clusters: &["REPLICAS"],
        handler: echo,
        path: "/",
        headers: USER,
        effect: seen_session_hash,
        v1: r#"{"keySources": [{"header": "x-user-id"}], "hashHeader": "x-session-hash", "headerValue": "key"}"#,
        v1_effect: "alice",
        v2: r#"{"keySources": [{"header": "x-user-id"}], "hashHeader": "x-session-hash", "headerValue": "key",
               "sessionCookie": {"name": "mp_session", "ttlSeconds": "one day"}}"#,
        v2_field: "sessionCookie.ttlSeconds",
        v3: r#"{"keySources": [{"header": "x-tenant"}], "hashHeader": "x-session-hash", "headerValue": "key"}"#,
        v3_effect: "acme",
    },
    Row {
        module: "experiment-splitter",
        template: "experiment-splitter.yaml",
        clusters: &["CONTROL", "TREATMENT"],
        handler: echo,
        path: "/checkout",
        headers: USER,
        effect: upstream_cluster,
        v1: r#"{"keySources": [{"header": "x-user-id"}], "experiments": [{"name": "checkout-v2", "salt": "s1",
               "routingHeader": "x-experiment-arm", "match": {"pathPrefixes": ["/checkout"]},
               "arms": [{"name": "control", "percent": 100, "target": "control"}, {"name": "treatment", "percent": 0, "target": "treatment"}]}]}"#,
        v1_effect: "control",
        v2: r#"{"keySources": [{"header": "x-user-id"}], "experiments": [{"name": "checkout-v2", "salt": "s1",
               "routingHeader": "x-experiment-arm", "match": {"pathPrefixes": ["/checkout"]},
               "arms": [{"name": "control", "percent": "0", "target": "control"}, {"name": "treatment", "percent": 100, "target": "treatment"}]}]}"#,
        v2_field: "experiments[0].arms[0].percent",
        v3: r#"{"keySources": [{"header": "x-user-id"}], "experiments": [{"name": "checkout-v2", "salt": "s1",
               "routingHeader": "x-experiment-arm", "match": {"pathPrefixes": ["/checkout"]},
               "arms": [{"name": "control", "percent": 0, "target": "control"}, {"name": "treatment", "percent": 100, "target": "treatment"}]}]}"#,
        v3_effect: "treatment",
    },
    Row {
        module: "rate-limiter",
        template: "rate-limiter.yaml",
        clusters: &["APP"],
        handler: echo,
        path: "/api/orders",
        headers: USER,
        effect: rate_limit_header,
        v1: r#"{"policies": [{"name": "api-key", "key": [{"header": "x-api-key"}], "rate": 100000, "per": "second", "burst": 100000}]}"#,
        v1_effect: "100000",
        v2: r#"{"policies": [{"name": "api-key", "key": [{"header": "x-api-key"}], "rate": "fast", "per": "second", "burst": 200000}]}"#,
        v2_field: "policies[0].rate",
        v3: r#"{"policies": [{"name": "api-key", "key": [{"header": "x-api-key"}], "rate": 100000, "per": "second", "burst": 200000}]}"#,
        v3_effect: "200000",
    },
    Row {
        module: "shard-router",
        template: "shard-router.yaml",
        clusters: &["SHARD_A", "SHARD_B", "SHARD_C"],
        handler: echo,
        path: "/kv/user-1",
        headers: USER,
        effect: upstream_cluster,
        v1: r#"{"keySources": [{"pathRegex": {"pattern": "^/kv/([^/]+)", "group": 1}}], "shardHeader": "x-shard-cluster",
               "shardMap": {"version": "v1", "shards": [{"name": "shard-a", "cluster": "shard_a"}]}}"#,
        v1_effect: "shard_a",
        v2: r#"{"keySources": [{"pathRegex": {"pattern": "^/kv/([^/]+)", "group": 1}}], "shardHeader": "x-shard-cluster",
               "shardMap": {"version": "v2", "shards": [{"name": "shard-b", "cluster": "shard_b", "weight": "heavy"}]}}"#,
        v2_field: "shardMap.shards[0].weight",
        v3: r#"{"keySources": [{"pathRegex": {"pattern": "^/kv/([^/]+)", "group": 1}}], "shardHeader": "x-shard-cluster",
               "shardMap": {"version": "v3", "shards": [{"name": "shard-b", "cluster": "shard_b"}]}}"#,
        v3_effect: "shard_b",
    },
    Row {
        module: "metrics-adapter",
        template: "metrics-adapter.yaml",
        clusters: &["APP"],
        handler: app_with_stats,
        path: "/metrics",
        headers: USER,
        effect: exposed_requests_metric,
        v1: r#"{"legacyStats": [{"path": "/metrics", "upstreamPath": "/stats", "format": "json", "prefix": "app_",
               "metrics": [{"key": "requests", "type": "counter"}]}]}"#,
        v1_effect: "app_requests_total",
        v2: r#"{"legacyStats": [{"path": "/metrics", "upstreamPath": "/stats", "format": "json", "prefix": "orders_",
               "metrics": [{"key": "requests", "type": "counter"}], "maxBodyBytes": "1 MiB"}]}"#,
        v2_field: "legacyStats[0].maxBodyBytes",
        v3: r#"{"legacyStats": [{"path": "/metrics", "upstreamPath": "/stats", "format": "json", "prefix": "orders_",
               "metrics": [{"key": "requests", "type": "counter"}]}]}"#,
        v3_effect: "orders_requests_total",
    },
    Row {
        module: "meshpatterns",
        template: "meshpatterns.yaml",
        clusters: &["CONTROL", "TREATMENT"],
        handler: echo,
        path: "/checkout",
        headers: USER,
        effect: upstream_cluster,
        v1: r#"{"stages": [
               {"rateLimit": {"policies": [{"name": "per-user", "key": [{"header": "x-user-id"}], "rate": 100000, "per": "second", "burst": 100000}]}},
               {"experimentSplit": {"keySources": [{"header": "x-user-id"}], "experiments": [{"name": "checkout-v2", "salt": "s1",
                 "routingHeader": "x-experiment-arm", "match": {"pathPrefixes": ["/checkout"]},
                 "arms": [{"name": "control", "percent": 100, "target": "control"}, {"name": "treatment", "percent": 0, "target": "treatment"}]}]}},
               {"metrics": {"labelBy": ["route", "cluster"]}}]}"#,
        v1_effect: "control",
        v2: r#"{"stages": [
               {"rateLimit": {"policies": [{"name": "per-user", "key": [{"header": "x-user-id"}], "rate": "fast", "per": "second", "burst": 100000}]}},
               {"experimentSplit": {"keySources": [{"header": "x-user-id"}], "experiments": [{"name": "checkout-v2", "salt": "s1",
                 "routingHeader": "x-experiment-arm", "match": {"pathPrefixes": ["/checkout"]},
                 "arms": [{"name": "control", "percent": 0, "target": "control"}, {"name": "treatment", "percent": 100, "target": "treatment"}]}]}},
               {"metrics": {"labelBy": ["route", "cluster"]}}]}"#,
        v2_field: "stages[0].rateLimit.policies[0].rate",
        v3: r#"{"stages": [
               {"rateLimit": {"policies": [{"name": "per-user", "key": [{"header": "x-user-id"}], "rate": 100000, "per": "second", "burst": 100000}]}},
               {"experimentSplit": {"keySources": [{"header": "x-user-id"}], "experiments": [{"name": "checkout-v2", "salt": "s1",
                 "routingHeader": "x-experiment-arm", "match": {"pathPrefixes": ["/checkout"]},
                 "arms": [{"name": "control", "percent": 0, "target": "control"}, {"name": "treatment", "percent": 100, "target": "treatment"}]}]}},
               {"metrics": {"labelBy": ["route", "cluster"]}}]}"#,
        v3_effect: "treatment",
    },
];

/// The x-session-hash the replica saw.
fn seen_session_hash(r: &Response) -> String {
    r.json()["headers"]["x-session-hash"].as_str().unwrap_or("<none>").to_string()
}

/// The cluster (arm, shard) that answered: the replica's name without `-<n>`.
fn upstream_cluster(r: &Response) -> String {
    let name = r.replica();
    name.rsplit_once('-').map(|(c, _)| c).unwrap_or(name).to_string()
}

/// The bucket capacity the rate limiter reports.
fn rate_limit_header(r: &Response) -> String {
    r.header("x-ratelimit-limit").unwrap_or("<none>").to_string()
}

/// The name under which the adapter exposed the app's `requests` (7).
fn exposed_requests_metric(r: &Response) -> String {
    let text = r.text();
    let names: Vec<&str> =
        text.lines().filter(|l| !l.starts_with('#') && l.ends_with(" 7")).filter_map(|l| l.split([' ', '{']).next()).collect();
    names.join(",")
}

/// An app serving its legacy stats on /stats, and the echo elsewhere.
fn app_with_stats(name: &str, r: &Request) -> Reply {
    match r.path.as_str() {
        "/stats" => Reply::new(200, r#"{"requests": 7}"#).header("content-type", "application/json"),
        _ => echo(name, r),
    }
}

/// What one row measured.
struct Measured {
    requests: u64,
    failures: usize,
    /// Requests answered from writing v2 until v3 was written, all with v1's effect.
    while_rejected: u64,
    update_success: u64,
    update_rejected: u64,
    config_fail: u64,
}

/// Run one row; panics (with Envoy's log) when a step does not hold.
fn check(row: &Row) -> Measured {
    let m = row.module;
    let mut ups: Vec<Vec<Upstream>> = Vec::new();
    let mut b = EnvoyBuilder::new(row.template);
    for c in row.clusters {
        let lower = c.to_ascii_lowercase();
        let set: Vec<Upstream> = (0..2).map(|i| Upstream::with_handler(&format!("{lower}-{i}"), Arc::new(row.handler))).collect();
        b = b.endpoints(c, &set);
        ups.push(set);
    }
    let (bootstrap, filter) = dynamic_filter(&b.render(), row.v1);
    let envoy = EnvoyBuilder::from_template(&format!("{} (dynamic)", row.template), &bootstrap).start();
    for (c, set) in row.clusters.iter().zip(&ups) {
        envoy.wait_healthy(&c.to_ascii_lowercase(), set.len());
    }
    let process = envoy.process();
    let headers = row.headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let load = Load::with_headers(envoy.port("ingress"), row.path, headers, row.effect);

    // v1 serves.
    load.wait_requests(100, Duration::from_secs(60));
    let snap = load.snapshot();
    assert!(snap.failures.is_empty(), "{m}: v1: {:?}", &snap.failures[..snap.failures.len().min(5)]);
    assert_eq!(snap.ok.keys().collect::<Vec<_>>(), [row.v1_effect], "{m}: v1's effect on every response");
    let success = envoy.stat(&filter.stat("update_success"));
    let rejected = envoy.stat(&filter.stat("update_rejected"));
    let failed = envoy.stat(&filter.stat("config_fail"));
    assert_eq!((rejected, failed), (0, 0), "{m}: nothing rejected before v2");

    // v2 is refused, v1 keeps serving.
    let from = load.snapshot().sequence.len();
    let done_at_v2 = load.done();
    filter.publish(row.v2, 2);
    wait_for(&format!("{m}: v2 rejected"), Duration::from_secs(30), || {
        (envoy.stat(&filter.stat("update_rejected")) > rejected).then_some(())
    });
    load.wait_requests(200, Duration::from_secs(60));
    let snap = load.snapshot();
    let after_v2 = &snap.sequence[from..];
    let other: Vec<&String> = after_v2.iter().filter(|l| *l != row.v1_effect).collect();
    assert!(
        other.is_empty(),
        "{m}: after the rejected v2, {} of {} responses did not show v1's effect: {other:?}",
        other.len(),
        after_v2.len()
    );
    assert_eq!(envoy.stat(&filter.stat("update_success")), success, "{m}: v2 counted as applied");
    assert_eq!(envoy.stat(&filter.stat("update_rejected")), rejected + 1, "{m}: v2 rejected once");
    assert_eq!(envoy.stat(&filter.stat("config_fail")), failed + 1, "{m}: v2 counted as a failed config");
    // The module's error line, and Envoy's own line for the refused update
    // (1.40, file-based ECDS). Envoy flushes its log file at once only for
    // errors; the warning may take its flush interval (10 s) to appear.
    let says = format!("{m}: invalid plugin config: field `{}`", row.v2_field);
    let refused = format!("config update rejected: Unable to create Wasm plugin {}", filter.plugin_name());
    for line in [&says, &refused] {
        wait_for(&format!("{m}: the log to say {line:?}"), Duration::from_secs(30), || envoy.log().contains(line.as_str()).then_some(()));
    }
    let while_rejected = load.done() - done_at_v2;

    // v3 applies.
    filter.publish(row.v3, 3);
    wait_for(&format!("{m}: v3's effect"), Duration::from_secs(30), || {
        (load.snapshot().sequence.last().map(String::as_str) == Some(row.v3_effect)).then_some(())
    });
    load.wait_requests(100, Duration::from_secs(60));
    let report = load.stop();
    let tail = &report.sequence[report.sequence.len().saturating_sub(100)..];
    assert!(tail.iter().all(|l| l == row.v3_effect), "{m}: v3's effect on every later response: {tail:?}");
    let measured = Measured {
        requests: report.total_ok() + report.failures.len() as u64,
        failures: report.failures.len(),
        while_rejected,
        update_success: envoy.stat(&filter.stat("update_success")),
        update_rejected: envoy.stat(&filter.stat("update_rejected")),
        config_fail: envoy.stat(&filter.stat("config_fail")),
    };
    assert!(
        report.failures.is_empty(),
        "{m}: {} failed requests: {:?}",
        report.failures.len(),
        &report.failures[..report.failures.len().min(10)]
    );
    assert_eq!(measured.update_success, success + 1, "{m}: v3 applied");
    assert_eq!((measured.update_rejected, measured.config_fail), (rejected + 1, failed + 1), "{m}: only v2 rejected");
    assert_eq!(envoy.process(), process, "{m}: the same Envoy process throughout");
    measured
}

#[test]
fn every_module_keeps_its_old_config_when_an_update_is_rejected() {
    let mut rows: Vec<&str> = ROWS.iter().map(|r| r.module).collect();
    rows.sort();
    assert_eq!(rows, filters::names(), "one row per module in filters/");
    let mut failed = Vec::new();
    for row in &ROWS {
        match std::panic::catch_unwind(|| check(row)) {
            Ok(x) => eprintln!(
                "{}: {} requests under load, {} failed; {} answered between writing v2 and writing v3, all with v1's effect {:?}; \
                 ECDS update_success {}, update_rejected {}, config_fail {}",
                row.module, x.requests, x.failures, x.while_rejected, row.v1_effect, x.update_success, x.update_rejected, x.config_fail
            ),
            Err(_) => failed.push(row.module),
        }
    }
    assert!(failed.is_empty(), "rows that failed (messages above): {failed:?}");
}
