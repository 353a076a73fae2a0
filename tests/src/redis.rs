//! A real `redis-server` (Debian package `redis-server`) for tests: started
//! on a free loopback port with no persistence, stopped and restarted on the
//! same port by its handle, and spoken to over plain RESP.
//!
//! ```no_run
//! use meshpatterns_tests::redis::RedisServer;
//! let mut redis = RedisServer::start();
//! assert_eq!(redis.command(&["PING"]).unwrap(), "+PONG");
//! redis.stop();
//! redis.restart();
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Start redis-server on a port the kernel picked a moment ago (retrying
    /// with another port if someone else took it in between).
    pub fn start() -> RedisServer {
        let dir = crate::paths::scratch("redis");
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
            let mut r = RedisServer { port, dir: dir.clone(), child: None };
            if r.try_spawn() {
                return r;
            }
        }
        panic!("redis-server did not start; see {}", dir.join("redis.log").display());
    }

    fn try_spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--logfile", "redis.log"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}); install the Debian package `redis-server`"));
        self.child = Some(child);
        for _ in 0..100 {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if self.command(&["PING"]).is_ok_and(|r| r == "+PONG") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        false
    }

    /// `127.0.0.1:port`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kill the server (connections drop, the port closes).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.stop();
        let ok = (0..20).any(|_| {
            let ok = self.try_spawn();
            if !ok {
                std::thread::sleep(Duration::from_millis(250));
            }
            ok
        });
        assert!(ok, "redis-server did not restart on port {}; see {}", self.port, self.dir.join("redis.log").display());
    }

    /// Send one command and return the first reply line (`+OK`, `:1`, `$-1`, ...).
    pub fn command(&self, args: &[&str]) -> std::io::Result<String> {
        command(self.port, args)
    }
}

/// Send one command to whatever speaks RESP on `127.0.0.1:port` (a
/// redis-server, or Envoy's redis_proxy) and return the first reply line.
pub fn command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    (&s).write_all(req.as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
