//! experiment-splitter through a real Envoy, with a control and a treatment
//! upstream behind `cluster_header` routing: the treatment share over 100,000
//! users, stickiness, ramp-safety, cookie issuance, the QA override, targeting,
//! per-arm metrics and bad configs.
//!
//! Every expected arm is computed here independently of the filter's code:
//! `XXH64(le32(len(salt)) || salt || user) mod 10,000 < treatment buckets`
//! (with one treatment arm the layout is "treatment owns buckets 0..n").

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use meshpatterns_core::hash::{bucket, salted_hash64};
use meshpatterns_tests::upstream::{echo, Reply};
use meshpatterns_tests::{paths, wait_for, Client, EnvoyBuilder, Response, Upstream};

const CONFIG: &str = "experiment-splitter.yaml";
const SALT: &str = "checkout-v2-2026";
const SECRET: &str = "example-secret-replace-me-0123456789";
/// The shipped config's arms (90 / 10), as written, for ramp replacements.
const ARMS_90_10: &str = r#"{"name": "control", "percent": 90, "target": "control"},
                            {"name": "treatment", "percent": 10, "target": "treatment"}"#;

fn arms(treatment_percent: u32) -> String {
    ARMS_90_10.replace("90", &(100 - treatment_percent).to_string()).replace("10,", &format!("{treatment_percent},"))
}

/// Whether `user` belongs in treatment when treatment has `percent` % (independent computation).
fn expect_treatment(user: &str, percent: u32) -> bool {
    expect_treatment_bytes(user.as_bytes(), percent)
}

/// The same for a key given as the bytes the client sends.
fn expect_treatment_bytes(user: &[u8], percent: u32) -> bool {
    bucket(salted_hash64(SALT.as_bytes(), user), 10_000) < u64::from(percent) * 100
}

/// Upstreams named `control` and `treatment`; both answer 500 on paths containing `/fail`.
fn upstreams() -> (Upstream, Upstream) {
    let handler =
        Arc::new(
            |name: &str, r: &meshpatterns_tests::upstream::Request| {
                if r.path.contains("/fail") {
                    Reply::new(500, "failing on purpose\n").header("x-replica", name)
                } else {
                    echo(name, r)
                }
            },
        );
    (Upstream::with_handler("control", handler.clone()), Upstream::with_handler("treatment", handler))
}

/// Upstreams that only say who they are (no echo body): cheap enough for
/// 100,000 requests on a loaded machine.
fn quiet_upstreams() -> (Upstream, Upstream) {
    let handler = Arc::new(|name: &str, _: &meshpatterns_tests::upstream::Request| Reply::new(200, "").header("x-replica", name));
    (Upstream::with_handler("control", handler.clone()), Upstream::with_handler("treatment", handler))
}

fn builder(control: &Upstream, treatment: &Upstream) -> EnvoyBuilder {
    EnvoyBuilder::new(CONFIG).endpoints("CONTROL", std::slice::from_ref(control)).endpoints("TREATMENT", std::slice::from_ref(treatment))
}

/// The arm that served `users` on `path`, in order, over `threads` keep-alive connections.
fn arms_for(port: u16, users: &[String], path: &str, threads: usize) -> Vec<String> {
    let mut out = vec![String::new(); users.len()];
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                s.spawn(move || {
                    let mut c = Client::new(port);
                    (w..users.len())
                        .step_by(threads)
                        .map(|i| {
                            let r = c.get(path, &[("x-user-id", &users[i])]);
                            assert_eq!(r.status, 200, "user {}: {}", users[i], r.text());
                            (i, r.replica().to_string())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for w in workers {
            for (i, arm) in w.join().unwrap() {
                out[i] = arm;
            }
        }
    });
    out
}

fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn upstream_saw(r: &Response, header: &str) -> Option<String> {
    r.json()["headers"][header].as_str().map(str::to_string)
}

#[test]
fn treatment_share_over_100k_users_is_within_half_a_point() {
    let (control, treatment) = quiet_upstreams();
    let envoy = builder(&control, &treatment).start();
    let all = users("user", 100_000);
    let got = arms_for(envoy.port("ingress"), &all, "/checkout", 4);
    let mut in_treatment = 0u64;
    let mut mismatches = Vec::new();
    for (u, arm) in all.iter().zip(&got) {
        let want = if expect_treatment(u, 10) { "treatment" } else { "control" };
        if arm != want {
            mismatches.push(format!("{u}: {arm}, expected {want}"));
        }
        in_treatment += u64::from(arm == "treatment");
    }
    assert!(mismatches.is_empty(), "{} users on the wrong arm, first: {:?}", mismatches.len(), &mismatches[..mismatches.len().min(5)]);
    let share = in_treatment as f64 / 1000.0;
    eprintln!("100,000 users at 10 %: {in_treatment} in treatment = {share:.3} %");
    assert!((share - 10.0).abs() <= 0.5, "treatment share {share:.3} % is not within 10 ± 0.5 %");
    assert_eq!(treatment.hits(), in_treatment);
    assert_eq!(control.hits(), 100_000 - in_treatment);
    envoy.wait_stat("meshpatterns.experiment_splitter.checkout-v2.treatment.requests", in_treatment);
    envoy.wait_stat("meshpatterns.experiment_splitter.checkout-v2.control.requests", 100_000 - in_treatment);
}

#[test]
fn every_user_sticks_across_20_requests() {
    let (control, treatment) = upstreams();
    let envoy = builder(&control, &treatment).start();
    let port = envoy.port("ingress");
    let sample = users("sticky", 500);
    // Four connections, so requests of one user reach both Envoy workers.
    let mut clients: Vec<Client> = (0..4).map(|_| Client::new(port)).collect();
    let mut first: Vec<String> = Vec::new();
    for round in 0..20 {
        for (i, u) in sample.iter().enumerate() {
            let r = clients[(round + i) % 4].get("/checkout/cart", &[("x-user-id", u)]);
            assert_eq!(r.status, 200);
            let arm = r.replica().to_string();
            assert_eq!(r.header("x-experiment"), Some(format!("checkout-v2={arm}").as_str()));
            if round == 0 {
                first.push(arm);
            } else {
                assert_eq!(arm, first[i], "user {u} changed arm in round {round}");
            }
        }
    }
    let n = first.iter().filter(|a| *a == "treatment").count();
    eprintln!("500 users x 20 requests: all sticky; {n} in treatment");
    assert!(n > 0 && n < 500);
}

#[test]
fn ramping_up_and_down_moves_only_the_changed_buckets() {
    let (control, treatment) = quiet_upstreams();
    let all = users("ramp", 20_000);
    let mut stages: Vec<Vec<bool>> = Vec::new();
    for percent in [10, 20, 5] {
        let b = builder(&control, &treatment);
        let b = if percent == 10 { b } else { b.replace(ARMS_90_10, &arms(percent)) };
        let mut envoy = b.start();
        let got = arms_for(envoy.port("ingress"), &all, "/checkout", 4);
        envoy.stop();
        let t: Vec<bool> = got.iter().map(|a| a == "treatment").collect();
        for (u, &x) in all.iter().zip(&t) {
            assert_eq!(x, expect_treatment(u, percent), "{u} at {percent} %");
        }
        let n = t.iter().filter(|&&x| x).count();
        eprintln!("at {percent:>2} %: {n} of {} users in treatment ({:.2} %)", all.len(), n as f64 * 100.0 / all.len() as f64);
        stages.push(t);
    }
    let count = |f: &dyn Fn(bool, bool) -> bool, a: &[bool], b: &[bool]| a.iter().zip(b).filter(|(x, y)| f(**x, **y)).count();
    // 10 % -> 20 %: nobody leaves treatment, about 10 % of users join.
    let left = count(&|a, b| a && !b, &stages[0], &stages[1]);
    let joined = count(&|a, b| !a && b, &stages[0], &stages[1]);
    eprintln!("10 -> 20 %: {left} left treatment, {joined} joined ({:.2} % of users)", joined as f64 * 100.0 / all.len() as f64);
    assert_eq!(left, 0, "raising the share must not take anyone out of treatment");
    assert!((1_700..=2_300).contains(&joined), "{joined} joined (expected ~2,000 = 10 % of 20,000)");
    // 20 % -> 5 %: nobody joins, about 15 % of users leave.
    let left = count(&|a, b| a && !b, &stages[1], &stages[2]);
    let joined = count(&|a, b| !a && b, &stages[1], &stages[2]);
    eprintln!("20 -> 5 %: {left} left treatment ({:.2} % of users), {joined} joined", left as f64 * 100.0 / all.len() as f64);
    assert_eq!(joined, 0, "lowering the share must not bring anyone into treatment");
    assert!((2_600..=3_400).contains(&left), "{left} left (expected ~3,000 = 15 % of 20,000)");
    // Everyone in treatment at 5 % was in treatment all along.
    assert!(stages[2].iter().zip(&stages[0]).all(|(c, a)| !c || *a));
}

#[test]
fn users_without_an_id_get_a_cookie_and_keep_their_first_arm() {
    let (control, treatment) = upstreams();
    let envoy = builder(&control, &treatment).start();
    let mut c = Client::new(envoy.port("ingress"));
    let mut ids = BTreeSet::new();
    let mut in_treatment = 0;
    for _ in 0..200 {
        let first = c.get("/checkout", &[]);
        assert_eq!(first.status, 200);
        let set = first.headers_named("set-cookie");
        assert_eq!(set.len(), 1, "{:?}", first.headers);
        assert!(set[0].ends_with("; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax"), "{}", set[0]);
        let pair = set[0].split(';').next().unwrap().to_string();
        let id = pair.strip_prefix("mp_uid=").unwrap().to_string();
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        // The first request is already assigned by the new id.
        let want = if expect_treatment(&id, 10) { "treatment" } else { "control" };
        assert_eq!(first.replica(), want, "first request of {id}");
        in_treatment += usize::from(want == "treatment");
        for _ in 0..5 {
            let r = c.get("/checkout", &[("cookie", &pair)]);
            assert_eq!(r.replica(), want);
            assert!(r.header("set-cookie").is_none(), "no new cookie once the client has one");
        }
        ids.insert(id);
    }
    assert_eq!(ids.len(), 200, "every new user gets a new id");
    eprintln!("200 cookie-less users: {in_treatment} assigned to treatment on their first request, and stayed");
    envoy.wait_stat("meshpatterns.experiment_splitter.cookie_issued", 200);
    // A user with an id gets no cookie.
    assert!(c.get("/checkout", &[("x-user-id", "alice")]).header("set-cookie").is_none());
}

/// A user the shipped 90/10 config puts in control, and one in treatment.
fn control_and_treatment_users() -> (String, String) {
    let all = users("probe", 1000);
    let c = all.iter().find(|u| !expect_treatment(u, 10)).unwrap().clone();
    let t = all.iter().find(|u| expect_treatment(u, 10)).unwrap().clone();
    (c, t)
}

#[test]
fn override_needs_the_shared_secret_and_is_never_forwarded() {
    let (control, treatment) = upstreams();
    let envoy = builder(&control, &treatment).start();
    let mut c = Client::new(envoy.port("ingress"));
    let (cu, _) = control_and_treatment_users();
    let ov = ("x-experiment-override", "checkout-v2=treatment");

    let r = c.get("/checkout", &[("x-user-id", &cu), ov, ("x-experiment-secret", SECRET)]);
    assert_eq!(r.replica(), "treatment", "override with the secret is honoured");
    assert_eq!(r.header("x-experiment"), Some("checkout-v2=treatment"));
    assert_eq!(upstream_saw(&r, "x-experiment-override"), None, "override header stripped");
    assert_eq!(upstream_saw(&r, "x-experiment-secret"), None, "secret header stripped");

    for secret in [None, Some("wrong"), Some(&SECRET[..SECRET.len() - 1]), Some("example-secret-replace-me-0123456780")] {
        let mut h = vec![("x-user-id", cu.as_str()), ov];
        if let Some(s) = secret {
            h.push(("x-experiment-secret", s));
        }
        let r = c.get("/checkout", &h);
        assert_eq!(r.replica(), "control", "override with secret {secret:?} must be ignored");
        assert_eq!(r.header("x-experiment"), Some("checkout-v2=control"));
        assert_eq!(upstream_saw(&r, "x-experiment-override"), None);
        assert_eq!(upstream_saw(&r, "x-experiment-secret"), None);
    }
    // The override also reaches paths outside the targeting (QA sees any page in treatment).
    let r = c.get("/", &[("x-user-id", &cu), ("x-experiment-override", "treatment"), ("x-experiment-secret", SECRET)]);
    assert_eq!(r.replica(), "treatment");
    envoy.wait_stat("meshpatterns.experiment_splitter.override_accepted", 2);
    envoy.wait_stat("meshpatterns.experiment_splitter.override_rejected", 4);
    envoy.wait_stat("meshpatterns.experiment_splitter.checkout-v2.forced", 2);
}

#[test]
fn targeting_lists_and_client_sent_routing_headers() {
    let (control, treatment) = upstreams();
    let envoy = builder(&control, &treatment).start();
    let mut c = Client::new(envoy.port("ingress"));
    let (cu, tu) = control_and_treatment_users();

    // Path targeting: the treatment user reaches treatment on /checkout only.
    let r = c.get("/checkout/pay?step=2", &[("x-user-id", &tu)]);
    assert_eq!((r.replica(), r.header("x-experiment")), ("treatment", Some("checkout-v2=treatment")));
    assert_eq!(upstream_saw(&r, "x-experiment-arm").as_deref(), Some("treatment"));
    let r = c.get("/home", &[("x-user-id", &tu)]);
    assert_eq!((r.replica(), r.header("x-experiment")), ("control", None), "untargeted: control, not exposed");
    // Allow and deny lists.
    let r = c.get("/checkout", &[("x-user-id", "qa-treatment-user")]);
    assert_eq!((r.replica(), r.header("x-experiment")), ("treatment", Some("checkout-v2=treatment")));
    let r = c.get("/checkout", &[("x-user-id", "synthetic-monitor")]);
    assert_eq!((r.replica(), r.header("x-experiment")), ("control", None));
    // A client naming its own arm is overwritten.
    for forged in ["treatment", "control", "nonexistent"] {
        let r = c.get("/checkout", &[("x-user-id", &cu), ("x-experiment-arm", forged)]);
        assert_eq!(r.replica(), "control", "client sent x-experiment-arm: {forged}");
        assert_eq!(upstream_saw(&r, "x-experiment-arm").as_deref(), Some("control"));
    }
    envoy.wait_stat("meshpatterns.experiment_splitter.client_header_replaced", 3);
    envoy.wait_stat("meshpatterns.experiment_splitter.checkout-v2.excluded", 2);
    drop(envoy);

    // Header and cookie targeting (a variant of the shipped config).
    let envoy = builder(&control, &treatment)
        .replace(
            r#""match": {"pathPrefixes": ["/checkout"]}"#,
            r#""match": {"pathPrefixes": ["/checkout"]}, "targeting": {"headers": [{"name": "x-country", "values": ["DE", "FR"]}], "cookies": [{"name": "beta"}]}"#,
        )
        .start();
    let mut c = Client::new(envoy.port("ingress"));
    let cases = [
        (vec![("x-country", "DE"), ("cookie", "beta=1")], "treatment"),
        (vec![("x-country", "FR"), ("cookie", "a=b; beta=yes")], "treatment"),
        (vec![("x-country", "US"), ("cookie", "beta=1")], "control"),
        (vec![("x-country", "DE")], "control"),
        (vec![("cookie", "beta=1")], "control"),
    ];
    for (extra, want) in cases {
        let mut h = vec![("x-user-id", tu.as_str())];
        h.extend(extra.iter().copied());
        assert_eq!(c.get("/checkout", &h).replica(), want, "{extra:?}");
    }
}

#[test]
fn per_arm_metrics_count_requests_and_5xx_and_access_log_has_the_arm() {
    let (control, treatment) = upstreams();
    let envoy = builder(&control, &treatment).start();
    let port = envoy.port("ingress");
    let all = users("m", 400);
    let got = arms_for(port, &all, "/checkout", 2);
    let t_ok = got.iter().filter(|a| *a == "treatment").count() as u64;
    // Half of the users then hit a failing page: both upstreams answer 500.
    let mut c = Client::new(port);
    let mut t_fail = 0;
    for u in all.iter().take(200) {
        let r = c.get("/checkout/fail", &[("x-user-id", u)]);
        assert_eq!(r.status, 500);
        t_fail += u64::from(r.replica() == "treatment");
    }
    // Counters are batched in the VM and flushed every 500 ms.
    let stat =
        |arm: &str, what: &str, want: u64| envoy.wait_stat(&format!("meshpatterns.experiment_splitter.checkout-v2.{arm}.{what}"), want);
    stat("treatment", "requests", t_ok + t_fail);
    stat("control", "requests", 400 - t_ok + 200 - t_fail);
    stat("treatment", "responses_5xx", t_fail);
    stat("control", "responses_5xx", 200 - t_fail);
    eprintln!("per-arm: treatment {} requests / {t_fail} 5xx; control {} / {}", t_ok + t_fail, 600 - t_ok - t_fail, 200 - t_fail);

    // Prometheus output carries experiment and arm labels.
    let prom = envoy.admin("/stats/prometheus");
    let line = format!("meshpatterns_experiment_splitter_responses_5xx{{experiment=\"checkout-v2\",arm=\"treatment\"}} {t_fail}");
    assert!(
        prom.lines().any(|l| l == line),
        "no {line:?} in:\n{}",
        prom.lines().filter(|l| l.contains("experiment")).collect::<Vec<_>>().join("\n")
    );

    // The access log records each request's arm, reason and key source.
    let logs = wait_for("600 access log lines", Duration::from_secs(30), || {
        let v: Vec<serde_json::Value> = envoy.stdout().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (v.len() >= 600).then_some(v)
    });
    for v in &logs {
        let arm = v["meshpatterns.experiment.arm"].as_str().unwrap();
        assert_eq!(Some(arm.trim_start_matches("checkout-v2=")), v["upstream.cluster"].as_str(), "{v}");
        assert_eq!(v["meshpatterns.experiment.reason"], "checkout-v2=hash");
        assert_eq!(v["meshpatterns.experiment.user_source"], "header:x-user-id");
    }
}

#[test]
fn invalid_configs_are_refused_with_the_field_named() {
    let cases = [
        (ARMS_90_10.replace("10,", "15,"), "field `experiments[0].arms[].percent` has value 90 + 15 (sum 105)"),
        (ARMS_90_10.replace(r#""name": "treatment""#, r#""name": "control""#), "field `experiments[0].arms[1].name` has value \"control\""),
        (ARMS_90_10.replace(r#""target": "treatment""#, r#""target": "treatment", "weight": 1"#), "unknown field `weight`"),
        (ARMS_90_10.replace("10,", "10.001,").replace("90,", "89.999,"), "field `experiments[0].arms[0].percent` has value 89.999"),
    ];
    for (bad, expect) in cases {
        let b = EnvoyBuilder::new(CONFIG).endpoint_ports("CONTROL", &[1]).endpoint_ports("TREATMENT", &[2]).replace(ARMS_90_10, &bad);
        let err = b.validate().expect_err("envoy --mode validate must reject the config");
        let expect = &meshpatterns_tests::pipeline::in_stage("experiment-splitter", expect);
        assert!(err.contains(expect.as_str()), "validate output lacks {expect:?}:\n{err}");
        let log = match b.try_start() {
            Ok(_) => panic!("Envoy started with an invalid config: {bad}"),
            Err(log) => log,
        };
        assert!(log.contains(expect), "Envoy log lacks {expect:?}:\n{log}");
        assert!(
            log.contains(&meshpatterns_tests::pipeline::in_stage("experiment-splitter", "experiment-splitter: invalid plugin config")),
            "{log}"
        );
    }
    // The override secret is never echoed into the log.
    let b = EnvoyBuilder::new(CONFIG).endpoint_ports("CONTROL", &[1]).endpoint_ports("TREATMENT", &[2]).replace(SECRET, "short-secret");
    let err = b.validate().expect_err("a short secret is refused");
    assert!(
        err.contains(&meshpatterns_tests::pipeline::in_stage(
            "experiment-splitter",
            "field `override.secret` has value (12 bytes, not shown)"
        )),
        "{err}"
    );
    assert!(!err.contains("short-secret"), "{err}");
}

/// Keys are the bytes the client sent: user keys that differ only in one
/// byte that is not UTF-8 are different users, each on the arm its own bytes
/// hash to (decoded lossily, all of them would be `u-\u{FFFD}` and share one arm).
#[test]
fn user_keys_that_are_not_utf8_are_assigned_by_their_bytes() {
    let (control, treatment) = quiet_upstreams();
    let envoy = builder(&control, &treatment).start();
    let mut c = Client::new(envoy.port("ingress"));
    let mut seen = BTreeSet::new();
    for b in 0x80..=0xffu8 {
        let key = [b'u', b'-', b];
        let mut req = b"GET /checkout HTTP/1.1\r\nhost: localhost\r\nx-user-id: ".to_vec();
        req.extend_from_slice(&key);
        req.extend_from_slice(b"\r\n\r\n");
        let r = c.raw(&req).unwrap_or_else(|e| panic!("key {key:x?}: {e}"));
        assert_eq!(r.status, 200, "key {key:x?}");
        let want = if expect_treatment_bytes(&key, 10) { "treatment" } else { "control" };
        assert_eq!(r.replica(), want, "key {key:x?}");
        assert_eq!(r.header("x-experiment"), Some(format!("checkout-v2={want}").as_str()), "key {key:x?}");
        seen.insert(want);
    }
    assert_eq!(seen.len(), 2, "128 keys differing in one non-UTF-8 byte reach both arms");
    let t = (0x80..=0xffu8).filter(|b| expect_treatment_bytes(&[b'u', b'-', *b], 10)).count();
    eprintln!("128 non-UTF-8 keys: {t} in treatment, each on its own bucket's arm");
}

/// The README's failure case: with `cluster_header` routing and no filter,
/// nothing writes the arm header, so Envoy finds no cluster and answers 503
/// with response flag NC; a client that sends the header itself picks its
/// cluster, unless the header is removed before route selection
/// (`early_header_mutation_extensions`, as the README advises).
#[test]
fn without_the_filter_the_arm_route_answers_503_nc() {
    let (control, treatment) = quiet_upstreams();
    // The wasm filter's entry, as rendered (replacements apply before the
    // pipeline rewrite, so this also works with MESHPATTERNS_MODULE=pipeline).
    let text = std::fs::read_to_string(paths::repo().join("envoy").join(CONFIG)).unwrap();
    let start = text.find("          - name: meshpatterns.experiment_splitter\n").expect("the wasm filter entry");
    let end = text.find("          - name: envoy.filters.http.router\n").expect("the router entry");
    let filter = text[start..end].replace("{{WASM_DIR}}", &paths::wasm_dir().display().to_string());
    let filter = filter.as_str();
    let envoy = builder(&control, &treatment).replace(filter, "").start();
    let mut c = Client::new(envoy.port("ingress"));
    for path in ["/checkout", "/home"] {
        let r = c.get(path, &[("x-user-id", "alice")]);
        assert_eq!(r.status, 503, "{path}: {}", r.text());
        assert_eq!(r.header("x-experiment"), None);
    }
    // Without the filter nothing overwrites a client's own arm header.
    let r = c.get("/checkout", &[("x-user-id", "alice"), ("x-experiment-arm", "treatment")]);
    assert_eq!((r.status, r.replica()), (200, "treatment"));
    assert_eq!((control.hits(), treatment.hits()), (0, 1));
    let logs = wait_for("3 access log lines", Duration::from_secs(30), || {
        let v: Vec<serde_json::Value> = envoy.stdout().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (v.len() >= 3).then_some(v)
    });
    for v in &logs[..2] {
        assert_eq!(v["http.response.status_code"].to_string().trim_matches('"'), "503", "{v}");
        assert_eq!(v["envoy.response_flags"], "NC", "{v}");
    }
    drop(envoy);

    // Removing the header before route selection closes that gap.
    let hcm = "          stat_prefix: ingress\n";
    let strip = "          stat_prefix: ingress\n          early_header_mutation_extensions:\n          - name: envoy.http.early_header_mutation.header_mutation\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation\n              mutations:\n              - remove: x-experiment-arm\n";
    let envoy = builder(&control, &treatment).replace(filter, "").replace(hcm, strip).start();
    let mut c = Client::new(envoy.port("ingress"));
    let r = c.get("/checkout", &[("x-user-id", "alice"), ("x-experiment-arm", "treatment")]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(treatment.hits(), 1, "the client's header no longer picks the cluster");
    drop(envoy);

    // With the filter and the early removal, the filter still routes.
    let envoy = builder(&control, &treatment).replace(hcm, strip).start();
    let mut c = Client::new(envoy.port("ingress"));
    let (cu, tu) = control_and_treatment_users();
    assert_eq!(c.get("/checkout", &[("x-user-id", &tu), ("x-experiment-arm", "control")]).replica(), "treatment");
    assert_eq!(c.get("/checkout", &[("x-user-id", &cu), ("x-experiment-arm", "treatment")]).replica(), "control");
}

/// The per-experiment `match` block (the syntax every filter shares) through
/// Envoy, and the deprecated `targeting.pathPrefixes` still read, with one
/// warning naming the old and the new field.
#[test]
fn match_block_scopes_the_experiment_and_old_targeting_warns() {
    let (control, treatment) = upstreams();
    let (_, tu) = control_and_treatment_users();
    let warning = "experiment-splitter: deprecated config fields, read for this release only: `experiments[0].targeting.pathPrefixes` (use `experiments[0].match.pathPrefixes`)";
    // The shipped config still uses `targeting`.
    let envoy = builder(&control, &treatment)
        .replace(r#""match": {"pathPrefixes": ["/checkout"]}"#, r#""targeting": {"pathPrefixes": ["/checkout"]}"#)
        .start();
    let mut c = Client::new(envoy.port("ingress"));
    assert_eq!(c.get("/checkout", &[("x-user-id", &tu)]).replica(), "treatment");
    assert_eq!(c.get("/home", &[("x-user-id", &tu)]).replica(), "control");
    // Envoy flushes its log file every few seconds.
    wait_for("the deprecation warning in Envoy's log", Duration::from_secs(30), || envoy.log().contains(warning).then_some(()));
    drop(envoy);

    let envoy = builder(&control, &treatment)
        .replace(
            r#""match": {"pathPrefixes": ["/checkout"]}"#,
            r#""match": {"hosts": ["shop.example.com", "*.shop.example.com"], "pathPrefixes": ["/checkout"], "methods": ["GET"],
                         "headers": [{"name": "x-synthetic", "present": false}], "not": {"pathPrefixes": ["/checkout/health"]}}"#,
        )
        .start();
    let mut c = Client::new(envoy.port("ingress"));
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 8] = [
        ("GET", "shop.example.com", "/checkout/pay", &[], "treatment"),
        ("GET", "eu.shop.example.com:8080", "/checkout", &[], "treatment"),
        ("GET", "shop.example.com", "/checkout/./pay", &[], "treatment"),
        ("GET", "other.example.com", "/checkout", &[], "control"),
        ("GET", "shop.example.com", "/home", &[], "control"),
        ("GET", "shop.example.com", "/checkout/health", &[], "control"),
        ("GET", "shop.example.com", "/checkout", &[("x-synthetic", "1")], "control"),
        ("POST", "shop.example.com", "/checkout", &[], "control"),
    ];
    for (method, host, path, extra, want) in cases {
        c.host = host.to_string();
        let mut h = vec![("x-user-id", tu.as_str())];
        h.extend_from_slice(extra);
        let r = c.request(method, path, &h, b"");
        assert_eq!(r.replica(), want, "{method} {host}{path} {extra:?}");
        let exposed = r.header("x-experiment");
        assert_eq!(exposed, (want == "treatment").then_some("checkout-v2=treatment"), "{method} {host}{path}");
    }
    envoy.wait_stat("meshpatterns.experiment_splitter.checkout-v2.excluded", 5);
    // `match` is not deprecated. The plugin is configured before Envoy
    // starts its dispatch loop, so once that line is flushed, so is any warning.
    wait_for("Envoy's log", Duration::from_secs(30), || envoy.log().contains("starting main dispatch loop").then_some(()));
    assert!(!envoy.log().contains("deprecated config fields"), "{}", envoy.log());
}

/// istio/experiment-splitter.yaml: the plugin config parses, and the
/// VirtualService routes on the header the filter writes, by exact match on
/// each arm's target, with no weights.
#[test]
fn istio_virtual_service_matches_the_arm_header() {
    use serde_norway::Value;
    let text = std::fs::read_to_string(paths::repo().join("istio/experiment-splitter.yaml")).unwrap();
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let plugin = docs.iter().find(|d| d["kind"] == "WasmPlugin").unwrap();
    let json = serde_json::to_vec(&serde_json::to_value(&plugin["spec"]["pluginConfig"]).unwrap()).unwrap();
    let pipeline = meshpatterns_host::stage::parse_single::<experiment_splitter::ExperimentSplitter>(&json).unwrap();
    let s = &pipeline.stages[0].stage.settings;
    let e = &s.experiments[0];
    let targets: BTreeSet<&str> = e.arms.iter().map(|a| a.target.as_str()).collect();
    let vs = docs.iter().find(|d| d["kind"] == "VirtualService").unwrap();
    let mut matched = BTreeSet::new();
    for route in vs["spec"]["http"].as_sequence().unwrap() {
        for dest in route["route"].as_sequence().unwrap() {
            assert!(dest.get("weight").is_none() || route["route"].as_sequence().unwrap().len() == 1, "no weighted split: {route:?}");
        }
        if let Some(ms) = route["match"].as_sequence() {
            for m in ms {
                let v = m["headers"][e.routing_header.as_str()]["exact"]
                    .as_str()
                    .unwrap_or_else(|| panic!("match on {}: {m:?}", e.routing_header));
                assert!(targets.contains(v), "{v} is not an arm target {targets:?}");
                matched.insert(v);
            }
        }
    }
    let control = e.arms[e.control].target.as_str();
    assert!(targets.iter().all(|t| *t == control || matched.contains(t)), "every treatment target is matched: {matched:?}");
}

#[test]
fn without_the_filter_envoy_answers_503_nc_and_reaches_no_arm() {
    // The shipped config with the filter taken out: what happens when the
    // module cannot be loaded (README, failure behaviour).
    let (control, treatment) = upstreams();
    let mut doc: serde_norway::Value = serde_norway::from_str(&builder(&control, &treatment).render()).unwrap();
    let filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_sequence_mut()
        .expect("http_filters");
    let before = filters.len();
    filters.retain(|f| f["name"] != "meshpatterns.experiment_splitter");
    assert_eq!(filters.len(), before - 1, "the shipped config has the filter");
    let envoy = EnvoyBuilder::from_template("experiment-splitter.yaml without the filter", &serde_norway::to_string(&doc).unwrap()).start();
    let mut c = Client::new(envoy.port("ingress"));
    for user in ["alice", "bob", "qa-treatment-user"] {
        for path in ["/checkout", "/"] {
            let r = c.get(path, &[("x-user-id", user)]);
            assert_eq!((r.status, r.replica()), (503, ""), "{user} {path}: {}", r.text());
        }
    }
    assert_eq!((control.hits(), treatment.hits()), (0, 0), "no arm was reached");
    let lines = wait_for("6 access-log lines", Duration::from_secs(10), || {
        let l = meshpatterns_tests::access_log::lines(&envoy.stdout());
        (l.len() >= 6).then_some(l)
    });
    for l in &lines {
        assert_eq!((l["http.response.status_code"].as_u64(), l["envoy.response_flags"].as_str()), (Some(503), Some("NC")), "{l}");
    }
}
