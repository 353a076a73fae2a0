//! The session decision, free of proxy-wasm: which key identifies the session,
//! what goes into the hash header, and whether a session cookie is issued.

use std::borrow::Cow;

use meshpatterns_core::cookie::{CookieConfig, CookieSpec};
use meshpatterns_core::error::ConfigError;
use meshpatterns_core::hash::{hash64, hex16};
use meshpatterns_core::key::{KeySourceConfig, KeySpec};
use meshpatterns_core::{names, KeySource, RequestView};
use serde::Deserialize;

/// Default header Envoy's `hash_policy` reads.
pub const DEFAULT_HASH_HEADER: &str = "x-session-hash";

/// The plugin configuration as written in JSON (Envoy or Istio pluginConfig).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Where the session key comes from, tried in order.
    #[serde(default)]
    pub key_sources: Vec<KeySourceConfig>,
    /// A literal key used when no source matches (everyone unkeyed shares it).
    #[serde(default)]
    pub fallback_key: Option<String>,
    /// Request header that receives the hash (or key) for Envoy's hash_policy.
    #[serde(default = "default_hash_header")]
    pub hash_header: String,
    /// What to write into `hashHeader`: the hex XXH64 of the key, or the key itself.
    #[serde(default)]
    pub header_value: HeaderValue,
    /// Issue a session cookie to clients that arrive without a key.
    #[serde(default)]
    pub session_cookie: Option<CookieConfig>,
}

fn default_hash_header() -> String {
    DEFAULT_HASH_HEADER.into()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum HeaderValue {
    /// 16 hex digits of XXH64(key): fixed length, does not reveal the key upstream.
    #[default]
    Hash,
    /// The key itself (when it is a valid header value; otherwise its hash).
    Key,
}

/// The validated runtime form of [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub keys: KeySpec,
    pub hash_header: String,
    pub header_value: HeaderValue,
    pub cookie: Option<CookieSpec>,
}

impl Settings {
    pub fn try_from_config(c: Config) -> Result<Settings, ConfigError> {
        let mut keys = KeySpec::try_new("keySources", &c.key_sources, c.fallback_key.as_deref())?;
        let hash_header = names::output_header_name("hashHeader", &c.hash_header)?;
        let cookie = c.session_cookie.as_ref().map(CookieSpec::try_from_config).transpose().map_err(|e| e.at("sessionCookie"))?;
        if let Some(ck) = &cookie {
            // The issued cookie must be read back on later requests: if the
            // user did not list it as a source, it is tried last.
            let listed = keys.sources.iter().any(|s| matches!(s, KeySource::Cookie(n) if *n == ck.name));
            if !listed {
                keys.push(KeySource::Cookie(ck.name.clone()));
            }
            if keys.fallback.is_some() {
                return Err(ConfigError::new(
                    "fallbackKey",
                    format!("{:?}", keys.fallback.as_deref().unwrap_or_default()),
                    "no fallbackKey when sessionCookie is set (a client without a key gets a new session instead)",
                ));
            }
        }
        if keys.sources.is_empty() {
            return Err(ConfigError::new("keySources", "[]", "at least one key source, or a sessionCookie"));
        }
        if keys.sources.iter().any(|s| matches!(s, KeySource::Header(h) if *h == hash_header)) {
            return Err(ConfigError::new(
                "hashHeader",
                format!("{hash_header:?}"),
                "a header that is not also a key source (clients must not be able to set it)",
            ));
        }
        Ok(Settings { keys, hash_header, header_value: c.header_value, cookie })
    }
}

/// Where the session key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source<'a> {
    /// A configured key source (its label, such as `cookie:sid`).
    Matched(Cow<'a, str>),
    /// The literal fallback key.
    Fallback,
    /// No key: a new session id was minted and a cookie will be issued.
    Issued,
    /// No key and nothing configured to make one: the header is left unset.
    None,
}

impl Source<'_> {
    pub fn label(&self) -> &str {
        match self {
            Source::Matched(l) => l,
            Source::Fallback => "fallback",
            Source::Issued => "issued",
            Source::None => "none",
        }
    }
}

/// What the glue applies to the request and response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    pub source: Source<'a>,
    /// Value for the hash header; `None` removes any client-sent copy and
    /// leaves the choice to Envoy's load balancer.
    pub header_value: Option<String>,
    /// `Set-Cookie` to add to the response.
    pub set_cookie: Option<String>,
}

/// Decide for one request. `mint` makes a new session id (cookie-safe text)
/// and is called only when a cookie is to be issued.
pub fn decide<'a>(s: &'a Settings, req: &dyn RequestView, mint: impl FnOnce() -> String) -> Decision<'a> {
    if let Some(m) = s.keys.extract(req) {
        let source = if m.source.is_some() { Source::Matched(s.keys.label(&m)) } else { Source::Fallback };
        return Decision { source, header_value: Some(header_value(s, &m.value)), set_cookie: None };
    }
    match &s.cookie {
        Some(ck) => {
            // The first request hashes the minted id exactly as later requests
            // carrying the cookie will, so the client is sticky from the start.
            let id = mint();
            Decision { source: Source::Issued, header_value: Some(header_value(s, id.as_bytes())), set_cookie: Some(ck.set_cookie(&id)) }
        }
        None => Decision { source: Source::None, header_value: None, set_cookie: None },
    }
}

/// The hash header's value for a key: XXH64 of the key's bytes as sent, or
/// the key itself in `key` mode when it is printable ASCII.
fn header_value(s: &Settings, key: &[u8]) -> String {
    match s.header_value {
        HeaderValue::Key if key.iter().all(|b| (0x20..0x7f).contains(b)) => String::from_utf8_lossy(key).into_owned(),
        _ => hex16(hash64(key)),
    }
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

    #[test]
    fn hashes_the_first_matching_source() {
        let s = settings(r#"{"keySources":[{"header":"x-user"},{"cookie":"sid"}]}"#).unwrap();
        let d = decide(&s, &StaticRequest::new("/").with("cookie", "sid=user-42"), || unreachable!());
        assert_eq!(d.source, Source::Matched("cookie:sid".into()));
        assert_eq!(d.header_value.as_deref(), Some("397e9d3a76af7c81")); // XXH64("user-42")
        assert_eq!(d.set_cookie, None);
    }

    #[test]
    fn issued_session_hashes_like_later_requests() {
        let s = settings(r#"{"sessionCookie":{"name":"mp_session","ttlSeconds":60}}"#).unwrap();
        let first = decide(&s, &StaticRequest::new("/"), || "abc123".into());
        assert_eq!(first.source, Source::Issued);
        assert_eq!(first.set_cookie.as_deref(), Some("mp_session=abc123; Path=/; Max-Age=60; HttpOnly; SameSite=Lax"));
        let later = decide(&s, &StaticRequest::new("/").with("cookie", "mp_session=abc123"), || unreachable!());
        assert_eq!(later.source, Source::Matched("cookie:mp_session".into()));
        assert_eq!(first.header_value, later.header_value);
    }

    #[test]
    fn keys_differing_only_in_non_utf8_bytes_hash_apart() {
        let s = settings(r#"{"keySources":[{"header":"x-user"}]}"#).unwrap();
        let h = |v: &[u8]| decide(&s, &StaticRequest::new("/").with_bytes("x-user", v), || unreachable!()).header_value.unwrap();
        let (a, b, c) = (h(b"caf\xE9"), h(b"caf\xFF"), h("caf\u{FFFD}".as_bytes()));
        assert!(a != b && b != c && a != c);
        assert_eq!(h(b"user-42"), "397e9d3a76af7c81"); // unchanged for UTF-8 keys
    }

    #[test]
    fn no_key_no_cookie_leaves_header_unset() {
        let s = settings(r#"{"keySources":[{"header":"x-user"}]}"#).unwrap();
        let d = decide(&s, &StaticRequest::new("/"), || unreachable!());
        assert_eq!((d.source, d.header_value), (Source::None, None));
    }

    #[test]
    fn key_mode_falls_back_to_hash_for_unsafe_keys() {
        let s = settings(r#"{"keySources":[{"query":"s"}],"headerValue":"key"}"#).unwrap();
        assert_eq!(decide(&s, &StaticRequest::new("/?s=abc"), || unreachable!()).header_value.as_deref(), Some("abc"));
        let d = decide(&s, &StaticRequest::new("/?s=a%0Ab"), || unreachable!());
        assert_eq!(d.header_value.as_deref(), Some(hex16(hash64(b"a\nb")).as_str()));
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let cases = [
            (r#"{}"#, "keySources"),
            (r#"{"keySources":[{"header":"x-session-hash"}]}"#, "hashHeader"),
            (r#"{"keySources":[{"header":"a"}],"hashHeader":"bad header"}"#, "hashHeader"),
            (r#"{"sessionCookie":{"name":"s","sameSite":"None"}}"#, "sessionCookie.sameSite"),
            (r#"{"sessionCookie":{"name":"s"},"fallbackKey":"x"}"#, "fallbackKey"),
            (r#"{"keySources":[{"cookie":""}]}"#, "keySources[0].cookie"),
        ];
        for (json, field) in cases {
            let e = settings(json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let e = settings(r#"{"keySources":[{"header":"a"}],"hashHeadr":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `hashHeadr`"), "{e}");
        let e = settings(r#"{"keySources":[{"header":"a"}],"headerValue":"raw"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `raw`"), "{e}");
    }
}
