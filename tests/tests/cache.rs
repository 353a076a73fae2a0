//! Caching layer: Envoy's HTTP cache filter in front of a slow origin.
//! Repeats are served by Envoy without reaching the origin (counted at the
//! origin), with an Age header; Cache-Control no-store and max-age are honoured.

use std::time::{Duration, Instant};

use meshpatterns_tests::origin::slow_origin;
use meshpatterns_tests::{access_log, wait_for, Client, Envoy, EnvoyBuilder, Upstream};

/// How long the origin takes to answer every request.
const ORIGIN_DELAY: Duration = Duration::from_millis(300);

fn start() -> (Upstream, Envoy, Client) {
    let origin = slow_origin(ORIGIN_DELAY);
    let envoy = EnvoyBuilder::new("cache.yaml").endpoints("ORIGIN", std::slice::from_ref(&origin)).start();
    let client = Client::new(envoy.port("ingress"));
    (origin, envoy, client)
}

fn age(r: &meshpatterns_tests::Response) -> Option<u64> {
    r.header("age").map(|a| a.parse().unwrap_or_else(|_| panic!("Age header {a:?} is not a number")))
}

#[test]
fn repeats_are_served_from_the_cache_with_an_age_header() {
    let (origin, envoy, mut c) = start();
    let t = Instant::now();
    let first = c.get("/static/logo", &[]);
    let miss_time = t.elapsed();
    assert_eq!(first.status, 200);
    assert_eq!(age(&first), None, "a response fresh from the origin has no Age: {:?}", first.headers);
    let t = Instant::now();
    let repeats: Vec<_> = (0..50).map(|_| c.get("/static/logo", &[])).collect();
    let hit_time = t.elapsed() / 50;
    eprintln!("origin delay {ORIGIN_DELAY:?}: miss {miss_time:?}, mean hit {hit_time:?} over 50 requests");
    // What the cache is for: a hit does not wait for the origin. The miss
    // waited for it; the mean hit must be at least 10 times faster than the
    // origin's delay (measured: under 1 ms, so the bound holds on a loaded
    // machine and fails as soon as a repeat goes to the origin).
    assert!(miss_time >= ORIGIN_DELAY, "the miss took {miss_time:?}, less than the origin's {ORIGIN_DELAY:?}");
    assert!(hit_time <= ORIGIN_DELAY / 10, "mean hit {hit_time:?}, not 10 times faster than the origin's {ORIGIN_DELAY:?}");
    for (i, r) in repeats.iter().enumerate() {
        assert_eq!(r.status, 200);
        assert_eq!(r.body, first.body, "request {i}: a repeat must be the stored response");
        let a = age(r).unwrap_or_else(|| panic!("request {i}: no Age header on a cached response: {:?}", r.headers));
        assert!(a <= 300, "Age {a} beyond max-age");
        assert_eq!(r.header("cache-control"), Some("public, max-age=300"));
    }
    assert_eq!(origin.hits(), 1, "51 requests, only the first reaches the origin");
    // A different URL is a different entry.
    let other = c.get("/static/banner", &[]);
    assert_ne!(other.body, first.body);
    assert_eq!(origin.hits(), 2);
    assert_eq!(c.retries(), 0, "no request needed a second attempt");

    // The access log (envoy/ACCESS_LOG.md) records the Age of each response:
    // null for the two misses, the cached copy's Age for the 50 hits.
    let lines = wait_for("52 access-log lines", Duration::from_secs(10), || {
        let l = access_log::lines(&envoy.stdout());
        (l.len() >= 52).then_some(l)
    });
    assert_eq!(lines.len(), 52);
    for l in &lines {
        access_log::check_line(l).unwrap_or_else(|e| panic!("{e}"));
    }
    let ages: Vec<Option<&str>> = lines.iter().map(|l| l["http.response.header.age"].as_str()).collect();
    assert_eq!(ages[0], None, "miss: {}", lines[0]);
    assert_eq!(ages[51], None, "miss: {}", lines[51]);
    assert!(ages[1..51].iter().all(|a| a.is_some_and(|a| a.parse::<u64>().is_ok_and(|a| a <= 300))), "hits: {ages:?}");
    assert_eq!(lines.iter().filter(|l| l["url.path"] == "/static/logo").count(), 51);
}

#[test]
fn no_store_responses_are_never_served_from_the_cache() {
    let (origin, _envoy, mut c) = start();
    let mut bodies = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let r = c.get("/nostore/account", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(age(&r), None);
        bodies.insert(r.body);
    }
    assert_eq!(origin.hits(), 5, "every no-store request reaches the origin");
    assert_eq!(bodies.len(), 5, "five distinct origin responses");
}

#[test]
fn a_request_with_no_cache_goes_to_the_origin() {
    let (origin, _envoy, mut c) = start();
    let first = c.get("/static/report", &[]);
    assert_eq!(c.get("/static/report", &[]).body, first.body);
    assert_eq!(origin.hits(), 1);
    // The client insists on a response validated by the origin (RFC 9111
    // 5.2.1.4); without a validator in the stored response, the cache fetches anew.
    let fresh = c.get("/static/report", &[("cache-control", "no-cache")]);
    assert_eq!(fresh.status, 200);
    assert_eq!(age(&fresh), None);
    assert_ne!(fresh.body, first.body);
    assert_eq!(origin.hits(), 2);
    // Plain requests are served from the cache again.
    let after = c.get("/static/report", &[]);
    assert!(age(&after).is_some());
    assert_eq!(after.body, fresh.body, "the refreshed response replaced the stored one");
    assert_eq!(origin.hits(), 2);
}

#[test]
fn max_age_is_honoured() {
    let (origin, _envoy, mut c) = start();
    let first = c.get("/short/quote", &[]);
    let fetched = Instant::now();
    assert_eq!(first.status, 200);
    let second = c.get("/short/quote", &[]);
    assert!(fetched.elapsed() < Duration::from_secs(3), "the machine is too slow for this test: the 3 s entry went stale");
    assert_eq!(second.body, first.body, "fresh for 3 s: served from the cache");
    assert!(age(&second).is_some_and(|a| a <= 3), "{:?}", second.headers);
    assert_eq!(origin.hits(), 1);

    // Past max-age the stored copy is stale and the origin is asked again.
    std::thread::sleep(Duration::from_secs(3) + Duration::from_millis(1500));
    let third = c.get("/short/quote", &[]);
    assert_eq!(third.status, 200);
    assert_ne!(third.body, first.body, "stale entry served past max-age");
    assert_eq!(origin.hits(), 2);
    // The new response is stored again.
    assert_eq!(c.get("/short/quote", &[]).body, third.body);
    assert_eq!(origin.hits(), 2);
}

#[test]
fn uncacheable_responses_reach_the_origin_every_time() {
    let (origin, _envoy, mut c) = start();
    for _ in 0..3 {
        let r = c.get("/dynamic", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(age(&r), None);
    }
    assert_eq!(origin.hits(), 3, "Cache-Control no-cache without a validator: fetched every time");
}
