//! Rich health monitoring: a deep HTTP health check that judges a
//! representative request by status and body, and Envoy's Redis health
//! checker against a real redis-server that is stopped, restarted and drained.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshpatterns_tests::redis::RedisServer;
use meshpatterns_tests::upstream::{echo, Reply, Request};
use meshpatterns_tests::{wait_for, Client, Envoy, EnvoyBuilder, Upstream};

const CONFIG: &str = "health.yaml";
const OK: u8 = 0;
const DEGRADED: u8 = 1;
const FAILING: u8 = 2;

/// An app whose deep health endpoint reports on its (simulated) database:
/// OK -> 200 `"database":"ok"`; DEGRADED -> 200 but `"database":"unreachable"`
/// (the classic shallow-check blind spot); FAILING -> 500.
fn app(state: Arc<AtomicU8>) -> Upstream {
    Upstream::with_handler(
        "app",
        Arc::new(move |name: &str, r: &Request| {
            if r.path != "/healthz/deep" {
                return echo(name, r);
            }
            match state.load(Ordering::SeqCst) {
                OK => Reply::new(200, r#"{"status":"ok","database":"ok","latencyMs":3}"#),
                DEGRADED => Reply::new(200, r#"{"status":"degraded","database":"unreachable"}"#),
                _ => Reply::new(500, r#"{"status":"error"}"#),
            }
            .header("content-type", "application/json")
        }),
    )
}

fn host_healthy(envoy: &Envoy, cluster: &str) -> bool {
    envoy.hosts(cluster).first().is_some_and(|(_, h)| *h)
}

fn wait_health(envoy: &Envoy, cluster: &str, healthy: bool) {
    wait_for(&format!("{cluster} host healthy={healthy}"), Duration::from_secs(20), || {
        (host_healthy(envoy, cluster) == healthy).then_some(())
    });
}

#[test]
fn deep_check_judges_status_and_body_of_a_representative_request() {
    let state = Arc::new(AtomicU8::new(OK));
    let up = app(state.clone());
    let redis = RedisServer::start();
    let envoy = EnvoyBuilder::new(CONFIG).endpoints("APP", std::slice::from_ref(&up)).endpoint_ports("REDIS", &[redis.port]).start();
    wait_health(&envoy, "app", true);
    let mut c = Client::new(envoy.port("ingress"));
    assert_eq!(c.get("/orders", &[]).status, 200);
    let before = up.hits();

    // 200 with a body that says the database is gone: unhealthy all the same.
    state.store(DEGRADED, Ordering::SeqCst);
    wait_health(&envoy, "app", false);
    // Once the workers follow /clusters, Envoy answers itself instead of
    // forwarding to the degraded app.
    let r = wait_for("a local 503", Duration::from_secs(10), || Some(c.get("/orders", &[])).filter(|r| r.status == 503));
    assert_eq!(r.replica(), "", "a local reply, not the app's");
    assert!(r.text().contains("no healthy upstream"), "{}", r.text());
    for _ in 0..20 {
        let r = c.get("/orders", &[]);
        assert_eq!((r.status, r.replica()), (503, ""), "forwarded to a degraded app");
    }

    state.store(OK, Ordering::SeqCst);
    wait_health(&envoy, "app", true);
    wait_for("requests served again", Duration::from_secs(10), || (c.get("/orders", &[]).status == 200).then_some(()));

    // An error status fails the check too (at once: Envoy applies the
    // unhealthy threshold only to timeouts and connection failures).
    state.store(FAILING, Ordering::SeqCst);
    wait_health(&envoy, "app", false);
    state.store(OK, Ordering::SeqCst);
    wait_health(&envoy, "app", true);

    // The checks are real requests to the app's deep endpoint, carrying the
    // configured header (counted as app hits since /healthz/deep is not the
    // shallow /healthz).
    assert!(up.hits() > before + 3);
    let (ok, fail) = (envoy.stat("cluster.app.health_check.success"), envoy.stat("cluster.app.health_check.failure"));
    eprintln!("deep check: {ok} passed, {fail} failed; app served {} requests including the checks", up.hits());
    assert!(fail >= 2, "one degraded-body failure and one 500 at least: {fail}");
}

#[test]
fn deep_check_sends_the_configured_request() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let up = Upstream::with_handler(
        "app",
        Arc::new(move |_: &str, r: &Request| {
            s.lock().unwrap().push((r.path.clone(), r.header("x-health-check").map(str::to_string)));
            Reply::new(200, r#"{"database":"ok"}"#)
        }),
    );
    let envoy = EnvoyBuilder::new(CONFIG).endpoints("APP", std::slice::from_ref(&up)).endpoint_ports("REDIS", &[1]).start();
    wait_health(&envoy, "app", true);
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for (path, header) in seen {
        assert_eq!((path.as_str(), header.as_deref()), ("/healthz/deep", Some("deep")));
    }
}

/// PING through Envoy's `redis` TCP listener: Some(reply), or None when
/// Envoy refused: the connection was refused, or closed or reset without a
/// reply. A reply that does not come within 5 s is neither: it panics.
fn ping_via_envoy(port: u16) -> Option<String> {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, TimedOut, WouldBlock};
    let refused = |e: std::io::Error| match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | std::io::ErrorKind::BrokenPipe => None,
        WouldBlock | TimedOut => panic!("PING through Envoy: no reply and no close within 5 s ({e})"),
        _ => panic!("PING through Envoy: {e}"),
    };
    let s = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => return refused(e),
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("set a read timeout");
    if let Err(e) = (&s).write_all(b"*1\r\n$4\r\nPING\r\n") {
        return refused(e);
    }
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(0) => None,
        Ok(_) => Some(line.trim_end().to_string()),
        Err(e) => refused(e),
    }
}

#[test]
fn redis_checker_follows_a_real_redis_server() {
    let up = app(Arc::new(AtomicU8::new(OK)));
    let mut redis = RedisServer::start();
    let envoy = EnvoyBuilder::new(CONFIG).endpoints("APP", std::slice::from_ref(&up)).endpoint_ports("REDIS", &[redis.port]).start();
    let via = envoy.port("redis");
    wait_health(&envoy, "redis", true);
    wait_for("PING through Envoy", Duration::from_secs(10), || (ping_via_envoy(via).as_deref() == Some("+PONG")).then_some(()));

    // The server dies: the checker's PING fails.
    redis.stop();
    wait_health(&envoy, "redis", false);
    let flags = envoy.admin("/clusters");
    assert!(flags.contains(&format!("redis::{}::health_flags::/failed_active_hc", redis.addr())), "{flags}");

    // It comes back (empty, on the same port): healthy again.
    redis.restart();
    wait_health(&envoy, "redis", true);
    wait_for("PING through Envoy", Duration::from_secs(10), || (ping_via_envoy(via).as_deref() == Some("+PONG")).then_some(()));

    // Drain it for maintenance without stopping it: the checker sees the key.
    assert_eq!(redis.command(&["SET", "meshpatterns:maintenance", "1"]).unwrap(), "+OK");
    wait_health(&envoy, "redis", false);
    // The workers pick up the main thread's verdict within moments; from
    // then on Envoy refuses connections rather than forward to a drained Redis.
    wait_for("Envoy refusing the drained Redis", Duration::from_secs(10), || ping_via_envoy(via).is_none().then_some(()));
    for _ in 0..20 {
        assert_eq!(ping_via_envoy(via), None, "Envoy forwarded to a drained Redis");
    }
    assert_eq!(redis.command(&["PING"]).unwrap(), "+PONG", "the server itself is up");
    assert_eq!(redis.command(&["DEL", "meshpatterns:maintenance"]).unwrap(), ":1");
    wait_health(&envoy, "redis", true);
    wait_for("PING through Envoy", Duration::from_secs(10), || (ping_via_envoy(via).as_deref() == Some("+PONG")).then_some(()));

    let stat = |k: &str| envoy.stat(&format!("cluster.redis.health_check.{k}"));
    let (passed, failed, network) = (stat("success"), stat("failure"), stat("network_failure"));
    eprintln!("redis checker: {passed} passed, {failed} failed, {network} network failures");
    assert!(network >= 1, "the stopped server");
    assert!(failed >= 2, "the stopped server and the maintenance key");
}

#[test]
fn a_silent_peer_is_a_timeout_not_a_refusal() {
    // Accepted (by the kernel's backlog) but never answered: the probe must
    // not report that as Envoy refusing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = std::panic::catch_unwind(|| ping_via_envoy(port)).expect_err("a silent peer must not read as refused");
    let msg = silent.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("no reply and no close within 5 s"), "{msg}");
    // A closed port is a refusal.
    drop(listener);
    assert_eq!(ping_via_envoy(port), None);
}
