//! rate-limiter as a pipeline stage: read, [`decide`], record, reply.

use meshpatterns_core::ConfigError;
use meshpatterns_host::abi;
use meshpatterns_host::{BatchedCounter, Flow, GrpcResponse, LocalReply, Pattern, Request, Response, Stage};

use crate::logic::bucket::Take;
use crate::logic::table::prepare;
use crate::logic::{
    decide_selected, each_response_header, fail_closed_reply, global_call, global_decision, is_grpc, limited_reply, rls, select,
    CallResult, Config, Decision, Layout, Selection, Settings, SlotStore, Table, Verdict,
};
use crate::{METRIC_PREFIX, STATE_DECISION, STATE_POLICY};

/// Counters of one policy: `meshpatterns.rate_limiter.<policy>.allowed` etc.
struct PolicyMetrics {
    allowed: BatchedCounter,
    limited: BatchedCounter,
    shadow_limited: BatchedCounter,
}

/// Counters, counted in the VM and flushed every 500 ms.
struct Metrics {
    policies: Vec<PolicyMetrics>,
    allowlisted: BatchedCounter,
    unmatched: BatchedCounter,
    fail_open: BatchedCounter,
    cas_conflicts: BatchedCounter,
    table_full: BatchedCounter,
    fail_closed: BatchedCounter,
    rls_calls: BatchedCounter,
    rls_errors: BatchedCounter,
}

impl Metrics {
    fn new(s: &Settings) -> Metrics {
        let m = |name: &str| BatchedCounter::new(&format!("{METRIC_PREFIX}.{name}"));
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
            table_full: m("table_full"),
            fail_closed: m("fail_closed"),
            rls_calls: m("rls_calls"),
            rls_errors: m("rls_errors"),
        }
    }

    fn all(&self) -> impl Iterator<Item = &BatchedCounter> {
        self.policies.iter().flat_map(|p| [&p.allowed, &p.limited, &p.shadow_limited]).chain([
            &self.allowlisted,
            &self.unmatched,
            &self.fail_open,
            &self.cas_conflicts,
            &self.table_full,
            &self.fail_closed,
            &self.rls_calls,
            &self.rls_errors,
        ])
    }
}

/// Proxy-wasm shared data: shared by every VM with the same `vm_id`.
struct HostStore;

impl SlotStore for HostStore {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
        abi::get_shared(key).map_err(|s| format!("get_shared_data({key}): status {s}"))
    }
    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<bool, String> {
        abi::set_shared(key, value, cas).map_err(|s| format!("set_shared_data({key}): status {s}"))
    }
}

/// A seed for a new table: 8 bytes from the host's CSPRNG, else the clock.
fn fresh_seed() -> u64 {
    let mut b = [0u8; 8];
    if meshpatterns_host::random_bytes(&mut b) {
        return u64::from_le_bytes(b);
    }
    log::warn!("rate-limiter: no random bytes from the host; seeding the slot hash from the clock");
    meshpatterns_core::hash::hash64(&abi::now_nanos().to_le_bytes())
}

pub struct RateLimiter {
    pub settings: Settings,
    pub table: Table,
    metrics: Metrics,
}

impl Pattern for RateLimiter {
    const NAME: &'static str = "rate-limiter";
    const STAGE: &'static str = "rateLimit";
    type Config = Config;
    fn build(config: Config) -> Result<Self, ConfigError> {
        let settings = Settings::try_from_config(config)?;
        if let Some(w) = settings.deprecation_warning() {
            log::warn!("{w}");
        }
        let layout = Layout { slots: settings.slots };
        // Every set exists before the first request (see logic::table);
        // a config of global policies only has no table.
        let seed = match prepare(&mut HostStore, layout, &mut fresh_seed) {
            _ if !settings.has_local() => 0,
            Ok(seed) => seed,
            Err(e) if cfg!(target_arch = "wasm32") => {
                return Err(ConfigError::new("slots", settings.slots, format!("a bucket table Envoy's shared data can hold ({e})")))
            }
            // Native builds (config checks, tests) have no shared data.
            Err(_) => 0,
        };
        let metrics = Metrics::new(&settings);
        Ok(RateLimiter { settings, table: Table { layout, seed }, metrics })
    }
}

/// Per request: the rate-limit headers for the response, and a global
/// policy's call in flight.
#[derive(Debug, Default)]
pub struct RateLimitStream {
    /// The bucket's answer and the policy, for the response headers.
    respond: Option<(Take, usize)>,
    /// Token, policy index, and whether the request is gRPC.
    pending: Option<(u32, usize, bool)>,
}

impl RateLimiter {
    /// Count, record and answer a decision.
    #[inline]
    fn finish(&self, req: &mut Request<'_>, st: &mut RateLimitStream, d: Decision, grpc: bool) -> Flow {
        let s = &self.settings;
        let m = &self.metrics;
        let global = d.policy.and_then(|i| s.policies.get(i)).is_some_and(|p| p.global.is_some());
        if global && matches!(d.verdict, Verdict::FailOpen | Verdict::FailClosed) {
            m.rls_errors.inc();
        }
        match (d.verdict, d.policy.and_then(|i| m.policies.get(i))) {
            (Verdict::Allowed, Some(p)) => p.allowed.inc(),
            (Verdict::Limited, Some(p)) => p.limited.inc(),
            (Verdict::ShadowLimited, Some(p)) => p.shadow_limited.inc(),
            (Verdict::Allowlisted, _) => m.allowlisted.inc(),
            (Verdict::Unmatched, _) => m.unmatched.inc(),
            (Verdict::FailOpen, _) => {
                m.fail_open.inc();
                log::warn!("rate-limiter: letting a request through: {}", d.fail_reason.as_deref().unwrap_or("unknown"));
            }
            (Verdict::FailClosed, _) => {
                m.fail_closed.inc();
                log::warn!("rate-limiter: refusing a request (failureMode closed): {}", d.fail_reason.as_deref().unwrap_or("unknown"));
            }
            _ => {}
        }
        m.cas_conflicts.add(u64::from(d.conflicts));
        if d.table_full {
            m.table_full.inc();
        }
        req.record(STATE_DECISION, d.verdict.label());
        if let (Some(p), true) = (d.policy.and_then(|i| s.policies.get(i)), req.records_state()) {
            req.record(STATE_POLICY, p.name.clone());
        }
        // Only a refusal builds a reply (most requests are allowed).
        let reply = match d.verdict {
            Verdict::Limited => limited_reply(s, &d, grpc).map(|r| (r, "rate_limited")),
            Verdict::FailClosed => fail_closed_reply(&d, grpc).map(|r| (r, "rate_limit_service_unavailable")),
            _ => None,
        };
        if let Some((r, details)) = reply {
            // The reply carries the rate-limit headers itself.
            return Flow::Reply(LocalReply {
                status: r.status,
                grpc_status: r.grpc_status,
                details,
                headers: r.headers.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                body: r.body,
            });
        }
        st.respond = d.take.zip(d.policy);
        Flow::Continue
    }
}

impl Stage for RateLimiter {
    type Stream = RateLimitStream;

    #[inline]
    fn on_request(&self, req: &mut Request<'_>, st: &mut Self::Stream) -> Flow {
        let s = &self.settings;
        let sel = select(s, &self.table, &*req);
        if let Selection::Policy { index, .. } = sel {
            if let (Some(rls_cfg), true) = (&s.rls, s.policies.get(index).is_some_and(|p| p.global.is_some())) {
                let grpc = is_grpc(&*req);
                let result = match global_call(s, index, &*req) {
                    Some(msg) => req.dispatch_grpc_call(&rls_cfg.grpc_service, rls::SERVICE, rls::METHOD, &msg, rls_cfg.timeout_ms),
                    None => Err(meshpatterns_host::abi::BAD_ARGUMENT),
                };
                self.metrics.rls_calls.inc();
                return match result {
                    Ok(token) => {
                        st.pending = Some((token, index, grpc));
                        Flow::Pause
                    }
                    Err(status) => self.finish(req, st, global_decision(s, index, CallResult::NotStarted(status)), grpc),
                };
            }
        }
        let now = req.now_nanos();
        let d = decide_selected(s, &self.table, sel, &mut HostStore, now);
        let grpc = d.verdict == Verdict::Limited && is_grpc(&*req);
        self.finish(req, st, d, grpc)
    }

    fn on_grpc_response(&self, req: &mut Request<'_>, call: &GrpcResponse, st: &mut Self::Stream) -> Option<Flow> {
        let (token, index, grpc) = st.pending?;
        if token != call.token {
            return None;
        }
        st.pending = None;
        let result = if call.status == 0 { CallResult::Answer(&call.message) } else { CallResult::Failed(call.status) };
        Some(self.finish(req, st, global_decision(&self.settings, index, result), grpc))
    }

    #[inline]
    fn on_response(&self, resp: &mut Response, st: &mut Self::Stream) {
        if let Some((take, policy)) = st.respond.take() {
            each_response_header(&self.settings, &take, policy, |name, value| resp.set_header(name, value));
        }
    }

    fn on_tick(&self) {
        self.metrics.all().for_each(BatchedCounter::flush);
    }
}
