//! The rate-limit decision, free of the host.
//!
//! * [`config`]: the plugin config and its validation into [`Settings`].
//! * [`bucket`]: token-bucket arithmetic.
//! * [`table`]: the bucket table in shared data (sets of slots, key
//!   fingerprints, the compare-and-swap loop over a [`SlotStore`]).
//! * [`rls`]: global policies, counted by a rate limit service: its
//!   protocol's messages and the decision from its answer.
//! * this module: allowlist and policy selection, key composition, the
//!   decision, and the headers and reply the stage sends.

pub mod bucket;
pub mod config;
pub mod rls;
pub mod table;

use std::net::IpAddr;

use meshpatterns_core::bytes::StackBytes;
use meshpatterns_core::key::client_address;
use meshpatterns_core::text::decimal_digits;
use meshpatterns_core::RequestView;

use bucket::{BucketState, Take};
pub use config::{Config, FailureMode, Match, Policy, Settings};
use table::{take_shared, Shared};
pub use table::{Layout, MemoryStore, Placement, SlotStore, WhenFull, MAX_CAS_ATTEMPTS};

impl Match {
    /// Whether the request is in the rule's scope (core's matcher: host,
    /// normalised path, method, header bytes) and, when `clientCidrs` is
    /// set, comes from one of its ranges.
    #[inline]
    pub fn matches(&self, req: &dyn RequestView) -> bool {
        if !self.scope.matches(req) {
            return false;
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
/// (`le32(len) || bytes`), so ("ab", "c") and ("a", "bc") stay apart. Parts
/// are the bytes the client sent (core's key sources). `None` when any part
/// is absent: the policy does not apply. Each part is at most
/// [`meshpatterns_core::key::MAX_KEY_BYTES`] (longer values count as absent),
/// so the key is bounded.
pub fn composite_key(policy: &Policy, req: &dyn RequestView) -> Option<CompositeKey> {
    let mut out = CompositeKey::new();
    push_key(policy, req, &mut out)?;
    Some(out)
}

/// Append `policy`'s [`composite_key`] for `req` to `out`; `None` when a
/// part is absent.
#[inline]
fn push_key<const N: usize>(policy: &Policy, req: &dyn RequestView, out: &mut StackBytes<N>) -> Option<()> {
    for part in &policy.key {
        let v = part.extract_cow(req)?;
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(&v);
    }
    Some(())
}

/// A policy's key for one request, on the stack unless unusually long.
pub type CompositeKey = StackBytes<128>;

/// Where the request's bucket for policy `p` lives: exactly
/// `place(seed, name, composite_key(p, req))`, with the hash's input put
/// together once, on the stack. `None` when a key part is absent.
#[inline]
pub fn place_request(table: &Table, p: &Policy, req: &dyn RequestView) -> Option<Placement> {
    let mut input = StackBytes::<64>::new();
    input.extend_from_slice(&p.hash_prefix);
    push_key(p, req, &mut input)?;
    Some(table::placement(meshpatterns_core::hash::hash64_seeded(&input, table.seed), table.layout))
}

/// The table a stage uses: its shape and the process's seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub layout: Layout,
    pub seed: u64,
}

/// Which rule decides a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// An allowlist rule matched: never limited.
    Allowlisted,
    /// No policy applies (no match, or a key part absent).
    Unmatched,
    /// Policy `index` applies; its bucket lives at `at`.
    Policy { index: usize, at: Placement },
}

/// Find the rule for `req`: the allowlist first, then the first policy whose
/// match holds and whose key parts are all present.
#[inline]
pub fn select(s: &Settings, table: &Table, req: &dyn RequestView) -> Selection {
    if s.allowlist.iter().any(|m| m.matches(req)) {
        return Selection::Allowlisted;
    }
    for (index, p) in s.policies.iter().enumerate() {
        if !p.matcher.matches(req) {
            continue;
        }
        if let Some(at) = place_request(table, p, req) {
            return Selection::Policy { index, at };
        }
    }
    Selection::Unmatched
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
    /// A global policy's service failed and its `failureMode` is closed.
    FailClosed,
}

impl Verdict {
    #[inline]
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allowlisted => "allowlisted",
            Verdict::Unmatched => "unmatched",
            Verdict::Allowed => "allowed",
            Verdict::Limited => "limited",
            Verdict::ShadowLimited => "shadow_limited",
            Verdict::FailOpen => "fail_open",
            Verdict::FailClosed => "fail_closed",
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
    /// The key's set was full of other keys' buckets (`tableFull` applied).
    pub table_full: bool,
    /// Why the request failed open.
    pub fail_reason: Option<String>,
}

/// Decide for one request: select the rule, ask the shared bucket, apply shadow mode.
pub fn decide(s: &Settings, table: &Table, req: &dyn RequestView, store: &mut dyn SlotStore, now_ns: u64) -> Decision {
    decide_selected(s, table, select(s, table, req), store, now_ns)
}

impl Decision {
    #[inline]
    fn plain(verdict: Verdict, policy: Option<usize>) -> Decision {
        Decision { verdict, policy, take: None, conflicts: 0, table_full: false, fail_reason: None }
    }
}

/// [`decide`] for a selection already made (a global policy's selection
/// goes to [`global_call`] instead; here it is decided as unmatched).
#[inline]
pub fn decide_selected(s: &Settings, table: &Table, sel: Selection, store: &mut dyn SlotStore, now_ns: u64) -> Decision {
    let none = |verdict| Decision::plain(verdict, None);
    let (index, at) = match sel {
        Selection::Allowlisted => return none(Verdict::Allowlisted),
        Selection::Unmatched => return none(Verdict::Unmatched),
        Selection::Policy { index, at } => (index, at),
    };
    let Some(policy) = s.policies.get(index).filter(|p| p.global.is_none()) else { return none(Verdict::Unmatched) };
    match take_shared(store, table.layout, at, &policy.bucket, now_ns, s.table_full) {
        Shared::Taken { take, conflicts, table_full } => {
            let verdict = match (take.allowed, policy.shadow) {
                (true, _) => Verdict::Allowed,
                (false, false) => Verdict::Limited,
                (false, true) => Verdict::ShadowLimited,
            };
            Decision { verdict, policy: Some(index), take: Some(take), conflicts, table_full, fail_reason: None }
        }
        Shared::FailOpen { reason, conflicts, table_full } => {
            Decision { verdict: Verdict::FailOpen, policy: Some(index), take: None, conflicts, table_full, fail_reason: Some(reason) }
        }
    }
}

/// The call a global policy makes: the serialized `RateLimitRequest` for
/// policy `index` and `req`. One descriptor: `policy` = the policy's name,
/// then `key0`, `key1`, ... = each key part ([`rls::entry_value`]), with the
/// policy's window as the limit override (`rate` per `per`), so the service
/// needs no limits of its own for it. `None` if the policy is not global
/// or a key part is absent (it was present when selected).
pub fn global_call(s: &Settings, index: usize, req: &dyn RequestView) -> Option<Vec<u8>> {
    let policy = s.policies.get(index)?;
    let g = policy.global?;
    let rls = s.rls.as_ref()?;
    let mut entries = Vec::with_capacity(policy.key.len() + 1);
    entries.push(("policy".to_string(), policy.name.clone()));
    for (i, part) in policy.key.iter().enumerate() {
        entries.push((format!("key{i}"), rls::entry_value(&part.extract(req)?)));
    }
    let d = rls::Descriptor { entries, requests_per_unit: g.requests_per_unit, unit: g.unit };
    Some(rls::encode_request(&rls.domain, &[d]))
}

/// How a call to the rate limit service ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallResult<'a> {
    /// The service answered with this message.
    Answer(&'a [u8]),
    /// The call failed: gRPC status (4 DEADLINE_EXCEEDED on the timeout, 14
    /// UNAVAILABLE when the service is down) and what Envoy said.
    Failed(u32),
    /// It could not be started (the hostcall's status).
    NotStarted(u32),
}

/// The decision for global policy `index` from how its call ended: the
/// service's verdict (shadow mode applied), with its figures for the
/// headers; or, when the call failed or the answer is unreadable, the
/// policy's failure mode.
pub fn global_decision(s: &Settings, index: usize, result: CallResult<'_>) -> Decision {
    let Some(policy) = s.policies.get(index) else { return Decision::plain(Verdict::Unmatched, None) };
    let Some(g) = policy.global else { return Decision::plain(Verdict::Unmatched, None) };
    let failed = |reason: String| {
        let verdict = match g.failure {
            FailureMode::Open => Verdict::FailOpen,
            FailureMode::Closed => Verdict::FailClosed,
        };
        Decision { fail_reason: Some(reason), ..Decision::plain(verdict, Some(index)) }
    };
    let r = match result {
        CallResult::Answer(bytes) => match rls::decode_response(bytes) {
            Ok(r) => r,
            Err(e) => return failed(format!("unreadable answer from the rate limit service: {}", e.0)),
        },
        CallResult::Failed(status) => return failed(format!("rate limit service call failed: gRPC status {status}")),
        CallResult::NotStarted(status) => return failed(format!("rate limit service call not started: status {status}")),
    };
    let over = match r.overall {
        rls::CODE_OK => false,
        rls::CODE_OVER_LIMIT => true,
        c => return failed(format!("rate limit service answered code {c}")),
    };
    let status = r.statuses.first().cloned().unwrap_or_default();
    let window = g.unit.seconds();
    let (limit, window) = match status.limit {
        Some((rpu, secs)) if rpu > 0 => (rpu, if secs > 0 { secs } else { window }),
        _ => (u64::from(g.requests_per_unit), window),
    };
    let reset_secs = status.reset_ns.map_or(window, |ns| ns.div_ceil(1_000_000_000));
    let take = Take {
        allowed: !over,
        state: BucketState { tokens: 0, last_ns: 0 },
        remaining: if over { 0 } else { status.remaining.min(limit) },
        limit,
        reset_secs,
        retry_after_secs: if over { reset_secs.max(1) } else { 0 },
    };
    let verdict = match (over, policy.shadow) {
        (false, _) => Verdict::Allowed,
        (true, false) => Verdict::Limited,
        (true, true) => Verdict::ShadowLimited,
    };
    Decision { take: Some(take), ..Decision::plain(verdict, Some(index)) }
}

/// The reply to a request refused because a global policy's service failed
/// and its failure mode is closed: 503 (gRPC 14 UNAVAILABLE), no rate-limit
/// headers (the service gave no figures).
pub fn fail_closed_reply(d: &Decision, grpc: bool) -> Option<LimitedReply> {
    if d.verdict != Verdict::FailClosed {
        return None;
    }
    let mut headers = Vec::new();
    let body = if grpc {
        "rate limit service unavailable".to_string()
    } else {
        headers.push(("content-type", "application/json".to_string()));
        r#"{"error":"rate_limit_service_unavailable"}"#.to_string()
    };
    Some(LimitedReply { status: 503, grpc_status: 14, headers, body })
}

/// Response headers the filter owns (lowercase names).
pub const HEADER_LIMIT: &str = "x-ratelimit-limit";
pub const HEADER_REMAINING: &str = "x-ratelimit-remaining";
pub const HEADER_RESET: &str = "x-ratelimit-reset";
pub const HEADER_IETF_POLICY: &str = "ratelimit-policy";
pub const HEADER_IETF: &str = "ratelimit";

/// The rate-limit headers for every response of a request a policy applied
/// to: `X-RateLimit-Limit` (the burst), `-Remaining` (whole requests left),
/// `-Reset` (seconds until the bucket is full) unless `xRateLimitHeaders` is
/// off, and with `ietfHeaders` the structured-field
/// `RateLimit-Policy: "<name>";q=<burst>;w=<seconds to fill>` and
/// `RateLimit: "<name>";r=<remaining>;t=<reset>`.
pub fn response_headers(s: &Settings, d: &Decision) -> Vec<(&'static str, String)> {
    let mut h = Vec::new();
    if let (Some(take), Some(policy)) = (&d.take, d.policy) {
        each_response_header(s, take, policy, |name, value| h.push((name, value.to_owned())));
    }
    h
}

/// [`response_headers`] handed to `emit` one by one, for the policy at
/// `policy` and its `take`: the `X-RateLimit-*` values are written on the
/// stack, so the default headers cost no allocation.
#[inline]
pub fn each_response_header(s: &Settings, take: &Take, policy: usize, mut emit: impl FnMut(&'static str, &str)) {
    let Some(policy) = s.policies.get(policy) else { return };
    if s.x_rate_limit_headers {
        emit(HEADER_LIMIT, &decimal_digits(take.limit));
        emit(HEADER_REMAINING, &decimal_digits(take.remaining));
        emit(HEADER_RESET, &decimal_digits(take.reset_secs));
    }
    if s.ietf_headers {
        emit(HEADER_IETF_POLICY, &format!("\"{}\";q={};w={}", policy.name, take.limit, policy.bucket.window_secs()));
        emit(HEADER_IETF, &format!("\"{}\";r={};t={}", policy.name, take.remaining, take.reset_secs));
    }
}

/// Whether a request is gRPC (`content-type: application/grpc`, `+proto`, ...).
pub fn is_grpc(req: &dyn RequestView) -> bool {
    req.header_bytes("content-type").is_some_and(|v| v.trim_ascii().get(..16).is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc")))
}

/// The local reply to a limited request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitedReply {
    pub status: u32,
    /// What a gRPC client receives (Envoy answers gRPC requests with HTTP
    /// 200, this `grpc-status` and the body as `grpc-message`).
    pub grpc_status: u32,
    /// The rate-limit headers, `Retry-After`, and `content-type` (not for gRPC).
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// The local reply to a limited request; `None` unless the verdict is
/// [`Verdict::Limited`]. For a gRPC request the body (which becomes
/// `grpc-message`) is text unless a custom body is configured.
pub fn limited_reply(s: &Settings, d: &Decision, grpc: bool) -> Option<LimitedReply> {
    if d.verdict != Verdict::Limited {
        return None;
    }
    let take = d.take?;
    let policy = d.policy.and_then(|i| s.policies.get(i))?;
    let mut headers = response_headers(s, d);
    headers.push(("retry-after", take.retry_after_secs.to_string()));
    let body = match (&s.limited.body, grpc) {
        (Some(b), _) => b.clone(),
        // Policy names are [a-z0-9_-]: nothing to escape.
        (None, false) => format!(r#"{{"error":"rate_limited","policy":"{}","retryAfterSeconds":{}}}"#, policy.name, take.retry_after_secs),
        (None, true) => format!("rate limited by policy {}; retry after {} s", policy.name, take.retry_after_secs),
    };
    if !grpc {
        headers.push(("content-type", "application/json".into()));
    }
    Some(LimitedReply { status: s.limited.status, grpc_status: s.limited.grpc_status, headers, body })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use std::collections::HashMap;

    use meshpatterns_core::key::StaticRequest;

    use super::table::{decode_set, prepare};
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn settings(json: &str) -> Settings {
        let c: Config = meshpatterns_core::error::parse_json(json.as_bytes()).unwrap();
        Settings::try_from_config(c).unwrap()
    }

    /// A prepared in-memory table for `s`, seed 0.
    fn table(s: &Settings) -> (MemoryStore, Table) {
        let mut store = MemoryStore::default();
        let layout = Layout { slots: s.slots };
        let seed = prepare(&mut store, layout, &mut || 0).unwrap();
        (store, Table { layout, seed })
    }

    /// Envoy's shared data plus an adversary: `steal` makes the next n
    /// conditional writes lose to another worker's write; `fail` makes every
    /// call fail as a host error would.
    struct Adversary {
        inner: MemoryStore,
        steal: u32,
        fail: bool,
    }

    impl SlotStore for Adversary {
        fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
            if self.fail {
                return Err("host error".into());
            }
            self.inner.get(key)
        }
        fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<bool, String> {
            if self.steal > 0 && cas != 0 {
                self.steal -= 1;
                let current = self.inner.get(key)?.map(|(v, _)| v).unwrap_or_default();
                self.inner.set(key, &current, 0)?; // same bytes, new token
            }
            self.inner.set(key, value, cas)
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
        let (_, t) = table(&s);
        let sel = |r: &StaticRequest| select(&s, &t, r);
        assert!(matches!(sel(&StaticRequest::new("/api/x").with("x-api-key", "k1")), Selection::Policy { index: 0, .. }));
        // no API key: the API policy does not apply, the per-client one does
        assert!(matches!(sel(&StaticRequest::new("/api/x")), Selection::Policy { index: 1, .. }));
        // path prefix is checked without the query; DELETE is not in methods
        assert!(matches!(sel(&StaticRequest::new("/apix?/api/").with("x-api-key", "k")), Selection::Policy { index: 1, .. }));
        let mut del = StaticRequest::new("/api/x").with("x-api-key", "k");
        del.headers[1].1 = "DELETE".into();
        assert!(matches!(sel(&del), Selection::Policy { index: 1, .. }));
        // allowlist: client range, or an exact header value (bytes, trimmed)
        let mut internal = StaticRequest::new("/api/x");
        internal.source = Some("10.9.3.4:1234".into());
        assert_eq!(sel(&internal), Selection::Allowlisted);
        assert_eq!(sel(&StaticRequest::new("/").with("x-internal", " batch ")), Selection::Allowlisted);
        assert!(matches!(sel(&StaticRequest::new("/").with("x-internal", "other")), Selection::Policy { .. }));
        assert!(matches!(sel(&StaticRequest::new("/").with_bytes("x-internal", b"batch\xFF")), Selection::Policy { .. }));
        // no peer address: no key, no policy
        let mut anon = StaticRequest::new("/");
        anon.source = None;
        assert_eq!(sel(&anon), Selection::Unmatched);
    }

    #[test]
    fn placement_is_seeded_xxh64_of_policy_and_key() {
        // with seed 0 the fingerprint is XXH64(le32(len) || policy || key),
        // checked against an independent implementation of the xxHash
        // specification; the set is that mod 4,096 (65,536 slots / 16)
        let key = |v: &str| {
            let mut k = (v.len() as u32).to_le_bytes().to_vec();
            k.extend_from_slice(v.as_bytes());
            k
        };
        let layout = Layout { slots: 65_536 };
        assert_eq!(table::place(0, "per-client", &key("10.0.0.9"), layout).set, 0x408);
        assert_eq!(table::place(0, "api-key", &key("k1"), layout).set, 0xd08);
        assert_eq!(table::place(0, "api-key", &key("k1"), layout).fp % 65_536, 0xcd08);
        assert_eq!(table::place(0, "api-key", &key("k1"), Layout { slots: 16 }).set, 0);
        // the composite key keeps parts apart
        let s = settings(r#"{"policies":[{"name":"p","key":[{"header":"a"},{"header":"b"}],"rate":1}]}"#);
        let k1 = composite_key(&s.policies[0], &StaticRequest::new("/").with("a", "xy").with("b", "z")).unwrap();
        let k2 = composite_key(&s.policies[0], &StaticRequest::new("/").with("a", "x").with("b", "yz")).unwrap();
        assert_ne!(k1, k2);
        assert_eq!(*k1, [key("xy"), key("z")].concat());
        // valid UTF-8 keys are the same bytes as before
        let k = composite_key(&s.policies[0], &StaticRequest::new("/").with("a", "café").with("b", "z")).unwrap();
        assert_eq!(*k, [key("café"), key("z")].concat());
        // placing a request hashes exactly the policy name and that key
        for layout in [Layout { slots: 16 }, Layout { slots: 65_536 }] {
            let t = Table { layout, seed: 7 };
            let req = StaticRequest::new("/").with("a", "xy").with("b", "z");
            let want = table::place(7, "p", &composite_key(&s.policies[0], &req).unwrap(), layout);
            assert_eq!(place_request(&t, &s.policies[0], &req), Some(want));
            assert_eq!(place_request(&t, &s.policies[0], &StaticRequest::new("/").with("a", "xy")), None);
        }
    }

    #[test]
    fn keys_are_bytes() {
        let s = settings(r#"{"policies":[{"name":"p","key":[{"header":"x-k"}],"rate":1,"per":"day","burst":1}]}"#);
        let (mut store, t) = table(&s);
        let keys: [&[u8]; 5] = [b"caf\xE9", b"caf\xFF", "caf\u{FFFD}".as_bytes(), b"\xFE", b"\xFF"];
        for k in keys {
            let d = decide(&s, &t, &StaticRequest::new("/").with_bytes("x-k", k), &mut store, SEC);
            assert_eq!(d.verdict, Verdict::Allowed, "{k:?}");
        }
        for k in keys {
            let d = decide(&s, &t, &StaticRequest::new("/").with_bytes("x-k", k), &mut store, SEC);
            assert_eq!(d.verdict, Verdict::Limited, "{k:?}");
        }
    }

    #[test]
    fn spoofed_forwarded_for_is_ignored_with_zero_hops() {
        let s = settings(TWO);
        let (_, t) = table(&s);
        let a = select(&s, &t, &StaticRequest::new("/").with("x-forwarded-for", "1.1.1.1"));
        let b = select(&s, &t, &StaticRequest::new("/").with("x-forwarded-for", "2.2.2.2"));
        assert_eq!(a, b);
    }

    #[test]
    fn burst_limit_then_refill_through_the_store() {
        let s = settings(TWO);
        let (mut store, t) = table(&s);
        let r = StaticRequest::new("/");
        let verdicts: Vec<_> = (0..4).map(|_| decide(&s, &t, &r, &mut store, 100 * SEC).verdict).collect();
        assert_eq!(verdicts, [Verdict::Allowed, Verdict::Allowed, Verdict::Allowed, Verdict::Limited]);
        let d = decide(&s, &t, &r, &mut store, 100 * SEC);
        let LimitedReply { status, grpc_status, headers, body } = limited_reply(&s, &d, false).unwrap();
        assert_eq!((status, grpc_status), (429, 8));
        let h: HashMap<_, _> = headers.into_iter().collect();
        assert_eq!((h["x-ratelimit-limit"].as_str(), h["x-ratelimit-remaining"].as_str()), ("3", "0"));
        assert_eq!((h["x-ratelimit-reset"].as_str(), h["retry-after"].as_str()), ("3", "1"));
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(body, r#"{"error":"rate_limited","policy":"per-client","retryAfterSeconds":1}"#);
        // one second later exactly one more request fits
        assert_eq!(decide(&s, &t, &r, &mut store, 101 * SEC).verdict, Verdict::Allowed);
        assert_eq!(decide(&s, &t, &r, &mut store, 101 * SEC).verdict, Verdict::Limited);
        // another client has its own bucket
        let mut other = StaticRequest::new("/");
        other.source = Some("10.0.0.10:1".into());
        assert_eq!(decide(&s, &t, &other, &mut store, 101 * SEC).verdict, Verdict::Allowed);
    }

    #[test]
    fn grpc_requests_get_resource_exhausted() {
        let s = settings(r#"{"policies":[{"name":"p","key":["path"],"rate":1,"per":"minute","burst":1}]}"#);
        let (mut store, t) = table(&s);
        let r = StaticRequest::new("/svc/Method").with("content-type", "application/grpc+proto");
        assert!(is_grpc(&r));
        assert!(!is_grpc(&StaticRequest::new("/").with("content-type", "application/json")));
        assert!(!is_grpc(&StaticRequest::new("/")));
        decide(&s, &t, &r, &mut store, SEC);
        let d = decide(&s, &t, &r, &mut store, SEC);
        let reply = limited_reply(&s, &d, true).unwrap();
        assert_eq!((reply.status, reply.grpc_status), (429, 8));
        assert_eq!(reply.body, "rate limited by policy p; retry after 60 s");
        assert!(reply.headers.iter().all(|(k, _)| *k != "content-type"), "Envoy sets application/grpc");
        assert!(reply.headers.contains(&("retry-after", "60".into())));
        assert!(reply.headers.contains(&("x-ratelimit-remaining", "0".into())));
        // configurable: a user who wants clients to retry elsewhere picks 14
        let s = settings(r#"{"limitedResponse":{"status":503,"grpcStatus":14},"policies":[{"name":"p","key":["path"],"rate":1}]}"#);
        let (mut store, t) = table(&s);
        decide(&s, &t, &r, &mut store, SEC);
        let reply = limited_reply(&s, &decide(&s, &t, &r, &mut store, SEC), true).unwrap();
        assert_eq!((reply.status, reply.grpc_status), (503, 14));
    }

    #[test]
    fn shadow_counts_but_never_limits() {
        let s = settings(r#"{"shadow":true,"ietfHeaders":true,"policies":[{"name":"p","key":["path"],"rate":1,"burst":1}]}"#);
        let (mut store, t) = table(&s);
        let r = StaticRequest::new("/x");
        assert_eq!(decide(&s, &t, &r, &mut store, SEC).verdict, Verdict::Allowed);
        let d = decide(&s, &t, &r, &mut store, SEC);
        assert_eq!(d.verdict, Verdict::ShadowLimited);
        assert_eq!(limited_reply(&s, &d, false), None);
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
    fn x_rate_limit_headers_can_be_turned_off() {
        let s = settings(r#"{"xRateLimitHeaders":false,"policies":[{"name":"p","key":["path"],"rate":1,"burst":1}]}"#);
        let (mut store, t) = table(&s);
        let r = StaticRequest::new("/x");
        let d = decide(&s, &t, &r, &mut store, SEC);
        assert_eq!(d.verdict, Verdict::Allowed);
        assert!(response_headers(&s, &d).is_empty());
        let d = decide(&s, &t, &r, &mut store, SEC);
        let reply = limited_reply(&s, &d, false).unwrap();
        assert_eq!(reply.headers, vec![("retry-after", "1".to_string()), ("content-type", "application/json".into())]);
        let s = settings(r#"{"xRateLimitHeaders":false,"ietfHeaders":true,"policies":[{"name":"p","key":["path"],"rate":1,"burst":1}]}"#);
        let (mut store, t) = table(&s);
        let d = decide(&s, &t, &r, &mut store, SEC);
        assert_eq!(
            response_headers(&s, &d),
            vec![("ratelimit-policy", "\"p\";q=1;w=1".to_string()), ("ratelimit", "\"p\";r=0;t=1".into())]
        );
    }

    #[test]
    fn cas_conflicts_retry_then_fail_open() {
        let s = settings(r#"{"policies":[{"name":"p","key":["path"],"rate":1,"burst":10}]}"#);
        let r = StaticRequest::new("/x");
        let (inner, t) = table(&s);
        let mut store = Adversary { inner, steal: 0, fail: false };
        assert_eq!(decide(&s, &t, &r, &mut store, SEC).verdict, Verdict::Allowed);
        store.steal = 3;
        let d = decide(&s, &t, &r, &mut store, SEC);
        assert_eq!((d.verdict, d.conflicts, d.take.unwrap().remaining), (Verdict::Allowed, 3, 8));
        store.steal = MAX_CAS_ATTEMPTS;
        let d = decide(&s, &t, &r, &mut store, SEC);
        assert_eq!((d.verdict, d.conflicts), (Verdict::FailOpen, MAX_CAS_ATTEMPTS));
        assert!(response_headers(&s, &d).is_empty());
        store.steal = 0;
        store.fail = true;
        assert_eq!(decide(&s, &t, &r, &mut store, SEC).verdict, Verdict::FailOpen);
    }

    #[test]
    fn an_unprepared_table_fails_open_and_creates_nothing() {
        let s = settings(r#"{"policies":[{"name":"p","key":["path"],"rate":1}]}"#);
        let mut store = MemoryStore::default();
        let t = Table { layout: Layout { slots: s.slots }, seed: 0 };
        let d = decide(&s, &t, &StaticRequest::new("/x"), &mut store, SEC);
        assert_eq!(d.verdict, Verdict::FailOpen);
        assert!(d.fail_reason.unwrap().contains("does not exist"));
        assert!(store.data.is_empty());
    }

    #[test]
    fn custom_limited_response() {
        let s = settings(
            r#"{"limitedResponse":{"status":503,"body":{"message":"slow down"}},"policies":[{"name":"p","key":["path"],"rate":1}]}"#,
        );
        let (mut store, t) = table(&s);
        let r = StaticRequest::new("/x");
        decide(&s, &t, &r, &mut store, SEC);
        let d = decide(&s, &t, &r, &mut store, SEC);
        let LimitedReply { status, body, .. } = limited_reply(&s, &d, false).unwrap();
        assert_eq!((status, body.as_str()), (503, r#"{"message":"slow down"}"#));
        // the custom body is the gRPC message too
        assert_eq!(limited_reply(&s, &d, true).unwrap().body, r#"{"message":"slow down"}"#);
    }

    #[test]
    fn table_full_policies() {
        // 16 slots (one set), 17 keys with a burst of 2 at one a day
        let p = |when: &str| {
            settings(&format!(
                r#"{{"slots":16,"tableFull":"{when}","policies":[{{"name":"p","key":[{{"header":"k"}}],"rate":1,"per":"day","burst":2}}]}}"#
            ))
        };
        let req = |i: u32| StaticRequest::new("/").with("k", &format!("key-{i}"));
        for (when, verdict) in [("evict", Verdict::Allowed), ("limit", Verdict::Limited), ("allow", Verdict::FailOpen)] {
            let s = p(when);
            let (mut store, t) = table(&s);
            for i in 0..16 {
                let d = decide(&s, &t, &req(i), &mut store, SEC);
                assert_eq!((d.verdict, d.table_full), (Verdict::Allowed, false), "{when} {i}");
            }
            let d = decide(&s, &t, &req(16), &mut store, SEC);
            assert_eq!((d.verdict, d.table_full), (verdict, true), "{when}");
        }
    }

    #[test]
    fn memory_is_fixed_by_slots_whatever_the_keys() {
        let s = settings(r#"{"slots":64,"policies":[{"name":"p","key":[{"header":"k"}],"rate":1,"per":"day"}]}"#);
        let (mut store, t) = table(&s);
        let mut full = 0;
        for i in 0..10_000 {
            let d = decide(&s, &t, &StaticRequest::new("/").with("k", &format!("key-{i}")), &mut store, SEC);
            full += u32::from(d.table_full);
        }
        assert_eq!(store.data.len(), 4 + 2, "4 sets, the seed, the ready mark");
        let entries: usize = (0..4).map(|i| decode_set(&store.data[Layout::key(i).as_str()].0).len()).sum();
        assert_eq!(entries, 64);
        assert_eq!(full, 10_000 - 64);
    }
}
