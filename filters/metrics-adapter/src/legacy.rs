//! Legacy stats adaptation, free of proxy-wasm: an app serves its statistics
//! in its own format (a JSON document, or Redis `INFO`-style `key:value`
//! lines); this module turns such a body into Prometheus text exposition
//! (format 0.0.4) with HELP and TYPE lines, sanitised names, and counters and
//! gauges as the config maps them. A body that cannot be parsed yields a
//! valid exposition holding a comment with the reason and
//! `meshpatterns_legacy_stats_parse_ok 0`, never a panic.
//!
//! Which requests are adapted ([`route`]) and what happens to their response
//! headers and body ([`Rewrite`]) are decided here too; the stage applies.

use std::fmt::Write as _;

use meshpatterns_core::error::ConfigError;
use serde::Deserialize;

/// Content type of the rewritten response.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Gauge in every adapted body: 1 when the app's body was parsed, 0 when not.
pub const PARSE_OK: &str = "meshpatterns_legacy_stats_parse_ok";
/// Default cap on the app's body; a larger body is dropped and reported.
/// Half of Envoy's default per-connection buffer limit (1 MiB): Envoy resets
/// a stream whose buffered response passes that limit before the filter
/// could answer with its error exposition.
pub const DEFAULT_MAX_BODY_BYTES: u32 = 512 * 1024;
/// Longest metric name produced from a key; longer keys are skipped.
pub const MAX_NAME_BYTES: usize = 200;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Format {
    /// A JSON object; nested objects are flattened with `.` (`queue.depth`).
    Json,
    /// `key:value` lines as in Redis `INFO`; `#` lines are comments;
    /// `k=v,k=v` values expand to `key.k`.
    KeyValue,
}

impl Format {
    fn describe(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::KeyValue => "key:value text",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum MetricType {
    Counter,
    Gauge,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Unknown {
    /// Keys not listed in `metrics` are left out.
    #[default]
    Skip,
    /// Keys not listed in `metrics` are exposed as untyped-by-config gauges.
    Gauge,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LegacyConfig {
    /// Request path served by the adapter (exact match, query ignored).
    pub path: String,
    /// Path the app serves its stats on (default: `path`).
    #[serde(default)]
    pub upstream_path: Option<String>,
    pub format: Format,
    /// Prepended to every exposed name (`redis_`).
    #[serde(default)]
    pub prefix: String,
    /// Keys to expose and how.
    #[serde(default)]
    pub metrics: Vec<MetricConfig>,
    #[serde(default)]
    pub unknown_keys: Unknown,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u32,
}

fn default_max_body() -> u32 {
    DEFAULT_MAX_BODY_BYTES
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricConfig {
    /// Key in the app's body (`.`-joined path for nested JSON).
    pub key: String,
    #[serde(rename = "type")]
    pub kind: MetricType,
    /// Exposed name after the prefix (default: the sanitised key); counters get `_total` appended.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub help: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    pub key: String,
    pub kind: MetricType,
    /// Full exposed name (prefix included, `_total` for counters).
    pub name: String,
    pub help: String,
}

/// The validated runtime form of [`LegacyConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacySpec {
    pub path: String,
    pub upstream_path: String,
    pub format: Format,
    pub prefix: String,
    pub metrics: Vec<MetricSpec>,
    pub unknown: Unknown,
    pub max_body_bytes: usize,
}

fn check_path(field: &str, p: &str) -> Result<(), ConfigError> {
    if !p.starts_with('/') || p.len() > 256 || p.contains(['?', '#']) || p.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(ConfigError::new(field, format!("{p:?}"), "a path starting with /, printable ASCII, no ? or #, at most 256 bytes"));
    }
    Ok(())
}

/// `[a-zA-Z_][a-zA-Z0-9_]*` (no `:`, which Prometheus reserves for recording rules).
pub fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_') && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

impl LegacySpec {
    pub fn try_from_config(c: LegacyConfig) -> Result<LegacySpec, ConfigError> {
        check_path("path", &c.path)?;
        let upstream_path = c.upstream_path.unwrap_or_else(|| c.path.clone());
        check_path("upstreamPath", &upstream_path)?;
        if !c.prefix.is_empty() && !is_metric_name(&c.prefix) {
            return Err(ConfigError::new("prefix", format!("{:?}", c.prefix), "empty, or letters, digits and _ not starting with a digit"));
        }
        if c.max_body_bytes < 1024 || c.max_body_bytes > (16 << 20) {
            return Err(ConfigError::new("maxBodyBytes", c.max_body_bytes, "1024..=16777216"));
        }
        let mut metrics: Vec<MetricSpec> = Vec::new();
        for (i, m) in c.metrics.into_iter().enumerate() {
            let at = |e: ConfigError| e.at(&format!("metrics[{i}]"));
            if m.key.is_empty() || m.key.len() > 256 {
                return Err(at(ConfigError::new("key", format!("{:?}", m.key), "a non-empty key of at most 256 bytes")));
            }
            let base = match &m.name {
                Some(n) if is_metric_name(n) => n.clone(),
                Some(n) => {
                    return Err(at(ConfigError::new("name", format!("{n:?}"), "letters, digits and _, not starting with a digit")));
                }
                None => sanitize_name(&m.key),
            };
            let name = full_name(&c.prefix, &base, m.kind);
            if metrics.iter().any(|o| o.key == m.key || o.name == name) {
                return Err(at(ConfigError::new(
                    "key",
                    format!("{:?}", m.key),
                    "a key and exposed name no other metric of this endpoint uses",
                )));
            }
            let help = m.help.unwrap_or_else(|| format!("{} from the app's {} ({})", m.key, upstream_path, c.format.describe()));
            metrics.push(MetricSpec { key: m.key, kind: m.kind, name, help });
        }
        Ok(LegacySpec {
            path: c.path,
            upstream_path,
            format: c.format,
            prefix: c.prefix,
            metrics,
            unknown: c.unknown_keys,
            max_body_bytes: c.max_body_bytes as usize,
        })
    }

    /// Rewrite the app's body. Never fails: a body that cannot be parsed
    /// yields an exposition saying why, with [`PARSE_OK`] 0.
    pub fn adapt(&self, body: &[u8]) -> Adapted {
        match parse(self.format, body) {
            Ok(samples) => Adapted { text: self.render(&samples, None), parsed: true },
            Err(reason) => Adapted { text: self.render(&[], Some(&reason)), parsed: false },
        }
    }

    /// The exposition for a body over `maxBodyBytes`.
    pub fn too_large(&self, size: usize) -> Adapted {
        let reason =
            format!("the app's {} body has more than {} bytes ({size} so far); it was dropped", self.upstream_path, self.max_body_bytes);
        Adapted { text: self.render(&[], Some(&reason)), parsed: false }
    }

    fn render(&self, samples: &[(String, String)], error: Option<&str>) -> String {
        let mut out = String::new();
        let mut seen: ahash::AHashSet<String> = ahash::AHashSet::new();
        if let Some(e) = error {
            let _ = writeln!(out, "# meshpatterns metrics-adapter: {}", one_line(e));
        }
        let _ = writeln!(
            out,
            "# HELP {PARSE_OK} 1 if the app's {} body was parsed as {}, 0 if not.",
            self.upstream_path,
            self.format.describe()
        );
        let _ = writeln!(out, "# TYPE {PARSE_OK} gauge");
        let _ = writeln!(out, "{PARSE_OK} {}", if error.is_some() { 0 } else { 1 });
        seen.insert(PARSE_OK.to_string());
        for m in &self.metrics {
            if let Some((_, v)) = samples.iter().find(|(k, _)| *k == m.key) {
                if seen.insert(m.name.clone()) {
                    write_family(&mut out, &m.name, &m.help, m.kind, v);
                }
            }
        }
        if self.unknown == Unknown::Gauge {
            for (k, v) in samples {
                if self.metrics.iter().any(|m| m.key == *k) {
                    continue;
                }
                let name = full_name(&self.prefix, &sanitize_name(k), MetricType::Gauge);
                if name.len() > MAX_NAME_BYTES || !is_metric_name(&name) || !seen.insert(name.clone()) {
                    continue;
                }
                let help = format!("{k} from the app's {} ({})", self.upstream_path, self.format.describe());
                write_family(&mut out, &name, &help, MetricType::Gauge, v);
            }
        }
        out
    }
}

/// The rewritten body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapted {
    pub text: String,
    pub parsed: bool,
}

fn full_name(prefix: &str, base: &str, kind: MetricType) -> String {
    let mut n = format!("{prefix}{base}");
    if kind == MetricType::Counter && !n.ends_with("_total") {
        n.push_str("_total");
    }
    n
}

fn write_family(out: &mut String, name: &str, help: &str, kind: MetricType, value: &str) {
    let t = match kind {
        MetricType::Counter => "counter",
        MetricType::Gauge => "gauge",
    };
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {t}");
    let _ = writeln!(out, "{name} {value}");
}

fn escape_help(s: &str) -> String {
    one_line(s).replace('\\', "\\\\")
}

fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// A Prometheus metric name from an app's key: camelCase becomes snake_case,
/// every character outside `[a-z0-9_]` becomes `_`, a leading digit gets a `_`.
pub fn sanitize_name(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut prev_lower = false;
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            if prev_lower {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
            prev_lower = false;
        } else if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
            prev_lower = true;
        } else {
            out.push('_');
            prev_lower = false;
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Parse a body into `(key, value)` samples in body order; `Err` names why
/// the body is malformed. Non-numeric values are skipped, not errors.
pub fn parse(format: Format, body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8 ({e})"))?;
    match format {
        Format::Json => parse_json(text),
        Format::KeyValue => parse_key_value(text),
    }
}

fn parse_json(text: &str) -> Result<Vec<(String, String)>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("body is not valid JSON ({e})"))?;
    let serde_json::Value::Object(map) = v else {
        return Err("body is JSON but not an object".into());
    };
    let mut out = Vec::new();
    flatten("", &map, &mut out);
    Ok(out)
}

fn flatten(prefix: &str, map: &serde_json::Map<String, serde_json::Value>, out: &mut Vec<(String, String)>) {
    for (k, v) in map {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            serde_json::Value::Object(m) => flatten(&key, m, out),
            other => {
                if let Some(n) = json_number(other) {
                    out.push((key, n));
                }
            }
        }
    }
}

fn json_number(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i.to_string())
            } else if let Some(u) = n.as_u64() {
                Some(u.to_string())
            } else {
                n.as_f64().and_then(float_text)
            }
        }
        serde_json::Value::Bool(b) => Some(if *b { "1" } else { "0" }.into()),
        serde_json::Value::String(s) => number_text(s),
        _ => None,
    }
}

fn float_text(f: f64) -> Option<String> {
    meshpatterns_core::text::float(f)
}

/// A decimal number as Prometheus text, or `None` (words, `inf`, `nan`, empty).
fn number_text(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')) {
        return None;
    }
    if let Ok(i) = s.parse::<i64>() {
        return Some(i.to_string());
    }
    s.parse::<f64>().ok().and_then(float_text)
}

fn parse_key_value(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.trim_end_matches('\r').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(format!("line {} has no ':' ({:?})", i + 1, truncate(line, 40)));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("line {} has an empty key", i + 1));
        }
        if let Some(n) = number_text(v) {
            out.push((k.to_string(), n));
        } else if v.contains('=') {
            // `db0:keys=1,expires=0`: numeric sub-fields become `db0.keys`.
            for part in v.split(',') {
                if let Some((sk, sv)) = part.split_once('=') {
                    if let (false, Some(n)) = (sk.trim().is_empty(), number_text(sv)) {
                        out.push((format!("{k}.{}", sk.trim()), n));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// A request for an adapted endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Index of the endpoint in `Settings::legacy`.
    pub index: usize,
    /// The `:path` to send the app: its stats path and the client's query.
    pub path: Vec<u8>,
    /// A HEAD request (no body to rewrite is expected).
    pub head: bool,
}

/// Which legacy endpoint, if any, a request is for: a GET or HEAD whose
/// path without the query is exactly one endpoint's `path`. The stage then
/// sets `:path` to [`Route::path`], removes `accept-encoding` (the body must
/// reach the filter uncompressed) and has the route selected again.
pub fn route(specs: &[LegacySpec], method: Option<&[u8]>, path: Option<&[u8]>) -> Option<Route> {
    let head = match method? {
        b"GET" => false,
        b"HEAD" => true,
        _ => return None,
    };
    let path = path?;
    let (bare, query) = match path.iter().position(|b| *b == b'?') {
        Some(i) => {
            let (bare, rest) = path.split_at(i);
            (bare, Some(rest))
        }
        None => (path, None),
    };
    let index = specs.iter().position(|s| s.path.as_bytes() == bare)?;
    let spec = specs.get(index)?;
    let mut target = spec.upstream_path.as_bytes().to_vec();
    if let Some(q) = query {
        // `q` starts with the `?`.
        target.extend_from_slice(q);
    }
    Some(Route { index, path: target, head })
}

/// Where the rewrite of an adapted response is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Rewrite {
    /// Not rewriting (not adapted, not a 200, or done).
    #[default]
    Off,
    /// Buffering the app's body until the end of the stream.
    Buffering,
    /// The body grew past `maxBodyBytes`: the error exposition was sent, the rest is dropped.
    Dropping,
}

/// What the response headers of an adapted request mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headers {
    /// Not a 200: the app's answer goes to the scraper unchanged (Prometheus
    /// marks the target down); count an upstream error.
    PassUpstreamError,
    /// A 200: set `content-type` to [`CONTENT_TYPE`], remove
    /// `content-length` and `content-encoding`, then count a parse error if
    /// `parse_error` (a 200 without a body to a GET).
    Rewrite { parse_error: bool },
}

/// Counted outcomes of a body step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyStep {
    /// Let the chunk through as it is.
    Pass,
    /// Hold the chunk: the body is buffered until the end of the stream.
    Buffer,
    /// Replace what is buffered by this error exposition (the body is over
    /// `maxBodyBytes`); count a parse error.
    TooLarge(String),
    /// Replace the chunk by nothing (the rest of a body that was too large).
    Drop,
    /// The whole body is buffered: read it, [`LegacySpec::adapt`] it,
    /// replace it; count it rewritten or a parse error as `parsed` says.
    Adapt,
}

impl Rewrite {
    /// The response headers of an adapted request arrived (`status`: the
    /// `:status`; `end_of_stream`: no body follows).
    pub fn on_headers(&mut self, status: Option<u32>, end_of_stream: bool, head: bool) -> Headers {
        if status != Some(200) {
            *self = Rewrite::Off;
            return Headers::PassUpstreamError;
        }
        // No body (HEAD, or an empty 200): the client gets an empty
        // exposition; for a GET that is a parse error.
        *self = if end_of_stream { Rewrite::Off } else { Rewrite::Buffering };
        Headers::Rewrite { parse_error: end_of_stream && !head }
    }

    /// A body chunk arrived; `size` is everything buffered so far.
    pub fn on_body(&mut self, spec: &LegacySpec, size: usize, end_of_stream: bool) -> BodyStep {
        match *self {
            Rewrite::Off => BodyStep::Pass,
            Rewrite::Dropping => BodyStep::Drop,
            Rewrite::Buffering if size > spec.max_body_bytes => {
                *self = if end_of_stream { Rewrite::Off } else { Rewrite::Dropping };
                BodyStep::TooLarge(spec.too_large(size).text)
            }
            Rewrite::Buffering if !end_of_stream => BodyStep::Buffer,
            Rewrite::Buffering => {
                *self = Rewrite::Off;
                BodyStep::Adapt
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    fn spec(json: &str) -> LegacySpec {
        let c: LegacyConfig = meshpatterns_core::error::parse_json(json.as_bytes()).unwrap();
        LegacySpec::try_from_config(c).unwrap()
    }

    #[test]
    fn json_maps_counters_and_gauges() {
        let s = spec(
            r#"{"path":"/metrics","upstreamPath":"/stats","format":"json","prefix":"shop_",
                "metrics":[{"key":"requests","type":"counter","help":"Requests served."},
                           {"key":"queue.depth","type":"gauge"},
                           {"key":"cacheHits","type":"counter","name":"cache_hits_total"}]}"#,
        );
        let a = s.adapt(br#"{"requests": 42, "queue": {"depth": 3.5, "name": "q1"}, "cacheHits": 7, "version": "1.2", "up": true}"#);
        assert!(a.parsed);
        assert_eq!(
            a.text,
            "# HELP meshpatterns_legacy_stats_parse_ok 1 if the app's /stats body was parsed as JSON, 0 if not.\n\
             # TYPE meshpatterns_legacy_stats_parse_ok gauge\n\
             meshpatterns_legacy_stats_parse_ok 1\n\
             # HELP shop_requests_total Requests served.\n\
             # TYPE shop_requests_total counter\n\
             shop_requests_total 42\n\
             # HELP shop_queue_depth queue.depth from the app's /stats (JSON)\n\
             # TYPE shop_queue_depth gauge\n\
             shop_queue_depth 3.5\n\
             # HELP shop_cache_hits_total cacheHits from the app's /stats (JSON)\n\
             # TYPE shop_cache_hits_total counter\n\
             shop_cache_hits_total 7\n"
        );
    }

    #[test]
    fn unknown_keys_become_gauges_when_asked() {
        let s = spec(r#"{"path":"/m","format":"json","unknownKeys":"gauge","metrics":[{"key":"a","type":"counter"}]}"#);
        let a = s.adapt(br#"{"a": 1, "connectedClients": 2, "ratio": "0.25", "name": "x", "nested": {"b-c": false}, "list": [1], "big": 18446744073709551615}"#);
        assert!(a.text.contains("\na_total 1\n"), "{}", a.text);
        assert!(a.text.contains("# TYPE connected_clients gauge\nconnected_clients 2\n"), "{}", a.text);
        assert!(a.text.contains("\nratio 0.25\n"));
        assert!(a.text.contains("\nnested_b_c 0\n"));
        assert!(a.text.contains("\nbig 18446744073709551615\n"));
        assert!(!a.text.contains("name") && !a.text.contains("list"));
    }

    #[test]
    fn redis_info_style_key_values() {
        let s = spec(
            r#"{"path":"/metrics","format":"keyValue","prefix":"redis_","unknownKeys":"gauge",
                "metrics":[{"key":"total_connections_received","type":"counter"},{"key":"connected_clients","type":"gauge"}]}"#,
        );
        let body = "# Server\r\nredis_version:7.0.15\r\nuptime_in_seconds:120\r\n\r\n# Clients\r\nconnected_clients:3\r\n\
                    # Stats\r\ntotal_connections_received:99\r\n# Keyspace\r\ndb0:keys=5,expires=1,avg_ttl=0\r\n";
        let a = s.adapt(body.as_bytes());
        assert!(a.parsed);
        let families: Vec<&str> = a.text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            families,
            [
                "meshpatterns_legacy_stats_parse_ok 1",
                "redis_total_connections_received_total 99",
                "redis_connected_clients 3",
                "redis_uptime_in_seconds 120",
                "redis_db0_keys 5",
                "redis_db0_expires 1",
                "redis_db0_avg_ttl 0"
            ]
        );
    }

    #[test]
    fn malformed_bodies_give_a_valid_exposition_saying_why() {
        let s = spec(r#"{"path":"/m","upstreamPath":"/stats","format":"json","metrics":[{"key":"a","type":"counter"}]}"#);
        for body in [&b"{not json"[..], b"[1,2]", b"", b"\xff\xfe"] {
            let a = s.adapt(body);
            assert!(!a.parsed);
            assert!(a.text.starts_with("# meshpatterns metrics-adapter: "), "{}", a.text);
            assert!(a.text.ends_with("meshpatterns_legacy_stats_parse_ok 0\n"), "{}", a.text);
            assert_eq!(a.text.lines().count(), 4, "{}", a.text);
        }
        let kv = spec(r#"{"path":"/m","format":"keyValue"}"#);
        let a = kv.adapt(b"a:1\nthis line is broken\n");
        assert!(a.text.contains("line 2 has no ':'"), "{}", a.text);
        let a = kv.adapt(b":1\n");
        assert!(a.text.contains("line 1 has an empty key"), "{}", a.text);
        let t = kv.too_large(2_000_000);
        assert!(!t.parsed && t.text.contains("more than 524288 bytes"));
    }

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize_name("connectedClients"), "connected_clients");
        assert_eq!(sanitize_name("HTTPServer"), "httpserver");
        assert_eq!(sanitize_name("queue.depth-max"), "queue_depth_max");
        assert_eq!(sanitize_name("0day"), "_0day");
        assert_eq!(sanitize_name("a:b"), "a_b");
        assert_eq!(sanitize_name("ü"), "_");
        assert!(is_metric_name("_a1") && !is_metric_name("1a") && !is_metric_name("a:b") && !is_metric_name(""));
    }

    #[test]
    fn duplicate_names_after_sanitising_are_emitted_once() {
        let s = spec(r#"{"path":"/m","format":"json","unknownKeys":"gauge"}"#);
        let a = s.adapt(br#"{"a.b": 1, "a_b": 2}"#);
        assert_eq!(a.text.matches("# TYPE a_b gauge").count(), 1, "{}", a.text);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let cases = [
            (r#"{"path":"/m","format":"json","prefix":"1x"}"#, "prefix"),
            (r#"{"path":"/m","upstreamPath":"stats","format":"json"}"#, "upstreamPath"),
            (r#"{"path":"/m","format":"json","maxBodyBytes":10}"#, "maxBodyBytes"),
            (r#"{"path":"/m","format":"json","metrics":[{"key":"","type":"gauge"}]}"#, "metrics[0].key"),
            (r#"{"path":"/m","format":"json","metrics":[{"key":"a","type":"gauge","name":"a:b"}]}"#, "metrics[0].name"),
            (r#"{"path":"/m","format":"json","metrics":[{"key":"a","type":"gauge"},{"key":"a","type":"counter"}]}"#, "metrics[1].key"),
        ];
        for (json, field) in cases {
            let c: LegacyConfig = meshpatterns_core::error::parse_json(json.as_bytes()).unwrap();
            let e = LegacySpec::try_from_config(c).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn only_get_and_head_on_an_exact_path_are_adapted() {
        let specs = vec![
            spec(r#"{"path":"/metrics","upstreamPath":"/stats","format":"json"}"#),
            spec(r#"{"path":"/metrics/info","upstreamPath":"/info","format":"keyValue"}"#),
        ];
        let r = |m: &str, p: &[u8]| route(&specs, Some(m.as_bytes()), Some(p));
        assert_eq!(r("GET", b"/metrics"), Some(Route { index: 0, path: b"/stats".to_vec(), head: false }));
        assert_eq!(r("HEAD", b"/metrics?debug=1&x=\xff"), Some(Route { index: 0, path: b"/stats?debug=1&x=\xff".to_vec(), head: true }));
        assert_eq!(r("GET", b"/metrics/info?"), Some(Route { index: 1, path: b"/info?".to_vec(), head: false }));
        for (m, p) in [
            ("POST", &b"/metrics"[..]),
            ("get", b"/metrics"),
            ("GET", b"/metrics/"),
            ("GET", b"/Metrics"),
            ("GET", b"/stats"),
            ("GET", b""),
        ] {
            assert_eq!(r(m, p), None, "{m} {p:?}");
        }
        assert_eq!(route(&specs, None, Some(b"/metrics")), None);
        assert_eq!(route(&specs, Some(b"GET"), None), None);
        assert_eq!(route(&[], Some(b"GET"), Some(b"/metrics")), None);
    }

    #[test]
    fn response_headers_decide_the_rewrite() {
        let mut w = Rewrite::Off;
        assert_eq!(w.on_headers(Some(503), false, false), Headers::PassUpstreamError);
        assert_eq!(w, Rewrite::Off);
        assert_eq!(w.on_headers(None, false, false), Headers::PassUpstreamError);
        assert_eq!(w.on_headers(Some(200), false, false), Headers::Rewrite { parse_error: false });
        assert_eq!(w, Rewrite::Buffering);
        let mut w = Rewrite::Off;
        assert_eq!(w.on_headers(Some(200), true, false), Headers::Rewrite { parse_error: true }, "an empty 200 to a GET");
        assert_eq!(w, Rewrite::Off);
        assert_eq!(w.on_headers(Some(200), true, true), Headers::Rewrite { parse_error: false }, "HEAD has no body");
    }

    #[test]
    fn body_is_buffered_then_adapted_or_cut_at_the_limit() {
        let s = spec(r#"{"path":"/m","upstreamPath":"/stats","format":"json","maxBodyBytes":1024}"#);
        let mut w = Rewrite::Buffering;
        assert_eq!(w.on_body(&s, 100, false), BodyStep::Buffer);
        assert_eq!(w.on_body(&s, 1024, false), BodyStep::Buffer);
        assert_eq!(w.on_body(&s, 1024, true), BodyStep::Adapt);
        assert_eq!(w, Rewrite::Off);
        assert_eq!(w.on_body(&s, 10, true), BodyStep::Pass);
        // Over the limit mid-stream: the error exposition, then every later chunk dropped.
        let mut w = Rewrite::Buffering;
        let BodyStep::TooLarge(text) = w.on_body(&s, 1025, false) else { panic!("expected TooLarge") };
        assert!(text.contains("more than 1024 bytes (1025 so far)"), "{text}");
        assert_eq!(w, Rewrite::Dropping);
        assert_eq!(w.on_body(&s, 4000, false), BodyStep::Drop);
        assert_eq!(w.on_body(&s, 10, true), BodyStep::Drop);
        // Over the limit in the last chunk: the error exposition, done.
        let mut w = Rewrite::Buffering;
        assert!(matches!(w.on_body(&s, 2000, true), BodyStep::TooLarge(_)));
        assert_eq!(w, Rewrite::Off);
    }
}
