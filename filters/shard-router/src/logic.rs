//! The shard decision, free of hostcalls.
//!
//! * [`config`]: the plugin config, its limits, and its validation into
//!   [`Settings`] (shard maps compiled into a ring or key ranges).
//! * [`decide`]: the placement of one request, the local replies (gRPC-aware),
//!   and the response-side choices (an unreachable shard named in Envoy's
//!   503, the resharding fallback's request and reply).

pub mod config;
pub mod decide;

pub use config::{Bound, Config, KeyOrder, RangeConfig, Settings, Shard, ShardConfig, ShardMap, ShardMapConfig, DEFAULT_SHARD_HEADER};
pub use decide::{decide, Decision, KeyProblem, Reject, Rewrite, Route};
