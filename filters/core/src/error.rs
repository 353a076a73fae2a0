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
        self.field = if self.field.is_empty() { parent.to_string() } else { join(parent, &self.field) };
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
        } else if self.value == "(unknown field)" {
            let name = last_key(&self.field);
            write!(f, "invalid plugin config: unknown field `{name}` at `{}`; allowed: {}", self.field, self.allowed)
        } else {
            write!(f, "invalid plugin config: field `{}` has value {}; allowed: {}", self.field, self.value, self.allowed)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parse a JSON plugin config into `T`. Every error names the field by its
/// path (`policies[0].rate`), type errors included, and never a line or column
/// (Istio users did not write the JSON Envoy receives). An empty config is
/// treated as `{}` so that filters with all-default configs load without a
/// `configuration` block.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    from_value(parse_value(bytes)?, "")
}

/// Parse JSON text into a value, refusing duplicate object keys (which plain
/// `serde_json::Value` would silently collapse to the last one).
pub fn parse_value(bytes: &[u8]) -> Result<serde_json::Value, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::new("(document)", e, "UTF-8 JSON"))?;
    let text = if text.trim().is_empty() { "{}" } else { text };
    let mut de = serde_json::Deserializer::from_str(text);
    let v = serde_path_to_error::deserialize(&mut de).map(|StrictValue(v)| v).map_err(|e| {
        let field = path_text(e.path(), "");
        let msg = strip_position(&e.inner().to_string());
        match between(&msg, "the key `", "` appears twice") {
            Some(key) => ConfigError::new(join(&field, &key_segment(key)), "(repeated)", "each key once per object"),
            None if field.is_empty() => ConfigError::syntax(format!("not valid JSON: {msg}")),
            None => ConfigError::new(field, "(not valid JSON)", msg),
        }
    })?;
    de.end().map_err(|e| ConfigError::syntax(format!("not valid JSON: {}", strip_position(&e.to_string()))))?;
    Ok(v)
}

/// Deserialize `T` from a parsed value; errors name the field under `prefix`
/// (`stages[1].rateLimit`), the value found there, and what the field allows.
pub fn from_value<T: serde::de::DeserializeOwned>(v: serde_json::Value, prefix: &str) -> Result<T, ConfigError> {
    crate::de::from_value(&v).map_err(|(e, path)| explain(e, &path, &v, prefix))
}

/// The config error for a failed [`from_value`]. Kept out of the generic
/// function, so that each module holds one copy, not one per config type.
#[inline(never)]
fn explain(e: crate::de::Error, path: &[crate::de::Seg], v: &serde_json::Value, prefix: &str) -> ConfigError {
    let msg = e.0;
    let mut field = seg_text(path, prefix);
    let found = lookup(v, path);
    if let Some(missing) = between(&msg, "missing field `", "`") {
        field = join(&field, missing);
        return ConfigError::new(field, "(missing)", "a value: this field is required");
    }
    if let Some(unknown) = between(&msg, "unknown field `", "`") {
        let segment = key_segment(unknown);
        if !field.ends_with(&segment) {
            field = join(&field, &segment);
        }
        let allowed = msg.split_once(", expected ").map(|(_, a)| a.to_string()).unwrap_or_else(|| "no fields here".into());
        return ConfigError::new(field, "(unknown field)", allowed);
    }
    let value = found.map(|f| short(&f.to_string())).unwrap_or_else(|| "(unreadable)".into());
    let allowed = match msg.split_once(", expected ") {
        Some((_, want)) if !msg.starts_with("unknown variant") => friendly(want),
        _ => msg.clone(),
    };
    if field.is_empty() {
        return ConfigError::syntax(msg);
    }
    ConfigError::new(field, value, allowed)
}

/// `parent.child`, or `parent["..."]` for a child that is a quoted key
/// segment (see [`key_segment`]).
pub fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() || child.starts_with('[') {
        format!("{parent}{child}")
    } else {
        format!("{parent}.{child}")
    }
}

/// How an object key appears in a field path: as it is when it is a plain
/// name (letters, digits, `_`, `-`, `:`), else as a JSON string in brackets
/// (`[""]`, `["a.b"]`, `["[x"]`), so that every path reads one way and
/// `at` joins it the same way the pipeline's prefix does.
pub fn key_segment(key: &str) -> String {
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':'));
    if plain {
        key.to_string()
    } else {
        format!("[{}]", serde_json::Value::String(key.to_string()))
    }
}

/// The last key of a field path, for "unknown field `name`": the plain name
/// after the last `.`, or a bracketed key's JSON string.
fn last_key(field: &str) -> &str {
    if field.ends_with("\"]") {
        if let Some(i) = field.rfind("[\"") {
            // The bracketed segment may itself contain `["`: take the last
            // one that parses as the whole remaining JSON string.
            let mut at = Some(i);
            while let Some(j) = at {
                let seg = field.get(j + 1..field.len() - 1).unwrap_or("");
                // Parsed as any value, not as `String`: serde_json's typed
                // entry points link its float formatting for their messages.
                if serde_json::from_str::<StrictValue>(seg).is_ok_and(|StrictValue(v)| v.is_string()) {
                    return seg;
                }
                at = field.get(..j).and_then(|f| f.rfind("[\""));
            }
        }
    }
    field.rsplit(['.', ']']).next().unwrap_or(field)
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let rest = s.split_once(open)?.1;
    rest.split_once(close).map(|(a, _)| a)
}

fn short(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_string();
    }
    let mut end = 77;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or(""))
}

/// serde's names for what a field expects, as a user would read them.
fn friendly(want: &str) -> String {
    let int = |lo: &str, hi: &str| format!("an integer {lo}..={hi}");
    match want {
        "u8" => int("0", "255"),
        "u16" => int("0", "65535"),
        "u32" => int("0", "4294967295"),
        "u64" | "usize" => int("0", "18446744073709551615"),
        "i32" => int("-2147483648", "2147483647"),
        "i64" => int("-9223372036854775808", "9223372036854775807"),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list".into(),
        w if w.starts_with("struct ") || w == "a map" => "an object".into(),
        w => w.to_string(),
    }
}

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

fn path_text(path: &serde_path_to_error::Path, prefix: &str) -> String {
    use serde_path_to_error::Segment;
    let mut out = prefix.to_string();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => out = join(&out, &key_segment(key)),
            Segment::Unknown => {}
        }
    }
    out
}

fn seg_text(path: &[crate::de::Seg], prefix: &str) -> String {
    use crate::de::Seg;
    let mut out = prefix.to_string();
    for seg in path {
        match seg {
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
            Seg::Key(key) => out = join(&out, &key_segment(key)),
        }
    }
    out
}

fn lookup<'a>(v: &'a serde_json::Value, path: &[crate::de::Seg]) -> Option<&'a serde_json::Value> {
    use crate::de::Seg;
    let mut cur = v;
    for seg in path {
        cur = match seg {
            Seg::Index(i) => cur.get(*i)?,
            Seg::Key(key) => cur.get(key.as_str())?,
        };
    }
    Some(cur)
}

/// A JSON value whose objects may not repeat a key.
struct StrictValue(serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = StrictValue;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
        Ok(StrictValue(serde_json::Number::from_f64(v).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)))
    }
    fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(v.into()))
    }
    fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(v.into()))
    }
    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(serde_json::Value::Null))
    }
    fn visit_none<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(serde_json::Value::Null))
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<StrictValue, D::Error> {
        serde::Deserialize::deserialize(d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(StrictValue(serde_json::Value::Array(out)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!("the key `{key}` appears twice in one object")));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(StrictValue(serde_json::Value::Object(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[allow(dead_code)]
    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Policy {
        rate: u64,
        #[serde(default)]
        shadow: bool,
    }

    #[allow(dead_code)]
    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Doc {
        policies: Vec<Policy>,
    }

    fn err(json: &str) -> ConfigError {
        parse_json::<Doc>(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn type_errors_name_the_path() {
        let e = err(r#"{"policies":[{"rate":"NaN"}]}"#);
        assert_eq!((e.field.as_str(), e.value.as_str()), ("policies[0].rate", r#""NaN""#));
        assert_eq!(e.allowed, "an integer 0..=18446744073709551615");
        for (json, field) in [
            (r#"{"policies":[{"rate":1},{"rate":-1}]}"#, "policies[1].rate"),
            (r#"{"policies":[{"rate":1.5}]}"#, "policies[0].rate"),
            (r#"{"policies":[{"rate":null}]}"#, "policies[0].rate"),
            (r#"{"policies":[{"rate":1e400}]}"#, "policies[0].rate"),
            (r#"{"policies":{"rate":1}}"#, "policies"),
            (r#"{"policies":[{"rate":1,"shadow":"yes"}]}"#, "policies[0].shadow"),
            (r#"{"policies":[{}]}"#, "policies[0].rate"),
            (r#"{"policies":[{"rate":1,"rat":2}]}"#, "policies[0].rat"),
            (r#"{"policies":[{"rate":1,"rate":2}]}"#, "policies[0].rate"),
        ] {
            assert_eq!(err(json).field, field, "{json}: {}", err(json));
            assert!(!err(json).to_string().contains(" column "), "{json}: {}", err(json));
        }
    }

    #[test]
    fn odd_keys_are_quoted_alike_by_every_path() {
        for (json, field, name) in [
            (r#"{"policies":[{"rate":1,"":2}]}"#, r#"policies[0][""]"#, r#""""#),
            (r#"{"policies":[{"rate":1,"[olicies":2}]}"#, r#"policies[0]["[olicies"]"#, r#""[olicies""#),
            (r#"{"policies":[{"rate":1,"a.b":2}]}"#, r#"policies[0]["a.b"]"#, r#""a.b""#),
            (r#"{"policies":[],"":1,"":2}"#, r#"[""]"#, r#""""#),
            (r#"{"":1}"#, r#"[""]"#, r#""""#),
        ] {
            let e = err(json);
            assert_eq!(e.field, field, "{json}: {e}");
            if e.value == "(unknown field)" {
                assert!(e.to_string().contains(&format!("unknown field `{name}` at `{field}`")), "{e}");
            }
            // Joined under a parent as the pipeline's prefix joins it.
            assert_eq!(
                e.at("stages[0].rateLimit").field,
                format!("stages[0].rateLimit{}", if field.starts_with('[') { field.to_string() } else { format!(".{field}") })
            );
            // (A repeated key fails before, in `parse_value`, with no prefix.)
            if let Ok(v) = parse_value(json.as_bytes()) {
                let piped = from_value::<Doc>(v, "stages[0].rateLimit").map(|_| ()).unwrap_err();
                assert_eq!(piped.field, err(json).at("stages[0].rateLimit").field, "{json}");
            }
        }
        assert_eq!(key_segment("x-api-key"), "x-api-key");
        assert_eq!(key_segment(r#"a"]"#), r#"["a\"]"]"#);
    }

    #[test]
    fn names_field_value_and_allowed() {
        let e = ConfigError::new("group", 7, "0..=2").at("pathRegex").at("keySources[1]");
        assert_eq!(e.field, "keySources[1].pathRegex.group");
        assert_eq!(e.to_string(), "invalid plugin config: field `keySources[1].pathRegex.group` has value 7; allowed: 0..=2");
    }
}

/// A deprecated field a config used: its path, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deprecation {
    pub old: String,
    pub new: String,
}

/// One log line naming every deprecated field `filter`'s config used and its
/// replacement; `None` when it used none.
pub fn deprecation_warning(filter: &str, used: &[Deprecation]) -> Option<String> {
    if used.is_empty() {
        return None;
    }
    let list: Vec<String> = used.iter().map(|d| format!("`{}` (use `{}`)", d.old, d.new)).collect();
    Some(format!("{filter}: deprecated config fields, read for this release only: {}", list.join(", ")))
}
