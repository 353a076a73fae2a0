//! The zero-cost scope of envoy/scoped-per-route.yaml through a real Envoy
//! and the real module: the consistent-hash filter is `disabled: true` in the
//! HTTP filter chain and enabled by a per-route `FilterConfig` on one virtual
//! host (minus one of its routes) and on one route of another. Requests on the
//! enabled routes get the pattern; every other request reaches the upstream
//! exactly as sent and never enters the VM: the filter counts every request it
//! sees in exactly one of `keyed`, `fallback`, `issued` or `unkeyed` (and a
//! client-sent hash header in `client_header_replaced`), and those counters
//! only ever count the enabled requests.

use std::collections::BTreeMap;
use std::time::Duration;

use meshpatterns_core::hash::{hash64, hex16};
use meshpatterns_tests::{wait_for, Client, Envoy, EnvoyBuilder, Upstream};

const CONFIG: &str = "scoped-per-route.yaml";

/// Every counter the filter bumps for a request it sees.
const COUNTERS: [&str; 5] = ["keyed", "fallback", "issued", "unkeyed", "client_header_replaced"];

/// The `disabled: true` of the filter in the chain (not the one on the
/// `/assets/` route), for the control test that removes it.
const CHAIN_DISABLED: &str =
    "- name: meshpatterns.consistent_hash\n            # Off unless a virtual host or route enables it.\n            disabled: true\n";

/// Requests the shipped config keeps away from the filter, `(host, path)`:
/// on the route that disables it, and on routes that do not enable it.
const OFF_BY_ROUTE: (&str, &str) = ("shop.example.com", "/assets/app.js");
const OFF_BY_DEFAULT: [(&str, &str); 2] = [("api.example.com", "/"), ("api.example.com", "/orders/7")];

fn start(builder: EnvoyBuilder) -> (Vec<Upstream>, Envoy, Client) {
    let ups = Upstream::start_many("replica", 2);
    let envoy = builder.endpoints("REPLICAS", &ups).start();
    let c = Client::new(envoy.port("ingress"));
    (ups, envoy, c)
}

fn counters(envoy: &Envoy) -> BTreeMap<&'static str, u64> {
    COUNTERS.iter().map(|n| (*n, envoy.stat(&format!("meshpatterns.consistent_hash.{n}")))).collect()
}

/// Wait until the filter's counters are exactly `want`, then wait two more
/// flush periods (500 ms each) and require them unchanged, so that a request
/// counted late on another worker cannot slip past.
fn assert_counters(envoy: &Envoy, want: &BTreeMap<&'static str, u64>, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while &counters(envoy) != want && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(&counters(envoy), want, "{what}: the filter's counters");
}

/// A request the filter must not see: sent with a session key and a hash
/// header of the client's own, it must reach the upstream with both as sent
/// (the filter, had it run, would have replaced the hash) and get no cookie.
fn send_untouched(c: &mut Client, host: &str, path: &str) {
    c.host = host.to_string();
    let r = c.get(path, &[("x-user-id", "u-off"), ("x-session-hash", "client-chosen")]);
    assert_eq!(r.status, 200, "{host}{path}: {}", r.text());
    let seen = r.json();
    assert_eq!(seen["headers"]["x-session-hash"], "client-chosen", "{host}{path}: the filter rewrote the hash header: {seen}");
    assert_eq!(seen["headers"]["x-user-id"], "u-off", "{host}{path}: {seen}");
    assert!(r.header("set-cookie").is_none(), "{host}{path}: cookie issued by a filter that should not run");
    // Without a key either: still no session cookie.
    let r = c.get(path, &[]);
    assert_eq!(r.status, 200, "{host}{path}: {}", r.text());
    assert!(r.header("set-cookie").is_none(), "{host}{path}: cookie issued by a filter that should not run");
    assert!(r.json()["headers"].get("x-session-hash").is_none(), "{host}{path}: hash header added: {}", r.text());
}

/// A request the filter must see: the upstream gets XXH64 of the key in
/// `x-session-hash`, whatever the client sent there.
fn send_keyed(c: &mut Client, host: &str, path: &str, user: &str) {
    c.host = host.to_string();
    let r = c.get(path, &[("x-user-id", user), ("x-session-hash", "client-chosen")]);
    assert_eq!(r.status, 200, "{host}{path}: {}", r.text());
    assert_eq!(r.json()["headers"]["x-session-hash"], hex16(hash64(user.as_bytes())), "{host}{path}: {}", r.text());
}

/// A keyless request the filter must see: a session cookie is issued and
/// the upstream already gets the new session's hash.
fn send_keyless(c: &mut Client, host: &str, path: &str) {
    c.host = host.to_string();
    let r = c.get(path, &[]);
    assert_eq!(r.status, 200, "{host}{path}: {}", r.text());
    let cookie = r.header("set-cookie").unwrap_or_else(|| panic!("{host}{path}: no session cookie issued"));
    assert!(cookie.starts_with("mp_session="), "{host}{path}: set-cookie {cookie}");
    assert!(r.json()["headers"]["x-session-hash"].as_str().is_some_and(|h| h.len() == 16), "{host}{path}: {}", r.text());
}

/// `(http.route, meshpatterns.session.source)` of each access-log line.
fn logged(envoy: &Envoy) -> Vec<(String, String)> {
    envoy
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
            (s("http.route"), s("meshpatterns.session.source"))
        })
        .collect()
}

#[test]
fn only_the_routes_that_enable_the_filter_enter_the_vm() {
    let (_ups, envoy, mut c) = start(EnvoyBuilder::new(CONFIG));
    // Out of scope first, 5 times each (10 requests per route: with and without a key).
    for _ in 0..5 {
        for (host, path) in std::iter::once(OFF_BY_ROUTE).chain(OFF_BY_DEFAULT) {
            send_untouched(&mut c, host, path);
        }
    }
    let zero: BTreeMap<_, _> = COUNTERS.iter().map(|n| (*n, 0)).collect();
    assert_counters(&envoy, &zero, "after 30 requests on disabled routes");

    // In scope: the virtual host that enables it, and the one route that does.
    for i in 0..5 {
        send_keyed(&mut c, "shop.example.com", &format!("/product/{i}"), &format!("u-{i}"));
        send_keyless(&mut c, "shop.example.com", "/checkout");
        send_keyed(&mut c, "api.example.com", &format!("/cart/{i}"), &format!("u-{i}"));
    }
    // Out of scope again, interleaved with the counters' flushes.
    for (host, path) in std::iter::once(OFF_BY_ROUTE).chain(OFF_BY_DEFAULT) {
        send_untouched(&mut c, host, path);
    }
    let want: BTreeMap<_, _> =
        [("keyed", 10), ("fallback", 0), ("issued", 5), ("unkeyed", 0), ("client_header_replaced", 10)].into_iter().collect();
    assert_counters(&envoy, &want, "15 requests on enabled routes, 36 on disabled ones");

    // The access log agrees: no decision recorded on a disabled route.
    let log = wait_for("51 access-log lines", Duration::from_secs(20), || Some(logged(&envoy)).filter(|l| l.len() >= 51));
    assert_eq!(log.len(), 51, "access-log lines: {log:?}");
    for (route, source) in &log {
        let on = route == "shop" || route == "other-cart";
        assert_eq!(on, source != "-" && !source.is_empty(), "route {route} logged session source {source:?}");
    }
    for name in ["shop", "shop-assets", "other", "other-cart"] {
        assert!(log.iter().any(|(r, _)| r == name), "no request was routed by {name}: {log:?}");
    }
}

/// The control: the same requests with the filter enabled in the chain. The
/// counters above would have seen them, and the route that disables the filter
/// itself still keeps it out.
#[test]
fn without_disabled_in_the_chain_every_other_route_enters_the_vm() {
    let builder = EnvoyBuilder::new(CONFIG).replace(CHAIN_DISABLED, "- name: meshpatterns.consistent_hash\n");
    let (_ups, envoy, mut c) = start(builder);
    for i in 0..5 {
        for (host, path) in OFF_BY_DEFAULT {
            send_keyed(&mut c, host, path, &format!("u-{i}"));
        }
        let (host, path) = OFF_BY_ROUTE;
        send_untouched(&mut c, host, path);
    }
    let want: BTreeMap<_, _> =
        [("keyed", 10), ("fallback", 0), ("issued", 0), ("unkeyed", 0), ("client_header_replaced", 10)].into_iter().collect();
    assert_counters(&envoy, &want, "10 requests on routes that no longer keep the filter out, 10 on /assets/");
}
