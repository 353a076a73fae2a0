//! The experiment decision, free of proxy-wasm: which user this is, which arm
//! of each experiment the user belongs to, which routing header value that
//! means, and what is exposed to analytics.
//!
//! # Assignment
//!
//! A user is placed by `bucket = XXH64(le32(len(salt)) || salt || userKey) mod 10,000`
//! ([`meshpatterns_core::hash::salted_hash64`] and [`meshpatterns_core::hash::bucket`]).
//! An arm with `percent: p` owns `p × 100` buckets (basis points), so
//! percentages may have two decimals (`12.5`, `0.25`) and must add up to
//! exactly 100. The salt (default: the experiment name) decorrelates
//! experiments: the same user lands in unrelated buckets of two experiments.
//!
//! # Ramp-safe bucket layout
//!
//! One arm is the *control* (`controlArm`, default the first arm listed); it
//! owns every bucket the other arms do not. The other arms, the *treatments*,
//! are numbered `0..k` in config order, and treatment `i` with `n` buckets
//! owns exactly the buckets
//!
//! ```text
//! b = i + k·j   for j = 0, 1, …, n − 1
//! ```
//!
//! that is, the first `n` buckets of its own residue class modulo `k`. With a
//! single treatment (`k = 1`) that is simply `0 ≤ b < n`. Consequences:
//!
//! * raising a treatment from `n` to `n'` buckets adds the buckets
//!   `j = n … n'−1` of its class, all taken from control; nobody leaves that
//!   treatment and no other treatment changes;
//! * lowering it removes exactly the buckets `j = n' … n−1`, which go back to
//!   control; nobody joins it and no other treatment changes;
//! * a treatment can hold at most the size of its class, `⌈(10,000 − i) / k⌉`
//!   buckets (all of them with one treatment, 50 % each with two, 33.33 %
//!   with three); the control arm has no limit. Adding, removing or
//!   reordering treatments changes `k` and reshuffles them: that is a new
//!   experiment (change the salt too).
//!
//! # Precedence, per experiment
//!
//! 1. a QA override (only with the configured shared secret, compared in
//!    constant time) forces the named arm;
//! 2. a request outside the targeting (path prefix, headers, cookies) is
//!    *untargeted* and routed to control;
//! 3. a request without a user key (and no assignment cookie configured) is
//!    routed to control;
//! 4. a user on the deny list is routed to control; on the allow list, to the
//!    listed arm;
//! 5. everyone else goes to the arm owning their bucket.
//!
//! Only 1, 4 (allow) and 5 put the user *in* the experiment: those arms are
//! exposed in the response header and cookie; the others are routed to control
//! without being exposed. Per-arm metrics count case 5 only, so the
//! comparison between arms is between randomly assigned users.

use std::collections::{BTreeMap, BTreeSet};

use meshpatterns_core::cookie::{self, CookieConfig, CookieSpec};
use meshpatterns_core::error::ConfigError;
use meshpatterns_core::hash;
use meshpatterns_core::key::{KeySourceConfig, KeySpec, MAX_KEY_BYTES};
use meshpatterns_core::{names, KeySource, RequestView};
use serde::Deserialize;

/// Buckets a user key is hashed into; an arm's percentage × 100 is its bucket count.
pub const BUCKETS: u64 = 10_000;
/// Default request header that carries the arm's target.
pub const DEFAULT_ROUTING_HEADER: &str = "x-experiment-arm";
/// Default QA override header and the header carrying the shared secret.
pub const DEFAULT_OVERRIDE_HEADER: &str = "x-experiment-override";
pub const DEFAULT_SECRET_HEADER: &str = "x-experiment-secret";

/// Limits that keep a config (and the work per request) bounded.
pub const MAX_EXPERIMENTS: usize = 32;
pub const MAX_ARMS: usize = 16;
pub const MAX_LIST: usize = 10_000;
pub const MIN_SECRET_BYTES: usize = 16;
const MAX_OVERRIDE_ITEMS: usize = 32;

/// The plugin configuration as written in JSON (Envoy) or YAML (Istio pluginConfig).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Where the user key comes from, tried in order.
    #[serde(default)]
    pub key_sources: Vec<KeySourceConfig>,
    /// Cookie issued to users without a key; carries their new id.
    #[serde(default)]
    pub assignment_cookie: Option<CookieConfig>,
    pub experiments: Vec<ExperimentConfig>,
    /// QA override: force arms with a header, only with the shared secret.
    #[serde(default, rename = "override")]
    pub qa_override: Option<OverrideConfig>,
    /// Response header listing the user's arms (`checkout-v2=treatment`).
    #[serde(default)]
    pub expose_header: Option<String>,
    /// Cookie listing the user's arms (`checkout-v2:treatment`), for client-side analytics.
    #[serde(default)]
    pub expose_cookie: Option<CookieConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    /// Hash salt; default: the experiment name.
    #[serde(default)]
    pub salt: Option<String>,
    /// Request header the filter writes with the arm's target.
    #[serde(default = "default_routing_header")]
    pub routing_header: String,
    /// The arm that owns the remaining buckets and serves everyone outside the experiment.
    #[serde(default)]
    pub control_arm: Option<String>,
    pub arms: Vec<ArmConfig>,
    #[serde(default)]
    pub targeting: TargetingConfig,
    /// User key -> arm, forced into the experiment.
    #[serde(default)]
    pub allow: BTreeMap<String, String>,
    /// User keys kept out of the experiment (served by control, not exposed).
    #[serde(default)]
    pub deny: Vec<String>,
}

fn default_routing_header() -> String {
    DEFAULT_ROUTING_HEADER.into()
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArmConfig {
    pub name: String,
    /// Share of users, 0 to 100 with at most two decimals.
    pub percent: f64,
    /// Routing header value: a cluster name (Envoy `cluster_header`) or the
    /// value an Istio VirtualService matches. Default: the arm name.
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetingConfig {
    /// The path (without query) starts with one of these; empty: any path.
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    /// Every listed header matches.
    #[serde(default)]
    pub headers: Vec<MatchConfig>,
    /// Every listed cookie matches.
    #[serde(default)]
    pub cookies: Vec<MatchConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchConfig {
    pub name: String,
    /// Accepted values (exact match); absent: the header or cookie must be present.
    #[serde(default)]
    pub values: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OverrideConfig {
    #[serde(default = "default_override_header")]
    pub header: String,
    #[serde(default = "default_secret_header")]
    pub secret_header: String,
    pub secret: String,
}

fn default_override_header() -> String {
    DEFAULT_OVERRIDE_HEADER.into()
}
fn default_secret_header() -> String {
    DEFAULT_SECRET_HEADER.into()
}

/// A validated arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    pub name: String,
    /// Buckets owned, out of [`BUCKETS`] (percent × 100).
    pub buckets: u64,
    pub target: String,
}

/// A validated targeting condition.
#[derive(Debug, Clone)]
pub struct Match {
    pub name: String,
    pub values: Option<Vec<String>>,
}

impl Match {
    fn accepts(&self, v: Option<&str>) -> bool {
        match (v, &self.values) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(vals)) => vals.iter().any(|x| x == v),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Targeting {
    pub path_prefixes: Vec<String>,
    pub headers: Vec<Match>,
    pub cookies: Vec<Match>,
}

impl Targeting {
    /// Whether the request is in the experiment's scope.
    pub fn matches(&self, req: &dyn RequestView) -> bool {
        if !self.path_prefixes.is_empty() {
            let path = req.path().unwrap_or_default();
            let path = path.split(['?', '#']).next().unwrap_or("");
            if !self.path_prefixes.iter().any(|p| path.starts_with(p.as_str())) {
                return false;
            }
        }
        if !self.headers.iter().all(|m| m.accepts(req.header(&m.name).as_deref().map(str::trim))) {
            return false;
        }
        if !self.cookies.is_empty() {
            let header = req.header("cookie").unwrap_or_default();
            return self.cookies.iter().all(|m| m.accepts(cookie::find(&header, &m.name)));
        }
        true
    }
}

/// A validated experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub name: String,
    pub salt: String,
    pub routing_header: String,
    pub arms: Vec<Arm>,
    /// Index of the control arm in `arms`.
    pub control: usize,
    /// Indices of the treatment arms in `arms`, in config order (`i` in the layout).
    pub treatments: Vec<usize>,
    pub targeting: Targeting,
    pub allow: BTreeMap<String, usize>,
    pub deny: BTreeSet<String>,
}

impl Experiment {
    /// The user's bucket: `XXH64(le32(len(salt)) || salt || key) mod 10,000`.
    pub fn bucket(&self, user: &str) -> u64 {
        hash::bucket(hash::salted_hash64(self.salt.as_bytes(), user.as_bytes()), BUCKETS)
    }

    /// The arm owning `bucket` (see the module docs for the layout).
    pub fn arm_for_bucket(&self, bucket: u64) -> usize {
        let k = self.treatments.len() as u64;
        if k == 0 {
            return self.control;
        }
        let (i, j) = (bucket % k, bucket / k);
        match self.treatments.get(i as usize) {
            Some(&a) if self.arms.get(a).is_some_and(|arm| j < arm.buckets) => a,
            _ => self.control,
        }
    }

    pub fn arm_named(&self, name: &str) -> Option<usize> {
        self.arms.iter().position(|a| a.name == name)
    }
}

/// The validated QA override.
#[derive(Debug, Clone)]
pub struct Override {
    pub header: String,
    pub secret_header: String,
    secret: Vec<u8>,
}

/// The validated runtime form of [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub keys: KeySpec,
    pub cookie: Option<CookieSpec>,
    pub experiments: Vec<Experiment>,
    pub qa_override: Option<Override>,
    pub expose_header: Option<String>,
    pub expose_cookie: Option<CookieSpec>,
}

/// Experiment and arm names: they appear in metric names, headers and cookies.
fn check_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(name.to_string())
    } else {
        Err(ConfigError::new(field, format!("{name:?}"), "1 to 64 characters from letters, digits, '-' and '_'"))
    }
}

/// Percent with at most two decimals -> basis points (buckets).
fn basis_points(field: &str, percent: f64) -> Result<u64, ConfigError> {
    let scaled = percent * 100.0;
    let rounded = scaled.round();
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) || (scaled - rounded).abs() > 1e-6 {
        return Err(ConfigError::new(
            field,
            percent,
            "a number from 0 to 100 with at most two decimals (units of 0.01 %, one bucket in 10,000)",
        ));
    }
    Ok(rounded as u64)
}

fn check_target(field: &str, t: &str) -> Result<String, ConfigError> {
    if t.is_empty() || t.len() > 255 || !t.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ConfigError::new(
            field,
            format!("{t:?}"),
            "1 to 255 visible ASCII characters without spaces (a cluster name or a header value)",
        ));
    }
    Ok(t.to_string())
}

fn check_user(field: &str, u: &str) -> Result<(), ConfigError> {
    if u.is_empty() || u.len() > MAX_KEY_BYTES {
        return Err(ConfigError::new(field, format!("{u:?}"), format!("a user key of 1 to {MAX_KEY_BYTES} bytes")));
    }
    Ok(())
}

impl Targeting {
    fn try_from_config(c: &TargetingConfig) -> Result<Targeting, ConfigError> {
        for (i, p) in c.path_prefixes.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(ConfigError::new(format!("pathPrefixes[{i}]"), format!("{p:?}"), "a path prefix starting with '/'"));
            }
        }
        let matches = |list: &[MatchConfig], what: &str, check: fn(&str, &str) -> Result<String, ConfigError>| {
            list.iter()
                .enumerate()
                .map(|(i, m)| {
                    let name = check("name", &m.name).map_err(|e| e.at(&format!("{what}[{i}]")))?;
                    if m.values.as_ref().is_some_and(Vec::is_empty) {
                        return Err(ConfigError::new(format!("{what}[{i}].values"), "[]", "at least one value, or no `values` (presence)"));
                    }
                    Ok(Match { name, values: m.values.clone() })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Targeting {
            path_prefixes: c.path_prefixes.clone(),
            headers: matches(&c.headers, "headers", names::header_name)?,
            cookies: matches(&c.cookies, "cookies", names::cookie_name)?,
        })
    }
}

impl Experiment {
    fn try_from_config(c: &ExperimentConfig) -> Result<Experiment, ConfigError> {
        let name = check_name("name", &c.name)?;
        let salt = c.salt.clone().unwrap_or_else(|| name.clone());
        if salt.is_empty() || salt.len() > 256 {
            return Err(ConfigError::new("salt", format!("{salt:?}"), "1 to 256 bytes"));
        }
        let routing_header = names::output_header_name("routingHeader", &c.routing_header)?;
        if c.arms.len() < 2 || c.arms.len() > MAX_ARMS {
            return Err(ConfigError::new("arms", format!("{} arms", c.arms.len()), format!("2 to {MAX_ARMS} arms")));
        }
        let mut arms: Vec<Arm> = Vec::with_capacity(c.arms.len());
        for (i, a) in c.arms.iter().enumerate() {
            let at = |e: ConfigError| e.at(&format!("arms[{i}]"));
            let arm_name = check_name("name", &a.name).map_err(at)?;
            if arms.iter().any(|x| x.name == arm_name) {
                return Err(at(ConfigError::new("name", format!("{arm_name:?}"), "a name no other arm of this experiment uses")));
            }
            let buckets = basis_points("percent", a.percent).map_err(at)?;
            let target = check_target("target", a.target.as_deref().unwrap_or(&arm_name)).map_err(at)?;
            arms.push(Arm { name: arm_name, buckets, target });
        }
        let total: u64 = arms.iter().map(|a| a.buckets).sum();
        if total != BUCKETS {
            let list: Vec<String> = c.arms.iter().map(|a| a.percent.to_string()).collect();
            return Err(ConfigError::new(
                "arms[].percent",
                format!("{} (sum {})", list.join(" + "), total as f64 / 100.0),
                "percentages that add up to exactly 100",
            ));
        }
        let control = match &c.control_arm {
            None => 0,
            Some(n) => arms.iter().position(|a| &a.name == n).ok_or_else(|| {
                let names: Vec<&str> = arms.iter().map(|a| a.name.as_str()).collect();
                ConfigError::new("controlArm", format!("{n:?}"), format!("one of the arm names: {}", names.join(", ")))
            })?,
        };
        let treatments: Vec<usize> = (0..arms.len()).filter(|&a| a != control).collect();
        let k = treatments.len() as u64;
        for (i, &a) in treatments.iter().enumerate() {
            let class = (BUCKETS - i as u64).div_ceil(k);
            if let Some(arm) = arms.get(a) {
                if arm.buckets > class {
                    return Err(ConfigError::new(
                        format!("arms[{a}].percent"),
                        arm.buckets as f64 / 100.0,
                        format!(
                            "at most {} for treatment {i} of {k} (ramp-safe layout: each non-control arm owns 1/{k} of the buckets); make the largest arm the controlArm",
                            class as f64 / 100.0
                        ),
                    ));
                }
            }
        }
        let targeting = Targeting::try_from_config(&c.targeting).map_err(|e| e.at("targeting"))?;
        if targeting.headers.iter().any(|m| m.name == routing_header) {
            return Err(ConfigError::new(
                "targeting.headers",
                format!("{routing_header:?}"),
                "any header except the routingHeader the filter writes",
            ));
        }
        if c.allow.len() > MAX_LIST || c.deny.len() > MAX_LIST {
            return Err(ConfigError::new(
                if c.allow.len() > MAX_LIST { "allow" } else { "deny" },
                format!("{} entries", c.allow.len().max(c.deny.len())),
                format!("at most {MAX_LIST} entries"),
            ));
        }
        let mut allow = BTreeMap::new();
        for (user, arm) in &c.allow {
            check_user(&format!("allow.{user}"), user)?;
            let a = arms.iter().position(|x| &x.name == arm).ok_or_else(|| {
                let names: Vec<&str> = arms.iter().map(|a| a.name.as_str()).collect();
                ConfigError::new(format!("allow.{user}"), format!("{arm:?}"), format!("one of the arm names: {}", names.join(", ")))
            })?;
            allow.insert(user.clone(), a);
        }
        let mut deny = BTreeSet::new();
        for (i, user) in c.deny.iter().enumerate() {
            check_user(&format!("deny[{i}]"), user)?;
            if allow.contains_key(user) {
                return Err(ConfigError::new(format!("deny[{i}]"), format!("{user:?}"), "a user key that is not also on the allow list"));
            }
            deny.insert(user.clone());
        }
        Ok(Experiment { name, salt, routing_header, arms, control, treatments, targeting, allow, deny })
    }
}

impl Settings {
    pub fn try_from_config(c: Config) -> Result<Settings, ConfigError> {
        let mut keys = KeySpec::try_new("keySources", &c.key_sources, None)?;
        let cookie = c.assignment_cookie.as_ref().map(CookieSpec::try_from_config).transpose().map_err(|e| e.at("assignmentCookie"))?;
        if let Some(ck) = &cookie {
            // The issued cookie must be read back: if not listed, it is tried last.
            if !keys.sources.iter().any(|s| matches!(s, KeySource::Cookie(n) if *n == ck.name)) {
                keys.sources.push(KeySource::Cookie(ck.name.clone()));
            }
        }
        if keys.sources.is_empty() {
            return Err(ConfigError::new("keySources", "[]", "at least one key source, or an assignmentCookie"));
        }
        if c.experiments.is_empty() || c.experiments.len() > MAX_EXPERIMENTS {
            return Err(ConfigError::new(
                "experiments",
                format!("{} experiments", c.experiments.len()),
                format!("1 to {MAX_EXPERIMENTS} experiments"),
            ));
        }
        let mut experiments: Vec<Experiment> = Vec::with_capacity(c.experiments.len());
        for (i, e) in c.experiments.iter().enumerate() {
            let field = format!("experiments[{i}]");
            let e = Experiment::try_from_config(e).map_err(|err| err.at(&field))?;
            for other in &experiments {
                let clash = if other.name == e.name {
                    Some(("name", &e.name, "a name no other experiment uses"))
                } else if other.routing_header == e.routing_header {
                    Some((
                        "routingHeader",
                        &e.routing_header,
                        "a header no other experiment writes (each experiment routes on its own header)",
                    ))
                } else if other.salt == e.salt {
                    Some(("salt", &e.salt, "a salt no other experiment uses (equal salts put each user in the same bucket of both)"))
                } else {
                    None
                };
                if let Some((f, v, allowed)) = clash {
                    return Err(ConfigError::new(format!("{field}.{f}"), format!("{v:?}"), allowed));
                }
            }
            if keys.sources.iter().any(|s| matches!(s, KeySource::Header(h) if *h == e.routing_header)) {
                return Err(ConfigError::new(
                    format!("{field}.routingHeader"),
                    format!("{:?}", e.routing_header),
                    "a header that is not also a key source (clients must not choose their arm)",
                ));
            }
            experiments.push(e);
        }
        let qa_override = match &c.qa_override {
            None => None,
            Some(o) => {
                let header = names::output_header_name("override.header", &o.header)?;
                let secret_header = names::output_header_name("override.secretHeader", &o.secret_header)?;
                if secret_header == header {
                    return Err(ConfigError::new(
                        "override.secretHeader",
                        format!("{secret_header:?}"),
                        "a header other than override.header",
                    ));
                }
                if o.secret.len() < MIN_SECRET_BYTES || o.secret.len() > 1024 || !o.secret.bytes().all(|b| (0x21..0x7f).contains(&b)) {
                    return Err(ConfigError::new(
                        "override.secret",
                        format!("({} bytes, not shown)", o.secret.len()),
                        format!("{MIN_SECRET_BYTES} to 1024 visible ASCII characters (a random shared secret)"),
                    ));
                }
                let owned = [header.as_str(), secret_header.as_str()];
                for (i, e) in experiments.iter().enumerate() {
                    if owned.contains(&e.routing_header.as_str()) {
                        return Err(ConfigError::new(
                            format!("experiments[{i}].routingHeader"),
                            format!("{:?}", e.routing_header),
                            "a header other than the override headers",
                        ));
                    }
                }
                if keys.sources.iter().any(|s| matches!(s, KeySource::Header(h) if owned.contains(&h.as_str()))) {
                    return Err(ConfigError::new("override.header", format!("{header:?}"), "a header that is not also a key source"));
                }
                Some(Override { header, secret_header, secret: o.secret.as_bytes().to_vec() })
            }
        };
        let expose_header = c.expose_header.as_deref().map(|h| names::output_header_name("exposeHeader", h)).transpose()?;
        let expose_cookie = c.expose_cookie.as_ref().map(CookieSpec::try_from_config).transpose().map_err(|e| e.at("exposeCookie"))?;
        if let (Some(a), Some(b)) = (&cookie, &expose_cookie) {
            if a.name == b.name {
                return Err(ConfigError::new(
                    "exposeCookie.name",
                    format!("{:?}", b.name),
                    "a cookie name other than assignmentCookie.name",
                ));
            }
        }
        Ok(Settings { keys, cookie, experiments, qa_override, expose_header, expose_cookie })
    }
}

/// Equality that takes the same time wherever the inputs differ (it leaks
/// only whether the lengths differ, and the secret's length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

/// Why a user got an arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Bucketed by the hash of the user key: the experiment population.
    Hash,
    /// On the allow list.
    Allow,
    /// QA override with the shared secret.
    Override,
    /// On the deny list: control, not exposed.
    Deny,
    /// Outside the targeting: control, not exposed.
    Untargeted,
    /// No user key: control, not exposed.
    NoKey,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Hash => "hash",
            Reason::Allow => "allow",
            Reason::Override => "override",
            Reason::Deny => "deny",
            Reason::Untargeted => "untargeted",
            Reason::NoKey => "nokey",
        }
    }
    /// Whether the user is part of the experiment (and the arm is exposed).
    pub fn in_experiment(self) -> bool {
        matches!(self, Reason::Hash | Reason::Allow | Reason::Override)
    }
}

/// One experiment's outcome for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub arm: usize,
    pub reason: Reason,
}

/// What happened to a QA override header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideStatus {
    /// No override header (or none configured).
    Absent,
    /// Sent with the right secret: honoured.
    Accepted,
    /// Sent without the right secret: ignored.
    Rejected,
}

/// What the glue applies to the request and response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Where the user key came from: a source label, `issued`, or `none`.
    pub user_source: String,
    /// One per experiment, in config order.
    pub assignments: Vec<Assignment>,
    /// How many routing headers the client had sent itself (all overwritten).
    pub client_headers_replaced: u32,
    pub override_status: OverrideStatus,
    /// Remove these request headers (override and secret, when sent).
    pub strip: Vec<String>,
    /// `Set-Cookie` values for the response.
    pub set_cookies: Vec<String>,
    /// Response header value listing the exposed arms (`exp=arm, exp2=arm`).
    pub expose: Option<String>,
}

impl Decision {
    /// `(header, value)` pairs to set on the request, one per experiment.
    pub fn routing<'a>(&'a self, s: &'a Settings) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        s.experiments
            .iter()
            .zip(&self.assignments)
            .filter_map(|(e, a)| e.arms.get(a.arm).map(|arm| (e.routing_header.as_str(), arm.target.as_str())))
    }

    /// Filter state: every experiment's routed arm, `exp=arm,exp2=arm`.
    pub fn arms_label(&self, s: &Settings) -> String {
        self.label(s, |e, a| e.arms.get(a.arm).map(|x| x.name.as_str()).unwrap_or(""))
    }

    /// Filter state: why, `exp=hash,exp2=untargeted`.
    pub fn reasons_label(&self, s: &Settings) -> String {
        self.label(s, |_, a| a.reason.label())
    }

    fn label<'a>(&'a self, s: &'a Settings, f: impl Fn(&'a Experiment, &'a Assignment) -> &'a str) -> String {
        let mut out = String::new();
        for (e, a) in s.experiments.iter().zip(&self.assignments) {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&e.name);
            out.push('=');
            out.push_str(f(e, a));
        }
        out
    }
}

/// Parse an override header value: `exp=arm, exp2=arm` or just `arm` (every
/// experiment that has an arm of that name). Returns (experiment, arm) names.
fn parse_override(v: &str) -> Vec<(Option<&str>, &str)> {
    v.split(',')
        .take(MAX_OVERRIDE_ITEMS)
        .filter_map(|item| {
            let item = item.trim();
            match item.split_once('=') {
                Some((e, a)) => Some((Some(e.trim()), a.trim())),
                None if !item.is_empty() => Some((None, item)),
                None => None,
            }
        })
        .collect()
}

/// Decide for one request. `mint` makes a new user id (cookie-safe text) and
/// is called only when an assignment cookie is to be issued; the request is
/// then assigned by that id exactly as later requests carrying it will be.
pub fn decide(s: &Settings, req: &dyn RequestView, mint: impl FnOnce() -> String) -> Decision {
    let mut set_cookies = Vec::new();
    let (user, user_source) = match s.keys.extract(req) {
        Some(m) => {
            let label = s.keys.label(&m);
            (Some(m.value), label)
        }
        None => match &s.cookie {
            Some(ck) => {
                let id = mint();
                set_cookies.push(ck.set_cookie(&id));
                (Some(id), "issued".to_string())
            }
            None => (None, "none".to_string()),
        },
    };

    let mut strip = Vec::new();
    let mut override_status = OverrideStatus::Absent;
    let mut forced: Vec<(Option<String>, String)> = Vec::new();
    if let Some(o) = &s.qa_override {
        let value = req.header(&o.header);
        let secret = req.header(&o.secret_header);
        if secret.is_some() {
            strip.push(o.secret_header.clone());
        }
        if let Some(v) = value {
            strip.push(o.header.clone());
            let ok = secret.is_some_and(|sec| constant_time_eq(sec.trim().as_bytes(), &o.secret));
            if ok {
                override_status = OverrideStatus::Accepted;
                forced = parse_override(&v).into_iter().map(|(e, a)| (e.map(str::to_string), a.to_string())).collect();
            } else {
                override_status = OverrideStatus::Rejected;
            }
        }
    }

    let mut client_headers_replaced = 0;
    let mut assignments = Vec::with_capacity(s.experiments.len());
    for e in &s.experiments {
        if req.header(&e.routing_header).is_some() {
            client_headers_replaced += 1;
        }
        let forced_arm =
            forced.iter().filter(|(name, _)| name.as_deref().is_none_or(|n| n == e.name)).find_map(|(_, arm)| e.arm_named(arm));
        let a = if let Some(arm) = forced_arm {
            Assignment { arm, reason: Reason::Override }
        } else if !e.targeting.matches(req) {
            Assignment { arm: e.control, reason: Reason::Untargeted }
        } else {
            match &user {
                None => Assignment { arm: e.control, reason: Reason::NoKey },
                Some(u) if e.deny.contains(u) => Assignment { arm: e.control, reason: Reason::Deny },
                Some(u) => match e.allow.get(u) {
                    Some(&arm) => Assignment { arm, reason: Reason::Allow },
                    None => Assignment { arm: e.arm_for_bucket(e.bucket(u)), reason: Reason::Hash },
                },
            }
        };
        assignments.push(a);
    }

    let exposed: Vec<(&str, &str)> = s
        .experiments
        .iter()
        .zip(&assignments)
        .filter(|(_, a)| a.reason.in_experiment())
        .filter_map(|(e, a)| e.arms.get(a.arm).map(|arm| (e.name.as_str(), arm.name.as_str())))
        .collect();
    let expose = (s.expose_header.is_some() && !exposed.is_empty())
        .then(|| exposed.iter().map(|(e, a)| format!("{e}={a}")).collect::<Vec<_>>().join(", "));
    if let Some(ck) = &s.expose_cookie {
        if !exposed.is_empty() {
            let value = exposed.iter().map(|(e, a)| format!("{e}:{a}")).collect::<Vec<_>>().join("|");
            let current = req.header("cookie").and_then(|h| cookie::find(&h, &ck.name).map(str::to_string));
            if current.as_deref() != Some(value.as_str()) {
                set_cookies.push(ck.set_cookie(&value));
            }
        }
    }

    Decision { user_source, assignments, client_headers_replaced, override_status, strip, set_cookies, expose }
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

    fn two_arms(treatment: f64) -> Settings {
        settings(&format!(
            r#"{{"keySources":[{{"header":"x-user-id"}}],"assignmentCookie":{{"name":"mp_uid"}},"exposeHeader":"x-experiment",
                "experiments":[{{"name":"checkout-v2","arms":[{{"name":"control","percent":{}}},{{"name":"treatment","percent":{treatment}}}]}}]}}"#,
            100.0 - treatment
        ))
        .unwrap()
    }

    fn user(u: &str) -> StaticRequest {
        StaticRequest::new("/checkout").with("x-user-id", u)
    }

    fn no_mint() -> String {
        unreachable!("no cookie expected")
    }

    /// (salt, user, XXH64(le32(len) || salt || user), bucket), cross-checked
    /// against the reference C library (libxxhash 0.8.1 through ctypes).
    const BUCKET_VECTORS: &[(&str, &str, u64, u64)] = &[
        ("exp", "user-42", 0xe4148d7607766dd5, 1749),
        ("checkout-v2", "user-42", 0xabc65298919be921, 7649),
        ("checkout-v2", "alice", 0x3eb8918c40d06783, 1507),
        ("checkout-v2", "bob", 0xbc7d6e0a20940f9f, 6527),
        ("checkout-v2", "user-0", 0xa0c9d2d1fe809fa1, 1777),
        ("checkout-v2", "user-1", 0xbd2f645ffcc5413b, 7179),
        ("checkout-v2", "user-2", 0xd95798672793305d, 221),
        ("search-2026", "alice", 0x7be545ffe299a1c1, 2609),
    ];

    #[test]
    fn bucket_vectors() {
        for &(salt, u, h, b) in BUCKET_VECTORS {
            assert_eq!(hash::salted_hash64(salt.as_bytes(), u.as_bytes()), h, "{salt}/{u}");
            let s = settings(&format!(
                r#"{{"keySources":["path"],"experiments":[{{"name":"e","salt":"{salt}","arms":[{{"name":"a","percent":50}},{{"name":"b","percent":50}}]}}]}}"#
            ))
            .unwrap();
            assert_eq!(s.experiments[0].bucket(u), b, "{salt}/{u}");
        }
    }

    #[test]
    fn vectors_through_decide() {
        // checkout-v2 at 10 %: treatment owns buckets 0..1000.
        let s = two_arms(10.0);
        let arm = |u: &str| {
            let d = decide(&s, &user(u), no_mint);
            s.experiments[0].arms[d.assignments[0].arm].name.clone()
        };
        assert_eq!(arm("user-2"), "treatment"); // bucket 221
        assert_eq!(arm("alice"), "control"); // bucket 1507
        assert_eq!(arm("user-0"), "control"); // bucket 1777
                                              // At 20 % alice (1507) and user-0 (1777) join; user-2 stays.
        let s = two_arms(20.0);
        let d = decide(&s, &user("alice"), no_mint);
        assert_eq!(d.assignments[0], Assignment { arm: 1, reason: Reason::Hash });
        assert_eq!(d.expose.as_deref(), Some("checkout-v2=treatment"));
        assert_eq!(d.routing(&s).collect::<Vec<_>>(), vec![("x-experiment-arm", "treatment")]);
        assert_eq!(d.arms_label(&s), "checkout-v2=treatment");
        assert_eq!(d.reasons_label(&s), "checkout-v2=hash");
        assert_eq!(d.user_source, "header:x-user-id");
    }

    #[test]
    fn shares_are_exact_over_all_buckets() {
        for pct in [0.0, 0.01, 2.5, 10.0, 33.33, 50.0, 99.99, 100.0] {
            let s = two_arms(pct);
            let n = (0..BUCKETS).filter(|&b| s.experiments[0].arm_for_bucket(b) == 1).count() as u64;
            assert_eq!(n, (pct * 100.0).round() as u64, "{pct} %");
        }
        // Hashing 100,000 users: within 0.3 pp of 10 % (sampling noise, 3 sigma).
        let s = two_arms(10.0);
        let n = (0..100_000).filter(|i| s.experiments[0].arm_for_bucket(s.experiments[0].bucket(&format!("user-{i}"))) == 1).count();
        assert!((n as f64 / 1000.0 - 10.0).abs() < 0.3, "{n} of 100,000");
    }

    fn layout(arms: &[(&str, f64)], control: &str) -> Vec<usize> {
        let list: Vec<String> = arms.iter().map(|(n, p)| format!(r#"{{"name":"{n}","percent":{p}}}"#)).collect();
        let s = settings(&format!(
            r#"{{"keySources":["path"],"experiments":[{{"name":"e","controlArm":"{control}","arms":[{}]}}]}}"#,
            list.join(",")
        ))
        .unwrap();
        (0..BUCKETS).map(|b| s.experiments[0].arm_for_bucket(b)).collect()
    }

    #[test]
    fn ramping_only_adds_or_removes_buckets() {
        // Two arms: 10 % -> 20 % moves exactly 1000 buckets, all control -> treatment.
        let a = layout(&[("control", 90.0), ("t", 10.0)], "control");
        let b = layout(&[("control", 80.0), ("t", 20.0)], "control");
        let moved: Vec<_> = a.iter().zip(&b).filter(|(x, y)| x != y).collect();
        assert_eq!(moved.len(), 1000);
        assert!(moved.iter().all(|(x, y)| **x == 0 && **y == 1));
        // Three arms: ramping A from 10 to 25 while B stays moves nobody in or out of B.
        let a = layout(&[("control", 80.0), ("a", 10.0), ("b", 10.0)], "control");
        let b = layout(&[("control", 65.0), ("a", 25.0), ("b", 10.0)], "control");
        for (x, y) in a.iter().zip(&b) {
            assert!(x == y || (*x == 0 && *y == 1), "{x} -> {y}");
        }
        assert_eq!(a.iter().zip(&b).filter(|(x, y)| x != y).count(), 1500);
        // Lowering B from 10 to 2.5: only B's removed buckets move, to control.
        let c = layout(&[("control", 72.5), ("a", 25.0), ("b", 2.5)], "control");
        for (y, z) in b.iter().zip(&c) {
            assert!(y == z || (*y == 2 && *z == 0), "{y} -> {z}");
        }
        assert_eq!(b.iter().zip(&c).filter(|(y, z)| y != z).count(), 750);
        // The control arm need not be first.
        let d = layout(&[("t", 10.0), ("control", 90.0)], "control");
        assert_eq!(d.iter().filter(|&&x| x == 0).count(), 1000);
        assert!(d[..1000].iter().all(|&x| x == 0));
    }

    #[test]
    fn issued_id_is_assigned_like_later_requests() {
        let s = two_arms(50.0);
        let first = decide(&s, &StaticRequest::new("/checkout"), || "user-2".into());
        assert_eq!(first.user_source, "issued");
        assert_eq!(first.set_cookies, vec!["mp_uid=user-2; Path=/; HttpOnly; SameSite=Lax".to_string()]);
        let later = decide(&s, &StaticRequest::new("/checkout").with("cookie", "mp_uid=user-2"), no_mint);
        assert_eq!(later.user_source, "cookie:mp_uid");
        assert!(later.set_cookies.is_empty());
        assert_eq!(first.assignments, later.assignments);
    }

    #[test]
    fn targeting_allow_deny() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"experiments":[{"name":"checkout-v2","arms":[{"name":"control","percent":100},{"name":"treatment","percent":0}],
               "targeting":{"pathPrefixes":["/checkout"],"headers":[{"name":"X-Country","values":["DE","FR"]}],"cookies":[{"name":"beta"}]},
               "allow":{"qa":"treatment","qa-control":"control"},"deny":["bot"]}]}"#,
        )
        .unwrap();
        let r = |path: &str, user: &str, country: &str, cookie: &str| {
            let mut req = StaticRequest::new(path).with("x-user-id", user).with("x-country", country);
            if !cookie.is_empty() {
                req = req.with("cookie", cookie);
            }
            decide(&s, &req, no_mint).assignments[0]
        };
        let t = Assignment { arm: 1, reason: Reason::Allow };
        assert_eq!(r("/checkout/pay?x=1", "qa", "DE", "beta=1"), t);
        assert_eq!(r("/checkout", "qa", "FR", "a=b; beta=yes"), t);
        assert_eq!(r("/cart", "qa", "DE", "beta=1").reason, Reason::Untargeted);
        assert_eq!(r("/checkout", "qa", "US", "beta=1").reason, Reason::Untargeted);
        assert_eq!(r("/checkout", "qa", "DE", "").reason, Reason::Untargeted);
        assert_eq!(r("/checkout", "qa-control", "DE", "beta=1"), Assignment { arm: 0, reason: Reason::Allow });
        assert_eq!(r("/checkout", "bot", "DE", "beta=1"), Assignment { arm: 0, reason: Reason::Deny });
        assert_eq!(r("/checkout", "someone", "DE", "beta=1"), Assignment { arm: 0, reason: Reason::Hash });
        let d = decide(&s, &StaticRequest::new("/checkout").with("x-country", "DE").with("cookie", "beta=1"), no_mint);
        assert_eq!((d.assignments[0], d.user_source.as_str()), (Assignment { arm: 0, reason: Reason::NoKey }, "none"));
    }

    #[test]
    fn override_needs_the_secret() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"exposeHeader":"x-experiment","override":{"secret":"0123456789abcdef-qa"},
                "experiments":[{"name":"checkout-v2","arms":[{"name":"control","percent":100},{"name":"treatment","percent":0}]},
                               {"name":"search","routingHeader":"x-search-arm","arms":[{"name":"old","percent":50},{"name":"treatment","percent":50}]}]}"#,
        )
        .unwrap();
        let req = |ov: &str, secret: &str| {
            let mut r = user("alice").with("x-experiment-override", ov);
            if !secret.is_empty() {
                r = r.with("x-experiment-secret", secret);
            }
            decide(&s, &r, no_mint)
        };
        let d = req("checkout-v2=treatment", "0123456789abcdef-qa");
        assert_eq!(d.override_status, OverrideStatus::Accepted);
        assert_eq!(d.assignments[0], Assignment { arm: 1, reason: Reason::Override });
        assert_eq!(d.assignments[1].reason, Reason::Hash);
        assert_eq!(d.strip, vec!["x-experiment-secret".to_string(), "x-experiment-override".to_string()]);
        // A bare arm name applies to every experiment with such an arm.
        let d = req("treatment", "0123456789abcdef-qa");
        assert_eq!(d.assignments.iter().map(|a| (a.arm, a.reason)).collect::<Vec<_>>(), vec![(1, Reason::Override), (1, Reason::Override)]);
        assert_eq!(d.expose.as_deref(), Some("checkout-v2=treatment, search=treatment"));
        for bad in ["", "0123456789abcdef-q", "0123456789abcdef-qb", "0123456789abcdef-qa-"] {
            let d = req("checkout-v2=treatment", bad);
            assert_eq!(d.override_status, OverrideStatus::Rejected, "{bad:?}");
            assert_eq!(d.assignments[0], Assignment { arm: 0, reason: Reason::Hash });
            assert!(d.strip.contains(&"x-experiment-override".to_string()));
        }
        assert_eq!(decide(&s, &user("alice"), no_mint).override_status, OverrideStatus::Absent);
    }

    #[test]
    fn garbage_override_values_are_harmless() {
        for v in ["", ",", "=", "==,=", "a=b=c", " , checkout-v2 = treatment ,", &"x=y,".repeat(1000)] {
            let items = parse_override(v);
            assert!(items.len() <= MAX_OVERRIDE_ITEMS, "{v}");
        }
        assert_eq!(parse_override(" checkout-v2 = treatment , control"), vec![(Some("checkout-v2"), "treatment"), (None, "control")]);
    }

    #[test]
    fn experiments_with_different_salts_are_independent() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"experiments":[
                {"name":"a","arms":[{"name":"c","percent":50},{"name":"t","percent":50}]},
                {"name":"b","routingHeader":"x-b","arms":[{"name":"c","percent":50},{"name":"t","percent":50}]}]}"#,
        )
        .unwrap();
        let (mut a, mut both) = (0, 0);
        for i in 0..20_000 {
            let d = decide(&s, &user(&format!("u{i}")), no_mint);
            let (x, y) = (d.assignments[0].arm == 1, d.assignments[1].arm == 1);
            a += usize::from(x);
            both += usize::from(x && y);
        }
        // Among A's treatment users, B's treatment share is ~50 % (not 100 % or 0 %).
        let share = both as f64 / a as f64;
        assert!((share - 0.5).abs() < 0.03, "{both} of {a}");
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(&[0xff], &[0x00]));
    }

    #[test]
    fn client_routing_header_is_counted_and_exposure_cookie_set_once() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"exposeCookie":{"name":"mp_exp"},
                "experiments":[{"name":"checkout-v2","arms":[{"name":"control","percent":0},{"name":"treatment","percent":100,"target":"checkout-v2-cluster"}]}]}"#,
        )
        .unwrap();
        let d = decide(&s, &user("u").with("x-experiment-arm", "control"), no_mint);
        assert_eq!(d.client_headers_replaced, 1);
        assert_eq!(d.routing(&s).collect::<Vec<_>>(), vec![("x-experiment-arm", "checkout-v2-cluster")]);
        assert_eq!(d.set_cookies, vec!["mp_exp=checkout-v2:treatment; Path=/; HttpOnly; SameSite=Lax".to_string()]);
        assert_eq!(d.expose, None);
        let d = decide(&s, &user("u").with("cookie", "mp_exp=checkout-v2:treatment"), no_mint);
        assert!(d.set_cookies.is_empty());
        assert_eq!(d.client_headers_replaced, 0);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let exp = |arms: &str, extra: &str| {
            format!(r#"{{"keySources":[{{"header":"x-user-id"}}],"experiments":[{{"name":"e","arms":[{arms}]{extra}}}]}}"#)
        };
        let ok = r#"{"name":"c","percent":90},{"name":"t","percent":10}"#;
        let cases = [
            (exp(r#"{"name":"c","percent":90},{"name":"t","percent":5}"#, ""), "experiments[0].arms[].percent"),
            (exp(r#"{"name":"c","percent":90},{"name":"c","percent":10}"#, ""), "experiments[0].arms[1].name"),
            (exp(r#"{"name":"c","percent":90.005},{"name":"t","percent":9.995}"#, ""), "experiments[0].arms[0].percent"),
            (exp(r#"{"name":"c","percent":-10},{"name":"t","percent":110}"#, ""), "experiments[0].arms[0].percent"),
            (exp(r#"{"name":"c","percent":100}"#, ""), "experiments[0].arms"),
            (exp(r#"{"name":"c.x","percent":90},{"name":"t","percent":10}"#, ""), "experiments[0].arms[0].name"),
            (exp(r#"{"name":"c","percent":90},{"name":"t","percent":10,"target":"a b"}"#, ""), "experiments[0].arms[1].target"),
            (exp(r#"{"name":"c","percent":20},{"name":"a","percent":60},{"name":"b","percent":20}"#, ""), "experiments[0].arms[1].percent"),
            (exp(ok, r#","controlArm":"x""#), "experiments[0].controlArm"),
            (exp(ok, r#","allow":{"u":"nope"}"#), "experiments[0].allow.u"),
            (exp(ok, r#","allow":{"u":"t"},"deny":["u"]"#), "experiments[0].deny[0]"),
            (exp(ok, r#","routingHeader":"x-user-id""#), "experiments[0].routingHeader"),
            (exp(ok, r#","routingHeader":"cookie""#), "experiments[0].routingHeader"),
            (exp(ok, r#","targeting":{"pathPrefixes":["checkout"]}"#), "experiments[0].targeting.pathPrefixes[0]"),
            (exp(ok, r#","targeting":{"headers":[{"name":"x-experiment-arm"}]}"#), "experiments[0].targeting.headers"),
            (exp(ok, r#","targeting":{"cookies":[{"name":"a","values":[]}]}"#), "experiments[0].targeting.cookies[0].values"),
            (r#"{"keySources":[{"header":"x-user-id"}],"experiments":[]}"#.into(), "experiments"),
            (format!(r#"{{"experiments":[{{"name":"e","arms":[{ok}]}}]}}"#), "keySources"),
            (
                format!(
                    r#"{{"keySources":["path"],"experiments":[{{"name":"e","arms":[{ok}]}},{{"name":"e","routingHeader":"x-b","arms":[{ok}]}}]}}"#
                ),
                "experiments[1].name",
            ),
            (
                format!(r#"{{"keySources":["path"],"experiments":[{{"name":"e","arms":[{ok}]}},{{"name":"f","arms":[{ok}]}}]}}"#),
                "experiments[1].routingHeader",
            ),
            (
                format!(
                    r#"{{"keySources":["path"],"experiments":[{{"name":"e","arms":[{ok}]}},{{"name":"f","salt":"e","routingHeader":"x-b","arms":[{ok}]}}]}}"#
                ),
                "experiments[1].salt",
            ),
            (
                format!(r#"{{"keySources":["path"],"override":{{"secret":"short"}},"experiments":[{{"name":"e","arms":[{ok}]}}]}}"#),
                "override.secret",
            ),
            (
                format!(
                    r#"{{"keySources":["path"],"assignmentCookie":{{"name":"a"}},"exposeCookie":{{"name":"a"}},"experiments":[{{"name":"e","arms":[{ok}]}}]}}"#
                ),
                "exposeCookie.name",
            ),
            (
                format!(
                    r#"{{"keySources":["path"],"assignmentCookie":{{"name":"a","sameSite":"None"}},"experiments":[{{"name":"e","arms":[{ok}]}}]}}"#
                ),
                "assignmentCookie.sameSite",
            ),
        ];
        for (json, field) in &cases {
            let e = settings(json).unwrap_err();
            assert_eq!(&e.field, field, "{json}: {e}");
        }
        let e = settings(&exp(ok, r#","salz":"x""#)).unwrap_err();
        assert!(e.to_string().contains("unknown field `salz`"), "{e}");
        let e = settings(&exp(r#"{"name":"c","percent":90},{"name":"t","pct":10}"#, "")).unwrap_err();
        assert!(e.to_string().contains("unknown field `pct`"), "{e}");
        // The secret is never printed.
        let e = settings(&format!(
            r#"{{"keySources":["path"],"override":{{"secret":"hunter2"}},"experiments":[{{"name":"e","arms":[{ok}]}}]}}"#
        ))
        .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        // Fractional percentages in basis points are fine.
        assert!(settings(&exp(r#"{"name":"c","percent":87.5},{"name":"t","percent":12.25},{"name":"u","percent":0.25}"#, "")).is_ok());
    }
}
