//! The fuzz targets as plain functions over bytes: each libFuzzer binary in
//! `fuzz_targets/` calls one of them, and `tests/corpus.rs` replays every
//! committed corpus file through the same function on a normal `cargo test`.
//!
//! Every target checks invariants besides "does not panic": a config parses
//! the same way twice and after re-serialisation, a single filter's config
//! and the same config as a pipeline stage agree, `decide` is deterministic,
//! values a filter writes into headers are legal header values, and decoders
//! of what Envoy hands back stay inside their buffer and round-trip.

use std::borrow::Cow;

use arbitrary::{Arbitrary, Unstructured};
use meshpatterns_core::{ConfigError, RequestView};
use meshpatterns_host::headers::HeaderMap;

/// Every target by name (the names of the fuzz binaries and corpus folders).
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("config_consistent_hash", config_consistent_hash),
    ("config_experiment_splitter", config_experiment_splitter),
    ("config_rate_limiter", config_rate_limiter),
    ("config_shard_router", config_shard_router),
    ("config_metrics_adapter", config_metrics_adapter),
    ("config_meshpatterns", config_meshpatterns),
    ("decide_consistent_hash", decide_consistent_hash),
    ("decide_experiment_splitter", decide_experiment_splitter),
    ("decide_rate_limiter", decide_rate_limiter),
    ("decide_shard_router", decide_shard_router),
    ("decide_metrics_adapter", decide_metrics_adapter),
    ("core_cookie", core_cookie),
    ("core_xff", core_xff),
    ("host_header_map", host_header_map),
    ("host_property", host_property),
];

// ---------------------------------------------------------------------------
// Config parsers

/// What a parse came to, comparable across runs.
fn outcome(r: Option<Result<(), ConfigError>>) -> Result<(), ConfigError> {
    match r {
        Some(r) => r,
        None => panic!("parse_module does not know the filter"),
    }
}

fn check_error(e: &ConfigError) {
    // Every error names a field (a key that is the empty string reads `[""]`).
    assert!(!e.field.is_empty(), "error without a field path: {e:?}");
    let text = e.to_string();
    assert!(text.starts_with("invalid plugin config"), "{text}");
}

/// `parse_module(filter)` over `data`, with the invariants every parser keeps.
fn config_target(filter: &str, stage_key: Option<&str>, data: &[u8]) {
    let first = outcome(meshpatterns::parse_module(filter, data));
    // Deterministic.
    assert_eq!(first, outcome(meshpatterns::parse_module(filter, data)), "two parses differ");
    if let Err(e) = &first {
        check_error(e);
    }
    // A document that is JSON parses the same after re-serialisation, compact
    // and pretty (the config Istio hands Envoy is re-serialised JSON).
    let Ok(value) = meshpatterns_core::error::parse_value(data) else { return };
    for text in [serde_json::to_vec(&value), serde_json::to_vec_pretty(&value)] {
        let text = text.unwrap_or_default();
        let again = outcome(meshpatterns::parse_module(filter, &text));
        // Same verdict, same field; the value text may differ in a float's
        // last digit (serde_json reads floats fast, not correctly rounded).
        assert_eq!(
            first.as_ref().map_err(|e| &e.field),
            again.as_ref().map_err(|e| &e.field),
            "re-serialised config parses differently: {}",
            String::from_utf8_lossy(&text)
        );
    }
    // A pattern's config and the same object as the only stage of the
    // pipeline are accepted alike; the pipeline's error is the same error
    // under `stages[0].<stageKey>`.
    if let (Some(key), true) = (stage_key, value.is_object()) {
        let doc = serde_json::json!({ "stages": [{ key: value }] });
        let text = serde_json::to_vec(&doc).unwrap_or_default();
        let piped = meshpatterns::parse(&text).map(|_| ());
        match (&first, &piped) {
            (Ok(()), Ok(())) => {}
            (Err(single), Err(p)) => {
                // `at` joins the paths exactly as the pipeline's prefix does,
                // odd keys (empty, `[`, `.`) included: they read `["..."]`.
                let prefix = format!("stages[0].{key}");
                assert!(p.field.starts_with(&prefix) && p.field.ends_with(&single.field), "pipeline error {p:?} for {single:?}");
                assert_eq!(p.field, single.clone().at(&prefix).field, "pipeline error {p:?} for {single:?}");
            }
            _ => panic!("single {first:?} but pipeline {piped:?}"),
        }
    }
}

pub fn config_consistent_hash(data: &[u8]) {
    config_target("consistent-hash", Some("consistentHash"), data);
}
pub fn config_experiment_splitter(data: &[u8]) {
    config_target("experiment-splitter", Some("experimentSplit"), data);
}
pub fn config_rate_limiter(data: &[u8]) {
    config_target("rate-limiter", Some("rateLimit"), data);
}
pub fn config_shard_router(data: &[u8]) {
    config_target("shard-router", Some("shardRoute"), data);
}
pub fn config_metrics_adapter(data: &[u8]) {
    config_target("metrics-adapter", Some("metrics"), data);
}
pub fn config_meshpatterns(data: &[u8]) {
    config_target("meshpatterns", None, data);
}

// ---------------------------------------------------------------------------
// Requests

/// Header names the filters read, so the fuzzer finds them without guessing.
const NAMES: &[&str] = &[
    ":path",
    ":method",
    ":authority",
    "cookie",
    "x-forwarded-for",
    "content-type",
    "x-user-id",
    "x-api-key",
    "x-shard-key",
    "x-tenant",
    "x-experiment-override",
    "x-experiment-secret",
    "x-session-hash",
    "x-experiment-arm",
    "x-shard-cluster",
    "host",
    "x-k",
];

#[derive(Debug, Arbitrary)]
enum Name {
    Known(u8),
    Other(String),
}

impl Name {
    fn text(&self) -> Cow<'_, str> {
        match self {
            Name::Known(i) => Cow::Borrowed(NAMES.get(usize::from(*i) % NAMES.len()).copied().unwrap_or(":path")),
            Name::Other(s) => Cow::Borrowed(s),
        }
    }
}

/// An address as Envoy's `source.address` or an X-Forwarded-For entry.
#[derive(Debug, Arbitrary)]
enum Addr {
    V4([u8; 4], Option<u16>),
    V6([u16; 8], Option<u16>),
    Text(String),
}

impl Addr {
    fn text(&self) -> String {
        match self {
            Addr::V4(a, None) => std::net::Ipv4Addr::from(*a).to_string(),
            Addr::V4(a, Some(p)) => format!("{}:{p}", std::net::Ipv4Addr::from(*a)),
            Addr::V6(a, None) => std::net::Ipv6Addr::from(*a).to_string(),
            Addr::V6(a, Some(p)) => format!("[{}]:{p}", std::net::Ipv6Addr::from(*a)),
            Addr::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Method {
    Get,
    Head,
    Post,
    Other(Vec<u8>),
}

/// A request as the fuzzer builds it: a structured path, cookies and
/// X-Forwarded-For, any other headers as bytes, and a peer address.
#[derive(Debug, Arbitrary)]
struct ArbRequest {
    prefix: u8,
    segments: Vec<Vec<u8>>,
    query: Vec<(Vec<u8>, Vec<u8>)>,
    raw_path: Option<Vec<u8>>,
    method: Option<Method>,
    cookies: Vec<(Name, Vec<u8>)>,
    /// Cookie headers after the first (HTTP/2 sends one per cookie).
    more_cookies: Vec<Vec<u8>>,
    xff: Vec<Addr>,
    headers: Vec<(Name, Vec<u8>)>,
    source: Option<Addr>,
    mint: [u8; 16],
}

/// The request as the stages see it: a header map decoded from Envoy's
/// serialization by the host's own parser, plus the peer address.
struct View {
    map: HeaderMap,
    source: Option<String>,
}

impl RequestView for View {
    fn header_bytes(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        self.map.get(name)
    }
    fn source_address(&self) -> Option<String> {
        self.source.clone()
    }
}

impl ArbRequest {
    fn view(&self) -> View {
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let path = match &self.raw_path {
            Some(p) => p.clone(),
            None => {
                let prefixes: [&[u8]; 4] = [b"/", b"/kv/", b"/api/", b"/checkout/"];
                let mut p = prefixes.get(usize::from(self.prefix) % prefixes.len()).copied().unwrap_or(b"/").to_vec();
                p.extend(self.segments.join(&b'/'));
                if !self.query.is_empty() {
                    p.push(b'?');
                    let q: Vec<Vec<u8>> = self.query.iter().map(|(k, v)| [k.as_slice(), b"=", v.as_slice()].concat()).collect();
                    p.extend(q.join(&b'&'));
                }
                p
            }
        };
        pairs.push((b":path".to_vec(), path));
        if let Some(m) = &self.method {
            let m = match m {
                Method::Get => b"GET".to_vec(),
                Method::Head => b"HEAD".to_vec(),
                Method::Post => b"POST".to_vec(),
                Method::Other(b) => b.clone(),
            };
            pairs.push((b":method".to_vec(), m));
        }
        if !self.cookies.is_empty() {
            let c: Vec<Vec<u8>> = self.cookies.iter().map(|(k, v)| [k.text().as_bytes(), b"=", v.as_slice()].concat()).collect();
            pairs.push((b"cookie".to_vec(), c.join(&b"; "[..])));
        }
        for c in &self.more_cookies {
            pairs.push((b"cookie".to_vec(), c.clone()));
        }
        if !self.xff.is_empty() {
            let x: Vec<String> = self.xff.iter().map(Addr::text).collect();
            pairs.push((b"x-forwarded-for".to_vec(), x.join(", ").into_bytes()));
        }
        for (k, v) in &self.headers {
            pairs.push((k.text().as_bytes().to_vec(), v.clone()));
        }
        let bytes = meshpatterns_host::abi::serialize_pairs(&pairs);
        let map = HeaderMap::parse(bytes);
        // The host decodes exactly what was serialised.
        assert_eq!(map.len(), pairs.len());
        View { map, source: self.source.as_ref().map(Addr::text) }
    }

    fn mint(&self) -> String {
        meshpatterns_core::cookie::id_from_bytes(&self.mint)
    }
}

/// A header value Envoy accepts from a filter: no NUL, CR or LF, and no
/// surrounding whitespace that would be trimmed.
fn legal_header_value(v: &[u8]) -> bool {
    !v.iter().any(|b| matches!(b, 0 | b'\r' | b'\n'))
}

fn parse_json<T: serde::de::DeserializeOwned>(json: &str) -> T {
    match meshpatterns_core::error::parse_json(json.as_bytes()) {
        Ok(c) => c,
        Err(e) => panic!("fixed config does not parse: {e}"),
    }
}

/// The fixed configs of a decide target, validated once per process (a
/// regex compiles once, as in the filter), then config `which` of them.
macro_rules! settings {
    ($settings:ty, $configs:expr, $which:expr) => {{
        thread_local! {
            static ALL: &'static [$settings] = Box::leak(
                $configs
                    .iter()
                    .map(|json| match <$settings>::try_from_config(parse_json(json)) {
                        Ok(s) => s,
                        Err(e) => panic!("fixed config rejected: {e}"),
                    })
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
            );
        }
        let all: &'static [$settings] = ALL.with(|a| *a);
        match all.get(usize::from($which) % all.len()) {
            Some(s) => s,
            None => return,
        }
    }};
}

fn requests(data: &[u8]) -> Option<(ArbRequest, u8)> {
    let mut u = Unstructured::new(data);
    let which = u8::arbitrary(&mut u).ok()?;
    let req = ArbRequest::arbitrary(&mut u).ok()?;
    Some((req, which))
}

// ---------------------------------------------------------------------------
// consistent-hash

const CH_CONFIGS: &[&str] = &[
    r#"{"keySources":[{"header":"x-user-id"},{"cookie":"mp_session"}],"hashHeader":"x-session-hash","sessionCookie":{"name":"mp_session","ttlSeconds":86400,"sameSite":"Lax"}}"#,
    r#"{"keySources":[{"query":"s"},{"pathSegment":1},{"pathRegex":{"pattern":"^/api/([^/]+)"}},{"clientAddress":{"trustedHops":2}}],"headerValue":"key","fallbackKey":"anon"}"#,
    r#"{"keySources":["method","path",{"header":"x-k"}],"headerValue":"key"}"#,
];

pub fn decide_consistent_hash(data: &[u8]) {
    use consistent_hash::logic::{decide, HeaderValue, Settings, Source};
    let Some((req, which)) = requests(data) else { return };
    let s: &Settings = settings!(Settings, CH_CONFIGS, which);
    let view = req.view();
    let d = decide(s, &view, || req.mint());
    assert_eq!(d, decide(s, &view, || req.mint()), "decide is not deterministic");
    if let Some(v) = &d.header_value {
        assert!(legal_header_value(v.as_bytes()), "illegal hash header value {v:?}");
        if s.header_value == HeaderValue::Hash {
            assert!(v.len() == 16 && v.bytes().all(|b| b.is_ascii_hexdigit()), "{v:?}");
        }
    }
    match &d.source {
        Source::Issued => {
            let c = d.set_cookie.as_deref().unwrap_or_default();
            assert!(c.starts_with(&format!("{}={}", s.cookie.as_ref().map(|c| c.name.as_str()).unwrap_or_default(), req.mint())));
            assert!(legal_header_value(c.as_bytes()));
        }
        Source::None => assert!(d.header_value.is_none() && d.set_cookie.is_none()),
        Source::Matched(_) | Source::Fallback => assert!(d.header_value.is_some() && d.set_cookie.is_none()),
    }
}

// ---------------------------------------------------------------------------
// experiment-splitter

const ES_CONFIGS: &[&str] = &[
    r#"{"keySources":[{"header":"x-user-id"},{"cookie":"mp_uid"}],"assignmentCookie":{"name":"mp_uid","ttlSeconds":31536000,"sameSite":"Lax"},"exposeHeader":"x-experiment","override":{"header":"x-experiment-override","secretHeader":"x-experiment-secret","secret":"example-secret-replace-me-0123456789"},"experiments":[{"name":"checkout-v2","salt":"checkout-v2-2026","routingHeader":"x-experiment-arm","arms":[{"name":"control","percent":90,"target":"control"},{"name":"treatment","percent":10,"target":"treatment"}],"match":{"pathPrefixes":["/checkout"]},"allow":{"qa-treatment-user":"treatment"},"deny":["synthetic-monitor"]}]}"#,
    r#"{"keySources":[{"cookie":"uid"},{"clientAddress":{"trustedHops":1}}],"experiments":[{"name":"a","routingHeader":"x-arm-a","arms":[{"name":"c","percent":33.34,"target":"c"},{"name":"t1","percent":33.33,"target":"t1"},{"name":"t2","percent":33.33,"target":"t2"}]},{"name":"b","routingHeader":"x-arm-b","arms":[{"name":"off","percent":99.5,"target":"off"},{"name":"on","percent":0.5,"target":"on"}],"match":{"methods":["GET"]}}]}"#,
];

pub fn decide_experiment_splitter(data: &[u8]) {
    use experiment_splitter::logic::config::Settings;
    use experiment_splitter::logic::decide::decide;
    let Some((req, which)) = requests(data) else { return };
    let s: &Settings = settings!(Settings, ES_CONFIGS, which);
    let view = req.view();
    let d = decide(s, &view, || req.mint());
    assert_eq!(d, decide(s, &view, || req.mint()), "decide is not deterministic");
    assert_eq!(d.assignments.len(), s.experiments.len());
    for (e, a) in s.experiments.iter().zip(&d.assignments) {
        assert!(a.arm < e.arms.len(), "arm {} of {}", a.arm, e.arms.len());
    }
    assert_eq!(d.routing(s).count(), s.experiments.len());
    for (h, v) in d.routing(s) {
        assert!(!h.is_empty() && legal_header_value(v.as_bytes()));
    }
    for c in &d.set_cookies {
        assert!(legal_header_value(c.as_bytes()), "{c:?}");
    }
    if let Some(x) = &d.expose {
        assert!(legal_header_value(x.as_bytes()), "{x:?}");
    }
    for h in d.strip.iter().flatten() {
        let known = s.qa_override.as_ref().is_some_and(|o| *h == o.header || *h == o.secret_header);
        assert!(known, "strips a header it does not own: {h}");
    }
}

// ---------------------------------------------------------------------------
// rate-limiter

const RL_CONFIGS: &[&str] = &[
    r#"{"policies":[{"name":"api-key","match":{"pathPrefix":"/api/"},"key":[{"header":"x-api-key"}],"rate":600,"per":"minute","burst":600},{"name":"per-client","key":[{"clientAddress":{"trustedHops":0}}],"rate":5,"per":"second","burst":10}],"allowlist":[{"clientCidrs":["127.0.0.2/32"]}],"slots":65536,"ietfHeaders":true}"#,
    r#"{"policies":[{"name":"per-user","key":[{"header":"x-user-id"},{"cookie":"sid"}],"rate":1,"per":"second","burst":1},{"name":"xff","key":[{"clientAddress":{"trustedHops":2}}],"rate":2,"per":"second","burst":3,"shadow":true}],"slots":64}"#,
];

pub fn decide_rate_limiter(data: &[u8]) {
    use rate_limiter::logic::table::MemoryStore;
    use rate_limiter::logic::{decide, limited_reply, response_headers, Layout, Settings, Table, Verdict};
    let mut u = Unstructured::new(data);
    let Ok(which) = u8::arbitrary(&mut u) else { return };
    let Ok(seed) = u64::arbitrary(&mut u) else { return };
    // A short run of requests (keys repeat) at non-decreasing times.
    let Ok(reqs) = Vec::<(ArbRequest, u32)>::arbitrary(&mut u) else { return };
    let s: &Settings = settings!(Settings, RL_CONFIGS, which);
    let table = Table { layout: Layout { slots: s.slots }, seed };
    let (mut a, mut b) = (MemoryStore::default(), MemoryStore::default());
    let mut now: u64 = 1_000_000_000;
    for (req, step) in reqs.iter().take(16) {
        now = now.saturating_add(u64::from(*step));
        let view = req.view();
        let d = decide(s, &table, &view, &mut a, now);
        // The same sequence on another store decides the same.
        assert_eq!(d, decide(s, &table, &view, &mut b, now), "decide is not deterministic");
        if let Some(t) = d.take {
            assert!(t.remaining <= t.limit, "{t:?}");
            assert_eq!(t.allowed, d.verdict == Verdict::Allowed, "{d:?}");
        }
        assert_eq!(d.take.is_some(), matches!(d.verdict, Verdict::Allowed | Verdict::Limited | Verdict::ShadowLimited));
        for (_, v) in response_headers(s, &d) {
            assert!(legal_header_value(v.as_bytes()));
        }
        for grpc in [false, true] {
            let r = limited_reply(s, &d, grpc);
            assert_eq!(r.is_some(), d.verdict == Verdict::Limited);
            if let Some(r) = r {
                assert!(r.status >= 400 && r.headers.iter().all(|(_, v)| legal_header_value(v.as_bytes())));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// shard-router

const SR_CONFIGS: &[&str] = &[
    r#"{"keySources":[{"pathRegex":{"pattern":"^/kv/([^/]+)","group":1}},{"header":"x-shard-key"}],"keyPattern":"[A-Za-z0-9._:-]{1,128}","shardHeader":"x-shard-cluster","responseHeader":"x-shard","shardMap":{"version":"v2","shards":[{"name":"shard-a","cluster":"shard_a"},{"name":"shard-b","cluster":"shard_b"},{"name":"shard-c","cluster":"shard_c"},{"name":"shard-d","cluster":"shard_d"}]},"previousShardMap":{"version":"v1","shards":[{"name":"shard-a","cluster":"shard_a"},{"name":"shard-b","cluster":"shard_b"},{"name":"shard-c","cluster":"shard_c"}]},"fallbackStatuses":[404],"fallbackTimeoutMs":5000}"#,
    r#"{"keySources":[{"pathRegex":{"pattern":"^/kv/([^/]+)","group":1}},{"header":"x-shard-key"}],"keyPattern":"[A-Za-z0-9._:-]{1,128}","shardHeader":"x-shard-cluster","responseHeader":"x-shard","shardMap":{"version":"v1","shards":[{"name":"shard-a","cluster":"shard_a"},{"name":"shard-b","cluster":"shard_b"},{"name":"shard-c","cluster":"shard_c"}]}}"#,
];

pub fn decide_shard_router(data: &[u8]) {
    use shard_router::logic::config::Settings;
    use shard_router::logic::decide::{decide, Decision};
    let Some((req, which)) = requests(data) else { return };
    let s: &Settings = settings!(Settings, SR_CONFIGS, which);
    let view = req.view();
    let d = decide(s, &view);
    assert_eq!(d, decide(s, &view), "decide is not deterministic");
    match &d {
        Decision::Route(r) => {
            assert!(s.current.shards.get(r.index).is_some_and(|sh| sh == r.shard), "index {} is not the shard", r.index);
            assert!(legal_header_value(r.shard.cluster.as_bytes()));
            if let Some(old) = r.previous {
                assert_ne!(old.cluster, r.shard.cluster);
            }
            if let (Some(i), Some(p)) = (r.fallback_to, &s.previous) {
                assert!(i < p.shards.len());
            }
            assert!(r.fallback_to.is_none() || r.previous.is_some());
        }
        Decision::Reject(r) => {
            assert!(r.reply.status >= 400, "{:?}", r.reply);
            assert!(r.reply.headers.iter().all(|(_, v)| legal_header_value(v.as_bytes())));
        }
    }
}

// ---------------------------------------------------------------------------
// metrics-adapter

const MA_CONFIGS: &[&str] = &[
    r#"{"labelBy":["route","cluster"],"headerLabels":[{"header":"x-tenant","label":"tenant","maxValues":5}],"legacyStats":[{"path":"/metrics","upstreamPath":"/stats","format":"json","prefix":"app_","metrics":[{"key":"requests","type":"counter","help":"Requests the app served."},{"key":"errors","type":"counter","help":"Requests the app failed."},{"key":"queue.depth","type":"gauge","help":"Jobs waiting in the app's queue."}],"unknownKeys":"skip"},{"path":"/metrics/info","upstreamPath":"/info","format":"keyValue","prefix":"app_info_","metrics":[{"key":"total_connections_received","type":"counter"},{"key":"connected_clients","type":"gauge"}],"unknownKeys":"gauge"}]}"#,
];

pub fn decide_metrics_adapter(data: &[u8]) {
    use metrics_adapter::legacy::route;
    use metrics_adapter::logic::{sanitize_value, RequestLabels, Settings};
    let mut u = Unstructured::new(data);
    let Ok(which) = u8::arbitrary(&mut u) else { return };
    let Ok(req) = ArbRequest::arbitrary(&mut u) else { return };
    let Ok(dims) = Vec::<Option<String>>::arbitrary(&mut u) else { return };
    let Ok(code) = Option::<u64>::arbitrary(&mut u) else { return };
    let body = u.take_rest();
    let s: &Settings = settings!(Settings, MA_CONFIGS, which);
    let view = req.view();
    let labels = RequestLabels::of(s, &view);
    assert_eq!(labels, RequestLabels::of(s, &view), "labels are not deterministic");
    assert_eq!(labels.headers.len(), s.header_labels.len());
    let dims: Vec<Option<String>> = dims.into_iter().take(s.dimensions.len()).collect();
    let values = labels.values(&dims, code);
    assert_eq!(values.len(), dims.len() + 2 + labels.headers.len());
    for v in &values {
        // Sanitised label values are fixed points and single-line.
        assert_eq!(&sanitize_value(v), v, "sanitize_value is not idempotent");
        assert!(!v.contains(['\n', '\r', '"', '\\']), "{v:?}");
    }
    let method = view.header_bytes(":method");
    let path = view.header_bytes(":path");
    if let Some(r) = route(&s.legacy, method.as_deref(), path.as_deref()) {
        let spec = s.legacy.get(r.index);
        assert!(spec.is_some() && legal_header_value(&r.path), "{r:?}");
        // The app's body, whatever it holds, becomes a Prometheus exposition.
        if let Some(spec) = spec {
            let out = spec.adapt(body);
            assert_eq!(out, spec.adapt(body), "adapt is not deterministic");
            assert!(out.text.is_empty() || out.text.ends_with('\n'));
        }
    }
}

// ---------------------------------------------------------------------------
// core: cookies and X-Forwarded-For

#[derive(Debug, Arbitrary)]
struct CookieInput {
    header: Vec<u8>,
    name: Name,
    value: String,
    config: CookieConfigInput,
    id: [u8; 16],
}

#[derive(Debug, Arbitrary)]
struct CookieConfigInput {
    name: String,
    ttl: u64,
    path: Option<String>,
    domain: Option<String>,
    http_only: bool,
    secure: bool,
    same_site: u8,
}

pub fn core_cookie(data: &[u8]) {
    use meshpatterns_core::cookie::{find, find_bytes, id_from_bytes, is_cookie_value, CookieConfig, CookieSpec, SameSite};
    let mut u = Unstructured::new(data);
    let Ok(c) = CookieInput::arbitrary(&mut u) else { return };
    let name = c.name.text();
    // Reading: a value is a slice of the header, never spans a `;`.
    if let Some(v) = find_bytes(&c.header, &name) {
        let (start, end) = (c.header.as_ptr() as usize, c.header.as_ptr() as usize + c.header.len());
        assert!(v.is_empty() || (v.as_ptr() as usize >= start && v.as_ptr() as usize + v.len() <= end), "value outside the header");
        assert!(!v.contains(&b';'));
    }
    if let Ok(text) = std::str::from_utf8(&c.header) {
        assert_eq!(find(text, &name).map(str::as_bytes), find_bytes(&c.header, &name));
    }
    // A cookie we write is read back as written, behind other cookies.
    if meshpatterns_core::names::cookie_name("n", &name).is_ok() && is_cookie_value(&c.value) && !c.value.is_empty() {
        let header = format!("other=1; {name}={}; {name}=later", c.value);
        let want = if name == "other" { "1" } else { c.value.as_str() };
        let want = want.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(want);
        assert_eq!(find(&header, &name), Some(want), "{header}");
    }
    // Writing: ids are cookie values; Set-Cookie never injects a header.
    let id = id_from_bytes(&c.id);
    assert!(id.len() == 32 && is_cookie_value(&id));
    let config = CookieConfig {
        name: c.config.name,
        ttl_seconds: c.config.ttl,
        path: c.config.path.unwrap_or_else(|| "/".into()),
        domain: c.config.domain,
        http_only: c.config.http_only,
        secure: c.config.secure,
        same_site: match c.config.same_site % 3 {
            0 => SameSite::Strict,
            1 => SameSite::Lax,
            _ => SameSite::None,
        },
    };
    if let Ok(spec) = CookieSpec::try_from_config(&config) {
        let set = spec.set_cookie(&id);
        assert!(set.starts_with(&format!("{}={id}; Path=", config.name)), "{set}");
        assert!(set.bytes().all(|b| (0x20..0x7f).contains(&b)), "Set-Cookie with a control or non-ASCII byte: {set:?}");
        assert_eq!(find(&set, &config.name), Some(id.as_str()));
    }
}

#[derive(Debug, Arbitrary)]
struct XffInput {
    entries: Vec<Addr>,
    raw: Option<Vec<u8>>,
    source: Option<Addr>,
    hops: u8,
}

pub fn core_xff(data: &[u8]) {
    use meshpatterns_core::key::{client_address, strip_port, MAX_TRUSTED_HOPS};
    let mut u = Unstructured::new(data);
    let Ok(x) = XffInput::arbitrary(&mut u) else { return };
    let header = match &x.raw {
        Some(r) => r.clone(),
        None => x.entries.iter().map(Addr::text).collect::<Vec<_>>().join(",").into_bytes(),
    };
    let mut pairs = vec![(b"x-forwarded-for".to_vec(), header.clone())];
    pairs.push((b":path".to_vec(), b"/".to_vec()));
    let view = View { map: HeaderMap::parse(meshpatterns_host::abi::serialize_pairs(&pairs)), source: x.source.as_ref().map(Addr::text) };
    let hops = usize::from(x.hops) % (MAX_TRUSTED_HOPS as usize + 2);
    let got = client_address(&view, hops);
    assert_eq!(got, client_address(&view, hops));
    let peer = view.source.as_deref().map(strip_port);
    if hops == 0 {
        assert_eq!(got.as_deref(), peer, "0 trusted hops must use the peer");
    }
    if let Some(a) = &got {
        // The client is the peer or one entry of the header, without a port.
        let text = String::from_utf8_lossy(&header);
        let from_list = text.split(',').any(|e| strip_port(e) == a);
        assert!(Some(a.as_str()) == peer || from_list, "{a:?} is neither the peer nor an entry");
        assert!(Some(a.as_str()) == peer || !a.contains(','), "{a:?} spans two entries");
    } else {
        assert!(peer.is_none() || peer == Some(""), "a peer but no client");
    }
    // strip_port on well-formed addresses gives the IP.
    for e in x.entries.iter().chain(&x.source) {
        let t = e.text();
        if let Ok(sa) = t.parse::<std::net::SocketAddr>() {
            assert_eq!(strip_port(&t).parse::<std::net::IpAddr>().ok(), Some(sa.ip()), "{t}");
        }
        if let Ok(ip) = t.parse::<std::net::IpAddr>() {
            assert_eq!(strip_port(&t).parse::<std::net::IpAddr>().ok(), Some(ip), "{t}");
        }
        // A slice of its input.
        assert!(t.contains(strip_port(&t)));
    }
}

// ---------------------------------------------------------------------------
// host: what Envoy hands back

#[derive(Debug, Arbitrary)]
enum MapInput {
    /// Any bytes, as a damaged or hostile host could hand over.
    Raw(Vec<u8>),
    /// Well-formed pairs, serialised as Envoy does.
    Pairs(Vec<(Vec<u8>, Vec<u8>)>),
}

pub fn host_header_map(data: &[u8]) {
    use meshpatterns_host::abi::serialize_pairs;
    let mut u = Unstructured::new(data);
    let Ok(input) = MapInput::arbitrary(&mut u) else { return };
    let (buf, sent) = match input {
        MapInput::Raw(b) => (b, None),
        MapInput::Pairs(p) => (serialize_pairs(&p), Some(p)),
    };
    let map = HeaderMap::parse(buf.clone());
    let pairs: Vec<(&[u8], &[u8])> = map.iter().collect();
    // Every entry lies inside the buffer (iter drops none), and the entries
    // with their length table and NULs fit in it: nothing read twice or past
    // the end.
    assert_eq!(pairs.len(), map.len());
    if !map.is_empty() {
        let bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
        assert!(bytes + 4 <= buf.len(), "{bytes} bytes of entries in a buffer of {}", buf.len());
    }
    // Well-formed input decodes to exactly what was sent.
    if let Some(sent) = &sent {
        assert_eq!(pairs.len(), sent.len());
        for ((k, v), (sk, sv)) in pairs.iter().zip(sent) {
            assert!(k == sk && v == sv);
        }
    }
    // What was decoded re-serialises to a prefix-equivalent map.
    let again = HeaderMap::parse(serialize_pairs(&pairs));
    assert!(again.iter().eq(map.iter()), "decode(encode(decode(b))) != decode(b)");
    // Lookups agree with the pairs: first value, cookies joined.
    for (k, _) in pairs.iter().take(8) {
        let Ok(name) = std::str::from_utf8(k) else { continue };
        let values: Vec<&[u8]> = pairs.iter().filter(|(n, _)| n == k).map(|(_, v)| *v).collect();
        let got = map.get(name);
        assert!(map.has(name));
        if name == "cookie" {
            assert_eq!(got.as_deref(), Some(values.join(&b"; "[..]).as_slice()));
        } else {
            assert_eq!(got.as_deref(), values.first().copied());
        }
    }
}

#[derive(Debug, Arbitrary)]
enum PropertyInput {
    /// `source.address` and other text properties.
    Text(Vec<u8>, u8),
    /// Integer properties (8 little-endian bytes).
    Int(Vec<u8>),
    /// A response `:status`.
    Status(Vec<u8>),
    /// A rate-limiter table set from shared data.
    RateLimitSet(Vec<u8>),
    /// A metrics-adapter admitted-values list from shared data.
    Admitted(Vec<u8>),
}

pub fn host_property(data: &[u8]) {
    use meshpatterns_host::headers::{property_i64, property_text, status_code};
    let mut u = Unstructured::new(data);
    let Ok(input) = PropertyInput::arbitrary(&mut u) else { return };
    match input {
        PropertyInput::Text(b, hops) => {
            let t = property_text(b.clone());
            assert_eq!(t.is_some(), std::str::from_utf8(&b).is_ok());
            if let Some(t) = &t {
                assert_eq!(t.as_bytes(), b.as_slice());
            }
            // As the peer address of a request: the client address is that text without its port.
            let view = View { map: HeaderMap::default(), source: t.clone() };
            let got = meshpatterns_core::key::client_address(&view, usize::from(hops % 3));
            assert_eq!(got.as_deref(), t.as_deref().map(meshpatterns_core::key::strip_port));
        }
        PropertyInput::Int(b) => {
            let v = property_i64(&b);
            assert_eq!(v.is_some(), b.len() >= 8);
            if let Some(v) = v {
                assert_eq!(property_i64(&v.to_le_bytes()), Some(v));
                assert_eq!(b.get(..8), Some(&v.to_le_bytes()[..]));
            }
        }
        PropertyInput::Status(b) => {
            if let Some(c) = status_code(&b) {
                assert_eq!(status_code(c.to_string().as_bytes()), Some(c));
                assert!(std::str::from_utf8(&b).is_ok_and(|s| s.trim().trim_start_matches('+').trim_start_matches('0').len() <= 10));
            }
        }
        PropertyInput::RateLimitSet(b) => {
            use rate_limiter::logic::table::{decode_set, encode_set};
            let set = decode_set(&b);
            assert!(set.len() <= b.len() / 32);
            if !set.is_empty() {
                assert_eq!(encode_set(&set), b, "a decoded set re-encodes to other bytes");
            }
            assert_eq!(decode_set(&encode_set(&set)), set);
        }
        PropertyInput::Admitted(b) => {
            use metrics_adapter::admission::{decode_admitted, encode_admitted};
            // Whatever shared data holds decodes to non-empty single-line values.
            let values = decode_admitted(&b);
            assert!(values.iter().all(|v| !v.is_empty() && !v.contains('\n')));
            // What the module stores (sanitised values) reads back as written.
            let mine: Vec<String> = values.iter().map(|v| metrics_adapter::logic::sanitize_value(v)).filter(|v| !v.is_empty()).collect();
            assert_eq!(decode_admitted(&encode_admitted(&mine)), mine);
        }
    }
}
