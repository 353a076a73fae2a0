//! The decision for one request: which user this is, which arm of each
//! experiment the user belongs to (see [`super`] for the layout and the
//! precedence), which routing header values that means, and what is exposed
//! to analytics.

use meshpatterns_core::cookie;
use meshpatterns_core::hash;
use meshpatterns_core::RequestView;
use std::borrow::Cow;

use super::config::{Condition, Experiment, Settings, Targeting, BUCKETS};

/// Most `exp=arm` items read from one override header.
const MAX_OVERRIDE_ITEMS: usize = 32;

impl Experiment {
    /// The user's bucket: `XXH64(le32(len(salt)) || salt || key) mod 10,000`,
    /// over the key's bytes exactly as the client sent them.
    pub fn bucket(&self, user: impl AsRef<[u8]>) -> u64 {
        hash::bucket(hash::salted_hash64(self.salt.as_bytes(), user.as_ref()), BUCKETS)
    }

    /// The arm owning `bucket` (see the module docs for the layout).
    pub fn arm_for_bucket(&self, bucket: u64) -> usize {
        let k = self.treatments.len() as u64;
        if k == 0 {
            return self.control;
        }
        let (i, j) = (bucket % k, bucket / k);
        match self.treatments.get(i as usize) {
            Some(&a) if self.arms.get(a).is_some_and(|arm| j < arm.buckets) => a,
            _ => self.control,
        }
    }

    pub fn arm_named(&self, name: &str) -> Option<usize> {
        self.arms.iter().position(|a| a.name == name)
    }

    /// The arm `user` is on the allow list for.
    pub fn allowed(&self, user: &[u8]) -> Option<usize> {
        let i = self.allow.binary_search_by(|(k, _)| k.as_slice().cmp(user)).ok()?;
        self.allow.get(i).map(|(_, a)| *a)
    }

    /// Whether `user` is on the deny list.
    pub fn denied(&self, user: &[u8]) -> bool {
        self.deny.binary_search_by(|k| k.as_slice().cmp(user)).is_ok()
    }
}

impl Condition {
    fn accepts(&self, v: Option<&[u8]>) -> bool {
        match (v, &self.values) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(vals)) => vals.iter().any(|x| x.as_bytes() == v),
        }
    }
}

impl Targeting {
    /// Whether the request is in the experiment's scope.
    pub fn matches(&self, req: &dyn RequestView) -> bool {
        if !self.matchers.iter().all(|m| m.matches(req)) {
            return false;
        }
        if !self.headers.iter().all(|m| m.accepts(req.header_bytes(&m.name).as_deref().map(<[u8]>::trim_ascii))) {
            return false;
        }
        if !self.cookies.is_empty() {
            let header = req.header_bytes("cookie").unwrap_or_default();
            return self.cookies.iter().all(|m| m.accepts(cookie::find_bytes(&header, &m.name)));
        }
        true
    }
}

/// Equality that takes the same time wherever the inputs differ (it leaks
/// only whether the lengths differ, and the secret's length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

/// Why a user got an arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Bucketed by the hash of the user key: the experiment population.
    Hash,
    /// On the allow list.
    Allow,
    /// QA override with the shared secret.
    Override,
    /// On the deny list: control, not exposed.
    Deny,
    /// Outside the targeting: control, not exposed.
    Untargeted,
    /// No user key: control, not exposed.
    NoKey,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Hash => "hash",
            Reason::Allow => "allow",
            Reason::Override => "override",
            Reason::Deny => "deny",
            Reason::Untargeted => "untargeted",
            Reason::NoKey => "nokey",
        }
    }
    /// Whether the user is part of the experiment (and the arm is exposed).
    pub fn in_experiment(self) -> bool {
        matches!(self, Reason::Hash | Reason::Allow | Reason::Override)
    }
}

/// One experiment's outcome for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub arm: usize,
    pub reason: Reason,
}

/// What happened to a QA override header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideStatus {
    /// No override header (or none configured).
    Absent,
    /// Sent with the right secret: honoured.
    Accepted,
    /// Sent without the right secret: ignored.
    Rejected,
}

/// What the stage applies to the request and response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'s> {
    /// Where the user key came from: a source label, `issued`, or `none`.
    pub user_source: Cow<'s, str>,
    /// One per experiment, in config order.
    pub assignments: Vec<Assignment>,
    /// How many routing headers the client had sent itself (all overwritten).
    pub client_headers_replaced: u32,
    pub override_status: OverrideStatus,
    /// Remove these request headers (secret, then override, when sent).
    pub strip: [Option<&'s str>; 2],
    /// `Set-Cookie` values for the response.
    pub set_cookies: Vec<String>,
    /// Response header value listing the exposed arms (`exp=arm, exp2=arm`).
    pub expose: Option<String>,
}

impl Decision<'_> {
    /// `(header, value)` pairs to set on the request, one per experiment.
    pub fn routing<'a>(&'a self, s: &'a Settings) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        s.experiments
            .iter()
            .zip(&self.assignments)
            .filter_map(|(e, a)| e.arms.get(a.arm).map(|arm| (e.routing_header.as_str(), arm.target.as_str())))
    }

    /// Filter state: every experiment's routed arm, `exp=arm,exp2=arm`.
    pub fn arms_label(&self, s: &Settings) -> String {
        self.label(s, |e, a| e.arms.get(a.arm).map(|x| x.name.as_str()).unwrap_or(""))
    }

    /// Filter state: why, `exp=hash,exp2=untargeted`.
    pub fn reasons_label(&self, s: &Settings) -> String {
        self.label(s, |_, a| a.reason.label())
    }

    fn label<'a>(&'a self, s: &'a Settings, f: impl Fn(&'a Experiment, &'a Assignment) -> &'a str) -> String {
        let mut out = String::new();
        for (e, a) in s.experiments.iter().zip(&self.assignments) {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&e.name);
            out.push('=');
            out.push_str(f(e, a));
        }
        out
    }
}

/// Parse an override header value: `exp=arm, exp2=arm` or just `arm` (every
/// experiment that has an arm of that name). Returns (experiment, arm) names.
pub(crate) fn parse_override(v: &str) -> Vec<(Option<&str>, &str)> {
    v.split(',')
        .take(MAX_OVERRIDE_ITEMS)
        .filter_map(|item| {
            let item = item.trim();
            match item.split_once('=') {
                Some((e, a)) => Some((Some(e.trim()), a.trim())),
                None if !item.is_empty() => Some((None, item)),
                None => None,
            }
        })
        .collect()
}

/// Decide for one request. `mint` makes a new user id (cookie-safe text) and
/// is called only when an assignment cookie is to be issued; the request is
/// then assigned by that id exactly as later requests carrying it will be.
/// User keys are the bytes the client sent (see [`meshpatterns_core::key`]).
pub fn decide<'s>(s: &'s Settings, req: &dyn RequestView, mint: impl FnOnce() -> String) -> Decision<'s> {
    let mut set_cookies = Vec::new();
    let (user, user_source): (Option<Cow<'_, [u8]>>, Cow<'s, str>) = match s.keys.extract_cow(req) {
        Some((source, key)) => (Some(key), s.keys.source_label(source)),
        None => match &s.cookie {
            Some(ck) => {
                let id = mint();
                set_cookies.push(ck.set_cookie(&id));
                (Some(Cow::Owned(id.into_bytes())), Cow::Borrowed("issued"))
            }
            None => (None, Cow::Borrowed("none")),
        },
    };

    let mut strip = [None, None];
    let mut override_status = OverrideStatus::Absent;
    // Vectors only when an override is sent: even an empty one costs a call to drop.
    let mut forced: Option<Vec<(Option<String>, String)>> = None;
    if let Some(o) = &s.qa_override {
        let value = req.header(&o.header);
        let secret = req.header_bytes(&o.secret_header);
        if secret.is_some() {
            strip[0] = Some(o.secret_header.as_str());
        }
        if let Some(v) = value {
            strip[1] = Some(o.header.as_str());
            let ok = secret.is_some_and(|sec| constant_time_eq(sec.trim_ascii(), &o.secret));
            if ok {
                override_status = OverrideStatus::Accepted;
                forced = Some(parse_override(&v).into_iter().map(|(e, a)| (e.map(str::to_string), a.to_string())).collect());
            } else {
                override_status = OverrideStatus::Rejected;
            }
        }
    }

    let mut client_headers_replaced = 0;
    let mut assignments = Vec::with_capacity(s.experiments.len());
    for e in &s.experiments {
        if req.header_bytes(&e.routing_header).is_some() {
            client_headers_replaced += 1;
        }
        let forced_arm =
            forced.iter().flatten().filter(|(name, _)| name.as_deref().is_none_or(|n| n == e.name)).find_map(|(_, arm)| e.arm_named(arm));
        let a = if let Some(arm) = forced_arm {
            Assignment { arm, reason: Reason::Override }
        } else if !e.targeting.matches(req) {
            Assignment { arm: e.control, reason: Reason::Untargeted }
        } else {
            match &user {
                None => Assignment { arm: e.control, reason: Reason::NoKey },
                Some(u) if e.denied(u) => Assignment { arm: e.control, reason: Reason::Deny },
                Some(u) => match e.allowed(u) {
                    Some(arm) => Assignment { arm, reason: Reason::Allow },
                    None => Assignment { arm: e.arm_for_bucket(e.bucket(u)), reason: Reason::Hash },
                },
            }
        };
        assignments.push(a);
    }

    // The experiments the request is in, as (experiment, arm) names.
    let exposed = || {
        s.experiments
            .iter()
            .zip(&assignments)
            .filter(|(_, a)| a.reason.in_experiment())
            .filter_map(|(e, a)| e.arms.get(a.arm).map(|arm| (e.name.as_str(), arm.name.as_str())))
    };
    // `exp=arm, exp2=arm` / `exp:arm|exp2:arm`, each built in one string.
    let joined = |pair: &str, sep: &str| {
        let mut out = String::with_capacity(64);
        for (e, a) in exposed() {
            if !out.is_empty() {
                out.push_str(sep);
            }
            out.push_str(e);
            out.push_str(pair);
            out.push_str(a);
        }
        out
    };
    // Empty: the request is in no experiment.
    let expose = s.expose_header.as_ref().map(|_| joined("=", ", ")).filter(|v| !v.is_empty());
    if let Some(ck) = &s.expose_cookie {
        let value = joined(":", "|");
        if !value.is_empty() {
            let header = req.header_bytes("cookie");
            let current = header.as_deref().and_then(|h| cookie::find_bytes(h, &ck.name));
            if current != Some(value.as_bytes()) {
                set_cookies.push(ck.set_cookie(&value));
            }
        }
    }

    Decision { user_source, assignments, client_headers_replaced, override_status, strip, set_cookies, expose }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;
    use crate::logic::config::Config;
    use meshpatterns_core::error::ConfigError;
    use meshpatterns_core::key::StaticRequest;
    fn settings(json: &str) -> Result<Settings, ConfigError> {
        let c: Config = meshpatterns_core::error::parse_json(json.as_bytes())?;
        Settings::try_from_config(c)
    }

    fn two_arms(treatment: f64) -> Settings {
        settings(&format!(
            r#"{{"keySources":[{{"header":"x-user-id"}}],"assignmentCookie":{{"name":"mp_uid"}},"exposeHeader":"x-experiment",
                "experiments":[{{"name":"checkout-v2","arms":[{{"name":"control","percent":{}}},{{"name":"treatment","percent":{treatment}}}]}}]}}"#,
            100.0 - treatment
        ))
        .unwrap()
    }

    fn user(u: &str) -> StaticRequest {
        StaticRequest::new("/checkout").with("x-user-id", u)
    }

    fn no_mint() -> String {
        unreachable!("no cookie expected")
    }

    /// (salt, user, XXH64(le32(len) || salt || user), bucket), cross-checked
    /// against the reference C library (libxxhash 0.8.1 through ctypes).
    const BUCKET_VECTORS: &[(&str, &str, u64, u64)] = &[
        ("exp", "user-42", 0xe4148d7607766dd5, 1749),
        ("checkout-v2", "user-42", 0xabc65298919be921, 7649),
        ("checkout-v2", "alice", 0x3eb8918c40d06783, 1507),
        ("checkout-v2", "bob", 0xbc7d6e0a20940f9f, 6527),
        ("checkout-v2", "user-0", 0xa0c9d2d1fe809fa1, 1777),
        ("checkout-v2", "user-1", 0xbd2f645ffcc5413b, 7179),
        ("checkout-v2", "user-2", 0xd95798672793305d, 221),
        ("search-2026", "alice", 0x7be545ffe299a1c1, 2609),
    ];

    #[test]
    fn bucket_vectors() {
        for &(salt, u, h, b) in BUCKET_VECTORS {
            assert_eq!(hash::salted_hash64(salt.as_bytes(), u.as_bytes()), h, "{salt}/{u}");
            let s = settings(&format!(
                r#"{{"keySources":["path"],"experiments":[{{"name":"e","salt":"{salt}","arms":[{{"name":"a","percent":50}},{{"name":"b","percent":50}}]}}]}}"#
            ))
            .unwrap();
            assert_eq!(s.experiments[0].bucket(u), b, "{salt}/{u}");
        }
    }

    #[test]
    fn vectors_through_decide() {
        // checkout-v2 at 10 %: treatment owns buckets 0..1000.
        let s = two_arms(10.0);
        let arm = |u: &str| {
            let d = decide(&s, &user(u), no_mint);
            s.experiments[0].arms[d.assignments[0].arm].name.clone()
        };
        assert_eq!(arm("user-2"), "treatment"); // bucket 221
        assert_eq!(arm("alice"), "control"); // bucket 1507
        assert_eq!(arm("user-0"), "control"); // bucket 1777
                                              // At 20 % alice (1507) and user-0 (1777) join; user-2 stays.
        let s = two_arms(20.0);
        let d = decide(&s, &user("alice"), no_mint);
        assert_eq!(d.assignments[0], Assignment { arm: 1, reason: Reason::Hash });
        assert_eq!(d.expose.as_deref(), Some("checkout-v2=treatment"));
        assert_eq!(d.routing(&s).collect::<Vec<_>>(), vec![("x-experiment-arm", "treatment")]);
        assert_eq!(d.arms_label(&s), "checkout-v2=treatment");
        assert_eq!(d.reasons_label(&s), "checkout-v2=hash");
        assert_eq!(d.user_source, "header:x-user-id");
    }

    #[test]
    fn shares_are_exact_over_all_buckets() {
        for pct in [0.0, 0.01, 2.5, 10.0, 33.33, 50.0, 99.99, 100.0] {
            let s = two_arms(pct);
            let n = (0..BUCKETS).filter(|&b| s.experiments[0].arm_for_bucket(b) == 1).count() as u64;
            assert_eq!(n, (pct * 100.0).round() as u64, "{pct} %");
        }
        // Hashing 100,000 users: within 0.3 pp of 10 % (sampling noise, 3 sigma).
        let s = two_arms(10.0);
        let n = (0..100_000).filter(|i| s.experiments[0].arm_for_bucket(s.experiments[0].bucket(format!("user-{i}"))) == 1).count();
        assert!((n as f64 / 1000.0 - 10.0).abs() < 0.3, "{n} of 100,000");
    }

    fn layout(arms: &[(&str, f64)], control: &str) -> Vec<usize> {
        let list: Vec<String> = arms.iter().map(|(n, p)| format!(r#"{{"name":"{n}","percent":{p}}}"#)).collect();
        let s = settings(&format!(
            r#"{{"keySources":["path"],"experiments":[{{"name":"e","controlArm":"{control}","arms":[{}]}}]}}"#,
            list.join(",")
        ))
        .unwrap();
        (0..BUCKETS).map(|b| s.experiments[0].arm_for_bucket(b)).collect()
    }

    #[test]
    fn ramping_only_adds_or_removes_buckets() {
        // Two arms: 10 % -> 20 % moves exactly 1000 buckets, all control -> treatment.
        let a = layout(&[("control", 90.0), ("t", 10.0)], "control");
        let b = layout(&[("control", 80.0), ("t", 20.0)], "control");
        let moved: Vec<_> = a.iter().zip(&b).filter(|(x, y)| x != y).collect();
        assert_eq!(moved.len(), 1000);
        assert!(moved.iter().all(|(x, y)| **x == 0 && **y == 1));
        // Three arms: ramping A from 10 to 25 while B stays moves nobody in or out of B.
        let a = layout(&[("control", 80.0), ("a", 10.0), ("b", 10.0)], "control");
        let b = layout(&[("control", 65.0), ("a", 25.0), ("b", 10.0)], "control");
        for (x, y) in a.iter().zip(&b) {
            assert!(x == y || (*x == 0 && *y == 1), "{x} -> {y}");
        }
        assert_eq!(a.iter().zip(&b).filter(|(x, y)| x != y).count(), 1500);
        // Lowering B from 10 to 2.5: only B's removed buckets move, to control.
        let c = layout(&[("control", 72.5), ("a", 25.0), ("b", 2.5)], "control");
        for (y, z) in b.iter().zip(&c) {
            assert!(y == z || (*y == 2 && *z == 0), "{y} -> {z}");
        }
        assert_eq!(b.iter().zip(&c).filter(|(y, z)| y != z).count(), 750);
        // The control arm need not be first.
        let d = layout(&[("t", 10.0), ("control", 90.0)], "control");
        assert_eq!(d.iter().filter(|&&x| x == 0).count(), 1000);
        assert!(d[..1000].iter().all(|&x| x == 0));
    }

    #[test]
    fn issued_id_is_assigned_like_later_requests() {
        let s = two_arms(50.0);
        let first = decide(&s, &StaticRequest::new("/checkout"), || "user-2".into());
        assert_eq!(first.user_source, "issued");
        assert_eq!(first.set_cookies, vec!["mp_uid=user-2; Path=/; HttpOnly; SameSite=Lax".to_string()]);
        let later = decide(&s, &StaticRequest::new("/checkout").with("cookie", "mp_uid=user-2"), no_mint);
        assert_eq!(later.user_source, "cookie:mp_uid");
        assert!(later.set_cookies.is_empty());
        assert_eq!(first.assignments, later.assignments);
    }

    #[test]
    fn targeting_allow_deny() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"experiments":[{"name":"checkout-v2","arms":[{"name":"control","percent":100},{"name":"treatment","percent":0}],
               "targeting":{"pathPrefixes":["/checkout"],"headers":[{"name":"X-Country","values":["DE","FR"]}],"cookies":[{"name":"beta"}]},
               "allow":{"qa":"treatment","qa-control":"control"},"deny":["bot"]}]}"#,
        )
        .unwrap();
        let r = |path: &str, user: &str, country: &str, cookie: &str| {
            let mut req = StaticRequest::new(path).with("x-user-id", user).with("x-country", country);
            if !cookie.is_empty() {
                req = req.with("cookie", cookie);
            }
            decide(&s, &req, no_mint).assignments[0]
        };
        let t = Assignment { arm: 1, reason: Reason::Allow };
        assert_eq!(r("/checkout/pay?x=1", "qa", "DE", "beta=1"), t);
        assert_eq!(r("/checkout", "qa", "FR", "a=b; beta=yes"), t);
        assert_eq!(r("/cart", "qa", "DE", "beta=1").reason, Reason::Untargeted);
        assert_eq!(r("/checkout", "qa", "US", "beta=1").reason, Reason::Untargeted);
        assert_eq!(r("/checkout", "qa", "DE", "").reason, Reason::Untargeted);
        assert_eq!(r("/checkout", "qa-control", "DE", "beta=1"), Assignment { arm: 0, reason: Reason::Allow });
        assert_eq!(r("/checkout", "bot", "DE", "beta=1"), Assignment { arm: 0, reason: Reason::Deny });
        assert_eq!(r("/checkout", "someone", "DE", "beta=1"), Assignment { arm: 0, reason: Reason::Hash });
        let d = decide(&s, &StaticRequest::new("/checkout").with("x-country", "DE").with("cookie", "beta=1"), no_mint);
        assert_eq!((d.assignments[0], &*d.user_source), (Assignment { arm: 0, reason: Reason::NoKey }, "none"));
    }

    #[test]
    fn override_needs_the_secret() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"exposeHeader":"x-experiment","override":{"secret":"0123456789abcdef-qa"},
                "experiments":[{"name":"checkout-v2","arms":[{"name":"control","percent":100},{"name":"treatment","percent":0}]},
                               {"name":"search","routingHeader":"x-search-arm","arms":[{"name":"old","percent":50},{"name":"treatment","percent":50}]}]}"#,
        )
        .unwrap();
        let req = |ov: &str, secret: &str| {
            let mut r = user("alice").with("x-experiment-override", ov);
            if !secret.is_empty() {
                r = r.with("x-experiment-secret", secret);
            }
            decide(&s, &r, no_mint)
        };
        let d = req("checkout-v2=treatment", "0123456789abcdef-qa");
        assert_eq!(d.override_status, OverrideStatus::Accepted);
        assert_eq!(d.assignments[0], Assignment { arm: 1, reason: Reason::Override });
        assert_eq!(d.assignments[1].reason, Reason::Hash);
        assert_eq!(d.strip, [Some("x-experiment-secret"), Some("x-experiment-override")]);
        // A bare arm name applies to every experiment with such an arm.
        let d = req("treatment", "0123456789abcdef-qa");
        assert_eq!(d.assignments.iter().map(|a| (a.arm, a.reason)).collect::<Vec<_>>(), vec![(1, Reason::Override), (1, Reason::Override)]);
        assert_eq!(d.expose.as_deref(), Some("checkout-v2=treatment, search=treatment"));
        for bad in ["", "0123456789abcdef-q", "0123456789abcdef-qb", "0123456789abcdef-qa-"] {
            let d = req("checkout-v2=treatment", bad);
            assert_eq!(d.override_status, OverrideStatus::Rejected, "{bad:?}");
            assert_eq!(d.assignments[0], Assignment { arm: 0, reason: Reason::Hash });
            assert_eq!(d.strip[1], Some("x-experiment-override"));
        }
        assert_eq!(decide(&s, &user("alice"), no_mint).override_status, OverrideStatus::Absent);
    }

    #[test]
    fn garbage_override_values_are_harmless() {
        for v in ["", ",", "=", "==,=", "a=b=c", " , checkout-v2 = treatment ,", &"x=y,".repeat(1000)] {
            let items = parse_override(v);
            assert!(items.len() <= MAX_OVERRIDE_ITEMS, "{v}");
        }
        assert_eq!(parse_override(" checkout-v2 = treatment , control"), vec![(Some("checkout-v2"), "treatment"), (None, "control")]);
    }

    #[test]
    fn experiments_with_different_salts_are_independent() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"experiments":[
                {"name":"a","arms":[{"name":"c","percent":50},{"name":"t","percent":50}]},
                {"name":"b","routingHeader":"x-b","arms":[{"name":"c","percent":50},{"name":"t","percent":50}]}]}"#,
        )
        .unwrap();
        let (mut a, mut both) = (0, 0);
        for i in 0..20_000 {
            let d = decide(&s, &user(&format!("u{i}")), no_mint);
            let (x, y) = (d.assignments[0].arm == 1, d.assignments[1].arm == 1);
            a += usize::from(x);
            both += usize::from(x && y);
        }
        // Among A's treatment users, B's treatment share is ~50 % (not 100 % or 0 %).
        let share = both as f64 / a as f64;
        assert!((share - 0.5).abs() < 0.03, "{both} of {a}");
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(&[0xff], &[0x00]));
    }

    #[test]
    fn client_routing_header_is_counted_and_exposure_cookie_set_once() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"exposeCookie":{"name":"mp_exp"},
                "experiments":[{"name":"checkout-v2","arms":[{"name":"control","percent":0},{"name":"treatment","percent":100,"target":"checkout-v2-cluster"}]}]}"#,
        )
        .unwrap();
        let d = decide(&s, &user("u").with("x-experiment-arm", "control"), no_mint);
        assert_eq!(d.client_headers_replaced, 1);
        assert_eq!(d.routing(&s).collect::<Vec<_>>(), vec![("x-experiment-arm", "checkout-v2-cluster")]);
        assert_eq!(d.set_cookies, vec!["mp_exp=checkout-v2:treatment; Path=/; HttpOnly; SameSite=Lax".to_string()]);
        assert_eq!(d.expose, None);
        let d = decide(&s, &user("u").with("cookie", "mp_exp=checkout-v2:treatment"), no_mint);
        assert!(d.set_cookies.is_empty());
        assert_eq!(d.client_headers_replaced, 0);
    }

    #[test]
    fn keys_differing_only_in_non_utf8_bytes_get_their_own_buckets() {
        let s = two_arms(50.0);
        let e = &s.experiments[0];
        let (a, b, c) = (e.bucket(b"caf\xE9"), e.bucket(b"caf\xFF"), e.bucket("caf\u{FFFD}"));
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
        // Read from the request as bytes and assigned by their own buckets.
        let assign = |v: &[u8]| decide(&s, &StaticRequest::new("/checkout").with_bytes("x-user-id", v), no_mint).assignments[0];
        for v in [&b"caf\xE9"[..], b"caf\xFF", "caf\u{FFFD}".as_bytes()] {
            assert_eq!(assign(v), Assignment { arm: e.arm_for_bucket(e.bucket(v)), reason: Reason::Hash });
        }
        // Keys differing in one byte that is not UTF-8 get both arms.
        let arms: std::collections::BTreeSet<usize> = (0x80..=0xffu8).map(|x| assign(&[b'u', b'-', x]).arm).collect();
        assert_eq!(arms.len(), 2);
        // UTF-8 keys keep their buckets (the vectors above).
        assert_eq!(e.bucket(b"user-2"), 221);
        assert_eq!(assign(b"user-2").arm, e.arm_for_bucket(221));
    }

    #[test]
    fn allow_and_deny_lists_compare_bytes() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"experiments":[{"name":"e","arms":[{"name":"c","percent":100},{"name":"t","percent":0}],
               "allow":{"caf\u00e9":"t"},"deny":["bot\ufffd"]}]}"#,
        )
        .unwrap();
        let r = |v: &[u8]| decide(&s, &StaticRequest::new("/").with_bytes("x-user-id", v), no_mint).assignments[0].reason;
        assert_eq!(r("caf\u{e9}".as_bytes()), Reason::Allow);
        assert_eq!(r(b"caf\xE9"), Reason::Hash, "Latin-1 bytes are not the UTF-8 key");
        assert_eq!(r("bot\u{FFFD}".as_bytes()), Reason::Deny);
        assert_eq!(r(b"bot\xFF"), Reason::Hash, "an invalid byte is not U+FFFD");
    }

    #[test]
    fn match_block_scopes_each_experiment() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"exposeHeader":"x-experiment","experiments":[
                {"name":"a","arms":[{"name":"c","percent":0},{"name":"t","percent":100}],
                 "match":{"hosts":["shop.example.com","*.shop.example.com"],"pathPrefixes":["/checkout"],"methods":["GET","POST"],
                          "headers":[{"name":"x-beta"},{"name":"x-env","exact":"prod"}],"not":{"pathPrefixes":["/checkout/health"]}}},
                {"name":"b","routingHeader":"x-b","arms":[{"name":"c","percent":0},{"name":"t","percent":100}]}]}"#,
        )
        .unwrap();
        let req = |host: &str, method: &str, path: &str, extra: &[(&str, &str)]| {
            let mut r = StaticRequest::new(path).with(":authority", host).with("x-user-id", "u").with("x-beta", "").with("x-env", " prod ");
            r.headers.retain(|(k, _)| k != ":method");
            r = r.with(":method", method);
            r.headers.retain(|(k, _)| !extra.iter().any(|(n, _)| n == k));
            for (n, v) in extra {
                if !v.is_empty() {
                    r = r.with(n, v);
                }
            }
            let d = decide(&s, &r, no_mint);
            (d.assignments[0], d.assignments[1].reason, d.expose)
        };
        let hit = (Assignment { arm: 1, reason: Reason::Hash }, Reason::Hash, Some("a=t, b=t".to_string()));
        let miss = (Assignment { arm: 0, reason: Reason::Untargeted }, Reason::Hash, Some("b=t".to_string()));
        assert_eq!(req("shop.example.com:443", "GET", "/checkout/pay?x=1", &[]), hit);
        assert_eq!(req("EU.shop.example.com", "POST", "//checkout/./pay", &[]), hit);
        assert_eq!(req("other.example.com", "GET", "/checkout", &[]), miss);
        assert_eq!(req("shop.example.com", "DELETE", "/checkout", &[]), miss);
        assert_eq!(req("shop.example.com", "GET", "/cart", &[]), miss);
        assert_eq!(req("shop.example.com", "GET", "/checkout/health", &[]), miss);
        assert_eq!(req("shop.example.com", "GET", "/checkout/x/../health", &[]), miss);
        assert_eq!(req("shop.example.com", "GET", "/checkout", &[("x-env", "staging")]), miss);
        assert_eq!(req("shop.example.com", "GET", "/checkout", &[("x-beta", "")]), miss);
    }

    #[test]
    fn match_and_remaining_targeting_must_both_hold() {
        let s = settings(
            r#"{"keySources":[{"header":"x-user-id"}],"experiments":[{"name":"e","arms":[{"name":"c","percent":0},{"name":"t","percent":100}],
               "match":{"hosts":["shop.example.com"]},
               "targeting":{"pathPrefixes":["/checkout"],"headers":[{"name":"x-country","values":["DE","FR"]}],"cookies":[{"name":"beta"}]}}]}"#,
        )
        .unwrap();
        let r = |host: &str, path: &str, country: &str, cookie: &str| {
            let req =
                StaticRequest::new(path).with(":authority", host).with("x-user-id", "u").with("x-country", country).with("cookie", cookie);
            decide(&s, &req, no_mint).assignments[0].reason
        };
        assert_eq!(r("shop.example.com", "/checkout", "FR", "beta=1"), Reason::Hash);
        assert_eq!(r("api.example.com", "/checkout", "FR", "beta=1"), Reason::Untargeted);
        assert_eq!(r("shop.example.com", "/home", "FR", "beta=1"), Reason::Untargeted);
        assert_eq!(r("shop.example.com", "/checkout", "US", "beta=1"), Reason::Untargeted);
        assert_eq!(r("shop.example.com", "/checkout", "DE", "alpha=1"), Reason::Untargeted);
    }
}
