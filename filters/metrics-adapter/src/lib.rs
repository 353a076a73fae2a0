//! metrics-adapter: the book's adapter pattern for monitoring, in the sidecar.
//!
//! Two jobs, both without changing the app:
//!
//! 1. RED metrics for any service: request count, error count and a duration
//!    histogram, labelled by route and/or cluster, method, status class and
//!    optional request headers (each label capped in distinct values). The
//!    proxy-wasm ABI has no labels, so labels are encoded into the stat name
//!    and Envoy's `stats_config.stats_tags` (see [`logic::stats_tags`]) turn
//!    them back into Prometheus labels on `/stats/prometheus`.
//! 2. Legacy stats adaptation: a configured path (`/metrics`) is sent to the
//!    app's own stats endpoint (`/stats`, JSON or Redis-INFO-style text), and
//!    the response body is rewritten into Prometheus text ([`legacy`]).
//!
//! All decisions live in [`logic`] and [`legacy`]; this file only reads and
//! applies them.

pub mod legacy;
pub mod logic;

// The proxy-wasm glue exists only in the wasm module: natively this crate is
// its pure logic, so test binaries can link several filters' logic at once
// (each filter's `proxy_wasm::main!` defines the same `_initialize` symbol).
#[cfg(target_arch = "wasm32")]
mod glue;

/// Counters for the legacy stats endpoints (no labels).
pub const LEGACY_REWRITTEN: &str = "meshpatterns_legacy_stats.rewritten_total";
pub const LEGACY_PARSE_ERRORS: &str = "meshpatterns_legacy_stats.parse_errors_total";
pub const LEGACY_UPSTREAM_ERRORS: &str = "meshpatterns_legacy_stats.upstream_errors_total";
