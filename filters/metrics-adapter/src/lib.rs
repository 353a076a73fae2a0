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
//! All decisions live in [`logic`] (config, label values), [`admission`]
//! (which label values keep their own series, across worker VMs) and
//! [`legacy`] (which requests are adapted, the rewrite); [`stage`] only
//! reads, calls them and applies the result.

pub mod admission;
pub mod legacy;
pub mod logic;
pub mod stage;

pub use stage::MetricsAdapter;

// The module's exports, only in the wasm build of this crate as a module
// (feature `module`, on by default; the pipeline module turns it off).
// Response headers and body for the legacy rewrite; the RED metrics are
// recorded when the stream is deleted (no `proxy_on_log` export).
#[cfg(all(target_arch = "wasm32", feature = "module"))]
meshpatterns_host::export_module!(
    "metrics-adapter",
    MetricsAdapter,
    meshpatterns_host::stage::parse_single::<MetricsAdapter>,
    response_headers,
    response_body
);

/// Counters for the legacy stats endpoints (no labels).
pub const LEGACY_REWRITTEN: &str = "meshpatterns_legacy_stats.rewritten_total";
pub const LEGACY_PARSE_ERRORS: &str = "meshpatterns_legacy_stats.parse_errors_total";
pub const LEGACY_UPSTREAM_ERRORS: &str = "meshpatterns_legacy_stats.upstream_errors_total";
