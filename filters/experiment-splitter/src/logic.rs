//! The experiment decision, free of any host: which user this is, which arm
//! of each experiment the user belongs to, which routing header value that
//! means, and what is exposed to analytics.
//!
//! * [`config`]: the plugin config and its validation into [`Settings`]
//!   (including the deprecated `targeting` block, read as `match`).
//! * [`decide`](mod@decide): the bucket layout, targeting, the QA override and [`decide()`].
//!
//! # Assignment
//!
//! A user is placed by `bucket = XXH64(le32(len(salt)) || salt || userKey) mod 10,000`
//! over the user key's bytes as the client sent them
//! ([`meshpatterns_core::hash::salted_hash64`] and [`meshpatterns_core::hash::bucket`]).
//! An arm with `percent: p` owns `p × 100` buckets (basis points), so
//! percentages may have two decimals (`12.5`, `0.25`) and must add up to
//! exactly 100. The salt (default: the experiment name) decorrelates
//! experiments: the same user lands in unrelated buckets of two experiments.
//!
//! # Ramp-safe bucket layout
//!
//! One arm is the *control* (`controlArm`, default the first arm listed); it
//! owns every bucket the other arms do not. The other arms, the *treatments*,
//! are numbered `0..k` in config order, and treatment `i` with `n` buckets
//! owns exactly the buckets
//!
//! ```text
//! b = i + k·j   for j = 0, 1, …, n − 1
//! ```
//!
//! that is, the first `n` buckets of its own residue class modulo `k`. With a
//! single treatment (`k = 1`) that is simply `0 ≤ b < n`. Consequences:
//!
//! * raising a treatment from `n` to `n'` buckets adds the buckets
//!   `j = n … n'−1` of its class, all taken from control; nobody leaves that
//!   treatment and no other treatment changes;
//! * lowering it removes exactly the buckets `j = n' … n−1`, which go back to
//!   control; nobody joins it and no other treatment changes;
//! * a treatment can hold at most the size of its class, `⌈(10,000 − i) / k⌉`
//!   buckets (all of them with one treatment, 50 % each with two, 33.33 %
//!   with three); the control arm has no limit. Adding, removing or
//!   reordering treatments changes `k` and reshuffles them: that is a new
//!   experiment (change the salt too).
//!
//! # Precedence, per experiment
//!
//! 1. a QA override (only with the configured shared secret, compared in
//!    constant time) forces the named arm;
//! 2. a request outside the experiment's `match` block (hosts, path
//!    prefixes, methods, headers, `not`; and the deprecated `targeting`) is
//!    *untargeted* and routed to control;
//! 3. a request without a user key (and no assignment cookie configured) is
//!    routed to control;
//! 4. a user on the deny list is routed to control; on the allow list, to the
//!    listed arm;
//! 5. everyone else goes to the arm owning their bucket.
//!
//! Only 1, 4 (allow) and 5 put the user *in* the experiment: those arms are
//! exposed in the response header and cookie; the others are routed to control
//! without being exposed. Per-arm metrics count case 5 only, so the
//! comparison between arms is between randomly assigned users.

pub mod config;
pub mod decide;

pub use config::{Arm, Config, Experiment, ExperimentConfig, Override, Settings, Targeting, BUCKETS};
pub use decide::{constant_time_eq, decide, Assignment, Decision, OverrideStatus, Reason};
