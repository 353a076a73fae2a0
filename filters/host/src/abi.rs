//! Non-panicking calls into the proxy-wasm ABI (v0.2.1) for the hostcalls a
//! filter makes on every request.
//!
//! The SDK's `hostcalls` wrappers `panic!` on any status they do not expect
//! and `unwrap()` the UTF-8 conversion of header values, so a client sending a
//! header with non-UTF-8 bytes, or a host answering `BadArgument`, would kill
//! the worker's VM. These wrappers return the raw status instead and never
//! assume text. Status codes are plain `u32` (a host may return values the
//! SDK's enum does not list).

use proxy_wasm::types::MapType;

/// A proxy-wasm status code other than Ok (1 = NotFound, 2 = BadArgument, ...).
pub type Status = u32;
const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

#[cfg(target_arch = "wasm32")]
mod ffi {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_get_header_map_value(map: u32, key: *const u8, key_len: usize, out: *mut *mut u8, out_len: *mut usize) -> u32;
        pub fn proxy_replace_header_map_value(map: u32, key: *const u8, key_len: usize, val: *const u8, val_len: usize) -> u32;
        pub fn proxy_add_header_map_value(map: u32, key: *const u8, key_len: usize, val: *const u8, val_len: usize) -> u32;
        pub fn proxy_remove_header_map_value(map: u32, key: *const u8, key_len: usize) -> u32;
        pub fn proxy_get_header_map_pairs(map: u32, out: *mut *mut u8, out_len: *mut usize) -> u32;
        pub fn proxy_get_property(path: *const u8, path_len: usize, out: *mut *mut u8, out_len: *mut usize) -> u32;
        pub fn proxy_set_property(path: *const u8, path_len: usize, val: *const u8, val_len: usize) -> u32;
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
    }
}

/// Native builds (unit tests, clippy) have no host: every call reports NotFound.
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::missing_safety_doc)]
mod ffi {
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
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn proxy_send_local_response(_: u32, _: *const u8, _: usize, _: *const u8, _: usize, _: *const u8, _: usize, _: i32) -> u32 {
        1
    }
    pub unsafe fn proxy_call_foreign_function(_: *const u8, _: usize, _: *const u8, _: usize, _: *mut *mut u8, _: *mut usize) -> u32 {
        1
    }
}

/// Take ownership of a buffer the host allocated in our memory (through the
/// SDK's exported `proxy_on_memory_allocate`).
fn take(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: the host wrote `len` bytes into a buffer of exactly `len` bytes
    // allocated by our allocator for this call, and hands it over to us.
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

fn status(s: u32) -> Result<(), Status> {
    if s == OK {
        Ok(())
    } else {
        Err(s)
    }
}

/// A header value as raw bytes; `Ok(None)` when absent.
pub fn get_header(map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: pointers to live locals and to `name`'s bytes, valid for the call.
    let s = unsafe { ffi::proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut ptr, &mut len) };
    match s {
        OK => Ok(Some(take(ptr, len))),
        NOT_FOUND => Ok(None),
        other => Err(other),
    }
}

/// Every header of a map as text (bytes that are not UTF-8 replaced), in order.
pub fn get_headers(map: MapType) -> Result<Vec<(String, String)>, Status> {
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: pointers to live locals, valid for the call.
    let s = unsafe { ffi::proxy_get_header_map_pairs(map as u32, &mut ptr, &mut len) };
    match s {
        OK => Ok(parse_pairs(&take(ptr, len))),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(other),
    }
}

/// Decode the host's serialized header map (the layout of
/// [`serialize_headers`]); a truncated buffer yields the pairs read so far.
fn parse_pairs(b: &[u8]) -> Vec<(String, String)> {
    let u32_at = |i: usize| b.get(i..i + 4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(|a| u32::from_le_bytes(a) as usize);
    let Some(n) = u32_at(0) else { return Vec::new() };
    let mut sizes = Vec::new();
    for i in 0..n {
        match (u32_at(4 + 8 * i), u32_at(8 + 8 * i)) {
            (Some(k), Some(v)) => sizes.push((k, v)),
            _ => return Vec::new(),
        }
    }
    let mut at = 4 + 8 * n;
    let mut out = Vec::with_capacity(n);
    for (k, v) in sizes {
        let (Some(key), Some(val)) = (b.get(at..at + k), b.get(at + k + 1..at + k + 1 + v)) else { break };
        out.push((String::from_utf8_lossy(key).into_owned(), String::from_utf8_lossy(val).into_owned()));
        at += k + v + 2;
    }
    out
}

/// Replace every value of header `name` with `value` (adds it when absent).
pub fn replace_header(map: MapType, name: &str, value: &str) -> Result<(), Status> {
    // SAFETY: borrowed slices valid for the call.
    status(unsafe { ffi::proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Add a value to header `name`, keeping existing ones.
pub fn add_header(map: MapType, name: &str, value: &str) -> Result<(), Status> {
    // SAFETY: borrowed slices valid for the call.
    status(unsafe { ffi::proxy_add_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Remove every value of header `name`.
pub fn remove_header(map: MapType, name: &str) -> Result<(), Status> {
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

/// A property's raw bytes; `Ok(None)` when absent.
pub fn get_property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let p = property_path(path);
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: pointers to live locals and to `p`, valid for the call.
    match unsafe { ffi::proxy_get_property(p.as_ptr(), p.len(), &mut ptr, &mut len) } {
        OK => Ok(Some(take(ptr, len))),
        NOT_FOUND => Ok(None),
        other => Err(other),
    }
}

/// Set a property (filter state `wasm.<name>` for a one-segment path).
pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), Status> {
    let p = property_path(path);
    // SAFETY: borrowed slices valid for the call.
    status(unsafe { ffi::proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) })
}

/// Headers for a local reply: a u32 count, each name and value length as
/// u32, then each name and value followed by NUL (little-endian).
fn serialize_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + headers.iter().map(|(k, v)| 10 + k.len() + v.len()).sum::<usize>());
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Send a local reply with `details` as the response code details (shown by
/// `%RESPONSE_CODE_DETAILS%` in access logs).
pub fn send_local_response(status_code: u32, details: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<(), Status> {
    let h = serialize_headers(headers);
    // SAFETY: borrowed slices valid for the call.
    status(unsafe {
        ffi::proxy_send_local_response(status_code, details.as_ptr(), details.len(), body.as_ptr(), body.len(), h.as_ptr(), h.len(), -1)
    })
}

/// Call a host foreign function without arguments; its result bytes if any.
pub fn call_foreign_function(name: &str) -> Result<Vec<u8>, Status> {
    let mut ptr = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: pointers to live locals and borrowed slices, valid for the call.
    let s = unsafe { ffi::proxy_call_foreign_function(name.as_ptr(), name.len(), std::ptr::null(), 0, &mut ptr, &mut len) };
    status(s).map(|()| take(ptr, len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(property_path(&["source", "address"]), b"source\0address");
        let h = serialize_headers(&[("a", "bc")]);
        assert_eq!(h, [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'b', b'c', 0]);
        let two = serialize_headers(&[(":status", "200"), ("x", "\u{e9}")]);
        assert_eq!(parse_pairs(&two), vec![(":status".to_string(), "200".to_string()), ("x".to_string(), "\u{e9}".to_string())]);
        let mut bad = two.clone();
        bad[29] = 0xff; // the middle byte of the first value, "200"
        assert_eq!(parse_pairs(&bad)[0].1, "2\u{fffd}0");
        assert!(parse_pairs(&two[..10]).is_empty());
        assert_eq!(parse_pairs(&two[..two.len() - 3]).len(), 1);
        assert!(parse_pairs(&[]).is_empty());
    }
}
