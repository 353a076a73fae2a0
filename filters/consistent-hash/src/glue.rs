//! The proxy-wasm glue: read the request, call [`crate::logic::decide`], apply.

use std::rc::Rc;

use meshpatterns_host as host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::logic::{decide, Config, Settings, Source};
use crate::{STATE_HASH, STATE_SOURCE};

const FILTER: &str = "consistent-hash";

/// Counters, counted in the VM and flushed to Envoy every 500 ms from the
/// root context's tick (one hostcall per tick, not per request).
struct Metrics {
    keyed: host::BatchedCounter,
    fallback: host::BatchedCounter,
    issued: host::BatchedCounter,
    unkeyed: host::BatchedCounter,
    client_header_replaced: host::BatchedCounter,
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            keyed: host::BatchedCounter::new("meshpatterns.consistent_hash.keyed"),
            fallback: host::BatchedCounter::new("meshpatterns.consistent_hash.fallback"),
            issued: host::BatchedCounter::new("meshpatterns.consistent_hash.issued"),
            unkeyed: host::BatchedCounter::new("meshpatterns.consistent_hash.unkeyed"),
            client_header_replaced: host::BatchedCounter::new("meshpatterns.consistent_hash.client_header_replaced"),
        }
    }

    fn flush(&self) {
        for c in [&self.keyed, &self.fallback, &self.issued, &self.unkeyed, &self.client_header_replaced] {
            c.flush();
        }
    }
}

proxy_wasm::main! {{
    host::init(FILTER);
    proxy_wasm::set_root_context(|_| Box::new(Root { settings: None, metrics: None }));
}}

struct Root {
    settings: Option<Rc<Settings>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match host::load_config::<Config, _>(FILTER, Settings::try_from_config) {
            Some(s) => {
                self.settings = Some(Rc::new(s));
                if self.metrics.is_none() {
                    self.metrics = Some(Rc::new(Metrics::new()));
                    host::start_flush_tick();
                }
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let settings = self.settings.clone()?;
        let metrics = self.metrics.clone()?;
        Some(Box::new(Session { settings, metrics, context_id, set_cookie: None }))
    }

    fn on_tick(&mut self) {
        if let Some(m) = &self.metrics {
            m.flush();
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Session {
    settings: Rc<Settings>,
    metrics: Rc<Metrics>,
    context_id: u32,
    set_cookie: Option<String>,
}

impl Context for Session {}

impl HttpContext for Session {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let s = Rc::clone(&self.settings);
        // One hostcall for every header the key sources may need.
        let req = host::HeaderSnapshot::request();
        let client_sent = req.has(&s.hash_header);
        let d = decide(&s, &req, || host::mint_id(self.context_id));
        match &d.header_value {
            Some(v) => {
                host::set_request_header(&s.hash_header, v);
                host::set_filter_state(STATE_HASH, v);
            }
            None if client_sent => host::remove_request_header(&s.hash_header),
            None => {}
        }
        if client_sent {
            self.metrics.client_header_replaced.inc();
        }
        // No clear_route_cache: the route does not depend on the hash header;
        // Envoy's hash_policy reads it when the router picks the host.
        host::set_filter_state(STATE_SOURCE, d.source.label());
        match d.source {
            Source::Matched(_) => self.metrics.keyed.inc(),
            Source::Fallback => self.metrics.fallback.inc(),
            Source::Issued => self.metrics.issued.inc(),
            Source::None => self.metrics.unkeyed.inc(),
        }
        self.set_cookie = d.set_cookie;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(c) = self.set_cookie.take() {
            host::add_response_header("set-cookie", &c);
        }
        Action::Continue
    }
}
