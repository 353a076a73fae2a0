//! metrics-adapter through a real Envoy: labelled RED series on
//! /stats/prometheus, the app's legacy stats rewritten into Prometheus text,
//! malformed and oversized bodies, the cardinality cap, `promtool check
//! metrics` on both expositions, and a real Prometheus server scraping the
//! sidecar and answering PromQL.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshpatterns_tests::upstream::{echo, Reply, Request};
use meshpatterns_tests::{access_log, paths, wait_for, Client, Envoy, EnvoyBuilder, Upstream};

const CONFIG: &str = "metrics-adapter.yaml";

const VALID: u8 = 0;
const MALFORMED: u8 = 1;
const LARGE: u8 = 2;
const FAILING: u8 = 3;
const BIG: u8 = 4;

/// The app behind the sidecar: JSON stats on /stats, Redis-INFO-style text
/// on /info, 503 on /fail, 404 on /missing, an echo elsewhere.
#[derive(Default)]
struct App {
    stats_mode: AtomicU8,
    stats_requests: Mutex<Vec<Request>>,
}

const STATS_JSON: &str = r#"{"requests": 42, "errors": 1, "queue": {"depth": 3, "name": "jobs"}, "version": "1.2.3"}"#;
const INFO_TEXT: &str = "# Server\r\nredis_version:7.0.15\r\nuptime_in_seconds:120\r\n\r\n# Clients\r\nconnected_clients:2\r\n\
                         # Stats\r\ntotal_connections_received:9\r\n# Keyspace\r\ndb0:keys=3,expires=1\r\n";

fn start_app(app: &Arc<App>) -> Upstream {
    let app = Arc::clone(app);
    Upstream::with_handler(
        "app",
        Arc::new(move |name: &str, r: &Request| {
            let path = r.path.split('?').next().unwrap_or("");
            match path {
                "/stats" => {
                    app.stats_requests.lock().unwrap().push(r.clone());
                    match app.stats_mode.load(Ordering::SeqCst) {
                        VALID => Reply::new(200, STATS_JSON).header("content-type", "application/json"),
                        MALFORMED => Reply::new(200, r#"{"requests": 42, "errors": "#).header("content-type", "application/json"),
                        LARGE => {
                            let pad = "x".repeat(100_000);
                            Reply::new(200, format!(r#"{{"requests": 1, "pad": "{pad}"}}"#))
                        }
                        BIG => {
                            // 300 kB: arrives in many chunks, all buffered (under the 512 KiB default).
                            let pad = "y".repeat(300_000);
                            Reply::new(200, format!(r#"{{"pad": "{pad}", "requests": 7, "errors": 0, "queue": {{"depth": 11}}}}"#))
                        }
                        _ => Reply::new(503, "stats unavailable\n"),
                    }
                }
                "/info" => Reply::new(200, INFO_TEXT),
                "/fail" => Reply::new(503, "failed\n"),
                "/missing" => Reply::new(404, "not found\n"),
                "/slow" => {
                    std::thread::sleep(Duration::from_secs(2));
                    Reply::new(200, "late\n")
                }
                _ => echo(name, r),
            }
        }),
    )
}

fn start(app: &Arc<App>, builder: impl FnOnce(EnvoyBuilder) -> EnvoyBuilder) -> (Upstream, Envoy) {
    let up = start_app(app);
    let envoy = builder(EnvoyBuilder::new(CONFIG).endpoints("APP", std::slice::from_ref(&up))).start();
    (up, envoy)
}

/// `promtool check metrics` on a text exposition: (exit code, output).
/// Exit 0: valid and lint-clean; 3: valid with lint findings; 1: invalid.
fn promtool(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus; `make apt-tools` installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Samples of one metric family in a text exposition: (labels, value).
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
            let Some((inner, value)) = rest.split_once("} ") else { continue };
            let labels: BTreeMap<String, String> = inner
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            (labels, value)
        } else if let Some(value) = rest.strip_prefix(' ') {
            (BTreeMap::new(), value)
        } else {
            continue;
        };
        out.push((labels, value.trim().parse().unwrap_or(f64::NAN)));
    }
    out
}

/// The value of the one sample of `name` whose labels include `want`, or
/// None when there is no such series.
fn try_value(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples(text, name)
        .into_iter()
        .filter(|(l, _)| want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, v)| v)
        .collect();
    assert!(matching.len() <= 1, "{name} {want:?} matches {} series", matching.len());
    matching.first().copied()
}

/// The value of the one sample of `name` whose labels include `want`;
/// panics when there is none (a missing series is not a zero).
fn value(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    try_value(text, name, want).unwrap_or_else(|| panic!("no series {name} with labels {want:?} in:\n{text}"))
}

fn prometheus_text(envoy: &Envoy) -> String {
    envoy.admin("/stats/prometheus")
}

/// The Envoy exposition is valid for promtool (exit 0 or 3, never 1); our
/// series draw no lint findings except the ones Envoy's exposition gives every
/// series (no HELP) and the documented millisecond unit of the histogram.
fn assert_envoy_exposition_valid(text: &str) {
    let (code, out) = promtool(text);
    assert!(code == 0 || code == 3, "promtool rejected /stats/prometheus (exit {code}):\n{out}");
    assert!(!out.contains("error while linting"), "{out}");
    for line in out.lines().filter(|l| l.starts_with("meshpatterns_")) {
        let allowed = line.ends_with(" no help text")
            || line == "meshpatterns_http_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
        assert!(allowed, "promtool finding on our series: {line}");
    }
}

const REQ: &str = "meshpatterns_http_requests_total";
const ERR: &str = "meshpatterns_http_errors_total";
const DUR: &str = "meshpatterns_http_request_duration_milliseconds";

#[test]
fn red_metrics_reach_prometheus_output_as_labelled_series() {
    let app = Arc::new(App::default());
    let (_up, envoy) = start(&app, |b| b);
    let mut c = Client::new(envoy.port("ingress"));
    for _ in 0..10 {
        assert_eq!(c.get("/orders/7?x=1", &[("x-tenant", "acme")]).status, 200);
    }
    for _ in 0..3 {
        assert_eq!(c.request("POST", "/fail", &[], b"{}").status, 503);
    }
    for _ in 0..2 {
        assert_eq!(c.get("/missing", &[("x-tenant", "beta")]).status, 404);
    }
    assert_eq!(c.request("PROPFIND", "/dav", &[], b"").status, 200);

    let base = [("route", "app"), ("cluster", "app")];
    let get_acme = [base[0], base[1], ("method", "GET"), ("status_class", "2xx"), ("tenant", "acme")];
    // Histograms reach the admin output at the next stats flush (1 s here).
    let text = wait_for("RED series for 16 requests", Duration::from_secs(20), || {
        let t = prometheus_text(&envoy);
        (try_value(&t, &format!("{DUR}_count"), &get_acme) == Some(10.0) && try_value(&t, REQ, &[("method", "other")]) == Some(1.0))
            .then_some(t)
    });
    assert_eq!(value(&text, REQ, &get_acme), 10.0);
    assert_eq!(value(&text, REQ, &[base[0], base[1], ("method", "POST"), ("status_class", "5xx"), ("tenant", "none")]), 3.0);
    assert_eq!(value(&text, REQ, &[base[0], base[1], ("method", "GET"), ("status_class", "4xx"), ("tenant", "beta")]), 2.0);
    assert_eq!(value(&text, REQ, &[("method", "other"), ("status_class", "2xx"), ("tenant", "none")]), 1.0);
    // Errors are 5xx (and streams with no response), not 4xx.
    let errors = samples(&text, ERR);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(value(&text, ERR, &[("method", "POST"), ("status_class", "5xx")]), 3.0);
    // The histogram: 10 observations, all under the +Inf bucket, each series labelled alike.
    assert_eq!(value(&text, &format!("{DUR}_bucket"), &[get_acme[0], get_acme[4], ("method", "GET"), ("le", "+Inf")]), 10.0);
    // Sub-millisecond requests may sum to 0 ms; the series must exist.
    let sum = value(&text, &format!("{DUR}_sum"), &get_acme);
    assert!(sum.is_finite() && sum >= 0.0, "{DUR}_sum = {sum}");
    // Every RED series carries exactly the configured labels.
    for (labels, _) in samples(&text, REQ) {
        let keys: Vec<&str> = labels.keys().map(String::as_str).collect();
        assert_eq!(keys, ["cluster", "method", "route", "status_class", "tenant"]);
    }
    assert_envoy_exposition_valid(&text);

    // The access log: one JSON line per request, in the documented schema.
    let lines = wait_for("16 access-log lines", Duration::from_secs(10), || {
        let l = access_log::lines(&envoy.stdout());
        (l.len() >= 16).then_some(l)
    });
    for l in &lines {
        access_log::check_line(l).unwrap_or_else(|e| panic!("{e}"));
    }
    let fail = lines.iter().find(|l| l["url.path"] == "/fail").expect("a line for /fail");
    assert_eq!((fail["http.request.method"].as_str(), fail["http.response.status_code"].as_u64()), (Some("POST"), Some(503)));
    let order = lines.iter().find(|l| l["http.request.method"] == "GET" && l["http.response.status_code"] == 200).unwrap();
    assert_eq!(order["url.path"], "/orders/7", "path without the query");
    assert_eq!((order["http.route"].as_str(), order["upstream.cluster"].as_str()), (Some("app"), Some("app")));
}

/// A stream the client abandons before any response is still counted, once,
/// when the stream ends: no status (`status_class="none"`), an error, and the
/// route and cluster it had (properties still readable at that point).
#[test]
fn an_abandoned_stream_is_counted_as_an_error_without_status() {
    let app = Arc::new(App::default());
    let (_up, envoy) = start(&app, |b| b);
    let port = envoy.port("ingress");
    for tenant in ["gone-1", "gone-2"] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET /slow HTTP/1.1\r\nhost: app\r\nx-tenant: {tenant}\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
    }
    let mut c = Client::new(port);
    assert_eq!(c.get("/orders/1", &[("x-tenant", "gone-1")]).status, 200);
    fn none(t: &str) -> [(&str, &str); 5] {
        [("route", "app"), ("cluster", "app"), ("method", "GET"), ("status_class", "none"), ("tenant", t)]
    }
    // Each VM flushes its batched counters on its tick, one series' requests
    // and then its errors, as separate hostcalls: a scrape can fall between
    // the two. Wait until every expected series is flushed, then assert.
    let text = wait_for("two abandoned streams and one answer counted", Duration::from_secs(20), || {
        let t = prometheus_text(&envoy);
        let total = |name| samples(&t, name).iter().map(|(_, v)| v).sum::<f64>();
        (try_value(&t, REQ, &none("gone-2")) == Some(1.0) && total(REQ) >= 3.0 && total(ERR) >= 2.0).then_some(t)
    });
    assert_eq!(value(&text, REQ, &none("gone-1")), 1.0);
    assert_eq!(value(&text, ERR, &none("gone-1")), 1.0);
    assert_eq!(value(&text, ERR, &none("gone-2")), 1.0);
    let ok = [("route", "app"), ("cluster", "app"), ("method", "GET"), ("status_class", "2xx"), ("tenant", "gone-1")];
    assert_eq!(value(&text, REQ, &ok), 1.0);
    assert_eq!(try_value(&text, ERR, &ok), None);
    assert_eq!(samples(&text, REQ).iter().map(|(_, v)| v).sum::<f64>(), 3.0);
}

#[test]
fn legacy_json_and_key_value_stats_become_prometheus_text() {
    let app = Arc::new(App::default());
    let (_up, envoy) = start(&app, |b| b);
    let mut c = Client::new(envoy.port("ingress"));

    let r = c.get("/metrics", &[("accept-encoding", "gzip")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = r.text();
    let (code, out) = promtool(&text);
    assert_eq!(code, 0, "promtool on /metrics:\n{out}\n{text}");
    assert_eq!(value(&text, "app_requests_total", &[]), 42.0);
    assert_eq!(value(&text, "app_errors_total", &[]), 1.0);
    assert_eq!(value(&text, "app_queue_depth", &[]), 3.0);
    assert_eq!(value(&text, "meshpatterns_legacy_stats_parse_ok", &[]), 1.0);
    assert!(text.contains("# HELP app_queue_depth Jobs waiting in the app's queue.\n# TYPE app_queue_depth gauge\n"), "{text}");
    assert!(text.contains("# TYPE app_requests_total counter\n"), "{text}");
    assert!(!text.contains("version") && !text.contains("jobs"), "unknown keys are skipped for /metrics: {text}");
    {
        let seen = app.stats_requests.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].path, "/stats", "the app is asked on its own stats path");
        assert_eq!(seen[0].header("accept-encoding"), None, "the filter needs the body uncompressed");
    }
    assert_eq!(c.get("/metrics?debug=1", &[]).status, 200);
    assert_eq!(app.stats_requests.lock().unwrap()[1].path, "/stats?debug=1");

    let info = c.get("/metrics/info", &[]);
    assert_eq!(info.status, 200);
    let text = info.text();
    let (code, out) = promtool(&text);
    assert_eq!(code, 0, "promtool on /metrics/info:\n{out}\n{text}");
    assert_eq!(value(&text, "app_info_total_connections_received_total", &[]), 9.0);
    assert_eq!(value(&text, "app_info_connected_clients", &[]), 2.0);
    // Unknown keys become gauges for this endpoint, sub-fields included.
    assert_eq!(value(&text, "app_info_uptime_in_seconds", &[]), 120.0);
    assert_eq!(value(&text, "app_info_db0_keys", &[]), 3.0);
    assert_eq!(value(&text, "app_info_db0_expires", &[]), 1.0);

    // A body in many chunks is buffered whole, then rewritten.
    app.stats_mode.store(BIG, Ordering::SeqCst);
    let big = c.get("/metrics", &[]);
    assert_eq!(big.status, 200);
    let text = big.text();
    assert_eq!((value(&text, "app_requests_total", &[]), value(&text, "app_queue_depth", &[])), (7.0, 11.0), "{text}");
    assert!(text.len() < 2000, "only the exposition is sent: {} bytes", text.len());
    app.stats_mode.store(VALID, Ordering::SeqCst);

    // Other paths are the app's, untouched.
    let other = c.get("/stats-like", &[]);
    assert_eq!(other.json()["path"], "/stats-like");
    wait_for("4 rewritten bodies counted", Duration::from_secs(10), || {
        (envoy.stat("meshpatterns_legacy_stats.rewritten_total") == 4).then_some(())
    });
    assert_eq!(envoy.stat("meshpatterns_legacy_stats.parse_errors_total"), 0);
}

#[test]
fn malformed_or_oversized_stats_give_an_error_metric_not_a_crash() {
    let app = Arc::new(App::default());
    let (_up, envoy) = start(&app, |b| b.replace(r#""unknownKeys": "skip""#, r#""unknownKeys": "skip", "maxBodyBytes": 4096"#));
    let mut c = Client::new(envoy.port("ingress"));

    app.stats_mode.store(MALFORMED, Ordering::SeqCst);
    let r = c.get("/metrics", &[]);
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.starts_with("# meshpatterns metrics-adapter: body is not valid JSON (EOF while parsing"), "{text}");
    assert_eq!(value(&text, "meshpatterns_legacy_stats_parse_ok", &[]), 0.0);
    assert!(!text.contains("app_requests_total"), "{text}");
    let (code, out) = promtool(&text);
    assert_eq!(code, 0, "the error exposition is valid:\n{out}\n{text}");

    // 100 kB arrives in several chunks: the first ones over 4 kB are replaced
    // by the error exposition, the rest dropped.
    app.stats_mode.store(LARGE, Ordering::SeqCst);
    let r = c.get("/metrics", &[]);
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.starts_with("# meshpatterns metrics-adapter: the app's /stats body has more than 4096 bytes"), "{text}");
    assert!(text.len() < 1000, "nothing of the app's body follows: {} bytes", text.len());
    assert_eq!(promtool(&text).0, 0, "{text}");

    // An app error passes through for the scraper to see.
    app.stats_mode.store(FAILING, Ordering::SeqCst);
    let r = c.get("/metrics", &[]);
    assert_eq!((r.status, r.text().as_str()), (503, "stats unavailable\n"));

    wait_for("error counters", Duration::from_secs(10), || {
        (envoy.stat("meshpatterns_legacy_stats.parse_errors_total") == 2
            && envoy.stat("meshpatterns_legacy_stats.upstream_errors_total") == 1)
            .then_some(())
    });
    let prom = prometheus_text(&envoy);
    assert_eq!(value(&prom, "meshpatterns_legacy_stats_parse_errors_total", &[]), 2.0);

    // The filter is still alive in both workers: 20 more scrapes over new connections all parse.
    app.stats_mode.store(VALID, Ordering::SeqCst);
    for _ in 0..20 {
        let r = Client::new(envoy.port("ingress")).get("/metrics", &[]);
        assert_eq!(value(&r.text(), "meshpatterns_legacy_stats_parse_ok", &[]), 1.0, "{}", r.text());
    }
    assert!(!envoy.log().contains("panic"), "{}", envoy.log());
}

#[test]
fn header_label_cardinality_is_capped_across_workers() {
    let app = Arc::new(App::default());
    let (_up, envoy) = start(&app, |b| b);
    let port = envoy.port("ingress");
    // 12 tenants, 3 requests each, every request on a new connection so both
    // worker threads (separate VMs) see tenants. The cap is 5 per Envoy.
    let mut sent = BTreeSet::new();
    for round in 0..3 {
        for t in 0..12 {
            let tenant = if t == 0 { "Acme Corp.eu".to_string() } else { format!("tenant-{t}") };
            sent.insert(metrics_adapter::logic::sanitize_value(&tenant));
            let r = Client::new(port).get(&format!("/r{round}"), &[("x-tenant", &tenant)]);
            assert_eq!(r.status, 200);
        }
    }
    let text = wait_for("36 requests counted", Duration::from_secs(20), || {
        let t = prometheus_text(&envoy);
        let total: f64 = samples(&t, REQ).iter().filter(|(l, _)| l["route"] == "app").map(|(_, v)| v).sum();
        (total == 36.0).then_some(t)
    });
    let by_tenant: BTreeMap<String, f64> =
        samples(&text, REQ).into_iter().filter(|(l, _)| l["route"] == "app").map(|(l, v)| (l["tenant"].clone(), v)).collect();
    let admitted: Vec<&String> = by_tenant.keys().filter(|t| *t != "other").collect();
    eprintln!("tenant series: {by_tenant:?}");
    assert_eq!(admitted.len(), 5, "exactly maxValues tenants keep their own series: {by_tenant:?}");
    assert!(admitted.iter().all(|t| sent.contains(*t)), "{admitted:?} not all among {sent:?}");
    // A tenant is admitted on its first request or never: 5 × 3 own, 7 × 3 other.
    assert!(admitted.iter().all(|t| by_tenant[*t] == 3.0), "{by_tenant:?}");
    assert_eq!(by_tenant.get("other"), Some(&21.0));
    // Values are sanitised: no dots or spaces reach the stat name.
    assert!(!text.contains("Acme Corp"), "raw value leaked");
}

#[test]
fn shipped_stats_tags_are_the_ones_the_filter_generates() {
    let text = EnvoyBuilder::new(CONFIG).endpoint_ports("APP", &[1]).render();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let shipped: Vec<(String, String)> = doc["stats_config"]["stats_tags"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| (t["tag_name"].as_str().unwrap().to_string(), t["regex"].as_str().unwrap().to_string()))
        .collect();
    let json = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
        ["config"]["configuration"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    // Through the pipeline module the filter's config is its only stage.
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    if meshpatterns_tests::pipeline::enabled() {
        v = v["stages"][0]["metrics"].take();
    }
    let c: metrics_adapter::logic::Config = meshpatterns_core::error::parse_json(v.to_string().as_bytes()).unwrap();
    let s = metrics_adapter::logic::Settings::try_from_config(c).unwrap();
    let generated: Vec<(String, String)> = metrics_adapter::logic::stats_tags(&s).into_iter().map(|t| (t.tag_name, t.regex)).collect();
    assert_eq!(shipped, generated, "envoy/{CONFIG}: stats_tags differ from metrics_adapter::logic::stats_tags");
    eprintln!("label sets bounded by {}", s.max_label_sets());
}

#[test]
fn invalid_config_is_refused_naming_the_field() {
    let b = EnvoyBuilder::new(CONFIG).endpoint_ports("APP", &[1]).replace(r#""maxValues": 5"#, r#""maxValues": 0"#);
    let err = b.validate().expect_err("envoy --mode validate must reject maxValues 0");
    let want = meshpatterns_tests::pipeline::in_stage(
        "metrics-adapter",
        "metrics-adapter: invalid plugin config: field `headerLabels[0].maxValues` has value 0; allowed: 1..=1000",
    );
    assert!(err.contains(&want), "{err}");
}

// ---- a real Prometheus server ----

struct Prometheus {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    /// Start Prometheus scraping Envoy's admin /stats/prometheus (job envoy)
    /// and the adapted /metrics through the sidecar (job app) every second.
    fn start(admin_port: u16, ingress_port: u16) -> Prometheus {
        let dir = paths::scratch("prometheus");
        let config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n\
             - job_name: envoy\n  metrics_path: /stats/prometheus\n  static_configs: [{{targets: ['127.0.0.1:{admin_port}']}}]\n\
             - job_name: app\n  metrics_path: /metrics\n  static_configs: [{{targets: ['127.0.0.1:{ingress_port}']}}]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        for attempt in 0..3 {
            // A free port: bind 0, read it, release it (Prometheus cannot report its own).
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let log = std::fs::File::create(dir.join(format!("prometheus-{attempt}.log"))).unwrap();
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.join(format!("data-{attempt}")).display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("run prometheus (Debian package prometheus)");
            let mut p = Prometheus { child: Some(child), port, dir: dir.clone() };
            let ready = wait_for("Prometheus ready or exited", Duration::from_secs(60), || {
                if let Some(Ok(Some(_))) = p.child.as_mut().map(|c| c.try_wait()) {
                    return Some(false);
                }
                match Client::new(port).try_request("GET", "/-/ready", &[], b"") {
                    Ok(r) if r.status == 200 => Some(true),
                    _ => None,
                }
            });
            if ready {
                return p;
            }
            p.stop();
        }
        panic!("Prometheus did not start; logs in {}", dir.display());
    }

    /// An instant query; the result vector.
    fn query(&self, q: &str, time: Option<&str>) -> Vec<serde_json::Value> {
        let mut path = format!("/api/v1/query?query={}", urlencode(q));
        if let Some(t) = time {
            path.push_str(&format!("&time={t}"));
        }
        let r = Client::new(self.port).get(&path, &[]);
        let v = r.json();
        assert_eq!(v["status"], "success", "{q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of a query, or None when it returns no series.
    fn scalar(&self, q: &str, time: Option<&str>) -> Option<f64> {
        let r = self.query(q, time);
        assert!(r.len() <= 1, "{q} returned {} series: {r:?}", r.len());
        r.first().and_then(|s| s["value"][1].as_str()).and_then(|v| v.parse().ok())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- Prometheus files in {} ----", self.dir.display());
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_sidecar_and_promql_gives_the_request_rate() {
    let app = Arc::new(App::default());
    let (_up, envoy) = start(&app, |b| b);
    let ingress = envoy.port("ingress");
    let prom = Prometheus::start(envoy.admin_port, ingress);
    let mut c = Client::new(ingress);
    let sel = r#"meshpatterns_http_requests_total{job="envoy",route="app",method="GET",status_class="2xx",tenant="acme"}"#;

    // One request creates the series; let Prometheus record it at 1 a few times.
    assert_eq!(c.get("/orders", &[("x-tenant", "acme")]).status, 200);
    wait_for("Prometheus holds 3 samples of the new series", Duration::from_secs(90), || {
        (prom.scalar(&format!("count_over_time({sel}[5m])"), None)? >= 3.0).then_some(())
    });
    for _ in 0..200 {
        assert_eq!(c.get("/orders", &[("x-tenant", "acme")]).status, 200);
    }
    wait_for("Prometheus sees 201 requests", Duration::from_secs(60), || (prom.scalar(sel, None)? == 201.0).then_some(()));
    let first_at_201 = prom.scalar(&format!("timestamp({sel})"), None).unwrap();
    let last = wait_for("two more scrapes", Duration::from_secs(60), || {
        let t = prom.scalar(&format!("timestamp({sel})"), None)?;
        (t >= first_at_201 + 1.5).then_some(t)
    });
    // Evaluated at the last sample, over a window holding the whole series:
    // Prometheus extrapolates the counter's start to zero, so the increase is
    // every request (201) and the rate is that over the 300 s window.
    let at = format!("{last:.3}");
    let increase = prom.scalar(&format!("sum(increase({sel}[5m]))"), Some(&at)).unwrap();
    let rate = prom.scalar(&format!("sum(rate({sel}[5m]))"), Some(&at)).unwrap();
    eprintln!("PromQL at {at}: increase = {increase:.2} requests, rate = {rate:.4}/s over 5m (expected 201 and {:.4})", 201.0 / 300.0);
    assert!((increase - 201.0).abs() <= 2.0, "increase {increase} not 201 ± 2");
    assert!((rate - 201.0 / 300.0).abs() <= 2.0 / 300.0, "rate {rate} not {} ± 0.0067", 201.0 / 300.0);
    // The duration histogram holds every request too.
    let hist = format!("sum({DUR}_count{{job=\"envoy\",route=\"app\",tenant=\"acme\"}})");
    wait_for("histogram count 201 in Prometheus", Duration::from_secs(30), || (prom.scalar(&hist, None)? == 201.0).then_some(()));

    // The app's own stats, adapted, scraped through its sidecar.
    // (Each query waits: on a loaded machine a scrape can time out, which
    // marks the target's series stale until the next one.)
    let expect = |q: &str, want: f64| {
        wait_for(&format!("{q} == {want}"), Duration::from_secs(30), || (prom.scalar(q, None)? == want).then_some(()));
    };
    expect(r#"up{job="app"}"#, 1.0);
    expect(r#"app_requests_total{job="app"}"#, 42.0);
    expect(r#"app_queue_depth{job="app"}"#, 3.0);
    expect(r#"meshpatterns_legacy_stats_parse_ok{job="app"}"#, 1.0);
    expect(r#"up{job="envoy"}"#, 1.0);
    // Prometheus's own scrapes of /metrics are counted on their own route.
    let scrapes = r#"sum(meshpatterns_http_requests_total{job="envoy",route="app_stats"}) >= 1"#;
    wait_for(scrapes, Duration::from_secs(30), || prom.scalar(scrapes, None));
}

#[test]
fn header_values_that_are_not_utf8_never_break_the_filter() {
    let app = Arc::new(App::default());
    let (_up, envoy) = start(&app, |b| b);
    let mut c = Client::new(envoy.port("ingress"));
    // A label header whose value is not UTF-8: before the filter read headers
    // through meshpatterns-host, the SDK's get_map_value panicked on it and
    // killed the worker's VM.
    let raw = b"GET /x HTTP/1.1\r\nhost: x\r\nx-tenant: \xff\xfeacme\r\n\r\n";
    for _ in 0..20 {
        assert_eq!(c.raw(raw).unwrap().status, 200);
    }
    for _ in 0..20 {
        assert_eq!(c.get("/x", &[("x-tenant", "acme")]).status, 200);
    }
    let log = envoy.log();
    assert!(!log.contains("panic"), "the filter panicked:\n{log}");
}
