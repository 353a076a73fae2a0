//! experiment-splitter: the ambassador for 10 % experiments.
//!
//! The filter sends a chosen share of users to an experiment backend, each
//! user always to the same side, without the application knowing. It finds
//! the user key (header or cookie; users without one get an assignment
//! cookie), hashes it into one of 10,000 buckets per experiment, and writes
//! the arm's target into a routing header: Envoy's `cluster_header` route (or
//! an Istio VirtualService header match) sends the request to that arm's
//! backend. The bucket layout is ramp-safe, so raising or lowering a share
//! moves only the users in the buckets added or removed.
//!
//! All decisions live in [`logic`]; [`stage`] only reads and applies them.

pub mod logic;
pub mod stage;

pub use stage::ExperimentSplitter;

// The module's exports, only in the wasm build of this crate as a module
// (feature `module`, on by default; the pipeline module turns it off). The
// response callback issues cookies, sets the exposure header and counts 5xx.
#[cfg(all(target_arch = "wasm32", feature = "module"))]
meshpatterns_host::export_module!(
    "experiment-splitter",
    ExperimentSplitter,
    meshpatterns_host::stage::parse_single::<ExperimentSplitter>,
    response_headers
);

/// Filter state keys: `%FILTER_STATE(wasm.experiment_arm:PLAIN)%` and friends.
pub const STATE_ARM: &str = "experiment_arm";
pub const STATE_REASON: &str = "experiment_reason";
pub const STATE_USER_SOURCE: &str = "experiment_user_source";

/// Metric name prefix; per arm `<prefix>.<experiment>.<arm>.requests` and `.responses_5xx`.
pub const METRIC_PREFIX: &str = "meshpatterns.experiment_splitter";
