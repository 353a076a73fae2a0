//! The proxy-wasm side of shard-router: read the request, call [`crate::logic`], apply.

use std::rc::Rc;

use log::warn;
use meshpatterns_core::RequestView;
use meshpatterns_host as host;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType};

use crate::logic::{self, decide, Config, Decision, Settings, Shard};
use crate::{STATE_FALLBACK, STATE_SHARD, STATE_SOURCE, STATE_VERSION};

const FILTER: &str = "shard-router";

struct Metrics {
    routed: host::Counter,
    defaulted: host::Counter,
    rejected: host::Counter,
    client_header_replaced: host::Counter,
    moved: host::Counter,
    fallback_served: host::Counter,
    fallback_failed: host::Counter,
    shard_unavailable: host::Counter,
    /// One per shard of the current map, in map order.
    per_shard: Vec<host::Counter>,
}

impl Metrics {
    fn new(s: &Settings) -> Metrics {
        let c = |n: &str| host::Counter::new(&format!("meshpatterns.shard_router.{n}"));
        Metrics {
            routed: c("routed"),
            defaulted: c("defaulted"),
            rejected: c("rejected"),
            client_header_replaced: c("client_header_replaced"),
            moved: c("moved"),
            fallback_served: c("fallback_served"),
            fallback_failed: c("fallback_failed"),
            shard_unavailable: c("shard_unavailable"),
            per_shard: s.current.shards.iter().map(|sh| c(&format!("shard.{}.requests", sh.name))).collect(),
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
                self.metrics = Some(Rc::new(Metrics::new(&s)));
                self.settings = Some(Rc::new(s));
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let settings = self.settings.clone()?;
        let metrics = self.metrics.clone()?;
        Some(Box::new(ShardRequest { settings, metrics, shard: None, previous: None, saved: None, phase: Phase::Normal }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum Phase {
    Normal,
    /// The new owner answered with a fallback status; the old owner is being asked.
    AwaitingFallback,
    /// Envoy could not reach the shard: its body is replaced by this JSON.
    ReplaceBody(String),
}

struct ShardRequest {
    settings: Rc<Settings>,
    metrics: Rc<Metrics>,
    /// Index into `settings.current.shards` once routed.
    shard: Option<usize>,
    /// Index into the previous map's shards for a moved key's replayable read.
    previous: Option<usize>,
    /// Request headers kept for the fallback call (moved keys' reads only).
    saved: Option<Vec<(String, String)>>,
    phase: Phase,
}

impl Context for ShardRequest {
    fn on_http_call_response(&mut self, _token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        if !matches!(self.phase, Phase::AwaitingFallback) {
            return;
        }
        self.phase = Phase::Normal;
        let s = Rc::clone(&self.settings);
        let old = self.previous.and_then(|i| s.previous.as_ref().and_then(|p| p.shards.get(i)));
        let headers = host::http_call_response_headers();
        let status = headers.iter().find(|(k, _)| k == ":status").and_then(|(_, v)| v.parse::<u32>().ok());
        let Some(old) = old else {
            let _ = hostcalls::resume_http_response();
            return;
        };
        match status {
            Some(status) => {
                let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten().unwrap_or_default();
                let reply = logic::fallback_reply_headers(&headers, s.response_header.as_deref(), old);
                let pairs: Vec<(&str, &str)> = reply.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                host::set_filter_state(STATE_FALLBACK, &old.name);
                self.metrics.fallback_served.inc();
                // The new owner's response headers are held, not yet sent: Envoy
                // sends this reply directly to the client in their place.
                host::send_response(status, &pairs, &body);
            }
            None => {
                self.metrics.fallback_failed.inc();
                warn!("{FILTER}: fallback call to previous owner {} (cluster {}) failed", old.name, old.dispatch_cluster);
                previous_owner_unavailable(&s, old, "previous owner unreachable while resharding");
            }
        }
    }
}

/// The new owner does not have a moved key and its old owner cannot be asked:
/// answering the new owner's 404 would claim the key does not exist, so the
/// answer is a 503 naming the old owner. Sent directly to the client in place
/// of the held response.
fn previous_owner_unavailable(s: &Settings, old: &Shard, detail: &str) {
    host::set_filter_state(STATE_FALLBACK, &old.name);
    let version = s.previous.as_ref().map(|p| p.version.as_str()).unwrap_or_default();
    let body = logic::unavailable_body(old, version, detail);
    let mut headers = vec![("content-type", "application/json")];
    if let Some(h) = &s.response_header {
        headers.push((h.as_str(), old.name.as_str()));
    }
    host::send_response(503, &headers, body.as_bytes());
}

impl HttpContext for ShardRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let s = Rc::clone(&self.settings);
        // One hostcall for every header the key sources may need.
        let req = host::HeaderSnapshot::request();
        if req.header(&s.shard_header).is_some() {
            self.metrics.client_header_replaced.inc();
        }
        match decide(&s, &req) {
            Decision::Route(r) => {
                host::set_request_header(&s.shard_header, &r.shard.cluster);
                host::clear_route_cache();
                host::set_filter_state(STATE_SHARD, &r.shard.name);
                host::set_filter_state(STATE_SOURCE, &r.source);
                if s.previous.is_some() {
                    // The map version matters while two maps are in force.
                    host::set_filter_state(STATE_VERSION, &s.current.version);
                }
                self.shard = s.current.shards.iter().position(|x| std::ptr::eq(x, r.shard));
                if let Some(c) = self.shard.and_then(|i| self.metrics.per_shard.get(i)) {
                    c.inc();
                }
                if r.source.starts_with("default:") {
                    self.metrics.defaulted.inc();
                } else {
                    self.metrics.routed.inc();
                }
                if let (Some(old), Some(prev)) = (r.previous, s.previous.as_ref()) {
                    self.metrics.moved.inc();
                    let method = req.method().unwrap_or_default();
                    if logic::replayable(&method) && !s.fallback_statuses.is_empty() {
                        self.previous = prev.shards.iter().position(|x| std::ptr::eq(x, old));
                        self.saved = Some(host::request_headers());
                    }
                }
                Action::Continue
            }
            Decision::Reject { problem, body } => {
                host::remove_request_header(&s.shard_header);
                host::set_filter_state(STATE_SOURCE, problem.label());
                self.metrics.rejected.inc();
                host::send_response(400, &[("content-type", "application/json")], body.as_bytes());
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let s = Rc::clone(&self.settings);
        let Some(shard) = self.shard.and_then(|i| s.current.shards.get(i)) else {
            return Action::Continue;
        };
        if let Some(h) = &s.response_header {
            host::set_response_header(h, &shard.name);
        }
        let status = host::response_status();
        let status = status.unwrap_or(0);
        if let (Some(saved), Some(old)) = (self.saved.take(), self.previous.and_then(|i| s.previous.as_ref()?.shards.get(i))) {
            if s.falls_back_on(status) {
                let headers = logic::fallback_request_headers(&saved, &s.shard_header, old);
                let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                match hostcalls::dispatch_http_call(&old.dispatch_cluster, pairs, None, vec![], s.fallback_timeout) {
                    Ok(_) => {
                        self.phase = Phase::AwaitingFallback;
                        return Action::Pause;
                    }
                    Err(e) => {
                        self.metrics.fallback_failed.inc();
                        warn!("{FILTER}: cannot call previous owner {} (cluster {}): {e:?}", old.name, old.dispatch_cluster);
                        previous_owner_unavailable(&s, old, "previous owner's cluster cannot be called");
                        return Action::Pause;
                    }
                }
            }
        }
        // Only a 503 can be Envoy's own answer for an unreachable shard; read
        // the response details (a property lookup) only then.
        let details = if status == 503 { host::property_string(&["response", "code_details"]).unwrap_or_default() } else { String::new() };
        if logic::shard_unreachable(status, &details) {
            self.metrics.shard_unavailable.inc();
            host::remove_response_header("content-length");
            host::set_response_header("content-type", "application/json");
            self.phase = Phase::ReplaceBody(logic::unavailable_body(shard, &s.current.version, &details));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &self.phase {
            Phase::Normal => Action::Continue,
            Phase::AwaitingFallback => Action::Pause,
            Phase::ReplaceBody(_) if !end_of_stream => Action::Pause,
            Phase::ReplaceBody(body) => {
                if let Err(e) = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, body.as_bytes()) {
                    warn!("{FILTER}: cannot replace the response body: {e:?}");
                }
                self.phase = Phase::Normal;
                Action::Continue
            }
        }
    }
}
