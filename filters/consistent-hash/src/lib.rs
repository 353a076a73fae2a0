//! consistent-hash: the session-tracked service pattern for Envoy.
//!
//! The filter finds a session key (header, cookie, query, path, client
//! address...), writes its stable hash into a request header, and Envoy's
//! `ring_hash` or `maglev` load balancer hashes that header to pick the
//! replica, so a session keeps landing on the same replica. Clients without a
//! key can be given a session cookie on their first response; that first
//! request is already hashed by the id in the cookie.
//!
//! All decisions live in [`logic`]; this file only reads and applies them.

pub mod logic;
pub mod stage;

pub use stage::ConsistentHash;

// The module's exports, only in the wasm build of this crate as a module
// (feature `module`, on by default; the pipeline module turns it off).
#[cfg(all(target_arch = "wasm32", feature = "module"))]
meshpatterns_host::export_module!(
    "consistent-hash",
    ConsistentHash,
    meshpatterns_host::stage::parse_single::<ConsistentHash>,
    response_headers
);

/// Filter state keys (`%FILTER_STATE(wasm.consistent_hash_source:PLAIN)%`).
pub const STATE_SOURCE: &str = "consistent_hash_source";
pub const STATE_HASH: &str = "consistent_hash_value";
