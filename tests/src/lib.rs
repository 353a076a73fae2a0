//! The integration-test harness: everything a test needs to run the real
//! Envoy with the real `.wasm` filters in front of real upstream servers.
//!
//! ```no_run
//! use meshpatterns_tests::{EnvoyBuilder, Upstream, Client};
//! let replicas = Upstream::start_many("replica", 3);
//! let envoy = EnvoyBuilder::new("consistent-hash.yaml").endpoints("REPLICAS", &replicas).start();
//! let mut client = Client::new(envoy.port("ingress"));
//! let resp = client.get("/", &[("x-user", "42")]);
//! assert_eq!(resp.status, 200);
//! ```
//!
//! Every port is chosen by the kernel (port 0) and discovered through Envoy's
//! admin API; every process is stopped when its handle drops; when a test
//! panics, Envoy's log is printed.

pub mod access_log;
pub mod client;
pub mod demo;
pub mod envoy;
pub mod filters;
pub mod fixtures;
pub mod load;
pub mod origin;
pub mod paths;
pub mod pipeline;
pub mod redis;
pub mod rls;
pub mod tls;
pub mod upstream;
pub mod xds;

pub use client::{Client, Response};
pub use envoy::{Envoy, EnvoyBuilder};
pub use upstream::Upstream;

/// Poll `f` every 50 ms until it returns `Some`, or panic after `timeout`
/// with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
