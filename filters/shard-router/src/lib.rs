//! shard-router: the sharded-service ambassador for Envoy.
//!
//! The filter finds each request's shard key, places it on a named shard with
//! the core's consistent ring (or key ranges), and writes the shard's Envoy
//! cluster into a request header that the route's `cluster_header` reads. It
//! overwrites any client-sent copy, records the shard in filter state and
//! optionally in a response header, answers 400 (gRPC: INVALID_ARGUMENT) or
//! uses a default shard for requests without a valid key, and names the
//! shard in the 503 (gRPC: UNAVAILABLE) Envoy sends when a whole shard is
//! unreachable.
//!
//! While resharding (a `previousShardMap` is configured), a read (GET/HEAD) of
//! a key whose owner changed goes to the new owner; if that answers with a
//! fallback status (404 by default), the filter holds the response, repeats
//! the request against the old owner with an HTTP call, and replies with the
//! old owner's answer (or a 503 naming it when it cannot be reached).
//!
//! All decisions live in [`logic`]; [`stage`] only reads, calls and applies.

pub mod logic;
pub mod stage;

pub use stage::ShardRouter;

// The module's exports, only in the wasm build of this crate as a module
// (feature `module`, on by default; the pipeline module turns it off).
#[cfg(all(target_arch = "wasm32", feature = "module"))]
meshpatterns_host::export_module!(
    "shard-router",
    ShardRouter,
    meshpatterns_host::stage::parse_single::<ShardRouter>,
    response_headers,
    response_body,
    http_call_response
);

/// Filter state keys (`%FILTER_STATE(wasm.shard_router_shard:PLAIN)%`).
pub const STATE_SHARD: &str = "shard_router_shard";
pub const STATE_SOURCE: &str = "shard_router_source";
pub const STATE_VERSION: &str = "shard_router_version";
pub const STATE_FALLBACK: &str = "shard_router_fallback";
