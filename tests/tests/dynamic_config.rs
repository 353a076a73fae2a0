//! Dynamic configuration: the consistent-hash filter's config arrives by ECDS
//! from a watched file. Under continuous load, a new config applies without a
//! restart and without a failed request; an invalid one is rejected and the
//! old one keeps serving.

use std::path::PathBuf;
use std::time::Duration;

use meshpatterns_core::hash::{hash64, hex16};
use meshpatterns_tests::load::Load;
use meshpatterns_tests::xds::{consistent_hash_dir, consistent_hash_ecds, write_atomically, CONSISTENT_HASH_DEFAULT};
use meshpatterns_tests::{wait_for, Envoy, EnvoyBuilder, Response, Upstream};

const FILE: &str = "consistent_hash.yaml";
const STAT: &str = "extension_config_discovery.http_filter.meshpatterns.consistent_hash";

fn start() -> (Vec<Upstream>, PathBuf, Envoy) {
    let ups = Upstream::start_many("replica", 3);
    let dir = consistent_hash_dir(CONSISTENT_HASH_DEFAULT);
    let envoy = EnvoyBuilder::new("dynamic-config.yaml").var("XDS_DIR", dir.display()).endpoints("REPLICAS", &ups).start();
    envoy.wait_healthy("replicas", 3);
    (ups, dir, envoy)
}

/// What the replica saw in x-session-hash.
fn seen_hash(r: &Response) -> String {
    r.json()["headers"]["x-session-hash"].as_str().unwrap_or("<none>").to_string()
}

/// The labels of the last `n` successful responses.
fn last_labels(load: &Load, n: usize) -> Vec<String> {
    tail(&load.snapshot().sequence, n).to_vec()
}

fn tail(seq: &[String], n: usize) -> &[String] {
    &seq[seq.len().saturating_sub(n)..]
}

#[test]
fn new_filter_config_applies_under_load_and_a_bad_one_is_rejected() {
    let (_ups, dir, envoy) = start();
    let process = envoy.process();
    let uptime_at_start = envoy.uptime();
    let started = std::time::Instant::now();
    let load = Load::with_headers(envoy.port("ingress"), "/", vec![("x-user-id".into(), "alice".into())], seen_hash);
    load.wait_requests(200, Duration::from_secs(60));
    let hashed = hex16(hash64(b"alice"));
    assert_eq!(load.snapshot().ok.keys().collect::<Vec<_>>(), vec![&hashed], "v1 writes XXH64(key)");
    let applied = envoy.stat(&format!("{STAT}.update_success"));

    // v2: write the key itself instead of its hash.
    let v2 =
        r#"{"keySources": [{"header": "x-user-id"}], "hashHeader": "x-session-hash", "fallbackKey": "anonymous", "headerValue": "key"}"#;
    write_atomically(&dir, FILE, &consistent_hash_ecds(v2, 2));
    wait_for("the v2 behaviour", Duration::from_secs(30), || (load.count("alice") > 0).then_some(()));
    assert_eq!(envoy.stat(&format!("{STAT}.update_success")), applied + 1);
    load.wait_requests(200, Duration::from_secs(60));
    assert!(last_labels(&load, 200).iter().all(|l| l == "alice"), "v2 applies to every new request");

    // v3 is invalid (a field the filter does not know): rejected, v2 stays.
    let v3 = r#"{"keySources": [{"header": "x-user-id"}], "hashHeader": "x-session-hash", "headerValue": "key", "hashHeaderName": "x"}"#;
    write_atomically(&dir, FILE, &consistent_hash_ecds(v3, 3));
    wait_for("the v3 rejection", Duration::from_secs(30), || (envoy.stat(&format!("{STAT}.update_rejected")) >= 1).then_some(()));
    load.wait_requests(200, Duration::from_secs(60));
    assert!(last_labels(&load, 200).iter().all(|l| l == "alice"), "v2 keeps serving after v3 was rejected");
    assert!(envoy.log().contains("unknown field `hashHeaderName`"), "the filter says why it refused v3");

    // v4 (valid again) still applies after a rejection.
    write_atomically(&dir, FILE, &consistent_hash_ecds(CONSISTENT_HASH_DEFAULT, 4));
    wait_for("the v4 behaviour", Duration::from_secs(30), || (last_labels(&load, 1) == [hashed.clone()]).then_some(()));
    // The new config's root context ticks too: its batched counters reach
    // Envoy's stats (a root that never set its tick period would count in
    // the VM forever).
    let keyed = "meshpatterns.consistent_hash.keyed";
    let keyed_before = envoy.stat(keyed);
    load.wait_requests(100, Duration::from_secs(60));
    wait_for("v4's counters flushed", Duration::from_secs(10), || (envoy.stat(keyed) >= keyed_before + 100).then_some(()));
    let report = load.stop();

    // No restart: the process we started served throughout, and the Envoy
    // answering the admin port has been up at least as long as the test ran
    // since we first asked (uptime is in whole seconds, hence the 1 s).
    let elapsed = started.elapsed();
    let uptime = envoy.uptime();
    eprintln!(
        "{} requests under load, {} failed; seen by the replicas: {:?}; ECDS updates applied {}, rejected {}; \
         Envoy pid {} up {uptime:?} ({uptime_at_start:?} at the start, {elapsed:?} later)",
        report.total_ok() + report.failures.len() as u64,
        report.failures.len(),
        report.ok,
        envoy.stat(&format!("{STAT}.update_success")),
        envoy.stat(&format!("{STAT}.update_rejected")),
        process.0,
    );
    assert_eq!(envoy.process(), process, "the same Envoy process (pid, start time) throughout");
    assert!(
        uptime + Duration::from_secs(1) >= uptime_at_start + elapsed,
        "Envoy's uptime went from {uptime_at_start:?} to {uptime:?} in {elapsed:?}: it restarted"
    );
    assert!(report.failures.is_empty(), "{:?}", &report.failures[..report.failures.len().min(10)]);
    assert!(tail(&report.sequence, 100).iter().all(|l| *l == hashed), "v4 applies");
    assert_eq!(envoy.stat(&format!("{STAT}.update_rejected")), 1);
    assert_eq!(envoy.stat(&format!("{STAT}.update_success")), applied + 2, "v2 and v4 applied, v3 not");
    assert_eq!(envoy.stat(&format!("{STAT}.config_fail")), 1, "the filter refused v3's config");
}
