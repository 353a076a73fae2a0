//! `make demo`: a local mesh on loopback, one Envoy per pattern in front of
//! real upstream replicas, with a self-check and the commands to try.
//!
//! Each pattern adds a [`Section`]: it starts what it needs, checks that it
//! works, and prints what a user can try by hand. The processes stop when the
//! demo returns (Ctrl-C also stops Envoy, which is in the same process group).

use std::time::Duration;

use crate::{Client, Envoy, EnvoyBuilder, Upstream};

/// One running pattern in the demo.
pub struct Section {
    pub title: &'static str,
    /// Lines to print: what runs and the commands to try.
    pub lines: Vec<String>,
    /// Keep processes alive while the section is shown.
    _envoy: Envoy,
    _upstreams: Vec<Upstream>,
    /// Other servers the section runs (redis-server shards), stopped on drop.
    _servers: Vec<crate::redis::RedisServer>,
    /// Anything else to keep running (more Envoys, the rate limit service).
    _keep: Vec<Box<dyn std::any::Any>>,
}

/// Session-tracked service: consistent-hash in front of three replicas.
pub fn consistent_hash() -> Result<Section, String> {
    let ups = Upstream::start_many("replica", 3);
    let envoy = EnvoyBuilder::new("consistent-hash.yaml").endpoints("REPLICAS", &ups).try_start()?;
    envoy.wait_healthy("replicas", 3);
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let mut lines = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let replicas: std::collections::BTreeSet<String> =
            (0..10).map(|_| c.get("/", &[("x-user-id", user)]).replica().to_string()).collect();
        if replicas.len() != 1 {
            return Err(format!("user {user} was served by {replicas:?}"));
        }
        lines.push(format!("self-check: x-user-id {user:<6} -> {} (10 of 10 requests)", replicas.iter().next().unwrap_or(&String::new())));
    }
    let first = c.get("/", &[]);
    let cookie = first.header("set-cookie").ok_or("no session cookie issued")?.split(';').next().unwrap_or("").to_string();
    lines.push(format!("self-check: no key -> issued {cookie}, served by {}", first.replica()));
    lines.push(String::new());
    lines.push("try:".into());
    lines.push(format!("  curl -s -H 'x-user-id: alice' http://127.0.0.1:{port}/ | head -c 300; echo   # always the same replica"));
    lines.push(format!(
        "  for u in a b c d e f; do curl -s -o /dev/null -D - -H \"x-user-id: $u\" http://127.0.0.1:{port}/ | grep -i x-replica; done"
    ));
    lines.push(format!("  curl -si http://127.0.0.1:{port}/ | grep -i -E 'set-cookie|x-replica'   # a new session cookie"));
    lines.push(format!("  curl -s -H 'x-user-id: alice' -H 'x-session-hash: forged' http://127.0.0.1:{port}/ | grep -o '\"x-session-hash\":\"[^\"]*'   # overwritten"));
    lines.push(format!("  curl -s http://127.0.0.1:{}/stats | grep consistent_hash", envoy.admin_port));
    Ok(Section {
        title: "Session-tracked service (consistent-hash filter, Envoy maglev)",
        lines,
        _envoy: envoy,
        _upstreams: ups,
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

/// Ambassador for 10 % experiments: experiment-splitter routing users of
/// /checkout to a control and a treatment upstream with `cluster_header`.
pub fn experiment_splitter() -> Result<Section, String> {
    let control = Upstream::start("control");
    let treatment = Upstream::start("treatment");
    let envoy = EnvoyBuilder::new("experiment-splitter.yaml")
        .endpoints("CONTROL", std::slice::from_ref(&control))
        .endpoints("TREATMENT", std::slice::from_ref(&treatment))
        .try_start()?;
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let mut lines = Vec::new();
    let (mut in_treatment, mut first_treatment, mut first_control) = (0, None, None);
    for i in 0..1000 {
        let user = format!("user-{i}");
        let arms: std::collections::BTreeSet<String> =
            (0..3).map(|_| c.get("/checkout", &[("x-user-id", &user)]).replica().to_string()).collect();
        if arms.len() != 1 {
            return Err(format!("{user} was served by {arms:?}"));
        }
        if arms.contains("treatment") {
            in_treatment += 1;
            first_treatment.get_or_insert(user);
        } else {
            first_control.get_or_insert(user);
        }
    }
    if !(60..=140).contains(&in_treatment) {
        return Err(format!("{in_treatment} of 1000 users in treatment, expected about 100"));
    }
    let t_user = first_treatment.unwrap_or_default();
    let c_user = first_control.unwrap_or_default();
    lines.push(format!(
        "self-check: {in_treatment} of 1000 users on /checkout in treatment (target 10 %), each on one arm for 3 of 3 requests"
    ));
    let first = c.get("/checkout", &[]);
    let cookie = first.header("set-cookie").ok_or("no assignment cookie issued")?.split(';').next().unwrap_or("").to_string();
    lines.push(format!("self-check: no user id -> issued {cookie}, served by {}", first.replica()));
    lines.push(String::new());
    lines.push("try:".into());
    lines.push(format!(
        "  curl -si -H 'x-user-id: {t_user}' http://127.0.0.1:{port}/checkout | grep -i -E 'x-replica|x-experiment'   # treatment"
    ));
    lines.push(format!("  curl -si -H 'x-user-id: {t_user}' http://127.0.0.1:{port}/home | grep -i -E 'x-replica|x-experiment'   # outside the targeting: control"));
    lines.push(format!(
        "  for u in 1 2 3 4 5 6 7 8 9 10 11 12; do curl -s -o /dev/null -D - -H \"x-user-id: u$u\" http://127.0.0.1:{port}/checkout | grep -i x-replica; done"
    ));
    lines.push(format!("  curl -si http://127.0.0.1:{port}/checkout | grep -i -E 'set-cookie|x-replica'   # assignment cookie"));
    lines.push(format!(
        "  curl -si -H 'x-user-id: {c_user}' -H 'x-experiment-override: treatment' -H 'x-experiment-secret: example-secret-replace-me-0123456789' http://127.0.0.1:{port}/checkout | grep -i x-replica   # QA override: control user sees treatment"
    ));
    lines.push(format!("  curl -s http://127.0.0.1:{}/stats/prometheus | grep experiment_splitter", envoy.admin_port));
    Ok(Section {
        title: "Ambassador: 10 % experiments (experiment-splitter filter, Envoy cluster_header)",
        lines,
        _envoy: envoy,
        _upstreams: vec![control, treatment],
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

/// The pipeline: four patterns as stages of one module, one pass per request.
pub fn pipeline() -> Result<Section, String> {
    let control = Upstream::start_many("control", 2);
    let treatment = Upstream::start_many("treatment", 2);
    let envoy = EnvoyBuilder::new("meshpatterns.yaml").endpoints("CONTROL", &control).endpoints("TREATMENT", &treatment).try_start()?;
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let mut lines = Vec::new();
    let r = c.get("/checkout/cart", &[("x-user-id", "alice")]);
    if r.status != 200 {
        return Err(format!("alice got {}", r.status));
    }
    let seen = r.json();
    let arm = seen["headers"]["x-experiment-arm"].as_str().unwrap_or("").to_string();
    let hash = seen["headers"]["x-session-hash"].as_str().unwrap_or("").to_string();
    let limit = r.header("x-ratelimit-remaining").unwrap_or("").to_string();
    if arm.is_empty() || hash.is_empty() || limit.is_empty() {
        return Err(format!("a stage did not act: arm {arm:?}, hash {hash:?}, x-ratelimit-remaining {limit:?}"));
    }
    lines.push(format!(
        "self-check: alice on /checkout/cart -> rateLimit: allowed ({limit} left); experimentSplit: {arm}; consistentHash: {hash}; served by {}",
        r.replica()
    ));
    let mut limited = 0;
    for _ in 0..15 {
        if c.get("/checkout/cart", &[("x-user-id", "bob")]).status == 429 {
            limited += 1;
        }
    }
    if limited == 0 {
        return Err("15 quick requests from bob were never limited".into());
    }
    lines.push(format!("self-check: bob sent 15 at once -> {limited} answered 429 by stage 1; stages 2-4 did not run for them, the metrics stage counted them"));
    lines.push(String::new());
    lines.push("try:".into());
    lines.push(format!(
        "  curl -si -H 'x-user-id: alice' http://127.0.0.1:{port}/checkout/cart | grep -i -E '^x-replica|ratelimit|x-experiment'   # every stage's answer"
    ));
    lines.push(format!("  curl -s -H 'x-user-id: alice' http://127.0.0.1:{port}/checkout/cart | grep -o '\"x-[a-z-]*\":\"[^\"]*'   # what the upstream received"));
    lines.push(format!("  for i in $(seq 15); do curl -s -o /dev/null -w '%{{http_code}} ' -H 'x-user-id: bob' http://127.0.0.1:{port}/checkout/cart; done; echo"));
    lines.push(format!(
        "  curl -s http://127.0.0.1:{}/stats/prometheus | grep -E 'meshpatterns_http_requests_total|rate_limiter'",
        envoy.admin_port
    ));
    lines.push("  (each request's access-log line, printed by this demo's Envoy, carries every stage's decision)".into());
    let mut ups = control;
    ups.extend(treatment);
    Ok(Section {
        title: "The pipeline: rate limit -> experiment split -> consistent hash -> metrics in one module (meshpatterns.wasm)",
        lines,
        _envoy: envoy,
        _upstreams: ups,
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

/// Sidecar adding HTTPS (and mTLS) to a legacy plain-HTTP app.
pub fn tls_sidecar() -> Result<Section, String> {
    use crate::tls::{Pki, Tls, APP_HOST};
    let pki = Pki::generate("demo-certs");
    let app = Upstream::start("legacy-app");
    let envoy = EnvoyBuilder::new("tls-sidecar.yaml")
        .var("CERT_DIR", pki.dir.display())
        .endpoints("APP", std::slice::from_ref(&app))
        .try_start()?;
    let (https, mtls) = (envoy.port("https"), envoy.port("mtls"));
    let mut lines = Vec::new();
    for (flag, want) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let p = Tls::new(https).ca(&pki.ca_cert()).version(flag).probe();
        if !p.established || p.protocol != want {
            return Err(format!("{want} handshake: {}", p.output));
        }
        lines.push(format!("self-check: {want} handshake ok, certificate {}", p.subject));
    }
    let old = Tls::new(https).ca(&pki.ca_cert()).version("-tls1_1").probe();
    if old.established {
        return Err("TLS 1.1 was accepted".into());
    }
    lines.push("self-check: TLS 1.1 refused (protocol_version alert)".into());
    let ok = Tls::new(mtls).ca(&pki.ca_cert()).client_cert(pki.client()).get("/");
    let refused = Tls::new(mtls).ca(&pki.ca_cert()).client_cert(pki.rogue_client()).get("/");
    if ok.status != 200 || refused.status != 0 {
        return Err(format!("mTLS: trusted client got {}, rogue client got {}", ok.status, refused.status));
    }
    lines.push("self-check: mTLS listener: trusted client cert -> 200, rogue-CA client cert -> handshake refused".into());
    let d = pki.dir.display();
    let resolve = |p: u16| format!("--resolve {APP_HOST}:{p}:127.0.0.1 --cacert {d}/ca.crt");
    lines.push(String::new());
    lines.push(format!("certificates: {d} (CA, server, client and a rogue CA)"));
    lines.push("try:".into());
    lines.push(format!("  curl -s {} https://{APP_HOST}:{https}/hello | head -c 200; echo", resolve(https)));
    lines
        .push(format!("  curl -sv {} --tls-max 1.2 https://{APP_HOST}:{https}/ -o /dev/null 2>&1 | grep 'SSL connection'", resolve(https)));
    lines.push(format!("  openssl s_client -brief -connect 127.0.0.1:{https} -tls1_1 -cipher DEFAULT@SECLEVEL=0 </dev/null   # refused"));
    lines.push(format!("  curl -s http://127.0.0.1:{https}/ ; echo \"exit $?\"   # plain HTTP refused"));
    lines.push(format!(
        "  curl -s {} --cert {d}/client.crt --key {d}/client.key https://{APP_HOST}:{mtls}/ | grep -o '\"x-forwarded-client-cert\":\"[^\"]*'",
        resolve(mtls)
    ));
    lines.push(format!(
        "  curl -s {} --cert {d}/rogue-client.crt --key {d}/rogue-client.key https://{APP_HOST}:{mtls}/; echo \"exit $?\"   # refused",
        resolve(mtls)
    ));
    Ok(Section {
        title: "Sidecar: HTTPS and mTLS for a legacy plain-HTTP app (Envoy TLS)",
        lines,
        _envoy: envoy,
        _upstreams: vec![app],
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

/// Caching layer: Envoy's HTTP cache filter in front of a slow origin.
pub fn cache() -> Result<Section, String> {
    let origin = crate::origin::slow_origin(Duration::from_millis(300));
    let envoy = EnvoyBuilder::new("cache.yaml").endpoints("ORIGIN", std::slice::from_ref(&origin)).try_start()?;
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let t = std::time::Instant::now();
    let miss = c.get("/static/logo", &[]);
    let miss_time = t.elapsed();
    let t = std::time::Instant::now();
    let hit = c.get("/static/logo", &[]);
    let hit_time = t.elapsed();
    if miss.status != 200 || hit.header("age").is_none() || hit.body != miss.body || origin.hits() != 1 {
        return Err(format!("repeat not served from the cache: {:?}, origin hits {}", hit.headers, origin.hits()));
    }
    lines_for_cache(port, envoy.admin_port, miss_time, hit_time).map(|lines| Section {
        title: "Caching layer (Envoy HTTP cache filter in front of a 300 ms origin)",
        lines,
        _envoy: envoy,
        _upstreams: vec![origin],
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

fn lines_for_cache(port: u16, admin: u16, miss: Duration, hit: Duration) -> Result<Vec<String>, String> {
    Ok(vec![
        format!("self-check: GET /static/logo: first {:.1} ms from the origin, repeat {:.2} ms from the cache with an Age header; origin reached once", miss.as_secs_f64() * 1e3, hit.as_secs_f64() * 1e3),
        "origin paths: /static/* max-age=300, /short/* max-age=3, /nostore/* no-store, others no-cache".into(),
        String::new(),
        "try:".into(),
        format!("  for i in 1 2 3; do curl -s -o /dev/null -D - -w 'time %{{time_total}}s\\n' http://127.0.0.1:{port}/static/a | grep -i -E '^(age|time)'; done"),
        format!("  for i in 1 2 3; do curl -s http://127.0.0.1:{port}/nostore/a; done   # three origin serials"),
        format!("  curl -s -H 'cache-control: no-cache' http://127.0.0.1:{port}/static/a   # forces a trip to the origin"),
        format!("  wrk -t1 -c8 -d5s http://127.0.0.1:{port}/static/a ; wrk -t1 -c8 -d5s http://127.0.0.1:{port}/nostore/a   # cached vs not"),
        format!("  curl -s http://127.0.0.1:{admin}/stats | grep -E 'cluster.origin.upstream_rq_total|ingress.downstream_rq_total'"),
    ])
}

/// Replicated service with readiness: three replicas whose readiness can be
/// switched from the shell; Envoy health checks, outlier detection, retries.
pub fn replicated() -> Result<Section, String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // Each replica serves its readiness at /ready (200 or 503) and flips it on
    // POST /toggle-ready, so a user can take one out with curl.
    let replicas: Vec<Upstream> = (0..3)
        .map(|i| {
            let ready = Arc::new(AtomicBool::new(true));
            Upstream::with_handler(
                &format!("replica-{i}"),
                Arc::new(move |name: &str, r: &crate::upstream::Request| match r.path.as_str() {
                    "/ready" if ready.load(Ordering::SeqCst) => crate::upstream::Reply::new(200, "ready\n"),
                    "/ready" => crate::upstream::Reply::new(503, "not ready\n"),
                    "/toggle-ready" => {
                        let now = !ready.fetch_xor(true, Ordering::SeqCst);
                        crate::upstream::Reply::new(200, format!("{name} ready={now}\n"))
                    }
                    _ => crate::upstream::echo(name, r),
                }),
            )
        })
        .collect();
    let envoy = EnvoyBuilder::new("replicated.yaml")
        .endpoints("REPLICAS", &replicas)
        .replace("http_health_check: {path: /healthz}", "http_health_check: {path: /ready}")
        .try_start()?;
    envoy.wait_healthy("replicas", 3);
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let seen: std::collections::BTreeSet<String> = (0..30).map(|_| c.get("/", &[]).replica().to_string()).collect();
    if seen.len() != 3 {
        return Err(format!("30 requests reached only {seen:?}"));
    }
    let p1 = replicas.get(1).map(|u| u.port).unwrap_or(0);
    let lines = vec![
        format!("self-check: 30 requests spread over {seen:?}"),
        format!("replicas: {}", replicas.iter().map(|u| format!("{} on :{}", u.name(), u.port)).collect::<Vec<_>>().join(", ")),
        String::new(),
        "try:".into(),
        format!("  for i in $(seq 9); do curl -s -o /dev/null -D - http://127.0.0.1:{port}/ | grep -i x-replica; done"),
        format!("  curl -s -X POST http://127.0.0.1:{p1}/toggle-ready   # replica-1 unready: out of rotation within ~1 s"),
        format!("  curl -s http://127.0.0.1:{}/clusters | grep health_flags", envoy.admin_port),
        format!("  curl -s -X POST http://127.0.0.1:{p1}/toggle-ready   # ready again: back after 2 passing checks"),
        format!(
            "  curl -s http://127.0.0.1:{}/stats | grep -E 'replicas.(health_check|outlier_detection|upstream_rq_retry)'",
            envoy.admin_port
        ),
    ];
    Ok(Section {
        title: "Replicated service with readiness (health checks, outlier detection, retries)",
        lines,
        _envoy: envoy,
        _upstreams: replicas,
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

/// Sharded service: shard-router in front of three shards of two replicas each.
pub fn shard_router() -> Result<Section, String> {
    let mut ups = Vec::new();
    let mut b = EnvoyBuilder::new("shard-router.yaml");
    for (shard, var) in [("shard-a", "SHARD_A"), ("shard-b", "SHARD_B"), ("shard-c", "SHARD_C")] {
        let replicas = Upstream::start_many(shard, 2);
        b = b.endpoints(var, &replicas);
        ups.extend(replicas);
    }
    let envoy = b.try_start()?;
    for cluster in ["shard_a", "shard_b", "shard_c"] {
        envoy.wait_healthy(cluster, 2);
    }
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let mut lines = Vec::new();
    for key in ["alice", "bob", "carol", "dave"] {
        let shards: std::collections::BTreeSet<String> =
            (0..10).map(|_| c.get(&format!("/kv/{key}"), &[]).header("x-shard").unwrap_or("").to_string()).collect();
        if shards.len() != 1 || shards.contains("") {
            return Err(format!("key {key} was served by {shards:?}"));
        }
        lines.push(format!("self-check: /kv/{key:<6} -> {} (10 of 10 requests)", shards.iter().next().unwrap_or(&String::new())));
    }
    let forged = c.get("/kv/alice", &[("x-shard-cluster", "shard_c")]);
    let honest = c.get("/kv/alice", &[]);
    if forged.header("x-shard") != honest.header("x-shard") {
        return Err("a client-sent x-shard-cluster changed the shard".into());
    }
    lines.push(format!("self-check: client-sent x-shard-cluster ignored (alice stays on {})", honest.header("x-shard").unwrap_or("")));
    let missing = c.get("/items", &[]);
    if missing.status != 400 {
        return Err(format!("no key: expected 400, got {}", missing.status));
    }
    lines.push(format!("self-check: no key -> 400 {}", missing.text()));
    lines.push(String::new());
    lines.push("try:".into());
    lines.push(format!("  for k in alice bob carol dave erin frank; do curl -s -o /dev/null -D - http://127.0.0.1:{port}/kv/$k | grep -i -E '^x-(shard|replica)'; done"));
    lines.push(format!(
        "  curl -s -H 'x-shard-key: alice' http://127.0.0.1:{port}/any/path | grep -o '\"x-shard-cluster\":\"[^\"]*'   # key from a header"
    ));
    lines.push(format!(
        "  curl -s -H 'x-shard-cluster: shard_c' http://127.0.0.1:{port}/kv/alice | grep -o '\"x-shard-cluster\":\"[^\"]*'   # overwritten"
    ));
    lines.push(format!("  curl -si http://127.0.0.1:{port}/kv/bad*key   # 400 JSON naming the problem"));
    lines.push(format!("  curl -s http://127.0.0.1:{}/stats | grep shard_router", envoy.admin_port));
    Ok(Section {
        title: "Sharded service (shard-router filter, Envoy cluster_header)",
        lines,
        _envoy: envoy,
        _upstreams: ups,
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

/// Rate limiting: the rate-limiter filter in front of one app server.
pub fn rate_limiter() -> Result<Section, String> {
    let up = Upstream::start("app");
    let envoy = EnvoyBuilder::new("rate-limiter.yaml").endpoints("APP", std::slice::from_ref(&up)).try_start()?;
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let mut lines = Vec::new();
    // per-client policy: bursts of 10 at 5/s; requests in a quick loop meet a 429.
    let mut ok = 0;
    let limited = loop {
        let r = c.get("/", &[]);
        match r.status {
            200 if ok < 100 => ok += 1,
            _ => break r,
        }
    };
    if ok < 10 || limited.status != 429 {
        return Err(format!("per-client burst: {ok} allowed, then {} {}", limited.status, limited.text()));
    }
    let retry = limited.header("retry-after").unwrap_or("?").to_string();
    lines.push(format!("self-check: quick requests -> {ok} allowed (burst 10 + refill), then 429 with Retry-After: {retry}"));
    let keyed = c.get("/api/orders", &[("x-api-key", "demo-key")]);
    if keyed.status != 200 || keyed.header("x-ratelimit-limit") != Some("600") {
        return Err(format!("api-key policy: {} {:?}", keyed.status, keyed.headers));
    }
    lines.push(format!(
        "self-check: /api/ with x-api-key -> its own budget: X-RateLimit-Limit 600, Remaining {}",
        keyed.header("x-ratelimit-remaining").unwrap_or("?")
    ));
    lines.push(String::new());
    lines.push("try:".into());
    lines.push(format!(
        "  for i in $(seq 15); do curl -s -o /dev/null -w '%{{http_code}} ' http://127.0.0.1:{port}/; done; echo   # 10 x 200, then 429s"
    ));
    lines.push(format!("  curl -si http://127.0.0.1:{port}/ | grep -i -E '^(HTTP|x-ratelimit|ratelimit|retry-after)'"));
    lines.push(format!("  curl -si -H 'x-api-key: k1' http://127.0.0.1:{port}/api/x | grep -i ratelimit   # per API key, 600/min"));
    lines.push(format!(
        "  for i in $(seq 12); do curl -s -o /dev/null -w '%{{http_code}} ' -H \"x-forwarded-for: 203.0.113.$i\" http://127.0.0.1:{port}/; done; echo   # spoofing XFF does not help"
    ));
    lines.push(format!("  curl -s http://127.0.0.1:{}/stats | grep rate_limiter", envoy.admin_port));
    Ok(Section {
        title: "Rate limiting and DoS defence (rate-limiter filter)",
        lines,
        _envoy: envoy,
        _upstreams: vec![up],
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

/// Sidecar: dynamic configuration. The consistent-hash filter's config comes
/// by ECDS from a watched file; replacing the file changes it live.
pub fn dynamic_config() -> Result<Section, String> {
    use crate::xds::{consistent_hash_dir, consistent_hash_ecds, write_atomically, CONSISTENT_HASH_DEFAULT};
    let ups = Upstream::start_many("replica", 3);
    let dir = consistent_hash_dir(CONSISTENT_HASH_DEFAULT);
    let envoy = EnvoyBuilder::new("dynamic-config.yaml").var("XDS_DIR", dir.display()).endpoints("REPLICAS", &ups).try_start()?;
    envoy.wait_healthy("replicas", 3);
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let seen =
        |c: &mut Client| c.get("/", &[("x-user-id", "alice")]).json()["headers"]["x-session-hash"].as_str().unwrap_or("").to_string();
    let v1 = seen(&mut c);
    let v2_json = CONSISTENT_HASH_DEFAULT.replace(r#""fallbackKey": "anonymous"}"#, r#""fallbackKey": "anonymous", "headerValue": "key"}"#);
    write_atomically(&dir, "consistent_hash.yaml", &consistent_hash_ecds(&v2_json, 2));
    let start = std::time::Instant::now();
    while seen(&mut c) != "alice" {
        if start.elapsed() > Duration::from_secs(20) {
            return Err("the new filter config did not apply within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    write_atomically(&dir, "consistent_hash.yaml", &consistent_hash_ecds(CONSISTENT_HASH_DEFAULT, 3));
    let file = dir.join("consistent_hash.yaml");
    let tmp = dir.parent().unwrap_or(&dir).join("next.yaml");
    let lines = vec![
        format!("self-check: x-session-hash for alice was {v1}; after replacing the ECDS file it was \"alice\" (headerValue: key), then restored"),
        format!("config file (watched): {}", file.display()),
        String::new(),
        "try:".into(),
        format!("  curl -s -H 'x-user-id: alice' http://127.0.0.1:{port}/ | grep -o '\"x-session-hash\":\"[^\"]*'"),
        format!(
            "  sed 's/\"anonymous\"}}/\"anonymous\", \"headerValue\": \"key\"}}/' {} > {} && mv {} {}   # live change",
            file.display(),
            tmp.display(),
            tmp.display(),
            file.display()
        ),
        format!(
            "  sed 's/{{\"keySources\"/{{\"bogus\": 1, \"keySources\"/' {} > {} && mv {} {}   # rejected, old config stays",
            file.display(),
            tmp.display(),
            tmp.display(),
            file.display()
        ),
        format!("  curl -s http://127.0.0.1:{}/stats | grep extension_config_discovery", envoy.admin_port),
    ];
    Ok(Section {
        title: "Sidecar: dynamic configuration (ECDS from a watched file)",
        lines,
        _envoy: envoy,
        _upstreams: ups,
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

/// Adapters for monitoring and logging: metrics-adapter in front of an app
/// that has its own JSON `/stats` and Redis-INFO-style `/info`.
pub fn metrics_adapter() -> Result<Section, String> {
    use crate::upstream::{echo, Reply, Request};
    let app = |name: &str, r: &Request| match r.path.split('?').next().unwrap_or("") {
        "/stats" => Reply::new(200, r#"{"requests": 42, "errors": 1, "queue": {"depth": 3}}"#).header("content-type", "application/json"),
        "/info" => Reply::new(200, "# Clients\r\nconnected_clients:2\r\n# Stats\r\ntotal_connections_received:9\r\n"),
        "/fail" => Reply::new(503, "failed\n"),
        _ => echo(name, r),
    };
    let up = Upstream::with_handler("app", std::sync::Arc::new(app));
    let envoy = EnvoyBuilder::new("metrics-adapter.yaml").endpoints("APP", std::slice::from_ref(&up)).try_start()?;
    let (port, admin) = (envoy.port("ingress"), envoy.admin_port);
    let mut c = Client::new(port);
    for _ in 0..5 {
        c.get("/orders", &[("x-tenant", "acme")]);
    }
    c.get("/fail", &[]);
    let series = r#"meshpatterns_http_requests_total{route="app",cluster="app",method="GET",status_class="2xx",tenant="acme"} 5"#;
    let start = std::time::Instant::now();
    while !envoy.admin("/stats/prometheus").contains(series) {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("no series {series} on /stats/prometheus"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut lines = vec![format!("self-check: 5 requests with x-tenant: acme -> {series}")];
    let adapted = c.get("/metrics", &[]).text();
    if !adapted.contains("\napp_requests_total 42\n") {
        return Err(format!("/metrics is not the adapted exposition:\n{adapted}"));
    }
    lines.push("self-check: /metrics -> the app's JSON /stats as Prometheus text (app_requests_total 42)".into());
    lines.push(String::new());
    lines.push("try:".into());
    lines.push(format!("  curl -s -H 'x-tenant: acme' http://127.0.0.1:{port}/orders >/dev/null; curl -s http://127.0.0.1:{admin}/stats/prometheus | grep ^meshpatterns_http_requests"));
    lines.push(format!("  curl -s http://127.0.0.1:{admin}/stats/prometheus | grep meshpatterns_http_request_duration_milliseconds_count"));
    lines.push(format!("  curl -s http://127.0.0.1:{port}/metrics        # the app's JSON /stats, adapted"));
    lines.push(format!("  curl -s http://127.0.0.1:{port}/metrics/info   # its key:value /info, adapted"));
    lines.push(format!("  for t in a b c d e f g; do curl -s -o /dev/null -H \"x-tenant: $t\" http://127.0.0.1:{port}/; done; curl -s http://127.0.0.1:{admin}/stats/prometheus | grep -o 'tenant=\"[^\"]*\"' | sort -u   # capped at 5 + other"));
    lines.push(format!(
        "  tail -n 3 {}/stdout.log   # the access log: one JSON line per request, schema in envoy/ACCESS_LOG.md",
        envoy.dir.display()
    ));
    Ok(Section {
        title: "Adapters: Prometheus monitoring and normalised logging (metrics-adapter filter)",
        lines,
        _envoy: envoy,
        _upstreams: vec![up],
        _servers: Vec::new(),
        _keep: Vec::new(),
    })
}

/// Sharding ambassador for Redis and Redis health checking: Envoy's
/// `redis_proxy` in front of three redis-server shards, with the Redis
/// health checker.
pub fn redis_sharding() -> Result<Section, String> {
    let shards: Vec<crate::redis::RedisServer> = (0..3).map(|_| crate::redis::RedisServer::start()).collect();
    let ports: Vec<u16> = shards.iter().map(|r| r.port).collect();
    let envoy = EnvoyBuilder::new("redis-sharding.yaml").endpoint_ports("REDIS", &ports).try_start()?;
    envoy.wait_healthy("redis_shards", 3);
    let port = envoy.port("redis");
    for i in 0..300 {
        let reply = crate::redis::command(port, &["SET", &format!("user:{i}"), "v"]).map_err(|e| format!("SET through Envoy: {e}"))?;
        if reply != "+OK" {
            return Err(format!("SET user:{i} through Envoy answered {reply}"));
        }
    }
    let sizes: Vec<String> =
        shards.iter().map(|r| r.command(&["DBSIZE"]).unwrap_or_default().trim_start_matches(':').to_string()).collect();
    let mut lines = vec![format!("self-check: 300 keys SET through Envoy landed {} on the three shards", sizes.join(" / "))];
    lines.push(String::new());
    lines.push("try (redis-cli is in the Debian package redis-tools):".into());
    lines.push(format!("  redis-cli -p {port} set user:42 hello && redis-cli -p {port} get user:42"));
    for (i, r) in shards.iter().enumerate() {
        lines.push(format!("  redis-cli -p {} dbsize        # shard {i}", r.port));
    }
    lines.push(format!("  curl -s http://127.0.0.1:{}/clusters | grep health_flags   # the Redis health checker's view", envoy.admin_port));
    Ok(Section {
        title: "Sharding ambassador for Redis (Envoy redis_proxy, Redis health checker)",
        lines,
        _envoy: envoy,
        _upstreams: Vec::new(),
        _servers: shards,
        _keep: Vec::new(),
    })
}

/// The budget per API key in the global demo: 10 requests per minute.
const GLOBAL_BUDGET: u32 = 10;

/// The rate limit service binary (`rls`, a bin of the tests crate): next to
/// the running executable (target/<profile>/demo) or one directory up (an
/// integration test runs from target/<profile>/deps).
fn rls_bin() -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dirs: Vec<&std::path::Path> = exe.ancestors().skip(1).take(2).collect();
    dirs.iter()
        .map(|d| d.join("rls"))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no rls binary next to {} (build it: cargo build --release -p meshpatterns-tests --bin rls)", exe.display()))
}

/// Global rate limit: two Envoys with the rate-limiter filter in global mode
/// (envoy/rate-limiter-global-wasm.yaml), one budget kept by the rate limit
/// service (tests/rls, counters in a redis-server).
pub fn global_rate_limit() -> Result<Section, String> {
    let bin = rls_bin()?;
    let rls = crate::rls::Rls::start(&bin, "limits: []");
    let app = Upstream::start("app");
    let config = "rate-limiter-global-wasm.yaml";
    let shipped = std::fs::read_to_string(crate::paths::envoy_config(config)).map_err(|e| format!("envoy/{config}: {e}"))?;
    // A small budget to see by hand, and the RLS timeout raised from 250 ms
    // to 5 s so that a busy machine does not turn the self-check's calls
    // into fail-open (unlimited) requests.
    let changes = [
        (r#""rate": 2000, "per": "hour""#, format!(r#""rate": {GLOBAL_BUDGET}, "per": "minute""#)),
        (r#""timeoutMs": 250"#, r#""timeoutMs": 5000"#.to_string()),
    ];
    let mut envoys = Vec::new();
    for _ in 0..2 {
        let mut b = EnvoyBuilder::new(config).endpoints("APP", std::slice::from_ref(&app)).endpoint_ports("RATELIMIT", &[rls.port]);
        for (from, to) in &changes {
            if !shipped.contains(from) {
                return Err(format!("{from:?} is not in envoy/{config}"));
            }
            b = b.replace(from, to);
        }
        envoys.push(b.try_start()?);
    }
    let (a, b) = (envoys[0].port("ingress"), envoys[1].port("ingress"));
    // Self-check: one key, alternating Envoys: X-RateLimit-Remaining falls
    // by one per request across both, then 429 from either.
    let mut clients = [Client::new(a), Client::new(b)];
    let mut seen = Vec::new();
    let mut limited = None;
    for i in 0..(GLOBAL_BUDGET as usize + 5) {
        let r = clients[i % 2].get("/", &[("x-api-key", "self-check")]);
        let remaining = r.header("x-ratelimit-remaining").unwrap_or("none").to_string();
        match r.status {
            200 => seen.push(format!("{}:{remaining}", if i % 2 == 0 { "A" } else { "B" })),
            429 => {
                limited = Some((if i % 2 == 0 { "A" } else { "B" }, remaining, r.header("retry-after").unwrap_or("none").to_string()));
                break;
            }
            s => return Err(format!("request {i} got {s}: {}", r.text())),
        }
    }
    let want: Vec<String> =
        (0..GLOBAL_BUDGET).map(|i| format!("{}:{}", if i % 2 == 0 { "A" } else { "B" }, GLOBAL_BUDGET - 1 - i)).collect();
    if seen != want {
        return Err(format!("admitted with remaining {seen:?}, expected {want:?} (one budget of {GLOBAL_BUDGET} across both Envoys)"));
    }
    let (who, remaining, retry) = limited.ok_or(format!("{} requests, none limited", GLOBAL_BUDGET + 5))?;
    if remaining != "0" || retry == "none" {
        return Err(format!("the 429 from Envoy {who} had x-ratelimit-remaining {remaining}, retry-after {retry}"));
    }
    let mut lines = vec![
        format!("self-check: key self-check, Envoys A (:{a}) and B (:{b}) in turn -> remaining {}", seen.join(" ")),
        format!("self-check: request {} -> 429 from Envoy {who}, x-ratelimit-remaining 0, retry-after {retry} s", GLOBAL_BUDGET + 1),
    ];
    lines.push(format!(
        "budget: {GLOBAL_BUDGET} per minute per x-api-key, one fixed window in the RLS (127.0.0.1:{}, counters in redis-server 127.0.0.1:{})",
        rls.port, rls.redis.port
    ));
    lines.push(String::new());
    lines.push("try (alternating the two Envoys; a new key, or a minute later, gets a new budget):".into());
    lines.push(format!(
        "  for p in {a} {b} {a} {b} {a} {b} {a} {b} {a} {b} {a} {b}; do printf \"$p  \"; curl -s -o /dev/null -D - -H 'x-api-key: alice' http://127.0.0.1:$p/ | grep -i -E '^HTTP/|^x-ratelimit-remaining' | tr -d '\\r' | tr '\\n' ' '; echo; done"
    ));
    lines.push(format!(
        "  curl -si -H 'x-api-key: alice' http://127.0.0.1:{b}/ | grep -i -E '^HTTP/|ratelimit|retry-after'   # 429 on either Envoy"
    ));
    lines.push(format!(
        "  curl -si -H 'x-api-key: bob' http://127.0.0.1:{a}/ | grep -i x-ratelimit-remaining   # another key, its own budget"
    ));
    lines.push(format!(
        "  curl -s http://127.0.0.1:{}/stats | grep -E 'rate_limiter.(rls_calls|per-api-key)'   # Envoy A's calls to the RLS",
        envoys[0].admin_port
    ));
    let mut envoys = envoys.into_iter();
    let first = envoys.next().ok_or("no Envoy")?;
    let mut keep: Vec<Box<dyn std::any::Any>> = envoys.map(|e| Box::new(e) as Box<dyn std::any::Any>).collect();
    keep.push(Box::new(rls));
    Ok(Section {
        title: "Global rate limit: two Envoys, one budget (rate-limiter global mode, rate limit service on Redis)",
        lines,
        _envoy: first,
        _upstreams: vec![app],
        _servers: Vec::new(),
        _keep: keep,
    })
}

/// A function that starts one section.
pub type SectionFn = fn() -> Result<Section, String>;

/// Start every section. Errors name the section that failed.
pub fn start_all() -> Result<Vec<Section>, String> {
    let builders: Vec<(&str, SectionFn)> = vec![
        ("consistent-hash", consistent_hash),
        ("experiment-splitter", experiment_splitter),
        ("tls-sidecar", tls_sidecar),
        ("cache", cache),
        ("replicated", replicated),
        ("dynamic-config", dynamic_config),
        ("shard-router", shard_router),
        ("rate-limiter", rate_limiter),
        ("metrics-adapter", metrics_adapter),
        ("redis-sharding", redis_sharding),
        ("pipeline", pipeline),
        ("global-rate-limit", global_rate_limit),
        // one line per pattern: ("name", function),
    ];
    builders.into_iter().map(|(name, f)| f().map_err(|e| format!("{name}: {e}"))).collect()
}

/// Print the sections and keep them running for `hold` (or until Ctrl-C).
pub fn run(hold: Option<Duration>) -> Result<(), String> {
    let sections = start_all()?;
    for s in &sections {
        println!("\n== {} ==", s.title);
        for l in &s.lines {
            println!("{l}");
        }
    }
    println!("\nEverything is running. Press Ctrl-C to stop.");
    // Ctrl-C (SIGINT) or SIGTERM ends the wait; returning drops every section,
    // which stops its Envoy and upstream servers.
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
    let _ = match hold {
        Some(d) => rx.recv_timeout(d).ok(),
        None => rx.recv().ok(),
    };
    println!("stopping ...");
    drop(sections);
    println!("stopped.");
    Ok(())
}
