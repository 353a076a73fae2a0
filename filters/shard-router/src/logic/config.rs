//! The plugin config as written (serde), its limits, and its validation into
//! [`Settings`]: shard maps compiled into placements (a ring or key ranges).
//! Every error names the field, the value and what is allowed.

use meshpatterns_core::error::ConfigError;
use meshpatterns_core::key::{KeySourceConfig, KeySpec};
use meshpatterns_core::place::{Member, Ring};
use meshpatterns_core::{names, KeySource};
use regex_lite::Regex;
use serde::Deserialize;

/// Default request header the filter writes and Envoy's `cluster_header` reads.
pub const DEFAULT_SHARD_HEADER: &str = "x-shard-cluster";
/// Most shards one map may name (each one defines a counter,
/// `meshpatterns.shard_router.shard.<name>.requests`).
pub const MAX_SHARDS: usize = 256;
/// Most ranges one map may list.
pub const MAX_RANGES: usize = 1024;
/// Longest shard name (it also appears in metric names).
pub const MAX_SHARD_NAME: usize = 64;
/// Longest cluster name, dispatch cluster name or map version.
pub const MAX_VALUE_LEN: usize = 256;
/// Longest `keyPattern`, in bytes.
pub const MAX_KEY_PATTERN: usize = 1024;
/// Upper bound for `fallbackTimeoutMs`.
pub const MAX_FALLBACK_TIMEOUT_MS: u32 = 60_000;
/// Longest key, in bytes: longer keys (and empty ones) count as missing.
pub use meshpatterns_core::key::MAX_KEY_BYTES;
/// Highest weight of one shard, and of all shards of a map together (the
/// ring holds 1,024 points per unit of weight).
pub use meshpatterns_core::place::MAX_TOTAL_WEIGHT;

/// The plugin configuration as written in JSON (Envoy or Istio pluginConfig).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Where the shard key comes from, tried in order (at least one). Empty
    /// values and values over 1024 bytes count as missing.
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub key_sources: Vec<KeySourceConfig>,
    /// A regular expression (regex-lite syntax, at most 1024 bytes) the whole
    /// key must match to be valid. A key that is not valid UTF-8 never
    /// matches (it is invalid when a pattern is set).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(max = 1024)))]
    pub key_pattern: Option<String>,
    /// Request header that receives the owning shard's cluster (not also a key source).
    #[serde(default = "default_shard_header")]
    pub shard_header: String,
    /// Response header that receives the name of the shard that served.
    #[serde(default)]
    pub response_header: Option<String>,
    /// Shard for requests without a valid key (a shard of `shardMap`);
    /// without it they get a 400 (gRPC: INVALID_ARGUMENT).
    #[serde(default)]
    pub default_shard: Option<String>,
    /// The shard map in force.
    pub shard_map: ShardMapConfig,
    /// While resharding: the map being replaced (its `version` must differ).
    #[serde(default)]
    pub previous_shard_map: Option<ShardMapConfig>,
    /// Responses (400..=599) from the new owner that send a moved key's read
    /// to its old owner; `[]` turns the fallback off.
    #[serde(default = "default_fallback_statuses")]
    #[cfg_attr(feature = "schema", schemars(inner(range(min = 400, max = 599))))]
    pub fallback_statuses: Vec<u16>,
    /// Timeout of the call to the old owner, in milliseconds (1..=60000).
    #[serde(default = "default_fallback_timeout_ms")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 60_000)))]
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
    /// A label for this map, recorded with every decision: 1 to 256 visible
    /// ASCII characters without spaces.
    #[serde(default = "default_version")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 256), pattern(r"^[!-~]+$")))]
    pub version: String,
    /// 1 to 256 shards with unique names; their weights add up to at most 1024.
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 256)))]
    pub shards: Vec<ShardConfig>,
    /// Range placement for ordered keys (1 to 1024 ranges, every shard used);
    /// without it keys are hashed onto a ring.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 1024)))]
    pub ranges: Option<Vec<RangeConfig>>,
    /// How range bounds and keys compare.
    #[serde(default)]
    pub key_order: KeyOrder,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardConfig {
    /// 1 to 64 characters from `A-Z a-z 0-9 - _ .`, unique in its map; hash
    /// placement hashes it, and it names the shard's counter.
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9._-]+$")))]
    pub name: String,
    /// Value written into the shard header (the Envoy cluster); defaults to
    /// `name`. 1 to 256 visible ASCII characters without spaces.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 256), pattern(r"^[!-~]+$")))]
    pub cluster: Option<String>,
    /// Relative share of keys under hash placement: 1..=1024, and at most
    /// 1024 for all shards of the map together.
    #[serde(default = "one")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 1024)))]
    pub weight: u32,
    /// Envoy cluster for the resharding fallback call; defaults to `cluster`.
    /// 1 to 256 visible ASCII characters without spaces.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 256), pattern(r"^[!-~]+$")))]
    pub dispatch_cluster: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RangeConfig {
    /// The name of a shard of this map.
    pub shard: String,
    /// Keys strictly below this bound (and at or above the previous one) go
    /// to `shard`; bounds strictly increase. Omitted on the last range only:
    /// it takes every key from the previous bound up.
    #[serde(default)]
    pub below: Option<Bound>,
}

/// A range bound as written: a non-empty string, or (for `keyOrder:
/// numeric`) an unsigned integer up to 2^64 - 1, as a number or a string.
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
    /// Byte-wise lexicographic order of the key's bytes (and of the bounds' UTF-8).
    #[default]
    Bytes,
    /// Keys are unsigned decimal integers (ASCII digits only, up to 2^64 - 1),
    /// compared as numbers; other keys are invalid.
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

/// A key or range bound in the order of its map.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum RangeKey {
    Bytes(Vec<u8>),
    Number(u64),
}

#[derive(Debug, Clone)]
pub(crate) enum Placement {
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
    pub(crate) placement: Placement,
}

fn valid_shard_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= MAX_SHARD_NAME && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A header value we can write: visible ASCII, no spaces.
fn valid_header_token(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_VALUE_LEN && v.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// An unsigned decimal integer without sign or spaces (ASCII digits only).
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

impl ShardMap {
    /// Validate a map; errors are reported under `field` (`shardMap`, `previousShardMap`).
    pub fn try_from_config(field: &str, c: &ShardMapConfig) -> Result<ShardMap, ConfigError> {
        Self::compile(c).map_err(|e| e.at(field))
    }

    fn compile(c: &ShardMapConfig) -> Result<ShardMap, ConfigError> {
        if !valid_header_token(&c.version) {
            return Err(ConfigError::new(
                "version",
                format!("{:?}", c.version),
                format!("1 to {MAX_VALUE_LEN} visible ASCII characters without spaces"),
            ));
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
                    format!("an Envoy cluster name of 1 to {MAX_VALUE_LEN} visible ASCII characters without spaces"),
                ));
            }
            let dispatch_cluster = s.dispatch_cluster.clone().unwrap_or_else(|| cluster.clone());
            if !valid_header_token(&dispatch_cluster) {
                return Err(ConfigError::new(
                    format!("shards[{i}].dispatchCluster"),
                    format!("{dispatch_cluster:?}"),
                    format!("an Envoy cluster name of 1 to {MAX_VALUE_LEN} visible ASCII characters without spaces"),
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

    pub fn shard(&self, name: &str) -> Option<&Shard> {
        self.shards.iter().find(|s| s.name == name)
    }
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
                let key = match (c.key_order, b) {
                    (KeyOrder::Numeric, Bound::Number(n)) => RangeKey::Number(*n),
                    (KeyOrder::Numeric, Bound::Text(t)) => RangeKey::Number(parse_u64(t.as_bytes()).ok_or_else(|| {
                        ConfigError::new(format!("ranges[{i}].below"), b, "an unsigned integer up to 2^64 - 1 (keyOrder is numeric)")
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
    pub fallback_timeout_ms: u32,
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
                if p.len() > MAX_KEY_PATTERN {
                    return Err(bad(format!("a pattern of at most {MAX_KEY_PATTERN} bytes")));
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
            fallback_timeout_ms: c.fallback_timeout_ms,
        })
    }

    /// Whether a response status from a moved key's new owner sends the read to the old owner.
    pub fn falls_back_on(&self, status: u32) -> bool {
        self.fallback_statuses.iter().any(|s| u32::from(*s) == status)
    }
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
    fn invalid_configs_name_the_field() {
        let base = r#"{"keySources":[{"header":"x-key"}],"shardMap":{"shards":[{"name":"a"},{"name":"b"}]}}"#;
        let cases = [
            (r#"{"shardMap":{"shards":[{"name":"a"}]}}"#, "keySources"),
            (r#"{"keySources":[],"shardMap":{"shards":[{"name":"a"}]}}"#, "keySources"),
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
            // Wrong types name the field too.
            (&base.replace(r#""shardMap""#, r#""fallbackTimeoutMs":"5000","shardMap""#), "fallbackTimeoutMs"),
            (&base.replace(r#"{"name":"b"}"#, r#"{"name":"b","weight":-1}"#), "shardMap.shards[1].weight"),
            (&base.replace(r#""shardMap""#, r#""fallbackStatuses":404,"shardMap""#), "fallbackStatuses"),
        ];
        for (json, field) in cases {
            let e = settings(json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let e = settings(&base.replace("shardMap", "shardmap")).unwrap_err();
        assert!(e.to_string().contains("unknown field `shardmap`"), "{e}");
    }

    /// Every documented limit holds at its edge and fails one past it.
    #[test]
    fn limits_at_their_edges() {
        let map =
            |shards: &str, extra: &str| format!(r#"{{"keySources":[{{"header":"x-key"}}]{extra},"shardMap":{{"shards":[{shards}]}}}}"#);
        // 256 shards (on ranges: a ring that large is slow to build unoptimised).
        let n_ranged = |n: usize| {
            let shards: Vec<String> = (0..n).map(|i| format!(r#"{{"name":"s{i}"}}"#)).collect();
            let ranges: Vec<String> = (0..n).map(|i| format!(r#"{{"shard":"s{i}","below":{}}}"#, i + 1)).collect();
            format!(
                r#"{{"keySources":[{{"header":"x-key"}}],"shardMap":{{"keyOrder":"numeric","shards":[{}],"ranges":[{}]}}}}"#,
                shards.join(","),
                ranges.join(",")
            )
        };
        assert_eq!(settings(&n_ranged(MAX_SHARDS)).unwrap().current.shards.len(), MAX_SHARDS);
        let e = settings(&n_ranged(MAX_SHARDS + 1)).unwrap_err();
        assert_eq!((e.field.as_str(), e.allowed.as_str()), ("shardMap.shards", "1..=256 shards"));

        // Weights: each and all together at most 1024 (one full ring of
        // 1,048,576 points, the most a map can hold).
        assert!(settings(&map(r#"{"name":"a","weight":1000},{"name":"b","weight":24}"#, "")).is_ok());
        assert_eq!(settings(&map(r#"{"name":"a","weight":1025}"#, "")).unwrap_err().field, "shardMap.shards[0].weight");
        let e = settings(&map(r#"{"name":"a","weight":1000},{"name":"b","weight":25}"#, "")).unwrap_err();
        assert_eq!(e.field, "shardMap.shards", "{e}");
        assert!(e.allowed.contains("1024"), "{e}");

        // Names: 64 characters; clusters and versions: 256.
        let name = |n: usize| "n".repeat(n);
        assert!(settings(&map(&format!(r#"{{"name":"{}"}}"#, name(MAX_SHARD_NAME)), "")).is_ok());
        assert_eq!(
            settings(&map(&format!(r#"{{"name":"{}"}}"#, name(MAX_SHARD_NAME + 1)), "")).unwrap_err().field,
            "shardMap.shards[0].name"
        );
        assert!(settings(&map(&format!(r#"{{"name":"a","cluster":"{}"}}"#, name(MAX_VALUE_LEN)), "")).is_ok());
        assert_eq!(
            settings(&map(&format!(r#"{{"name":"a","cluster":"{}"}}"#, name(MAX_VALUE_LEN + 1)), "")).unwrap_err().field,
            "shardMap.shards[0].cluster"
        );
        assert_eq!(
            settings(&map(&format!(r#"{{"name":"a","dispatchCluster":"{}"}}"#, name(MAX_VALUE_LEN + 1)), "")).unwrap_err().field,
            "shardMap.shards[0].dispatchCluster"
        );
        let versioned =
            |v: &str| format!(r#"{{"keySources":[{{"header":"x-key"}}],"shardMap":{{"version":"{v}","shards":[{{"name":"a"}}]}}}}"#);
        assert!(settings(&versioned(&name(MAX_VALUE_LEN))).is_ok());
        assert_eq!(settings(&versioned(&name(MAX_VALUE_LEN + 1))).unwrap_err().field, "shardMap.version");

        // keyPattern: 1024 bytes.
        assert!(settings(&map(r#"{"name":"a"}"#, &format!(r#","keyPattern":"{}""#, name(MAX_KEY_PATTERN)))).is_ok());
        assert_eq!(
            settings(&map(r#"{"name":"a"}"#, &format!(r#","keyPattern":"{}""#, name(MAX_KEY_PATTERN + 1)))).unwrap_err().field,
            "keyPattern"
        );

        // Ranges: 1024.
        let ranged = |n: usize| {
            let ranges: Vec<String> = (0..n)
                .map(|i| if i + 1 == n { r#"{"shard":"a"}"#.to_string() } else { format!(r#"{{"shard":"a","below":{}}}"#, i + 1) })
                .collect();
            format!(
                r#"{{"keySources":[{{"header":"x-key"}}],"shardMap":{{"keyOrder":"numeric","shards":[{{"name":"a"}}],"ranges":[{}]}}}}"#,
                ranges.join(",")
            )
        };
        assert!(settings(&ranged(MAX_RANGES)).is_ok());
        assert_eq!(settings(&ranged(MAX_RANGES + 1)).unwrap_err().field, "shardMap.ranges");
        assert_eq!(settings(&ranged(0)).unwrap_err().field, "shardMap.ranges");

        // fallbackTimeoutMs: 1..=60000; fallbackStatuses: 400..=599.
        assert!(settings(&map(r#"{"name":"a"}"#, r#","fallbackTimeoutMs":60000"#)).is_ok());
        assert_eq!(settings(&map(r#"{"name":"a"}"#, r#","fallbackTimeoutMs":60001"#)).unwrap_err().field, "fallbackTimeoutMs");
        assert!(settings(&map(r#"{"name":"a"}"#, r#","fallbackStatuses":[400,599]"#)).is_ok());
        assert_eq!(settings(&map(r#"{"name":"a"}"#, r#","fallbackStatuses":[404,600]"#)).unwrap_err().field, "fallbackStatuses[1]");
    }
}
