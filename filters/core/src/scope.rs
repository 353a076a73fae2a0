//! Request scoping: the one `match` block every filter and every pipeline
//! stage accepts, deciding which requests it acts on.
//!
//! ```json
//! "match": {
//!   "hosts": ["shop.example.com", "*.shop.example.com"],
//!   "pathPrefixes": ["/api/"],
//!   "methods": ["GET", "POST"],
//!   "headers": [{"name": "x-tenant"}, {"name": "x-env", "exact": "prod"}],
//!   "not": {"pathPrefixes": ["/api/health"]}
//! }
//! ```
//!
//! Every list given must match (one entry of each list is enough); `not`
//! excludes requests that match it. Hosts are compared with the authority
//! without its port, case-insensitively (`*.suffix` matches any name ending
//! in `.suffix`, not the suffix itself). Paths are compared after
//! normalisation: without query or fragment, unreserved `%XX` escapes
//! decoded, repeated slashes merged, `.` and `..` segments resolved, so
//! `/api/../admin` is `/admin` and `//api/%61` is `/api/a`.

use serde::Deserialize;

use crate::{names, ConfigError, RequestView};

/// A `match` block as written in JSON.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchConfig {
    /// Authorities without port: `example.com` or `*.example.com`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Prefixes of the normalised path, each starting with `/`.
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    /// Request methods (`GET`, `POST`, ...).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header conditions, all of which must hold.
    #[serde(default)]
    pub headers: Vec<HeaderCondition>,
    /// Requests matching this block are excluded.
    #[serde(default)]
    pub not: Option<Box<MatchConfig>>,
}

/// A header condition: present (default), absent (`present: false`) or equal to `exact`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderCondition {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub present: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
enum Host {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Want {
    Present(bool),
    Exact(String),
}

/// A validated `match` block.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matcher {
    hosts: Vec<Host>,
    path_prefixes: Vec<String>,
    methods: Vec<String>,
    headers: Vec<(String, Want)>,
    not: Option<Box<Matcher>>,
}

const MAX_ENTRIES: usize = 256;

impl Matcher {
    /// Validate; errors name the field relative to the block (`hosts[1]`).
    pub fn try_new(c: &MatchConfig) -> Result<Matcher, ConfigError> {
        let limit = |field: &str, n: usize| {
            if n > MAX_ENTRIES {
                Err(ConfigError::new(field, n, format!("at most {MAX_ENTRIES} entries")))
            } else {
                Ok(())
            }
        };
        limit("hosts", c.hosts.len())?;
        limit("pathPrefixes", c.path_prefixes.len())?;
        limit("methods", c.methods.len())?;
        limit("headers", c.headers.len())?;
        let mut hosts = Vec::new();
        for (i, h) in c.hosts.iter().enumerate() {
            let lower = h.to_ascii_lowercase();
            let (name, suffix) = match lower.strip_prefix("*.") {
                Some(rest) => (rest.to_string(), true),
                None => (lower.clone(), false),
            };
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
                && !name.starts_with('.')
                && !name.ends_with('.');
            if !ok {
                return Err(ConfigError::new(
                    format!("hosts[{i}]"),
                    format!("{h:?}"),
                    "a host name without port (`example.com`) or `*.` and a suffix (`*.example.com`)",
                ));
            }
            hosts.push(if suffix { Host::Suffix(format!(".{name}")) } else { Host::Exact(name) });
        }
        for (i, p) in c.path_prefixes.iter().enumerate() {
            if !p.starts_with('/') || p.bytes().any(|b| b <= 0x20 || b == 0x7f || b == b'?' || b == b'#') {
                return Err(ConfigError::new(
                    format!("pathPrefixes[{i}]"),
                    format!("{p:?}"),
                    "a path prefix starting with '/', without spaces, '?' or '#'",
                ));
            }
        }
        let path_prefixes = c.path_prefixes.iter().map(|p| normalize_path(p.as_bytes())).collect();
        for (i, m) in c.methods.iter().enumerate() {
            if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
                return Err(ConfigError::new(format!("methods[{i}]"), format!("{m:?}"), "an upper-case method name such as GET"));
            }
        }
        let mut headers = Vec::new();
        for (i, h) in c.headers.iter().enumerate() {
            let at = format!("headers[{i}]");
            let name = names::header_name("name", &h.name).map_err(|e| e.at(&at))?;
            let want = match (&h.exact, h.present) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        format!("{at}.present"),
                        "set together with exact",
                        "either `exact` or `present`, not both",
                    ))
                }
                (Some(v), None) => Want::Exact(v.clone()),
                (None, p) => Want::Present(p.unwrap_or(true)),
            };
            headers.push((name, want));
        }
        let not = match &c.not {
            None => None,
            Some(n) if n.not.is_some() => return Err(ConfigError::new("not.not", "a nested `not`", "one level of `not`")),
            Some(n) => Some(Box::new(Matcher::try_new(n).map_err(|e| e.at("not"))?)),
        };
        Ok(Matcher { hosts, path_prefixes, methods: c.methods.clone(), headers, not })
    }

    /// Whether the block matches every request (an empty block).
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.path_prefixes.is_empty() && self.methods.is_empty() && self.headers.is_empty() && self.not.is_none()
    }

    /// Whether `req` is in scope.
    pub fn matches(&self, req: &dyn RequestView) -> bool {
        // Most policies and stages have no `match`: answer without a call.
        if self.is_empty() {
            return true;
        }
        self.includes(req) && !self.not.as_ref().is_some_and(|n| n.includes(req))
    }

    fn includes(&self, req: &dyn RequestView) -> bool {
        if !self.hosts.is_empty() {
            let authority = req.header_bytes(":authority").or_else(|| req.header_bytes("host"));
            let host = authority.as_deref().map(host_of).unwrap_or_default();
            let ok = self.hosts.iter().any(|h| match h {
                Host::Exact(e) => host == e.as_bytes(),
                Host::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_bytes()),
            });
            if !ok {
                return false;
            }
        }
        if !self.methods.is_empty() {
            let m = req.header_bytes(":method");
            if !self.methods.iter().any(|x| m.as_deref() == Some(x.as_bytes())) {
                return false;
            }
        }
        if !self.path_prefixes.is_empty() {
            let p = normalize_path(req.header_bytes(":path").as_deref().unwrap_or(b"/"));
            if !self.path_prefixes.iter().any(|x| p.starts_with(x.as_str())) {
                return false;
            }
        }
        self.headers.iter().all(|(name, want)| {
            let v = req.header_bytes(name);
            match want {
                Want::Present(p) => v.is_some() == *p,
                Want::Exact(e) => v.as_deref().map(|b| b.trim_ascii()) == Some(e.as_bytes()),
            }
        })
    }
}

/// The authority's host: lowercase, without port, brackets or trailing dot.
pub fn host_of(authority: &[u8]) -> Vec<u8> {
    let a = authority.trim_ascii();
    let host = if let Some(rest) = a.strip_prefix(b"[") {
        rest.split(|b| *b == b']').next().unwrap_or(rest)
    } else {
        match a.iter().rposition(|b| *b == b':') {
            Some(i) if !a.get(..i).unwrap_or(&[]).contains(&b':') => a.get(..i).unwrap_or(a),
            _ => a,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    host.to_ascii_lowercase()
}

/// Normalise a request path for matching (see the module docs). Bytes that
/// are not UTF-8 are replaced: the result is for comparison only.
pub fn normalize_path(raw: &[u8]) -> String {
    let path = raw.split(|b| *b == b'?' || *b == b'#').next().unwrap_or(&[]);
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = path.get(i) {
        if b == b'%' {
            let hex = |j: usize| path.get(j).and_then(|c| (*c as char).to_digit(16));
            if let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(b);
        i += 1;
    }
    let text = String::from_utf8_lossy(&decoded);
    let mut segs: Vec<&str> = Vec::new();
    for s in text.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(text.len() + 1);
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (text.ends_with('/') && !segs.is_empty()) {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::StaticRequest;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn m(json: &str) -> Result<Matcher, ConfigError> {
        Matcher::try_new(&serde_json::from_str::<MatchConfig>(json).map_err(ConfigError::syntax)?)
    }

    fn req(host: &str, path: &str) -> StaticRequest {
        StaticRequest::new(path).with(":authority", host)
    }

    #[test]
    fn hosts_paths_methods_headers() {
        let s = m(r#"{"hosts":["shop.example.com","*.api.example.com"],"pathPrefixes":["/cart"],"not":{"pathPrefixes":["/cart/health"]}}"#)
            .unwrap();
        assert!(s.matches(&req("shop.example.com:8443", "/cart/1")));
        assert!(s.matches(&req("SHOP.example.com.", "/cart")));
        assert!(s.matches(&req("eu.api.example.com", "/x/../cart/%61")));
        assert!(!s.matches(&req("api.example.com", "/cart")));
        assert!(!s.matches(&req("other.com", "/cart")));
        assert!(!s.matches(&req("shop.example.com", "/cart/health")));
        assert!(!s.matches(&req("shop.example.com", "//cart//health/")));
        assert!(!s.matches(&req("shop.example.com", "/Cart")));
        let h =
            m(r#"{"methods":["POST"],"headers":[{"name":"x-t"},{"name":"x-e","exact":"prod"},{"name":"x-no","present":false}]}"#).unwrap();
        let mut r = req("a", "/").with("x-t", "").with("x-e", " prod ");
        assert!(!h.matches(&r));
        r.headers.retain(|(k, _)| k != ":method");
        r = r.with(":method", "POST");
        assert!(h.matches(&r));
        assert!(!h.matches(&r.clone().with("x-no", "1")));
        assert!(m("{}").unwrap().is_empty() && m("{}").unwrap().matches(&req("a", "/")));
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize_path(b"/a/./b/../c?x=1"), "/a/c");
        assert_eq!(normalize_path(b"/../../etc"), "/etc");
        assert_eq!(normalize_path(b"/%2e%2e/%41/"), "/A/");
        assert_eq!(normalize_path(b"/a%2Fb"), "/a%2Fb");
        assert_eq!(normalize_path(b""), "/");
        assert_eq!(host_of(b"[::1]:80"), b"::1");
        assert_eq!(host_of(b"2001:db8::1"), b"2001:db8::1");
    }

    #[test]
    fn errors_name_the_field() {
        for (json, field) in [
            (r#"{"hosts":["ok.com","bad host"]}"#, "hosts[1]"),
            (r#"{"hosts":["a.com:80"]}"#, "hosts[0]"),
            (r#"{"pathPrefixes":["api"]}"#, "pathPrefixes[0]"),
            (r#"{"methods":["get"]}"#, "methods[0]"),
            (r#"{"headers":[{"name":"x","exact":"1","present":true}]}"#, "headers[0].present"),
            (r#"{"headers":[{"name":"bad name"}]}"#, "headers[0].name"),
            (r#"{"not":{"hosts":["*"]}}"#, "not.hosts[0]"),
        ] {
            assert_eq!(m(json).unwrap_err().field, field, "{json}");
        }
    }
}
