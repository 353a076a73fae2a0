//! Replicated stateless service with readiness: three replicas behind Envoy
//! with active health checks on the readiness endpoint, outlier detection and
//! retries. A replica turning unready leaves rotation with zero failed client
//! requests, and rejoins when ready again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshpatterns_tests::load::Load;
use meshpatterns_tests::upstream::{echo, Reply, Request};
use meshpatterns_tests::{wait_for, Envoy, EnvoyBuilder, Upstream};

const CONFIG: &str = "replicated.yaml";
/// From envoy/replicated.yaml: health check interval 1 s, timeout 0.5 s,
/// unhealthy and healthy thresholds 2 (a 503 from the readiness endpoint
/// counts at once; the unhealthy threshold applies to timeouts).
const HC_INTERVAL: Duration = Duration::from_secs(1);
const HC_THRESHOLD: u32 = 2;
/// Slack on every timing bound: the main thread's timers and our polling of
/// `/clusters` (every 50 ms) run late on a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(1);
/// Requests that may still reach a replica after `/clusters` shows it out of
/// rotation: the main thread posts the new host set to each worker, which
/// applies it on its next event-loop pass, so only requests already being
/// handled by then can slip through (a count of events, not of time).
const MAX_LEAKS: u64 = 10;

/// A replica whose readiness (`/healthz`) and real answers can both be
/// switched off: an unready replica also answers 503 to normal requests, as a
/// replica that lost its database would.
struct Replica {
    up: Upstream,
    broken: Arc<AtomicBool>,
}

impl Replica {
    fn start(name: &str) -> Replica {
        let broken = Arc::new(AtomicBool::new(false));
        let b = broken.clone();
        let up = Upstream::with_handler(
            name,
            Arc::new(
                move |name: &str, r: &Request| {
                    if b.load(Ordering::SeqCst) {
                        Reply::new(503, "not ready\n").header("x-replica", name)
                    } else {
                        echo(name, r)
                    }
                },
            ),
        );
        Replica { up, broken }
    }
    fn set_ready(&self, ready: bool) {
        self.broken.store(!ready, Ordering::SeqCst);
        self.up.set_healthy(ready);
    }
}

fn healthy(envoy: &Envoy, r: &Replica) -> bool {
    envoy.hosts("replicas").iter().any(|(addr, h)| *addr == r.up.addr() && *h)
}

/// Wait until `up` receives no request during 50 requests of `load`; the
/// leaks: how many requests reached it after `hits_when_out` (its count when
/// `/clusters` first showed it out of rotation), and how many of the
/// client's requests failed meanwhile.
fn quiesce(load: &Load, up: &Upstream, hits_when_out: u64, envoy: &Envoy) -> (u64, usize, Vec<String>) {
    let failures_before = load.snapshot().failures.len();
    // Every host's health flags whenever a request reached `up`, to explain a leak.
    let mut seen = Vec::new();
    wait_for(&format!("no more traffic to {}", up.name()), Duration::from_secs(20), || {
        let before = up.hits();
        load.wait_requests(50, Duration::from_secs(60));
        let after = up.hits();
        if after != before {
            let flags: Vec<String> = envoy.hosts("replicas").iter().map(|(a, _)| format!("{a}{}", health_flags(envoy, a))).collect();
            seen.push(format!("+{} requests: {}", after - before, flags.join(" ")));
        }
        (after == before).then_some(())
    });
    (up.hits() - hits_when_out, load.snapshot().failures.len() - failures_before, seen)
}

/// The `health_flags` of one host in `/clusters`, e.g. `/failed_active_hc/failed_outlier_check`.
fn health_flags(envoy: &Envoy, addr: &str) -> String {
    let prefix = format!("replicas::{addr}::health_flags::");
    envoy.admin("/clusters").lines().find_map(|l| l.strip_prefix(&prefix).map(str::to_string)).unwrap_or_default()
}

#[test]
fn unready_replica_leaves_rotation_without_failing_a_request_and_rejoins() {
    let replicas: Vec<Replica> = (0..3).map(|i| Replica::start(&format!("replica-{i}"))).collect();
    let ups: Vec<Upstream> = replicas.iter().map(|r| r.up.clone()).collect();
    let envoy = EnvoyBuilder::new(CONFIG).endpoints("REPLICAS", &ups).start();
    envoy.wait_healthy("replicas", 3);

    let load = Load::start(envoy.port("ingress"), "/work", |r| r.replica().to_string());
    load.wait_requests(300, Duration::from_secs(60));
    for r in &replicas {
        assert!(load.count(r.up.name()) > 0, "{} gets traffic while ready: {:?}", r.up.name(), load.snapshot().ok);
    }

    // replica-1 turns unready the way a replica that lost its database does:
    // real requests start failing with 503 at once, and its readiness
    // endpoint reports it a moment later.
    let leaving = &replicas[1];
    let t0 = Instant::now();
    leaving.broken.store(true, Ordering::SeqCst);
    let bound = HC_INTERVAL * HC_THRESHOLD + Duration::from_secs(15);
    // Passive detection: its third consecutive 503 ejects it (each 503 was
    // retried on another replica).
    wait_for("replica-1 ejected by outlier detection", bound, || {
        (envoy.stat("cluster.replicas.outlier_detection.ejections_enforced_total") >= 1).then_some(())
    });
    let left_after = t0.elapsed();
    leaving.up.set_healthy(false);
    // Active detection: the readiness checks fail too, which keeps it out
    // after the ejection time until it is ready again. (A readiness check
    // that still passed between the ejection and this point un-ejects it,
    // Envoy's default, and three more 503s eject it again: those are
    // retried like the first three, and counted below as 503s.)
    wait_for("replica-1 failing its readiness checks", bound, || {
        health_flags(&envoy, &leaving.up.addr()).contains("failed_active_hc").then_some(())
    });
    let hits_when_out = leaving.up.hits();
    assert!(!healthy(&envoy, leaving));
    // The workers' load balancers follow the main thread within moments;
    // from then on no client request reaches the replica.
    let (leaks, leak_failures, leak_flags) = quiesce(&load, &leaving.up, hits_when_out, &envoy);
    let hits_out = leaving.up.hits();
    let answered_out = load.count(leaving.up.name());
    load.wait_requests(300, Duration::from_secs(60));
    assert_eq!(leaving.up.hits(), hits_out, "an out-of-rotation replica received requests");
    assert_eq!(load.count(leaving.up.name()), answered_out);

    // Ready again: health checks bring it back.
    let t1 = Instant::now();
    leaving.set_ready(true);
    wait_for("replica-1 back in rotation", bound, || healthy(&envoy, leaving).then_some(()));
    let back_after = t1.elapsed();
    // Ejected by its third 503 (outlier detection acts per response, not per
    // interval); back after two passing readiness checks.
    assert!(left_after <= HC_INTERVAL + MARGIN, "ejected {left_after:?} after it started failing");
    assert!(back_after <= HC_INTERVAL * HC_THRESHOLD + MARGIN, "back in rotation {back_after:?} after it was ready");
    wait_for("client traffic on replica-1 again", Duration::from_secs(20), || (load.count(leaving.up.name()) > answered_out).then_some(()));
    load.wait_requests(100, Duration::from_secs(60));
    let report = load.stop();

    let stat = |k: &str| envoy.stat(k);
    eprintln!(
        "{} requests, {} failed, by replica {:?}; replica-1 out of rotation {:?} after turning unready, back {:?} after turning ready \
         (health check every {HC_INTERVAL:?}, thresholds {HC_THRESHOLD}); {leaks} requests reached it after it failed its readiness check \
         ({leak_failures} client requests failed meanwhile); 503s from it: {}, successful retries: {}; \
         outlier ejections: {}; health check failures: {}",
        report.total_ok() + report.failures.len() as u64,
        report.failures.len(),
        report.ok,
        left_after,
        back_after,
        leaving.up.hits() - report.ok.get(leaving.up.name()).copied().unwrap_or(0),
        stat("cluster.replicas.upstream_rq_retry_success"),
        stat("cluster.replicas.outlier_detection.ejections_enforced_total"),
        stat("cluster.replicas.health_check.failure"),
    );
    // Not bounded here: in 2 of about 30 runs 38-40 requests still reached
    // it after /clusters showed failed_active_hc (with a second outlier
    // ejection: a readiness check that passed just before it turned 503
    // un-ejects it); every one was a 503 retried on another replica, which
    // the next assertion checks. The readiness-only test bounds the leaks.
    if leaks > 0 {
        eprintln!("requests reached replica-1 after it failed its readiness check: {leak_flags:?}");
    }
    assert_eq!(leak_failures, 0, "client requests failed while replica-1 was leaving");
    assert!(
        report.failures.is_empty(),
        "{} client requests failed: {:?}",
        report.failures.len(),
        &report.failures[..report.failures.len().min(10)]
    );
    // Every 503 the unready replica gave was retried on another replica.
    let answered_503 = leaving.up.hits() - report.ok.get(leaving.up.name()).copied().unwrap_or(0);
    // (Retries may also have rescued the odd reset of a pooled connection.)
    assert!(answered_503 >= 3, "the unready replica answered 3 requests with 503 before it was ejected");
    assert!(stat("cluster.replicas.upstream_rq_retry_success") >= answered_503, "every 503 was retried successfully");
    assert!(stat("cluster.replicas.health_check.failure") >= 1, "the readiness check failed too");
}

#[test]
fn refused_connections_are_retried_on_another_replica() {
    // A replica that is gone (its port closed) before the health check notices:
    // connect-failure retries keep every request succeeding.
    let ups = Upstream::start_many("replica", 3);
    let envoy = EnvoyBuilder::new(CONFIG).endpoints("REPLICAS", &ups).start();
    envoy.wait_healthy("replicas", 3);
    let load = Load::start(envoy.port("ingress"), "/", |r| r.replica().to_string());
    load.wait_requests(100, Duration::from_secs(60));
    ups[2].stop();
    wait_for("replica-2 out of rotation", Duration::from_secs(20), || {
        envoy.hosts("replicas").iter().any(|(a, h)| *a == ups[2].addr() && !h).then_some(())
    });
    load.wait_requests(200, Duration::from_secs(60));
    let report = load.stop();
    eprintln!("{:?}, retries {}", report.ok, envoy.stat("cluster.replicas.upstream_rq_retry"));
    assert!(report.failures.is_empty(), "{:?}", &report.failures[..report.failures.len().min(10)]);
    assert!(report.ok.contains_key("replica-0") && report.ok.contains_key("replica-1"));
}

#[test]
fn failing_readiness_alone_takes_a_replica_out_of_rotation() {
    // The replica still answers real requests, but says it is not ready:
    // only the active health check can notice.
    let ups = Upstream::start_many("replica", 3);
    let envoy = EnvoyBuilder::new(CONFIG).endpoints("REPLICAS", &ups).start();
    envoy.wait_healthy("replicas", 3);
    let load = Load::start(envoy.port("ingress"), "/", |r| r.replica().to_string());
    load.wait_requests(100, Duration::from_secs(60));
    let t0 = Instant::now();
    ups[0].set_healthy(false);
    wait_for("replica-0 out of rotation", HC_INTERVAL * HC_THRESHOLD + Duration::from_secs(15), || {
        envoy.hosts("replicas").iter().any(|(a, h)| *a == ups[0].addr() && !h).then_some(())
    });
    let left_after = t0.elapsed();
    let (leaks, leak_failures, leak_flags) = quiesce(&load, &ups[0], ups[0].hits(), &envoy);
    let served = ups[0].hits();
    load.wait_requests(200, Duration::from_secs(60));
    assert_eq!(ups[0].hits(), served, "traffic reached a replica that is not ready");
    let t1 = Instant::now();
    ups[0].set_healthy(true);
    envoy.wait_healthy("replicas", 3);
    let back_after = t1.elapsed();
    // A 503 from /healthz counts at once: out at the next check.
    assert!(left_after <= HC_INTERVAL + MARGIN, "out of rotation {left_after:?} after /healthz turned 503");
    assert!(back_after <= HC_INTERVAL * HC_THRESHOLD + MARGIN, "back in rotation {back_after:?} after /healthz turned 200");
    wait_for("traffic on replica-0 again", Duration::from_secs(20), || (ups[0].hits() > served).then_some(()));
    let report = load.stop();
    eprintln!(
        "readiness only: out of rotation {left_after:?} after /healthz turned 503, back {back_after:?} after it turned 200 \
         (health check every {HC_INTERVAL:?}: a 503 counts at once, {HC_THRESHOLD} passes to return); \
         {leaks} requests reached it after /clusters showed it out ({leak_failures} failed meanwhile); {:?}, {} failed",
        report.ok,
        report.failures.len()
    );
    assert!(leaks <= MAX_LEAKS, "{leaks} requests reached replica-0 after /clusters showed it out of rotation: {leak_flags:?}");
    assert!(report.failures.is_empty(), "{:?}", &report.failures[..report.failures.len().min(10)]);
    assert_eq!(envoy.stat("cluster.replicas.outlier_detection.ejections_enforced_total"), 0, "no 5xx, no ejection");
}
