//! Malformed and adversarial requests through a real Envoy, for every filter
//! and for the pipeline module, from one table: header values that are not
//! UTF-8 (bytes 0x80-0xFF) in every header a filter reads, broken percent
//! escapes and raw high bytes in the path and query, duplicated, empty and
//! oversized headers (a 60,000-byte cookie), hundreds of cookies.
//!
//! Per module: no response is a 5xx unless the same request without the
//! malformed parts gets that status too, Envoy stays up, its log has no panic
//! and no critical wasm line, and afterwards clean requests on fresh
//! connections (so on every worker) still get their normal answer from the
//! same replica as before.

use meshpatterns_tests::{Client, Envoy, EnvoyBuilder, Upstream};

/// Limits raised so that the clean requests after the malformed ones are
/// never refused for rate: this file tests input handling, not budgets.
const UNLIMITED: &str = r#""rate": 1000000, "per": "second", "burst": 1000000"#;

struct Module {
    name: &'static str,
    /// The Envoy config template in envoy/ that loads the module.
    template: &'static str,
    /// `{{ENDPOINTS_<X>}}` placeholders; the cluster is `x` lowercased.
    clusters: &'static [&'static str],
    /// A path whose clean request the module answers 200 from an upstream.
    path: &'static str,
    replace: &'static [(&'static str, &'static str)],
}

const MODULES: [Module; 6] = [
    Module { name: "consistent-hash", template: "consistent-hash.yaml", clusters: &["REPLICAS"], path: "/", replace: &[] },
    Module {
        name: "experiment-splitter",
        template: "experiment-splitter.yaml",
        clusters: &["CONTROL", "TREATMENT"],
        path: "/checkout",
        replace: &[],
    },
    Module {
        name: "rate-limiter",
        template: "rate-limiter.yaml",
        clusters: &["APP"],
        path: "/api/orders",
        replace: &[(r#""rate": 5, "per": "second", "burst": 10"#, UNLIMITED), (r#""rate": 600, "per": "minute", "burst": 600"#, UNLIMITED)],
    },
    Module {
        name: "shard-router",
        template: "shard-router.yaml",
        clusters: &["SHARD_A", "SHARD_B", "SHARD_C"],
        path: "/kv/user-1",
        replace: &[],
    },
    Module { name: "metrics-adapter", template: "metrics-adapter.yaml", clusters: &["APP"], path: "/orders", replace: &[] },
    Module {
        name: "pipeline",
        template: "meshpatterns.yaml",
        clusters: &["CONTROL", "TREATMENT"],
        path: "/checkout",
        replace: &[(r#""rate": 5, "per": "second", "burst": 10"#, UNLIMITED), (r#""rate": 50, "per": "second", "burst": 100"#, UNLIMITED)],
    },
];

/// Every request header one of the filters reads (or may be tricked into reading).
const READ_HEADERS: [&str; 8] =
    ["x-user-id", "cookie", "x-api-key", "x-shard-key", "x-tenant", "x-experiment-override", "x-experiment-secret", "x-forwarded-for"];

/// The headers of a clean request: a key for every filter.
const CLEAN: [(&str, &str); 5] = [
    ("x-user-id", "alice"),
    ("cookie", "mp_uid=alice-cookie; mp_session=alice-session"),
    ("x-api-key", "key-1"),
    ("x-shard-key", "user-1"),
    ("x-tenant", "acme"),
];

/// A path without the module's clean path: the clean request on it sets
/// the baseline for malformed requests on paths outside the module's route.
const BARE: &str = "/x";

/// Which clean request a malformed one is compared with.
#[derive(Clone, Copy)]
enum Base {
    Clean,
    Bare,
}

struct Case {
    label: String,
    base: Base,
    bytes: Vec<u8>,
}

fn request(path: &[u8], headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"GET ".to_vec();
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: x\r\n");
    for (k, v) in headers {
        out.extend_from_slice(k);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn clean_headers_except(name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    CLEAN.iter().filter(|(k, _)| *k != name).map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
}

/// The malformed requests for a module whose clean path is `path`.
fn cases(path: &str) -> Vec<Case> {
    let high: Vec<u8> = (0x80..=0xFFu8).collect();
    let values: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("every byte 0x80-0xFF", vec![high.clone()]),
        ("broken UTF-8", vec![b"user-\xc3\x28-\xe2\x82-\xf0\x9f".to_vec()]),
        ("empty", vec![Vec::new()]),
        ("duplicated, one clean one not", vec![b"alice".to_vec(), b"\xff\xfe\x80".to_vec()]),
        ("8 KB with high bytes", vec![[b"k".repeat(8000), high.clone()].concat()]),
        ("ten copies", vec![b"v\x80".to_vec(); 10]),
    ];
    let mut out = Vec::new();
    for base in [Base::Clean, Base::Bare] {
        let p = match base {
            Base::Clean => path,
            Base::Bare => BARE,
        };
        for h in READ_HEADERS {
            for (what, vals) in &values {
                let mut headers = clean_headers_except(h);
                headers.extend(vals.iter().map(|v| (h.as_bytes().to_vec(), v.clone())));
                out.push(Case { label: format!("{p} {h}: {what}"), base, bytes: request(p.as_bytes(), &headers) });
            }
        }
    }
    let cookie = |label: &str, value: Vec<u8>| {
        let mut headers = clean_headers_except("cookie");
        headers.push((b"cookie".to_vec(), value));
        Case { label: format!("cookie: {label}"), base: Base::Clean, bytes: request(path.as_bytes(), &headers) }
    };
    out.push(cookie("60,000 bytes", [b"mp_uid=".to_vec(), b"u".repeat(60_000)].concat()));
    out.push(cookie("60,000 bytes of 0xFF in a session cookie", [b"mp_session=".to_vec(), vec![0xFF; 60_000]].concat()));
    out.push(cookie("1,000 cookies", [b"a=1; ".repeat(1000), b"mp_uid=\xff; mp_session=\xfe".to_vec()].concat()));
    out.push(cookie("the key cookies 200 times each", b"mp_uid=a\x80; mp_session=b\x81; ".repeat(200)));
    out.push(cookie("no names, no values", b";;;==;mp_uid;mp_session=;=;".to_vec()));
    let clean = clean_headers_except("");
    let mut path_case = |label: &str, base: Base, p: Vec<u8>| {
        out.push(Case { label: format!("path {label}"), base, bytes: request(&p, &clean) });
    };
    let parent = path.rsplit_once('/').map(|(a, _)| a).unwrap_or("");
    let key_base = if parent.is_empty() { Base::Bare } else { Base::Clean };
    path_case("%FF", Base::Clean, format!("{path}/%FF%FE%80").into_bytes());
    path_case("truncated escape", Base::Clean, format!("{path}/%F").into_bytes());
    path_case("raw high bytes", Base::Clean, [path.as_bytes(), b"/\xff\xfe\x80"].concat());
    path_case("query with broken escapes", Base::Clean, format!("{path}?q=%G1%&%&=&%%&x-user-id=%ff&mp_uid=%zz").into_bytes());
    path_case("query with raw high bytes", Base::Clean, [path.as_bytes(), b"?k=\xff\xfe&\x80"].concat());
    path_case("key segment %FF", key_base, format!("{parent}/%FF%FE").into_bytes());
    path_case("key segment raw high bytes", key_base, [parent.as_bytes(), b"/\xff\xfe\x80"].concat());
    path_case("4 KB segment", key_base, format!("{parent}/{}", "%FF".repeat(1400)).into_bytes());
    out
}

fn start(m: &Module) -> (Vec<Vec<Upstream>>, Envoy) {
    let ups: Vec<Vec<Upstream>> = m.clusters.iter().map(|c| Upstream::start_many(&c.to_ascii_lowercase(), 2)).collect();
    let mut b = EnvoyBuilder::new(m.template);
    for (c, u) in m.clusters.iter().zip(&ups) {
        b = b.endpoints(c, u);
    }
    for (from, to) in m.replace {
        b = b.replace(from, to);
    }
    let envoy = b.start();
    for (c, u) in m.clusters.iter().zip(&ups) {
        envoy.wait_healthy(&c.to_ascii_lowercase(), u.len());
    }
    (ups, envoy)
}

/// Run every malformed request through `m`; returns how many were sent.
fn check(m: &Module) -> usize {
    let (_ups, envoy) = start(m);
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let clean_request = |p: &str| request(p.as_bytes(), &clean_headers_except(""));
    let clean = c.raw(&clean_request(m.path)).unwrap_or_else(|e| panic!("{}: clean request: {e}", m.name));
    assert_eq!(clean.status, 200, "{}: clean request on {}: {}", m.name, m.path, clean.text());
    let home = clean.replica().to_string();
    assert!(!home.is_empty(), "{}: the clean request was not answered by an upstream", m.name);
    let bare = c.raw(&clean_request(BARE)).unwrap_or_else(|e| panic!("{}: clean request on {BARE}: {e}", m.name)).status;
    eprintln!("{}: clean {} -> 200 from {home}; clean {BARE} -> {bare}", m.name, m.path);

    let cases = cases(m.path);
    let mut failures = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for case in &cases {
        let expected = match case.base {
            Base::Clean => 200,
            Base::Bare => bare,
        };
        match c.raw(&case.bytes) {
            Ok(r) => {
                *statuses.entry(r.status).or_default() += 1;
                if r.status >= 500 && r.status != expected {
                    failures.push(format!("{}: {} (clean: {expected}): {}", case.label, r.status, r.text()));
                }
            }
            Err(e) => failures.push(format!("{}: no response: {e}", case.label)),
        }
    }
    eprintln!("{}: {} malformed requests, statuses {statuses:?}", m.name, cases.len());
    assert!(failures.is_empty(), "{}: {} of {} malformed requests failed:\n{}", m.name, failures.len(), cases.len(), failures.join("\n"));

    // Envoy is still up, and on fresh connections (any worker) the clean
    // request still gets its normal answer from the same replica.
    assert!(envoy.try_admin("/ready").is_ok_and(|(s, _)| s == 200), "{}: Envoy is not ready after the malformed requests", m.name);
    for i in 0..20 {
        let r = Client::new(port).raw(&clean_request(m.path)).unwrap_or_else(|e| panic!("{}: clean request {i} after: {e}", m.name));
        assert_eq!(r.status, 200, "{}: clean request {i} after the malformed ones: {}", m.name, r.text());
        // The same cluster (arm, shard) as before; the replica inside it may
        // vary where the cluster balances round robin.
        let cluster = |name: &str| name.rsplit_once('-').map(|(c, _)| c.to_string()).unwrap_or_else(|| name.to_string());
        assert_eq!(cluster(r.replica()), cluster(&home), "{}: clean request {i} after the malformed ones", m.name);
    }
    let log = envoy.log();
    assert!(!log.to_ascii_lowercase().contains("panic"), "{}: the log mentions a panic:\n{log}", m.name);
    let critical: Vec<&str> = log.lines().filter(|l| l.contains("critical") && l.to_ascii_lowercase().contains("wasm")).collect();
    assert!(critical.is_empty(), "{}: critical wasm lines in the log:\n{}", m.name, critical.join("\n"));
    cases.len()
}

#[test]
fn malformed_requests_never_break_any_module() {
    let mut sent = Vec::new();
    for m in &MODULES {
        sent.push((m.name, check(m)));
    }
    eprintln!("malformed requests per module: {sent:?}");
}
