//! crossings: a bench-only module that makes exactly the proxy-wasm crossings its
//! plugin configuration lists, and does nothing with what it reads. Measured
//! beside a module that makes the same crossings (`make bench`, the `crossings-*`
//! scenarios), it tells what the crossings alone cost Envoy, so what is left
//! is the module's own work: the least a module doing that job can add on
//! this Envoy.
//!
//! Configuration (plugin configuration, plain text): whitespace-separated
//! operations, each phase introduced by `request:`, `response:`, `body:` or
//! `delete:` (the stream callback the operations run in); see [`Op::parse`].
//! This crate is the library; the modules are `crossings-body` (exporting
//! `proxy_on_response_body` too, as the pipeline, metrics-adapter and
//! shard-router do) and `crossings-headers` (without it, as consistent-hash,
//! rate-limiter and experiment-splitter): Envoy enters the VM for each
//! stream callback a module exports, so each floor exports what its filter
//! does. Their exports come from [`export_crossings!`].

// The hostcalls exist only on wasm32: natively (unit tests) the constants and
// helpers they use are unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::alloc::{alloc, dealloc, Layout};
use std::cell::RefCell;
use std::ptr::{null_mut, NonNull};

const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const METRIC_HISTOGRAM: u32 = 2;
const LOG_ERROR: u32 = 4;
const STATUS_OK: u32 = 0;
const ACTION_CONTINUE: u32 = 0;
/// The shared-data key and the size of its value (a rate-limiter bucket is 33 bytes).
const SHARED_KEY: &[u8] = b"crossings";
const SHARED_VALUE: [u8; 33] = [7; 33];
const HISTOGRAM: &[u8] = b"crossings_histogram";

/// The stream callback an operation runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Request,
    Response,
    Body,
    Delete,
}

/// One crossing (with the allocation the host makes in our memory for what it returns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `pairs`: every header of the phase's map in one read.
    Pairs,
    /// `header:NAME`: one header of the phase's map.
    Header(Vec<u8>),
    /// `write:NAME=VALUE`: replace a header of the phase's map.
    Write(Vec<u8>, Vec<u8>),
    /// `write:NAME=@FROM`: replace a header of the phase's map with the value
    /// of header FROM as the phase's last `pairs` read it (a key that varies
    /// per request, for a load balancer that hashes NAME); no crossing of its own.
    WriteFrom(Vec<u8>, Vec<u8>),
    /// `time`: the host's clock.
    Time,
    /// `shared-get` / `shared-set`: read, or write without compare-and-swap,
    /// a 33-byte shared-data value.
    SharedGet,
    SharedSet,
    /// `route-cache`: the `clear_route_cache` foreign function.
    RouteCache,
    /// `property:a.b`: a property by its dotted path.
    Property(Vec<u8>),
    /// `histogram`: record one value in a histogram.
    Histogram,
}

impl Op {
    /// One operation from its token, or the token back when it is none.
    pub fn parse(token: &str) -> Result<Op, String> {
        let (name, arg) = token.split_once(':').unwrap_or((token, ""));
        let op = match (name, arg) {
            ("pairs", "") => Op::Pairs,
            ("time", "") => Op::Time,
            ("shared-get", "") => Op::SharedGet,
            ("shared-set", "") => Op::SharedSet,
            ("route-cache", "") => Op::RouteCache,
            ("histogram", "") => Op::Histogram,
            ("header", h) if !h.is_empty() => Op::Header(h.as_bytes().to_vec()),
            ("property", p) if !p.is_empty() => Op::Property(p.replace('.', "\0").into_bytes()),
            ("write", w) => match w.split_once('=') {
                Some((k, v)) if !k.is_empty() => match v.strip_prefix('@') {
                    Some(from) if !from.is_empty() => Op::WriteFrom(k.as_bytes().to_vec(), from.as_bytes().to_vec()),
                    Some(_) => return Err(token.to_string()),
                    None => Op::Write(k.as_bytes().to_vec(), v.as_bytes().to_vec()),
                },
                _ => return Err(token.to_string()),
            },
            _ => return Err(token.to_string()),
        };
        Ok(op)
    }
}

/// The operations of each phase, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Script {
    pub request: Vec<Op>,
    pub response: Vec<Op>,
    pub body: Vec<Op>,
    pub delete: Vec<Op>,
}

impl Script {
    /// Parse a configuration; the error names the token and what is allowed.
    pub fn parse(text: &str) -> Result<Script, String> {
        let mut script = Script::default();
        let mut phase = None;
        for token in text.split_whitespace() {
            let next = match token {
                "request:" => Some(Phase::Request),
                "response:" => Some(Phase::Response),
                "body:" => Some(Phase::Body),
                "delete:" => Some(Phase::Delete),
                _ => None,
            };
            if next.is_some() {
                phase = next;
                continue;
            }
            let op = Op::parse(token).map_err(|t| {
                format!(
                    "crossings: operation {t:?} is not one of pairs, header:NAME, write:NAME=VALUE, write:NAME=@FROM, time, shared-get, shared-set, \
                     route-cache, property:a.b, histogram"
                )
            })?;
            match phase {
                Some(Phase::Request) => script.request.push(op),
                Some(Phase::Response) => script.response.push(op),
                Some(Phase::Body) => script.body.push(op),
                Some(Phase::Delete) => script.delete.push(op),
                None => return Err(format!("crossings: operation {token:?} comes before request:, response:, body: or delete:")),
            }
        }
        Ok(script)
    }
}

#[derive(Default)]
struct State {
    script: Script,
    histogram: u32,
    root: u32,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, msg: *const u8, len: usize) -> u32;
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, out: *mut *mut u8, out_len: *mut usize) -> u32;
    fn proxy_get_header_map_pairs(map: u32, out: *mut *mut u8, out_len: *mut usize) -> u32;
    fn proxy_get_header_map_value(map: u32, key: *const u8, key_len: usize, out: *mut *mut u8, out_len: *mut usize) -> u32;
    fn proxy_replace_header_map_value(map: u32, key: *const u8, key_len: usize, val: *const u8, val_len: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(out: *mut u64) -> u32;
    fn proxy_get_shared_data(key: *const u8, key_len: usize, out: *mut *mut u8, out_len: *mut usize, cas: *mut u32) -> u32;
    fn proxy_set_shared_data(key: *const u8, key_len: usize, val: *const u8, val_len: usize, cas: u32) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_len: usize,
        args: *const u8,
        args_len: usize,
        out: *mut *mut u8,
        out_len: *mut usize,
    ) -> u32;
    fn proxy_get_property(path: *const u8, path_len: usize, out: *mut *mut u8, out_len: *mut usize) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_len: usize, out: *mut u32) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
}

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// `_initialize`: the static constructors, once, first.
pub fn initialize() {
    #[cfg(target_os = "wasi")]
    // SAFETY: the linker-generated constructor function, called once, first.
    unsafe {
        __wasm_call_ctors();
    }
}

/// `proxy_on_memory_allocate`: the host allocates what it returns in our memory through this.
pub fn memory_allocate(size: usize) -> *mut u8 {
    if size == 0 {
        return NonNull::<u8>::dangling().as_ptr();
    }
    match Layout::from_size_align(size, 1) {
        // SAFETY: the layout has a non-zero size.
        Ok(layout) => unsafe { alloc(layout) },
        Err(_) => null_mut(),
    }
}

/// Free what the host returned through `proxy_on_memory_allocate`.
fn release(data: *mut u8, size: usize) {
    if data.is_null() || size == 0 {
        return;
    }
    if let Ok(layout) = Layout::from_size_align(size, 1) {
        // SAFETY: allocated by proxy_on_memory_allocate with this layout.
        unsafe { dealloc(data, layout) }
    }
}

/// `proxy_on_configure`: read the script; define the histogram and the
/// shared-data value it uses.
pub fn configure(root: u32, size: usize) -> u32 {
    #[cfg(target_arch = "wasm32")]
    {
        let (mut data, mut len) = (null_mut(), 0);
        // SAFETY: the host writes a pointer and size into the two locals.
        let s = unsafe { proxy_get_buffer_bytes(BUFFER_PLUGIN_CONFIGURATION, 0, size, &mut data, &mut len) };
        let text = if s == STATUS_OK && !data.is_null() && len > 0 {
            // SAFETY: the host wrote `len` bytes at `data`.
            String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(data, len) }).into_owned()
        } else {
            String::new()
        };
        release(data, len);
        let script = match Script::parse(&text) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: pointer and length of a live string.
                unsafe { proxy_log(LOG_ERROR, e.as_ptr(), e.len()) };
                return 0;
            }
        };
        let mut histogram = 0;
        // SAFETY: pointers and lengths of live slices and a local.
        unsafe {
            proxy_define_metric(METRIC_HISTOGRAM, HISTOGRAM.as_ptr(), HISTOGRAM.len(), &mut histogram);
            proxy_set_shared_data(SHARED_KEY.as_ptr(), SHARED_KEY.len(), SHARED_VALUE.as_ptr(), SHARED_VALUE.len(), 0);
        }
        STATE.with(|st| *st.borrow_mut() = State { script, histogram, root });
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (root, size);
    1
}

/// `proxy_on_delete`: a stream's end (the root context's deletion runs nothing).
pub fn delete(id: u32) {
    if STATE.with(|st| st.borrow().root) != id {
        run(Phase::Delete);
    }
}

/// Make the phase's crossings; what they return is dropped. Returns the
/// filter action (continue).
pub fn run(phase: Phase) -> u32 {
    STATE.with(|st| {
        let st = st.borrow();
        let ops = match phase {
            Phase::Request => &st.script.request,
            Phase::Response => &st.script.response,
            Phase::Body => &st.script.body,
            Phase::Delete => &st.script.delete,
        };
        let map = if phase == Phase::Request { MAP_REQUEST_HEADERS } else { MAP_RESPONSE_HEADERS };
        let mut pairs = Vec::new();
        for op in ops {
            cross(op, map, st.histogram, &mut pairs);
        }
    });
    ACTION_CONTINUE
}

/// Define a crossings module's exports: what every module exports (ABI
/// version, allocator, `_initialize`, VM start, configure, context create,
/// request and response headers, delete), plus `proxy_on_response_body` when
/// called as `export_crossings!(response_body)`.
#[macro_export]
macro_rules! export_crossings {
    ($($extra:ident)?) => {
        #[no_mangle]
        pub extern "C" fn _initialize() {
            $crate::initialize()
        }

        #[no_mangle]
        pub extern "C" fn proxy_abi_version_0_2_1() {}

        #[no_mangle]
        pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
            $crate::memory_allocate(size)
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> u32 {
            1
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
            $crate::configure(root, size)
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_context_create(_id: u32, _parent: u32) {}

        #[no_mangle]
        pub extern "C" fn proxy_on_request_headers(_id: u32, _headers: usize, _end: u32) -> u32 {
            $crate::run($crate::Phase::Request)
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_response_headers(_id: u32, _headers: usize, _end: u32) -> u32 {
            $crate::run($crate::Phase::Response)
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_delete(id: u32) {
            $crate::delete(id)
        }

        $( $crate::export_crossings!(@$extra); )?
    };
    (@response_body) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_response_body(_id: u32, _size: usize, _end: u32) -> u32 {
            $crate::run($crate::Phase::Body)
        }
    };
}

/// The value of header `name` in a serialized header map (the ABI's pairs:
/// count, then each name's and value's length, then each name and value
/// followed by a NUL), or nothing when it is absent or the map is malformed.
pub fn find_pair<'a>(pairs: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let word = |at: usize| -> Option<usize> {
        let b = pairs.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([*b.first()?, *b.get(1)?, *b.get(2)?, *b.get(3)?]) as usize)
    };
    let count = word(0)?;
    let mut text = count.checked_mul(8)?.checked_add(4)?;
    for i in 0..count {
        let (k, v) = (word(4 + 8 * i)?, word(8 + 8 * i)?);
        let key = pairs.get(text..text.checked_add(k)?)?;
        let start = text.checked_add(k)?.checked_add(1)?;
        let value = pairs.get(start..start.checked_add(v)?)?;
        if key == name {
            return Some(value);
        }
        text = start.checked_add(v)?.checked_add(1)?;
    }
    None
}

#[cfg(target_arch = "wasm32")]
fn cross(op: &Op, map: u32, histogram: u32, pairs: &mut Vec<u8>) {
    let (mut data, mut len) = (null_mut(), 0);
    // SAFETY: every pointer and length describes a live slice or a local the
    // host writes; statuses are ignored (a bench module has nothing to do on
    // failure, and what is read is dropped).
    unsafe {
        match op {
            Op::Pairs => {
                proxy_get_header_map_pairs(map, &mut data, &mut len);
                if !data.is_null() && len > 0 {
                    *pairs = std::slice::from_raw_parts(data, len).to_vec();
                }
            }
            Op::Header(k) => {
                proxy_get_header_map_value(map, k.as_ptr(), k.len(), &mut data, &mut len);
            }
            Op::Write(k, v) => {
                proxy_replace_header_map_value(map, k.as_ptr(), k.len(), v.as_ptr(), v.len());
            }
            Op::WriteFrom(k, from) => {
                if let Some(v) = find_pair(pairs, from) {
                    proxy_replace_header_map_value(map, k.as_ptr(), k.len(), v.as_ptr(), v.len());
                }
            }
            Op::Time => {
                let mut t = 0u64;
                proxy_get_current_time_nanoseconds(&mut t);
            }
            Op::SharedGet => {
                let mut cas = 0u32;
                proxy_get_shared_data(SHARED_KEY.as_ptr(), SHARED_KEY.len(), &mut data, &mut len, &mut cas);
            }
            Op::SharedSet => {
                proxy_set_shared_data(SHARED_KEY.as_ptr(), SHARED_KEY.len(), SHARED_VALUE.as_ptr(), SHARED_VALUE.len(), 0);
            }
            Op::RouteCache => {
                let name = b"clear_route_cache";
                proxy_call_foreign_function(name.as_ptr(), name.len(), [].as_ptr(), 0, &mut data, &mut len);
            }
            Op::Property(p) => {
                proxy_get_property(p.as_ptr(), p.len(), &mut data, &mut len);
            }
            Op::Histogram => {
                proxy_record_metric(histogram, 1);
            }
        }
    }
    release(data, len);
}

#[cfg(not(target_arch = "wasm32"))]
fn cross(_op: &Op, _map: u32, _histogram: u32, _pairs: &mut Vec<u8>) {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn a_script_lists_each_phase_in_order() {
        let s = Script::parse("request: pairs time write:x-h=0123 route-cache\n response: status-less header::status delete: property:xds.route_name histogram");
        assert!(s.is_err(), "status-less is no operation");
        let s = Script::parse(
            "request: pairs time write:x-h=0123 route-cache response: header::status delete: property:xds.route_name histogram",
        )
        .unwrap();
        assert_eq!(s.request, vec![Op::Pairs, Op::Time, Op::Write(b"x-h".to_vec(), b"0123".to_vec()), Op::RouteCache]);
        assert_eq!(s.response, vec![Op::Header(b":status".to_vec())]);
        assert!(s.body.is_empty());
        assert_eq!(s.delete, vec![Op::Property(b"xds\0route_name".to_vec()), Op::Histogram]);
    }

    #[test]
    fn errors_name_the_token() {
        let e = Script::parse("time").unwrap_err();
        assert!(e.contains("\"time\" comes before request:"), "{e}");
        let e = Script::parse("request: write:novalue").unwrap_err();
        assert!(e.contains("\"write:novalue\" is not one of"), "{e}");
        let e = Script::parse("request: header:").unwrap_err();
        assert!(e.contains("\"header:\""), "{e}");
        assert_eq!(Script::parse("").unwrap(), Script::default());
        assert!(Script::parse("request: write:x=@").is_err());
        assert_eq!(Script::parse("request: write:x=@y").unwrap().request, vec![Op::WriteFrom(b"x".to_vec(), b"y".to_vec())]);
    }

    #[test]
    fn find_pair_reads_the_abi_layout() {
        // two headers: ":path" = "/", "x-user-id" = "abc"
        let mut m = Vec::new();
        for w in [2u32, 5, 1, 9, 3] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        m.extend_from_slice(b":path\0/\0x-user-id\0abc\0");
        assert_eq!(find_pair(&m, b"x-user-id"), Some(&b"abc"[..]));
        assert_eq!(find_pair(&m, b":path"), Some(&b"/"[..]));
        assert_eq!(find_pair(&m, b"x-other"), None);
        // cut anywhere before the value's last byte: absent, never a short value
        for cut in 0..m.len() - 1 {
            assert_eq!(find_pair(m.get(..cut).unwrap(), b"x-user-id"), None, "truncated at {cut}");
        }
        let mut huge = m.clone();
        huge.splice(0..4, u32::MAX.to_le_bytes());
        assert_eq!(find_pair(&huge, b"x-user-id"), None);
    }
}
