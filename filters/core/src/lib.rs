//! Host-independent building blocks shared by every meshpatterns filter.
//!
//! Nothing here depends on proxy-wasm: each module takes plain inputs (a key,
//! a config, a clock reading, a [`RequestView`]) and returns a decision, so the
//! same code runs in unit tests on the build machine, in wasm-bindgen tests on
//! `wasm32-unknown-unknown`, and inside Envoy on `wasm32-wasip1`. A filter crate
//! is then a thin adapter: read the request, call in here, apply the result.
//!
//! * [`bytes`]: short byte strings on the stack (keys, numbers) for the request path.
//! * [`error`]: the config error every filter reports (field, value, what is allowed).
//! * [`hash`]: the stable 64-bit placement hash (XXH64), with test vectors.
//! * [`place`]: consistent placement (weighted rendezvous hashing, jump hash, buckets).
//! * [`key`]: ordered key sources (header, cookie, query, path, regex, client address).
//! * [`cookie`]: `Cookie` parsing and `Set-Cookie` building with validated attributes.
//! * [`names`]: validation of header and cookie names.
//! * [`scope`]: the `match` block deciding which requests a filter or stage acts on.
//! * [`sort`]: the heapsort config-time sorts use (a smaller module than `sort_unstable`).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod bytes;
pub mod cookie;
pub mod de;
pub mod error;
pub mod hash;
pub mod key;
pub mod names;
pub mod place;
pub mod scope;
pub mod sort;
pub mod text;

/// A xorshift64 generator for the randomised unit tests of every crate
/// (never for a decision: placement uses [`hash`]).
#[doc(hidden)]
pub fn test_rand(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

pub use error::ConfigError;
pub use key::{KeyMatch, KeySource, KeySpec, RequestView};
