//! A real rate limit service for tests: a redis-server ([`crate::redis`])
//! holding the counters and the `meshpatterns-rls` binary (tests/rls:
//! gRPC `envoy.service.ratelimit.v3` over Kuadrant's Limitador) in front of it.
//!
//! The binary is the tests crate's `rls` bin, so an integration test finds
//! it with `env!("CARGO_BIN_EXE_rls")`.
//!
//! ```no_run
//! use meshpatterns_tests::rls::Rls;
//! # let bin = std::path::Path::new("target/debug/rls");
//! // in an integration test: let bin = env!("CARGO_BIN_EXE_rls").as_ref();
//! let limits = "limits: [{domain: meshpatterns, descriptor: [{key: api_key}], max: 100, seconds: 3600}]";
//! let mut rls = Rls::start(bin, limits);
//! // point Envoy's ratelimit cluster at rls.port ...
//! rls.stop(); // calls fail: Envoy's failure mode
//! rls.restart(); // same port, counters kept in Redis
//! rls.redis.restart(); // counters lost
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::redis::RedisServer;

pub struct Rls {
    /// The redis-server holding the counters (restart it to lose them).
    pub redis: RedisServer,
    /// The gRPC port, the same across [`Rls::restart`].
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Rls {
    /// Start a redis-server, then the RLS binary `bin` with the limits file
    /// `limits` (YAML, see tests/rls/src/config.rs) on a port the kernel picks.
    pub fn start(bin: &Path, limits: &str) -> Rls {
        let redis = RedisServer::start();
        let dir = crate::paths::scratch("rls");
        std::fs::write(dir.join("limits.yaml"), limits).expect("write limits.yaml");
        let mut rls = Rls { redis, port: 0, bin: bin.to_path_buf(), dir, child: None, starts: 0 };
        rls.spawn("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        rls
    }

    /// Run the binary listening on `listen`; Ok once it printed its bound address.
    fn spawn(&mut self, listen: &str) -> Result<(), String> {
        self.starts += 1;
        let log = self.dir.join(format!("rls-{}.log", self.starts));
        let mut child = Command::new(&self.bin)
            .arg("--config")
            .arg(self.dir.join("limits.yaml"))
            .args(["--redis", &format!("redis://{}", self.redis.addr()), "--listen", listen])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("rls log file")))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} ({e})", self.bin.display()));
        // The first stdout line is the bound address, printed once it listens.
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let port = line.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        match port {
            Some(port) if port != 0 => {
                self.port = port;
                self.child = Some(child);
                Ok(())
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "meshpatterns-rls did not start on {listen} (first line {line:?}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ))
            }
        }
    }

    /// `127.0.0.1:port`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kill the service (its port closes; calls fail at once).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port, with the same limits and Redis.
    pub fn restart(&mut self) {
        self.stop();
        let listen = self.addr();
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn(&listen) {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("{last}");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().map(|c| c.id()).expect("the RLS is not running");
        let ok = Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Stop the process without closing anything (SIGSTOP): connections stay
    /// open and calls get no answer, as from a service that hangs.
    pub fn freeze(&mut self) {
        self.signal("-STOP");
    }

    /// Let a frozen service run again (SIGCONT).
    pub fn thaw(&mut self) {
        self.signal("-CONT");
    }

    /// What the service wrote to stderr, every run so far.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| std::fs::read_to_string(self.dir.join(format!("rls-{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("--- restarted ---\n")
    }
}

impl Drop for Rls {
    fn drop(&mut self) {
        // SIGKILL ends a frozen process too.
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- meshpatterns-rls log ({}) ----\n{}", self.dir.display(), self.log());
        }
    }
}
