//! The meshpatterns pipeline module through a real Envoy: four stages
//! (rate limit -> experiment split -> consistent hash -> metrics) in one
//! module, one pass (envoy/meshpatterns.yaml).
//!
//! What it shows: each stage's header reaches the upstream, with exactly the
//! value the single pattern's own logic gives for that key (computed here
//! from the pattern crates' pure `decide`, which is what the single-pattern
//! modules run); a limited request stops the later stages (no arm, no hash
//! reaches an upstream, no arm in the access log) and is still counted by the
//! metrics stage; a config error names the stage.

use std::collections::BTreeMap;
use std::time::Duration;

use meshpatterns_core::hash::{hash64, hex16};
use meshpatterns_core::key::StaticRequest;
use meshpatterns_tests::{access_log, wait_for, Client, EnvoyBuilder, Upstream};

const CONFIG: &str = "envoy/meshpatterns.yaml";

/// The pipeline config the shipped Envoy config carries, as JSON.
fn shipped_config() -> serde_json::Value {
    let text = std::fs::read_to_string(meshpatterns_tests::paths::repo().join(CONFIG)).unwrap();
    let start = text.find("{\"stages\"").expect("a stages config");
    let end = text[start..].find("\n          - name: envoy.filters.http.router").unwrap() + start;
    serde_json::from_str(text[start..end].trim()).unwrap()
}

/// The arm the experiment-splitter logic gives `user` on `path`, from the
/// pipeline's own stage config.
fn expected_arm(user: &str, path: &str) -> String {
    let cfg = &shipped_config()["stages"][1]["experimentSplit"];
    let json = serde_json::to_vec(cfg).unwrap();
    let stage =
        meshpatterns_host::stage::build_stage::<experiment_splitter::ExperimentSplitter>(serde_json::from_slice(&json).unwrap(), "")
            .unwrap();
    let req = StaticRequest::new(path).with("x-user-id", user);
    let d = experiment_splitter::logic::decide(&stage.stage.settings, &req, || "unused".into());
    let arm = d.routing(&stage.stage.settings).find(|(h, _)| *h == "x-experiment-arm").map(|(_, v)| v.to_string()).unwrap_or_default();
    arm
}

fn start(control: &[Upstream], treatment: &[Upstream]) -> meshpatterns_tests::Envoy {
    EnvoyBuilder::new("meshpatterns.yaml").endpoints("CONTROL", control).endpoints("TREATMENT", treatment).start()
}

#[test]
fn four_stages_in_one_pass_match_the_single_patterns_key_for_key() {
    let control = Upstream::start_many("control", 2);
    let treatment = Upstream::start_many("treatment", 2);
    let envoy = start(&control, &treatment);
    let mut c = Client::new(envoy.port("ingress"));
    let mut arms = BTreeMap::<String, u32>::new();
    let mut replica_of = BTreeMap::<String, String>::new();
    for i in 0..300 {
        let user = format!("user-{i}");
        let r = c.get("/checkout/cart", &[("x-user-id", &user)]);
        assert_eq!(r.status, 200, "{user}: {}", r.text());
        let seen = r.json();
        let arm = seen["headers"]["x-experiment-arm"].as_str().unwrap_or("").to_string();
        assert_eq!(arm, expected_arm(&user, "/checkout/cart"), "{user}: arm");
        assert!(r.replica().starts_with(&arm), "{user}: arm {arm} but served by {}", r.replica());
        assert_eq!(seen["headers"]["x-session-hash"].as_str(), Some(hex16(hash64(user.as_bytes())).as_str()), "{user}: session hash");
        *arms.entry(arm).or_default() += 1;
        replica_of.insert(user, r.replica().to_string());
    }
    println!("arms over 300 users: {arms:?}");
    assert!(arms.get("treatment").copied().unwrap_or(0) > 0 && arms.get("control").copied().unwrap_or(0) > 0);
    // Sticky: the same user lands on the same replica again (Maglev on the hash).
    for (user, replica) in replica_of.iter().take(40) {
        let r = c.get("/checkout/cart", &[("x-user-id", user)]);
        if r.status == 200 {
            assert_eq!(r.replica(), replica, "{user} moved");
        }
    }
    // A client cannot choose its arm or hash: stage headers are overwritten.
    let r = c.get("/checkout/cart", &[("x-user-id", "user-7"), ("x-experiment-arm", "treatment"), ("x-session-hash", "0")]);
    assert_eq!(r.status, 200);
    let seen = r.json();
    assert_eq!(seen["headers"]["x-experiment-arm"].as_str(), Some(expected_arm("user-7", "/checkout/cart").as_str()));
    assert_eq!(seen["headers"]["x-session-hash"].as_str(), Some(hex16(hash64(b"user-7")).as_str()));
}

#[test]
fn a_limited_request_stops_later_stages_and_is_still_counted() {
    let control = Upstream::start_many("control", 1);
    let treatment = Upstream::start_many("treatment", 1);
    let envoy = start(&control, &treatment);
    let mut c = Client::new(envoy.port("ingress"));
    let before = control.iter().chain(&treatment).map(Upstream::hits).sum::<u64>();
    // Burst 10: the first 10 pass, then 429 until tokens refill (5/s).
    let mut statuses = Vec::new();
    for _ in 0..14 {
        statuses.push(c.get("/checkout/x", &[("x-user-id", "greedy")]).status);
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    let passed = statuses.iter().filter(|s| **s == 200).count();
    assert!(passed >= 10 && limited >= 1 && passed + limited == 14, "{statuses:?}");
    let after = control.iter().chain(&treatment).map(Upstream::hits).sum::<u64>();
    assert_eq!(after - before, passed as u64, "only the allowed requests reach an upstream");
    let r = c.get("/checkout/x", &[("x-user-id", "greedy")]);
    if r.status == 429 {
        assert!(r.header("x-ratelimit-limit").is_some(), "429 without rate-limit headers");
        assert!(r.header("x-experiment").is_none(), "a later stage answered on a limited request");
    }
    // The metrics stage counted the 429s (status class 4xx on the route).
    let want = limited as u64 + u64::from(r.status == 429);
    wait_for("the metrics stage counts the 429s", Duration::from_secs(20), || {
        let text = envoy.admin("/stats/prometheus");
        let n: f64 = text
            .lines()
            .filter(|l| l.starts_with("meshpatterns_http_requests_total{") && l.contains("status_class=\"4xx\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (n as u64 == want).then_some(())
    });
    // The access log records the limiter's decision and no arm for a 429.
    let lines = wait_for("access-log lines", Duration::from_secs(10), || {
        let l = access_log::lines(&envoy.stdout());
        (l.len() >= 15).then_some(l)
    });
    let code = |l: &serde_json::Value| {
        let v = &l["http.response.status_code"];
        v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0)
    };
    let limited_line = lines.iter().find(|l| code(l) == 429).expect("a 429 line");
    assert_eq!(limited_line["meshpatterns.ratelimit.decision"], "limited", "{limited_line}");
    assert!(matches!(limited_line["meshpatterns.experiment.arm"].as_str(), None | Some("-") | Some("")), "{limited_line}");
    let ok_line = lines.iter().find(|l| code(l) == 200).expect("a 200 line");
    assert_eq!(ok_line["meshpatterns.ratelimit.decision"], "allowed", "{ok_line}");
    assert!(ok_line["meshpatterns.experiment.arm"].as_str().is_some_and(|a| a.contains("checkout-v2")), "{ok_line}");
    assert_eq!(ok_line["meshpatterns.session.hash"].as_str(), Some(hex16(hash64(b"greedy")).as_str()), "{ok_line}");
}

#[test]
fn a_bad_stage_config_is_refused_naming_the_stage() {
    let control = Upstream::start_many("control", 1);
    let treatment = Upstream::start_many("treatment", 1);
    let b = EnvoyBuilder::new("meshpatterns.yaml")
        .endpoints("CONTROL", &control)
        .endpoints("TREATMENT", &treatment)
        .replace(r#""rate": 5, "per": "second""#, r#""rate": "NaN", "per": "second""#);
    let err = b.try_start().err().expect("Envoy started with a bad stage config");
    assert!(err.contains("stages[0].rateLimit.policies[0].rate"), "the log does not name the field:\n{err}");
}
