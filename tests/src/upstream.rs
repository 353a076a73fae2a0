//! Real upstream HTTP/1.1 servers on loopback that say which replica answered.
//!
//! Each server answers `GET /healthz` with 200 while healthy and 503 after
//! [`Upstream::set_healthy`]`(false)`; every other request gets 200 with a
//! `x-replica` header naming the server and a JSON body echoing the method,
//! path and request headers, so tests can see exactly what Envoy forwarded.
//! A custom handler can replace that behaviour per server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// What a handler answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply { status, headers: Vec::new(), body: body.into() }
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// A request handler: gets the server's name and the request.
pub type Handler = Arc<dyn Fn(&str, &Request) -> Reply + Send + Sync>;

struct Shared {
    name: String,
    healthy: AtomicBool,
    stopped: AtomicBool,
    hits: AtomicU64,
    health_checks: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
}

/// A running upstream server. Cloning shares the same server; it stops when
/// [`Upstream::stop`] is called or the last handle is dropped.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
    pub port: u16,
    _guard: Arc<StopOnDrop>,
}

struct StopOnDrop(Arc<Shared>, u16);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        stop(&self.0, self.1);
    }
}

fn stop(shared: &Shared, port: u16) {
    if shared.stopped.swap(true, Ordering::SeqCst) {
        return;
    }
    let _ = TcpStream::connect(("127.0.0.1", port)); // unblock accept()
    if let Ok(conns) = shared.conns.lock() {
        for c in conns.iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Upstream {
    /// Start a server named `name` with the default echo handler.
    pub fn start(name: &str) -> Upstream {
        Upstream::with_handler(name, Arc::new(echo))
    }

    /// Start `n` servers named `{prefix}-0` .. `{prefix}-{n-1}`.
    pub fn start_many(prefix: &str, n: usize) -> Vec<Upstream> {
        (0..n).map(|i| Upstream::start(&format!("{prefix}-{i}"))).collect()
    }

    /// Start a server whose non-health requests go to `handler`.
    pub fn with_handler(name: &str, handler: Handler) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream on 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            healthy: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            health_checks: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let up = Upstream { shared: shared.clone(), port, _guard: Arc::new(StopOnDrop(shared.clone(), port)) };
        // The acceptor holds only the shared state, not a handle, so dropping
        // the last handle stops it.
        let weak_up = (shared.clone(),);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if weak_up.0.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let _ = stream.set_nodelay(true);
                if let Ok(c) = stream.try_clone() {
                    if let Ok(mut conns) = weak_up.0.conns.lock() {
                        conns.retain(|s| s.peer_addr().is_ok());
                        conns.push(c);
                    }
                }
                let view = UpstreamView { shared: weak_up.0.clone() };
                let handler = handler.clone();
                thread::spawn(move || serve(stream, view, handler));
            }
        });
        up
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// `127.0.0.1:port`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Make `/healthz` answer 200 (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Requests served, not counting health checks.
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Health checks answered.
    pub fn health_checks(&self) -> u64 {
        self.shared.health_checks.load(Ordering::SeqCst)
    }

    /// Stop accepting and close open connections.
    pub fn stop(&self) {
        stop(&self.shared, self.port);
    }
}

/// The default reply: 200, `x-replica: <name>`, JSON echo of the request.
pub fn echo(name: &str, r: &Request) -> Reply {
    let headers: serde_json::Map<String, serde_json::Value> =
        r.headers.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
    let body = serde_json::json!({"replica": name, "method": r.method, "path": r.path, "headers": headers});
    Reply::new(200, body.to_string()).header("content-type", "application/json").header("x-replica", name)
}

/// What a connection thread needs (not a handle: it must not keep the server alive).
struct UpstreamView {
    shared: Arc<Shared>,
}

fn serve(stream: TcpStream, view: UpstreamView, handler: Handler) {
    let Ok(write_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut writer = write_half;
    serve_requests(&mut reader, &mut writer, &view, &handler);
    // The acceptor keeps a clone of every socket for stop(); close explicitly.
    let _ = writer.shutdown(Shutdown::Both);
}

fn serve_requests(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream, view: &UpstreamView, handler: &Handler) {
    loop {
        let Some(req) = read_request(reader) else { return };
        if view.shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = if req.path == "/healthz" {
            view.shared.health_checks.fetch_add(1, Ordering::SeqCst);
            if view.shared.healthy.load(Ordering::SeqCst) {
                Reply::new(200, "ok\n")
            } else {
                Reply::new(503, "unhealthy\n")
            }
        } else {
            view.shared.hits.fetch_add(1, Ordering::SeqCst);
            handler(&view.shared.name, &req)
        };
        let mut head = format!("HTTP/1.1 {} {}\r\ncontent-length: {}\r\n", reply.status, reason(reply.status), reply.body.len());
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if close {
            head.push_str("connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&reply.body);
        if writer.write_all(&out).is_err() || close {
            return;
        }
    }
}

/// One line, with bytes that are not UTF-8 replaced (clients may send them).
fn read_line_lossy(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut buf = Vec::new();
    if r.read_until(b'\n', &mut buf).ok()? == 0 {
        return None;
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let line = read_line_lossy(r)?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let h = read_line_lossy(r)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Request { method, path, headers, body })
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
