//! The proxy-wasm glue: read the request, call [`crate::logic::decide`], apply.

use std::rc::Rc;

use meshpatterns_host as host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::logic::{decide, Config, OverrideStatus, Reason, Settings};

use crate::{METRIC_PREFIX, STATE_ARM, STATE_REASON, STATE_USER_SOURCE};

const FILTER: &str = "experiment-splitter";

#[derive(Clone, Copy)]
struct ArmMetrics {
    requests: host::Counter,
    responses_5xx: host::Counter,
}

struct Metrics {
    /// Indexed like `Settings::experiments[e].arms[a]`.
    arms: Vec<Vec<ArmMetrics>>,
    /// Per experiment: allow list and override; deny, untargeted and no key.
    forced: Vec<host::Counter>,
    excluded: Vec<host::Counter>,
    cookie_issued: host::Counter,
    override_accepted: host::Counter,
    override_rejected: host::Counter,
    client_header_replaced: host::Counter,
}

impl Metrics {
    fn new(s: &Settings) -> Metrics {
        let c = |name: String| host::Counter::new(&name);
        Metrics {
            arms: s
                .experiments
                .iter()
                .map(|e| {
                    e.arms
                        .iter()
                        .map(|a| ArmMetrics {
                            requests: c(format!("{METRIC_PREFIX}.{}.{}.requests", e.name, a.name)),
                            responses_5xx: c(format!("{METRIC_PREFIX}.{}.{}.responses_5xx", e.name, a.name)),
                        })
                        .collect()
                })
                .collect(),
            forced: s.experiments.iter().map(|e| c(format!("{METRIC_PREFIX}.{}.forced", e.name))).collect(),
            excluded: s.experiments.iter().map(|e| c(format!("{METRIC_PREFIX}.{}.excluded", e.name))).collect(),
            cookie_issued: c(format!("{METRIC_PREFIX}.cookie_issued")),
            override_accepted: c(format!("{METRIC_PREFIX}.override_accepted")),
            override_rejected: c(format!("{METRIC_PREFIX}.override_rejected")),
            client_header_replaced: c(format!("{METRIC_PREFIX}.client_header_replaced")),
        }
    }
}

proxy_wasm::main! {{
    host::init(FILTER);
    proxy_wasm::set_root_context(|_| Box::new(Root { state: None }));
}}

struct Root {
    state: Option<Rc<(Settings, Metrics)>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match host::load_config::<Config, _>(FILTER, Settings::try_from_config) {
            Some(s) => {
                let m = Metrics::new(&s);
                self.state = Some(Rc::new((s, m)));
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let state = self.state.clone()?;
        Some(Box::new(Split { state, context_id, hashed: Vec::new(), set_cookies: Vec::new(), expose: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Split {
    state: Rc<(Settings, Metrics)>,
    context_id: u32,
    /// (experiment, arm) of the hash-assigned arms, for the 5xx counters.
    hashed: Vec<(usize, usize)>,
    set_cookies: Vec<String>,
    expose: Option<String>,
}

impl Context for Split {}

impl HttpContext for Split {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let state = Rc::clone(&self.state);
        let (s, m) = (&state.0, &state.1);
        let d = decide(s, &host::HeaderSnapshot::request(), || host::mint_id(self.context_id));
        for (header, value) in d.routing(s) {
            host::set_request_header(header, value);
        }
        for h in &d.strip {
            host::remove_request_header(h);
        }
        host::clear_route_cache();
        host::set_filter_state(STATE_ARM, &d.arms_label(s));
        host::set_filter_state(STATE_REASON, &d.reasons_label(s));
        host::set_filter_state(STATE_USER_SOURCE, &d.user_source);

        for (e, a) in d.assignments.iter().enumerate() {
            match a.reason {
                Reason::Hash => {
                    if let Some(am) = m.arms.get(e).and_then(|v| v.get(a.arm)) {
                        am.requests.inc();
                    }
                    self.hashed.push((e, a.arm));
                }
                Reason::Allow | Reason::Override => m.forced.get(e).iter().for_each(|c| c.inc()),
                Reason::Deny | Reason::Untargeted | Reason::NoKey => m.excluded.get(e).iter().for_each(|c| c.inc()),
            }
        }
        match d.override_status {
            OverrideStatus::Accepted => m.override_accepted.inc(),
            OverrideStatus::Rejected => m.override_rejected.inc(),
            OverrideStatus::Absent => {}
        }
        if d.user_source == "issued" {
            m.cookie_issued.inc();
        }
        if d.client_headers_replaced > 0 {
            m.client_header_replaced.inc();
        }
        self.set_cookies = d.set_cookies;
        self.expose = d.expose;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let m = &self.state.1;
        // Only hash-assigned requests are counted, so the status is read only for them.
        if !self.hashed.is_empty() && host::response_status().is_some_and(|s| (500..600).contains(&s)) {
            for &(e, a) in &self.hashed {
                if let Some(am) = m.arms.get(e).and_then(|v| v.get(a)) {
                    am.responses_5xx.inc();
                }
            }
        }
        for c in self.set_cookies.drain(..) {
            host::add_response_header("set-cookie", &c);
        }
        if let (Some(h), Some(v)) = (&self.state.0.expose_header, self.expose.take()) {
            host::set_response_header(h, &v);
        }
        Action::Continue
    }
}
