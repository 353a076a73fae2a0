//! A small HTTP/1.1 client with one keep-alive connection, giving tests full
//! control over the headers they send and every header they get back
//! (including repeated ones such as `set-cookie`).
//!
//! Nothing is hidden: a request that fails on a fresh connection fails the
//! test. Only an idempotent request (GET, HEAD, OPTIONS) that fails on a
//! connection kept alive from an earlier request is sent once more on a new
//! connection, and every such retry is counted ([`Client::retries`],
//! [`retries_total`]) and printed. A kept-alive connection the server has
//! already closed is noticed before a request is written to it, and counted
//! as a reconnect ([`Client::reconnects`]), for any method.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static RETRIES: AtomicU64 = AtomicU64::new(0);

/// Retries made by every [`Client`] of this test binary so far.
pub fn retries_total() -> u64 {
    RETRIES.load(Ordering::SeqCst)
}

/// Methods that may be sent twice (RFC 9110 9.2.2; PUT and DELETE are
/// idempotent by contract but the tests' upstreams count them, so they are
/// never repeated behind the test's back).
fn retryable(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS")
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased, in order, repeats kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }
    /// Which upstream replica answered (`x-replica`), or "" for a local reply.
    pub fn replica(&self) -> &str {
        self.header("x-replica").unwrap_or("")
    }
}

pub struct Client {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
    pub host: String,
    retries: u64,
    reconnects: u64,
}

impl Client {
    pub fn new(port: u16) -> Client {
        Client { port, conn: None, host: "localhost".into(), retries: 0, reconnects: 0 }
    }

    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request("GET", path, headers, b"")
    }

    /// Idempotent requests this client sent a second time after the first
    /// attempt failed on a kept-alive connection.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Kept-alive connections found closed by the server before a request
    /// was written to them (replaced by a new connection, nothing resent).
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Send a request and read the response; panics on an I/O error. A GET,
    /// HEAD or OPTIONS that fails on a kept-alive connection is retried once
    /// on a new one (counted and printed); anything else fails at once.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let reused = self.conn.is_some();
        match self.try_request(method, path, headers, body) {
            Ok(r) => r,
            Err(e) if reused && retryable(method) => {
                self.conn = None;
                self.retries += 1;
                let n = RETRIES.fetch_add(1, Ordering::SeqCst) + 1;
                eprintln!(
                    "client: {method} {path} to 127.0.0.1:{} failed on a kept-alive connection ({e}); retrying on a new one (retry {n} of this test binary)",
                    self.port
                );
                self.try_request(method, path, headers, body)
                    .unwrap_or_else(|e| panic!("{method} {path} to 127.0.0.1:{} failed twice; the retry: {e}", self.port))
            }
            Err(e) => {
                self.conn = None;
                let how = if reused { "on a kept-alive connection; not retried: not idempotent" } else { "on a new connection" };
                panic!("{method} {path} to 127.0.0.1:{} failed {how}: {e}", self.port)
            }
        }
    }

    /// Send raw request bytes (for malformed input: non-UTF-8 header values,
    /// odd framing) on a fresh connection and read one response.
    pub fn raw(&mut self, request: &[u8]) -> std::io::Result<Response> {
        self.conn = None;
        let s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut conn = BufReader::new(s);
        conn.get_mut().write_all(request)?;
        read_response(&mut conn, false)
    }

    /// Send a request once and read the response: no retry. A kept-alive
    /// connection the server has closed in the meantime is replaced first.
    pub fn try_request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<Response> {
        if self.conn.as_ref().is_some_and(|c| !still_open(c)) {
            self.conn = None;
            self.reconnects += 1;
            eprintln!("client: 127.0.0.1:{} closed the kept-alive connection; {method} {path} goes on a new one", self.port);
        }
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().ok_or_else(|| std::io::Error::other("no connection"))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n", self.host, body.len());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        conn.get_mut().write_all(&bytes)?;
        let resp = read_response(conn, method == "HEAD")?;
        if resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            self.conn = None;
        }
        Ok(resp)
    }
}

/// Whether the server still holds an idle kept-alive connection open: a
/// non-blocking peek sees end-of-file or an error once it has closed it.
/// (Unread bytes would be a framing error; they also count as not open.)
fn still_open(conn: &BufReader<TcpStream>) -> bool {
    if !conn.buffer().is_empty() {
        return false;
    }
    let s = conn.get_ref();
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let open = matches!(s.peek(&mut [0u8; 1]), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).is_ok() && open
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

fn read_response(r: &mut BufReader<TcpStream>, head_only: bool) -> std::io::Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(bad("connection closed before the status line"));
    }
    let status: u16 =
        line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').ok_or_else(|| bad("bad header line"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v): &(String, String)| v.clone());
    let mut body = Vec::new();
    if head_only || status == 204 || status == 304 {
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16).map_err(|_| bad("bad chunk size"))?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            body.extend_from_slice(&chunk);
        }
    } else if let Some(len) = find("content-length") {
        let n: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Response { status, headers, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that answers the first request on each connection and then
    /// drops the connection when the second one arrives, without answering:
    /// a kept-alive connection broken under a request.
    fn answer_once_then_drop() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream);
                    for n in 0.. {
                        let mut line = String::new();
                        while r.read_line(&mut line).is_ok_and(|l| l > 0) && !line.ends_with("\r\n\r\n") {}
                        if line.is_empty() || n == 1 {
                            return; // drop the connection
                        }
                        let _ = r.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    }
                });
            }
        });
        port
    }

    #[test]
    fn only_idempotent_requests_are_retried_and_every_retry_is_counted() {
        let port = answer_once_then_drop();
        let mut c = Client::new(port);
        assert_eq!(c.get("/", &[]).status, 200);
        // The second GET meets the broken connection: retried once, counted.
        assert_eq!(c.get("/", &[]).status, 200);
        assert_eq!((c.retries(), c.reconnects()), (1, 0));
        // A POST in the same situation fails: it may have been processed.
        let before = retries_total();
        let post = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.request("POST", "/orders", &[], b"{}")));
        let msg = post.expect_err("a POST on a broken kept-alive connection must fail");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("POST /orders") && msg.contains("not retried: not idempotent"), "{msg}");
        assert_eq!((c.retries(), retries_total() - before), (1, 0));
        // A request that fails on a fresh connection is not retried either.
        let refused = std::panic::catch_unwind(|| Client::new(closed_port()).get("/", &[]));
        assert!(refused.is_err());
    }

    /// A port nobody listens on (bound, then released).
    fn closed_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn a_connection_the_server_closed_is_replaced_before_sending() {
        // Answers one request per connection with `connection: keep-alive`
        // semantics, then closes it while idle.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|l| l > 0) && !line.ends_with("\r\n\r\n") {}
                let _ = r.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
            }
        });
        let mut c = Client::new(port);
        assert_eq!(c.request("POST", "/a", &[], b"x").status, 200);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(c.request("POST", "/b", &[], b"x").status, 200, "the POST goes on a new connection, sent once");
        assert_eq!((c.retries(), c.reconnects()), (0, 1));
    }
}
