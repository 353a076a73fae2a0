//! Stages and the pipeline that runs them in one pass.
//!
//! A stage is one pattern's glue: it reads the request through [`Request`]
//! (a view over the one header snapshot, with earlier stages' writes
//! applied), asks its pattern's pure `decide`, and records what to change.
//! The pipeline runs the stages in order, stops at the first local reply
//! (later stages see the request only through [`Stage::after_local_reply`],
//! so a metrics stage still counts it), and applies the collected header
//! writes once. A single-pattern module is the pipeline with one stage.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::ops::Range;

use meshpatterns_core::error::{from_value, join, parse_value};
use meshpatterns_core::scope::{MatchConfig, Matcher};
use meshpatterns_core::{ConfigError, RequestView};
use serde::de::DeserializeOwned;

use crate::abi::{self, Map};
use crate::headers::HeaderMap;

/// What a stage decides for the request.
#[derive(Debug)]
pub enum Flow {
    Continue,
    /// Answer locally; later stages do not run.
    Reply(LocalReply),
    /// Hold the request until a gRPC call the stage dispatched
    /// ([`Request::dispatch_grpc_call`]) ends; the stage then decides in
    /// [`Stage::on_grpc_response`] and later stages run after it. Only
    /// return it when the dispatch succeeded (Envoy ends every call it
    /// started: with the answer, an error, or the timeout).
    Pause,
}

/// A local answer. `grpc_status` is what a gRPC client receives (8
/// RESOURCE_EXHAUSTED for a limit, 3 INVALID_ARGUMENT for a missing key, 14
/// UNAVAILABLE for a shard that is down); `body` becomes `grpc-message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub grpc_status: u32,
    /// `%RESPONSE_CODE_DETAILS%` in access logs (no spaces).
    pub details: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// gRPC status codes used in local replies.
pub mod grpc {
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNAVAILABLE: u32 = 14;
    pub const INTERNAL: u32 = 13;
}

/// A request-header change: the name and (for a set) the value, as ranges
/// of [`Writes::bytes`].
#[derive(Debug, Clone)]
struct HeaderOp {
    name: Range<usize>,
    value: Option<Range<usize>>,
}

/// The header changes of one request, in order: every name and value in
/// one byte buffer. The buffers go back to a per-VM spare when the request
/// is done, so after the first requests recording a change allocates
/// nothing.
#[derive(Debug, Default)]
struct Writes {
    ops: Vec<HeaderOp>,
    bytes: Vec<u8>,
}

impl Writes {
    fn push(&mut self, name: &str, value: Option<&[u8]>) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name.as_bytes());
        let name = start..self.bytes.len();
        let value = value.map(|v| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(v);
            start..self.bytes.len()
        });
        self.ops.push(HeaderOp { name, value });
    }

    /// Each change as (name, value), in order; `None` removes.
    fn iter(&self) -> impl DoubleEndedIterator<Item = (&[u8], Option<&[u8]>)> + '_ {
        self.ops.iter().map(|op| {
            let name = self.bytes.get(op.name.clone()).unwrap_or_default();
            (name, op.value.as_ref().map(|v| self.bytes.get(v.clone()).unwrap_or_default()))
        })
    }

    /// Emptied, for the next request; `None` when it grew unusually large
    /// (a request that wrote that much does not keep its buffers).
    fn recycle(mut self) -> Option<Writes> {
        (self.bytes.capacity() <= 4096 && self.ops.capacity() <= 64).then(|| {
            self.ops.clear();
            self.bytes.clear();
            self
        })
    }
}

/// Buffers a finished request leaves for the next one on the same VM (its
/// header changes), so that after the first requests changing headers
/// allocates nothing of ours.
#[derive(Debug, Default)]
pub struct Spare {
    writes: Option<Writes>,
}

impl Spare {
    pub const fn new() -> Spare {
        Spare { writes: None }
    }
}

/// Every header of one of the host's maps, read with one hostcall (empty
/// when the host has none to give).
#[inline]
pub(crate) fn read_header_map(map: Map) -> HeaderMap {
    HeaderMap::parse(abi::get_header_pairs(map).unwrap_or_default())
}

/// The request as the stages see it, and what they change.
pub struct Request<'a> {
    headers: &'a HeaderMap,
    writes: Writes,
    /// Filter state to set (`None` until the first: see `calls`).
    state: Option<Vec<(&'static str, String)>>,
    record_state: bool,
    clear_route: bool,
    context_id: u32,
    source: OnceCell<Option<String>>,
    now: OnceCell<u64>,
    /// gRPC calls dispatched for this stream (`None` until the first: an
    /// empty vector still costs a call to drop).
    calls: Option<Vec<u32>>,
    /// Whether the module exports the gRPC callbacks (else no call is made:
    /// its answer could never arrive).
    pub(crate) grpc: bool,
}

impl<'a> Request<'a> {
    pub fn new(headers: &'a HeaderMap, context_id: u32) -> Request<'a> {
        Request::reusing(headers, context_id, &mut Spare::default())
    }

    /// The same, with the change buffers a finished request left in `spare`.
    pub fn reusing(headers: &'a HeaderMap, context_id: u32, spare: &mut Spare) -> Request<'a> {
        Request {
            headers,
            writes: spare.writes.take().unwrap_or_default(),
            state: None,
            record_state: true,
            clear_route: false,
            context_id,
            source: OnceCell::new(),
            now: OnceCell::new(),
            calls: None,
            grpc: false,
        }
    }

    /// Start a unary gRPC call for this stream (`upstream`: a serialized
    /// GrpcService, see [`abi::dispatch_grpc_call`]); return [`Flow::Pause`]
    /// after it succeeds. Its end reaches [`Stage::on_grpc_response`] with
    /// the returned token. Fails with [`abi::UNSUPPORTED`] in a module that
    /// does not export the gRPC callbacks.
    pub fn dispatch_grpc_call(
        &mut self,
        upstream: &[u8],
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, abi::Status> {
        if !self.grpc {
            return Err(abi::UNSUPPORTED);
        }
        let token = abi::dispatch_grpc_call(upstream, service, method, message, timeout_ms)?;
        self.calls.get_or_insert_with(Vec::new).push(token);
        Ok(token)
    }

    /// The gRPC calls dispatched so far (taken).
    pub(crate) fn take_calls(&mut self) -> Option<Vec<u32>> {
        self.calls.take()
    }

    /// The stream's context id (unique per VM; used to mint ids if the CSPRNG fails).
    pub fn context_id(&self) -> u32 {
        self.context_id
    }

    /// The host clock in nanoseconds, read once per request.
    pub fn now_nanos(&self) -> u64 {
        *self.now.get_or_init(abi::now_nanos)
    }

    /// Set a request header, replacing every copy the client sent.
    pub fn set_header(&mut self, name: &str, value: impl AsRef<[u8]>) {
        self.writes.push(name, Some(value.as_ref()));
    }

    /// Remove every copy of a request header.
    pub fn remove_header(&mut self, name: &str) {
        self.writes.push(name, None);
    }

    /// Ask Envoy to select the route again after the writes (only where the
    /// route depends on a header a stage wrote; see `apply`).
    pub fn clear_route_cache(&mut self) {
        self.clear_route = true;
    }

    /// Record a decision as filter state `wasm.<key>` (skipped when the
    /// stage's `filterState` is false).
    pub fn record(&mut self, key: &'static str, value: impl Into<String>) {
        if self.record_state {
            self.state.get_or_insert_with(Vec::new).push((key, value.into()));
        }
    }

    /// Whether a header was in the request the client sent.
    pub fn client_sent(&self, name: &str) -> bool {
        self.headers.has(name)
    }

    /// Whether this stage's decisions are recorded as filter state (its
    /// `filterState`), for stages that record later, on the response side.
    pub fn records_state(&self) -> bool {
        self.record_state
    }

    /// Every request header as the upstream will see it so far: the
    /// client's, with the writes recorded until now applied (a written
    /// header comes last). For stages that repeat the request elsewhere.
    pub fn header_pairs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let touched = |name: &[u8]| self.writes.iter().any(|(n, _)| n == name);
        let mut out: Vec<(Vec<u8>, Vec<u8>)> =
            self.headers.iter().filter(|(k, _)| !touched(k)).map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        for (i, (name, value)) in self.writes.iter().enumerate() {
            // Only the last write to a name counts.
            let later = self.writes.iter().skip(i + 1).any(|(m, _)| m == name);
            if let (Some(v), false) = (value, later) {
                out.push((name.to_vec(), v.to_vec()));
            }
        }
        out
    }

    /// Apply every change with one hostcall each.
    ///
    /// About `clear_route_cache`: Envoy 1.36–1.40 re-selects the route after
    /// any request-header write from a module that declares ABI 0.2.1 (a
    /// legacy behaviour Envoy 1.33's changelog ends for higher ABI versions),
    /// so the call is not needed today; it is made anyway wherever the route
    /// depends on a header we wrote, so a future ABI keeps routing right.
    pub fn apply(self, spare: &mut Spare) {
        for (name, value) in self.writes.iter() {
            let r = match value {
                Some(v) => abi::replace_header(Map::RequestHeaders, name, v),
                None => abi::remove_header(Map::RequestHeaders, name),
            };
            if let Err(s) = r {
                log::warn!("cannot change request header {}: status {s}", String::from_utf8_lossy(name));
            }
        }
        if self.clear_route {
            let _ = abi::call_foreign_function("clear_route_cache");
        }
        for (k, v) in self.state.iter().flatten() {
            if let Err(s) = abi::set_property(&[k], v.as_bytes()) {
                log::warn!("cannot set filter state {k}: status {s}");
            }
        }
        spare.writes = self.writes.recycle();
    }
}

impl RequestView for Request<'_> {
    fn header_bytes(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        if !self.writes.ops.is_empty() {
            if let Some((_, value)) = self.writes.iter().rev().find(|(n, _)| *n == name.as_bytes()) {
                return value.map(Cow::Borrowed);
            }
        }
        self.headers.get(name)
    }
    fn source_address(&self) -> Option<String> {
        self.source.get_or_init(|| abi::get_property(&["source", "address"]).ok().flatten().and_then(crate::headers::property_text)).clone()
    }
}

/// The response as the stages see it; changes go to Envoy at once.
pub struct Response {
    status: OnceCell<Option<u32>>,
    pub end_of_stream: bool,
    paused: bool,
    reply: Option<LocalReply>,
    calls: Option<Vec<u32>>,
}

/// What the stages asked for in the response callback.
pub(crate) struct ResponseOutcome {
    pub paused: bool,
    pub reply: Option<LocalReply>,
    /// Tokens of the HTTP calls dispatched (their answers belong to this stream).
    pub calls: Option<Vec<u32>>,
}

impl Response {
    pub fn new(end_of_stream: bool) -> Response {
        Response { status: OnceCell::new(), end_of_stream, paused: false, reply: None, calls: None }
    }

    /// Hold the response (until a stage's HTTP call is answered).
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Answer the client with this reply in place of the held response
    /// (sent after the callback returns; Envoy sends it straight to the
    /// client, so filters closer to the client do not see it).
    pub fn send_reply(&mut self, r: LocalReply) {
        self.reply = Some(r);
        self.paused = true;
    }

    /// Start an HTTP call to cluster `cluster`; its answer reaches the stage's
    /// [`Stage::on_http_call_response`] with the returned token.
    pub fn dispatch_http_call<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        cluster: &str,
        headers: &[(K, V)],
        body: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, abi::Status> {
        let token = abi::dispatch_http_call(cluster, headers, body, timeout_ms)?;
        self.calls.get_or_insert_with(Vec::new).push(token);
        Ok(token)
    }

    pub(crate) fn outcome(self) -> ResponseOutcome {
        ResponseOutcome { paused: self.paused, reply: self.reply, calls: self.calls }
    }

    /// The `:status`, read once.
    pub fn status(&self) -> Option<u32> {
        *self.status.get_or_init(|| crate::headers::status_code(&abi::get_header(Map::ResponseHeaders, ":status").ok().flatten()?))
    }
    pub fn header(&self, name: &str) -> Option<Vec<u8>> {
        abi::get_header(Map::ResponseHeaders, name).ok().flatten()
    }
    /// Set a header, replacing copies the upstream sent.
    pub fn set_header(&mut self, name: &str, value: &str) {
        if let Err(s) = abi::replace_header(Map::ResponseHeaders, name, value.as_bytes()) {
            log::warn!("cannot set response header {name}: status {s}");
        }
    }
    /// Add a header, keeping other copies (right for `set-cookie`).
    pub fn add_header(&mut self, name: &str, value: &str) {
        if let Err(s) = abi::add_header(Map::ResponseHeaders, name, value.as_bytes()) {
            log::warn!("cannot add response header {name}: status {s}");
        }
    }
    pub fn remove_header(&mut self, name: &str) {
        if let Err(s) = abi::remove_header(Map::ResponseHeaders, name) {
            log::warn!("cannot remove response header {name}: status {s}");
        }
    }
}

/// The answer to an HTTP call a stage dispatched (see
/// [`Response::dispatch_http_call`]).
pub struct HttpCallResponse {
    pub token: u32,
    pub num_headers: usize,
    pub body_size: usize,
    reply: Option<LocalReply>,
    /// Bytes sent in place of `reply.body`.
    body: Option<Vec<u8>>,
    resume: bool,
}

/// What the stages asked for when an HTTP call was answered.
pub(crate) struct CallOutcome {
    pub reply: Option<LocalReply>,
    pub body: Option<Vec<u8>>,
    pub resume: bool,
}

impl HttpCallResponse {
    pub fn new(token: u32, num_headers: usize, body_size: usize) -> HttpCallResponse {
        HttpCallResponse { token, num_headers, body_size, reply: None, body: None, resume: false }
    }
    /// The answer's headers (one hostcall). No `:status` means the call
    /// failed (timeout, reset, no healthy host).
    pub fn headers(&self) -> HeaderMap {
        read_header_map(Map::HttpCallResponseHeaders)
    }
    /// The answer's body.
    pub fn body(&self) -> Vec<u8> {
        if self.body_size == 0 {
            return Vec::new();
        }
        abi::get_buffer(abi::Buffer::HttpCallResponseBody, 0, self.body_size).ok().flatten().unwrap_or_default()
    }
    /// Answer the client with this reply in place of the held response.
    pub fn send_reply(&mut self, r: LocalReply) {
        self.reply = Some(r);
        self.body = None;
    }
    /// The same with a body of any bytes in place of `r.body` (passing an
    /// answer on as it came).
    pub fn send_reply_with_body(&mut self, r: LocalReply, body: Vec<u8>) {
        self.reply = Some(r);
        self.body = Some(body);
    }
    /// Let the held response go on unchanged.
    pub fn resume(&mut self) {
        self.resume = true;
    }
    pub(crate) fn outcome(self) -> CallOutcome {
        CallOutcome { reply: self.reply, body: self.body, resume: self.resume }
    }
}

/// How a gRPC call a stage dispatched ended (see [`Request::dispatch_grpc_call`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcResponse {
    pub token: u32,
    /// 0 when the service answered; else the gRPC status the call failed
    /// with (4 DEADLINE_EXCEEDED after the timeout, 14 UNAVAILABLE ...).
    pub status: u32,
    /// The answer's message (empty when it failed).
    pub message: Vec<u8>,
}

/// A chunk of the response body.
pub struct Body {
    pub size: usize,
    pub end_of_stream: bool,
}

impl Body {
    /// The buffered body so far.
    pub fn read(&self) -> Vec<u8> {
        abi::get_buffer(abi::Buffer::ResponseBody, 0, self.size).ok().flatten().unwrap_or_default()
    }
    /// Replace the buffered body.
    pub fn replace(&mut self, text: &[u8]) {
        if let Err(s) = abi::set_buffer(abi::Buffer::ResponseBody, 0, self.size, text) {
            log::warn!("cannot replace the response body: status {s}");
        }
    }
}

/// What to do with a body chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFlow {
    Continue,
    /// Keep buffering until the end of the stream.
    Buffer,
}

/// One pattern's glue, run as a stage.
pub trait Stage {
    /// Per-request state kept from the request to the response.
    type Stream: Default;
    fn on_request(&self, req: &mut Request<'_>, st: &mut Self::Stream) -> Flow;
    /// An earlier stage answered locally; this stage did not decide.
    fn after_local_reply(&self, _req: &mut Request<'_>, _st: &mut Self::Stream) {}
    fn on_response(&self, _resp: &mut Response, _st: &mut Self::Stream) {}
    fn on_response_body(&self, _body: &mut Body, _st: &mut Self::Stream) -> BodyFlow {
        BodyFlow::Continue
    }
    /// The stream ended (reply sent, or reset): called once, from
    /// `proxy_on_delete`, after Envoy's access log, so a module needs no
    /// `proxy_on_log` export (one VM entry less per request). The stream's
    /// properties (`xds.route_name`, ...) and the clock are still readable.
    fn on_end(&self, _st: &mut Self::Stream) {}
    /// The answer to an HTTP call dispatched for this stream (by any stage:
    /// a stage checks `call.token` against the calls it made).
    fn on_http_call_response(&self, _call: &mut HttpCallResponse, _st: &mut Self::Stream) {}
    /// A gRPC call this stage dispatched from `on_request` (and paused for)
    /// ended; `req` is the held request. Returns how the request goes on,
    /// or `None` if the token is not this stage's.
    fn on_grpc_response(&self, _req: &mut Request<'_>, _call: &GrpcResponse, _st: &mut Self::Stream) -> Option<Flow> {
        None
    }
    /// Periodic work (flush batched counters).
    fn on_tick(&self) {}
}

/// A pattern: a stage with a config, a name and a pipeline key.
pub trait Pattern: Stage + Sized {
    /// Filter name in logs (`rate-limiter`).
    const NAME: &'static str;
    /// Key of this stage in a pipeline config (`rateLimit`).
    const STAGE: &'static str;
    type Config: DeserializeOwned;
    fn build(config: Self::Config) -> Result<Self, ConfigError>;
}

/// A stage with its scope.
pub struct Scoped<S> {
    pub scope: Option<Matcher>,
    pub stage: S,
    pub filter_state: bool,
    /// `meshpatterns.<filter>.skipped`: requests outside the scope.
    pub skipped: Option<crate::BatchedCounter>,
}

/// Keys every stage accepts besides its pattern's own config.
pub const SCOPE_KEY: &str = "match";
pub const FILTER_STATE_KEY: &str = "filterState";

/// Take the stage-level keys (`match`, `filterState`) out of a config object.
pub fn take_scope(v: &mut serde_json::Value, at: &str) -> Result<(Option<Matcher>, bool), ConfigError> {
    let Some(obj) = v.as_object_mut() else { return Ok((None, true)) };
    // Rebuilt rather than `remove`d: the B-tree's removal code is 4 KB of
    // module that nothing else needs.
    let (mut scope_v, mut fs_v) = (None, None);
    for (k, x) in std::mem::take(obj) {
        match k.as_str() {
            SCOPE_KEY => scope_v = Some(x),
            FILTER_STATE_KEY => fs_v = Some(x),
            _ => {
                obj.insert(k, x);
            }
        }
    }
    let scope = match scope_v {
        None => None,
        Some(m) => {
            let field = join(at, SCOPE_KEY);
            let c: MatchConfig = from_value(m, &field)?;
            let m = Matcher::try_new(&c).map_err(|e| e.at(&field))?;
            (!m.is_empty()).then_some(m)
        }
    };
    let fs = match fs_v {
        None => true,
        Some(b) => from_value::<bool>(b, &join(at, FILTER_STATE_KEY))?,
    };
    Ok((scope, fs))
}

/// Parse and build one pattern's stage from its config value; errors name
/// the field under `at` (`stages[1].rateLimit`).
pub fn build_stage<P: Pattern>(mut v: serde_json::Value, at: &str) -> Result<Scoped<P>, ConfigError> {
    let (scope, filter_state) = take_scope(&mut v, at)?;
    let config: P::Config = from_value(v, at)?;
    let stage = P::build(config).map_err(|e| if at.is_empty() { e } else { e.at(at) })?;
    let skipped = scope.as_ref().map(|_| crate::BatchedCounter::new(&format!("meshpatterns.{}.skipped", P::NAME.replace('-', "_"))));
    Ok(Scoped { scope, stage, filter_state, skipped })
}

/// A single-pattern module's config: the pattern's config plus `match` and `filterState`.
pub fn parse_single<P: Pattern>(bytes: &[u8]) -> Result<Pipeline<P>, ConfigError> {
    let v = parse_value(bytes)?;
    Ok(Pipeline { stages: vec![build_stage::<P>(v, "")?] })
}

/// Stages run in order in one pass.
pub struct Pipeline<S> {
    pub stages: Vec<Scoped<S>>,
}

/// Per-stream state of a pipeline: one slot per stage (`None`: out of scope).
pub struct StreamState<S: Stage> {
    pub stages: Vec<Option<S::Stream>>,
    /// The stage the request is held for (it returned [`Flow::Pause`]).
    pub paused: Option<usize>,
}

impl<S: Stage> Default for StreamState<S> {
    fn default() -> Self {
        StreamState { stages: Vec::new(), paused: None }
    }
}

/// How the request side ended for now.
#[derive(Debug)]
pub enum RequestOutcome {
    Continue,
    /// Send this local reply.
    Reply(LocalReply),
    /// Hold the request: a stage waits for a gRPC call.
    Pause,
}

impl<S: Stage> Pipeline<S> {
    /// Run the request side; returns the local reply to send, if any. The
    /// caller sends it after releasing its own borrows (Envoy runs the
    /// response callbacks for a local reply before the send returns).
    pub fn on_request(&self, req: &mut Request<'_>, st: &mut StreamState<S>) -> RequestOutcome {
        st.stages.clear();
        st.stages.reserve(self.stages.len());
        st.paused = None;
        self.run_from(0, None, req, st)
    }

    /// Run stages `start..` (the slots before `start` are filled).
    fn run_from(&self, start: usize, mut reply: Option<LocalReply>, req: &mut Request<'_>, st: &mut StreamState<S>) -> RequestOutcome {
        for (i, s) in self.stages.iter().enumerate().skip(start) {
            if s.scope.as_ref().is_some_and(|m| !m.matches(&*req)) {
                if let Some(c) = &s.skipped {
                    c.inc();
                }
                st.stages.push(None);
                continue;
            }
            req.record_state = s.filter_state;
            // Built in its slot, not moved there.
            st.stages.push(Some(S::Stream::default()));
            let Some(Some(stream)) = st.stages.last_mut() else { continue };
            if reply.is_some() {
                s.stage.after_local_reply(req, stream);
            } else {
                match s.stage.on_request(req, stream) {
                    Flow::Continue => {}
                    Flow::Reply(r) => reply = Some(r),
                    Flow::Pause => {
                        st.paused = Some(i);
                        return RequestOutcome::Pause;
                    }
                }
            }
        }
        match reply {
            Some(r) => RequestOutcome::Reply(r),
            None => RequestOutcome::Continue,
        }
    }

    /// A gRPC call ended for a held request: the stage that paused decides,
    /// then the later stages run. `None` when the request is not held or
    /// the stage does not know the token.
    pub fn on_grpc_response(&self, req: &mut Request<'_>, call: &GrpcResponse, st: &mut StreamState<S>) -> Option<RequestOutcome> {
        let i = st.paused?;
        let s = self.stages.get(i)?;
        let stream = st.stages.get_mut(i)?.as_mut()?;
        req.record_state = s.filter_state;
        let flow = s.stage.on_grpc_response(req, call, stream)?;
        st.paused = None;
        let reply = match flow {
            Flow::Continue => None,
            Flow::Reply(r) => Some(r),
            Flow::Pause => {
                st.paused = Some(i);
                return Some(RequestOutcome::Pause);
            }
        };
        Some(self.run_from(i + 1, reply, req, st))
    }

    pub fn on_response(&self, resp: &mut Response, st: &mut StreamState<S>) {
        for (s, stream) in self.stages.iter().zip(st.stages.iter_mut()) {
            if let Some(stream) = stream {
                s.stage.on_response(resp, stream);
            }
        }
    }

    pub fn on_response_body(&self, body: &mut Body, st: &mut StreamState<S>) -> BodyFlow {
        let mut flow = BodyFlow::Continue;
        for (s, stream) in self.stages.iter().zip(st.stages.iter_mut()) {
            if let Some(stream) = stream {
                if s.stage.on_response_body(body, stream) == BodyFlow::Buffer {
                    flow = BodyFlow::Buffer;
                }
            }
        }
        flow
    }

    pub fn on_end(&self, st: &mut StreamState<S>) {
        for (s, stream) in self.stages.iter().zip(st.stages.iter_mut()) {
            if let Some(stream) = stream {
                s.stage.on_end(stream);
            }
        }
    }

    pub fn on_http_call_response(&self, call: &mut HttpCallResponse, st: &mut StreamState<S>) {
        for (s, stream) in self.stages.iter().zip(st.stages.iter_mut()) {
            if let Some(stream) = stream {
                s.stage.on_http_call_response(call, stream);
            }
        }
    }

    pub fn on_tick(&self) {
        for s in &self.stages {
            s.stage.on_tick();
            if let Some(c) = &s.skipped {
                c.flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn header_pairs_apply_the_writes() {
        let h = HeaderMap::from_pairs(&[(":path", b"/a"), ("x-shard", b"client"), ("x-gone", b"1"), ("x-key", b"k\xff")]);
        let mut req = Request::new(&h, 7);
        req.set_header("x-shard", "first");
        req.remove_header("x-gone");
        req.set_header("x-new", "n");
        req.set_header("x-shard", "last");
        let pairs = req.header_pairs();
        let want: Vec<(Vec<u8>, Vec<u8>)> = [(":path", &b"/a"[..]), ("x-key", b"k\xff"), ("x-new", b"n"), ("x-shard", b"last")]
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect();
        assert_eq!(pairs, want);
        assert_eq!(req.header_bytes("x-shard").unwrap().as_ref(), b"last");
    }
}
