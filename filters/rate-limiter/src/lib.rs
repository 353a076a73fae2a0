//! rate-limiter: the rate-limiting and denial-of-service defence pattern for Envoy.
//!
//! Token buckets, one per (policy, key), answer 429 (gRPC: RESOURCE_EXHAUSTED)
//! with `Retry-After` once a client has used its budget, and tell every
//! client its budget on every response (`X-RateLimit-*`). Buckets live in a
//! fixed table in proxy-wasm shared data, created before any traffic and
//! updated only with compare-and-swap, so all worker threads of one Envoy
//! share one exact budget per key and memory is fixed by `slots`.
//!
//! All decisions live in [`logic`]; [`stage`] reads the request, hands the
//! logic the shared-data store and the clock, and applies the decision.

pub mod logic;
pub mod stage;

pub use stage::RateLimiter;

// The module's exports, only in the wasm build of this crate as a module
// (feature `module`, on by default; the pipeline module turns it off).
#[cfg(all(target_arch = "wasm32", feature = "module"))]
meshpatterns_host::export_module!(
    "rate-limiter",
    RateLimiter,
    meshpatterns_host::stage::parse_single::<RateLimiter>,
    response_headers,
    grpc
);

/// Filter state keys (`%FILTER_STATE(wasm.rate_limiter_decision:PLAIN)%`).
pub const STATE_DECISION: &str = "rate_limiter_decision";
pub const STATE_POLICY: &str = "rate_limiter_policy";

/// Metric name prefix: `meshpatterns.rate_limiter.<policy>.allowed` etc.
pub const METRIC_PREFIX: &str = "meshpatterns.rate_limiter";
