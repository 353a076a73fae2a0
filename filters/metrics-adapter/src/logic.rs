//! The adapter's decisions, free of proxy-wasm: the validated config, which
//! labels a request's RED metrics carry, how labels are encoded into an Envoy
//! stat name (the proxy-wasm ABI has no labels), the `stats_tags` regexes that
//! turn them back into Prometheus labels, and each label's value for a
//! request. Which values of a capped label are admitted lives in
//! [`crate::admission`].

use std::borrow::Cow;

use meshpatterns_core::error::ConfigError;
use meshpatterns_core::{names, RequestView};
use serde::Deserialize;

use crate::legacy::{LegacyConfig, LegacySpec};

/// Prefix of every RED metric: `meshpatterns_http_<metric>{label="value",...}`
/// in `/stats/prometheus` (see [`stat_name`] for the name in `/stats`).
pub const RED_PREFIX: &str = "meshpatterns_http";
/// Counter: every request that finished (one per stream, counted when the stream ends).
pub const REQUESTS: &str = "requests_total";
/// Counter: requests answered 5xx or not answered at all (reset, timeout before headers).
pub const ERRORS: &str = "errors_total";
/// Histogram: request duration in milliseconds (Envoy's default buckets, 0.5 ms .. 1 h).
pub const DURATION: &str = "request_duration_milliseconds";

/// Longest label value kept (bytes after sanitising); longer ones are cut.
pub const MAX_LABEL_VALUE_BYTES: usize = 64;
/// Value of a label whose value did not fit under the cardinality cap.
pub const OVERFLOW: &str = "other";
/// Value of a label with no value (no route matched, header absent, no response).
pub const NONE: &str = "none";
/// Upper bound on any label's `maxValues`.
pub const MAX_VALUES_LIMIT: u32 = 1000;
/// Most `headerLabels` a config may list.
pub const MAX_HEADER_LABELS: usize = 8;

/// The plugin configuration as written in JSON (Envoy or Istio pluginConfig).
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Which of `route` and `cluster` label the RED metrics.
    #[serde(default = "default_label_by")]
    pub label_by: Vec<Dimension>,
    /// Cap on distinct `route` and `cluster` values (the cluster can come from a header).
    #[serde(default = "default_max_route_values")]
    pub max_route_values: u32,
    /// Extra labels taken from request headers.
    #[serde(default)]
    pub header_labels: Vec<HeaderLabelConfig>,
    /// Legacy stats endpoints to rewrite into Prometheus text.
    #[serde(default)]
    pub legacy_stats: Vec<LegacyConfig>,
}

fn default_label_by() -> Vec<Dimension> {
    vec![Dimension::Route, Dimension::Cluster]
}

fn default_max_route_values() -> u32 {
    200
}

/// Route or cluster, from the `xds.route_name` / `xds.cluster_name` properties.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Dimension {
    Route,
    Cluster,
}

impl Dimension {
    pub fn label(self) -> &'static str {
        match self {
            Dimension::Route => "route",
            Dimension::Cluster => "cluster",
        }
    }
    /// The Envoy property holding the value.
    pub fn property(self) -> [&'static str; 2] {
        match self {
            Dimension::Route => ["xds", "route_name"],
            Dimension::Cluster => ["xds", "cluster_name"],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderLabelConfig {
    /// Request header to read.
    pub header: String,
    /// Prometheus label name (default: the header name with `-` turned into `_`).
    #[serde(default)]
    pub label: Option<String>,
    /// Distinct values kept; later values are reported as `other`.
    #[serde(default = "default_max_values")]
    pub max_values: u32,
}

fn default_max_values() -> u32 {
    10
}

/// One label and its cardinality cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSpec {
    pub name: String,
    pub max_values: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderLabel {
    pub header: String,
    pub label: LabelSpec,
}

/// The validated runtime form of [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub dimensions: Vec<Dimension>,
    pub max_route_values: u32,
    pub header_labels: Vec<HeaderLabel>,
    pub legacy: Vec<LegacySpec>,
}

/// Label names the filter itself uses.
const BUILTIN_LABELS: &[&str] = &["route", "cluster", "method", "status_class"];

impl Settings {
    pub fn try_from_config(c: Config) -> Result<Settings, ConfigError> {
        let mut dimensions = Vec::new();
        for d in c.label_by {
            if dimensions.contains(&d) {
                return Err(ConfigError::new("labelBy", format!("{:?}", d.label()), "each of \"route\" and \"cluster\" at most once"));
            }
            dimensions.push(d);
        }
        check_max("maxRouteValues", c.max_route_values)?;
        if c.header_labels.len() > MAX_HEADER_LABELS {
            return Err(ConfigError::new(
                "headerLabels",
                format!("{} entries", c.header_labels.len()),
                format!("at most {MAX_HEADER_LABELS} header labels"),
            ));
        }
        let mut header_labels: Vec<HeaderLabel> = Vec::new();
        for (i, h) in c.header_labels.iter().enumerate() {
            let at = |e: ConfigError| e.at(&format!("headerLabels[{i}]"));
            let header = names::header_name("header", &h.header).map_err(at)?;
            let name = match &h.label {
                Some(l) => l.clone(),
                None => header.replace('-', "_"),
            };
            if !is_label_name(&name) {
                return Err(at(ConfigError::new(
                    "label",
                    format!("{name:?}"),
                    "a Prometheus label name: lowercase letters, digits and _, starting with a letter, at most 40 bytes",
                )));
            }
            if BUILTIN_LABELS.contains(&name.as_str()) || header_labels.iter().any(|l| l.label.name == name) {
                return Err(at(ConfigError::new(
                    "label",
                    format!("{name:?}"),
                    "a label name not used by another header label nor by the filter (route, cluster, method, status_class)",
                )));
            }
            check_max("maxValues", h.max_values).map_err(at)?;
            header_labels.push(HeaderLabel { header, label: LabelSpec { name, max_values: h.max_values } });
        }
        // An unanchored tag regex for `tenant` would also match inside
        // `x_tenant=.=...`: no label name may end with another one.
        let all: Vec<String> =
            BUILTIN_LABELS.iter().map(|l| l.to_string()).chain(header_labels.iter().map(|h| h.label.name.clone())).collect();
        for (i, h) in header_labels.iter().enumerate() {
            if let Some(other) = all.iter().find(|o| **o != h.label.name && h.label.name.ends_with(o.as_str())) {
                return Err(ConfigError::new(
                    format!("headerLabels[{i}].label"),
                    format!("{:?}", h.label.name),
                    format!("a label name that does not end with another label's name ({other:?})"),
                ));
            }
        }
        let mut legacy: Vec<LegacySpec> = Vec::new();
        for (i, l) in c.legacy_stats.into_iter().enumerate() {
            let spec = LegacySpec::try_from_config(l).map_err(|e| e.at(&format!("legacyStats[{i}]")))?;
            if legacy.iter().any(|o| o.path == spec.path) {
                return Err(ConfigError::new(
                    format!("legacyStats[{i}].path"),
                    format!("{:?}", spec.path),
                    "a path no other legacyStats entry uses",
                ));
            }
            legacy.push(spec);
        }
        Ok(Settings { dimensions, max_route_values: c.max_route_values, header_labels, legacy })
    }

    /// Every label, in the order it is encoded into stat names.
    pub fn labels(&self) -> Vec<LabelSpec> {
        let mut out: Vec<LabelSpec> =
            self.dimensions.iter().map(|d| LabelSpec { name: d.label().into(), max_values: self.max_route_values }).collect();
        // Bounded by construction: 9 methods, 5 classes (+ other, none).
        out.push(LabelSpec { name: "method".into(), max_values: METHODS.len() as u32 });
        out.push(LabelSpec { name: "status_class".into(), max_values: 5 });
        out.extend(self.header_labels.iter().map(|h| h.label.clone()));
        out
    }

    /// Most distinct label sets the RED metrics can reach: the product of each
    /// label's cap (+1 for `other`, +1 for `none`); each set is 3 series
    /// (requests, errors, duration histogram).
    pub fn max_label_sets(&self) -> u64 {
        self.labels().iter().map(|l| u64::from(l.max_values) + 2).fold(1u64, |a, b| a.saturating_mul(b))
    }
}

fn check_max(field: &str, n: u32) -> Result<(), ConfigError> {
    if n == 0 || n > MAX_VALUES_LIMIT {
        return Err(ConfigError::new(field, n, format!("1..={MAX_VALUES_LIMIT}")));
    }
    Ok(())
}

/// `[a-z][a-z0-9_]*`, at most 40 bytes.
pub fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase())
        && s.len() <= 40
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

/// Methods reported as themselves; anything else is `other`.
pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// The `method` label.
pub fn method_label(method: Option<&str>) -> &'static str {
    match method {
        None => NONE,
        Some(m) => METHODS.iter().find(|k| **k == m).copied().unwrap_or(OVERFLOW),
    }
}

/// The `status_class` label: `1xx` .. `5xx`, `none` when no response was sent.
pub fn status_class(code: Option<u64>) -> &'static str {
    match code {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(0) | None => NONE,
        Some(_) => OVERFLOW,
    }
}

/// Is this outcome an error? 5xx, or no response at all.
pub fn is_error(code: Option<u64>) -> bool {
    matches!(code, Some(500..=599) | Some(0) | None)
}

/// A label value safe inside an Envoy stat name and its tag regex: ASCII
/// letters, digits, `_` and `-` kept, every other byte becomes `_`; cut to
/// [`MAX_LABEL_VALUE_BYTES`]; empty becomes `none`.
pub fn sanitize_value(raw: &str) -> String {
    sanitize_cow(raw).into_owned()
}

/// [`sanitize_value`], borrowing `raw` when it is already clean (most
/// values are): no copy, no per-character pushes.
pub fn sanitize_cow(raw: &str) -> Cow<'_, str> {
    let keep = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    if !raw.is_empty() && raw.len() <= MAX_LABEL_VALUE_BYTES && raw.bytes().all(keep) {
        return Cow::Borrowed(raw);
    }
    let out: String = raw
        .bytes()
        .take(MAX_LABEL_VALUE_BYTES)
        .map(|b| if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' { b as char } else { '_' })
        .collect();
    if out.is_empty() {
        Cow::Borrowed(NONE)
    } else {
        Cow::Owned(out)
    }
}

/// [`sanitize_value`] of a header value as sent, bad UTF-8 bytes replaced
/// first (borrowed, not copied, when there are none).
pub fn sanitize_bytes(raw: &[u8]) -> String {
    sanitize_value(&String::from_utf8_lossy(raw))
}

/// The Envoy stat name for `metric` with these label values (already
/// sanitised and admitted), in the order of [`Settings::labels`]. Labels come
/// first as `name=.=value;.;`, the metric name last, the encoding Istio's own
/// stats use, so Istio's `extraStatTags` regexes extract them too:
/// `route=.=app;.;method=.=GET;.;status_class=.=2xx;.;meshpatterns_http_requests_total`.
/// Once every label is cut out, `meshpatterns_http_requests_total` is left.
pub fn stat_name(metric: &str, labels: &[(&str, &str)]) -> String {
    let mut s = String::with_capacity(64 + labels.len() * 24);
    for (k, v) in labels {
        s.push_str(k);
        s.push_str("=.=");
        s.push_str(v);
        s.push_str(";.;");
    }
    s.push_str(RED_PREFIX);
    s.push('_');
    s.push_str(metric);
    s
}

/// One `stats_config.stats_tags` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsTag {
    pub tag_name: String,
    pub regex: String,
}

/// The `stats_tags` that turn the encoded labels back into Prometheus
/// labels: `(route=\.=(.*?);\.;)`, exactly what Istio generates for a tag
/// listed in `extraStatTags`. Envoy matches each against the full stat name
/// (wasm metrics live under `wasmcustom.`); the first group is cut from the
/// name, the second is the label value.
pub fn stats_tags(s: &Settings) -> Vec<StatsTag> {
    s.labels().into_iter().map(|l| StatsTag { regex: format!(r"({}=\.=(.*?);\.;)", l.name), tag_name: l.name }).collect()
}

/// The label values known when the request arrives; the rest (route,
/// cluster, status class) are read when the stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLabels {
    pub method: &'static str,
    /// Sanitised header-label values, in `Settings::header_labels` order.
    pub headers: Vec<String>,
}

impl Default for RequestLabels {
    fn default() -> Self {
        RequestLabels { method: NONE, headers: Vec::new() }
    }
}

impl RequestLabels {
    /// Read from the request as this stage sees it (in a pipeline, with the
    /// headers earlier stages wrote). Header values that are not UTF-8 have
    /// their bad bytes replaced before sanitising.
    pub fn of(s: &Settings, req: &dyn RequestView) -> RequestLabels {
        let method = method_label(req.method().as_deref());
        let headers = s
            .header_labels
            .iter()
            .map(|h| req.header_bytes(&h.header).map(|v| sanitize_bytes(&v)).unwrap_or_else(|| NONE.into()))
            .collect();
        RequestLabels { method, headers }
    }

    /// Every label value of the request in [`Settings::labels`] order:
    /// `dimensions` are the `labelBy` properties as read (`None`: absent),
    /// `code` the response code the client got (`None` or 0: no response).
    /// Every label value, in the order of [`Settings::labels`], borrowed
    /// where it can be (a request allocates only the list).
    pub fn values<'a>(&'a self, dimensions: &'a [Option<String>], code: Option<u64>) -> Vec<Cow<'a, str>> {
        let mut out = Vec::with_capacity(dimensions.len() + 2 + self.headers.len());
        out.extend(dimensions.iter().map(|d| dimension_value(d.as_deref().map(str::as_bytes))));
        out.extend(self.after_dimensions(code).map(Cow::Borrowed));
        out
    }

    /// The values after the dimensions' ([`values`](Self::values) less its
    /// first `dimensions.len()`): method, status class, header labels.
    pub fn after_dimensions(&self, code: Option<u64>) -> impl Iterator<Item = &str> {
        [self.method, status_class(code)].into_iter().chain(self.headers.iter().map(String::as_str))
    }
}

/// A `labelBy` dimension's label value from its property as read: sanitised,
/// `none` when absent or not UTF-8.
pub fn dimension_value(raw: Option<&[u8]>) -> Cow<'_, str> {
    raw.and_then(|r| std::str::from_utf8(r).ok()).map_or(Cow::Borrowed(NONE), sanitize_cow)
}

/// The request's duration in whole milliseconds, as the histogram records
/// it, from two readings of the host clock (nanoseconds): when the request
/// reached the filter and when the stream ended. `None` when a reading is
/// missing (0); a clock that stepped back gives 0.
pub fn elapsed_ms(start_ns: u64, end_ns: u64) -> Option<u64> {
    (start_ns > 0 && end_ns > 0).then(|| end_ns.saturating_sub(start_ns) / 1_000_000)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    fn settings(json: &str) -> Result<Settings, ConfigError> {
        let c: Config = meshpatterns_core::error::parse_json(json.as_bytes())?;
        Settings::try_from_config(c)
    }

    #[test]
    fn defaults_label_by_route_and_cluster() {
        let s = settings("{}").unwrap();
        let names: Vec<String> = s.labels().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["route", "cluster", "method", "status_class"]);
        assert_eq!(s.max_route_values, 200);
    }

    #[test]
    fn header_labels_are_named_and_capped() {
        let s =
            settings(r#"{"labelBy":["route"],"headerLabels":[{"header":"X-Tenant","maxValues":3},{"header":"x-plan","label":"plan"}]}"#)
                .unwrap();
        assert_eq!(
            s.header_labels[0],
            HeaderLabel { header: "x-tenant".into(), label: LabelSpec { name: "x_tenant".into(), max_values: 3 } }
        );
        assert_eq!(s.header_labels[1].label, LabelSpec { name: "plan".into(), max_values: 10 });
        // route 200+2, method 9+2, status 5+2, x_tenant 3+2, plan 10+2
        assert_eq!(s.max_label_sets(), 202 * 11 * 7 * 5 * 12);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let cases = [
            (r#"{"labelBy":["route","route"]}"#, "labelBy"),
            (r#"{"maxRouteValues":0}"#, "maxRouteValues"),
            (r#"{"headerLabels":[{"header":"bad header"}]}"#, "headerLabels[0].header"),
            (r#"{"headerLabels":[{"header":"x-a","label":"Tenant"}]}"#, "headerLabels[0].label"),
            (r#"{"headerLabels":[{"header":"x-a","label":"method"}]}"#, "headerLabels[0].label"),
            (r#"{"headerLabels":[{"header":"x-a","label":"t"},{"header":"x-b","label":"t"}]}"#, "headerLabels[1].label"),
            (r#"{"headerLabels":[{"header":"x-a","maxValues":1001}]}"#, "headerLabels[0].maxValues"),
            (r#"{"headerLabels":[{"header":"x-a","label":"x_method"}]}"#, "headerLabels[0].label"),
            (r#"{"headerLabels":[{"header":"x-a","label":"tenant"},{"header":"x-b","label":"x_tenant"}]}"#, "headerLabels[1].label"),
            (r#"{"legacyStats":[{"path":"metrics","format":"json"}]}"#, "legacyStats[0].path"),
            (r#"{"legacyStats":[{"path":"/m","format":"json"},{"path":"/m","format":"keyValue"}]}"#, "legacyStats[1].path"),
        ];
        for (json, field) in cases {
            let e = settings(json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let e = settings(r#"{"labelBy":["host"]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `host`"), "{e}");
        let e = settings(r#"{"headerLabel":[]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `headerLabel`"), "{e}");
    }

    #[test]
    fn labels_are_bounded_and_safe() {
        assert_eq!(method_label(Some("GET")), "GET");
        assert_eq!(method_label(Some("get")), "other");
        assert_eq!(method_label(Some("BREW")), "other");
        assert_eq!(status_class(Some(204)), "2xx");
        assert_eq!(status_class(Some(503)), "5xx");
        assert_eq!(status_class(Some(0)), "none");
        assert_eq!(status_class(Some(999)), "other");
        assert!(is_error(Some(503)) && is_error(None) && !is_error(Some(404)));
        assert_eq!(sanitize_value("outbound|9080||reviews.default.svc"), "outbound_9080__reviews_default_svc");
        assert_eq!(sanitize_value("acme-1_x"), "acme-1_x");
        assert_eq!(sanitize_value(""), "none");
        assert_eq!(sanitize_value("a.b=c\nd"), "a_b_c_d");
        assert_eq!(sanitize_value(&"é".repeat(100)).len(), MAX_LABEL_VALUE_BYTES);
    }

    #[test]
    fn stat_names_and_tags_agree() {
        let s = settings(r#"{"headerLabels":[{"header":"x-tenant","label":"tenant"}]}"#).unwrap();
        let name =
            stat_name(REQUESTS, &[("route", "app"), ("cluster", "app"), ("method", "GET"), ("status_class", "2xx"), ("tenant", "t-1")]);
        assert_eq!(
            name,
            "route=.=app;.;cluster=.=app;.;method=.=GET;.;status_class=.=2xx;.;tenant=.=t-1;.;meshpatterns_http_requests_total"
        );
        let tags = stats_tags(&s);
        assert_eq!(tags.len(), 5);
        assert_eq!(tags[0], StatsTag { tag_name: "route".into(), regex: r"(route=\.=(.*?);\.;)".into() });
        assert_eq!(tags[4].regex, r"(tenant=\.=(.*?);\.;)");
    }

    #[test]
    fn sanitize_bytes_is_sanitize_value_of_the_lossy_text() {
        let long = "a".repeat(MAX_LABEL_VALUE_BYTES + 3);
        for raw in [&b"checkout-v2_A"[..], b"", b"caf\xc3\xa9", b"caf\xe9", b"\xff\xfe", b"a b", b"x.y/z", long.as_bytes()] {
            assert_eq!(sanitize_bytes(raw), sanitize_value(&String::from_utf8_lossy(raw)), "{raw:?}");
        }
    }

    #[test]
    fn request_labels_in_label_order() {
        use meshpatterns_core::key::StaticRequest;
        let s = settings(r#"{"labelBy":["cluster","route"],"headerLabels":[{"header":"x-tenant","label":"tenant"},{"header":"x-plan"}]}"#)
            .unwrap();
        let req = StaticRequest::new("/a").with("x-tenant", "Acme Corp.eu");
        let l = RequestLabels::of(&s, &req);
        assert_eq!(l, RequestLabels { method: "GET", headers: vec!["Acme_Corp_eu".into(), "none".into()] });
        let raw = StaticRequest::new("/a").with_bytes("x-tenant", b"\xff\xfeacme");
        assert_eq!(RequestLabels::of(&s, &raw).headers[0], "______acme", "U+FFFD is 3 bytes, each one _");
        let dims = [Some("outbound|80||app".into()), None];
        let values = l.values(&dims, Some(429));
        assert_eq!(values, ["outbound_80__app", "none", "GET", "4xx", "Acme_Corp_eu", "none"]);
        let names: Vec<String> = s.labels().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["cluster", "route", "method", "status_class", "tenant", "x_plan"]);
        // No response at all (a reset): status_class none.
        assert_eq!(RequestLabels::default().values(&[], None), ["none", "none"]);
        // a dimension absent, empty or not UTF-8 is `none`
        assert_eq!([dimension_value(None), dimension_value(Some(b"")), dimension_value(Some(b"r\xff"))], ["none"; 3]);
        assert_eq!(l.after_dimensions(Some(200)).collect::<Vec<_>>(), ["GET", "2xx", "Acme_Corp_eu", "none"]);
        assert_eq!(elapsed_ms(1_000_000_000, 1_002_999_999), Some(2));
        assert_eq!((elapsed_ms(0, 5), elapsed_ms(5, 0), elapsed_ms(9_000_000, 1)), (None, None, Some(0)));
    }
}
