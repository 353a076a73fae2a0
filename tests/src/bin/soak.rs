//! `make soak`: saturation through every module for a long run, watching
//! Envoy's memory and every answer.
//!
//! One Envoy per module (consistent-hash, experiment-splitter, rate-limiter,
//! shard-router, metrics-adapter and the `meshpatterns` pipeline), each on
//! its shipped config from `envoy/`, all running at the same time in front of
//! real upstream servers. The module's config arrives by ECDS from a watched
//! file (`xds::dynamic_filter_with`, as in `tests/tests/rejected_config.rs`),
//! so that it can be reloaded while traffic flows. Then, for `SOAK_SECONDS`
//! (default 600):
//!
//! - `SOAK_CLIENTS` threads per module (default 3) send requests back to
//!   back over keep-alive connections, keys drawn from 100,000 distinct ones
//!   (a quarter of the requests go to 5 hot keys, so that the rate-limiting
//!   modules limit some keys); each connection is closed by the client after
//!   1 to 40 requests;
//! - one request in 50 is instead an aborted one: a request cut off in its
//!   headers, in its body, or dropped after it was sent (before, and while,
//!   the answer arrives: the last one with unread bytes, which makes the
//!   kernel send a TCP reset);
//! - every `SOAK_RELOAD_SECONDS` (default 20) each module's ECDS file is
//!   replaced: by a config that differs in bytes from the running one (Envoy
//!   builds a new filter config and root context), and every fifth time by an
//!   invalid one (Envoy must reject it and keep the old one);
//! - every 10 s each Envoy's RSS (`VmRSS` of `/proc/<pid>/status`) is sampled.
//!
//! Prints a Markdown table of the RSS samples, the warm-up cut
//! (`SOAK_WARMUP_SECONDS`, default a fifth of the run), each module's
//! largest deviation from its post-warm-up median, and the counts; exits 1
//! when a bound breaks: RSS more than 5 % from the median after warm-up, any
//! answer that is neither 2xx nor an intended 429 (a 429 of a rate-limiting
//! module that carries `retry-after`), any I/O error on a request the client
//! did not abort, a reload not accepted (or an invalid one accepted), an
//! Envoy that restarted, or a panic in Envoy's log.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshpatterns_tests::upstream::Reply;
use meshpatterns_tests::xds::{dynamic_filter_with, DynamicFilter};
use meshpatterns_tests::{paths, Client, Envoy, EnvoyBuilder, Upstream};

const KEYS: u64 = 100_000;
const HOT_KEYS: u64 = 5;
const SAMPLE: Duration = Duration::from_secs(10);
const RSS_BOUND: f64 = 0.05;

/// One module under soak.
struct Spec {
    /// Short name for the tables.
    name: &'static str,
    config: &'static str,
    /// `(placeholder, cluster, replicas)` per upstream cluster.
    clusters: &'static [(&'static str, &'static str, usize)],
    /// Edits of the shipped config.
    replace: &'static [(&'static str, &'static str)],
    /// Whether 429 is an intended answer here.
    limits: bool,
    /// Path and headers of the request for key `k`.
    request: fn(u64) -> Request,
}

/// A request's path and headers.
type Request = (String, Vec<(String, String)>);

fn user(k: u64) -> Vec<(String, String)> {
    vec![("x-user-id".into(), format!("user-{k}"))]
}

const SPECS: &[Spec] = &[
    Spec {
        name: "consistent-hash",
        config: "consistent-hash.yaml",
        clusters: &[("REPLICAS", "replicas", 3)],
        replace: &[],
        limits: false,
        request: |k| (format!("/cart/{k}"), user(k)),
    },
    Spec {
        name: "experiment-splitter",
        config: "experiment-splitter.yaml",
        clusters: &[("CONTROL", "control", 1), ("TREATMENT", "treatment", 1)],
        replace: &[],
        limits: false,
        request: |k| (format!("/checkout/{k}"), user(k)),
    },
    Spec {
        name: "rate-limiter",
        config: "rate-limiter.yaml",
        clusters: &[("APP", "app", 1)],
        // 1 per second with bursts of 2 per API key: the hot keys are
        // limited, the 100,000 others (a few requests each) hardly ever;
        // enough slots that every key has its own bucket.
        replace: &[
            (r#""rate": 600, "per": "minute", "burst": 600"#, r#""rate": 1, "per": "second", "burst": 2"#),
            (r#""slots": 65536"#, r#""slots": 262144"#),
        ],
        limits: true,
        request: |k| (format!("/api/items/{k}"), vec![("x-api-key".into(), format!("key-{k}"))]),
    },
    Spec {
        name: "shard-router",
        config: "shard-router.yaml",
        clusters: &[("SHARD_A", "shard_a", 1), ("SHARD_B", "shard_b", 1), ("SHARD_C", "shard_c", 1)],
        // Health checks that wait 5 s, not 0.5 s: on a machine saturated
        // by the soak itself the upstream threads answer late, and with
        // `healthy_panic_threshold: 0` a shard whose one replica missed a
        // check answers 503 (the upstreams', not the filter's, doing).
        replace: &[("{timeout: 0.5s, interval: 0.5s,", "{timeout: 5s, interval: 0.5s,")],
        limits: false,
        request: |k| (format!("/kv/item-{k}"), Vec::new()),
    },
    Spec {
        name: "metrics-adapter",
        config: "metrics-adapter.yaml",
        clusters: &[("APP", "app", 1)],
        replace: &[],
        limits: false,
        // Eight tenants for a label that keeps five values (the rest overflow).
        request: |k| (format!("/orders/{k}"), vec![("x-tenant".into(), format!("tenant-{}", k % 8))]),
    },
    Spec {
        name: "meshpatterns",
        config: "meshpatterns.yaml",
        clusters: &[("CONTROL", "control", 2), ("TREATMENT", "treatment", 2)],
        replace: &[],
        limits: true,
        request: |k| (format!("/checkout/{k}"), user(k)),
    },
];

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        _ => default,
    }
}

/// A small deterministic generator (xorshift64*), one per client thread.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A key: one request in four to a hot key; the others walk through
    /// all keys (`walk` is the thread's position; the threads of a module
    /// start apart and step by their number, so together they visit every
    /// key once per round).
    fn key(&mut self, walk: &mut u64, stride: u64) -> u64 {
        if self.below(4) == 0 {
            self.below(HOT_KEYS)
        } else {
            *walk += stride;
            *walk % KEYS
        }
    }
}

/// The module's plugin config at version `v`: valid versions differ from
/// one another by trailing spaces after the shipped JSON (a new config to
/// Envoy, the same to the filter); every fifth is invalid JSON.
fn plugin_version(shipped: &str, v: u32) -> String {
    let shipped = shipped.trim_end();
    if is_invalid(v) {
        format!("{shipped} }}")
    } else {
        format!("{shipped}{}", " ".repeat((v % 4) as usize))
    }
}

/// Whether version `v` is an invalid config: every `SOAK_INVALID_EVERY`th
/// (default 5; 0 for none).
fn is_invalid(v: u32) -> bool {
    let every = env_u64("SOAK_INVALID_EVERY", 5);
    every > 0 && u64::from(v).is_multiple_of(every)
}

/// What the clients of one module saw.
#[derive(Default, Clone)]
struct Counts {
    requests: u64,
    ok: u64,
    limited: u64,
    /// Every other answer by status, and I/O errors as "io".
    other: std::collections::BTreeMap<String, u64>,
    /// The first few failures in words.
    examples: Vec<String>,
    /// Connections the client closed after a few requests.
    closes: u64,
    /// Requests aborted on purpose, by how.
    aborts: [u64; 4],
    keys: Vec<bool>,
}

impl Counts {
    fn merge(&mut self, o: Counts) {
        self.requests += o.requests;
        self.ok += o.ok;
        self.limited += o.limited;
        for (k, v) in o.other {
            *self.other.entry(k).or_default() += v;
        }
        for e in o.examples {
            if self.examples.len() < 10 {
                self.examples.push(e);
            }
        }
        self.closes += o.closes;
        for i in 0..4 {
            self.aborts[i] += o.aborts[i];
        }
        if self.keys.is_empty() {
            self.keys = o.keys;
        } else {
            for (a, b) in self.keys.iter_mut().zip(o.keys) {
                *a |= b;
            }
        }
    }
    fn failures(&self) -> u64 {
        self.other.values().sum()
    }
}

const ABORTS: [&str; 4] = ["cut in headers", "cut in body", "closed after sending", "reset while answered"];

/// Open a connection, start a request and abandon it in one of four ways.
fn abort(port: u16, how: usize, path: &str, headers: &[(String, String)]) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let _ = match how {
        // Headers cut off half-way.
        0 => s.write_all(&head.as_bytes()[..head.len() / 2]),
        // A body that promised 4096 bytes and brought 100.
        1 => s.write_all(format!("{head}content-length: 4096\r\n\r\n{}", "x".repeat(100)).as_bytes()),
        // A whole request, closed before the answer.
        2 => s.write_all(format!("{head}\r\n").as_bytes()),
        // A whole request, closed once the answer starts arriving with
        // bytes unread: the kernel answers the close with a reset.
        _ => s.write_all(format!("{head}\r\n").as_bytes()).and_then(|_| s.read_exact(&mut [0u8; 1])),
    };
}

/// The `thread`th of `threads` clients of one module.
fn client_thread(spec: &'static Spec, port: u16, (thread, threads): (u64, u64), stop: Arc<AtomicBool>, progress: Arc<AtomicU64>) -> Counts {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(1 + thread) | 1);
    let mut walk = thread + KEYS - threads;
    let mut c = Counts { keys: vec![false; KEYS as usize], ..Counts::default() };
    let mut client = Client::new(port);
    let mut left = 1 + rng.below(40);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = rng.key(&mut walk, threads);
        let (path, headers) = (spec.request)(key);
        if n.is_multiple_of(50) {
            let how = ((n / 50) % 4) as usize;
            abort(port, how, &path, &headers);
            c.aborts[how] += 1;
            continue;
        }
        c.keys[key as usize] = true;
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        c.requests += 1;
        progress.fetch_add(1, Ordering::Relaxed);
        match client.try_request("GET", &path, &hs, b"") {
            Ok(r) if (200..300).contains(&r.status) => c.ok += 1,
            Ok(r) if r.status == 429 && spec.limits && r.header("retry-after").is_some() => c.limited += 1,
            Ok(r) => {
                *c.other.entry(r.status.to_string()).or_default() += 1;
                if c.examples.len() < 10 {
                    c.examples.push(format!("GET {path}: HTTP {} {:?} {}", r.status, r.headers, r.text()));
                }
            }
            Err(e) => {
                *c.other.entry("io".into()).or_default() += 1;
                if c.examples.len() < 10 {
                    c.examples.push(format!("GET {path}: I/O error: {e}"));
                }
                client = Client::new(port);
            }
        }
        left -= 1;
        if left == 0 {
            client = Client::new(port);
            c.closes += 1;
            left = 1 + rng.below(40);
        }
    }
    c
}

/// One module's running Envoy and what it needs.
struct Running {
    spec: &'static Spec,
    _ups: Vec<Upstream>,
    envoy: Envoy,
    process: (u32, u64),
    /// The module's filter, its config moved into a watched ECDS file.
    filter: DynamicFilter,
    /// ECDS update counters after start: (success, rejected).
    base: (u64, u64),
    progress: Arc<AtomicU64>,
}

impl Running {
    fn ecds_stat(&self, what: &str) -> u64 {
        self.envoy.stat(&self.filter.stat(what))
    }
}

fn start(spec: &'static Spec, concurrency: u32) -> Running {
    let light = Arc::new(|name: &str, _: &meshpatterns_tests::upstream::Request| Reply::new(200, "ok\n").header("x-replica", name));
    let mut ups = Vec::new();
    let mut b = EnvoyBuilder::new(spec.config).concurrency(concurrency).var("ACCESS_LOG", "/dev/null");
    for (var, cluster, n) in spec.clusters {
        let these: Vec<Upstream> = (0..*n).map(|i| Upstream::with_handler(&format!("{cluster}-{i}"), light.clone())).collect();
        b = b.endpoints(var, &these);
        ups.extend(these);
    }
    for (from, to) in spec.replace {
        b = b.replace(from, to);
    }
    let (config, filter) = dynamic_filter_with(&b.render(), |shipped| plugin_version(shipped, 1));
    let envoy = EnvoyBuilder::from_template(spec.config, &config).concurrency(concurrency).start();
    for (_, cluster, n) in spec.clusters {
        envoy.wait_healthy(cluster, *n);
    }
    let process = envoy.process();
    let mut r = Running { spec, _ups: ups, envoy, process, filter, base: (0, 0), progress: Arc::new(AtomicU64::new(0)) };
    r.base = (r.ecds_stat("update_success"), r.ecds_stat("update_rejected"));
    r
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn median(v: &[u64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    let n = s.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2] as f64
    } else {
        (s[n / 2 - 1] + s[n / 2]) as f64 / 2.0
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn main() {
    let seconds = env_u64("SOAK_SECONDS", 600);
    let warmup = env_u64("SOAK_WARMUP_SECONDS", (seconds / 5).max(10) / 10 * 10);
    let clients = env_u64("SOAK_CLIENTS", 3);
    let reload_every = env_u64("SOAK_RELOAD_SECONDS", 20).max(5);
    let concurrency = env_u64("SOAK_CONCURRENCY", 2) as u32;
    let version = std::process::Command::new(paths::envoy())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "# soak: {seconds} s, {} modules at once, Envoy --concurrency {concurrency}, {clients} client threads per module",
        SPECS.len()
    );
    println!("# {version}");
    println!(
        "# keys: {KEYS} distinct, a quarter of the requests to {HOT_KEYS} hot keys; ECDS reload every {reload_every} s (every {}th invalid)", env_u64("SOAK_INVALID_EVERY", 5)
    );

    let running: Vec<Running> = SPECS.iter().map(|s| start(s, concurrency)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (m, r) in running.iter().enumerate() {
        let port = r.envoy.port("ingress");
        for t in 0..clients {
            let (spec, stop, progress) = (r.spec, stop.clone(), r.progress.clone());
            threads.push((m, std::thread::spawn(move || client_thread(spec, port, (t, clients), stop, progress))));
        }
    }

    // Samples every 10 s (t = 0 as the load starts); reloads in between.
    let began = Instant::now();
    let mut samples: Vec<(u64, Vec<u64>)> = Vec::new();
    let mut version = 1u32;
    let (mut valid, mut invalid) = (0u64, 0u64);
    let mut next_reload = reload_every;
    let mut last_done: Vec<u64> = vec![0; running.len()];
    for tick in 0..=seconds / SAMPLE.as_secs() {
        let at = tick * SAMPLE.as_secs();
        while began.elapsed() < Duration::from_secs(at) {
            let now = began.elapsed().as_secs();
            if now >= next_reload && next_reload + 10 <= seconds {
                version += 1;
                for r in &running {
                    r.filter.publish(&plugin_version(r.filter.shipped_config(), version), version);
                }
                if is_invalid(version) {
                    invalid += 1;
                } else {
                    valid += 1;
                }
                next_reload += reload_every;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let rss: Vec<u64> = running.iter().map(|r| rss_kib(r.process.0)).collect();
        let done: Vec<u64> = running.iter().map(|r| r.progress.load(Ordering::Relaxed)).collect();
        let rates: Vec<String> = done.iter().zip(&last_done).map(|(d, l)| format!("{}", (d - l) / SAMPLE.as_secs())).collect();
        eprintln!(
            "t={at:>4}s RSS MiB {} | req/s {} | reloads {}",
            rss.iter().map(|k| mib(*k)).collect::<Vec<_>>().join(" "),
            rates.join(" "),
            valid + invalid
        );
        last_done = done;
        samples.push((at, rss));
    }
    stop.store(true, Ordering::SeqCst);
    let mut counts: Vec<Counts> = vec![Counts::default(); running.len()];
    for (m, t) in threads {
        match t.join() {
            Ok(c) => counts[m].merge(c),
            Err(_) => panic!("a client thread of {} panicked", SPECS[m].name),
        }
    }

    let mut broken: Vec<String> = Vec::new();
    // The table of samples.
    println!("\n## RSS (MiB) every {} s; warm-up: the first {warmup} s\n", SAMPLE.as_secs());
    println!("| t (s) | {} |", SPECS.iter().map(|s| s.name).collect::<Vec<_>>().join(" | "));
    println!("|---:|{}", "---:|".repeat(SPECS.len()));
    for (at, rss) in &samples {
        let mark = if *at < warmup { " (warm-up)" } else { "" };
        println!("| {at}{mark} | {} |", rss.iter().map(|k| mib(*k)).collect::<Vec<_>>().join(" | "));
    }
    println!("\n## Per module\n");
    println!(
        "| module | RSS start | median after warm-up | min..max after warm-up | max deviation | requests | 2xx | intended 429 | other non-2xx | distinct keys | closes after a few requests | aborted requests ({}) | reloads accepted / written | invalid rejected / written |",
        ABORTS.join(" / ")
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|");
    for (m, r) in running.iter().enumerate() {
        let name = r.spec.name;
        let series: Vec<u64> = samples.iter().map(|(_, s)| s[m]).collect();
        let post: Vec<u64> = samples.iter().filter(|(at, _)| *at >= warmup).map(|(_, s)| s[m]).collect();
        let med = median(&post);
        let dev = post.iter().map(|k| (*k as f64 - med).abs() / med).fold(0.0, f64::max);
        let (lo, hi) = (post.iter().min().copied().unwrap_or(0), post.iter().max().copied().unwrap_or(0));
        if post.is_empty() || dev > RSS_BOUND {
            broken.push(format!(
                "{name}: RSS deviates {:.1} % from its post-warm-up median {} MiB (bound 5 %)",
                dev * 100.0,
                mib(med as u64)
            ));
        }
        // Every reload seen by Envoy (the last one at least 10 s ago).
        let want = (r.base.0 + valid, r.base.1 + invalid);
        let got = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let got = (r.ecds_stat("update_success"), r.ecds_stat("update_rejected"));
                if got == want || Instant::now() > deadline {
                    break got;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        if got != want {
            broken.push(format!(
                "{name}: ECDS updates accepted {} rejected {}, expected {} and {}",
                got.0 - r.base.0,
                got.1 - r.base.1,
                valid,
                invalid
            ));
        }
        let c = &counts[m];
        if c.failures() > 0 {
            broken.push(format!("{name}: {} answers neither 2xx nor an intended 429: {:?}; e.g. {:#?}", c.failures(), c.other, c.examples));
        }
        if r.spec.limits && c.limited == 0 {
            broken.push(format!("{name}: no request was limited (the soak's config should limit the hot keys)"));
        }
        if std::fs::read_to_string(format!("/proc/{}/stat", r.process.0)).is_err() || r.envoy.process() != r.process {
            broken.push(format!("{name}: Envoy is not the process that started"));
        }
        let panics =
            r.envoy.log().lines().filter(|l| l.contains("panicked") || l.contains("wasm trap") || l.contains("Function: ")).count();
        if panics > 0 {
            broken.push(format!("{name}: {panics} panic/trap lines in Envoy's log ({})", r.envoy.dir.display()));
        }
        let other = if c.other.is_empty() { "0".to_string() } else { format!("{:?}", c.other) };
        println!(
            "| {name} | {} | {} | {}..{} | {:.2} % | {} | {} | {} | {other} | {} | {} | {} | {} / {valid} | {} / {invalid} |",
            mib(series.first().copied().unwrap_or(0)),
            mib(med as u64),
            mib(lo),
            mib(hi),
            dev * 100.0,
            c.requests,
            c.ok,
            c.limited,
            c.keys.iter().filter(|k| **k).count(),
            c.closes,
            c.aborts.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" / "),
            got.0 - r.base.0,
            got.1 - r.base.1,
        );
    }
    let total = counts.iter().fold(Counts::default(), |mut a, c| {
        let mut c = c.clone();
        c.keys.clear();
        a.merge(c);
        a
    });
    println!(
        "\nTotal: {} requests, {} 2xx, {} intended 429, {} other non-2xx or I/O errors; {} connections closed by the client after a few requests, {} requests aborted ({}); {} reloads written per module ({valid} valid, {invalid} invalid).",
        total.requests,
        total.ok,
        total.limited,
        total.failures(),
        total.closes,
        total.aborts.iter().sum::<u64>(),
        ABORTS.iter().zip(total.aborts).map(|(n, a)| format!("{n} {a}")).collect::<Vec<_>>().join(", "),
        valid + invalid,
    );
    if broken.is_empty() {
        println!("\nPASS: RSS within 5 % of the post-warm-up median, no answer but 2xx and intended 429, every reload accepted or (invalid) rejected.");
    } else {
        println!("\nFAIL:");
        for b in &broken {
            println!("- {b}");
        }
        std::process::exit(1);
    }
}
