//! Key sources: where a filter finds the key that places a request (a session
//! id, a shard key, a user id, a rate-limit client).
//!
//! A [`KeySpec`] is an ordered list of sources tried in turn; the first one
//! that yields a usable value wins, and an optional literal fallback applies
//! when none does. Every filter shares this spec, so users learn one syntax:
//!
//! ```json
//! "keySources": [
//!   {"header": "x-user-id"},
//!   {"cookie": "sid"},
//!   {"query": "session"},
//!   {"pathSegment": 1},
//!   {"pathRegex": {"pattern": "^/users/([^/]+)", "group": 1}},
//!   {"clientAddress": {"trustedHops": 1}},
//!   "method", "path"
//! ]
//! ```
//!
//! Keys are the bytes the client sent: never decoded lossily, so values that
//! differ only in bytes that are not UTF-8 stay different keys (valid UTF-8
//! keys are exactly what they always were). Header values lose surrounding
//! spaces and tabs; query names and values are percent-decoded (`%XX` to the
//! byte XX, `+` to a space, malformed escapes kept as written); cookie values
//! lose surrounding quotes; path segments and `path` are taken without the
//! query and are not decoded; client addresses lose their port.
//! Empty values, and values longer than [`MAX_KEY_BYTES`], count as absent so a
//! client cannot make a filter hold arbitrarily large keys.

use std::borrow::Cow;

use regex_lite::Regex;
use serde::Deserialize;

use crate::{cookie, names, ConfigError};

/// Longest key value a source yields; longer values count as absent.
pub const MAX_KEY_BYTES: usize = 1024;
/// Most X-Forwarded-For hops a config may trust.
pub const MAX_TRUSTED_HOPS: u32 = 16;

/// Read access to the request a key is taken from. The proxy-wasm glue
/// implements it over hostcalls; tests implement it over a map.
pub trait RequestView {
    /// First value of header `name` (lowercase), the bytes as sent. For
    /// `cookie`, every copy joined with `"; "` (HTTP/2 splits cookies).
    fn header_bytes(&self, name: &str) -> Option<Cow<'_, [u8]>>;
    /// [`RequestView::header_bytes`] as text, bytes that are not UTF-8
    /// replaced: for matching and labels, never for keys.
    fn header(&self, name: &str) -> Option<String> {
        self.header_bytes(name).map(|b| String::from_utf8_lossy(&b).into_owned())
    }
    /// The request path including any query string (`:path`).
    fn path(&self) -> Option<String> {
        self.header(":path")
    }
    /// The request method (`:method`).
    fn method(&self) -> Option<String> {
        self.header(":method")
    }
    /// The address of the directly connected peer, `ip:port` or `ip`.
    fn source_address(&self) -> Option<String>;
}

/// One key source as written in JSON.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum KeySourceConfig {
    /// Value of a request header.
    Header(String),
    /// Value of a cookie.
    Cookie(String),
    /// Value of a query parameter (percent-decoded).
    Query(String),
    /// The n-th non-empty path segment, counting from 0 (`/users/42` → 1 is `42`).
    PathSegment(u32),
    /// A capture group of a regex matched against the path without its query.
    PathRegex(PathRegexConfig),
    /// The client's IP address, from the peer address and trusted X-Forwarded-For hops.
    ClientAddress(ClientAddressConfig),
    /// The request method.
    Method,
    /// The path without the query string.
    Path,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathRegexConfig {
    pub pattern: String,
    #[serde(default = "one")]
    pub group: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientAddressConfig {
    /// How many proxies in front of Envoy append to X-Forwarded-For and are
    /// trusted. 0 uses the connected peer's address and ignores the header.
    #[serde(default)]
    pub trusted_hops: u32,
}

/// A validated key source.
#[derive(Debug, Clone)]
pub enum KeySource {
    Header(String),
    Cookie(String),
    Query(String),
    PathSegment(usize),
    PathRegex { regex: Regex, group: usize },
    ClientAddress { trusted_hops: usize },
    Method,
    Path,
}

impl KeySource {
    pub fn try_from_config(c: &KeySourceConfig) -> Result<KeySource, ConfigError> {
        Ok(match c {
            KeySourceConfig::Header(h) => KeySource::Header(names::header_name("header", h)?),
            KeySourceConfig::Cookie(n) => KeySource::Cookie(names::cookie_name("cookie", n)?),
            KeySourceConfig::Query(q) => {
                if q.is_empty() || q.contains(['&', '=', '#']) {
                    return Err(ConfigError::new("query", format!("{q:?}"), "a non-empty query parameter name without '&', '=' or '#'"));
                }
                KeySource::Query(q.clone())
            }
            KeySourceConfig::PathSegment(i) => {
                if *i > 64 {
                    return Err(ConfigError::new("pathSegment", i, "0..=64"));
                }
                KeySource::PathSegment(*i as usize)
            }
            KeySourceConfig::PathRegex(r) => {
                let regex = Regex::new(&r.pattern).map_err(|e| {
                    ConfigError::new(
                        "pathRegex.pattern",
                        format!("{:?}", r.pattern),
                        format!("a valid regular expression (regex-lite syntax): {e}"),
                    )
                })?;
                let groups = regex.captures_len() - 1;
                if r.group as usize > groups || r.pattern.len() > 1024 {
                    return Err(ConfigError::new(
                        "pathRegex.group",
                        r.group,
                        format!("0..={groups} (the pattern has {groups} capture groups)"),
                    ));
                }
                KeySource::PathRegex { regex, group: r.group as usize }
            }
            KeySourceConfig::ClientAddress(a) => {
                if a.trusted_hops > MAX_TRUSTED_HOPS {
                    return Err(ConfigError::new("clientAddress.trustedHops", a.trusted_hops, format!("0..={MAX_TRUSTED_HOPS}")));
                }
                KeySource::ClientAddress { trusted_hops: a.trusted_hops as usize }
            }
            KeySourceConfig::Method => KeySource::Method,
            KeySourceConfig::Path => KeySource::Path,
        })
    }

    /// Short label naming the source, for filter state, logs and metrics:
    /// `header:x-user-id`, `cookie:sid`, `query:s`, `path_segment:1`,
    /// `path_regex`, `client_address`, `method`, `path`.
    pub fn label(&self) -> String {
        match self {
            KeySource::Header(h) => format!("header:{h}"),
            KeySource::Cookie(c) => format!("cookie:{c}"),
            KeySource::Query(q) => format!("query:{q}"),
            KeySource::PathSegment(i) => format!("path_segment:{i}"),
            KeySource::PathRegex { .. } => "path_regex".into(),
            KeySource::ClientAddress { .. } => "client_address".into(),
            KeySource::Method => "method".into(),
            KeySource::Path => "path".into(),
        }
    }

    /// The key this source yields for `req`, if any: the bytes the client sent.
    pub fn extract(&self, req: &dyn RequestView) -> Option<Vec<u8>> {
        self.extract_cow(req).map(Cow::into_owned)
    }

    /// [`extract`](Self::extract), borrowing from the request where it can
    /// (a header key is then not copied).
    pub fn extract_cow<'r>(&self, req: &'r dyn RequestView) -> Option<Cow<'r, [u8]>> {
        let path = || req.header_bytes(":path");
        let v: Cow<'r, [u8]> = match self {
            KeySource::Header(h) => match req.header_bytes(h)? {
                Cow::Borrowed(b) => Cow::Borrowed(b.trim_ascii()),
                Cow::Owned(o) => Cow::Owned(o.trim_ascii().to_vec()),
            },
            KeySource::Cookie(c) => Cow::Owned(cookie::find_bytes(&req.header_bytes("cookie")?, c)?.to_vec()),
            KeySource::Query(q) => Cow::Owned(query_param_bytes(&path()?, q)?),
            KeySource::PathSegment(i) => Cow::Owned(path_only(&path()?).split(|b| *b == b'/').filter(|s| !s.is_empty()).nth(*i)?.to_vec()),
            KeySource::PathRegex { regex, group } => Cow::Owned(regex_capture(regex, *group, path_only(&path()?))?),
            KeySource::ClientAddress { trusted_hops } => Cow::Owned(client_address(req, *trusted_hops)?.into_bytes()),
            KeySource::Method => req.header_bytes(":method")?,
            KeySource::Path => Cow::Owned(path_only(&path()?).to_vec()),
        };
        (!v.is_empty() && v.len() <= MAX_KEY_BYTES).then_some(v)
    }
}

/// A capture of `regex` over `bytes`, as bytes. Valid UTF-8 is matched as
/// text; other input is read one char per byte (Latin-1) and the capture
/// mapped back, so the key is still exactly the bytes sent.
fn regex_capture(regex: &Regex, group: usize, bytes: &[u8]) -> Option<Vec<u8>> {
    match std::str::from_utf8(bytes) {
        Ok(text) => regex.captures(text)?.get(group).map(|m| m.as_str().as_bytes().to_vec()),
        Err(_) => {
            let latin1: String = bytes.iter().map(|b| char::from(*b)).collect();
            let m = regex.captures(&latin1)?.get(group)?;
            Some(m.as_str().chars().map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?')).collect())
        }
    }
}

fn path_only(p: &[u8]) -> &[u8] {
    p.split(|b| *b == b'?' || *b == b'#').next().unwrap_or(&[])
}

/// First value of query parameter `name` in `path`, percent-decoded to bytes.
pub fn query_param_bytes(path: &[u8], name: &str) -> Option<Vec<u8>> {
    let at = path.iter().position(|b| *b == b'?')?;
    let query = path.get(at + 1..)?;
    let query = query.split(|b| *b == b'#').next().unwrap_or(&[]);
    query.split(|b| *b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (pair.get(..i)?, pair.get(i + 1..)?),
            None => (pair, &[][..]),
        };
        (percent_decode_bytes(k) == name.as_bytes()).then(|| percent_decode_bytes(v))
    })
}

/// First value of query parameter `name`, percent-decoded (`+` is a space),
/// as text (bytes that are not UTF-8 replaced): for display, not for keys.
pub fn query_param(path: &str, name: &str) -> Option<String> {
    query_param_bytes(path.as_bytes(), name).map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Percent-decode, leaving malformed escapes as they are; invalid UTF-8 is replaced.
pub fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&percent_decode_bytes(s.as_bytes())).into_owned()
}

/// Percent-decode to bytes, leaving malformed escapes as they are.
pub fn percent_decode_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |j: usize| bytes.get(j).and_then(|c| (*c as char).to_digit(16));
        match b {
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    out
}

/// Strip a port and IPv6 brackets: `1.2.3.4:80` → `1.2.3.4`, `[::1]:80` → `::1`.
pub fn strip_port(addr: &str) -> &str {
    let a = addr.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match a.rsplit_once(':') {
        // exactly one colon: IPv4 with port; more than one: bare IPv6
        Some((host, _)) if !host.contains(':') => host,
        _ => a,
    }
}

/// The client address with `trusted_hops` trusted proxies in front of Envoy,
/// counted the way Envoy's `xff_num_trusted_hops` counts them: the list is the
/// X-Forwarded-For entries followed by the connected peer (unless the peer is
/// already the last entry, as when Envoy appended it itself), and the client is
/// the entry `trusted_hops` places left of the end. With 0 hops the header is
/// ignored. When the list is shorter than that, the leftmost entry is used.
pub fn client_address(req: &dyn RequestView, trusted_hops: usize) -> Option<String> {
    let peer = req.source_address().map(|a| strip_port(&a).to_string());
    if trusted_hops == 0 {
        return peer;
    }
    let xff = req.header("x-forwarded-for").unwrap_or_default();
    let mut list: Vec<&str> = xff.split(',').map(strip_port).filter(|s| !s.is_empty()).collect();
    if let Some(p) = peer.as_deref() {
        if list.last() != Some(&p) {
            list.push(p);
        }
    }
    let idx = list.len().saturating_sub(1 + trusted_hops);
    list.get(idx).map(|s| s.to_string())
}

/// Key sources as written in JSON, plus the literal fallback.
#[derive(Debug, Clone, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySpecConfig {
    #[serde(default)]
    pub key_sources: Vec<KeySourceConfig>,
    #[serde(default)]
    pub fallback_key: Option<String>,
}

/// A validated, ordered list of key sources with an optional fallback.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub sources: Vec<KeySource>,
    pub fallback: Option<String>,
    /// Each source's label, made once (see [`KeySpec::label`]).
    labels: Vec<String>,
}

/// The key found for a request and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMatch {
    /// Index into [`KeySpec::sources`]; `None` for the fallback.
    pub source: Option<usize>,
    /// The key, exactly the bytes the client sent (see the module docs).
    pub value: Vec<u8>,
}

impl KeyMatch {
    /// The key for logs and filter state: UTF-8 as is, other bytes as `\xNN`.
    pub fn display(&self) -> String {
        escape_bytes(&self.value)
    }
}

/// Bytes as text for logs: valid UTF-8 unchanged, each other byte as `\xNN`.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(chunk.valid());
        for x in chunk.invalid() {
            out.push_str(&format!("\\x{x:02X}"));
        }
    }
    out
}

impl KeySpec {
    /// Validate sources; errors are reported under `field` (`keySources[2].header`).
    pub fn try_new(field: &str, sources: &[KeySourceConfig], fallback: Option<&str>) -> Result<KeySpec, ConfigError> {
        let sources = sources
            .iter()
            .enumerate()
            .map(|(i, s)| KeySource::try_from_config(s).map_err(|e| e.at(&format!("{field}[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(f) = fallback {
            if f.is_empty() || f.len() > MAX_KEY_BYTES {
                return Err(ConfigError::new(
                    "fallbackKey",
                    format!("{f:?}"),
                    format!("a non-empty string of at most {MAX_KEY_BYTES} bytes"),
                ));
            }
        }
        let labels = sources.iter().map(KeySource::label).collect();
        Ok(KeySpec { sources, fallback: fallback.map(str::to_string), labels })
    }

    /// Add a source after the configured ones.
    pub fn push(&mut self, source: KeySource) {
        self.labels.push(source.label());
        self.sources.push(source);
    }

    /// Try the sources in order, then the fallback.
    pub fn extract(&self, req: &dyn RequestView) -> Option<KeyMatch> {
        self.extract_cow(req).map(|(source, v)| KeyMatch { source, value: v.into_owned() })
    }

    /// [`extract`](Self::extract) as (source index, key), the key borrowed
    /// from the request (or the config, for the fallback) where it can be.
    pub fn extract_cow<'r>(&'r self, req: &'r dyn RequestView) -> Option<(Option<usize>, Cow<'r, [u8]>)> {
        self.sources
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.extract_cow(req).map(|v| (Some(i), v)))
            .or_else(|| self.fallback.as_ref().map(|f| (None, Cow::Borrowed(f.as_bytes()))))
    }

    /// The label of source `source` (see [`label`](Self::label)).
    pub fn source_label(&self, source: Option<usize>) -> Cow<'_, str> {
        let Some(i) = source else { return Cow::Borrowed("fallback") };
        match (self.labels.get(i), self.sources.get(i)) {
            (Some(l), _) => Cow::Borrowed(l),
            // A source added to `sources` directly, not through `push`.
            (None, Some(s)) => Cow::Owned(s.label()),
            (None, None) => Cow::Borrowed("fallback"),
        }
    }

    /// Label of the source that produced `m` (`fallback` for the literal).
    /// Borrowed from the labels made with the spec: the request path
    /// allocates nothing for it.
    pub fn label(&self, m: &KeyMatch) -> Cow<'_, str> {
        self.source_label(m.source)
    }
}

/// A request made of a header list and a peer address, for tests and tools.
#[derive(Debug, Clone, Default)]
pub struct StaticRequest {
    pub headers: Vec<(String, String)>,
    /// Headers given as bytes, looked up before `headers`.
    pub raw: Vec<(String, Vec<u8>)>,
    pub source: Option<String>,
}

impl StaticRequest {
    pub fn new(path: &str) -> Self {
        StaticRequest {
            headers: vec![(":path".into(), path.into()), (":method".into(), "GET".into())],
            raw: Vec::new(),
            source: Some("10.0.0.9:5555".into()),
        }
    }
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

impl StaticRequest {
    /// A header with raw bytes (not UTF-8 allowed).
    pub fn with_bytes(mut self, name: &str, value: &[u8]) -> Self {
        self.raw.push((name.into(), value.to_vec()));
        self
    }
}

impl RequestView for StaticRequest {
    fn header_bytes(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        let all = || {
            self.raw
                .iter()
                .filter(move |(k, _)| k == name)
                .map(|(_, v)| v.as_slice())
                .chain(self.headers.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_bytes()))
        };
        if name == "cookie" {
            let parts: Vec<&[u8]> = all().collect();
            return (!parts.is_empty()).then(|| Cow::Owned(parts.join(&b"; "[..])));
        }
        all().next().map(Cow::Borrowed)
    }
    fn source_address(&self) -> Option<String> {
        self.source.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn spec(json: &str) -> Result<KeySpec, ConfigError> {
        let c: KeySpecConfig = serde_json::from_str(json).map_err(ConfigError::syntax)?;
        KeySpec::try_new("keySources", &c.key_sources, c.fallback_key.as_deref())
    }

    #[test]
    fn sources_in_order() {
        let s = spec(r#"{"keySources":[{"header":"X-User"},{"cookie":"sid"},{"query":"s"},{"pathSegment":1},"method"]}"#).unwrap();
        let r = StaticRequest::new("/users/42?s=q%20v").with("cookie", "a=1; sid=abc");
        let m = s.extract(&r).unwrap();
        assert_eq!((m.display().as_str(), s.label(&m).as_ref()), ("abc", "cookie:sid"));
        let r = StaticRequest::new("/users/42?s=q%20v").with("x-user", " u1 ");
        assert_eq!(s.extract(&r).unwrap().value, b"u1");
        let r = StaticRequest::new("/users/42?s=q%20v");
        assert_eq!(s.extract(&r).unwrap().value, b"q v");
        let r = StaticRequest::new("/users/42");
        assert_eq!(s.extract(&r).unwrap().value, b"42");
        let r = StaticRequest::new("/");
        assert_eq!(s.extract(&r).unwrap().value, b"GET");
    }

    #[test]
    fn regex_and_fallback() {
        let s = spec(r#"{"keySources":[{"pathRegex":{"pattern":"^/api/v\\d+/tenants/([a-z0-9-]+)"}}],"fallbackKey":"anon"}"#).unwrap();
        assert_eq!(s.extract(&StaticRequest::new("/api/v2/tenants/acme-1/items?x=1")).unwrap().value, b"acme-1");
        let m = s.extract(&StaticRequest::new("/other")).unwrap();
        assert_eq!((m.display().as_str(), s.label(&m).as_ref()), ("anon", "fallback"));
    }

    #[test]
    fn empty_and_oversized_values_are_absent() {
        let s = spec(r#"{"keySources":[{"header":"x-k"}]}"#).unwrap();
        assert!(s.extract(&StaticRequest::new("/").with("x-k", "")).is_none());
        assert!(s.extract(&StaticRequest::new("/").with("x-k", &"a".repeat(MAX_KEY_BYTES + 1))).is_none());
        assert!(s.extract(&StaticRequest::new("/").with("x-k", &"a".repeat(MAX_KEY_BYTES))).is_some());
    }

    #[test]
    fn keys_are_the_bytes_sent() {
        let s = spec(r#"{"keySources":[{"header":"x-k"}]}"#).unwrap();
        let key = |v: &[u8]| s.extract(&StaticRequest::new("/").with_bytes("x-k", v)).unwrap().value;
        let (e9, ff, fffd) = (key(b"caf\xE9"), key(b"caf\xFF"), key("caf\u{FFFD}".as_bytes()));
        assert!(e9 != ff && ff != fffd && e9 != fffd);
        assert_eq!(e9, b"caf\xE9");
        assert_eq!(key("café".as_bytes()), "café".as_bytes());
        let c = spec(r#"{"keySources":[{"cookie":"sid"}]}"#).unwrap();
        let m = c.extract(&StaticRequest::new("/").with_bytes("cookie", b"a=1; sid=\xFE\xFF")).unwrap();
        assert_eq!((m.value.as_slice(), m.display().as_str()), (&b"\xFE\xFF"[..], "\\xFE\\xFF"));
        let q = spec(r#"{"keySources":[{"query":"s"}]}"#).unwrap();
        assert_eq!(q.extract(&StaticRequest::new("/?s=%FE")).unwrap().value, b"\xFE");
        assert_ne!(q.extract(&StaticRequest::new("/?s=%FE")).unwrap().value, q.extract(&StaticRequest::new("/?s=%FF")).unwrap().value);
        let r = spec(r#"{"keySources":[{"pathRegex":{"pattern":"^/u/([^/]+)"}}]}"#).unwrap();
        let m = r.extract(&StaticRequest::new("/").with_bytes(":path", b"/u/a\xFFb/x")).unwrap();
        assert_eq!(m.value, b"a\xFFb");
        let m = r.extract(&StaticRequest::new("/u/caf\u{e9}/x")).unwrap();
        assert_eq!(m.value, "caf\u{e9}".as_bytes());
    }

    #[test]
    fn client_address_hops() {
        let mut r = StaticRequest::new("/").with("x-forwarded-for", "6.6.6.6, 1.1.1.1, 2.2.2.2");
        r.source = Some("3.3.3.3:4000".into());
        assert_eq!(client_address(&r, 0).as_deref(), Some("3.3.3.3"));
        assert_eq!(client_address(&r, 1).as_deref(), Some("2.2.2.2"));
        assert_eq!(client_address(&r, 2).as_deref(), Some("1.1.1.1"));
        assert_eq!(client_address(&r, 9).as_deref(), Some("6.6.6.6"));
        // Envoy already appended the peer: it is not counted twice.
        let mut r = StaticRequest::new("/").with("x-forwarded-for", "1.1.1.1, 3.3.3.3");
        r.source = Some("3.3.3.3:4000".into());
        assert_eq!(client_address(&r, 1).as_deref(), Some("1.1.1.1"));
        let mut r = StaticRequest::new("/");
        r.source = Some("[2001:db8::1]:443".into());
        assert_eq!(client_address(&r, 0).as_deref(), Some("2001:db8::1"));
        assert_eq!(strip_port("2001:db8::1"), "2001:db8::1");
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("a%2Fb+c%zz%"), "a/b c%zz%");
        assert_eq!(query_param("/p?x&y=1&y=2", "y").as_deref(), Some("1"));
        assert_eq!(query_param("/p?x", "x").as_deref(), Some(""));
    }

    #[test]
    fn bad_sources_name_the_field() {
        let e = spec(r#"{"keySources":[{"header":"ok"},{"header":"bad name"}]}"#).unwrap_err();
        assert_eq!(e.field, "keySources[1].header");
        let e = spec(r#"{"keySources":[{"pathRegex":{"pattern":"(a)","group":2}}]}"#).unwrap_err();
        assert_eq!(e.field, "keySources[0].pathRegex.group");
        let e = spec(r#"{"keySources":[{"pathRegex":{"pattern":"(a"}}]}"#).unwrap_err();
        assert_eq!(e.field, "keySources[0].pathRegex.pattern");
        let e = spec(r#"{"keySources":[{"clientAddress":{"trustedHops":99}}]}"#).unwrap_err();
        assert_eq!(e.field, "keySources[0].clientAddress.trustedHops");
        let e = spec(r#"{"keySources":[{"cookies":"x"}]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `cookies`"), "{e}");
    }
}
