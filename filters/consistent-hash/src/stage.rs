//! consistent-hash as a pipeline stage: read, [`decide`], record.

use meshpatterns_core::ConfigError;
use meshpatterns_host::{mint_id, BatchedCounter, Flow, Pattern, Request, Response, Stage};

use crate::logic::{decide, Config, Settings, Source};
use crate::{STATE_HASH, STATE_SOURCE};

/// Counters, counted in the VM and flushed every 500 ms.
pub struct Metrics {
    keyed: BatchedCounter,
    fallback: BatchedCounter,
    issued: BatchedCounter,
    unkeyed: BatchedCounter,
    client_header_replaced: BatchedCounter,
}

pub struct ConsistentHash {
    pub settings: Settings,
    metrics: Metrics,
}

impl Pattern for ConsistentHash {
    const NAME: &'static str = "consistent-hash";
    const STAGE: &'static str = "consistentHash";
    type Config = Config;
    fn build(config: Config) -> Result<Self, ConfigError> {
        let settings = Settings::try_from_config(config)?;
        let c = |n: &str| BatchedCounter::new(&format!("meshpatterns.consistent_hash.{n}"));
        let metrics = Metrics {
            keyed: c("keyed"),
            fallback: c("fallback"),
            issued: c("issued"),
            unkeyed: c("unkeyed"),
            client_header_replaced: c("client_header_replaced"),
        };
        Ok(ConsistentHash { settings, metrics })
    }
}

impl Stage for ConsistentHash {
    /// The `Set-Cookie` to add to the response, if a session was issued.
    type Stream = Option<String>;

    fn on_request(&self, req: &mut Request<'_>, st: &mut Option<String>) -> Flow {
        let s = &self.settings;
        let client_sent = req.client_sent(&s.hash_header);
        let id = req.context_id();
        let d = decide(s, &*req, || mint_id(id));
        match d.header_value {
            Some(v) => {
                if req.records_state() {
                    req.record(STATE_HASH, v.clone());
                }
                req.set_header(&s.hash_header, v);
            }
            None if client_sent => req.remove_header(&s.hash_header),
            None => {}
        }
        if client_sent {
            self.metrics.client_header_replaced.inc();
        }
        // No clear_route_cache: the route does not depend on the hash header;
        // Envoy's hash_policy reads it when the router picks the host.
        if req.records_state() {
            req.record(STATE_SOURCE, d.source.label());
        }
        match d.source {
            Source::Matched(_) => self.metrics.keyed.inc(),
            Source::Fallback => self.metrics.fallback.inc(),
            Source::Issued => self.metrics.issued.inc(),
            Source::None => self.metrics.unkeyed.inc(),
        }
        *st = d.set_cookie;
        Flow::Continue
    }

    fn on_response(&self, resp: &mut Response, st: &mut Option<String>) {
        if let Some(c) = st.take() {
            resp.add_header("set-cookie", &c);
        }
    }

    fn on_tick(&self) {
        let m = &self.metrics;
        for c in [&m.keyed, &m.fallback, &m.issued, &m.unkeyed, &m.client_header_replaced] {
            c.flush();
        }
    }
}
