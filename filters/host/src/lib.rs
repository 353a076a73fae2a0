//! The proxy-wasm glue every meshpatterns filter shares.
//!
//! Filters keep their decisions in plain Rust (see `meshpatterns-core` and each
//! filter's `logic` module); this crate is the thin layer that talks to Envoy.
//! Everything here calls `proxy_wasm::hostcalls` directly and turns a failed
//! hostcall into a logged, ignored error: the SDK's context trait methods
//! `unwrap()` hostcall results, and a panic kills the worker's VM. Per-request
//! calls (headers, properties, local replies) go through [`abi`], which never
//! panics, instead of the SDK's `hostcalls`, which panic on unexpected
//! statuses and on header values that are not UTF-8.

pub mod abi;

use std::time::UNIX_EPOCH;

use log::{error, warn};
use meshpatterns_core::error::parse_json;
use meshpatterns_core::{ConfigError, RequestView};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, MetricType};
use serde::de::DeserializeOwned;

/// Install logging and a last-resort panic hook that names the filter.
/// Call once from `proxy_wasm::main!`.
pub fn init(filter: &'static str) {
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(move |info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("{filter}: panic (this VM is now unusable): {info}"));
    }));
}

/// Parse and compile a plugin configuration. On error, log one line naming
/// the filter, the field, the value and what is allowed, and return `None`
/// (the caller's `on_configure` then returns false and Envoy rejects it).
pub fn load_config<C, R>(filter: &str, compile: impl FnOnce(C) -> Result<R, ConfigError>) -> Option<R>
where
    C: DeserializeOwned,
{
    let bytes = match hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX) {
        Ok(b) => b.unwrap_or_default(),
        Err(status) => {
            error!("{filter}: cannot read plugin configuration: {status:?}");
            return None;
        }
    };
    match parse_json::<C>(&bytes).and_then(compile) {
        Ok(r) => Some(r),
        Err(e) => {
            error!("{filter}: {e}");
            None
        }
    }
}

/// A response header as text (bytes that are not UTF-8 replaced); never panics.
pub fn response_header(name: &str) -> Option<String> {
    abi::get_header(MapType::HttpResponseHeaders, name).ok().flatten().map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Every request header, values as text (bytes that are not UTF-8 replaced).
/// Use this, not `hostcalls::get_map`, which panics on such bytes.
pub fn request_headers() -> Vec<(String, String)> {
    abi::get_headers(MapType::HttpRequestHeaders).unwrap_or_default()
}

/// Every header of the response to a `dispatch_http_call`, as text.
pub fn http_call_response_headers() -> Vec<(String, String)> {
    abi::get_headers(MapType::HttpCallResponseHeaders).unwrap_or_default()
}

/// Remove a response header (every copy).
pub fn remove_response_header(name: &str) {
    if let Err(s) = abi::remove_header(MapType::HttpResponseHeaders, name) {
        warn!("cannot remove response header {name}: status {s}");
    }
}

/// The response status code, if the response headers carry a valid one.
pub fn response_status() -> Option<u32> {
    response_header(":status").and_then(|s| s.trim().parse().ok())
}

/// A property as UTF-8 text (`["source", "address"]`, `["xds", "cluster_name"]`).
pub fn property_string(path: &[&str]) -> Option<String> {
    let bytes = abi::get_property(path).ok().flatten()?;
    String::from_utf8(bytes).ok()
}

/// Set a request header, replacing every client-sent copy.
pub fn set_request_header(name: &str, value: &str) {
    if let Err(s) = abi::replace_header(MapType::HttpRequestHeaders, name, value) {
        warn!("cannot set request header {name}: status {s}");
    }
}

/// Remove a request header (every copy).
pub fn remove_request_header(name: &str) {
    if let Err(s) = abi::remove_header(MapType::HttpRequestHeaders, name) {
        warn!("cannot remove request header {name}: status {s}");
    }
}

/// Append a response header (keeps existing copies; right for `set-cookie`).
pub fn add_response_header(name: &str, value: &str) {
    if let Err(s) = abi::add_header(MapType::HttpResponseHeaders, name, value) {
        warn!("cannot add response header {name}: status {s}");
    }
}

/// Set a response header, replacing copies the upstream sent.
pub fn set_response_header(name: &str, value: &str) {
    if let Err(s) = abi::replace_header(MapType::HttpResponseHeaders, name, value) {
        warn!("cannot set response header {name}: status {s}");
    }
}

/// Record a decision in filter state: `name` becomes `wasm.<name>`, printable
/// in access logs as `%FILTER_STATE(wasm.<name>:PLAIN)%`.
pub fn set_filter_state(name: &str, value: &str) {
    if let Err(s) = abi::set_property(&[name], value.as_bytes()) {
        warn!("cannot set filter state {name}: status {s}");
    }
}

/// Ask Envoy to pick the route again after a routing header changed. Envoy
/// 1.40 does this by itself; older Envoys need it. Missing function: ignored.
pub fn clear_route_cache() {
    let _ = abi::call_foreign_function("clear_route_cache");
}

/// Send a local reply.
pub fn send_response(status: u32, headers: &[(&str, &str)], body: &[u8]) {
    if let Err(s) = abi::send_local_response(status, "meshpatterns", headers, body) {
        error!("cannot send local reply {status}: status {s}");
    }
}

/// Wall-clock time from the host, in nanoseconds since the epoch.
pub fn now_nanos() -> u128 {
    hostcalls::get_current_time().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0)
}

/// All request headers, read with one hostcall. Each hostcall costs about
/// 2 µs of Envoy CPU with V8 (measured by `make bench`), so a filter that
/// looks at several headers reads them once through this snapshot instead of
/// one call per header. Repeated `cookie` headers (HTTP/2 splits them) are
/// joined with `"; "`.
pub struct HeaderSnapshot {
    headers: Vec<(String, String)>,
}

impl HeaderSnapshot {
    /// Snapshot the current request's headers.
    pub fn request() -> HeaderSnapshot {
        HeaderSnapshot { headers: request_headers() }
    }

    /// Whether header `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(k, _)| k == name)
    }
}

impl RequestView for HeaderSnapshot {
    fn header(&self, name: &str) -> Option<String> {
        if name == "cookie" {
            let all: Vec<&str> = self.headers.iter().filter(|(k, _)| k == "cookie").map(|(_, v)| v.as_str()).collect();
            return (!all.is_empty()).then(|| all.join("; "));
        }
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
    fn source_address(&self) -> Option<String> {
        property_string(&["source", "address"])
    }
}

/// A counter that counts in the VM and adds to Envoy's stat on [`flush`],
/// which the filter's root context calls from `on_tick`: one hostcall per
/// tick instead of one per request. Stats lag by at most the tick period.
///
/// [`flush`]: BatchedCounter::flush
#[derive(Debug)]
pub struct BatchedCounter {
    id: Option<u32>,
    pending: std::cell::Cell<u64>,
}

impl BatchedCounter {
    pub fn new(name: &str) -> BatchedCounter {
        BatchedCounter { id: hostcalls::define_metric(MetricType::Counter, name).ok(), pending: std::cell::Cell::new(0) }
    }
    pub fn inc(&self) {
        self.pending.set(self.pending.get().saturating_add(1));
    }
    /// Add what was counted since the last flush to Envoy's stat.
    pub fn flush(&self) {
        let n = self.pending.replace(0);
        if let (Some(id), true) = (self.id, n > 0) {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// How often filters with [`BatchedCounter`]s flush them.
pub const FLUSH_PERIOD: std::time::Duration = std::time::Duration::from_millis(500);

/// Start the root context's tick that flushes batched counters.
pub fn start_flush_tick() {
    if let Err(s) = hostcalls::set_tick_period(FLUSH_PERIOD) {
        warn!("cannot start the metrics flush tick: {s:?}");
    }
}

/// A counter defined once per VM; failures to define or increment are ignored
/// (a metric must never take a request down).
#[derive(Debug, Clone, Copy)]
pub struct Counter(Option<u32>);

impl Counter {
    pub fn new(name: &str) -> Counter {
        Counter(hostcalls::define_metric(MetricType::Counter, name).ok())
    }
    pub fn inc(&self) {
        if let Some(id) = self.0 {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

/// A new id for a cookie the filter issues: 16 bytes from the host's CSPRNG
/// as 32 hex digits; if the host cannot provide them, a hash of the time and
/// `context_id` (unique, not secret).
pub fn mint_id(context_id: u32) -> String {
    let mut bytes = [0u8; 16];
    if !random_bytes(&mut bytes) {
        let seed = format!("{}:{context_id}", now_nanos());
        let a = meshpatterns_core::hash::hash64_seeded(seed.as_bytes(), 1);
        let b = meshpatterns_core::hash::hash64_seeded(seed.as_bytes(), 2);
        for (dst, src) in bytes.iter_mut().zip(a.to_le_bytes().into_iter().chain(b.to_le_bytes())) {
            *dst = src;
        }
    }
    meshpatterns_core::cookie::id_from_bytes(&bytes)
}

#[cfg(target_os = "wasi")]
mod wasi {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        pub fn random_get(buf: *mut u8, len: usize) -> u16;
    }
}

/// Fill `buf` with random bytes from the host (WASI `random_get`, which Envoy
/// serves from its CSPRNG). Returns false if the host refused.
pub fn random_bytes(buf: &mut [u8]) -> bool {
    #[cfg(target_os = "wasi")]
    {
        // SAFETY: random_get writes exactly `len` bytes into the buffer we own.
        unsafe { wasi::random_get(buf.as_mut_ptr(), buf.len()) == 0 }
    }
    #[cfg(not(target_os = "wasi"))]
    {
        let _ = buf;
        false
    }
}
