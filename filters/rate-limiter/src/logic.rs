//! The rate-limit decision, free of proxy-wasm.
//!
//! * [`config`]: the plugin config and its validation into [`Settings`].
//! * [`bucket`]: token-bucket arithmetic and the slot encoding.
//! * this module: allowlist and policy selection, key composition, the slot a
//!   key lives in, the compare-and-swap loop over a [`SlotStore`], and the
//!   headers and body the glue sends.

pub mod bucket;
pub mod config;

use std::net::IpAddr;

use meshpatterns_core::hash::{bucket as hash_bucket, salted_hash64};
use meshpatterns_core::key::client_address;
use meshpatterns_core::RequestView;

use bucket::{decode, encode, BucketParams, Take};
pub use config::{Config, Match, Policy, Settings};

/// Attempts at a compare-and-swap before the request is let through
/// (fail-open) and counted in `meshpatterns.rate_limiter.fail_open`.
pub const MAX_CAS_ATTEMPTS: u32 = 16;

impl Match {
    /// Whether every condition of the rule holds for `req`.
    pub fn matches(&self, req: &dyn RequestView) -> bool {
        if let Some(prefix) = &self.path_prefix {
            let path = req.path().unwrap_or_default();
            if !path.split(['?', '#']).next().unwrap_or_default().starts_with(prefix.as_str()) {
                return false;
            }
        }
        if !self.methods.is_empty() {
            let m = req.method().unwrap_or_default();
            if !self.methods.iter().any(|x| x.eq_ignore_ascii_case(&m)) {
                return false;
            }
        }
        for (name, want) in &self.headers {
            match (req.header(name), want) {
                (None, _) => return false,
                (Some(v), Some(w)) if v.trim() != w => return false,
                _ => {}
            }
        }
        if !self.client_cidrs.is_empty() {
            let ip: Option<IpAddr> = client_address(req, self.trusted_hops).and_then(|a| a.parse().ok());
            if !ip.is_some_and(|ip| self.client_cidrs.iter().any(|c| c.contains(&ip))) {
                return false;
            }
        }
        true
    }
}

/// The combined key of a policy: every part, each length-prefixed
/// (`le32(len) || bytes`), so ("ab", "c") and ("a", "bc") stay apart.
/// `None` when any part is absent: the policy does not apply. Each part is at
/// most [`meshpatterns_core::key::MAX_KEY_BYTES`] (longer values count as absent), so the key is bounded.
pub fn composite_key(policy: &Policy, req: &dyn RequestView) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    for part in &policy.key {
        let v = part.extract(req)?;
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    Some(out)
}

/// The slot index of a key: `XXH64(le32(len(policy)) || policy || key) mod slots`.
pub fn slot_index(policy: &str, key: &[u8], slots: u32) -> u32 {
    hash_bucket(salted_hash64(policy.as_bytes(), key), u64::from(slots)) as u32
}

/// The shared-data key of a slot: `rl:` and the index in hex (short, so the
/// host stores it without an extra allocation).
pub fn slot_key(index: u32) -> String {
    format!("rl:{index:x}")
}

/// Which rule decides a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// An allowlist rule matched: never limited.
    Allowlisted,
    /// No policy applies (no match, or a key part absent).
    Unmatched,
    /// Policy `index` applies; its bucket lives in shared-data key `slot`.
    Policy { index: usize, slot: String },
}

/// Find the rule for `req`: the allowlist first, then the first policy whose
/// match holds and whose key parts are all present.
pub fn select(s: &Settings, req: &dyn RequestView) -> Selection {
    if s.allowlist.iter().any(|m| m.matches(req)) {
        return Selection::Allowlisted;
    }
    for (index, p) in s.policies.iter().enumerate() {
        if !p.matcher.matches(req) {
            continue;
        }
        if let Some(key) = composite_key(p, req) {
            return Selection::Policy { index, slot: slot_key(slot_index(&p.name, &key, s.slots)) };
        }
    }
    Selection::Unmatched
}

/// A stored slot: its bytes and the host's CAS token for them.
pub type SlotValue = (Vec<u8>, Option<u32>);

/// Shared storage with compare-and-swap, as proxy-wasm shared data offers it.
/// The glue implements it over hostcalls; tests over a map.
pub trait SlotStore {
    /// The value and its CAS token, or `None` if the key was never written.
    fn get(&mut self, key: &str) -> Result<Option<SlotValue>, String>;
    /// Write `value` if the key's CAS token is still `cas` (`None`: write
    /// unconditionally). `Ok(false)` on a CAS mismatch.
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, String>;
}

/// The outcome of asking a shared bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shared {
    /// The bucket answered; `conflicts` CAS mismatches were retried.
    Taken { take: Take, conflicts: u32 },
    /// Could not update the bucket (persistent conflict or host error): let
    /// the request through.
    FailOpen { reason: String, conflicts: u32 },
}

/// Take one request from the bucket in `slot`, retrying on CAS conflicts up
/// to [`MAX_CAS_ATTEMPTS`] times. A limited request writes nothing.
///
/// A slot that was never written cannot be created atomically (the host's
/// set ignores CAS for a missing key), so after creating one the value is
/// read back: if another worker's write replaced it, the loop retries on
/// that value instead of counting on the lost write.
pub fn take_shared(store: &mut dyn SlotStore, slot: &str, params: &BucketParams, now_ns: u64) -> Shared {
    let mut conflicts = 0;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let current = match store.get(slot) {
            Ok(v) => v,
            Err(reason) => return Shared::FailOpen { reason, conflicts },
        };
        let (state, cas, exists) = match &current {
            Some((bytes, cas)) => (decode(bytes), *cas, true),
            None => (None, None, false),
        };
        let take = params.take(state, now_ns);
        if !take.allowed {
            return Shared::Taken { take, conflicts };
        }
        let value = encode(&take.state);
        match store.set(slot, &value, cas) {
            Ok(true) if exists && cas.is_some() => return Shared::Taken { take, conflicts },
            Ok(true) => match store.get(slot) {
                // created (or written without a CAS token): ours survived?
                Ok(Some((bytes, _))) if bytes.as_slice() == value.as_slice() => return Shared::Taken { take, conflicts },
                Ok(_) => conflicts += 1,
                Err(reason) => return Shared::FailOpen { reason, conflicts },
            },
            Ok(false) => conflicts += 1,
            Err(reason) => return Shared::FailOpen { reason, conflicts },
        }
    }
    Shared::FailOpen { reason: format!("{MAX_CAS_ATTEMPTS} compare-and-swap conflicts in a row"), conflicts }
}

/// What happened to a request; its label goes to filter state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowlisted,
    Unmatched,
    Allowed,
    Limited,
    ShadowLimited,
    FailOpen,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allowlisted => "allowlisted",
            Verdict::Unmatched => "unmatched",
            Verdict::Allowed => "allowed",
            Verdict::Limited => "limited",
            Verdict::ShadowLimited => "shadow_limited",
            Verdict::FailOpen => "fail_open",
        }
    }
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Index of the policy that applied.
    pub policy: Option<usize>,
    /// The bucket's figures, when a policy applied and its bucket answered.
    pub take: Option<Take>,
    /// CAS conflicts retried.
    pub conflicts: u32,
    /// Why the request failed open.
    pub fail_reason: Option<String>,
}

/// Decide for one request: select the rule, ask the shared bucket, apply shadow mode.
pub fn decide(s: &Settings, req: &dyn RequestView, store: &mut dyn SlotStore, now_ns: u64) -> Decision {
    let none = |verdict| Decision { verdict, policy: None, take: None, conflicts: 0, fail_reason: None };
    let (index, slot) = match select(s, req) {
        Selection::Allowlisted => return none(Verdict::Allowlisted),
        Selection::Unmatched => return none(Verdict::Unmatched),
        Selection::Policy { index, slot } => (index, slot),
    };
    let Some(policy) = s.policies.get(index) else { return none(Verdict::Unmatched) };
    match take_shared(store, &slot, &policy.bucket, now_ns) {
        Shared::Taken { take, conflicts } => {
            let verdict = match (take.allowed, policy.shadow) {
                (true, _) => Verdict::Allowed,
                (false, false) => Verdict::Limited,
                (false, true) => Verdict::ShadowLimited,
            };
            Decision { verdict, policy: Some(index), take: Some(take), conflicts, fail_reason: None }
        }
        Shared::FailOpen { reason, conflicts } => {
            Decision { verdict: Verdict::FailOpen, policy: Some(index), take: None, conflicts, fail_reason: Some(reason) }
        }
    }
}

/// Response headers the filter owns (lowercase names).
pub const HEADER_LIMIT: &str = "x-ratelimit-limit";
pub const HEADER_REMAINING: &str = "x-ratelimit-remaining";
pub const HEADER_RESET: &str = "x-ratelimit-reset";
pub const HEADER_IETF_POLICY: &str = "ratelimit-policy";
pub const HEADER_IETF: &str = "ratelimit";

/// The rate-limit headers for every response of a request a policy applied
/// to: `X-RateLimit-Limit` (the burst), `-Remaining` (whole requests left),
/// `-Reset` (seconds until the bucket is full), and with `ietfHeaders` the
/// structured-field `RateLimit-Policy: "<name>";q=<burst>;w=<seconds to fill>`
/// and `RateLimit: "<name>";r=<remaining>;t=<reset>`.
pub fn response_headers(s: &Settings, d: &Decision) -> Vec<(&'static str, String)> {
    let (Some(take), Some(policy)) = (d.take, d.policy.and_then(|i| s.policies.get(i))) else { return Vec::new() };
    let mut h = vec![
        (HEADER_LIMIT, take.limit.to_string()),
        (HEADER_REMAINING, take.remaining.to_string()),
        (HEADER_RESET, take.reset_secs.to_string()),
    ];
    if s.ietf_headers {
        h.push((HEADER_IETF_POLICY, format!("\"{}\";q={};w={}", policy.name, take.limit, policy.bucket.window_secs())));
        h.push((HEADER_IETF, format!("\"{}\";r={};t={}", policy.name, take.remaining, take.reset_secs)));
    }
    h
}

/// The local reply to a limited request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitedReply {
    pub status: u32,
    /// The rate-limit headers, `Retry-After` and `content-type`.
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// The local reply to a limited request; `None` unless the verdict is [`Verdict::Limited`].
pub fn limited_reply(s: &Settings, d: &Decision) -> Option<LimitedReply> {
    if d.verdict != Verdict::Limited {
        return None;
    }
    let take = d.take?;
    let policy = d.policy.and_then(|i| s.policies.get(i))?;
    let mut headers = response_headers(s, d);
    headers.push(("retry-after", take.retry_after_secs.to_string()));
    headers.push(("content-type", "application/json".into()));
    let body = match &s.limited.body {
        Some(b) => b.clone(),
        None => serde_json::json!({"error": "rate_limited", "policy": policy.name, "retryAfterSeconds": take.retry_after_secs}).to_string(),
    };
    Some(LimitedReply { status: s.limited.status, headers, body })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use std::collections::HashMap;

    use meshpatterns_core::key::StaticRequest;

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn settings(json: &str) -> Settings {
        let c: Config = meshpatterns_core::error::parse_json(json.as_bytes()).unwrap();
        Settings::try_from_config(c).unwrap()
    }

    /// A map with CAS tokens like Envoy's shared data; `steal` makes the
    /// next n conditional writes fail as if another worker had written first.
    #[derive(Default)]
    struct MapStore {
        data: HashMap<String, (Vec<u8>, u32)>,
        next_cas: u32,
        steal: u32,
        fail: bool,
    }

    impl SlotStore for MapStore {
        fn get(&mut self, key: &str) -> Result<Option<SlotValue>, String> {
            if self.fail {
                return Err("host error".into());
            }
            Ok(self.data.get(key).map(|(v, c)| (v.clone(), Some(*c))))
        }
        fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, String> {
            self.next_cas += 1;
            if let (Some((_, cur)), Some(cas)) = (self.data.get(key), cas) {
                if *cur != cas {
                    return Ok(false);
                }
            }
            if self.steal > 0 && cas.is_some() {
                self.steal -= 1;
                if let Some(e) = self.data.get_mut(key) {
                    e.1 = self.next_cas; // someone else wrote in between
                }
                return Ok(false);
            }
            self.data.insert(key.into(), (value.to_vec(), self.next_cas));
            Ok(true)
        }
    }

    const TWO: &str = r#"{
        "allowlist": [{"clientCidrs": ["10.9.0.0/16"]}, {"headers": [{"name": "x-internal", "value": "batch"}]}],
        "policies": [
            {"name": "api-key", "match": {"pathPrefix": "/api/", "methods": ["GET", "POST"]}, "key": [{"header": "x-api-key"}], "rate": 10000, "per": "minute"},
            {"name": "per-client", "key": [{"clientAddress": {"trustedHops": 0}}, "method"], "rate": 1, "burst": 3}
        ]
    }"#;

    #[test]
    fn selection_is_first_match_with_all_key_parts() {
        let s = settings(TWO);
        let sel = |r: &StaticRequest| select(&s, r);
        assert!(matches!(sel(&StaticRequest::new("/api/x").with("x-api-key", "k1")), Selection::Policy { index: 0, .. }));
        // no API key: the API policy does not apply, the per-client one does
        assert!(matches!(sel(&StaticRequest::new("/api/x")), Selection::Policy { index: 1, .. }));
        // path prefix is checked without the query; DELETE is not in methods
        assert!(matches!(sel(&StaticRequest::new("/apix?/api/").with("x-api-key", "k")), Selection::Policy { index: 1, .. }));
        let mut del = StaticRequest::new("/api/x").with("x-api-key", "k");
        del.headers[1].1 = "DELETE".into();
        assert!(matches!(sel(&del), Selection::Policy { index: 1, .. }));
        // allowlist: client range, or an exact header value
        let mut internal = StaticRequest::new("/api/x");
        internal.source = Some("10.9.3.4:1234".into());
        assert_eq!(sel(&internal), Selection::Allowlisted);
        assert_eq!(sel(&StaticRequest::new("/").with("x-internal", "batch")), Selection::Allowlisted);
        assert!(matches!(sel(&StaticRequest::new("/").with("x-internal", "other")), Selection::Policy { .. }));
        // no peer address: no key, no policy
        let mut anon = StaticRequest::new("/");
        anon.source = None;
        assert_eq!(sel(&anon), Selection::Unmatched);
    }

    #[test]
    fn slots_are_xxh64_of_policy_and_key() {
        // vectors: XXH64(le32(len) || policy || key) mod slots, checked against
        // an independent implementation of the xxHash specification
        let key = |v: &str| {
            let mut k = (v.len() as u32).to_le_bytes().to_vec();
            k.extend_from_slice(v.as_bytes());
            k
        };
        assert_eq!(slot_index("per-client", &key("10.0.0.9"), 65_536), 0x2408);
        assert_eq!(slot_index("api-key", &key("k1"), 65_536), 0xcd08);
        assert_eq!(slot_index("api-key", &key("k1"), 1), 0);
        assert_eq!(slot_key(0x2408), "rl:2408");
        // the same key under another policy is another bucket
        assert_ne!(slot_index("a", &key("k"), 1 << 20), slot_index("b", &key("k"), 1 << 20));
        // the composite key keeps parts apart
        let s = settings(r#"{"policies":[{"name":"p","key":[{"header":"a"},{"header":"b"}],"rate":1}]}"#);
        let k1 = composite_key(&s.policies[0], &StaticRequest::new("/").with("a", "xy").with("b", "z")).unwrap();
        let k2 = composite_key(&s.policies[0], &StaticRequest::new("/").with("a", "x").with("b", "yz")).unwrap();
        assert_ne!(k1, k2);
        assert_eq!(k1, [key("xy"), key("z")].concat());
    }

    #[test]
    fn spoofed_forwarded_for_is_ignored_with_zero_hops() {
        let s = settings(TWO);
        let a = select(&s, &StaticRequest::new("/").with("x-forwarded-for", "1.1.1.1"));
        let b = select(&s, &StaticRequest::new("/").with("x-forwarded-for", "2.2.2.2"));
        assert_eq!(a, b);
    }

    #[test]
    fn burst_limit_then_refill_through_the_store() {
        let s = settings(TWO);
        let mut store = MapStore::default();
        let r = StaticRequest::new("/");
        let verdicts: Vec<_> = (0..4).map(|_| decide(&s, &r, &mut store, 100 * SEC).verdict).collect();
        assert_eq!(verdicts, [Verdict::Allowed, Verdict::Allowed, Verdict::Allowed, Verdict::Limited]);
        let d = decide(&s, &r, &mut store, 100 * SEC);
        let LimitedReply { status, headers, body } = limited_reply(&s, &d).unwrap();
        assert_eq!(status, 429);
        let h: HashMap<_, _> = headers.into_iter().collect();
        assert_eq!((h["x-ratelimit-limit"].as_str(), h["x-ratelimit-remaining"].as_str()), ("3", "0"));
        assert_eq!((h["x-ratelimit-reset"].as_str(), h["retry-after"].as_str()), ("3", "1"));
        assert_eq!(body, r#"{"error":"rate_limited","policy":"per-client","retryAfterSeconds":1}"#);
        // one second later exactly one more request fits
        assert_eq!(decide(&s, &r, &mut store, 101 * SEC).verdict, Verdict::Allowed);
        assert_eq!(decide(&s, &r, &mut store, 101 * SEC).verdict, Verdict::Limited);
        // another client has its own bucket
        let mut other = StaticRequest::new("/");
        other.source = Some("10.0.0.10:1".into());
        assert_eq!(decide(&s, &other, &mut store, 101 * SEC).verdict, Verdict::Allowed);
    }

    #[test]
    fn shadow_counts_but_never_limits() {
        let s = settings(r#"{"shadow":true,"ietfHeaders":true,"policies":[{"name":"p","key":["path"],"rate":1,"burst":1}]}"#);
        let mut store = MapStore::default();
        let r = StaticRequest::new("/x");
        assert_eq!(decide(&s, &r, &mut store, SEC).verdict, Verdict::Allowed);
        let d = decide(&s, &r, &mut store, SEC);
        assert_eq!(d.verdict, Verdict::ShadowLimited);
        assert_eq!(limited_reply(&s, &d), None);
        let h = response_headers(&s, &d);
        assert_eq!(
            h,
            vec![
                ("x-ratelimit-limit", "1".to_string()),
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", "1".into()),
                ("ratelimit-policy", "\"p\";q=1;w=1".into()),
                ("ratelimit", "\"p\";r=0;t=1".into()),
            ]
        );
    }

    #[test]
    fn cas_conflicts_retry_then_fail_open() {
        let s = settings(r#"{"policies":[{"name":"p","key":["path"],"rate":1,"burst":10}]}"#);
        let r = StaticRequest::new("/x");
        let mut store = MapStore::default();
        assert_eq!(decide(&s, &r, &mut store, SEC).verdict, Verdict::Allowed);
        store.steal = 3;
        let d = decide(&s, &r, &mut store, SEC);
        assert_eq!((d.verdict, d.conflicts, d.take.unwrap().remaining), (Verdict::Allowed, 3, 8));
        store.steal = MAX_CAS_ATTEMPTS;
        let d = decide(&s, &r, &mut store, SEC);
        assert_eq!((d.verdict, d.conflicts), (Verdict::FailOpen, MAX_CAS_ATTEMPTS));
        assert!(response_headers(&s, &d).is_empty());
        store.steal = 0;
        store.fail = true;
        assert_eq!(decide(&s, &r, &mut store, SEC).verdict, Verdict::FailOpen);
    }

    #[test]
    fn lost_creation_is_detected() {
        // Another worker creates the slot between our read and our write:
        // our unconditional create is overwritten; we must notice and retry.
        struct Racy {
            inner: MapStore,
            raced: bool,
        }
        impl SlotStore for Racy {
            fn get(&mut self, key: &str) -> Result<Option<SlotValue>, String> {
                self.inner.get(key)
            }
            fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, String> {
                let ok = self.inner.set(key, value, cas)?;
                if !self.raced {
                    self.raced = true;
                    let theirs = encode(&bucket::BucketState { tokens: 2_000, last_ns: SEC });
                    self.inner.set(key, &theirs, None)?;
                }
                Ok(ok)
            }
        }
        let s = settings(r#"{"policies":[{"name":"p","key":["path"],"rate":1,"burst":5}]}"#);
        let mut store = Racy { inner: MapStore::default(), raced: false };
        let d = decide(&s, &StaticRequest::new("/x"), &mut store, SEC);
        assert_eq!((d.verdict, d.conflicts, d.take.unwrap().remaining), (Verdict::Allowed, 1, 1));
    }

    #[test]
    fn custom_limited_response() {
        let s = settings(
            r#"{"limitedResponse":{"status":503,"body":{"message":"slow down"}},"policies":[{"name":"p","key":["path"],"rate":1}]}"#,
        );
        let mut store = MapStore::default();
        let r = StaticRequest::new("/x");
        decide(&s, &r, &mut store, SEC);
        let LimitedReply { status, body, .. } = limited_reply(&s, &decide(&s, &r, &mut store, SEC)).unwrap();
        assert_eq!((status, body.as_str()), (503, r#"{"message":"slow down"}"#));
    }

    #[test]
    fn bounded_slots_whatever_the_keys() {
        let s = settings(r#"{"slots":64,"policies":[{"name":"p","key":[{"header":"k"}],"rate":1}]}"#);
        let mut store = MapStore::default();
        for i in 0..10_000 {
            decide(&s, &StaticRequest::new("/").with("k", &format!("key-{i}")), &mut store, SEC);
        }
        assert_eq!(store.data.len(), 64);
    }
}
