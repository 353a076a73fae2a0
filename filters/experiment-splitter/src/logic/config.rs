//! The plugin configuration as written (JSON for Envoy, YAML `pluginConfig`
//! for Istio) and its validation into [`Settings`].
//!
//! Which requests an experiment applies to is its `match` block, the one
//! syntax every meshpatterns filter shares ([`meshpatterns_core::scope`]).
//! The older `targeting` block is still read: its `pathPrefixes` and its
//! header conditions with no value or one value are deprecated, translated
//! into a matcher and reported by [`Settings::deprecation_warning`] (read for
//! one more release); header conditions listing several `values`, and
//! `cookies`, have no equivalent in the shared syntax and are kept as they are.

use meshpatterns_core::cookie::{CookieConfig, CookieSpec};
use meshpatterns_core::error::ConfigError;
use meshpatterns_core::key::{KeySourceConfig, KeySpec, MAX_KEY_BYTES};
use meshpatterns_core::scope::{HeaderCondition, MatchConfig, Matcher};
use meshpatterns_core::{names, text, KeySource};
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
    /// Which requests the experiment applies to (hosts, pathPrefixes,
    /// methods, headers, not: the syntax every meshpatterns filter shares).
    /// Other requests are untargeted: routed to control, not exposed.
    #[serde(default, rename = "match")]
    pub scope: Option<MatchConfig>,
    /// Older targeting conditions; all of them and `match` must hold.
    /// `pathPrefixes` and `headers` with no value or one value are
    /// deprecated (use `match`); `headers` with several `values`, and
    /// `cookies`, have no `match` equivalent and stay.
    #[serde(default)]
    pub targeting: Option<TargetingConfig>,
    /// User key -> arm, forced into the experiment.
    // A JSON object as parsed (keys sorted, each once), values checked in
    // `try_new`: a map type of its own would add a second B-tree to the module.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "std::collections::BTreeMap<String, String>"))]
    pub allow: serde_json::Map<String, serde_json::Value>,
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

/// The older `targeting` block: `pathPrefixes`, and `headers` entries with
/// no value or one value, are deprecated in favour of `match`; the rest stays.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetingConfig {
    /// Deprecated: use `match.pathPrefixes` (compared with the normalised path).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(extend("deprecated" = true)))]
    pub path_prefixes: Vec<String>,
    /// Every listed header matches. Deprecated for a header with no `values`
    /// or one value: use `match.headers` (`{name}` or `{name, exact}`).
    #[serde(default)]
    pub headers: Vec<TargetingCondition>,
    /// Every listed cookie matches.
    #[serde(default)]
    pub cookies: Vec<TargetingCondition>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetingCondition {
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

/// A header or cookie condition the shared matcher cannot express (a list
/// of accepted values, or any cookie condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub name: String,
    /// Accepted values; `None`: present with any value.
    pub values: Option<Vec<String>>,
}

/// Which requests an experiment applies to: every part must hold.
#[derive(Debug, Clone, Default)]
pub struct Targeting {
    /// The `match` block, then what `targeting` held that translates to one.
    pub matchers: Vec<Matcher>,
    /// Header conditions with several accepted values (from `targeting.headers`).
    pub headers: Vec<Condition>,
    /// Cookie conditions (from `targeting.cookies`).
    pub cookies: Vec<Condition>,
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
    /// (user key, arm index), sorted by key (a sorted list is as fast to
    /// search as a tree here and keeps B-tree code out of the module).
    pub allow: Vec<(Vec<u8>, usize)>,
    /// User keys, sorted.
    pub deny: Vec<Vec<u8>>,
}

/// The validated QA override.
#[derive(Debug, Clone)]
pub struct Override {
    pub header: String,
    pub secret_header: String,
    pub(crate) secret: Vec<u8>,
}

pub use meshpatterns_core::error::Deprecation;

/// The validated runtime form of [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub keys: KeySpec,
    pub cookie: Option<CookieSpec>,
    pub experiments: Vec<Experiment>,
    pub qa_override: Option<Override>,
    pub expose_header: Option<String>,
    pub expose_cookie: Option<CookieSpec>,
    /// Deprecated fields this config used, for one warning at configure.
    pub deprecated: Vec<Deprecation>,
}

impl Settings {
    /// One log line naming every deprecated field used and its replacement;
    /// `None` when the config uses none.
    pub fn deprecation_warning(&self) -> Option<String> {
        meshpatterns_core::error::deprecation_warning("experiment-splitter", &self.deprecated)
    }
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

/// Basis points as a percentage: 1050 -> `10.5`, 9000 -> `90`, 25 -> `0.25`.
pub fn percent_text(bp: u64) -> String {
    let (whole, frac) = (bp / 100, bp % 100);
    match frac {
        0 => whole.to_string(),
        f if f % 10 == 0 => format!("{whole}.{}", f / 10),
        f => format!("{whole}.{f:02}"),
    }
}

/// Percent with at most two decimals -> basis points (buckets).
fn basis_points(field: &str, percent: f64) -> Result<u64, ConfigError> {
    let scaled = percent * 100.0;
    let rounded = scaled.round();
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) || (scaled - rounded).abs() > 1e-6 {
        return Err(ConfigError::new(
            field,
            text::float(percent).unwrap_or_else(|| "not a finite number".into()),
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

/// Validate a list of `targeting` conditions; errors name `<what>[i]`.
fn conditions(
    list: &[TargetingCondition],
    what: &str,
    check: fn(&str, &str) -> Result<String, ConfigError>,
) -> Result<Vec<Condition>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let name = check("name", &m.name).map_err(|e| e.at(&format!("{what}[{i}]")))?;
            if m.values.as_ref().is_some_and(Vec::is_empty) {
                return Err(ConfigError::new(format!("{what}[{i}].values"), "[]", "at least one value, or no `values` (presence)"));
            }
            Ok(Condition { name, values: m.values.clone() })
        })
        .collect()
}

/// Whether a `match` block (or its `not`) has a condition on `header`.
fn mentions_header(c: &MatchConfig, header: &str) -> Option<String> {
    if let Some(i) = c.headers.iter().position(|h| h.name.eq_ignore_ascii_case(header)) {
        return Some(format!("headers[{i}].name"));
    }
    c.not.as_deref().and_then(|n| mentions_header(n, header)).map(|f| format!("not.{f}"))
}

impl Targeting {
    /// Validate `match` and the deprecated `targeting` for an experiment
    /// whose routing header is `routing_header`. Errors name the field
    /// relative to the experiment; `deprecated` gets the translated fields.
    fn try_new(
        scope: Option<&MatchConfig>,
        legacy: Option<&TargetingConfig>,
        routing_header: &str,
        deprecated: &mut Vec<Deprecation>,
    ) -> Result<Targeting, ConfigError> {
        let mut t = Targeting::default();
        if let Some(c) = scope {
            let m = Matcher::try_new(c).map_err(|e| e.at("match"))?;
            if let Some(field) = mentions_header(c, routing_header) {
                return Err(ConfigError::new(
                    format!("match.{field}"),
                    format!("{routing_header:?}"),
                    "any header except the routingHeader the filter writes",
                ));
            }
            if !m.is_empty() {
                t.matchers.push(m);
            }
        }
        let Some(c) = legacy else { return Ok(t) };
        let at = |e: ConfigError| e.at("targeting");
        let headers = conditions(&c.headers, "headers", names::header_name).map_err(at)?;
        t.cookies = conditions(&c.cookies, "cookies", names::cookie_name).map_err(at)?;
        if headers.iter().any(|m| m.name == routing_header) {
            return Err(ConfigError::new(
                "targeting.headers",
                format!("{routing_header:?}"),
                "any header except the routingHeader the filter writes",
            ));
        }
        // What the shared matcher expresses exactly: path prefixes, and a
        // header that is present or equal to one value.
        let mut translated = MatchConfig { path_prefixes: c.path_prefixes.clone(), ..MatchConfig::default() };
        if !c.path_prefixes.is_empty() {
            deprecated.push(Deprecation { old: "targeting.pathPrefixes".into(), new: "match.pathPrefixes".into() });
        }
        for (i, h) in headers.into_iter().enumerate() {
            let exact = match h.values.as_deref() {
                None => None,
                Some([one]) => Some(one.clone()),
                Some(_) => {
                    t.headers.push(h);
                    continue;
                }
            };
            let new = if exact.is_some() { "match.headers[].exact" } else { "match.headers" };
            deprecated.push(Deprecation { old: format!("targeting.headers[{i}]"), new: new.into() });
            translated.headers.push(HeaderCondition { name: h.name, exact, present: None });
        }
        let m = Matcher::try_new(&translated).map_err(at)?;
        if !m.is_empty() {
            t.matchers.push(m);
        }
        Ok(t)
    }
}

impl Experiment {
    /// Validate one experiment; errors name the field relative to it, and
    /// deprecated fields it uses are added to `deprecated` (relative too).
    fn try_from_config(c: &ExperimentConfig, deprecated: &mut Vec<Deprecation>) -> Result<Experiment, ConfigError> {
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
            let list: Vec<String> = c.arms.iter().map(|a| text::float(a.percent).unwrap_or_default()).collect();
            return Err(ConfigError::new(
                "arms[].percent",
                format!("{} (sum {})", list.join(" + "), percent_text(total)),
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
                        percent_text(arm.buckets),
                        format!(
                            "at most {} for treatment {i} of {k} (ramp-safe layout: each non-control arm owns 1/{k} of the buckets); make the largest arm the controlArm",
                            percent_text(class)
                        ),
                    ));
                }
            }
        }
        let targeting = Targeting::try_new(c.scope.as_ref(), c.targeting.as_ref(), &routing_header, deprecated)?;
        if c.allow.len() > MAX_LIST || c.deny.len() > MAX_LIST {
            return Err(ConfigError::new(
                if c.allow.len() > MAX_LIST { "allow" } else { "deny" },
                format!("{} entries", c.allow.len().max(c.deny.len())),
                format!("at most {MAX_LIST} entries"),
            ));
        }
        // `c.allow` iterates in key order, so `allow` comes out sorted.
        let mut allow = Vec::with_capacity(c.allow.len());
        for (user, arm) in &c.allow {
            check_user(&format!("allow.{user}"), user)?;
            let Some(arm) = arm.as_str() else {
                return Err(ConfigError::new(format!("allow.{user}"), arm, "an arm name (a string)"));
            };
            let a = arms.iter().position(|x| x.name == arm).ok_or_else(|| {
                let names: Vec<&str> = arms.iter().map(|a| a.name.as_str()).collect();
                ConfigError::new(format!("allow.{user}"), format!("{arm:?}"), format!("one of the arm names: {}", names.join(", ")))
            })?;
            allow.push((user.as_bytes().to_vec(), a));
        }
        let mut deny = Vec::with_capacity(c.deny.len());
        for (i, user) in c.deny.iter().enumerate() {
            check_user(&format!("deny[{i}]"), user)?;
            if allow.binary_search_by(|(k, _)| k.as_slice().cmp(user.as_bytes())).is_ok() {
                return Err(ConfigError::new(format!("deny[{i}]"), format!("{user:?}"), "a user key that is not also on the allow list"));
            }
            deny.push(user.as_bytes().to_vec());
        }
        meshpatterns_core::sort::heapsort(&mut deny);
        deny.dedup();
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
                keys.push(KeySource::Cookie(ck.name.clone()));
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
        let mut deprecated = Vec::new();
        let mut experiments: Vec<Experiment> = Vec::with_capacity(c.experiments.len());
        for (i, e) in c.experiments.iter().enumerate() {
            let field = format!("experiments[{i}]");
            let mut notes = Vec::new();
            let e = Experiment::try_from_config(e, &mut notes).map_err(|err| err.at(&field))?;
            deprecated
                .extend(notes.into_iter().map(|d| Deprecation { old: format!("{field}.{}", d.old), new: format!("{field}.{}", d.new) }));
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
        Ok(Settings { keys, cookie, experiments, qa_override, expose_header, expose_cookie, deprecated })
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
            (exp(ok, r#","allow":{"u":7}"#), "experiments[0].allow.u"),
            (exp(ok, r#","allow":["u"]"#), "experiments[0].allow"),
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
        // Values print as the config wrote them.
        let e = settings(&exp(r#"{"name":"c","percent":90},{"name":"t","percent":5.5}"#, "")).unwrap_err();
        assert_eq!(e.value, "90 + 5.5 (sum 95.5)");
        let e = settings(&exp(r#"{"name":"c","percent":89.999},{"name":"t","percent":10.001}"#, "")).unwrap_err();
        assert_eq!(e.value, "89.999");
        let e = settings(&exp(ok, r#","allow":{"u":7}"#)).unwrap_err();
        assert_eq!((e.value.as_str(), e.allowed.as_str()), ("7", "an arm name (a string)"));
        // Fractional percentages in basis points are fine.
        assert!(settings(&exp(r#"{"name":"c","percent":87.5},{"name":"t","percent":12.25},{"name":"u","percent":0.25}"#, "")).is_ok());
    }

    fn with_match(m: &str) -> String {
        format!(
            r#"{{"keySources":[{{"header":"x-user-id"}}],"experiments":[{{"name":"e","arms":[{{"name":"c","percent":90}},{{"name":"t","percent":10}}],"match":{m}}}]}}"#
        )
    }

    #[test]
    fn match_errors_name_the_field() {
        for (m, field) in [
            (r#"{"hosts":["a.com:80"]}"#, "experiments[0].match.hosts[0]"),
            (r#"{"pathPrefixes":["checkout"]}"#, "experiments[0].match.pathPrefixes[0]"),
            (r#"{"methods":"GET"}"#, "experiments[0].match.methods"),
            (r#"{"methods":["get"]}"#, "experiments[0].match.methods[0]"),
            (r#"{"headers":[{"name":"x","exact":1}]}"#, "experiments[0].match.headers[0].exact"),
            (r#"{"headers":[{"name":"x-a"},{"name":"X-Experiment-Arm"}]}"#, "experiments[0].match.headers[1].name"),
            (r#"{"not":{"headers":[{"name":"x-experiment-arm","present":false}]}}"#, "experiments[0].match.not.headers[0].name"),
            (r#"{"path":["/x"]}"#, "experiments[0].match.path"),
        ] {
            let e = settings(&with_match(m)).unwrap_err();
            assert_eq!(e.field, field, "{m}: {e}");
        }
        assert!(settings(&with_match("{}")).unwrap().experiments[0].targeting.matchers.is_empty());
        assert!(settings(&with_match("null")).unwrap().experiments[0].targeting.matchers.is_empty());
    }

    #[test]
    fn deprecated_targeting_is_translated_and_reported_once() {
        let exp = |t: &str| {
            format!(
                r#"{{"keySources":[{{"header":"x-user-id"}}],"experiments":[
                    {{"name":"a","arms":[{{"name":"c","percent":90}},{{"name":"t","percent":10}}],"targeting":{t}}},
                    {{"name":"b","routingHeader":"x-b","arms":[{{"name":"c","percent":90}},{{"name":"t","percent":10}}],"targeting":{t}}}]}}"#
            )
        };
        let s = settings(&exp(r#"{"pathPrefixes":["/checkout"],"headers":[{"name":"x-beta"},{"name":"X-Env","values":["prod"]},{"name":"x-country","values":["DE","FR"]}],"cookies":[{"name":"c"}]}"#)).unwrap();
        let want = settings(&with_match(r#"{"pathPrefixes":["/checkout"],"headers":[{"name":"x-beta"},{"name":"x-env","exact":"prod"}]}"#))
            .unwrap();
        let t = &s.experiments[0].targeting;
        assert_eq!(t.matchers, want.experiments[0].targeting.matchers);
        assert_eq!(t.headers, vec![Condition { name: "x-country".into(), values: Some(vec!["DE".into(), "FR".into()]) }]);
        assert_eq!(t.cookies, vec![Condition { name: "c".into(), values: None }]);
        assert_eq!(want.deprecation_warning(), None);
        assert_eq!(
            s.deprecation_warning().unwrap(),
            "experiment-splitter: deprecated config fields, read for this release only: \
             `experiments[0].targeting.pathPrefixes` (use `experiments[0].match.pathPrefixes`), \
             `experiments[0].targeting.headers[0]` (use `experiments[0].match.headers`), \
             `experiments[0].targeting.headers[1]` (use `experiments[0].match.headers[].exact`), \
             `experiments[1].targeting.pathPrefixes` (use `experiments[1].match.pathPrefixes`), \
             `experiments[1].targeting.headers[0]` (use `experiments[1].match.headers`), \
             `experiments[1].targeting.headers[1]` (use `experiments[1].match.headers[].exact`)"
        );
        // What `match` cannot express is not deprecated.
        let kept = settings(&exp(r#"{"headers":[{"name":"x-country","values":["DE","FR"]}],"cookies":[{"name":"beta","values":["1"]}]}"#))
            .unwrap();
        assert!(kept.experiments[0].targeting.matchers.is_empty());
        assert_eq!(kept.deprecation_warning(), None);
        // Translated prefixes are checked as `match` checks them, under their old name.
        let e = settings(&exp(r#"{"pathPrefixes":["/ok","/a b"]}"#)).unwrap_err();
        assert_eq!(e.field, "experiments[0].targeting.pathPrefixes[1]", "{e}");
        let e = settings(&exp(r#"{"headers":[{"name":"bad name"}]}"#)).unwrap_err();
        assert_eq!(e.field, "experiments[0].targeting.headers[0].name", "{e}");
    }

    #[test]
    fn percent_text_is_exact() {
        for (bp, t) in
            [(0, "0"), (1, "0.01"), (25, "0.25"), (1050, "10.5"), (1225, "12.25"), (3333, "33.33"), (9000, "90"), (10_000, "100")]
        {
            assert_eq!(percent_text(bp), t);
        }
    }
}
