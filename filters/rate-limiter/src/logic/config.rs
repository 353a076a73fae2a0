//! The plugin configuration as written (JSON for Envoy, YAML `pluginConfig`
//! for Istio) and its validation into [`Settings`].

use std::net::IpAddr;

use meshpatterns_core::error::ConfigError;
pub use meshpatterns_core::error::Deprecation;
use meshpatterns_core::key::{KeySourceConfig, MAX_TRUSTED_HOPS};
use meshpatterns_core::scope::{HeaderCondition, MatchConfig as ScopeConfig, Matcher};
use meshpatterns_core::KeySource;
use serde::Deserialize;

use super::bucket::{BucketParams, COST_MILLI};
use super::table::WhenFull;

/// Bucket slots when `slots` is not set.
pub const DEFAULT_SLOTS: u32 = 65_536;
/// Most slots a config may ask for (about 95 MB of shared data when all are in use).
pub const MAX_SLOTS: u32 = 1_048_576;
/// Most policies in one config.
pub const MAX_POLICIES: usize = 64;
/// Most key parts one policy combines.
pub const MAX_KEY_PARTS: usize = 8;
/// Largest `rate` and `burst`.
pub const MAX_RATE: u64 = 1_000_000_000;
/// Most replicas a global budget may be divided across.
pub const MAX_REPLICAS: u32 = 10_000;
/// Largest custom body for limited requests, in bytes (serialised JSON).
pub const MAX_BODY_BYTES: usize = 4096;

/// The plugin configuration.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Policies tried in order; the first whose `match` fits and whose key
    /// parts are all present limits the request.
    pub policies: Vec<PolicyConfig>,
    /// Requests matching any of these rules are never limited.
    #[serde(default)]
    pub allowlist: Vec<MatchConfig>,
    /// Bucket slots shared by all workers and policies, in sets of 16 (fixes memory).
    #[serde(default = "default_slots")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 1_048_576)))]
    pub slots: u32,
    /// What a new key gets when every slot of its set holds another key's
    /// bucket that is not full: `evict` (take over the bucket full soonest),
    /// `limit` (refuse the request) or `allow` (let it through, fail-open).
    #[serde(default)]
    pub table_full: WhenFull,
    /// Divide every rate and burst by this many proxies that share one global budget.
    #[serde(default = "one")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 10_000)))]
    pub replicas: u32,
    /// Count and add headers but never block (every policy, unless it sets `shadow`).
    #[serde(default)]
    pub shadow: bool,
    /// Status and body of the reply to a limited request.
    #[serde(default)]
    pub limited_response: LimitedResponseConfig,
    /// Also send the IETF `RateLimit-Policy` and `RateLimit` headers.
    #[serde(default)]
    pub ietf_headers: bool,
    /// Send `X-RateLimit-Limit`, `-Remaining` and `-Reset` on responses and
    /// on the limited reply (`false`: only `Retry-After` on the limited
    /// reply, plus the IETF headers if `ietfHeaders`).
    #[serde(default = "yes")]
    pub x_rate_limit_headers: bool,
    /// The rate limit service (Envoy's `envoy.service.ratelimit.v3` gRPC
    /// protocol) that keeps the counts of `mode: global` policies; required
    /// when a policy is global.
    #[serde(default)]
    pub rate_limit_service: Option<RateLimitServiceConfig>,
}

/// Default timeout of a call to the rate limit service, in milliseconds.
pub const DEFAULT_RLS_TIMEOUT_MS: u32 = 100;
/// Allowed timeouts: above Envoy's 20 ms default (too short for a
/// Redis-backed service on a busy node), at most 10 s.
pub const MIN_RLS_TIMEOUT_MS: u32 = 21;
pub const MAX_RLS_TIMEOUT_MS: u32 = 10_000;

/// Where global policies are counted.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitServiceConfig {
    /// The Envoy cluster of the service, e.g. Istio's
    /// `outbound|8081||ratelimit.meshpatterns.svc.cluster.local`.
    pub cluster: String,
    /// `:authority` of the calls; default: the host of an Istio
    /// `outbound|port|subset|host` cluster name, else Envoy's default (the
    /// cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// The `domain` of every request (the service's limits namespace).
    #[serde(default = "default_domain")]
    pub domain: String,
    /// How long a request waits for the service before the policy's
    /// `failureMode` applies, 21..=10000 ms.
    #[serde(default = "default_rls_timeout")]
    #[cfg_attr(feature = "schema", schemars(range(min = 21, max = 10_000)))]
    pub timeout_ms: u32,
}

fn default_domain() -> String {
    "meshpatterns".to_string()
}

fn default_rls_timeout() -> u32 {
    DEFAULT_RLS_TIMEOUT_MS
}

/// Where a policy's counts live.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// A token bucket in this Envoy's shared data (all its workers).
    #[default]
    Local,
    /// A fixed window kept by the rate limit service (every proxy asking it).
    Global,
}

/// What a global policy does when the rate limit service does not answer in time.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// Let the request through, unlimited.
    #[default]
    Open,
    /// Refuse it (503; gRPC UNAVAILABLE).
    Closed,
}

fn default_slots() -> u32 {
    DEFAULT_SLOTS
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// One rate-limit policy as written.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyConfig {
    /// Name used in metrics, headers and filter state: `[a-z0-9_-]`, 1..=64 characters.
    pub name: String,
    /// Which requests this policy applies to (default: all).
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// Key parts, combined: one bucket per distinct combination. Each is a
    /// core key source (`{"header": "x-api-key"}`, `{"clientAddress": {...}}`, `"path"` ...).
    pub key: Vec<KeySourceConfig>,
    /// Requests per `per`.
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 1_000_000_000)))]
    pub rate: u64,
    /// Unit of `rate`.
    #[serde(default)]
    pub per: Unit,
    /// Bucket capacity: requests allowed at once after a quiet period (default `rate`).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 1_000_000_000)))]
    pub burst: Option<u64>,
    /// Override the top-level `shadow` for this policy.
    #[serde(default)]
    pub shadow: Option<bool>,
    /// `local` (a token bucket per Envoy) or `global` (a fixed window of
    /// `rate` requests per `per`, counted by the rate limit service).
    #[serde(default)]
    pub mode: Mode,
    /// Global policies: `open` (default) or `closed` when the service fails.
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
}

/// Unit of a rate.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Unit {
    #[default]
    Second,
    Minute,
    Hour,
    Day,
}

impl Unit {
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3600,
            Unit::Day => 86_400,
        }
    }
}

/// Conditions on a request, all of which must hold (an empty rule matches
/// everything): core's shared `match` block (`hosts`, `pathPrefixes`,
/// `methods`, `headers`, `not`) plus the client address ranges only the rate
/// limiter needs.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchConfig {
    /// Authorities without port: `example.com` or `*.example.com`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Prefixes of the normalised path, each starting with `/`.
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    /// The method is one of these.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header conditions, all of which must hold: present (default), absent
    /// (`present: false`) or equal to `exact`.
    #[serde(default)]
    pub headers: Vec<HeaderMatchConfig>,
    /// Requests matching this block are excluded.
    #[serde(default)]
    pub not: Option<Box<ScopeConfig>>,
    /// The client address is in one of these CIDR ranges.
    #[serde(default)]
    pub client_cidrs: Vec<String>,
    /// X-Forwarded-For hops trusted when finding the client address for `clientCidrs`.
    #[serde(default)]
    pub trusted_hops: u32,
    /// Deprecated: one prefix of the path; use `pathPrefixes`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("deprecated" = true)))]
    pub path_prefix: Option<String>,
}

/// A header condition of a rate-limiter `match` block.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatchConfig {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub present: Option<bool>,
    /// Deprecated: use `exact`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("deprecated" = true)))]
    pub value: Option<String>,
}

/// The reply to a limited request.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitedResponseConfig {
    #[serde(default = "default_status")]
    #[cfg_attr(feature = "schema", schemars(range(min = 400, max = 599)))]
    pub status: u32,
    /// gRPC status for a gRPC request (`content-type: application/grpc*`),
    /// 1..=16; default 8 RESOURCE_EXHAUSTED (14 UNAVAILABLE would be retried
    /// by Istio's default retry policy).
    #[serde(default = "default_grpc_status")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 16)))]
    pub grpc_status: u32,
    /// A JSON value sent as the body; default `{"error": "rate_limited", "policy": ..., "retryAfterSeconds": ...}`.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
}

impl Default for LimitedResponseConfig {
    fn default() -> Self {
        LimitedResponseConfig { status: default_status(), grpc_status: default_grpc_status(), body: None }
    }
}

fn default_status() -> u32 {
    429
}

/// gRPC RESOURCE_EXHAUSTED.
fn default_grpc_status() -> u32 {
    8
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parse `10.0.0.0/8`, `2001:db8::/32` or a bare address (a single host).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        fn masked(bits: u128, width: u32, prefix: u8) -> u128 {
            let keep = u32::from(prefix).min(width);
            if keep == 0 {
                0
            } else {
                bits >> (width - keep)
            }
        }
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => masked(u32::from(n).into(), 32, self.prefix) == masked(u32::from(*a).into(), 32, self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => masked(u128::from(n), 128, self.prefix) == masked(u128::from(*a), 128, self.prefix),
            (IpAddr::V4(_), IpAddr::V6(a)) => a.to_ipv4_mapped().is_some_and(|v4| self.contains(&IpAddr::V4(v4))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

/// A validated match rule.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub scope: Matcher,
    pub client_cidrs: Vec<Cidr>,
    pub trusted_hops: usize,
}

impl Match {
    /// Validate; errors name the field relative to the block. The deprecated
    /// fields it uses are added to `deprecated` (relative too).
    fn try_from_config(c: &MatchConfig, deprecated: &mut Vec<Deprecation>) -> Result<Match, ConfigError> {
        let mut path_prefixes = c.path_prefixes.clone();
        if let Some(p) = &c.path_prefix {
            if !c.path_prefixes.is_empty() {
                return Err(ConfigError::new("pathPrefix", format!("{p:?}"), "absent when `pathPrefixes` is set (it replaces it)"));
            }
            path_prefixes.push(p.clone());
            deprecated.push(Deprecation { old: "pathPrefix".into(), new: "pathPrefixes".into() });
        }
        let mut headers = Vec::new();
        for (i, h) in c.headers.iter().enumerate() {
            let exact = match (&h.value, &h.exact) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        format!("headers[{i}].value"),
                        "set together with exact",
                        "`exact` alone (`value` is its old name)",
                    ))
                }
                (Some(v), None) => {
                    deprecated.push(Deprecation { old: format!("headers[{i}].value"), new: format!("headers[{i}].exact") });
                    Some(v.clone())
                }
                (None, e) => e.clone(),
            };
            headers.push(HeaderCondition { name: h.name.clone(), exact, present: h.present });
        }
        let scope = ScopeConfig {
            hosts: c.hosts.clone(),
            path_prefixes,
            // Methods were compared without regard to case: keep accepting `get`.
            methods: c.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            headers,
            not: c.not.clone(),
        };
        let scope = Matcher::try_new(&scope).map_err(|e| {
            if e.field.starts_with("pathPrefixes") && c.path_prefix.is_some() {
                ConfigError { field: "pathPrefix".into(), ..e }
            } else {
                e
            }
        })?;
        let mut client_cidrs = Vec::new();
        for (i, s) in c.client_cidrs.iter().enumerate() {
            let cidr = Cidr::parse(s).ok_or_else(|| {
                ConfigError::new(
                    format!("clientCidrs[{i}]"),
                    format!("{s:?}"),
                    "an IPv4 or IPv6 address or CIDR range (10.0.0.0/8, ::1/128)",
                )
            })?;
            client_cidrs.push(cidr);
        }
        if c.trusted_hops > MAX_TRUSTED_HOPS {
            return Err(ConfigError::new("trustedHops", c.trusted_hops, format!("0..={MAX_TRUSTED_HOPS}")));
        }
        Ok(Match { scope, client_cidrs, trusted_hops: c.trusted_hops as usize })
    }

    pub fn is_empty(&self) -> bool {
        self.scope.is_empty() && self.client_cidrs.is_empty()
    }
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    /// `le32(len(name)) || name`: how the placement hash's input starts
    /// (see [`crate::logic::place_request`]), made once.
    pub hash_prefix: Vec<u8>,
    pub matcher: Match,
    pub key: Vec<KeySource>,
    pub bucket: BucketParams,
    pub shadow: bool,
    /// Set for a global policy: counted by the rate limit service.
    pub global: Option<Global>,
}

/// A global policy's window as the rate limit service counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Global {
    pub requests_per_unit: u32,
    pub unit: Unit,
    pub failure: FailureMode,
}

/// The validated rate limit service settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitService {
    /// The serialized GrpcService (cluster and authority) for the call.
    pub grpc_service: Vec<u8>,
    pub cluster: String,
    pub authority: String,
    pub domain: String,
    pub timeout_ms: u32,
}

/// The host of an Istio outbound cluster name `outbound|<port>|<subset>|<host>`.
pub fn istio_cluster_host(cluster: &str) -> Option<&str> {
    let mut parts = cluster.split('|');
    let (Some("outbound" | "inbound"), Some(_port), Some(_subset), Some(host), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (!host.is_empty()).then_some(host)
}

/// The reply to limited requests.
#[derive(Debug, Clone)]
pub struct LimitedResponse {
    pub status: u32,
    pub grpc_status: u32,
    /// Serialised custom body; `None` sends the default body.
    pub body: Option<String>,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub policies: Vec<Policy>,
    pub allowlist: Vec<Match>,
    pub slots: u32,
    pub table_full: WhenFull,
    pub replicas: u32,
    pub limited: LimitedResponse,
    pub ietf_headers: bool,
    pub x_rate_limit_headers: bool,
    /// Deprecated fields this config used, for one warning at configure.
    pub deprecated: Vec<Deprecation>,
    /// Set when a policy is global.
    pub rls: Option<RateLimitService>,
}

impl Settings {
    /// One log line naming every deprecated field used and its replacement;
    /// `None` when the config uses none.
    pub fn deprecation_warning(&self) -> Option<String> {
        meshpatterns_core::error::deprecation_warning("rate-limiter", &self.deprecated)
    }

    /// Whether some policy keeps its bucket in this Envoy (the table is needed).
    pub fn has_local(&self) -> bool {
        self.policies.iter().any(|p| p.global.is_none())
    }
}

fn policy_name(field: &str, n: &str) -> Result<String, ConfigError> {
    let ok = !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        return Err(ConfigError::new(
            field,
            format!("{n:?}"),
            "1 to 64 characters from a-z, 0-9, '_' and '-' (it is part of metric names)",
        ));
    }
    Ok(n.to_string())
}

impl Settings {
    pub fn try_from_config(c: Config) -> Result<Settings, ConfigError> {
        if c.slots == 0 || c.slots > MAX_SLOTS {
            return Err(ConfigError::new("slots", c.slots, format!("1..={MAX_SLOTS} (default {DEFAULT_SLOTS})")));
        }
        if c.replicas == 0 || c.replicas > MAX_REPLICAS {
            return Err(ConfigError::new("replicas", c.replicas, format!("1..={MAX_REPLICAS}")));
        }
        if c.policies.is_empty() || c.policies.len() > MAX_POLICIES {
            return Err(ConfigError::new("policies", format!("{} policies", c.policies.len()), format!("1..={MAX_POLICIES} policies")));
        }
        let status = c.limited_response.status;
        if !(400..=599).contains(&status) {
            return Err(ConfigError::new("limitedResponse.status", status, "an HTTP error status, 400..=599"));
        }
        let grpc_status = c.limited_response.grpc_status;
        if !(1..=16).contains(&grpc_status) {
            return Err(ConfigError::new("limitedResponse.grpcStatus", grpc_status, "a gRPC error status, 1..=16 (8 RESOURCE_EXHAUSTED)"));
        }
        let body = c.limited_response.body.as_ref().map(|b| b.to_string());
        if let Some(b) = &body {
            if b.len() > MAX_BODY_BYTES {
                return Err(ConfigError::new(
                    "limitedResponse.body",
                    format!("{} bytes", b.len()),
                    format!("at most {MAX_BODY_BYTES} bytes of JSON"),
                ));
            }
        }
        let mut policies = Vec::new();
        let mut deprecated = Vec::new();
        for (i, p) in c.policies.iter().enumerate() {
            let mut used = Vec::new();
            let policy = compile_policy(p, c.replicas, c.shadow, &mut used).map_err(|e| e.at(&format!("policies[{i}]")))?;
            deprecated.extend(
                used.into_iter()
                    .map(|d| Deprecation { old: format!("policies[{i}].match.{}", d.old), new: format!("policies[{i}].match.{}", d.new) }),
            );
            // At most MAX_POLICIES names: a scan, not a set.
            if policies.iter().any(|p: &Policy| p.name == policy.name) {
                return Err(ConfigError::new(format!("policies[{i}].name"), format!("{:?}", policy.name), "a name no other policy uses"));
            }
            policies.push(policy);
        }
        let rls = match (&c.rate_limit_service, policies.iter().position(|p| p.global.is_some())) {
            (Some(r), _) => Some(compile_rls(r).map_err(|e| e.at("rateLimitService"))?),
            (None, Some(i)) => {
                return Err(ConfigError::new(
                    "rateLimitService",
                    "absent",
                    format!("the rate limit service's cluster (policies[{i}] has mode global), e.g. {{\"cluster\": \"outbound|8081||ratelimit.<namespace>.svc.cluster.local\"}}"),
                ))
            }
            (None, None) => None,
        };
        let mut allowlist = Vec::new();
        for (i, m) in c.allowlist.iter().enumerate() {
            let mut used = Vec::new();
            let rule = Match::try_from_config(m, &mut used).map_err(|e| e.at(&format!("allowlist[{i}]")))?;
            deprecated.extend(
                used.into_iter()
                    .map(|d| Deprecation { old: format!("allowlist[{i}].{}", d.old), new: format!("allowlist[{i}].{}", d.new) }),
            );
            if rule.is_empty() {
                return Err(ConfigError::new(
                    format!("allowlist[{i}]"),
                    "{}",
                    "at least one of hosts, pathPrefixes, methods, headers, not, clientCidrs (an empty rule would allow everyone)",
                ));
            }
            allowlist.push(rule);
        }
        Ok(Settings {
            policies,
            allowlist,
            slots: c.slots,
            table_full: c.table_full,
            replicas: c.replicas,
            limited: LimitedResponse { status, grpc_status, body },
            ietf_headers: c.ietf_headers,
            x_rate_limit_headers: c.x_rate_limit_headers,
            deprecated,
            rls,
        })
    }
}

fn compile_rls(r: &RateLimitServiceConfig) -> Result<RateLimitService, ConfigError> {
    if r.cluster.is_empty() || r.cluster.len() > 512 {
        return Err(ConfigError::new("cluster", format!("{:?}", r.cluster), "an Envoy cluster name, 1 to 512 bytes"));
    }
    let authority = match &r.authority {
        Some(a) => {
            let ok = !a.is_empty() && a.len() <= 255 && a.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
            if !ok {
                return Err(ConfigError::new("authority", format!("{a:?}"), "a host or host:port (letters, digits, '.', '-', '_', ':')"));
            }
            a.clone()
        }
        None => istio_cluster_host(&r.cluster).unwrap_or_default().to_string(),
    };
    if r.domain.is_empty() || r.domain.len() > 256 {
        return Err(ConfigError::new("domain", format!("{:?}", r.domain), "1 to 256 bytes (the service's limits namespace)"));
    }
    if !(MIN_RLS_TIMEOUT_MS..=MAX_RLS_TIMEOUT_MS).contains(&r.timeout_ms) {
        return Err(ConfigError::new(
            "timeoutMs",
            r.timeout_ms,
            format!(
                "{MIN_RLS_TIMEOUT_MS}..={MAX_RLS_TIMEOUT_MS} milliseconds (default {DEFAULT_RLS_TIMEOUT_MS}; above Envoy's 20 ms default, which a Redis-backed service on a busy node misses)"
            ),
        ));
    }
    Ok(RateLimitService {
        grpc_service: super::rls::grpc_service(&r.cluster, &authority),
        cluster: r.cluster.clone(),
        authority,
        domain: r.domain.clone(),
        timeout_ms: r.timeout_ms,
    })
}

fn compile_policy(p: &PolicyConfig, replicas: u32, shadow: bool, deprecated: &mut Vec<Deprecation>) -> Result<Policy, ConfigError> {
    let name = policy_name("name", &p.name)?;
    let matcher = Match::try_from_config(&p.matcher, deprecated).map_err(|e| e.at("match"))?;
    if p.key.is_empty() || p.key.len() > MAX_KEY_PARTS {
        return Err(ConfigError::new("key", format!("{} parts", p.key.len()), format!("1..={MAX_KEY_PARTS} key sources, combined")));
    }
    let mut key = Vec::new();
    for (j, c) in p.key.iter().enumerate() {
        let field = format!("key[{j}]");
        key.push(KeySource::try_from_config(c).map_err(|e| e.at(&field))?);
    }
    if p.rate == 0 || p.rate > MAX_RATE {
        return Err(ConfigError::new("rate", p.rate, format!("1..={MAX_RATE} requests per `per`")));
    }
    if p.mode == Mode::Global {
        if let Some(b) = p.burst {
            return Err(ConfigError::new(
                "burst",
                b,
                "no burst for mode global: the rate limit service counts fixed windows of `rate` requests per `per` and has no bucket capacity (remove `burst`, or use mode local)",
            ));
        }
        let requests_per_unit = u32::try_from(p.rate).map_err(|_| {
            ConfigError::new("rate", p.rate, format!("1..={} for mode global (the protocol's requests_per_unit)", u32::MAX))
        })?;
        // The window is the whole `per`: `rate` requests, the budget not
        // divided by `replicas` (every proxy asks the same service).
        let bucket = BucketParams { capacity: p.rate * COST_MILLI, refill: p.rate * COST_MILLI, unit_ns: p.per.seconds() * 1_000_000_000 };
        let global = Global { requests_per_unit, unit: p.per, failure: p.failure_mode.unwrap_or_default() };
        return Ok(Policy {
            hash_prefix: hash_prefix(&name),
            name,
            matcher,
            key,
            bucket,
            shadow: p.shadow.unwrap_or(shadow),
            global: Some(global),
        });
    }
    if let Some(f) = p.failure_mode {
        return Err(ConfigError::new(
            "failureMode",
            match f {
                FailureMode::Open => "open",
                FailureMode::Closed => "closed",
            },
            "only with mode global (a local policy's bucket is in this Envoy; it fails open, counted in fail_open)",
        ));
    }
    let burst = p.burst.unwrap_or(p.rate);
    if burst < p.rate || burst > MAX_RATE {
        return Err(ConfigError::new("burst", burst, format!("{}..={MAX_RATE} (at least `rate`, {})", p.rate, p.rate)));
    }
    if burst < u64::from(replicas) {
        return Err(ConfigError::new(
            "burst",
            burst,
            format!("at least `replicas` ({replicas}), so that each replica's share holds one request"),
        ));
    }
    let bucket = BucketParams {
        capacity: burst * COST_MILLI / u64::from(replicas),
        refill: (p.rate * COST_MILLI / u64::from(replicas)).max(1),
        unit_ns: p.per.seconds() * 1_000_000_000,
    };
    Ok(Policy { hash_prefix: hash_prefix(&name), name, matcher, key, bucket, shadow: p.shadow.unwrap_or(shadow), global: None })
}

/// [`Policy::hash_prefix`] of a policy named `name`.
fn hash_prefix(name: &str) -> Vec<u8> {
    [&(name.len() as u32).to_le_bytes()[..], name.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    pub fn settings(json: &str) -> Result<Settings, ConfigError> {
        let c: Config = meshpatterns_core::error::parse_json(json.as_bytes())?;
        Settings::try_from_config(c)
    }

    fn err(json: &str) -> ConfigError {
        settings(json).expect_err(json)
    }

    #[test]
    fn defaults() {
        let s = settings(r#"{"policies":[{"name":"per-client","key":[{"clientAddress":{}}],"rate":100}]}"#).unwrap();
        assert_eq!((s.slots, s.replicas, s.limited.status, s.ietf_headers), (DEFAULT_SLOTS, 1, 429, false));
        assert!(s.x_rate_limit_headers);
        assert_eq!((s.table_full, s.limited.grpc_status), (WhenFull::Evict, 8));
        let p = &s.policies[0];
        assert_eq!(p.bucket, BucketParams { capacity: 100_000, refill: 100_000, unit_ns: 1_000_000_000 });
        assert!(!p.shadow && p.matcher.is_empty());
        let s = settings(r#"{"tableFull":"limit","limitedResponse":{"grpcStatus":14},"policies":[{"name":"p","key":["path"],"rate":1}]}"#)
            .unwrap();
        assert_eq!((s.table_full, s.limited.grpc_status, s.limited.status), (WhenFull::Limit, 14, 429));
    }

    #[test]
    fn replicas_divide_the_budget() {
        let s = settings(r#"{"replicas":3,"policies":[{"name":"k","key":["path"],"rate":10000,"per":"minute","burst":12000}]}"#).unwrap();
        assert_eq!(s.policies[0].bucket, BucketParams { capacity: 4_000_000, refill: 3_333_333, unit_ns: 60_000_000_000 });
    }

    #[test]
    fn bad_configs_name_the_field() {
        let p = |body: &str| format!(r#"{{"policies":[{{"name":"a","key":["path"],{body}}}]}}"#);
        assert_eq!(err(&p(r#""rate":0"#)).field, "policies[0].rate");
        assert_eq!(err(&p(r#""rate":10,"burst":5"#)).field, "policies[0].burst");
        let e = err(r#"{"policies":[{"name":"a","key":["path",{"haeder":"x"}],"rate":1}]}"#);
        assert_eq!(e.field, "policies[0].key[1]");
        assert!(e.allowed.contains("unknown variant `haeder`"), "{e}");
        assert_eq!(err(r#"{"policies":[{"name":"a","key":[{"header":"bad name"}],"rate":1}]}"#).field, "policies[0].key[0].header");
        assert_eq!(err(r#"{"policies":[{"name":"a","key":[],"rate":1}]}"#).field, "policies[0].key");
        let e = err(&p(r#""rate":1,"brust":5"#));
        assert!(e.to_string().contains("unknown field `brust`"), "{e}");
        let e = err(r#"{"policies":[],"colour":1}"#);
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        assert_eq!(err(r#"{"policies":[]}"#).field, "policies");
        assert_eq!(err(r#"{"policies":[{"name":"Per Client","key":["path"],"rate":1}]}"#).field, "policies[0].name");
        assert_eq!(
            err(r#"{"policies":[{"name":"a","key":["path"],"rate":1},{"name":"a","key":["path"],"rate":1}]}"#).field,
            "policies[1].name"
        );
        assert_eq!(err(&format!(r#"{{"slots":0,{}"#, &p(r#""rate":1"#)[1..])).field, "slots");
        assert_eq!(err(&format!(r#"{{"slots":2000000,{}"#, &p(r#""rate":1"#)[1..])).field, "slots");
        assert_eq!(err(&format!(r#"{{"replicas":0,{}"#, &p(r#""rate":1"#)[1..])).field, "replicas");
        assert_eq!(err(&format!(r#"{{"replicas":5,{}"#, &p(r#""rate":2"#)[1..])).field, "policies[0].burst");
        assert_eq!(err(&format!(r#"{{"limitedResponse":{{"status":200}},{}"#, &p(r#""rate":1"#)[1..])).field, "limitedResponse.status");
        assert_eq!(err(&p(r#""rate":1,"match":{"pathPrefix":"api"}"#)).field, "policies[0].match.pathPrefix");
        assert_eq!(err(&p(r#""rate":1,"match":{"clientCidrs":["10.0.0.0/33"]}"#)).field, "policies[0].match.clientCidrs[0]");
        assert_eq!(err(&p(r#""rate":1,"match":{"headers":[{"name":""}]}"#)).field, "policies[0].match.headers[0].name");
        assert_eq!(err(&p(r#""rate":1,"match":{"methods":["GE T"]}"#)).field, "policies[0].match.methods[0]");
        assert_eq!(err(&format!(r#"{{"allowlist":[{{}}],{}"#, &p(r#""rate":1"#)[1..])).field, "allowlist[0]");
        let e = err(&p(r#""rate":1,"per":"fortnight""#));
        assert!(e.to_string().contains("unknown variant `fortnight`"), "{e}");
        assert_eq!(e.field, "policies[0].per");
        // wrong types name the field too
        let e = err(&p(r#""rate":"NaN""#));
        assert_eq!((e.field.as_str(), e.value.as_str()), ("policies[0].rate", "\"NaN\""), "{e}");
        assert_eq!(err(&p(r#""rate":-1"#)).field, "policies[0].rate");
        assert_eq!(err(&p(r#""rate":1,"burst":2.5"#)).field, "policies[0].burst");
        assert_eq!(err(r#"{"policies":[{"name":"a","key":[{"pathSegment":"x"}],"rate":1}]}"#).field, "policies[0].key[0].pathSegment");
        assert_eq!(err(&format!(r#"{{"slots":"many",{}"#, &p(r#""rate":1"#)[1..])).field, "slots");
        let e = err(&format!(r#"{{"tableFull":"drop",{}"#, &p(r#""rate":1"#)[1..]));
        assert_eq!(e.field, "tableFull", "{e}");
        assert!(e.to_string().contains("evict"), "{e}");
        assert_eq!(
            err(&format!(r#"{{"limitedResponse":{{"grpcStatus":0}},{}"#, &p(r#""rate":1"#)[1..])).field,
            "limitedResponse.grpcStatus"
        );
        assert_eq!(
            err(&format!(r#"{{"limitedResponse":{{"grpcStatus":17}},{}"#, &p(r#""rate":1"#)[1..])).field,
            "limitedResponse.grpcStatus"
        );
    }

    #[test]
    fn global_policies_map_to_fixed_windows() {
        let s = settings(
            r#"{"replicas":3,"rateLimitService":{"cluster":"outbound|8081||ratelimit.mp.svc.cluster.local"},
                "policies":[{"name":"g","key":["path"],"rate":300,"per":"minute","mode":"global","failureMode":"closed"},
                            {"name":"l","key":["path"],"rate":3}]}"#,
        )
        .unwrap();
        let g = s.policies[0].global.unwrap();
        assert_eq!((g.requests_per_unit, g.unit, g.failure), (300, Unit::Minute, FailureMode::Closed));
        // not divided by replicas; the window is the whole minute
        assert_eq!(s.policies[0].bucket.window_secs(), 60);
        assert_eq!(s.policies[0].bucket.capacity, 300_000);
        assert!(s.policies[1].global.is_none() && s.has_local());
        let r = s.rls.unwrap();
        assert_eq!((r.authority.as_str(), r.domain.as_str(), r.timeout_ms), ("ratelimit.mp.svc.cluster.local", "meshpatterns", 100));
        assert_eq!(
            r.grpc_service,
            crate::logic::rls::grpc_service("outbound|8081||ratelimit.mp.svc.cluster.local", "ratelimit.mp.svc.cluster.local")
        );
        let s = settings(
            r#"{"rateLimitService":{"cluster":"rls","authority":"rls.local:8081","domain":"d","timeoutMs":250},
                "policies":[{"name":"g","key":["path"],"rate":1,"per":"day","mode":"global"}]}"#,
        )
        .unwrap();
        assert_eq!(s.policies[0].global.unwrap().failure, FailureMode::Open);
        assert!(!s.has_local());
        let r = s.rls.unwrap();
        assert_eq!((r.authority.as_str(), r.domain.as_str(), r.timeout_ms), ("rls.local:8081", "d", 250));
        assert_eq!(istio_cluster_host("rls"), None);
        assert_eq!(istio_cluster_host("outbound|80|v1|a.b"), Some("a.b"));
    }

    #[test]
    fn what_cannot_map_to_a_window_is_refused() {
        let rls = r#""rateLimitService":{"cluster":"rls"}"#;
        let g = |extra: &str| format!(r#"{{{rls},"policies":[{{"name":"g","key":["path"],"rate":10,"mode":"global"{extra}}}]}}"#);
        let e = err(&g(r#","burst":20"#));
        assert_eq!(e.field, "policies[0].burst", "{e}");
        assert!(e.allowed.contains("fixed windows"), "{e}");
        // even a burst equal to the rate: a window is not a bucket
        assert_eq!(err(&g(r#","burst":10"#)).field, "policies[0].burst");
        let e = err(&g(r#","per":"week""#));
        assert_eq!(e.field, "policies[0].per", "{e}");
        assert_eq!(err(&g(r#","mode":"cluster""#)).field, "policies[0].mode");
        assert_eq!(err(&g(r#","failureMode":"maybe""#)).field, "policies[0].failureMode");
        let e = err(r#"{"policies":[{"name":"l","key":["path"],"rate":1,"failureMode":"closed"}]}"#);
        assert_eq!(e.field, "policies[0].failureMode", "{e}");
        let e = err(r#"{"policies":[{"name":"l","key":["path"],"rate":1},{"name":"g","key":["path"],"rate":1,"mode":"global"}]}"#);
        assert_eq!(e.field, "rateLimitService", "{e}");
        assert!(e.allowed.contains("policies[1]"), "{e}");
        let p = r#""policies":[{"name":"g","key":["path"],"rate":1,"mode":"global"}]"#;
        for (svc, field) in [
            (r#"{"cluster":"rls","timeoutMs":20}"#, "rateLimitService.timeoutMs"),
            (r#"{"cluster":"rls","timeoutMs":10001}"#, "rateLimitService.timeoutMs"),
            (r#"{"cluster":""}"#, "rateLimitService.cluster"),
            (r#"{"cluster":"rls","authority":"a b"}"#, "rateLimitService.authority"),
            (r#"{"cluster":"rls","domain":""}"#, "rateLimitService.domain"),
            (r#"{"cluster":"rls","timeout":5}"#, "rateLimitService.timeout"),
            (r#"{}"#, "rateLimitService.cluster"),
        ] {
            let e = err(&format!(r#"{{"rateLimitService":{svc},{p}}}"#));
            assert_eq!(e.field, field, "{svc}: {e}");
        }
        let e = err(&format!(r#"{{"rateLimitService":{{"cluster":"rls","timeoutMs":20}},{p}}}"#));
        assert!(e.allowed.contains("21..=10000"), "{e}");
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(&"10.1.255.3".parse().unwrap()));
        assert!(!c.contains(&"10.2.0.1".parse().unwrap()));
        assert!(c.contains(&"::ffff:10.1.0.9".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(&"1.2.3.4".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(&"2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains(&"2001:db9::1".parse().unwrap()));
        assert!(!v6.contains(&"10.0.0.1".parse().unwrap()));
        assert_eq!(Cidr::parse("127.0.0.1"), Some(Cidr { addr: "127.0.0.1".parse().unwrap(), prefix: 32 }));
        assert!(Cidr::parse("1.2.3.4/x").is_none() && Cidr::parse("::1/129").is_none() && Cidr::parse("host").is_none());
    }

    #[test]
    fn policy_match_is_the_core_matcher_and_the_old_names_still_read() {
        let pol = |m: &str| format!(r#"{{"policies":[{{"name":"p","match":{m},"key":["path"],"rate":1}}]}}"#);
        // The shared syntax: no deprecation.
        let s = settings(&pol(r#"{"hosts":["api.example.com"],"pathPrefixes":["/api/"],"headers":[{"name":"x-k","exact":"v"}],"not":{"methods":["OPTIONS"]}}"#)).unwrap();
        assert_eq!(s.deprecation_warning(), None);
        assert!(!s.policies[0].matcher.is_empty());
        // The old names: read, translated, reported with their full paths.
        let s = settings(&pol(r#"{"pathPrefix":"/api/","methods":["get"],"headers":[{"name":"x-k","value":"v"}]}"#)).unwrap();
        assert_eq!(
            s.deprecated,
            vec![
                Deprecation { old: "policies[0].match.pathPrefix".into(), new: "policies[0].match.pathPrefixes".into() },
                Deprecation { old: "policies[0].match.headers[0].value".into(), new: "policies[0].match.headers[0].exact".into() },
            ]
        );
        let w = s.deprecation_warning().unwrap();
        assert!(
            w.starts_with("rate-limiter: deprecated config fields")
                && w.contains("`policies[0].match.pathPrefix` (use `policies[0].match.pathPrefixes`)"),
            "{w}"
        );
        let s = settings(r#"{"policies":[{"name":"p","key":["path"],"rate":1}],"allowlist":[{"headers":[{"name":"x-i","value":"b"}]}]}"#)
            .unwrap();
        assert_eq!(s.deprecated[0].old, "allowlist[0].headers[0].value");
        // Old and new names together are refused, naming the old one.
        assert_eq!(err(&pol(r#"{"pathPrefix":"/a","pathPrefixes":["/b"]}"#)).field, "policies[0].match.pathPrefix");
        assert_eq!(err(&pol(r#"{"headers":[{"name":"x","value":"a","exact":"b"}]}"#)).field, "policies[0].match.headers[0].value");
        // The core matcher's own checks, with the policy's path.
        assert_eq!(err(&pol(r#"{"hosts":["a.com:80"]}"#)).field, "policies[0].match.hosts[0]");
        assert_eq!(err(&pol(r#"{"not":{"not":{}}}"#)).field, "policies[0].match.not.not");
        // An allowlist rule must say something; `not` alone does (all but ...).
        assert_eq!(err(r#"{"policies":[{"name":"p","key":["path"],"rate":1}],"allowlist":[{}]}"#).field, "allowlist[0]");
        assert!(settings(r#"{"policies":[{"name":"p","key":["path"],"rate":1}],"allowlist":[{"not":{"methods":["GET"]}}]}"#).is_ok());
    }
}
