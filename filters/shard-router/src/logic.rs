//! The shard decision, free of proxy-wasm: which key a request carries, which
//! shard owns it under the current (and, while resharding, the previous) shard
//! map, and what to answer when there is no usable key or the shard is down.

use std::time::Duration;

use meshpatterns_core::error::ConfigError;
use meshpatterns_core::hash::hash64;
use meshpatterns_core::key::{KeySourceConfig, KeySpec};
use meshpatterns_core::place::{Member, Ring};
use meshpatterns_core::{names, KeySource, RequestView};
use regex_lite::Regex;
use serde::Deserialize;

/// Default request header the filter writes and Envoy's `cluster_header` reads.
pub const DEFAULT_SHARD_HEADER: &str = "x-shard-cluster";
/// Most shards one map may name.
pub const MAX_SHARDS: usize = 256;
/// Most ranges one map may list.
pub const MAX_RANGES: usize = 1024;
/// Longest shard name (it also appears in metric names).
pub const MAX_SHARD_NAME: usize = 64;
/// Longest cluster name or map version.
pub const MAX_VALUE_LEN: usize = 256;
/// Upper bound for `fallbackTimeoutMs`.
pub const MAX_FALLBACK_TIMEOUT_MS: u32 = 60_000;

/// The plugin configuration as written in JSON (Envoy or Istio pluginConfig).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Where the shard key comes from, tried in order.
    #[serde(default)]
    pub key_sources: Vec<KeySourceConfig>,
    /// A regular expression the whole key must match to be valid.
    #[serde(default)]
    pub key_pattern: Option<String>,
    /// Request header that receives the owning shard's cluster.
    #[serde(default = "default_shard_header")]
    pub shard_header: String,
    /// Response header that receives the name of the shard that served.
    #[serde(default)]
    pub response_header: Option<String>,
    /// Shard for requests without a valid key; without it they get a 400.
    #[serde(default)]
    pub default_shard: Option<String>,
    /// The shard map in force.
    pub shard_map: ShardMapConfig,
    /// While resharding: the map being replaced.
    #[serde(default)]
    pub previous_shard_map: Option<ShardMapConfig>,
    /// Responses from the new owner that send a moved key's read to its old owner.
    #[serde(default = "default_fallback_statuses")]
    pub fallback_statuses: Vec<u16>,
    /// Timeout of the call to the old owner.
    #[serde(default = "default_fallback_timeout_ms")]
    pub fallback_timeout_ms: u32,
}

fn default_shard_header() -> String {
    DEFAULT_SHARD_HEADER.into()
}
fn default_fallback_statuses() -> Vec<u16> {
    vec![404]
}
fn default_fallback_timeout_ms() -> u32 {
    5000
}
fn one() -> u32 {
    1
}
fn default_version() -> String {
    "1".into()
}

/// One shard map as written.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardMapConfig {
    /// A label for this map, recorded with every decision.
    #[serde(default = "default_version")]
    pub version: String,
    pub shards: Vec<ShardConfig>,
    /// Range placement for ordered keys; without it keys are hashed onto a ring.
    #[serde(default)]
    pub ranges: Option<Vec<RangeConfig>>,
    /// How range bounds and keys compare.
    #[serde(default)]
    pub key_order: KeyOrder,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardConfig {
    pub name: String,
    /// Value written into the shard header (the Envoy cluster); defaults to `name`.
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default = "one")]
    pub weight: u32,
    /// Envoy cluster for the resharding fallback call; defaults to `cluster`.
    #[serde(default)]
    pub dispatch_cluster: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RangeConfig {
    pub shard: String,
    /// Keys strictly below this bound (and at or above the previous one) go to `shard`.
    /// Omitted on the last range: it takes every key from the previous bound up.
    #[serde(default)]
    pub below: Option<Bound>,
}

/// A range bound as written: a string, or (for numeric keys) a number.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum Bound {
    Number(u64),
    Text(String),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Number(n) => write!(f, "{n}"),
            Bound::Text(s) => write!(f, "{s:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum KeyOrder {
    /// Byte-wise lexicographic order of the UTF-8 key.
    #[default]
    Bytes,
    /// Keys are unsigned decimal integers (up to 2^64 - 1), compared as numbers.
    Numeric,
}

/// A shard of a validated map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub name: String,
    /// What the shard header carries.
    pub cluster: String,
    /// The Envoy cluster a fallback call is dispatched to.
    pub dispatch_cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum RangeKey {
    Bytes(Vec<u8>),
    Number(u64),
}

#[derive(Debug, Clone)]
enum Placement {
    Hash(Ring),
    /// Upper bounds (exclusive) with the shard below each, ascending, then the
    /// shard for keys at or above the last bound (if any).
    Range {
        order: KeyOrder,
        bounds: Vec<(RangeKey, usize)>,
        tail: Option<usize>,
    },
}

/// A validated shard map.
#[derive(Debug, Clone)]
pub struct ShardMap {
    pub version: String,
    pub shards: Vec<Shard>,
    placement: Placement,
}

/// Why a request has no usable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    Missing,
    PatternMismatch,
    NotNumeric,
    OutOfRange,
}

impl KeyProblem {
    /// Short label for filter state and logs.
    pub fn label(self) -> &'static str {
        match self {
            KeyProblem::Missing => "missing",
            KeyProblem::PatternMismatch => "invalid:pattern",
            KeyProblem::NotNumeric => "invalid:not_numeric",
            KeyProblem::OutOfRange => "invalid:out_of_range",
        }
    }
}

fn valid_shard_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= MAX_SHARD_NAME && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A header value we can write: visible ASCII, no spaces.
fn valid_header_token(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_VALUE_LEN && v.bytes().all(|b| (0x21..0x7f).contains(&b))
}

impl ShardMap {
    /// Validate a map; errors are reported under `field` (`shardMap`, `previousShardMap`).
    pub fn try_from_config(field: &str, c: &ShardMapConfig) -> Result<ShardMap, ConfigError> {
        Self::compile(c).map_err(|e| e.at(field))
    }

    fn compile(c: &ShardMapConfig) -> Result<ShardMap, ConfigError> {
        if !valid_header_token(&c.version) {
            return Err(ConfigError::new("version", format!("{:?}", c.version), "1 to 256 visible ASCII characters without spaces"));
        }
        if c.shards.is_empty() || c.shards.len() > MAX_SHARDS {
            return Err(ConfigError::new("shards", format!("{} shards", c.shards.len()), format!("1..={MAX_SHARDS} shards")));
        }
        let mut shards = Vec::with_capacity(c.shards.len());
        for (i, s) in c.shards.iter().enumerate() {
            if !valid_shard_name(&s.name) {
                return Err(ConfigError::new(
                    format!("shards[{i}].name"),
                    format!("{:?}", s.name),
                    format!("1 to {MAX_SHARD_NAME} characters from A-Z a-z 0-9 - _ ."),
                ));
            }
            if c.shards.iter().take(i).any(|o| o.name == s.name) {
                return Err(ConfigError::new(
                    format!("shards[{i}].name"),
                    format!("{:?}", s.name),
                    "a name no other shard of this map uses",
                ));
            }
            let cluster = s.cluster.clone().unwrap_or_else(|| s.name.clone());
            if !valid_header_token(&cluster) {
                return Err(ConfigError::new(
                    format!("shards[{i}].cluster"),
                    format!("{cluster:?}"),
                    "an Envoy cluster name of 1 to 256 visible ASCII characters without spaces",
                ));
            }
            let dispatch_cluster = s.dispatch_cluster.clone().unwrap_or_else(|| cluster.clone());
            if !valid_header_token(&dispatch_cluster) {
                return Err(ConfigError::new(
                    format!("shards[{i}].dispatchCluster"),
                    format!("{dispatch_cluster:?}"),
                    "an Envoy cluster name of 1 to 256 visible ASCII characters without spaces",
                ));
            }
            shards.push(Shard { name: s.name.clone(), cluster, dispatch_cluster });
        }
        let placement = match &c.ranges {
            None => {
                let members: Vec<Member> = c.shards.iter().map(|s| Member { name: s.name.clone(), weight: s.weight }).collect();
                Placement::Hash(Ring::try_new(&members).map_err(|e| e.at("shards"))?)
            }
            Some(ranges) => compile_ranges(c, ranges)?,
        };
        Ok(ShardMap { version: c.version.clone(), shards, placement })
    }

    /// The shard owning `key`, or why the key cannot be placed.
    pub fn locate(&self, key: &str) -> Result<&Shard, KeyProblem> {
        let idx = match &self.placement {
            Placement::Hash(ring) => ring.locate(hash64(key.as_bytes())),
            Placement::Range { order, bounds, tail } => {
                let k = match order {
                    KeyOrder::Bytes => RangeKey::Bytes(key.as_bytes().to_vec()),
                    KeyOrder::Numeric => RangeKey::Number(parse_u64(key).ok_or(KeyProblem::NotNumeric)?),
                };
                let pos = bounds.partition_point(|(b, _)| *b <= k);
                match bounds.get(pos) {
                    Some((_, idx)) => *idx,
                    None => tail.ok_or(KeyProblem::OutOfRange)?,
                }
            }
        };
        self.shards.get(idx).ok_or(KeyProblem::OutOfRange)
    }

    pub fn shard(&self, name: &str) -> Option<&Shard> {
        self.shards.iter().find(|s| s.name == name)
    }
}

/// An unsigned decimal integer without sign or spaces.
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn compile_ranges(c: &ShardMapConfig, ranges: &[RangeConfig]) -> Result<Placement, ConfigError> {
    if ranges.is_empty() || ranges.len() > MAX_RANGES {
        return Err(ConfigError::new("ranges", format!("{} ranges", ranges.len()), format!("1..={MAX_RANGES} ranges")));
    }
    let mut bounds: Vec<(RangeKey, usize)> = Vec::with_capacity(ranges.len());
    let mut tail = None;
    let last = ranges.len() - 1;
    for (i, r) in ranges.iter().enumerate() {
        let idx = c.shards.iter().position(|s| s.name == r.shard).ok_or_else(|| {
            ConfigError::new(format!("ranges[{i}].shard"), format!("{:?}", r.shard), "the name of a shard in this map's `shards`")
        })?;
        match &r.below {
            None if i == last => tail = Some(idx),
            None => {
                return Err(ConfigError::new(format!("ranges[{i}].below"), "(none)", "a bound on every range but the last"));
            }
            Some(b) => {
                let key =
                    match (c.key_order, b) {
                        (KeyOrder::Numeric, Bound::Number(n)) => RangeKey::Number(*n),
                        (KeyOrder::Numeric, Bound::Text(t)) => RangeKey::Number(parse_u64(t).ok_or_else(|| {
                            ConfigError::new(format!("ranges[{i}].below"), b, "an unsigned integer (keyOrder is numeric)")
                        })?),
                        (KeyOrder::Bytes, Bound::Text(t)) if !t.is_empty() => RangeKey::Bytes(t.as_bytes().to_vec()),
                        (KeyOrder::Bytes, _) => {
                            return Err(ConfigError::new(format!("ranges[{i}].below"), b, "a non-empty string (keyOrder is bytes)"));
                        }
                    };
                if bounds.last().is_some_and(|(prev, _)| *prev >= key) {
                    return Err(ConfigError::new(format!("ranges[{i}].below"), b, "a bound above the previous range's bound"));
                }
                bounds.push((key, idx));
            }
        }
    }
    for (i, s) in c.shards.iter().enumerate() {
        if !ranges.iter().any(|r| r.shard == s.name) {
            return Err(ConfigError::new(format!("shards[{i}].name"), format!("{:?}", s.name), "a shard that at least one range uses"));
        }
    }
    Ok(Placement::Range { order: c.key_order, bounds, tail })
}

/// The validated runtime form of [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub keys: KeySpec,
    pub key_pattern: Option<Regex>,
    pub shard_header: String,
    pub response_header: Option<String>,
    /// Index into `current.shards`.
    pub default_shard: Option<usize>,
    pub current: ShardMap,
    pub previous: Option<ShardMap>,
    pub fallback_statuses: Vec<u16>,
    pub fallback_timeout: Duration,
}

impl Settings {
    pub fn try_from_config(c: Config) -> Result<Settings, ConfigError> {
        let keys = KeySpec::try_new("keySources", &c.key_sources, None)?;
        if keys.sources.is_empty() {
            return Err(ConfigError::new("keySources", "[]", "at least one key source"));
        }
        let key_pattern = c
            .key_pattern
            .as_deref()
            .map(|p| {
                let bad = |why: String| ConfigError::new("keyPattern", format!("{p:?}"), why);
                if p.len() > 1024 {
                    return Err(bad("a pattern of at most 1024 bytes".into()));
                }
                Regex::new(p).map_err(|e| bad(format!("a valid regular expression (regex-lite syntax): {e}")))
            })
            .transpose()?;
        let shard_header = names::output_header_name("shardHeader", &c.shard_header)?;
        if keys.sources.iter().any(|s| matches!(s, KeySource::Header(h) if *h == shard_header)) {
            return Err(ConfigError::new(
                "shardHeader",
                format!("{shard_header:?}"),
                "a header that is not also a key source (clients must not be able to choose the shard)",
            ));
        }
        let response_header = c.response_header.as_deref().map(|h| names::output_header_name("responseHeader", h)).transpose()?;
        let current = ShardMap::try_from_config("shardMap", &c.shard_map)?;
        let previous = c.previous_shard_map.as_ref().map(|p| ShardMap::try_from_config("previousShardMap", p)).transpose()?;
        if let Some(p) = &previous {
            if p.version == current.version {
                return Err(ConfigError::new(
                    "previousShardMap.version",
                    format!("{:?}", p.version),
                    format!("a version other than shardMap.version ({:?})", current.version),
                ));
            }
        }
        let default_shard = match &c.default_shard {
            None => None,
            Some(name) => Some(
                current
                    .shards
                    .iter()
                    .position(|s| s.name == *name)
                    .ok_or_else(|| ConfigError::new("defaultShard", format!("{name:?}"), "the name of a shard in shardMap.shards"))?,
            ),
        };
        for (i, st) in c.fallback_statuses.iter().enumerate() {
            if !(400..=599).contains(st) {
                return Err(ConfigError::new(format!("fallbackStatuses[{i}]"), st, "an HTTP status from 400 to 599"));
            }
        }
        if c.fallback_timeout_ms == 0 || c.fallback_timeout_ms > MAX_FALLBACK_TIMEOUT_MS {
            return Err(ConfigError::new("fallbackTimeoutMs", c.fallback_timeout_ms, format!("1..={MAX_FALLBACK_TIMEOUT_MS}")));
        }
        Ok(Settings {
            keys,
            key_pattern,
            shard_header,
            response_header,
            default_shard,
            current,
            previous,
            fallback_statuses: c.fallback_statuses,
            fallback_timeout: Duration::from_millis(u64::from(c.fallback_timeout_ms)),
        })
    }

    /// Whether a response status from a moved key's new owner sends the read to the old owner.
    pub fn falls_back_on(&self, status: u32) -> bool {
        self.fallback_statuses.iter().any(|s| u32::from(*s) == status)
    }
}

/// A request placed on a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    pub shard: &'a Shard,
    /// Key source label (`header:x-key`), or `default:<problem>` for the default shard.
    pub source: String,
    /// While resharding: the old owner, when it differs from the new one.
    pub previous: Option<&'a Shard>,
}

/// What the glue does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    Route(Route<'a>),
    /// Answer 400 with this JSON body.
    Reject {
        problem: KeyProblem,
        body: String,
    },
}

/// Decide for one request.
pub fn decide<'a>(s: &'a Settings, req: &dyn RequestView) -> Decision<'a> {
    let found = s.keys.extract(req);
    let placed = match &found {
        None => Err(KeyProblem::Missing),
        Some(m) if s.key_pattern.as_ref().is_some_and(|p| !full_match(p, &m.value)) => Err(KeyProblem::PatternMismatch),
        Some(m) => s.current.locate(&m.value).map(|shard| (shard, m)),
    };
    match placed {
        Ok((shard, m)) => {
            // A key the old map cannot place (a range the new map added) has no old owner.
            let previous = s.previous.as_ref().and_then(|p| p.locate(&m.value).ok()).filter(|old| old.cluster != shard.cluster);
            Decision::Route(Route { shard, source: s.keys.label(m), previous })
        }
        Err(problem) => match s.default_shard.and_then(|i| s.current.shards.get(i)) {
            Some(shard) => Decision::Route(Route { shard, source: format!("default:{}", problem.label()), previous: None }),
            None => Decision::Reject { problem, body: reject_body(s, problem, found.as_ref().map(|m| s.keys.label(m))) },
        },
    }
}

fn full_match(re: &Regex, v: &str) -> bool {
    re.find(v).is_some_and(|m| m.start() == 0 && m.end() == v.len())
}

fn reject_body(s: &Settings, problem: KeyProblem, source: Option<String>) -> String {
    match problem {
        KeyProblem::Missing => {
            let tried: Vec<String> = s.keys.sources.iter().map(KeySource::label).collect();
            json_object(&[
                ("error", Json::Str("missing shard key")),
                ("detail", Json::Str("no key source yielded a key (empty values and values over 1024 bytes do not count)")),
                ("keySources", Json::List(&tried)),
            ])
        }
        _ => {
            let detail = match problem {
                KeyProblem::PatternMismatch => "the key does not match keyPattern",
                KeyProblem::NotNumeric => "the key is not an unsigned decimal integer (keyOrder is numeric)",
                _ => "the key is at or above the last range bound of the shard map",
            };
            json_object(&[
                ("error", Json::Str("invalid shard key")),
                ("detail", Json::Str(detail)),
                ("keySource", Json::Str(source.as_deref().unwrap_or_default())),
                ("shardMapVersion", Json::Str(&s.current.version)),
            ])
        }
    }
}

/// A JSON value in an error body (a small writer keeps serde_json's
/// serializer out of the module).
enum Json<'a> {
    Str(&'a str),
    List(&'a [String]),
}

/// A JSON object with these fields, in this order.
fn json_object(fields: &[(&str, Json)]) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, k);
        out.push(':');
        match v {
            Json::Str(s) => push_json_str(&mut out, s),
            Json::List(items) => {
                out.push('[');
                for (j, it) in items.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    push_json_str(&mut out, it);
                }
                out.push(']');
            }
        }
    }
    out.push('}');
    out
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether a response is Envoy's own answer for a shard it could not reach
/// (no healthy replica, every connection attempt failed, cluster missing),
/// as opposed to a 503 the shard itself sent. `details` is the stream's
/// response code details (`response.code_details`).
pub fn shard_unreachable(status: u32, details: &str) -> bool {
    status == 503
        && (details == "no_healthy_upstream"
            || details == "cluster_not_found"
            || details.starts_with("upstream_reset_before_response_started"))
}

/// The 503 body naming the shard that cannot be reached.
pub fn unavailable_body(shard: &Shard, version: &str, details: &str) -> String {
    json_object(&[
        ("error", Json::Str("shard unavailable")),
        ("shard", Json::Str(&shard.name)),
        ("cluster", Json::Str(&shard.cluster)),
        ("shardMapVersion", Json::Str(version)),
        ("detail", Json::Str(details)),
    ])
}

/// Whether a request method may be replayed against the old owner.
pub fn replayable(method: &str) -> bool {
    matches!(method, "GET" | "HEAD")
}

/// Headers of the fallback call: the original request headers with the shard
/// header naming the old owner, without framing headers (the call has no body).
pub fn fallback_request_headers(original: &[(String, String)], shard_header: &str, old: &Shard) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = original
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "content-length" | "transfer-encoding" | "expect") && *k != shard_header)
        .cloned()
        .collect();
    out.push((shard_header.to_string(), old.cluster.clone()));
    out
}

/// Headers of the old owner's response to pass on in the reply: everything but
/// pseudo headers and framing headers (Envoy frames the local reply itself).
pub fn fallback_reply_headers(resp: &[(String, String)], response_header: Option<&str>, old: &Shard) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = resp
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(':')
                && !matches!(k.as_str(), "content-length" | "transfer-encoding" | "connection" | "keep-alive")
                && Some(k.as_str()) != response_header
        })
        .cloned()
        .collect();
    if let Some(h) = response_header {
        out.push((h.to_string(), old.name.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;
    use meshpatterns_core::key::StaticRequest;

    fn settings(json: &str) -> Result<Settings, ConfigError> {
        let c: Config = meshpatterns_core::error::parse_json(json.as_bytes())?;
        Settings::try_from_config(c)
    }

    const THREE: &str = r#"{"keySources":[{"pathSegment":1},{"header":"x-key"}],
        "shardMap":{"version":"v1","shards":[{"name":"a","cluster":"shard_a"},{"name":"b","cluster":"shard_b"},{"name":"c","cluster":"shard_c"}]}}"#;

    fn route<'a>(s: &'a Settings, path: &str) -> Route<'a> {
        match decide(s, &StaticRequest::new(path)) {
            Decision::Route(r) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    /// Placement vectors for the three-shard map above: they must never change,
    /// or deployed proxies would disagree with a new release about where keys live.
    #[test]
    fn placement_vectors() {
        let s = settings(THREE).unwrap();
        let got: Vec<&str> = ["user-1", "user-2", "user-3", "user-4", "user-5", "42", "ünïcode"]
            .iter()
            .map(|k| route(&s, &format!("/kv/{k}")).shard.name.as_str())
            .collect();
        assert_eq!(got, ["c", "b", "c", "c", "a", "c", "c"]);
        assert_eq!(route(&s, "/kv/user-1").shard.cluster, "shard_c");
        assert_eq!(route(&s, "/kv/user-1").source, "path_segment:1");
    }

    #[test]
    fn spread_and_movement_when_a_shard_is_added() {
        let three = settings(THREE).unwrap();
        let four = settings(
            &THREE.replace(r#"{"name":"c","cluster":"shard_c"}"#, r#"{"name":"c","cluster":"shard_c"},{"name":"d","cluster":"shard_d"}"#),
        )
        .unwrap();
        let mut counts = [0u32; 3];
        let mut moved = 0;
        for i in 0..10_000 {
            let key = format!("key-{i}");
            let a = three.current.locate(&key).unwrap();
            let b = four.current.locate(&key).unwrap();
            counts[three.current.shards.iter().position(|s| s == a).unwrap()] += 1;
            if a != b {
                assert_eq!(b.name, "d", "{key} moved between old shards");
                moved += 1;
            }
        }
        let max = *counts.iter().max().unwrap() as f64 / (10_000.0 / 3.0);
        assert!(max <= 1.10, "{counts:?}");
        assert!((moved as f64 / 10_000.0 - 0.25).abs() < 0.04, "moved {moved}");
    }

    #[test]
    fn missing_key_is_rejected_with_json_naming_the_sources() {
        let s = settings(THREE).unwrap();
        let Decision::Reject { problem, body } = decide(&s, &StaticRequest::new("/kv")) else { panic!() };
        assert_eq!(problem, KeyProblem::Missing);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "missing shard key");
        assert_eq!(v["keySources"], serde_json::json!(["path_segment:1", "header:x-key"]));
    }

    #[test]
    fn default_shard_takes_missing_and_invalid_keys() {
        let s = settings(&THREE.replace(r#""keySources""#, r#""defaultShard":"b","keyPattern":"[a-z0-9-]{1,16}","keySources""#)).unwrap();
        let r = route(&s, "/kv");
        assert_eq!((r.shard.name.as_str(), r.source.as_str()), ("b", "default:missing"));
        let r = route(&s, "/kv/NOT_OK");
        assert_eq!((r.shard.name.as_str(), r.source.as_str()), ("b", "default:invalid:pattern"));
        // The pattern must match the whole key, not a part of it.
        assert_eq!(route(&s, "/kv/abc-xyz-12345678901").source, "default:invalid:pattern");
        assert_eq!(route(&s, "/kv/user-1").shard.name, "c");
    }

    #[test]
    fn invalid_key_is_rejected() {
        let s = settings(&THREE.replace(r#""keySources""#, r#""keyPattern":"[0-9]+","keySources""#)).unwrap();
        let Decision::Reject { problem, body } = decide(&s, &StaticRequest::new("/kv/abc")) else { panic!() };
        assert_eq!(problem, KeyProblem::PatternMismatch);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["error"].as_str(), v["keySource"].as_str()), (Some("invalid shard key"), Some("path_segment:1")));
    }

    #[test]
    fn range_placement_bytes_and_numeric() {
        let s = settings(
            r#"{"keySources":[{"pathSegment":1}],"shardMap":{"shards":[{"name":"a"},{"name":"b"},{"name":"c"}],
            "ranges":[{"shard":"a","below":"h"},{"shard":"b","below":"q"},{"shard":"c"}]}}"#,
        )
        .unwrap();
        let names: Vec<&str> = ["/u/apple", "/u/g", "/u/h", "/u/pz", "/u/q", "/u/zebra", "/u/Zebra"]
            .iter()
            .map(|p| route(&s, p).shard.name.as_str())
            .collect();
        assert_eq!(names, ["a", "a", "b", "b", "c", "c", "a"]);

        let s = settings(
            r#"{"keySources":[{"pathSegment":1}],"shardMap":{"keyOrder":"numeric","shards":[{"name":"a"},{"name":"b"}],
            "ranges":[{"shard":"a","below":1000},{"shard":"b","below":"2000"}]}}"#,
        )
        .unwrap();
        assert_eq!(route(&s, "/u/999").shard.name, "a");
        assert_eq!(route(&s, "/u/1000").shard.name, "b");
        assert_eq!(route(&s, "/u/0099").shard.name, "a");
        let reject = |p: &str| match decide(&s, &StaticRequest::new(p)) {
            Decision::Reject { problem, .. } => problem,
            other => panic!("{other:?}"),
        };
        assert_eq!(reject("/u/2000"), KeyProblem::OutOfRange);
        assert_eq!(reject("/u/-5"), KeyProblem::NotNumeric);
        assert_eq!(reject("/u/99999999999999999999999"), KeyProblem::NotNumeric);
    }

    #[test]
    fn resharding_marks_keys_whose_owner_changed() {
        let s = settings(&THREE.replace(
            r#""shardMap":{"version":"v1","shards":[{"name":"a","cluster":"shard_a"},{"name":"b","cluster":"shard_b"},{"name":"c","cluster":"shard_c"}]}"#,
            r#""shardMap":{"version":"v2","shards":[{"name":"a","cluster":"shard_a"},{"name":"b","cluster":"shard_b"},{"name":"c","cluster":"shard_c"},{"name":"d","cluster":"shard_d"}]},
               "previousShardMap":{"version":"v1","shards":[{"name":"a","cluster":"shard_a"},{"name":"b","cluster":"shard_b"},{"name":"c","cluster":"shard_c"}]}"#,
        ))
        .unwrap();
        let mut moved = 0;
        for i in 0..2000 {
            let r = route(&s, &format!("/kv/k{i}"));
            match r.previous {
                Some(old) => {
                    assert_eq!(r.shard.name, "d");
                    assert_ne!(old.name, "d");
                    moved += 1;
                }
                None => assert_ne!(r.shard.name, "d"),
            }
        }
        assert!((400..600).contains(&moved), "{moved}");
        assert!(s.falls_back_on(404) && !s.falls_back_on(500));
    }

    #[test]
    fn json_bodies_escape_what_they_carry() {
        let body = json_object(&[("a\"b", Json::Str("x\\y\n\u{1}ü")), ("l", Json::List(&["p".into(), "q\"".into()]))]);
        assert_eq!(body, r#"{"a\"b":"x\\y\u000a\u0001ü","l":["p","q\""]}"#);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["a\"b"], "x\\y\n\u{1}ü");
    }

    #[test]
    fn unreachable_shard_detection() {
        assert!(shard_unreachable(503, "no_healthy_upstream"));
        assert!(shard_unreachable(503, "upstream_reset_before_response_started{remote_connection_failure}"));
        assert!(!shard_unreachable(503, "via_upstream"));
        assert!(!shard_unreachable(502, "no_healthy_upstream"));
        let sh = Shard { name: "b".into(), cluster: "shard_b".into(), dispatch_cluster: "shard_b".into() };
        let v: serde_json::Value = serde_json::from_str(&unavailable_body(&sh, "v1", "no_healthy_upstream")).unwrap();
        assert_eq!((v["shard"].as_str(), v["cluster"].as_str()), (Some("b"), Some("shard_b")));
    }

    #[test]
    fn fallback_headers() {
        let old = Shard { name: "a".into(), cluster: "shard_a".into(), dispatch_cluster: "shard_a".into() };
        let h = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let req = h(&[(":method", "GET"), (":path", "/kv/x"), ("content-length", "0"), ("x-shard-cluster", "shard_d")]);
        assert_eq!(
            fallback_request_headers(&req, "x-shard-cluster", &old),
            h(&[(":method", "GET"), (":path", "/kv/x"), ("x-shard-cluster", "shard_a")])
        );
        let resp = h(&[(":status", "200"), ("content-length", "3"), ("x-shard", "zzz"), ("x-replica", "r")]);
        assert_eq!(fallback_reply_headers(&resp, Some("x-shard"), &old), h(&[("x-replica", "r"), ("x-shard", "a")]));
        assert!(replayable("GET") && replayable("HEAD") && !replayable("PUT"));
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let base = r#"{"keySources":[{"header":"x-key"}],"shardMap":{"shards":[{"name":"a"},{"name":"b"}]}}"#;
        let cases = [
            (r#"{"shardMap":{"shards":[{"name":"a"}]}}"#, "keySources"),
            (r#"{"keySources":[{"header":"x-key"}],"shardMap":{"shards":[]}}"#, "shardMap.shards"),
            (r#"{"keySources":[{"header":"x-key"}],"shardMap":{"shards":[{"name":"a b"}]}}"#, "shardMap.shards[0].name"),
            (r#"{"keySources":[{"header":"x-key"}],"shardMap":{"shards":[{"name":"a"},{"name":"a"}]}}"#, "shardMap.shards[1].name"),
            (r#"{"keySources":[{"header":"x-key"}],"shardMap":{"shards":[{"name":"a","weight":0}]}}"#, "shardMap.shards[0].weight"),
            (
                r#"{"keySources":[{"header":"x-key"}],"shardMap":{"shards":[{"name":"a","cluster":"has space"}]}}"#,
                "shardMap.shards[0].cluster",
            ),
            (r#"{"keySources":[{"header":"x-shard-cluster"}],"shardMap":{"shards":[{"name":"a"}]}}"#, "shardHeader"),
            (&base.replace(r#""shardMap""#, r#""defaultShard":"z","shardMap""#), "defaultShard"),
            (&base.replace(r#""shardMap""#, r#""keyPattern":"(","shardMap""#), "keyPattern"),
            (&base.replace(r#""shardMap""#, r#""fallbackStatuses":[200],"shardMap""#), "fallbackStatuses[0]"),
            (&base.replace(r#""shardMap""#, r#""fallbackTimeoutMs":0,"shardMap""#), "fallbackTimeoutMs"),
            (&base.replace(r#""shardMap""#, r#""previousShardMap":{"shards":[{"name":"a"}]},"shardMap""#), "previousShardMap.version"),
            (&base.replace(r#"]}}"#, r#"],"ranges":[{"shard":"a","below":"m"},{"shard":"x"}]}}"#), "shardMap.ranges[1].shard"),
            (&base.replace(r#"]}}"#, r#"],"ranges":[{"shard":"a"},{"shard":"b"}]}}"#), "shardMap.ranges[0].below"),
            (&base.replace(r#"]}}"#, r#"],"ranges":[{"shard":"a","below":"m"},{"shard":"b","below":"c"}]}}"#), "shardMap.ranges[1].below"),
            (&base.replace(r#"]}}"#, r#"],"ranges":[{"shard":"a"}]}}"#), "shardMap.shards[1].name"),
            (
                &base.replace(r#"]}}"#, r#"],"keyOrder":"numeric","ranges":[{"shard":"a","below":"x"},{"shard":"b"}]}}"#),
                "shardMap.ranges[0].below",
            ),
        ];
        for (json, field) in cases {
            let e = settings(json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let e = settings(&base.replace("shardMap", "shardmap")).unwrap_err();
        assert!(e.to_string().contains("unknown field `shardmap`"), "{e}");
    }
}
