//! The proxy-wasm side: read the request, decide with [`crate::logic`], apply.

use std::rc::Rc;

use log::warn;
use meshpatterns_host as host;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, Status};

use crate::logic::{decide, limited_reply, response_headers, Config, Settings, SlotStore, SlotValue, Verdict};
use crate::{METRIC_PREFIX, STATE_DECISION, STATE_POLICY};

const FILTER: &str = "rate-limiter";

/// Counters of one policy: `meshpatterns.rate_limiter.<policy>.allowed` etc.
struct PolicyMetrics {
    allowed: host::Counter,
    limited: host::Counter,
    shadow_limited: host::Counter,
}

struct Metrics {
    policies: Vec<PolicyMetrics>,
    allowlisted: host::Counter,
    unmatched: host::Counter,
    fail_open: host::Counter,
    cas_conflicts: host::Counter,
}

impl Metrics {
    fn new(s: &Settings) -> Metrics {
        let m = |name: &str| host::Counter::new(&format!("{METRIC_PREFIX}.{name}"));
        Metrics {
            policies: s
                .policies
                .iter()
                .map(|p| PolicyMetrics {
                    allowed: m(&format!("{}.allowed", p.name)),
                    limited: m(&format!("{}.limited", p.name)),
                    shadow_limited: m(&format!("{}.shadow_limited", p.name)),
                })
                .collect(),
            allowlisted: m("allowlisted"),
            unmatched: m("unmatched"),
            fail_open: m("fail_open"),
            cas_conflicts: m("cas_conflicts"),
        }
    }
}

proxy_wasm::main! {{
    host::init(FILTER);
    proxy_wasm::set_root_context(|_| Box::new(Root { state: None }));
}}

struct Root {
    state: Option<(Rc<Settings>, Rc<Metrics>)>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match host::load_config::<Config, _>(FILTER, Settings::try_from_config) {
            Some(s) => {
                let metrics = Metrics::new(&s);
                self.state = Some((Rc::new(s), Rc::new(metrics)));
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let (settings, metrics) = self.state.clone()?;
        Some(Box::new(Request { settings, metrics, headers: Vec::new() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Proxy-wasm shared data: one value per slot, shared by every VM with the same `vm_id`.
struct HostStore;

impl SlotStore for HostStore {
    fn get(&mut self, key: &str) -> Result<Option<SlotValue>, String> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(v), cas)) => Ok(Some((v, cas))),
            Ok((None, _)) => Ok(None),
            Err(s) => Err(format!("get_shared_data({key}): {s:?}")),
        }
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, String> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(s) => Err(format!("set_shared_data({key}): {s:?}")),
        }
    }
}

struct Request {
    settings: Rc<Settings>,
    metrics: Rc<Metrics>,
    /// Rate-limit headers for the response.
    headers: Vec<(&'static str, String)>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let s = Rc::clone(&self.settings);
        let now = u64::try_from(host::now_nanos()).unwrap_or(u64::MAX);
        let d = decide(&s, &host::HeaderSnapshot::request(), &mut HostStore, now);
        let policy = d.policy.and_then(|i| s.policies.get(i));
        let pm = d.policy.and_then(|i| self.metrics.policies.get(i));
        match (d.verdict, pm) {
            (Verdict::Allowed, Some(m)) => m.allowed.inc(),
            (Verdict::Limited, Some(m)) => m.limited.inc(),
            (Verdict::ShadowLimited, Some(m)) => m.shadow_limited.inc(),
            (Verdict::Allowlisted, _) => self.metrics.allowlisted.inc(),
            (Verdict::Unmatched, _) => self.metrics.unmatched.inc(),
            (Verdict::FailOpen, _) => {
                self.metrics.fail_open.inc();
                warn!("{FILTER}: letting a request through: {}", d.fail_reason.as_deref().unwrap_or("unknown"));
            }
            _ => {}
        }
        for _ in 0..d.conflicts {
            self.metrics.cas_conflicts.inc();
        }
        host::set_filter_state(STATE_DECISION, d.verdict.label());
        if let Some(p) = policy {
            host::set_filter_state(STATE_POLICY, &p.name);
        }
        self.headers = response_headers(&s, &d);
        if let Some(reply) = limited_reply(&s, &d) {
            let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            host::send_response(reply.status, &headers, reply.body.as_bytes());
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in &self.headers {
            host::set_response_header(name, value);
        }
        Action::Continue
    }
}
