//! Session movement over several fixed upstream layouts: the consistent-hash
//! filter in front of Envoy's Maglev and ring_hash load balancers, measured
//! over `LAYOUTS` layouts so that the figures in
//! filters/consistent-hash/README.md are ranges with their sample size, not
//! one sample of whatever ports the kernel handed out.
//!
//! Maglev and ring_hash place a host by hashing its address. The test gives
//! every host a fixed address to hash instead (Envoy's `envoy.lb` endpoint
//! metadata `hash_key`): layout `L` names replica `i` `10.L.0.(i+1):8080`,
//! as if the replicas had those pod addresses. The real upstreams behind
//! them are the same five servers for every layout, so one Envoy serves every
//! layout at once, as one cluster per layout and policy, picked by the
//! `x-layout` request header (`cluster_header`). A control cluster with
//! layout 0's keys on rotated ports shows that placement follows the keys,
//! not the ports, so every run measures the same layouts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meshpatterns_tests::upstream::{Reply, Request};
use meshpatterns_tests::{wait_for, Client, Envoy, EnvoyBuilder, Upstream};
use serde_norway::Value;

const LAYOUTS: usize = 6;
const REPLICAS: usize = 5;
const SESSIONS: usize = 2000;
/// The replica whose health check fails (the same server in every layout;
/// its hash key differs per layout).
const LEAVING: usize = 2;

/// `10.L.0.(i+1):8080`: the address layout `L` gives replica `i` to hash.
fn hash_key(layout: usize, replica: usize) -> String {
    format!("10.{layout}.0.{}:8080", replica + 1)
}

/// The shipped consistent-hash config with the route reading the cluster
/// from `x-layout`, no access log, and one cluster per (policy, layout):
/// `maglev-L`, `ring-L`, plus `maglev-rotated` (layout 0's keys, each on the
/// next replica's port).
fn config(ports: &[u16]) -> String {
    let rendered = EnvoyBuilder::new("consistent-hash.yaml").endpoint_ports("REPLICAS", ports).render();
    let mut doc: Value = serde_norway::from_str(&rendered).expect("consistent-hash.yaml");
    let hcm = &mut doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm.as_mapping_mut().expect("http_connection_manager").remove("access_log");
    let route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"].as_mapping_mut().expect("route");
    assert!(route.remove("cluster").is_some(), "the shipped route names its cluster");
    route.insert("cluster_header".into(), "x-layout".into());
    let shipped = doc["static_resources"]["clusters"][0].clone();
    assert_eq!(shipped["lb_policy"], "MAGLEV", "the shipped cluster is the Maglev one");
    let cluster = |name: &str, policy: &str, keys: &[(u16, String)]| -> Value {
        let mut c = shipped.clone();
        let m = c.as_mapping_mut().expect("cluster");
        m.insert("name".into(), name.into());
        m.insert("lb_policy".into(), policy.into());
        if policy == "RING_HASH" {
            // Envoy's default ring sizes.
            m.remove("maglev_lb_config");
        }
        let endpoints: Vec<String> = keys
            .iter()
            .map(|(port, key)| {
                format!(
                    "{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}, \
                     metadata: {{filter_metadata: {{envoy.lb: {{hash_key: '{key}'}}}}}}}}"
                )
            })
            .collect();
        let la = format!("{{cluster_name: {name}, endpoints: [{{lb_endpoints: [{}]}}]}}", endpoints.join(", "));
        m.insert("load_assignment".into(), serde_norway::from_str(&la).expect("load_assignment"));
        c
    };
    let mut clusters = Vec::new();
    for layout in 0..LAYOUTS {
        let keys: Vec<(u16, String)> = (0..REPLICAS).map(|i| (ports[i], hash_key(layout, i))).collect();
        clusters.push(cluster(&format!("maglev-{layout}"), "MAGLEV", &keys));
        clusters.push(cluster(&format!("ring-{layout}"), "RING_HASH", &keys));
    }
    let rotated: Vec<(u16, String)> = (0..REPLICAS).map(|i| (ports[(i + 1) % REPLICAS], hash_key(0, i))).collect();
    clusters.push(cluster("maglev-rotated", "MAGLEV", &rotated));
    doc["static_resources"]["clusters"] = Value::Sequence(clusters);
    serde_norway::to_string(&doc).expect("YAML")
}

fn cluster_names() -> Vec<String> {
    let mut names: Vec<String> = (0..LAYOUTS).flat_map(|l| [format!("maglev-{l}"), format!("ring-{l}")]).collect();
    names.push("maglev-rotated".into());
    names
}

/// Which replica serves each session in each cluster, over four keep-alive
/// connections.
fn placements(port: u16, clusters: &[String]) -> BTreeMap<String, Vec<usize>> {
    let jobs: Vec<(usize, usize)> = (0..clusters.len()).flat_map(|c| (0..SESSIONS).map(move |s| (c, s))).collect();
    let mut out: BTreeMap<String, Vec<usize>> = clusters.iter().map(|c| (c.clone(), vec![usize::MAX; SESSIONS])).collect();
    let results: Vec<(usize, usize, usize)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let jobs = &jobs;
                s.spawn(move || {
                    let mut c = Client::new(port);
                    jobs.iter()
                        .skip(w)
                        .step_by(4)
                        .map(|&(cl, session)| {
                            let r = c.get("/", &[("x-user-id", &format!("u{session}")), ("x-layout", &clusters[cl])]);
                            assert_eq!(r.status, 200, "{} u{session}: {}", clusters[cl], r.text());
                            let replica = r.replica().strip_prefix("replica-").and_then(|n| n.parse().ok());
                            (cl, session, replica.unwrap_or_else(|| panic!("no replica in {:?}", r.headers)))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    for (cl, session, replica) in results {
        out.get_mut(&clusters[cl]).unwrap()[session] = replica;
    }
    out
}

fn wait_all(envoy: &Envoy, clusters: &[String], healthy: usize) {
    wait_for(&format!("{healthy} healthy hosts in every cluster"), Duration::from_secs(30), || {
        clusters.iter().all(|c| envoy.hosts(c).iter().filter(|(_, h)| *h).count() == healthy).then_some(())
    });
    // The workers follow the main thread's view asynchronously.
    std::thread::sleep(Duration::from_millis(500));
}

fn min_median_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

#[test]
fn maglev_moves_far_fewer_sessions_than_ring_hash_over_fixed_layouts() {
    let ups: Vec<Upstream> = (0..REPLICAS)
        .map(|i| {
            Upstream::with_handler(
                &format!("replica-{i}"),
                Arc::new(|name: &str, _: &Request| Reply::new(200, "").header("x-replica", name)),
            )
        })
        .collect();
    let ports: Vec<u16> = ups.iter().map(|u| u.port).collect();
    let envoy = EnvoyBuilder::from_template("consistent-hash.yaml over fixed layouts", &config(&ports)).start();
    let clusters = cluster_names();
    wait_all(&envoy, &clusters, REPLICAS);
    let port = envoy.port("ingress");

    let before = placements(port, &clusters);
    // Placement follows the hash keys: layout 0 on rotated ports sends every
    // session to the replica that holds its key there.
    let differ = (0..SESSIONS).filter(|&s| before["maglev-rotated"][s] != (before["maglev-0"][s] + 1) % REPLICAS).count();
    assert_eq!(differ, 0, "{differ} of {SESSIONS} sessions: placement depends on something other than the hash keys");

    ups[LEAVING].set_healthy(false);
    wait_all(&envoy, &clusters, REPLICAS - 1);
    let during = placements(port, &clusters);
    ups[LEAVING].set_healthy(true);
    wait_all(&envoy, &clusters, REPLICAS);
    let after = placements(port, &clusters);

    // Per cluster: % of the sessions on the other replicas that moved while
    // replica LEAVING was out, and % of all sessions not back afterwards.
    let mut moved: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut not_back: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for c in clusters.iter().filter(|c| *c != "maglev-rotated") {
        let (b, d, a) = (&before[c], &during[c], &after[c]);
        assert!(d.iter().all(|r| *r != LEAVING), "{c}: a session still on the unhealthy replica");
        assert!(b.contains(&LEAVING), "{c}: the leaving replica held no session");
        let others: Vec<usize> = (0..SESSIONS).filter(|&s| b[s] != LEAVING).collect();
        let extra = others.iter().filter(|&&s| b[s] != d[s]).count();
        let back = (0..SESSIONS).filter(|&s| a[s] != b[s]).count();
        let policy = if c.starts_with("maglev") { "MAGLEV" } else { "RING_HASH" };
        eprintln!(
            "{c}: replica-{LEAVING} held {} sessions; {extra} of {} others moved ({:.2} %); {back} not back after it recovered",
            SESSIONS - others.len(),
            others.len(),
            100.0 * extra as f64 / others.len() as f64
        );
        moved.entry(policy).or_default().push(100.0 * extra as f64 / others.len() as f64);
        not_back.entry(policy).or_default().push(100.0 * back as f64 / SESSIONS as f64);
    }
    for policy in ["MAGLEV", "RING_HASH"] {
        let (lo, med, hi) = min_median_max(moved[policy].clone());
        let (blo, bmed, bhi) = min_median_max(not_back[policy].clone());
        eprintln!(
            "{policy} over {LAYOUTS} layouts, {REPLICAS} replicas, {SESSIONS} sessions: other sessions moved min {lo:.2} % / median {med:.2} % / max {hi:.2} %; \
             not back after recovery min {blo:.2} % / median {bmed:.2} % / max {bhi:.2} %"
        );
    }
    // The README's advice, as bounds: Maglev moves at most 1 % of the other
    // sessions in every layout and brings every session back; ring_hash
    // moves at least three times that in every layout. (The layouts are
    // fixed, so each run measures the same figures: Envoy 1.40 gave Maglev
    // 0–0.31 %, ring_hash 11.35–15.25 %.)
    let maglev_max = min_median_max(moved["MAGLEV"].clone()).2;
    let ring_min = min_median_max(moved["RING_HASH"].clone()).0;
    assert!(maglev_max <= 1.0, "Maglev moved up to {maglev_max:.2} % of the other sessions: {:?}", moved["MAGLEV"]);
    assert!(not_back["MAGLEV"].iter().all(|p| *p == 0.0), "Maglev did not bring every session back: {:?}", not_back["MAGLEV"]);
    assert!(ring_min >= 3.0 * maglev_max.max(1.0), "ring_hash moved as few as {ring_min:.2} %: {:?}", moved["RING_HASH"]);
    // Both rebuild the same table from the same hosts on recovery.
    assert!(not_back["RING_HASH"].iter().all(|p| *p == 0.0), "ring_hash did not bring every session back: {:?}", not_back["RING_HASH"]);
}
