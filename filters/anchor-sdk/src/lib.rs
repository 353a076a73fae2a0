//! anchor-sdk: a bench-only module that does consistent-hash's core job and
//! nothing else, on the proxy-wasm SDK: read request header `x-user-id`,
//! hash its bytes with XXH64 (seed 0) and write the hash as 16 lowercase hex
//! digits into request header `x-session-hash`; pass through when the header
//! is absent or empty. No root context, no config, no response callbacks.
//!
//! `make bench` (group `pipeline`) compares the pipeline module with it: it
//! is what the same job costs through the SDK's dispatcher, which exports
//! every proxy-wasm callback, so Envoy enters the VM for each of them.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

/// The request header whose bytes are hashed.
const KEY_HEADER: &str = "x-user-id";
/// The request header the hash is written to (Envoy's Maglev hashes it).
const HASH_HEADER: &str = "x-session-hash";

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Anchor) });
}}

struct Anchor;

impl Context for Anchor {}

impl HttpContext for Anchor {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(key) = self.get_http_request_header_bytes(KEY_HEADER) {
            if !key.is_empty() {
                let hex = hex16(xxhash_rust::xxh64::xxh64(&key, 0));
                self.set_http_request_header_bytes(HASH_HEADER, Some(&hex));
            }
        }
        Action::Continue
    }
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
