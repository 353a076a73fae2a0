//! consistent-hash: the session-tracked service pattern for Envoy.
//!
//! The filter finds a session key (header, cookie, query, path, client
//! address...), writes its stable hash into a request header, and Envoy's
//! `ring_hash` or `maglev` load balancer hashes that header to pick the
//! replica, so a session keeps landing on the same replica. Clients without a
//! key can be given a session cookie on their first response; that first
//! request is already hashed by the id in the cookie.
//!
//! All decisions live in [`logic`]; this file only reads and applies them.

pub mod logic;

use std::rc::Rc;

use meshpatterns_host as host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use logic::{decide, session_id, Config, Settings, Source};

const FILTER: &str = "consistent-hash";

/// Filter state keys (`%FILTER_STATE(wasm.consistent_hash_source:PLAIN)%`).
pub const STATE_SOURCE: &str = "consistent_hash_source";
pub const STATE_HASH: &str = "consistent_hash_value";

#[derive(Clone, Copy)]
struct Metrics {
    keyed: host::Counter,
    fallback: host::Counter,
    issued: host::Counter,
    unkeyed: host::Counter,
    client_header_replaced: host::Counter,
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            keyed: host::Counter::new("meshpatterns.consistent_hash.keyed"),
            fallback: host::Counter::new("meshpatterns.consistent_hash.fallback"),
            issued: host::Counter::new("meshpatterns.consistent_hash.issued"),
            unkeyed: host::Counter::new("meshpatterns.consistent_hash.unkeyed"),
            client_header_replaced: host::Counter::new("meshpatterns.consistent_hash.client_header_replaced"),
        }
    }
}

proxy_wasm::main! {{
    host::init(FILTER);
    proxy_wasm::set_root_context(|_| Box::new(Root { settings: None, metrics: None }));
}}

struct Root {
    settings: Option<Rc<Settings>>,
    metrics: Option<Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match host::load_config::<Config, _>(FILTER, Settings::try_from_config) {
            Some(s) => {
                self.settings = Some(Rc::new(s));
                self.metrics.get_or_insert_with(Metrics::new);
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let settings = self.settings.clone()?;
        let metrics = self.metrics?;
        Some(Box::new(Session { settings, metrics, context_id, set_cookie: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Session {
    settings: Rc<Settings>,
    metrics: Metrics,
    context_id: u32,
    set_cookie: Option<String>,
}

impl Context for Session {}

impl Session {
    /// A new session id: 16 bytes from the host's CSPRNG; if the host cannot
    /// provide them, a hash of the time and context id (unique, not secret).
    fn mint(&self) -> String {
        let mut bytes = [0u8; 16];
        if !host::random_bytes(&mut bytes) {
            let seed = format!("{}:{}", host::now_nanos(), self.context_id);
            let a = meshpatterns_core::hash::hash64_seeded(seed.as_bytes(), 1);
            let b = meshpatterns_core::hash::hash64_seeded(seed.as_bytes(), 2);
            for (dst, src) in bytes.iter_mut().zip(a.to_le_bytes().into_iter().chain(b.to_le_bytes())) {
                *dst = src;
            }
        }
        session_id(&bytes)
    }
}

impl HttpContext for Session {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let s = Rc::clone(&self.settings);
        let req = host::HostRequest;
        let client_sent = meshpatterns_core::RequestView::header(&req, &s.hash_header).is_some();
        let d = decide(&s, &req, || self.mint());
        match &d.header_value {
            Some(v) => {
                host::set_request_header(&s.hash_header, v);
                host::set_filter_state(STATE_HASH, v);
            }
            None => host::remove_request_header(&s.hash_header),
        }
        if client_sent {
            self.metrics.client_header_replaced.inc();
        }
        host::clear_route_cache();
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
