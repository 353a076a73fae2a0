//! The proxy-wasm ABI 0.2.1 calls meshpatterns makes, wrapped so they never
//! panic: each returns the host's status instead of assuming success, and
//! header values are bytes, never assumed to be text.
//!
//! This is the only file that declares host imports. Native builds (unit
//! tests, clippy, the config tools) get stubs that answer NotFound.

/// A proxy-wasm status code other than Ok (1 NotFound, 2 BadArgument, 8 CasMismatch, ...).
pub type Status = u32;
pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const BAD_ARGUMENT: u32 = 2;
pub const CAS_MISMATCH: u32 = 8;
/// Not a host status: the module cannot do this (no gRPC callbacks exported).
pub const UNSUPPORTED: u32 = 12;

/// Header maps (proxy-wasm `MapType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Map {
    RequestHeaders = 0,
    ResponseHeaders = 2,
    HttpCallResponseHeaders = 6,
    GrpcReceiveInitialMetadata = 4,
    GrpcReceiveTrailingMetadata = 5,
}

/// Buffers (proxy-wasm `BufferType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Buffer {
    ResponseBody = 1,
    HttpCallResponseBody = 4,
    GrpcReceive = 5,
    PluginConfiguration = 7,
}

/// Metric kinds (proxy-wasm `MetricType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MetricKind {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

#[cfg(target_arch = "wasm32")]
mod ffi {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, msg: *const u8, len: usize) -> u32;
        pub fn proxy_get_current_time_nanoseconds(out: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(ms: u32) -> u32;
        pub fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, out: *mut *mut u8, out_len: *mut usize) -> u32;
        pub fn proxy_set_buffer_bytes(kind: u32, start: usize, size: usize, data: *const u8, len: usize) -> u32;
        pub fn proxy_get_header_map_value(map: u32, key: *const u8, key_len: usize, out: *mut *mut u8, out_len: *mut usize) -> u32;
        pub fn proxy_replace_header_map_value(map: u32, key: *const u8, key_len: usize, val: *const u8, val_len: usize) -> u32;
        pub fn proxy_add_header_map_value(map: u32, key: *const u8, key_len: usize, val: *const u8, val_len: usize) -> u32;
        pub fn proxy_remove_header_map_value(map: u32, key: *const u8, key_len: usize) -> u32;
        pub fn proxy_get_header_map_pairs(map: u32, out: *mut *mut u8, out_len: *mut usize) -> u32;
        pub fn proxy_get_property(path: *const u8, path_len: usize, out: *mut *mut u8, out_len: *mut usize) -> u32;
        pub fn proxy_set_property(path: *const u8, path_len: usize, val: *const u8, val_len: usize) -> u32;
        pub fn proxy_get_shared_data(key: *const u8, key_len: usize, out: *mut *mut u8, out_len: *mut usize, cas: *mut u32) -> u32;
        pub fn proxy_set_shared_data(key: *const u8, key_len: usize, val: *const u8, val_len: usize, cas: u32) -> u32;
        pub fn proxy_define_metric(kind: u32, name: *const u8, name_len: usize, out: *mut u32) -> u32;
        pub fn proxy_increment_metric(id: u32, offset: i64) -> u32;
        pub fn proxy_record_metric(id: u32, value: u64) -> u32;
        pub fn proxy_send_local_response(
            status: u32,
            details: *const u8,
            details_len: usize,
            body: *const u8,
            body_len: usize,
            headers: *const u8,
            headers_len: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_call_foreign_function(
            name: *const u8,
            name_len: usize,
            args: *const u8,
            args_len: usize,
            out: *mut *mut u8,
            out_len: *mut usize,
        ) -> u32;
        pub fn proxy_continue_stream(stream: u32) -> u32;
        pub fn proxy_set_effective_context(context: u32) -> u32;
        pub fn proxy_http_call(
            upstream: *const u8,
            upstream_len: usize,
            headers: *const u8,
            headers_len: usize,
            body: *const u8,
            body_len: usize,
            trailers: *const u8,
            trailers_len: usize,
            timeout_ms: u32,
            token: *mut u32,
        ) -> u32;
        pub fn proxy_grpc_call(
            upstream: *const u8,
            upstream_len: usize,
            service: *const u8,
            service_len: usize,
            method: *const u8,
            method_len: usize,
            initial_metadata: *const u8,
            initial_metadata_len: usize,
            message: *const u8,
            message_len: usize,
            timeout_ms: u32,
            token: *mut u32,
        ) -> u32;
        pub fn proxy_grpc_cancel(token: u32) -> u32;
    }
}

/// Native builds have no host: every call reports NotFound.
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
mod ffi {
    pub unsafe fn proxy_log(_: u32, _: *const u8, _: usize) -> u32 {
        1
    }
    pub unsafe fn proxy_get_current_time_nanoseconds(_: *mut u64) -> u32 {
        1
    }
    pub unsafe fn proxy_set_tick_period_milliseconds(_: u32) -> u32 {
        1
    }
    pub unsafe fn proxy_get_buffer_bytes(_: u32, _: usize, _: usize, _: *mut *mut u8, _: *mut usize) -> u32 {
        1
    }
    pub unsafe fn proxy_set_buffer_bytes(_: u32, _: usize, _: usize, _: *const u8, _: usize) -> u32 {
        1
    }
    pub unsafe fn proxy_get_header_map_value(_: u32, _: *const u8, _: usize, _: *mut *mut u8, _: *mut usize) -> u32 {
        1
    }
    pub unsafe fn proxy_replace_header_map_value(_: u32, _: *const u8, _: usize, _: *const u8, _: usize) -> u32 {
        1
    }
    pub unsafe fn proxy_add_header_map_value(_: u32, _: *const u8, _: usize, _: *const u8, _: usize) -> u32 {
        1
    }
    pub unsafe fn proxy_remove_header_map_value(_: u32, _: *const u8, _: usize) -> u32 {
        1
    }
    pub unsafe fn proxy_get_header_map_pairs(_: u32, _: *mut *mut u8, _: *mut usize) -> u32 {
        1
    }
    pub unsafe fn proxy_get_property(_: *const u8, _: usize, _: *mut *mut u8, _: *mut usize) -> u32 {
        1
    }
    pub unsafe fn proxy_set_property(_: *const u8, _: usize, _: *const u8, _: usize) -> u32 {
        1
    }
    pub unsafe fn proxy_get_shared_data(_: *const u8, _: usize, _: *mut *mut u8, _: *mut usize, _: *mut u32) -> u32 {
        1
    }
    pub unsafe fn proxy_set_shared_data(_: *const u8, _: usize, _: *const u8, _: usize, _: u32) -> u32 {
        1
    }
    pub unsafe fn proxy_define_metric(_: u32, _: *const u8, _: usize, _: *mut u32) -> u32 {
        1
    }
    pub unsafe fn proxy_increment_metric(_: u32, _: i64) -> u32 {
        1
    }
    pub unsafe fn proxy_record_metric(_: u32, _: u64) -> u32 {
        1
    }
    pub unsafe fn proxy_send_local_response(_: u32, _: *const u8, _: usize, _: *const u8, _: usize, _: *const u8, _: usize, _: i32) -> u32 {
        1
    }
    pub unsafe fn proxy_call_foreign_function(_: *const u8, _: usize, _: *const u8, _: usize, _: *mut *mut u8, _: *mut usize) -> u32 {
        1
    }
    pub unsafe fn proxy_continue_stream(_: u32) -> u32 {
        1
    }
    pub unsafe fn proxy_set_effective_context(_: u32) -> u32 {
        1
    }
    pub unsafe fn proxy_http_call(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: u32,
        _: *mut u32,
    ) -> u32 {
        1
    }
    pub unsafe fn proxy_grpc_call(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: u32,
        _: *mut u32,
    ) -> u32 {
        1
    }
    pub unsafe fn proxy_grpc_cancel(_: u32) -> u32 {
        1
    }
}

/// The allocator the host calls (through the module's exported
/// `proxy_on_memory_allocate`) to hand us data: `size` bytes (not zeroed:
/// the host writes every one of them before it hands them over), which
/// [`take`] turns back into a `Vec` of that capacity. Null when the memory
/// cannot be had; a dangling pointer for 0 bytes, which `take` never frees.
#[inline]
pub fn allocate(size: usize) -> *mut u8 {
    match std::alloc::Layout::array::<u8>(size) {
        Ok(_) if size == 0 => std::ptr::NonNull::<u8>::dangling().as_ptr(),
        // SAFETY: the layout's size is not zero.
        Ok(layout) => unsafe { std::alloc::alloc(layout) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// Take ownership of a buffer the host allocated in our memory.
#[inline]
fn take(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the host wrote `len` bytes into a buffer of exactly `len` bytes
    // that `allocate` made for this call, and hands it over to us.
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

#[inline]
fn status(s: u32) -> Result<(), Status> {
    if s == OK {
        Ok(())
    } else {
        Err(s)
    }
}

#[inline]
fn fetch(s: u32, ptr: *mut u8, len: usize) -> Result<Option<Vec<u8>>, Status> {
    match s {
        OK => Ok(Some(take(ptr, len))),
        NOT_FOUND => Ok(None),
        other => Err(other),
    }
}

/// Log a message at `level` (0 trace .. 5 critical).
pub fn log(level: u32, msg: &str) {
    // SAFETY: borrowed slice valid for the call.
    let _ = unsafe { ffi::proxy_log(level, msg.as_ptr(), msg.len()) };
}

/// The host's wall clock in nanoseconds since the epoch (0 if unavailable).
#[inline]
pub fn now_nanos() -> u64 {
    let mut t = 0u64;
    // SAFETY: pointer to a live local.
    let _ = unsafe { ffi::proxy_get_current_time_nanoseconds(&mut t) };
    t
}

pub fn set_tick_period_ms(ms: u32) -> Result<(), Status> {
    // SAFETY: plain value.
    status(unsafe { ffi::proxy_set_tick_period_milliseconds(ms) })
}

/// Bytes `start..start+max` of a buffer; `Ok(None)` when there is none.
pub fn get_buffer(kind: Buffer, start: usize, max: usize) -> Result<Option<Vec<u8>>, Status> {
    let (mut ptr, mut len) = (std::ptr::null_mut(), 0usize);
    // SAFETY: pointers to live locals.
    let s = unsafe { ffi::proxy_get_buffer_bytes(kind as u32, start, max, &mut ptr, &mut len) };
    fetch(s, ptr, len)
}

/// Replace bytes `start..start+size` of a buffer with `data`.
pub fn set_buffer(kind: Buffer, start: usize, size: usize, data: &[u8]) -> Result<(), Status> {
    // SAFETY: borrowed slice valid for the call.
    status(unsafe { ffi::proxy_set_buffer_bytes(kind as u32, start, size, data.as_ptr(), data.len()) })
}

/// A header value as raw bytes; `Ok(None)` when absent.
#[inline]
pub fn get_header(map: Map, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let (mut ptr, mut len) = (std::ptr::null_mut(), 0usize);
    // SAFETY: pointers to live locals and to `name`'s bytes, valid for the call.
    let s = unsafe { ffi::proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut ptr, &mut len) };
    fetch(s, ptr, len)
}

/// Every header of a map, serialized as the host sends it (see [`crate::headers`]).
#[inline]
pub fn get_header_pairs(map: Map) -> Result<Vec<u8>, Status> {
    let (mut ptr, mut len) = (std::ptr::null_mut(), 0usize);
    // SAFETY: pointers to live locals, valid for the call.
    let s = unsafe { ffi::proxy_get_header_map_pairs(map as u32, &mut ptr, &mut len) };
    fetch(s, ptr, len).map(Option::unwrap_or_default)
}

/// Replace every value of header `name` with `value` (adds it when absent).
#[inline]
pub fn replace_header(map: Map, name: impl AsRef<[u8]>, value: &[u8]) -> Result<(), Status> {
    let name = name.as_ref();
    // SAFETY: borrowed slices valid for the call.
    status(unsafe { ffi::proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Add a value to header `name`, keeping existing ones.
#[inline]
pub fn add_header(map: Map, name: impl AsRef<[u8]>, value: &[u8]) -> Result<(), Status> {
    let name = name.as_ref();
    // SAFETY: borrowed slices valid for the call.
    status(unsafe { ffi::proxy_add_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Remove every value of header `name`.
#[inline]
pub fn remove_header(map: Map, name: impl AsRef<[u8]>) -> Result<(), Status> {
    let name = name.as_ref();
    // SAFETY: borrowed slice valid for the call.
    match unsafe { ffi::proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) } {
        OK | NOT_FOUND => Ok(()),
        other => Err(other),
    }
}

/// Property paths are their segments separated by NUL bytes.
fn property_path(path: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for (i, p) in path.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(p.as_bytes());
    }
    out
}

/// `path` joined as [`property_path`] does, into `buf`; `None` when it does not fit.
#[inline]
fn join_path<'a>(path: &[&str], buf: &'a mut [u8]) -> Option<&'a [u8]> {
    let mut at = 0usize;
    for (i, seg) in path.iter().enumerate() {
        if i > 0 {
            *buf.get_mut(at)? = 0;
            at += 1;
        }
        buf.get_mut(at..at + seg.len())?.copy_from_slice(seg.as_bytes());
        at += seg.len();
    }
    buf.get(..at)
}

/// A property's raw bytes; `Ok(None)` when absent.
#[inline]
pub fn get_property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    // Paths are short (`xds.route_name`): joined on the stack, not the heap.
    let mut stack = [0u8; 64];
    let heap;
    let p: &[u8] = match join_path(path, &mut stack) {
        Some(p) => p,
        None => {
            heap = property_path(path);
            &heap
        }
    };
    let (mut ptr, mut len) = (std::ptr::null_mut(), 0usize);
    // SAFETY: pointers to live locals and to `p`, valid for the call.
    let s = unsafe { ffi::proxy_get_property(p.as_ptr(), p.len(), &mut ptr, &mut len) };
    fetch(s, ptr, len)
}

/// Set a property (filter state `wasm.<name>` for a one-segment path).
pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), Status> {
    let p = property_path(path);
    // SAFETY: borrowed slices valid for the call.
    status(unsafe { ffi::proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) })
}

/// A shared-data value and its CAS token; `Ok(None)` when the key is absent.
#[inline]
pub fn get_shared(key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
    let (mut ptr, mut len, mut cas) = (std::ptr::null_mut(), 0usize, 0u32);
    // SAFETY: pointers to live locals and borrowed slices, valid for the call.
    let s = unsafe { ffi::proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut len, &mut cas) };
    fetch(s, ptr, len).map(|v| v.map(|v| (v, cas)))
}

/// Set a shared-data value; `cas` 0 sets unconditionally. `Ok(false)` on a
/// CAS mismatch (someone else wrote first). The host ignores `cas` for a key
/// that does not exist yet: there is no atomic create.
#[inline]
pub fn set_shared(key: &str, value: &[u8], cas: u32) -> Result<bool, Status> {
    // SAFETY: borrowed slices valid for the call.
    match unsafe { ffi::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) } {
        OK => Ok(true),
        CAS_MISMATCH => Ok(false),
        other => Err(other),
    }
}

pub fn define_metric(kind: MetricKind, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: borrowed slice and a live local.
    status(unsafe { ffi::proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) }).map(|()| id)
}

#[inline]
pub fn increment_metric(id: u32, by: i64) -> Result<(), Status> {
    // SAFETY: plain values.
    status(unsafe { ffi::proxy_increment_metric(id, by) })
}

#[inline]
pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: plain values.
    status(unsafe { ffi::proxy_record_metric(id, value) })
}

/// Headers for a local reply: a u32 count, each name and value length as
/// u32, then each name and value followed by NUL (little-endian).
pub fn serialize_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    serialize_pairs(headers)
}

/// [`serialize_headers`] for names and values given as bytes or text.
pub fn serialize_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(headers: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + headers.iter().map(|(k, v)| 10 + k.as_ref().len() + v.as_ref().len()).sum::<usize>());
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Send a local reply. `details` shows in `%RESPONSE_CODE_DETAILS%`.
/// `grpc_status` is what a gRPC client receives (Envoy answers a gRPC request
/// with HTTP 200, `grpc-status` and `grpc-message` = `body`); without it Envoy
/// would map the HTTP status (429 to 14 UNAVAILABLE, which clients retry).
pub fn send_local_response(
    status_code: u32,
    details: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    grpc_status: Option<u32>,
) -> Result<(), Status> {
    let h = serialize_headers(headers);
    let grpc = grpc_status.and_then(|g| i32::try_from(g).ok()).unwrap_or(-1);
    // SAFETY: borrowed slices valid for the call.
    status(unsafe {
        ffi::proxy_send_local_response(status_code, details.as_ptr(), details.len(), body.as_ptr(), body.len(), h.as_ptr(), h.len(), grpc)
    })
}

/// Call a host foreign function without arguments; its result bytes if any.
#[inline]
pub fn call_foreign_function(name: &str) -> Result<Vec<u8>, Status> {
    let (mut ptr, mut len) = (std::ptr::null_mut(), 0usize);
    // SAFETY: pointers to live locals and borrowed slices, valid for the call.
    let s = unsafe { ffi::proxy_call_foreign_function(name.as_ptr(), name.len(), std::ptr::null(), 0, &mut ptr, &mut len) };
    status(s).map(|()| take(ptr, len))
}

/// Resume a paused request (stream type 0: request).
pub fn continue_request() -> Result<(), Status> {
    // SAFETY: plain value.
    status(unsafe { ffi::proxy_continue_stream(0) })
}

/// Resume a paused response (stream type 1: response).
pub fn continue_response() -> Result<(), Status> {
    // SAFETY: plain value.
    status(unsafe { ffi::proxy_continue_stream(1) })
}

/// Start an HTTP call to Envoy cluster `cluster` (headers must include
/// `:method`, `:path` and `:authority`); the answer arrives through the
/// module's `proxy_on_http_call_response` export with the returned token.
pub fn dispatch_http_call<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    cluster: &str,
    headers: &[(K, V)],
    body: &[u8],
    timeout_ms: u32,
) -> Result<u32, Status> {
    let h = serialize_pairs(headers);
    let trailers = serialize_headers(&[]);
    let mut token = 0u32;
    // SAFETY: borrowed slices and a live local, valid for the call.
    let s = unsafe {
        ffi::proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            h.as_ptr(),
            h.len(),
            body.as_ptr(),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            timeout_ms,
            &mut token,
        )
    };
    status(s).map(|()| token)
}

/// Make later hostcalls act on context `id` (for callbacks that arrive on the root).
pub fn set_effective_context(id: u32) -> Result<(), Status> {
    // SAFETY: plain value.
    status(unsafe { ffi::proxy_set_effective_context(id) })
}

/// Start a unary gRPC call; the answer arrives on the root context through
/// the module's `proxy_on_grpc_receive` / `proxy_on_grpc_close` exports with
/// the returned token (unique in this VM). `upstream` is a serialized
/// `envoy.config.core.v3.GrpcService` (Envoy reads it as a bare cluster
/// name only if it does not parse as one). Envoy ends the call with
/// DEADLINE_EXCEEDED after `timeout_ms`.
pub fn dispatch_grpc_call(upstream: &[u8], service: &str, method: &str, message: &[u8], timeout_ms: u32) -> Result<u32, Status> {
    let metadata = serialize_headers(&[]);
    let mut token = 0u32;
    // SAFETY: borrowed slices and a live local, valid for the call.
    let s = unsafe {
        ffi::proxy_grpc_call(
            upstream.as_ptr(),
            upstream.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    };
    status(s).map(|()| token)
}

/// Cancel a gRPC call in flight (its stream is gone); no callback follows.
pub fn grpc_cancel(token: u32) -> Result<(), Status> {
    // SAFETY: plain value.
    status(unsafe { ffi::proxy_grpc_cancel(token) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(property_path(&["source", "address"]), b"source\0address");
        for path in [&["xds", "route_name"][..], &["plugin_name"], &[], &["a", "", "b"], &["x"; 40]] {
            let mut buf = [0u8; 64];
            match join_path(path, &mut buf) {
                Some(p) => assert_eq!(p, property_path(path).as_slice()),
                None => assert!(property_path(path).len() > 64),
            }
        }
        let h = serialize_headers(&[("a", "bc")]);
        assert_eq!(h, [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'b', b'c', 0]);
        assert_eq!(serialize_pairs(&[(&b"a"[..], &b"bc"[..])]), h);
    }
}
