//! consistent-hash through a real Envoy: stickiness, spread, movement when a
//! replica leaves, cookie issuance, spoofed hash headers, bad configs.

use std::collections::{BTreeMap, HashMap};

use meshpatterns_core::hash::{hash64, hex16};
use std::time::Duration;

use meshpatterns_tests::{wait_for, Client, Envoy, EnvoyBuilder, Upstream};

const CONFIG: &str = "consistent-hash.yaml";

fn mesh(replicas: usize) -> (Vec<Upstream>, Envoy) {
    let ups = Upstream::start_many("replica", replicas);
    // Health checks with a 5 s timeout instead of the shipped 1 s: a replica
    // taken out answers 503 at once, but on a loaded 2-core machine a healthy
    // one can be slower than 1 s, be ejected for a moment and move sessions
    // the placement tests count (seen under a parallel soak: 4 % moved).
    let envoy = EnvoyBuilder::new(CONFIG).replace("- timeout: 1s", "- timeout: 5s").endpoints("REPLICAS", &ups).start();
    envoy.wait_healthy("replicas", replicas);
    (ups, envoy)
}

fn replica_for_user(c: &mut Client, user: &str) -> String {
    let r = c.get("/", &[("x-user-id", user)]);
    assert_eq!(r.status, 200, "{}", r.text());
    r.replica().to_string()
}

#[test]
fn same_session_lands_on_same_replica_over_1000_requests() {
    let (_ups, envoy) = mesh(5);
    let mut c = Client::new(envoy.port("ingress"));
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..1000 {
        let r = c.get("/cart", &[("x-user-id", "user-1")]);
        assert_eq!(r.status, 200);
        // The upstream sees the filter's hash of the key, XXH64 in hex.
        assert_eq!(r.json()["headers"]["x-session-hash"], hex16(hash64(b"user-1")));
        *seen.entry(r.replica().to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 1, "session user-1 was served by {seen:?}");
    envoy.wait_stat("meshpatterns.consistent_hash.keyed", 1000);
}

#[test]
fn ten_thousand_sessions_spread_evenly() {
    let (ups, envoy) = mesh(5);
    let port = envoy.port("ingress");
    let counts: HashMap<String, u32> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                s.spawn(move || {
                    let mut c = Client::new(port);
                    let mut m: HashMap<String, u32> = HashMap::new();
                    for i in (w..10_000).step_by(4) {
                        *m.entry(replica_for_user(&mut c, &format!("session-{i}"))).or_default() += 1;
                    }
                    m
                })
            })
            .collect();
        let mut total = HashMap::new();
        for w in workers {
            for (k, v) in w.join().unwrap() {
                *total.entry(k).or_default() += v;
            }
        }
        total
    });
    assert_eq!(counts.values().sum::<u32>(), 10_000);
    assert_eq!(counts.len(), ups.len(), "every replica gets sessions: {counts:?}");
    let mean = 10_000.0 / ups.len() as f64;
    let max = *counts.values().max().unwrap() as f64;
    eprintln!("spread over {} replicas: {counts:?}, max/mean = {:.3}", ups.len(), max / mean);
    // ring_hash with 4096+ ring entries: ±~5 % per host, plus sampling noise.
    assert!(max / mean <= 1.25, "max/mean {:.3} > 1.25: {counts:?}", max / mean);
}

#[test]
fn replica_leaving_moves_only_its_sessions() {
    let (ups, envoy) = mesh(5);
    let mut c = Client::new(envoy.port("ingress"));
    let users: Vec<String> = (0..2000).map(|i| format!("u{i}")).collect();
    let before: Vec<String> = users.iter().map(|u| replica_for_user(&mut c, u)).collect();

    let leaving = &ups[2];
    // Sessions that lived on the leaving replica: a probe for when every
    // worker's load balancer has seen the health change.
    let probe: Vec<&String> = users.iter().zip(&before).filter(|(_, b)| *b == leaving.name()).map(|(u, _)| u).take(50).collect();
    leaving.set_healthy(false);
    envoy.wait_healthy("replicas", 4);
    wait_for("sessions to leave the unhealthy replica", Duration::from_secs(20), || {
        probe.iter().all(|u| replica_for_user(&mut c, u) != leaving.name()).then_some(())
    });
    let during: Vec<String> = users.iter().map(|u| replica_for_user(&mut c, u)).collect();
    let mut moved = 0;
    let mut extra = 0;
    for (i, (b, d)) in before.iter().zip(&during).enumerate() {
        assert_ne!(d, leaving.name(), "{} still served by the unhealthy replica", users[i]);
        if b == leaving.name() {
            moved += 1;
        } else if b != d {
            extra += 1;
        }
    }
    let frac = moved as f64 / users.len() as f64;
    let others = users.len() - moved;
    let extra_frac = extra as f64 / others as f64;
    eprintln!(
        "replica {} left: {moved} of {} sessions ({:.1} %) moved off it; {extra} of {others} sessions on healthy replicas ({:.2} %) also moved",
        leaving.name(),
        users.len(),
        frac * 100.0,
        extra_frac * 100.0
    );
    assert!(moved > 0 && frac < 0.35, "moved fraction {frac}");
    // Envoy's Maglev table (65,537 entries) is not perfectly minimal: removing
    // one of five hosts reassigns a few table slots of the others (measured
    // ~0.3 %; ring_hash moves ~12 % because every host gets more ring points).
    assert!(extra_frac <= 0.01, "{extra} of {others} sessions on healthy replicas moved ({:.2} % > 1 %)", extra_frac * 100.0);

    leaving.set_healthy(true);
    envoy.wait_healthy("replicas", 5);
    wait_for("sessions to return to the recovered replica", Duration::from_secs(20), || {
        probe.iter().all(|u| replica_for_user(&mut c, u) == leaving.name()).then_some(())
    });
    let after: Vec<String> = users.iter().map(|u| replica_for_user(&mut c, u)).collect();
    let not_back = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    eprintln!("replica {} rejoined: {not_back} of {} sessions not back on their first replica", leaving.name(), users.len());
    assert!(not_back as f64 <= 0.01 * users.len() as f64, "{not_back} sessions did not return after the replica rejoined");
}

#[test]
fn cookie_issued_when_absent_and_honoured_after() {
    let (_ups, envoy) = mesh(3);
    let mut c = Client::new(envoy.port("ingress"));

    let first = c.get("/", &[]);
    assert_eq!(first.status, 200);
    let set = first.headers_named("set-cookie");
    assert_eq!(set.len(), 1, "one Set-Cookie on the first response: {:?}", first.headers);
    let set = set[0];
    assert!(set.ends_with("; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax"), "{set}");
    let pair = set.split(';').next().unwrap();
    let id = pair.strip_prefix("mp_session=").unwrap();
    assert_eq!(id.len(), 32, "session id {id}");
    let first_hash = first.json()["headers"]["x-session-hash"].as_str().unwrap().to_string();
    assert_eq!(first_hash, hex16(hash64(id.as_bytes())), "the issuing request is hashed by the new id");

    for _ in 0..200 {
        let r = c.get("/", &[("cookie", pair)]);
        assert_eq!(r.replica(), first.replica(), "cookie session stays on its first replica");
        assert!(r.header("set-cookie").is_none(), "no new cookie once the client has one");
        assert_eq!(r.json()["headers"]["x-session-hash"], first_hash.as_str());
    }
    // A client with an explicit user id is not given a cookie.
    assert!(c.get("/", &[("x-user-id", "alice")]).header("set-cookie").is_none());
    // Two cookie-less clients get different sessions.
    let other = c.get("/", &[]);
    assert_ne!(other.header("set-cookie").unwrap().split(';').next().unwrap(), pair);
    envoy.wait_stat("meshpatterns.consistent_hash.issued", 2);

    // The access log (flushed by Envoy about once a second) records where
    // each session key came from.
    let sources = wait_for("access log lines for all 203 requests", Duration::from_secs(10), || {
        let lines: Vec<serde_json::Value> = envoy.stdout().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (lines.len() >= 203)
            .then(|| lines.iter().map(|v| v["meshpatterns.session.source"].as_str().unwrap_or("").to_string()).collect::<Vec<_>>())
    });
    let count = |s: &str| sources.iter().filter(|x| *x == s).count();
    assert_eq!((count("issued"), count("cookie:mp_session"), count("header:x-user-id")), (2, 200, 1), "{sources:?}");
}

#[test]
fn client_sent_hash_header_changes_nothing() {
    let (_ups, envoy) = mesh(5);
    let mut c = Client::new(envoy.port("ingress"));
    let home = replica_for_user(&mut c, "mallory");
    let want = hex16(hash64(b"mallory"));
    for i in 0..100 {
        let forged = hex16(hash64(format!("forged-{i}").as_bytes()));
        let r = c.get("/", &[("x-user-id", "mallory"), ("x-session-hash", &forged)]);
        assert_eq!(r.replica(), home);
        assert_eq!(r.json()["headers"]["x-session-hash"], want.as_str(), "client value overwritten");
    }
    envoy.wait_stat("meshpatterns.consistent_hash.client_header_replaced", 100);
}

#[test]
fn invalid_config_fails_with_field_named() {
    let good = r#""sessionCookie": {"name": "mp_session", "ttlSeconds": 86400, "sameSite": "Lax"}"#;
    let cases = [
        (r#""sessionCookie": {"name": "mp_session", "sameSite": "None"}"#, "field `sessionCookie.sameSite` has value \"None\""),
        (r#""sessionCookie": {"name": "mp_session", "ttl": 5}"#, "unknown field `ttl`"),
        (r#""sessionCookie": {"name": "mp session"}"#, "field `sessionCookie.name` has value \"mp session\""),
    ];
    for (bad, expect) in cases {
        let b = EnvoyBuilder::new(CONFIG).endpoint_ports("REPLICAS", &[1]).replace(good, bad);
        let err = b.validate().expect_err("envoy --mode validate must reject the config");
        let expect = &meshpatterns_tests::pipeline::in_stage("consistent-hash", expect);
        assert!(err.contains(expect.as_str()), "validate output lacks {expect:?}:\n{err}");
        let log = match b.try_start() {
            Ok(_) => panic!("Envoy started with an invalid config: {bad}"),
            Err(log) => log,
        };
        assert!(log.contains(expect), "Envoy log lacks {expect:?}:\n{log}");
        assert!(
            log.contains(&meshpatterns_tests::pipeline::in_stage("consistent-hash", "consistent-hash: invalid plugin config")),
            "{log}"
        );
    }
}

#[test]
fn malformed_requests_never_break_the_filter() {
    let (_ups, envoy) = mesh(3);
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let home = replica_for_user(&mut c, "steady");
    let long = "k".repeat(8000);
    let many = "a=1; ".repeat(500);
    let requests: Vec<Vec<u8>> = vec![
        // header value with bytes that are not UTF-8 (obs-text)
        b"GET / HTTP/1.1\r\nhost: x\r\nx-user-id: \xff\xfe\x80abc\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: x\r\ncookie: mp_session=\xc3\x28\xa0\xa1\r\n\r\n".to_vec(),
        format!("GET / HTTP/1.1\r\nhost: x\r\nx-user-id: {long}\r\n\r\n").into_bytes(),
        format!("GET / HTTP/1.1\r\nhost: x\r\ncookie: {many}mp_session=\r\n\r\n").into_bytes(),
        b"GET /%zz%?%%=%&&&=&mp_session=%ff HTTP/1.1\r\nhost: x\r\ncookie: ;;;==;mp_session\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: x\r\nx-user-id:    \r\ncookie:\r\n\r\n".to_vec(),
        b"GET * HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
    ];
    for (i, req) in requests.iter().enumerate() {
        for _ in 0..3 {
            let r = c.raw(req).unwrap_or_else(|e| panic!("request {i}: {e}"));
            // Envoy itself may refuse a request line it considers invalid
            // (4xx); anything our filter lets through reaches a replica.
            assert!(r.status == 200 || (400..500).contains(&r.status), "request {i}: status {}", r.status);
        }
    }
    // A non-UTF-8 key is still a stable key: same bytes, same hash (the
    // filter's decision; which replica it lands on is Envoy's Maglev, and a
    // health check timing out on a loaded machine can move it for a while).
    let weird = b"GET / HTTP/1.1\r\nhost: x\r\nx-user-id: \xff\xfe\x80abc\r\n\r\n";
    let seen = |r: &meshpatterns_tests::Response| r.json()["headers"]["x-session-hash"].as_str().unwrap_or("<none>").to_string();
    let want = hex16(hash64(b"\xff\xfe\x80abc"));
    for _ in 0..20 {
        assert_eq!(seen(&c.raw(weird).unwrap()), want, "XXH64 of the bytes the client sent");
    }
    // The filter still works afterwards on every worker, and never panicked.
    for _ in 0..50 {
        let r = c.get("/", &[("x-user-id", "steady")]);
        assert_eq!((r.status, seen(&r)), (200, hex16(hash64(b"steady"))), "{}", r.text());
        c = Client::new(port);
    }
    assert_eq!(replica_for_user(&mut c, "steady"), home);
    let log = envoy.log();
    assert!(!log.contains("panic"), "the filter panicked:\n{log}");
}
