//! shard-router as a pipeline stage: read, [`decide`], record, apply; on the
//! response side name the shard, rewrite Envoy's own 503 for an unreachable
//! shard, and run the resharding fallback the decision asked for.

use meshpatterns_core::ConfigError;
use meshpatterns_host::{
    property_string, set_filter_state, BatchedCounter, Body, BodyFlow, Flow, HttpCallResponse, Pattern, Request, Response, Stage,
};

use crate::logic::decide::{
    call_status, fallback_reply, fallback_request_headers, may_be_unreachable, previous_owner_unavailable, shard_unreachable,
    unavailable_rewrite,
};
use crate::logic::{decide, Config, Decision, Rewrite, Settings};
use crate::{STATE_FALLBACK, STATE_SHARD, STATE_SOURCE, STATE_VERSION};

/// Counters, counted in the VM and flushed every 500 ms.
pub struct Metrics {
    routed: BatchedCounter,
    defaulted: BatchedCounter,
    rejected: BatchedCounter,
    client_header_replaced: BatchedCounter,
    moved: BatchedCounter,
    fallback_served: BatchedCounter,
    fallback_failed: BatchedCounter,
    shard_unavailable: BatchedCounter,
    /// One per shard of the current map, in map order.
    per_shard: Vec<BatchedCounter>,
}

impl Metrics {
    fn new(s: &Settings) -> Metrics {
        let c = |n: &str| BatchedCounter::new(&format!("meshpatterns.shard_router.{n}"));
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

    fn all(&self) -> impl Iterator<Item = &BatchedCounter> {
        [
            &self.routed,
            &self.defaulted,
            &self.rejected,
            &self.client_header_replaced,
            &self.moved,
            &self.fallback_served,
            &self.fallback_failed,
            &self.shard_unavailable,
        ]
        .into_iter()
        .chain(&self.per_shard)
    }
}

pub struct ShardRouter {
    pub settings: Settings,
    metrics: Metrics,
}

impl Pattern for ShardRouter {
    const NAME: &'static str = "shard-router";
    const STAGE: &'static str = "shardRoute";
    type Config = Config;
    fn build(config: Config) -> Result<Self, ConfigError> {
        let settings = Settings::try_from_config(config)?;
        let metrics = Metrics::new(&settings);
        Ok(ShardRouter { settings, metrics })
    }
}

/// Where a routed request stands on the response side.
#[derive(Debug, Default)]
pub enum Phase {
    #[default]
    Normal,
    /// The new owner answered with a fallback status; the old owner (index
    /// in the previous map) is being asked with call `token`.
    AwaitingFallback { token: u32, old: usize },
    /// Envoy could not reach the shard: its body is replaced by this JSON.
    ReplaceBody(String),
    /// A reply was sent in place of the response: nothing more to do.
    Done,
}

/// Request headers as name/value bytes.
type HeaderPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Per-request state from the request to the response.
#[derive(Debug, Default)]
pub struct ShardStream {
    /// Index into `settings.current.shards` once routed.
    shard: Option<usize>,
    grpc: bool,
    /// Whether this stage records filter state (its `filterState`).
    record: bool,
    /// A moved key's read: the old owner's index in the previous map and the
    /// request headers to repeat there.
    replay: Option<(usize, HeaderPairs)>,
    phase: Phase,
}

impl Stage for ShardRouter {
    type Stream = ShardStream;

    fn on_request(&self, req: &mut Request<'_>, st: &mut ShardStream) -> Flow {
        let s = &self.settings;
        let m = &self.metrics;
        let client_sent = req.client_sent(&s.shard_header);
        if client_sent {
            m.client_header_replaced.inc();
        }
        match decide(s, &*req) {
            Decision::Route(r) => {
                req.set_header(&s.shard_header, r.shard.cluster.as_str());
                // The route (cluster_header) depends on the header just written.
                req.clear_route_cache();
                req.record(STATE_SHARD, r.shard.name.as_str());
                req.record(STATE_SOURCE, r.source.as_str());
                if s.previous.is_some() {
                    // The map version matters while two maps are in force.
                    req.record(STATE_VERSION, s.current.version.as_str());
                }
                if let Some(c) = m.per_shard.get(r.index) {
                    c.inc();
                }
                if r.defaulted {
                    m.defaulted.inc();
                } else {
                    m.routed.inc();
                }
                if r.previous.is_some() {
                    m.moved.inc();
                }
                if let Some(old) = r.fallback_to {
                    st.replay = Some((old, req.header_pairs()));
                }
                st.shard = Some(r.index);
                st.grpc = r.grpc;
                st.record = req.records_state();
                Flow::Continue
            }
            Decision::Reject(rj) => {
                if client_sent {
                    req.remove_header(&s.shard_header);
                }
                req.record(STATE_SOURCE, rj.problem.label());
                m.rejected.inc();
                Flow::Reply(rj.reply)
            }
        }
    }

    fn on_response(&self, resp: &mut Response, st: &mut ShardStream) {
        let s = &self.settings;
        let m = &self.metrics;
        if !matches!(st.phase, Phase::Normal) {
            return;
        }
        let Some(shard) = st.shard.and_then(|i| s.current.shards.get(i)) else { return };
        if let Some(h) = &s.response_header {
            resp.set_header(h, &shard.name);
        }
        let status = resp.status().unwrap_or(0);
        if let Some((old_i, saved)) = st.replay.take() {
            let old = s.previous.as_ref().and_then(|p| p.shards.get(old_i));
            if let (Some(old), true) = (old, s.falls_back_on(status)) {
                let headers = fallback_request_headers(&saved, &s.shard_header, old);
                match resp.dispatch_http_call(&old.dispatch_cluster, &headers, b"", s.fallback_timeout_ms) {
                    Ok(token) => {
                        st.phase = Phase::AwaitingFallback { token, old: old_i };
                        resp.pause();
                    }
                    Err(e) => {
                        m.fallback_failed.inc();
                        log::warn!("shard-router: cannot call previous owner {} (cluster {}): status {e}", old.name, old.dispatch_cluster);
                        if st.record {
                            set_filter_state(STATE_FALLBACK, &old.name);
                        }
                        st.phase = Phase::Done;
                        resp.send_reply(previous_owner_unavailable(s, old, "previous owner's cluster cannot be called", st.grpc));
                    }
                }
                return;
            }
        }
        // Only a 503 (for gRPC: a trailers-only grpc-status 14) can be Envoy's
        // own answer for an unreachable shard; read the details only then.
        let grpc_status = if st.grpc && status == 200 && resp.end_of_stream { resp.header("grpc-status") } else { None };
        if !may_be_unreachable(status, grpc_status.as_deref()) {
            return;
        }
        let details = property_string(&["response", "code_details"]).unwrap_or_default();
        if shard_unreachable(status, grpc_status.as_deref(), &details) {
            m.shard_unavailable.inc();
            match unavailable_rewrite(shard, &s.current.version, &details, st.grpc) {
                Rewrite::GrpcMessage(msg) => resp.set_header("grpc-message", &msg),
                Rewrite::Body(body) => {
                    resp.remove_header("content-length");
                    resp.set_header("content-type", "application/json");
                    st.phase = Phase::ReplaceBody(body);
                }
            }
        }
    }

    fn on_response_body(&self, body: &mut Body, st: &mut ShardStream) -> BodyFlow {
        match &st.phase {
            Phase::Normal | Phase::Done => BodyFlow::Continue,
            Phase::AwaitingFallback { .. } => BodyFlow::Buffer,
            Phase::ReplaceBody(_) if !body.end_of_stream => BodyFlow::Buffer,
            Phase::ReplaceBody(text) => {
                body.replace(text.as_bytes());
                st.phase = Phase::Done;
                BodyFlow::Continue
            }
        }
    }

    fn on_http_call_response(&self, call: &mut HttpCallResponse, st: &mut ShardStream) {
        let Phase::AwaitingFallback { token, old } = st.phase else { return };
        if call.token != token {
            return;
        }
        st.phase = Phase::Done;
        let s = &self.settings;
        let m = &self.metrics;
        let Some(old) = s.previous.as_ref().and_then(|p| p.shards.get(old)) else {
            call.resume();
            return;
        };
        if st.record {
            set_filter_state(STATE_FALLBACK, &old.name);
        }
        let headers = call.headers();
        let pairs: Vec<(&[u8], &[u8])> = headers.iter().collect();
        match call_status(&pairs) {
            Some(status) => {
                m.fallback_served.inc();
                // The new owner's response is held, not yet sent: Envoy sends
                // this reply straight to the client in its place.
                call.send_reply_with_body(fallback_reply(status, &pairs, s.response_header.as_deref(), old), call.body());
            }
            None => {
                m.fallback_failed.inc();
                log::warn!("shard-router: fallback call to previous owner {} (cluster {}) failed", old.name, old.dispatch_cluster);
                call.send_reply(previous_owner_unavailable(s, old, "previous owner unreachable while resharding", st.grpc));
            }
        }
    }

    fn on_tick(&self) {
        for c in self.metrics.all() {
            c.flush();
        }
    }
}
