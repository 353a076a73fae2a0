//! anchor-raw: a bench-only module that does consistent-hash's core job and
//! nothing else, on the raw proxy-wasm ABI 0.2.1 with no SDK: read request
//! header `x-user-id`, hash its bytes with XXH64 (seed 0) and write the hash
//! as 16 lowercase hex digits into request header `x-session-hash`; pass
//! through when the header is absent or empty.
//!
//! It exports only what Envoy needs to load it and the one stream callback
//! the job uses (`proxy_on_request_headers`), so Envoy enters the VM once per
//! request: every callback a module does not export is skipped by the host.
//! `make bench` (group `pipeline`) uses it as the anchor for what the job
//! costs on the cheapest path through the VM. It keeps no state, so it needs
//! no `proxy_on_delete`.

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::{null_mut, NonNull};

/// The request header whose bytes are hashed.
const KEY_HEADER: &[u8] = b"x-user-id";
/// The request header the hash is written to (Envoy's Maglev hashes it).
const HASH_HEADER: &[u8] = b"x-session-hash";

/// proxy-wasm ABI 0.2.1 constants: map type, status and filter action.
const MAP_TYPE_HTTP_REQUEST_HEADERS: u32 = 0;
const STATUS_OK: u32 = 0;
const ACTION_CONTINUE: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(map_type: u32, key_data: *const u8, key_size: usize, value_data: *const u8, value_size: usize)
        -> u32;
}

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// Called once by the host after instantiation: runs the static constructors
/// (the wasip1 cdylib has no entry point of its own).
#[no_mangle]
pub extern "C" fn _initialize() {
    #[cfg(target_os = "wasi")]
    // SAFETY: the linker-generated constructor function, called once, first.
    unsafe {
        __wasm_call_ctors();
    }
}

/// Declares the ABI version; Envoy reads the export's name.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host allocates in the module's memory through this (for header values
/// it returns). A null return tells the host the allocation failed.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    if size == 0 {
        return NonNull::<u8>::dangling().as_ptr();
    }
    match Layout::from_size_align(size, 1) {
        // SAFETY: the layout has a non-zero size.
        Ok(layout) => unsafe { alloc(layout) },
        Err(_) => null_mut(),
    }
}

/// A buffer the host allocated through `proxy_on_memory_allocate`, freed on drop.
struct HostBytes {
    data: *mut u8,
    size: usize,
}

impl HostBytes {
    fn as_slice(&self) -> &[u8] {
        if self.data.is_null() || self.size == 0 {
            return &[];
        }
        // SAFETY: the host wrote `size` bytes at `data`, allocated by us.
        unsafe { std::slice::from_raw_parts(self.data, self.size) }
    }
}

impl Drop for HostBytes {
    fn drop(&mut self) {
        if self.data.is_null() || self.size == 0 {
            return;
        }
        if let Ok(layout) = Layout::from_size_align(self.size, 1) {
            // SAFETY: allocated by proxy_on_memory_allocate with this layout.
            unsafe { dealloc(self.data, layout) }
        }
    }
}

/// No state per context: nothing to create.
#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_context_id: u32) {}

/// Nothing to start; true: the VM may serve.
#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

/// No configuration; true: any plugin configuration is accepted.
#[no_mangle]
pub extern "C" fn proxy_on_configure(_root_context_id: u32, _plugin_configuration_size: usize) -> u32 {
    1
}

/// The job: `x-session-hash: hex(XXH64(x-user-id))`, then continue.
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context_id: u32, _num_headers: usize, _end_of_stream: u32) -> u32 {
    let mut value = HostBytes { data: null_mut(), size: 0 };
    // SAFETY: key pointer and length describe a static slice; the host writes
    // the value's pointer and size into the two locals.
    let status = unsafe {
        proxy_get_header_map_value(MAP_TYPE_HTTP_REQUEST_HEADERS, KEY_HEADER.as_ptr(), KEY_HEADER.len(), &mut value.data, &mut value.size)
    };
    let key = value.as_slice();
    if status != STATUS_OK || key.is_empty() {
        return ACTION_CONTINUE; // absent (NotFound) or empty: pass through
    }
    let hex = hex16(xxhash_rust::xxh64::xxh64(key, 0));
    // SAFETY: both pointers and lengths describe live slices. A failed write
    // leaves the request unchanged, which is all a bench module can do.
    let _status = unsafe {
        proxy_replace_header_map_value(MAP_TYPE_HTTP_REQUEST_HEADERS, HASH_HEADER.as_ptr(), HASH_HEADER.len(), hex.as_ptr(), hex.len())
    };
    ACTION_CONTINUE
}

/// `hash` as 16 lowercase hex digits, most significant first.
fn hex16(hash: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, digit) in out.iter_mut().enumerate() {
        let nibble = ((hash >> (60 - 4 * i)) & 0xf) as u8;
        *digit = if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::hex16;

    #[test]
    fn hex16_is_lowercase_and_padded() {
        assert_eq!(&hex16(0x0123_4567_89ab_cdef), b"0123456789abcdef");
        assert_eq!(&hex16(0xff), b"00000000000000ff");
    }

    #[test]
    fn xxh64_seed_0_of_empty_input() {
        // the XXH64 reference value for zero bytes, seed 0
        assert_eq!(xxhash_rust::xxh64::xxh64(b"", 0), 0xef46_db37_51d8_e999);
    }
}
