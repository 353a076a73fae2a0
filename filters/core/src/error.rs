//! The one config error type every filter reports.
//!
//! A platform engineer who mistypes a plugin config must learn from a single log
//! line which field is wrong, what it held, and what would have been accepted;
//! `on_configure` then returns false so Envoy refuses the config.

use std::fmt;

/// A rejected config value: the field path (`keySources[2].pathRegex.group`),
/// the value as written, and what the field allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub value: String,
    pub allowed: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, value: impl fmt::Display, allowed: impl Into<String>) -> Self {
        ConfigError { field: field.into(), value: value.to_string(), allowed: allowed.into() }
    }

    /// The same error reported under a parent path: `at("sessionCookie")` turns
    /// `name` into `sessionCookie.name`.
    pub fn at(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }

    /// A JSON document that does not fit the config schema (unknown field,
    /// wrong type, bad syntax). serde's message already names the field and,
    /// for unknown fields, lists the allowed ones.
    pub fn syntax(message: impl fmt::Display) -> Self {
        ConfigError { field: "(document)".into(), value: message.to_string(), allowed: "the documented JSON schema".into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field == "(document)" {
            write!(f, "invalid plugin config: {}", self.value)
        } else {
            write!(f, "invalid plugin config: field `{}` has value {}; allowed: {}", self.field, self.value, self.allowed)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parse a JSON plugin config into `T`, mapping serde errors to [`ConfigError`].
/// An empty config is treated as `{}` so that filters with all-default configs
/// can be loaded without a `configuration` block.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::new("(document)", e, "UTF-8 JSON"))?;
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str(text).map_err(ConfigError::syntax)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn names_field_value_and_allowed() {
        let e = ConfigError::new("group", 7, "0..=2").at("pathRegex").at("keySources[1]");
        assert_eq!(e.field, "keySources[1].pathRegex.group");
        assert_eq!(e.to_string(), "invalid plugin config: field `keySources[1].pathRegex.group` has value 7; allowed: 0..=2");
    }
}
