//! experiment-splitter as a pipeline stage: read, [`decide`], record.

use meshpatterns_core::ConfigError;
use meshpatterns_host::{mint_id, BatchedCounter, Flow, Pattern, Request, Response, Stage};

use crate::logic::{decide, Assignment, Config, OverrideStatus, Reason, Settings};
use crate::{METRIC_PREFIX, STATE_ARM, STATE_REASON, STATE_USER_SOURCE};

struct ArmMetrics {
    requests: BatchedCounter,
    responses_5xx: BatchedCounter,
}

/// Counters, counted in the VM and flushed every 500 ms.
struct Metrics {
    /// Indexed like `Settings::experiments[e].arms[a]`.
    arms: Vec<Vec<ArmMetrics>>,
    /// Per experiment: allow list and override.
    forced: Vec<BatchedCounter>,
    /// Per experiment: denied, untargeted and no key.
    excluded: Vec<BatchedCounter>,
    cookie_issued: BatchedCounter,
    override_accepted: BatchedCounter,
    override_rejected: BatchedCounter,
    client_header_replaced: BatchedCounter,
}

impl Metrics {
    fn new(s: &Settings) -> Metrics {
        let c = |name: String| BatchedCounter::new(&name);
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

    fn arm(&self, e: usize, a: usize) -> Option<&ArmMetrics> {
        self.arms.get(e).and_then(|v| v.get(a))
    }
}

pub struct ExperimentSplitter {
    pub settings: Settings,
    metrics: Metrics,
}

/// What the response side needs from the request side (`None` until the
/// request is decided: an empty stream then costs nothing to drop).
#[derive(Default)]
pub struct Stream(Option<Kept>);

struct Kept {
    /// Each experiment's assignment (in config order), for the 5xx
    /// counters of the hash-assigned arms.
    assignments: Vec<Assignment>,
    set_cookies: Vec<String>,
    expose: Option<String>,
}

impl Pattern for ExperimentSplitter {
    const NAME: &'static str = "experiment-splitter";
    const STAGE: &'static str = "experimentSplit";
    type Config = Config;
    fn build(config: Config) -> Result<Self, ConfigError> {
        let settings = Settings::try_from_config(config)?;
        if let Some(w) = settings.deprecation_warning() {
            log::warn!("{w}");
        }
        let metrics = Metrics::new(&settings);
        Ok(ExperimentSplitter { settings, metrics })
    }
}

impl Stage for ExperimentSplitter {
    type Stream = Stream;

    fn on_request(&self, req: &mut Request<'_>, st: &mut Stream) -> Flow {
        let (s, m) = (&self.settings, &self.metrics);
        let id = req.context_id();
        let d = decide(s, &*req, || mint_id(id));
        for (header, value) in d.routing(s) {
            req.set_header(header, value);
        }
        for h in d.strip.into_iter().flatten() {
            req.remove_header(h);
        }
        // The route depends on the arm header (Envoy `cluster_header`, or a
        // VirtualService header match), so Envoy must select it again.
        req.clear_route_cache();
        if req.records_state() {
            req.record(STATE_ARM, d.arms_label(s));
            req.record(STATE_REASON, d.reasons_label(s));
            req.record(STATE_USER_SOURCE, &*d.user_source);
        }

        for (e, a) in d.assignments.iter().enumerate() {
            match a.reason {
                Reason::Hash => {
                    if let Some(am) = m.arm(e, a.arm) {
                        am.requests.inc();
                    }
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
        st.0 = Some(Kept { assignments: d.assignments, set_cookies: d.set_cookies, expose: d.expose });
        Flow::Continue
    }

    fn on_response(&self, resp: &mut Response, st: &mut Stream) {
        let Some(st) = &mut st.0 else { return };
        // Only hash-assigned requests are counted, so the status is read only for them.
        let hashed = || st.assignments.iter().enumerate().filter(|(_, a)| a.reason == Reason::Hash);
        if hashed().next().is_some() && resp.status().is_some_and(|s| (500..600).contains(&s)) {
            for (e, a) in hashed() {
                if let Some(am) = self.metrics.arm(e, a.arm) {
                    am.responses_5xx.inc();
                }
            }
        }
        for c in st.set_cookies.drain(..) {
            resp.add_header("set-cookie", &c);
        }
        if let (Some(h), Some(v)) = (&self.settings.expose_header, st.expose.take()) {
            resp.set_header(h, &v);
        }
    }

    fn on_tick(&self) {
        let m = &self.metrics;
        for a in m.arms.iter().flatten() {
            a.requests.flush();
            a.responses_5xx.flush();
        }
        for c in m.forced.iter().chain(&m.excluded) {
            c.flush();
        }
        for c in [&m.cookie_issued, &m.override_accepted, &m.override_rejected, &m.client_header_replaced] {
            c.flush();
        }
    }
}
