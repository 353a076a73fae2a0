//! Start the real Envoy on a config from `envoy/`, rendered with free ports
//! and the built `.wasm` paths, and talk to its admin API.
//!
//! Templates use `{{NAME}}` placeholders:
//!
//! | placeholder | rendered as |
//! |---|---|
//! | `{{ADMIN_PORT}}`, `{{LISTENER_PORT}}`, any `{{..._PORT}}` | `0` unless set: the kernel picks, the admin API tells |
//! | `{{WASM_DIR}}` | directory of the built `.wasm` files |
//! | `{{ENDPOINTS_X}}` | a flow-style YAML list of `lb_endpoints` for the upstreams given to [`EnvoyBuilder::endpoints`] |
//! | `{{ACCESS_LOG}}` | `/dev/stdout` (captured into the run directory) |

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::paths;
use crate::upstream::Upstream;

/// How long an Envoy may take to become ready before a test gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

pub struct EnvoyBuilder {
    name: String,
    template: String,
    vars: BTreeMap<String, String>,
    replacements: Vec<(String, String)>,
    concurrency: u32,
    extra_args: Vec<String>,
}

impl EnvoyBuilder {
    /// A builder for `envoy/<name>`.
    pub fn new(name: &str) -> EnvoyBuilder {
        let path = paths::envoy_config(name);
        let template = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        EnvoyBuilder::from_template(name, &template)
    }

    pub fn from_template(name: &str, template: &str) -> EnvoyBuilder {
        EnvoyBuilder {
            name: name.into(),
            template: template.into(),
            vars: BTreeMap::new(),
            replacements: Vec::new(),
            concurrency: 2,
            extra_args: Vec::new(),
        }
    }

    pub fn var(mut self, k: &str, v: impl ToString) -> Self {
        self.vars.insert(k.into(), v.to_string());
        self
    }

    /// Point `{{ENDPOINTS_<NAME>}}` at these upstreams.
    pub fn endpoints(self, name: &str, ups: &[Upstream]) -> Self {
        let ports: Vec<u16> = ups.iter().map(|u| u.port).collect();
        self.endpoint_ports(name, &ports)
    }

    pub fn endpoint_ports(self, name: &str, ports: &[u16]) -> Self {
        let list = endpoint_list(ports);
        self.var(&format!("ENDPOINTS_{name}"), list)
    }

    /// Replace text in the rendered config (for a test's variant of a shipped config).
    pub fn replace(mut self, from: &str, to: &str) -> Self {
        self.replacements.push((from.into(), to.into()));
        self
    }

    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra_args.push(a.into());
        self
    }

    /// The rendered config text; panics naming any placeholder left unset
    /// and any replacement that matched nothing.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut rest = self.template.as_str();
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find("}}").unwrap_or_else(|| panic!("{}: unterminated {{{{", self.name));
            let key = after[..end].trim();
            let value = match self.vars.get(key) {
                Some(v) => v.clone(),
                None if key == "WASM_DIR" => paths::wasm_dir().display().to_string(),
                None if key == "ACCESS_LOG" => "/dev/stdout".into(),
                None if key.ends_with("_PORT") => "0".into(),
                None => panic!("{}: placeholder {{{{{key}}}}} has no value", self.name),
            };
            out.push_str(&value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        for (from, to) in &self.replacements {
            assert!(out.contains(from.as_str()), "{}: replacement target {from:?} not found", self.name);
            out = out.replace(from.as_str(), to);
        }
        if crate::pipeline::enabled() {
            out = crate::pipeline::as_pipeline(&out);
        }
        out
    }

    fn write(&self, dir: &std::path::Path) -> PathBuf {
        let cfg = dir.join("envoy.yaml");
        std::fs::write(&cfg, self.render()).expect("write rendered config");
        cfg
    }

    /// `envoy --mode validate` on the rendered config: Ok, or Err with Envoy's output.
    pub fn validate(&self) -> Result<(), String> {
        let dir = paths::scratch("validate");
        let cfg = self.write(&dir);
        let out = Command::new(paths::envoy())
            .args(["--mode", "validate", "-c"])
            .arg(&cfg)
            .args(["--disable-hot-restart", "-l", "warning"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}); run `make envoy` or set ENVOY", paths::envoy().display()));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(())
        } else {
            Err(text)
        }
    }

    /// Start Envoy and wait until it is ready; panics with Envoy's log if it is not.
    pub fn start(self) -> Envoy {
        let name = self.name.clone();
        self.try_start().unwrap_or_else(|log| panic!("Envoy did not start with {name}:\n{log}"))
    }

    /// Start Envoy; Err carries Envoy's log when it exits or is not ready in 30 s.
    pub fn try_start(self) -> Result<Envoy, String> {
        let dir = paths::scratch("envoy");
        let cfg = self.write(&dir);
        let admin_file = dir.join("admin.addr");
        let log = dir.join("envoy.log");
        let stdout = dir.join("stdout.log");
        let child = Command::new(paths::envoy())
            .arg("-c")
            .arg(&cfg)
            .args(["--disable-hot-restart", "--concurrency", &self.concurrency.to_string(), "-l", "info"])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .arg("--log-path")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(Stdio::from(std::fs::File::create(dir.join("stderr.log")).expect("stderr file")))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}); run `make envoy` or set ENVOY", paths::envoy().display()));
        let mut envoy = Envoy { child: Some(child), dir, admin_port: 0, print_log_on_panic: true };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = envoy.child.as_mut().map(|c| c.try_wait()).transpose().map(|o| o.flatten()) {
                envoy.print_log_on_panic = false;
                return Err(format!("Envoy exited with {status}\n{}", envoy.log()));
            }
            if envoy.admin_port == 0 {
                if let Ok(addr) = std::fs::read_to_string(&admin_file) {
                    envoy.admin_port = addr.trim().rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
                }
            }
            if envoy.admin_port != 0 {
                if let Ok((200, _)) = envoy.try_admin("/ready") {
                    return Ok(envoy);
                }
            }
            // Generous: with a test matrix and a build sharing two cores
            // (load average 20), Envoy took more than 30 s to load its modules.
            if start.elapsed() > READY_TIMEOUT {
                envoy.print_log_on_panic = false;
                return Err(format!("Envoy not ready after {} s\n{}", READY_TIMEOUT.as_secs(), envoy.log()));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// `[{endpoint: ...}, ...]` for loopback ports, as flow YAML.
pub fn endpoint_list(ports: &[u16]) -> String {
    let items: Vec<String> =
        ports.iter().map(|p| format!("{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}}}")).collect();
    format!("[{}]", items.join(", "))
}

/// A running Envoy; killed on drop. If the test is panicking, its log is printed.
pub struct Envoy {
    child: Option<Child>,
    pub dir: PathBuf,
    pub admin_port: u16,
    print_log_on_panic: bool,
}

impl Envoy {
    /// Port of listener `name`, as bound (from `/listeners`).
    pub fn port(&self, name: &str) -> u16 {
        let body = self.admin("/listeners?format=json");
        let v: serde_json::Value = serde_json::from_str(&body).expect("listeners JSON");
        v["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == name)
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .unwrap_or_else(|| panic!("no listener named {name} in {body}")) as u16
    }

    pub fn try_admin(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut c = Client::new(self.admin_port);
        let r = c.try_request("GET", path, &[], b"")?;
        Ok((r.status, r.text()))
    }

    pub fn admin(&self, path: &str) -> String {
        match self.try_admin(path) {
            Ok((200, body)) => body,
            other => panic!("admin {path}: {other:?}"),
        }
    }

    pub fn admin_post(&self, path: &str) -> String {
        Client::new(self.admin_port).request("POST", path, &[], b"").text()
    }

    /// Every stat as `name -> value` (counters and gauges).
    pub fn stats(&self) -> BTreeMap<String, u64> {
        self.admin("/stats")
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    /// One counter or gauge, or None when Envoy lists no stat of that name.
    /// Metrics a wasm filter defines are listed under `wasmcustom.` in
    /// `/stats`; either name finds them.
    pub fn try_stat(&self, name: &str) -> Option<u64> {
        let stats = self.stats();
        stats.get(name).or_else(|| stats.get(&format!("wasmcustom.{name}"))).copied()
    }

    /// One counter or gauge; panics naming the stat when it does not exist,
    /// so that a misspelt name (or a metric a filter stopped defining) fails
    /// the test instead of reading as 0.
    pub fn stat(&self, name: &str) -> u64 {
        self.try_stat(name).unwrap_or_else(|| panic!("Envoy has no stat named {name:?} (nor wasmcustom.{name}) in /stats"))
    }

    /// One counter or gauge, 0 when absent. Only for stats that legitimately
    /// come into existence on first use (a filter's per-shard or per-arm
    /// counters, defined when first incremented); use [`Envoy::stat`] for
    /// everything Envoy or a filter defines up front.
    pub fn stat_or_zero(&self, name: &str) -> u64 {
        self.try_stat(name).unwrap_or(0)
    }

    /// Wait until stat `name` exists and reaches exactly `value` (filters
    /// flush batched counters periodically), panicking with the last value
    /// seen, or saying the stat never appeared.
    pub fn wait_stat(&self, name: &str, value: u64) {
        let mut last = None;
        let ok = (0..200).any(|_| {
            last = self.try_stat(name);
            if last == Some(value) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
            false
        });
        match last {
            _ if ok => {}
            Some(last) => panic!("stat {name} is {last}, expected {value}"),
            None => panic!("stat {name} never appeared in /stats (expected {value})"),
        }
    }

    /// Health of each host in `cluster`: `(address, healthy)` from `/clusters`.
    pub fn hosts(&self, cluster: &str) -> Vec<(String, bool)> {
        let prefix = format!("{cluster}::");
        self.admin("/clusters")
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (addr, rest) = rest.split_once("::")?;
                let flags = rest.strip_prefix("health_flags::")?;
                Some((addr.to_string(), flags == "healthy"))
            })
            .collect()
    }

    /// Wait until exactly `n` hosts of `cluster` are healthy, then give the
    /// workers a moment: the main thread's view (`/clusters`) reaches the
    /// worker threads' load balancers asynchronously.
    pub fn wait_healthy(&self, cluster: &str, n: usize) {
        crate::wait_for(&format!("{n} healthy hosts in {cluster}"), Duration::from_secs(20), || {
            (self.hosts(cluster).iter().filter(|(_, h)| *h).count() == n).then_some(())
        });
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Envoy's log so far (the `--log-path` file plus stderr).
    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!("{}{}", read("envoy.log"), read("stderr.log"))
    }

    /// What Envoy wrote to stdout (access logs with `{{ACCESS_LOG}}`).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }

    /// The process id (for RSS and CPU readings).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The Envoy process as the kernel sees it: pid and start time (clock
    /// ticks after boot, field 22 of `/proc/<pid>/stat`). Panics if it has
    /// exited, even if not yet reaped (a zombie).
    pub fn process(&self) -> (u32, u64) {
        let pid = self.pid();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("Envoy (pid {pid}) is gone: {e}"));
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        // After the command name: state is field 3, starttime field 22.
        let state = fields.first().copied().unwrap_or("?");
        assert!(state != "Z" && state != "X", "Envoy (pid {pid}) has exited (state {state})");
        let start = fields.get(19).and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("no start time in /proc/{pid}/stat: {stat}"));
        (pid, start)
    }

    /// How long the Envoy answering the admin port has been serving
    /// (`/server_info`: `uptime_current_epoch`, in whole seconds).
    pub fn uptime(&self) -> Duration {
        let v: serde_json::Value = serde_json::from_str(&self.admin("/server_info")).expect("server_info JSON");
        let text = v["uptime_current_epoch"].as_str().unwrap_or_else(|| panic!("/server_info has no uptime_current_epoch: {v}"));
        let secs: f64 = text.trim_end_matches('s').parse().unwrap_or_else(|_| panic!("/server_info uptime_current_epoch = {text:?}"));
        Duration::from_secs_f64(secs)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() && self.print_log_on_panic {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!(
                "---- Envoy log ({}, last {} lines) ----\n{}\n---- end of Envoy log ----",
                self.dir.display(),
                tail.len(),
                tail.join("\n")
            );
        }
        // A passing test leaves nothing behind (a soak's access log alone runs to
        // hundreds of MB); a failing one keeps its directory for the post-mortem.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
