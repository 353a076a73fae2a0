//! Cookies: reading a value from a `Cookie` header and building a validated
//! `Set-Cookie` for a cookie the filter issues (sessions, experiment arms).

use serde::Deserialize;

use crate::names;
use crate::ConfigError;

/// The value of cookie `name` in a `Cookie` header (`a=1; b=2`), with
/// surrounding double quotes removed. The first occurrence wins.
pub fn find<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    let v = find_bytes(cookie_header.as_bytes(), name)?;
    // `find_bytes` splits only at ASCII bytes, so `v` lies on char boundaries.
    std::str::from_utf8(v).ok()
}

/// [`find`] over the bytes the client sent: a value that is not UTF-8 is
/// returned as it is, never replaced, so two such values never collapse.
pub fn find_bytes<'a>(cookie_header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    cookie_header.split(|b| *b == b';').find_map(|pair| {
        let eq = pair.iter().position(|b| *b == b'=')?;
        let (k, v) = (pair.get(..eq)?, pair.get(eq + 1..)?);
        if k.trim_ascii() == name.as_bytes() {
            let v = v.trim_ascii();
            Some(v.strip_prefix(b"\"").and_then(|s| s.strip_suffix(b"\"")).unwrap_or(v))
        } else {
            None
        }
    })
}

/// RFC 6265 cookie-octet: what a cookie value may contain unquoted.
pub fn is_cookie_value(v: &str) -> bool {
    v.bytes().all(|b| matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e))
}

/// An id for a cookie the filter issues (session, experiment user) from 16
/// random bytes: 32 lowercase hex digits, always a valid cookie value.
pub fn id_from_bytes(random: &[u8; 16]) -> String {
    random.iter().map(|b| format!("{b:02x}")).collect()
}

/// Longest `Max-Age` browsers honour (400 days, RFC 6265bis).
pub const MAX_TTL_SECONDS: u64 = 400 * 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

/// A cookie the filter issues, as configured.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieConfig {
    pub name: String,
    /// Max-Age in seconds; 0 issues a session cookie (no Max-Age).
    #[serde(default)]
    pub ttl_seconds: u64,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default = "yes")]
    pub http_only: bool,
    #[serde(default)]
    pub secure: bool,
    #[serde(default = "lax")]
    pub same_site: SameSite,
}

fn default_path() -> String {
    "/".into()
}
fn yes() -> bool {
    true
}
fn lax() -> SameSite {
    SameSite::Lax
}

/// A validated cookie spec that renders `Set-Cookie` values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieSpec {
    pub name: String,
    attributes: String,
}

impl CookieSpec {
    pub fn try_from_config(c: &CookieConfig) -> Result<CookieSpec, ConfigError> {
        let name = names::cookie_name("name", &c.name)?;
        if c.ttl_seconds > MAX_TTL_SECONDS {
            return Err(ConfigError::new("ttlSeconds", c.ttl_seconds, format!("0 (session cookie) to {MAX_TTL_SECONDS} (400 days)")));
        }
        let attr_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';');
        if !c.path.starts_with('/') || !attr_ok(&c.path) {
            return Err(ConfigError::new(
                "path",
                format!("{:?}", c.path),
                "a path starting with '/' without spaces, ';' or control characters",
            ));
        }
        if let Some(d) = &c.domain {
            if !attr_ok(d) || !d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
                return Err(ConfigError::new("domain", format!("{d:?}"), "a domain name (letters, digits, '.', '-')"));
            }
        }
        if c.same_site == SameSite::None && !c.secure {
            return Err(ConfigError::new(
                "sameSite",
                "\"None\"",
                "\"Strict\" or \"Lax\", or \"None\" together with secure: true (browsers drop SameSite=None cookies without Secure)",
            ));
        }
        let mut attributes = format!("; Path={}", c.path);
        if let Some(d) = &c.domain {
            attributes.push_str("; Domain=");
            attributes.push_str(d);
        }
        if c.ttl_seconds > 0 {
            attributes.push_str(&format!("; Max-Age={}", c.ttl_seconds));
        }
        if c.http_only {
            attributes.push_str("; HttpOnly");
        }
        if c.secure {
            attributes.push_str("; Secure");
        }
        attributes.push_str(match c.same_site {
            SameSite::Strict => "; SameSite=Strict",
            SameSite::Lax => "; SameSite=Lax",
            SameSite::None => "; SameSite=None",
        });
        Ok(CookieSpec { name, attributes })
    }

    /// The `Set-Cookie` header value for `value` (which must be a cookie-octet string).
    pub fn set_cookie(&self, value: &str) -> String {
        format!("{}={}{}", self.name, value, self.attributes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn cfg(json: &str) -> CookieConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn ids_are_32_hex_digits_and_cookie_safe() {
        let id = id_from_bytes(&[0xab; 16]);
        assert_eq!(id, "ab".repeat(16));
        assert!(is_cookie_value(&id));
    }

    #[test]
    fn finds_cookies() {
        assert_eq!(find("a=1; sid=abc; b=2", "sid"), Some("abc"));
        assert_eq!(find("sid=\"q\"", "sid"), Some("q"));
        assert_eq!(find("xsid=1;sid=2", "sid"), Some("2"));
        assert_eq!(find("garbage;;==;", "sid"), None);
        assert_eq!(find("", "sid"), None);
    }

    #[test]
    fn renders_set_cookie() {
        let s = CookieSpec::try_from_config(&cfg(r#"{"name":"mp_session","ttlSeconds":3600,"secure":true,"sameSite":"Strict"}"#)).unwrap();
        assert_eq!(s.set_cookie("abc"), "mp_session=abc; Path=/; Max-Age=3600; HttpOnly; Secure; SameSite=Strict");
        let s = CookieSpec::try_from_config(&cfg(r#"{"name":"s","httpOnly":false}"#)).unwrap();
        assert_eq!(s.set_cookie("v"), "s=v; Path=/; SameSite=Lax");
    }

    #[test]
    fn rejects_bad_cookies() {
        let e = CookieSpec::try_from_config(&cfg(r#"{"name":"s","sameSite":"None"}"#)).unwrap_err();
        assert_eq!(e.field, "sameSite");
        let e = CookieSpec::try_from_config(&cfg(r#"{"name":"s","path":"x"}"#)).unwrap_err();
        assert_eq!(e.field, "path");
        let e = CookieSpec::try_from_config(&cfg(r#"{"name":"s","ttlSeconds":99999999999}"#)).unwrap_err();
        assert_eq!(e.field, "ttlSeconds");
        let e = CookieSpec::try_from_config(&cfg(r#"{"name":"a b"}"#)).unwrap_err();
        assert_eq!(e.field, "name");
        assert!(serde_json::from_str::<CookieConfig>(r#"{"name":"s","maxAge":1}"#).is_err());
    }
}
