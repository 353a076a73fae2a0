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

use std::time::{SystemTime, UNIX_EPOCH};

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

/// The current HTTP request, read through hostcalls.
pub struct HostRequest;

impl RequestView for HostRequest {
    /// Header bytes that are not UTF-8 are replaced with U+FFFD: the same
    /// bytes always give the same key, and nothing panics.
    fn header(&self, name: &str) -> Option<String> {
        abi::get_header(MapType::HttpRequestHeaders, name).ok().flatten().map(|b| String::from_utf8_lossy(&b).into_owned())
    }
    fn source_address(&self) -> Option<String> {
        property_string(&["source", "address"])
    }
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

/// Wall-clock time from the host.
pub fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
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
