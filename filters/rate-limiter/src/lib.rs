//! rate-limiter: the rate-limiting and denial-of-service defence pattern for Envoy.
//!
//! Token buckets, one per (policy, key), answer 429 with `Retry-After` once a
//! client has used its budget and tell every client its budget on every
//! response (`X-RateLimit-*`). Buckets live in proxy-wasm shared data, updated
//! with compare-and-swap, so all worker threads of one Envoy share one budget;
//! a fixed number of hashed slots bounds their memory whatever keys clients send.
//!
//! All decisions live in [`logic`]; `glue.rs` reads the request, hands the
//! logic a shared-data store and the clock, and applies the decision.

pub mod logic;

// The proxy-wasm glue exists only in the wasm module: natively this crate is
// its pure logic, so test binaries can link several filters' logic at once
// (each filter's `proxy_wasm::main!` defines the same `_initialize` symbol).
#[cfg(target_arch = "wasm32")]
mod glue;

/// Filter state keys (`%FILTER_STATE(wasm.rate_limiter_decision:PLAIN)%`).
pub const STATE_DECISION: &str = "rate_limiter_decision";
pub const STATE_POLICY: &str = "rate_limiter_policy";

/// Metric name prefix: `meshpatterns.rate_limiter.<policy>.allowed` etc.
pub const METRIC_PREFIX: &str = "meshpatterns.rate_limiter";
