//! The limits file: serde types as written, then validation into Limitador
//! limits. Every error names the field, the value and what is allowed.
//!
//! ```yaml
//! limits:
//! - name: per-api-key          # optional; reported to Envoy in current_limit
//!   domain: meshpatterns       # RateLimitRequest.domain
//!   descriptor:                # the entries a descriptor must have, exactly
//!   - key: api_key             # no value: one counter per distinct value
//!   max: 10000                 # requests allowed per window
//!   seconds: 60                # fixed window: 1, 60, 3600 or 86400
//! - domain: meshpatterns
//!   descriptor:
//!   - {key: api_key, value: gold}   # with a value: only that value
//!   max: 50000
//!   seconds: 60
//! ```

use std::collections::BTreeSet;
use std::fmt;

use limitador::limit::{Expression, Limit, Predicate};
use serde::Deserialize;

/// The Limitador context variable holding a descriptor's entries as a map
/// (`descriptors[0]["api_key"]`): a map lookup takes any key Envoy may
/// send, which a CEL identifier would not (`x-api-key`).
pub const DESCRIPTORS: &str = "descriptors";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub limits: Vec<LimitConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub domain: String,
    pub descriptor: Vec<EntryConfig>,
    pub max: u64,
    pub seconds: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryConfig {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Window lengths Envoy's `RateLimitResponse.RateLimit.Unit` can state
/// (its X-RateLimit headers print the window from the unit).
pub const WINDOWS: [u64; 4] = [1, 60, 3600, 86400];

/// Parse a limits file (YAML, or JSON which is YAML) and validate it.
pub fn parse(text: &str) -> Result<Vec<Limit>, ConfigError> {
    let cfg: Config = serde_norway::from_str(text).map_err(|e| ConfigError(format!("limits file: {e}")))?;
    cfg.limits.iter().enumerate().map(|(i, l)| l.to_limit(&format!("limits[{i}]"))).collect()
}

/// A CEL string literal holding `s`.
fn cel_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn entry(key: &str) -> String {
    format!("{DESCRIPTORS}[0][{}]", cel_string(key))
}

impl LimitConfig {
    /// The Limitador limit for this entry: namespace = domain; a condition
    /// on the number of entries (a descriptor matches only with exactly these
    /// keys, as in Envoy's reference service) and on each fixed value; a
    /// variable for each key without a value (one counter per value seen).
    pub fn to_limit(&self, at: &str) -> Result<Limit, ConfigError> {
        if self.domain.is_empty() {
            return Err(ConfigError(format!("{at}.domain: must not be empty")));
        }
        if self.descriptor.is_empty() {
            return Err(ConfigError(format!("{at}.descriptor: needs at least one entry (key, optional value)")));
        }
        if !WINDOWS.contains(&self.seconds) {
            return Err(ConfigError(format!(
                "{at}.seconds: {} is not a window Envoy's rate limit protocol can state; use 1, 60, 3600 or 86400",
                self.seconds
            )));
        }
        if self.max == 0 || self.max > u64::from(u32::MAX) {
            return Err(ConfigError(format!("{at}.max: {} is out of range 1..={}", self.max, u32::MAX)));
        }
        let mut keys = BTreeSet::new();
        let mut conditions = vec![format!("size({DESCRIPTORS}[0]) == {}", self.descriptor.len())];
        let mut variables = Vec::new();
        for (j, e) in self.descriptor.iter().enumerate() {
            if e.key.is_empty() {
                return Err(ConfigError(format!("{at}.descriptor[{j}].key: must not be empty")));
            }
            if !keys.insert(e.key.as_str()) {
                return Err(ConfigError(format!("{at}.descriptor[{j}].key: {:?} appears twice", e.key)));
            }
            match &e.value {
                Some(v) => conditions.push(format!("{} == {}", entry(&e.key), cel_string(v))),
                None => variables.push(entry(&e.key)),
            }
        }
        let conditions = conditions
            .into_iter()
            .map(|c| Predicate::parse(&c).map_err(|err| ConfigError(format!("{at}.descriptor: condition {c}: {err}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let variables = variables
            .into_iter()
            .map(|v| Expression::parse(&v).map_err(|err| ConfigError(format!("{at}.descriptor: variable {v}: {err}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut limit = Limit::new(self.domain.as_str(), self.max, self.seconds, conditions, variables);
        if let Some(name) = &self.name {
            limit.set_name(name.clone());
        }
        Ok(limit)
    }
}

/// The limit for descriptors that carry their own (Envoy's
/// `RateLimitOverride`: `max` per window of `seconds`) with exactly the
/// entry keys `keys`: its own namespace (so no configured limit and no
/// other override counts with it), one counter per distinct combination of
/// values.
pub fn override_limit(namespace: &str, keys: &[&str], max: u64, seconds: u64) -> Result<Limit, ConfigError> {
    let conditions = [format!("size({DESCRIPTORS}[0]) == {}", keys.len())]
        .into_iter()
        .map(|c| Predicate::parse(&c).map_err(|err| ConfigError(format!("override: condition {c}: {err}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let variables = keys
        .iter()
        .map(|k| Expression::parse(entry(k)).map_err(|err| ConfigError(format!("override: variable {k}: {err}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Limit::new(namespace, max, seconds, conditions, variables))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn a_valid_file_becomes_limits() {
        let limits = parse(
            "limits:\n\
             - {name: per-key, domain: d, descriptor: [{key: api_key}], max: 10, seconds: 60}\n\
             - {domain: d, descriptor: [{key: api_key, value: 'go\"ld'}, {key: path}], max: 5, seconds: 1}\n",
        )
        .unwrap();
        assert_eq!(limits.len(), 2);
        assert_eq!(limits[0].name(), Some("per-key"));
        assert_eq!(limits[0].max_value(), 10);
        assert_eq!(limits[0].seconds(), 60);
        assert_eq!(limits[0].variables(), std::collections::HashSet::from(["descriptors[0][\"api_key\"]".to_string()]));
        assert!(limits[1].conditions().contains("descriptors[0][\"api_key\"] == \"go\\\"ld\""), "{:?}", limits[1].conditions());
        assert!(limits[1].conditions().contains("size(descriptors[0]) == 2"));
    }

    #[test]
    fn errors_name_the_field() {
        let err = |text: &str| parse(text).unwrap_err().0;
        assert!(err("limits: [{domain: d, descriptor: [{key: k}], max: 1, seconds: 10}]").starts_with("limits[0].seconds: 10 "));
        assert!(err("limits: [{domain: d, descriptor: [], max: 1, seconds: 1}]").starts_with("limits[0].descriptor:"));
        assert!(err("limits: [{domain: '', descriptor: [{key: k}], max: 1, seconds: 1}]").starts_with("limits[0].domain:"));
        assert!(err("limits: [{domain: d, descriptor: [{key: k}], max: 0, seconds: 1}]").starts_with("limits[0].max: 0"));
        assert!(err("limits: [{domain: d, descriptor: [{key: k}, {key: k}], max: 1, seconds: 1}]")
            .starts_with("limits[0].descriptor[1].key: \"k\" appears twice"));
        assert!(err("limits: [{domain: d, descriptor: [{key: k}], max: 1, seconds: 1, burst: 2}]").contains("unknown field `burst`"));
    }
}
