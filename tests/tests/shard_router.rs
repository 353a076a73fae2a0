//! shard-router through a real Envoy in front of three (or four) shard
//! clusters of real upstream replicas: stable placement, spread over 10,000
//! keys, movement when a shard is added, spoofed routing headers, missing and
//! invalid keys, dead replicas and dead shards, resharding with fallback reads,
//! range sharding, gRPC callers, bad configs.

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use meshpatterns_tests::upstream::{Reply, Request};
use std::time::Duration;

use meshpatterns_tests::{paths, wait_for, Client, Envoy, EnvoyBuilder, Upstream};
use shard_router::logic::{Config, Settings};

const CONFIG: &str = "shard-router.yaml";
const RESHARDING: &str = "shard-router-resharding.yaml";
const SHARDS: [&str; 4] = ["shard-a", "shard-b", "shard-c", "shard-d"];

fn placeholder(shard: &str) -> String {
    format!("SHARD_{}", shard.trim_start_matches("shard-").to_ascii_uppercase())
}

fn cluster(shard: &str) -> String {
    shard.replace('-', "_")
}

/// Two echo replicas per shard, named `shard-a-0`, `shard-a-1`, ...
fn echo_shards(n: usize) -> Vec<Vec<Upstream>> {
    SHARDS.iter().take(n).map(|s| Upstream::start_many(s, 2)).collect()
}

/// Start Envoy on `config` with these shard clusters and wait until every replica is healthy.
fn start(config: &str, shards: &[Vec<Upstream>], edit: impl FnOnce(EnvoyBuilder) -> EnvoyBuilder) -> Envoy {
    let mut b = EnvoyBuilder::new(config);
    for (name, ups) in SHARDS.iter().zip(shards) {
        b = b.endpoints(&placeholder(name), ups);
    }
    let envoy = edit(b).start();
    for (name, ups) in SHARDS.iter().zip(shards) {
        envoy.wait_healthy(&cluster(name), ups.len());
    }
    envoy
}

/// The filter's settings as configured in `config`, parsed by the filter's own code,
/// to predict through Envoy exactly where each key must land.
fn settings(config: &str) -> Settings {
    let mut b = EnvoyBuilder::new(config);
    for s in SHARDS {
        b = b.endpoint_ports(&placeholder(s), &[1]);
    }
    let yaml: serde_norway::Value = serde_norway::from_str(&b.render()).unwrap();
    let hcm = &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let json = hcm["http_filters"][0]["typed_config"]["config"]["configuration"]["value"].as_str().unwrap();
    // Through the pipeline module the config is its only stage.
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    if let Some(inner) = v.get("stages").and_then(|s| s.get(0)).and_then(|s| s.get("shardRoute")).cloned() {
        v = inner;
    }
    let c: Config = meshpatterns_core::error::parse_json(v.to_string().as_bytes()).unwrap();
    Settings::try_from_config(c).unwrap()
}

fn predicted(s: &Settings, key: &str) -> String {
    s.current.locate(key).unwrap().name.clone()
}

/// `shard-a-1` -> `shard-a`.
fn shard_of_replica(replica: &str) -> &str {
    replica.rsplit_once('-').map(|(s, _)| s).unwrap_or("")
}

/// GET /kv/<key>: the shard that answered, checked three ways (response
/// header, replica, the routing header the upstream received).
fn shard_for(c: &mut Client, key: &str) -> String {
    let r = c.get(&format!("/kv/{key}"), &[]);
    assert_eq!(r.status, 200, "{key}: {}", r.text());
    let shard = r.header("x-shard").unwrap_or("").to_string();
    assert_eq!(shard_of_replica(r.replica()), shard, "{key}: x-shard vs replica");
    assert_eq!(r.json()["headers"]["x-shard-cluster"], cluster(&shard).as_str(), "{key}: routing header seen upstream");
    shard
}

/// The access log lines Envoy has written so far (it flushes about once a
/// second), once there are at least `n`.
fn access_log(envoy: &Envoy, n: usize) -> Vec<serde_json::Value> {
    wait_for(&format!("{n} access log lines"), Duration::from_secs(10), || {
        let lines: Vec<serde_json::Value> = envoy.stdout().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (lines.len() >= n).then_some(lines)
    })
}

#[test]
fn same_key_always_reaches_the_same_shard() {
    let shards = echo_shards(3);
    let envoy = start(CONFIG, &shards, |b| b);
    let s = settings(CONFIG);
    let mut c = Client::new(envoy.port("ingress"));
    for k in 0..20 {
        let key = format!("user-{k}");
        let want = predicted(&s, &key);
        for _ in 0..20 {
            assert_eq!(shard_for(&mut c, &key), want, "{key}");
        }
        // The same key from the header source lands on the same shard.
        let r = c.get("/items", &[("x-shard-key", &key)]);
        assert_eq!((r.status, r.header("x-shard")), (200, Some(want.as_str())));
    }
    envoy.wait_stat("meshpatterns.shard_router.routed", 20 * 21);
}

#[test]
fn ten_thousand_keys_spread_within_bound() {
    let shards = echo_shards(3);
    let envoy = start(CONFIG, &shards, |b| b);
    let s = settings(CONFIG);
    let port = envoy.port("ingress");
    let counts: BTreeMap<String, u32> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let s = &s;
                sc.spawn(move || {
                    let mut c = Client::new(port);
                    let mut m: BTreeMap<String, u32> = BTreeMap::new();
                    for i in (w..10_000).step_by(4) {
                        let key = format!("key-{i}");
                        let got = shard_for(&mut c, &key);
                        assert_eq!(got, predicted(s, &key), "{key}");
                        *m.entry(got).or_default() += 1;
                    }
                    m
                })
            })
            .collect();
        let mut total = BTreeMap::new();
        for w in workers {
            for (k, v) in w.join().unwrap() {
                *total.entry(k).or_default() += v;
            }
        }
        total
    });
    assert_eq!(counts.values().sum::<u32>(), 10_000);
    assert_eq!(counts.len(), 3, "{counts:?}");
    let mean = 10_000.0 / 3.0;
    let max = *counts.values().max().unwrap() as f64 / mean;
    let min = *counts.values().min().unwrap() as f64 / mean;
    eprintln!("10,000 keys over 3 shards: {counts:?}; max/mean {max:.3}, min/mean {min:.3}");
    // Bound: every shard within ±10 % of the mean (ring of 3 × 1024 points).
    assert!(max <= 1.10 && min >= 0.90, "max/mean {max:.3}, min/mean {min:.3}: {counts:?}");
    for (shard, n) in &counts {
        envoy.wait_stat(&format!("meshpatterns.shard_router.shard.{shard}.requests"), u64::from(*n));
    }
}

#[test]
fn adding_a_shard_moves_about_one_in_n_plus_one_keys_all_to_the_new_shard() {
    let shards = echo_shards(4);
    let keys: Vec<String> = (0..4000).map(|i| format!("acct-{i}")).collect();
    let before: Vec<String> = {
        let envoy = start(CONFIG, &shards[..3], |b| b);
        let mut c = Client::new(envoy.port("ingress"));
        keys.iter().map(|k| shard_for(&mut c, k)).collect()
    };
    let envoy = start(RESHARDING, &shards, |b| b);
    let mut c = Client::new(envoy.port("ingress"));
    let after: Vec<String> = keys.iter().map(|k| shard_for(&mut c, k)).collect();
    let mut moved = 0;
    for ((k, b), a) in keys.iter().zip(&before).zip(&after) {
        if a != b {
            assert_eq!(a, "shard-d", "{k} moved from {b} to {a}, not to the new shard");
            moved += 1;
        }
    }
    let frac = moved as f64 / keys.len() as f64;
    eprintln!("adding a 4th shard moved {moved} of {} keys ({:.1} %; ideal 1/(N+1) = 25 %)", keys.len(), frac * 100.0);
    assert!((frac - 0.25).abs() <= 0.04, "moved fraction {frac:.3}, expected 0.25 ± 0.04");
    // Every moved key was flagged as moved by the resharding map (echo replicas
    // answer 200, so no fallback was needed).
    envoy.wait_stat("meshpatterns.shard_router.moved", moved);
    // Counted in the same requests, so flushed with `moved`.
    assert_eq!(envoy.stat("meshpatterns.shard_router.fallback_served"), 0);
}

#[test]
fn client_sent_routing_header_changes_nothing() {
    let shards = echo_shards(3);
    let envoy = start(CONFIG, &shards, |b| b);
    let s = settings(CONFIG);
    let mut c = Client::new(envoy.port("ingress"));
    let mut sent = 0;
    for k in 0..30 {
        let key = format!("mallory-{k}");
        let want = predicted(&s, &key);
        for forged in ["shard_a", "shard_b", "shard_c", "no_such_cluster"] {
            let r = c.get(&format!("/kv/{key}"), &[("x-shard-cluster", forged)]);
            sent += 1;
            assert_eq!((r.status, r.header("x-shard")), (200, Some(want.as_str())), "{key} forged {forged}");
            assert_eq!(shard_of_replica(r.replica()), want);
            assert_eq!(r.json()["headers"]["x-shard-cluster"], cluster(&want).as_str(), "client value overwritten");
        }
    }
    // Without a key the forged header does not route either: the request is refused.
    let r = c.get("/", &[("x-shard-cluster", "shard_a")]);
    assert_eq!(r.status, 400);
    envoy.wait_stat("meshpatterns.shard_router.client_header_replaced", sent + 1);
    assert_eq!(shards.iter().flatten().map(Upstream::hits).sum::<u64>(), sent);
}

#[test]
fn missing_or_invalid_key_gets_a_400_naming_the_problem_or_the_default_shard() {
    let shards = echo_shards(3);
    let envoy = start(CONFIG, &shards, |b| b);
    let mut c = Client::new(envoy.port("ingress"));
    let r = c.get("/items", &[]);
    assert_eq!((r.status, r.header("content-type")), (400, Some("application/json")), "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"], "missing shard key");
    assert_eq!(v["keySources"], serde_json::json!(["path_regex", "header:x-shard-key"]));
    let r = c.get("/kv/bad*key", &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!((r.json()["error"].as_str(), r.json()["keySource"].as_str()), (Some("invalid shard key"), Some("path_regex")));
    assert!(r.json()["detail"].as_str().unwrap().contains("keyPattern"), "{}", r.text());
    // Oversized keys count as absent (memory stays bounded whatever clients send).
    let r = c.get("/items", &[("x-shard-key", &"k".repeat(2000))]);
    assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("missing shard key")));
    assert_eq!(shards.iter().flatten().map(Upstream::hits).sum::<u64>(), 0, "nothing reached a shard");
    envoy.wait_stat("meshpatterns.shard_router.rejected", 3);
    let sources: Vec<String> =
        access_log(&envoy, 3).iter().map(|l| l["meshpatterns.shard.source"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(sources, ["missing", "invalid:pattern", "missing"]);
    drop(envoy);

    // With a default shard the same requests are served by it.
    let envoy = start(CONFIG, &shards, |b| {
        b.replace(r#""responseHeader": "x-shard","#, r#""responseHeader": "x-shard", "defaultShard": "shard-b","#)
    });
    let mut c = Client::new(envoy.port("ingress"));
    for path in ["/items", "/kv/bad*key"] {
        let r = c.get(path, &[]);
        assert_eq!((r.status, r.header("x-shard")), (200, Some("shard-b")), "{path}");
        assert_eq!(shard_of_replica(r.replica()), "shard-b");
    }
    envoy.wait_stat("meshpatterns.shard_router.defaulted", 2);
}

#[test]
fn dead_replica_is_ejected_and_a_dead_shard_gets_a_503_naming_it() {
    let shards = echo_shards(3);
    let envoy = start(CONFIG, &shards, |b| b);
    let s = settings(CONFIG);
    let mut c = Client::new(envoy.port("ingress"));
    let keys_of = |shard: &str| (0..).map(|i| format!("k{i}")).filter(|k| predicted(&s, k) == shard).take(20).collect::<Vec<_>>();
    let (keys_a, keys_b, keys_c) = (keys_of("shard-a"), keys_of("shard-b"), keys_of("shard-c"));

    // One replica of shard-b dies: the shard keeps serving from the other
    // (health checks eject it; until every worker has seen that, the route's
    // connect-failure retry sends the request to the other replica).
    shards[1][0].stop();
    envoy.wait_healthy("shard_b", 1);
    for k in keys_b.iter().chain(&keys_b) {
        let r = c.get(&format!("/kv/{k}"), &[]);
        assert_eq!((r.status, r.replica()), (200, "shard-b-1"), "{k}: {}", r.text());
    }

    // The other replica fails its health check too: shard-b is down, a and c serve.
    shards[1][1].set_healthy(false);
    envoy.wait_healthy("shard_b", 0);
    let probe = format!("/kv/{}", keys_b[0]);
    wait_for("workers to see shard-b down", Duration::from_secs(20), || (c.get(&probe, &[]).status == 503).then_some(()));
    for k in &keys_b {
        let r = c.get(&format!("/kv/{k}"), &[]);
        assert_eq!((r.status, r.header("x-shard"), r.header("content-type")), (503, Some("shard-b"), Some("application/json")), "{k}");
        let v = r.json();
        assert_eq!(
            (v["error"].as_str(), v["shard"].as_str(), v["cluster"].as_str()),
            (Some("shard unavailable"), Some("shard-b"), Some("shard_b"))
        );
        assert_eq!(v["detail"], "no_healthy_upstream");
    }
    // A gRPC caller gets UNAVAILABLE naming the shard (Envoy's trailers-only
    // answer, grpc-message rewritten), not a JSON body.
    let g = grpc_curl(envoy.port("ingress"), &[("x-shard-key", &keys_b[0])]);
    assert_eq!((g.status, g.header("grpc-status"), g.header("x-shard")), (200, Some("14"), Some("shard-b")), "{g:?}");
    assert_eq!(g.grpc_message(), "shard unavailable: shard shard-b (cluster shard_b, shard map v1): no_healthy_upstream", "{g:?}");
    for k in keys_a.iter().chain(&keys_c) {
        let r = c.get(&format!("/kv/{k}"), &[]);
        assert_eq!(r.status, 200, "{k} on a healthy shard: {}", r.text());
    }
    let n = keys_b.len() as u64 + 1;
    wait_for("shard_unavailable counted", Duration::from_secs(10), || {
        (envoy.stat("meshpatterns.shard_router.shard_unavailable") > n).then_some(())
    });

    // It comes back.
    shards[1][1].set_healthy(true);
    envoy.wait_healthy("shard_b", 1);
    wait_for("workers to see shard-b back", Duration::from_secs(20), || (c.get(&probe, &[]).status == 200).then_some(()));
    for k in &keys_b {
        assert_eq!(shard_for(&mut c, k), "shard-b");
    }
}

/// Keys are the bytes the client sent: keys differing only in a byte that is
/// not UTF-8 are different keys, each placed where the filter's own code
/// places its bytes (they used to collapse into one `k\u{FFFD}`). With a
/// `keyPattern`, such a key never matches and is refused as invalid.
#[test]
fn keys_are_the_bytes_sent() {
    let shards = echo_shards(3);
    let s = settings(CONFIG);
    let raw_get = |port: u16, key: &[u8]| {
        let mut req = b"GET /items HTTP/1.1\r\nhost: localhost\r\nx-shard-key: ".to_vec();
        req.extend_from_slice(key);
        req.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
        Client::new(port).raw(&req).unwrap()
    };
    let envoy = start(CONFIG, &shards, |b| b.replace(r#""keyPattern": "[A-Za-z0-9._:-]{1,128}","#, ""));
    let port = envoy.port("ingress");
    let mut seen = std::collections::BTreeSet::new();
    for b in 0x80..=0xffu8 {
        let key = [b'k', b];
        let want = s.current.locate(key).unwrap().name.clone();
        let r = raw_get(port, &key);
        assert_eq!((r.status, r.header("x-shard")), (200, Some(want.as_str())), "key k\\x{b:02X}: {}", r.text());
        seen.insert(want);
    }
    assert_eq!(seen.len(), 3, "128 keys differing in one non-UTF-8 byte spread over every shard: {seen:?}");
    drop(envoy);

    let envoy = start(CONFIG, &shards, |b| b);
    let r = raw_get(envoy.port("ingress"), b"caf\xe9");
    assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("invalid shard key")), "{}", r.text());
    assert!(r.json()["detail"].as_str().unwrap().contains("keyPattern"));
}

/// A gRPC answer as curl saw it: the HTTP status, then headers and trailers.
#[derive(Debug)]
struct GrpcAnswer {
    status: u16,
    headers: Vec<(String, String)>,
}

impl GrpcAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    /// `grpc-message`, percent-decoded.
    fn grpc_message(&self) -> String {
        let raw = self.header("grpc-message").unwrap_or("").as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < raw.len() {
            let hex = raw.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
            match (raw[i], hex) {
                (b'%', Some(b)) => {
                    out.push(b);
                    i += 3;
                }
                (b, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }
}

/// A gRPC request with curl over HTTP/2 cleartext, with extra metadata
/// (request headers). It has no body: the filter answers on the headers,
/// and a body still in flight when Envoy ends the stream makes curl fail
/// the transfer.
fn grpc_curl(port: u16, metadata: &[(&str, &str)]) -> GrpcAnswer {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http2-prior-knowledge", "-X", "POST", "-D", "-", "-o", "/dev/null"]);
    cmd.args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    for (k, v) in metadata {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}/meshpatterns.test.Echo/Call"));
    let out = cmd.stdin(Stdio::null()).output().expect("curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    GrpcAnswer { status, headers }
}

/// A real gRPC client (grpcio, tests/grpc/echo.py) through h2c: a call
/// without a shard key is refused with INVALID_ARGUMENT (Envoy would map a
/// bare 400 to INTERNAL) and a message naming the key sources tried; one
/// with an invalid key likewise, naming the problem; nothing reaches a shard.
#[test]
fn grpc_calls_without_a_valid_key_get_invalid_argument() {
    let shards = echo_shards(3);
    let envoy = start(CONFIG, &shards, |b| b);
    let port = envoy.port("ingress");
    let out = Command::new(paths::grpc_python())
        .arg(paths::repo().join("tests/grpc/echo.py"))
        .args(["call", &format!("127.0.0.1:{port}"), "2"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e})", paths::grpc_python().display()));
    assert!(out.status.success(), "gRPC client failed: {}", String::from_utf8_lossy(&out.stderr));
    let calls: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(calls.len(), 2);
    for v in &calls {
        assert_eq!(v["code"], "INVALID_ARGUMENT", "{v}");
        assert_eq!(
            v["details"],
            "missing shard key: no key source yielded a key (tried path_regex, header:x-shard-key; empty values and values over 1024 bytes do not count)"
        );
    }

    let g = grpc_curl(port, &[("x-shard-key", "bad*key")]);
    assert_eq!((g.status, g.header("grpc-status"), g.header("content-type")), (200, Some("3"), Some("application/grpc")), "{g:?}");
    assert_eq!(g.grpc_message(), "invalid shard key from header:x-shard-key: the key does not match keyPattern (shard map v1)");

    assert_eq!(shards.iter().flatten().map(Upstream::hits).sum::<u64>(), 0, "nothing reached a shard");
    envoy.wait_stat("meshpatterns.shard_router.rejected", 3);
    let sources: Vec<String> =
        access_log(&envoy, 3).iter().map(|l| l["meshpatterns.shard.source"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(sources, ["missing", "missing", "invalid:pattern"]);
}

/// A replicated key-value shard: both replicas share one store.
/// GET /kv/<k> -> 200 value or 404; PUT -> 201; DELETE -> 204 or 404.
fn kv_shard(name: &str) -> (Vec<Upstream>, Arc<Mutex<HashMap<String, String>>>) {
    let store: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let ups = (0..2)
        .map(|i| {
            let store = store.clone();
            Upstream::with_handler(
                &format!("{name}-{i}"),
                Arc::new(move |replica: &str, r: &Request| {
                    let key = r.path.trim_start_matches("/kv/").to_string();
                    let mut m = store.lock().unwrap();
                    let reply = match r.method.as_str() {
                        "GET" => match m.get(&key) {
                            Some(v) => Reply::new(200, v.clone()),
                            None => Reply::new(404, "no such key"),
                        },
                        "PUT" => {
                            m.insert(key, String::from_utf8_lossy(&r.body).into_owned());
                            Reply::new(201, "")
                        }
                        "DELETE" => match m.remove(&key) {
                            Some(_) => Reply::new(204, ""),
                            None => Reply::new(404, "no such key"),
                        },
                        _ => Reply::new(400, "bad method"),
                    };
                    reply.header("x-replica", replica)
                }),
            )
        })
        .collect();
    (ups, store)
}

#[test]
fn resharding_reads_of_moved_keys_fall_back_to_the_old_owner() {
    let (shards, stores): (Vec<_>, Vec<_>) = SHARDS.iter().map(|s| kv_shard(s)).unzip();
    let old = settings(CONFIG);
    let new = settings(RESHARDING);
    let keys: Vec<String> = (0..400).map(|i| format!("item-{i}")).collect();

    // Map v1: write every key to its owner among three shards.
    {
        let envoy = start(CONFIG, &shards[..3], |b| b);
        let mut c = Client::new(envoy.port("ingress"));
        for k in &keys {
            let r = c.request("PUT", &format!("/kv/{k}"), &[], format!("value of {k}").as_bytes());
            assert_eq!(r.status, 201, "{k}");
        }
    }
    for (i, st) in stores.iter().enumerate().take(3) {
        let n = keys.iter().filter(|k| predicted(&old, k) == SHARDS[i]).count();
        assert_eq!(st.lock().unwrap().len(), n, "{}", SHARDS[i]);
    }

    // Map v2 (four shards, v1 as previous): every read still finds its data.
    let envoy = start(RESHARDING, &shards, |b| b);
    let mut c = Client::new(envoy.port("ingress"));
    let moved: Vec<&String> = keys.iter().filter(|k| predicted(&old, k) != predicted(&new, k)).collect();
    for k in &keys {
        let r = c.get(&format!("/kv/{k}"), &[]);
        assert_eq!((r.status, r.text()), (200, format!("value of {k}")), "{k}");
        let owner = predicted(&old, k);
        assert_eq!(r.header("x-shard"), Some(owner.as_str()), "{k}: answered by its v1 owner");
        assert_eq!(shard_of_replica(r.replica()), owner);
    }
    eprintln!(
        "resharding 3 -> 4 shards: {} of {} keys moved; each read of one was answered by its old owner after a 404",
        moved.len(),
        keys.len()
    );
    assert!(!moved.is_empty());
    assert!(moved.iter().all(|k| predicted(&new, k) == "shard-d"));
    envoy.wait_stat("meshpatterns.shard_router.moved", moved.len() as u64);
    envoy.wait_stat("meshpatterns.shard_router.fallback_served", moved.len() as u64);
    assert_eq!(shards[3].iter().map(Upstream::hits).sum::<u64>(), moved.len() as u64, "the new owner is asked first");

    // Writes go to the new owner only; after that reads are served by it.
    for k in moved.iter().take(10) {
        let r = c.request("PUT", &format!("/kv/{k}"), &[], b"new value");
        assert_eq!((r.status, r.header("x-shard")), (201, Some("shard-d")));
        let r = c.get(&format!("/kv/{k}"), &[]);
        assert_eq!((r.status, r.text().as_str(), r.header("x-shard")), (200, "new value", Some("shard-d")));
    }
    assert_eq!(stores[3].lock().unwrap().len(), 10);
    envoy.wait_stat("meshpatterns.shard_router.moved", moved.len() as u64 + 20);
    assert_eq!(envoy.stat("meshpatterns.shard_router.fallback_served"), moved.len() as u64);

    // A write is never replayed against the old owner: the new owner's 404 stands.
    let k = moved[10];
    let r = c.request("DELETE", &format!("/kv/{k}"), &[], b"");
    assert_eq!((r.status, r.header("x-shard")), (404, Some("shard-d")));
    assert!(stores.iter().take(3).any(|st| st.lock().unwrap().contains_key(k.as_str())), "old copy untouched");

    // A key nobody has: the old owner's 404 is the answer.
    let ghost = (0..).map(|i| format!("ghost-{i}")).find(|k| predicted(&old, k) != predicted(&new, k)).unwrap();
    let r = c.get(&format!("/kv/{ghost}"), &[]);
    assert_eq!((r.status, r.header("x-shard")), (404, Some(predicted(&old, &ghost).as_str())));
    // The ghost's read fell back too (its old owner's 404 was served).
    envoy.wait_stat("meshpatterns.shard_router.fallback_served", moved.len() as u64 + 1);
    assert_eq!(envoy.stat("meshpatterns.shard_router.fallback_failed"), 0);

    // The old owner of a moved key is down: the read is not answered with the
    // new owner's 404 (that would claim the key does not exist) but with a 503
    // naming the old owner.
    let k = moved[11..].iter().find(|k| predicted(&old, k) == "shard-a").expect("a moved key from shard-a");
    for r in &shards[0] {
        r.set_healthy(false);
    }
    envoy.wait_healthy("shard_a", 0);
    let r = wait_for("shard-a down for the fallback call", Duration::from_secs(20), || {
        let r = c.get(&format!("/kv/{k}"), &[]);
        (r.status != 200).then_some(r)
    });
    assert_eq!((r.status, r.header("x-shard")), (503, Some("shard-a")), "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["error"].as_str(), v["shard"].as_str(), v["shardMapVersion"].as_str()),
        (Some("shard unavailable"), Some("shard-a"), Some("v1"))
    );
    wait_for("fallback_failed counted", Duration::from_secs(10), || {
        (envoy.stat("meshpatterns.shard_router.fallback_failed") >= 1).then_some(())
    });
    for r in &shards[0] {
        r.set_healthy(true);
    }

    // The access log records the map version and, for the reads the old
    // owner answered, which shard that was.
    let lines = access_log(&envoy, keys.len() + 20 + 1 + 1 + 1);
    let reads = &lines[..keys.len()];
    assert!(reads.iter().all(|l| l["meshpatterns.shard.map_version"] == "v2"), "{:?}", reads.first());
    let fell_back: Vec<&serde_json::Value> = reads.iter().filter(|l| !l["meshpatterns.shard.fallback"].is_null()).collect();
    assert_eq!(fell_back.len(), moved.len());
    for l in fell_back {
        let key = l["url.path"].as_str().unwrap().trim_start_matches("/kv/");
        assert_eq!(l["meshpatterns.shard.fallback"].as_str(), Some(predicted(&old, key).as_str()), "{l}");
        assert_eq!(l["meshpatterns.shard.name"], "shard-d", "{l}");
    }
}

#[test]
fn range_sharding_for_ordered_keys() {
    let shards = echo_shards(3);
    let ranges = r#""version": "v1",
                        "ranges": [{"shard": "shard-a", "below": "h"}, {"shard": "shard-b", "below": "q"}, {"shard": "shard-c"}],"#;
    let envoy = start(CONFIG, &shards, |b| b.replace(r#""version": "v1","#, ranges));
    let mut c = Client::new(envoy.port("ingress"));
    for (key, want) in
        [("apple", "shard-a"), ("grape", "shard-a"), ("h", "shard-b"), ("kiwi", "shard-b"), ("quince", "shard-c"), ("zebra", "shard-c")]
    {
        assert_eq!(shard_for(&mut c, key), want, "{key}");
    }
}

#[test]
fn invalid_config_fails_with_field_named() {
    let cases = [
        (r#""shardHeader": "x-shard-cluster""#, r#""shardHeader": "x-shard-key""#, "field `shardHeader` has value \"x-shard-key\""),
        (r#"{"name": "shard-b", "cluster": "shard_b"}"#, r#"{"name": "shard-a", "cluster": "shard_b"}"#, "field `shardMap.shards[1].name`"),
        (r#""keyPattern": "[A-Za-z0-9._:-]{1,128}""#, r#""keyPatern": "x""#, "unknown field `keyPatern`"),
    ];
    for (good, bad, expect) in cases {
        let mut b = EnvoyBuilder::new(CONFIG).replace(good, bad);
        for s in SHARDS.iter().take(3) {
            b = b.endpoint_ports(&placeholder(s), &[1]);
        }
        let err = b.validate().expect_err("envoy --mode validate must reject the config");
        let expect = &meshpatterns_tests::pipeline::in_stage("shard-router", expect);
        assert!(err.contains(expect.as_str()), "validate output lacks {expect:?}:\n{err}");
        assert!(err.contains(&meshpatterns_tests::pipeline::in_stage("shard-router", "shard-router: invalid plugin config")), "{err}");
    }
}
