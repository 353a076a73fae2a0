//! The generic root: what every module's exported callbacks call into.
//!
//! One `Vm` per wasm VM (one per Envoy worker) holds the root contexts (one
//! per plugin config; a config reload adds a new one and deletes the old
//! one) and the state of each live stream. Nothing here decides anything:
//! it looks up, calls the pipeline, applies.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use meshpatterns_core::ConfigError;

use crate::abi;
use crate::slots::Slots;
use crate::stage::{
    read_header_map, Body, BodyFlow, GrpcResponse, HttpCallResponse, LocalReply, Pipeline, Request, RequestOutcome, Response, Spare, Stage,
    StreamState,
};

/// How many emptied per-stream vectors a VM keeps for new streams.
const SPARE_STREAMS: usize = 64;

/// Envoy's filter status values.
pub const CONTINUE: u32 = 0;
pub const PAUSE: u32 = 1;

struct Stream<S: Stage> {
    root: Rc<Pipeline<S>>,
    state: StreamState<S>,
    /// The request is held for a gRPC call (its body is buffered meanwhile).
    held: bool,
}

/// Hashes the context ids and call tokens the host assigns (no client picks
/// them, so there is nothing to defend against): one multiply, where the
/// default SipHash costs a few hundred instructions per lookup, and there
/// are several lookups per request.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        // An odd multiplier: distinct ids keep distinct low bits (the
        // bucket) and mix into the high bits (hashbrown's tag).
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// The VM's roots and streams.
pub struct Vm<S: Stage> {
    module: &'static str,
    parse: fn(&[u8]) -> Result<Pipeline<S>, ConfigError>,
    /// Root contexts (one per plugin config sharing this VM; usually one, or
    /// two during a reload): a list, searched newest first, costs less per
    /// stream than a map.
    roots: Vec<(u32, Rc<Pipeline<S>>)>,
    streams: Slots<Stream<S>>,
    /// HTTP calls in flight: token -> the stream that dispatched it.
    calls: IdMap<u32>,
    /// gRPC calls in flight: token (unique in the VM) -> the stream.
    grpc_calls: IdMap<u32>,
    /// Emptied per-stage state vectors of ended streams, for new streams
    /// (at most [`SPARE_STREAMS`]): a stream then allocates nothing for them.
    spare: Vec<Vec<Option<S::Stream>>>,
    /// The last request's change buffers, for the next.
    spare_request: Spare,
    /// Whether the module exports `proxy_on_grpc_receive`/`_close` (and
    /// the request body callback that keeps a held request's body back).
    grpc: bool,
}

impl<S: Stage> Vm<S> {
    /// `grpc`: whether the module exports the gRPC callbacks.
    pub const fn new(module: &'static str, parse: fn(&[u8]) -> Result<Pipeline<S>, ConfigError>, grpc: bool) -> Vm<S> {
        Vm {
            module,
            parse,
            roots: Vec::new(),
            streams: Slots::new(),
            calls: IdMap::with_hasher(BuildHasherDefault::new()),
            grpc_calls: IdMap::with_hasher(BuildHasherDefault::new()),
            spare: Vec::new(),
            spare_request: Spare::new(),
            grpc,
        }
    }

    /// `proxy_on_context_create`: a root (parent 0) or a stream of root `parent`.
    pub fn context_create(vm: &RefCell<Vm<S>>, id: u32, parent: u32) {
        let mut vm = vm.borrow_mut();
        if parent == 0 {
            return;
        }
        if let Some(root) = vm.root(parent).cloned() {
            let state = StreamState { stages: vm.spare.pop().unwrap_or_default(), paused: None };
            vm.streams.insert(id, Stream { root, state, held: false });
        }
    }

    fn root(&self, id: u32) -> Option<&Rc<Pipeline<S>>> {
        self.roots.iter().rev().find(|(r, _)| *r == id).map(|(_, p)| p)
    }

    /// `proxy_on_configure`: parse the plugin config; false makes Envoy reject it.
    pub fn configure(vm: &RefCell<Vm<S>>, root: u32) -> bool {
        let bytes = match abi::get_buffer(abi::Buffer::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b.unwrap_or_default(),
            Err(s) => {
                log::error!("{}: cannot read the plugin configuration: status {s}", vm.borrow().module);
                return false;
            }
        };
        let mut vm = vm.borrow_mut();
        match (vm.parse)(&bytes) {
            Ok(p) => {
                vm.roots.retain(|(id, _)| *id != root);
                vm.roots.push((root, Rc::new(p)));
                // The tick period belongs to the root context being
                // configured: every root (a config reload makes a new one)
                // sets its own, or its batched counters would never flush.
                if let Err(s) = abi::set_tick_period_ms(crate::FLUSH_PERIOD_MS) {
                    log::warn!("{}: no tick, counters will not be flushed: status {s}", vm.module);
                }
                true
            }
            Err(e) => {
                log::error!("{}: {e}", vm.module);
                false
            }
        }
    }

    /// Run request-side stage work on stream `id` (its headers read once,
    /// as a [`Request`]): `f` decides, then the header changes and filter
    /// state are applied, the gRPC calls it made are mapped to the stream,
    /// and the stream is marked held if it waits. `None`: no such stream.
    /// The VM state is borrowed only inside; the caller acts on the outcome.
    fn request_side(
        vm: &RefCell<Vm<S>>,
        id: u32,
        f: impl FnOnce(&Pipeline<S>, &mut Request<'_>, &mut StreamState<S>) -> RequestOutcome,
    ) -> Option<RequestOutcome> {
        let mut guard = vm.borrow_mut();
        let Vm { streams, grpc_calls, spare_request, grpc, .. } = &mut *guard;
        let stream = streams.get_mut(id)?;
        let headers = read_header_map(abi::Map::RequestHeaders);
        let mut req = Request::reusing(&headers, id, spare_request);
        req.grpc = *grpc;
        let outcome = f(&stream.root, &mut req, &mut stream.state);
        stream.held = matches!(outcome, RequestOutcome::Pause);
        if let Some(calls) = req.take_calls() {
            for t in calls {
                grpc_calls.insert(t, id);
            }
        }
        req.apply(spare_request);
        Some(outcome)
    }

    /// `proxy_on_request_headers`.
    pub fn request_headers(vm: &RefCell<Vm<S>>, id: u32) -> u32 {
        let Some(outcome) = Self::request_side(vm, id, |root, req, st| root.on_request(req, st)) else { return CONTINUE };
        // Envoy runs this module's response callbacks for the local reply
        // before `send_local_response` returns: no borrow may be held here.
        match outcome {
            RequestOutcome::Reply(r) => {
                send(&r);
                PAUSE
            }
            RequestOutcome::Pause => PAUSE,
            RequestOutcome::Continue => CONTINUE,
        }
    }

    /// `proxy_on_request_body`: held back (buffered) while the request waits
    /// for a gRPC call, so that Envoy does not pass it on (a body chunk
    /// answered with Continue would resume the held headers).
    pub fn request_body(vm: &RefCell<Vm<S>>, id: u32) -> u32 {
        let guard = vm.borrow();
        match guard.streams.get(id) {
            Some(s) if s.held => PAUSE, // StopIterationAndBuffer
            _ => CONTINUE,
        }
    }

    /// `proxy_on_request_trailers`: held back the same way.
    pub fn request_trailers(vm: &RefCell<Vm<S>>, id: u32) -> u32 {
        Self::request_body(vm, id)
    }

    /// `proxy_on_grpc_receive` (`status` 0, message in the GrpcReceive
    /// buffer) and `proxy_on_grpc_close` (the call failed with `status`):
    /// Envoy delivers both to the root context that made the call; the
    /// token names the stream. The stream's stages decide, then the request
    /// goes on, or gets a local reply, with the stream as effective context.
    pub fn grpc_done(vm: &RefCell<Vm<S>>, token: u32, status: u32, size: usize) {
        let stream_id = {
            let mut guard = vm.borrow_mut();
            let Some(stream_id) = guard.grpc_calls.remove(&token) else { return };
            if !guard.streams.contains_key(stream_id) {
                return;
            }
            if let Err(s) = abi::set_effective_context(stream_id) {
                log::warn!("{}: stream {stream_id} is gone (status {s})", guard.module);
                return;
            }
            stream_id
        };
        let message = if status == 0 && size > 0 {
            abi::get_buffer(abi::Buffer::GrpcReceive, 0, size).ok().flatten().unwrap_or_default()
        } else {
            Vec::new()
        };
        let call = GrpcResponse { token, status, message };
        // A stage that does not know the token: let the request go on
        // rather than hold it for ever.
        let Some(outcome) =
            Self::request_side(vm, stream_id, |root, req, st| root.on_grpc_response(req, &call, st).unwrap_or(RequestOutcome::Continue))
        else {
            return;
        };
        match outcome {
            RequestOutcome::Reply(r) => send(&r),
            RequestOutcome::Continue => {
                if let Err(s) = abi::continue_request() {
                    log::warn!("cannot resume the request: status {s}");
                }
            }
            RequestOutcome::Pause => {}
        }
    }

    /// `proxy_on_response_headers`.
    pub fn response_headers(vm: &RefCell<Vm<S>>, id: u32, end_of_stream: bool) -> u32 {
        let outcome = {
            let mut guard = vm.borrow_mut();
            let Some(stream) = guard.streams.get_mut(id) else { return CONTINUE };
            let mut resp = Response::new(end_of_stream);
            stream.root.on_response(&mut resp, &mut stream.state);
            let outcome = resp.outcome();
            for t in outcome.calls.iter().flatten() {
                guard.calls.insert(*t, id);
            }
            outcome
        };
        if let Some(r) = &outcome.reply {
            send(r);
        }
        if outcome.paused {
            PAUSE
        } else {
            CONTINUE
        }
    }

    /// `proxy_on_http_call_response`: the answer to a call a stage
    /// dispatched, delivered to the stream that made it.
    pub fn http_call_response(vm: &RefCell<Vm<S>>, id: u32, token: u32, num_headers: usize, body_size: usize) {
        let outcome = {
            let mut guard = vm.borrow_mut();
            let stream_id = guard.calls.remove(&token).unwrap_or(id);
            let Some(stream) = guard.streams.get_mut(stream_id) else { return };
            if stream_id != id {
                let _ = abi::set_effective_context(stream_id);
            }
            let mut call = HttpCallResponse::new(token, num_headers, body_size);
            stream.root.on_http_call_response(&mut call, &mut stream.state);
            call.outcome()
        };
        if let Some(r) = &outcome.reply {
            send_with_body(r, outcome.body.as_deref().unwrap_or(r.body.as_bytes()));
        } else if outcome.resume {
            if let Err(s) = abi::continue_response() {
                log::warn!("cannot resume the response: status {s}");
            }
        }
    }

    /// `proxy_on_response_body`.
    pub fn response_body(vm: &RefCell<Vm<S>>, id: u32, size: usize, end_of_stream: bool) -> u32 {
        let mut guard = vm.borrow_mut();
        let Some(stream) = guard.streams.get_mut(id) else { return CONTINUE };
        match stream.root.on_response_body(&mut Body { size, end_of_stream }, &mut stream.state) {
            BodyFlow::Buffer => PAUSE,
            BodyFlow::Continue => CONTINUE,
        }
    }

    /// `proxy_on_tick` (every root of this VM ticks; flush once per tick).
    pub fn tick(vm: &RefCell<Vm<S>>, root: u32) {
        let guard = vm.borrow();
        if let Some(p) = guard.root(root) {
            p.on_tick();
        }
        crate::flush_module_counters();
    }

    /// `proxy_on_delete`: a stream ended, or a root was replaced.
    pub fn delete(vm: &RefCell<Vm<S>>, id: u32) {
        let mut vm = vm.borrow_mut();
        if let Some(mut stream) = vm.streams.remove(id) {
            // The end of the stream for the stages (metrics count it here
            // rather than in `proxy_on_log`, which would be one more entry).
            stream.root.on_end(&mut stream.state);
            if vm.spare.len() < SPARE_STREAMS {
                let mut stages = std::mem::take(&mut stream.state.stages);
                stages.clear();
                vm.spare.push(stages);
            }
            if !vm.calls.is_empty() {
                vm.calls.retain(|_, stream| *stream != id);
            }
            if !vm.grpc_calls.is_empty() {
                // Calls belong to the root context and outlive the stream:
                // cancel them (Envoy sends no callback for a cancelled call).
                vm.grpc_calls.retain(|token, stream| {
                    if *stream == id {
                        let _ = abi::grpc_cancel(*token);
                    }
                    *stream != id
                });
            }
        } else {
            if let Some(i) = vm.roots.iter().position(|(r, _)| *r == id) {
                let (_, p) = vm.roots.swap_remove(i);
                // Counts not yet flushed would be lost with the old config.
                p.on_tick();
            }
        }
    }

    /// Live streams and roots (tests, soak diagnostics).
    pub fn sizes(&self) -> (usize, usize) {
        (self.streams.len(), self.roots.len())
    }

    /// gRPC calls in flight (tests, diagnostics).
    pub fn grpc_calls_in_flight(&self) -> usize {
        self.grpc_calls.len()
    }
}

/// A module's VM state as a `static` (see [`export_module!`]): one
/// `RefCell` reached without the lazy-initialisation check and the call a
/// thread local costs on every entry into the VM.
pub struct VmCell<S: Stage>(RefCell<Vm<S>>);

// SAFETY: wasm32 without the atomics feature has no threads: the VM's one
// thread is the only one that can reach the static.
#[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
unsafe impl<S: Stage> Sync for VmCell<S> {}

impl<S: Stage> VmCell<S> {
    pub const fn new(vm: Vm<S>) -> VmCell<S> {
        VmCell(RefCell::new(vm))
    }

    /// Run `f` on the state (the same call as a thread local's `with`).
    pub fn with<R>(&self, f: impl FnOnce(&RefCell<Vm<S>>) -> R) -> R {
        f(&self.0)
    }
}

fn send(r: &LocalReply) {
    send_with_body(r, r.body.as_bytes());
}

fn send_with_body(r: &LocalReply, body: &[u8]) {
    let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if let Err(s) = abi::send_local_response(r.status, r.details, &headers, body, Some(r.grpc_status)) {
        log::error!("cannot send local reply {}: status {s}", r.status);
    }
}

/// Define a module's exports. The first argument names the module (for
/// logs), the second the stage type, the third a `fn(&[u8]) ->
/// Result<Pipeline<S>, ConfigError>`; then the optional callbacks the module
/// needs, out of `response_headers`, `response_body`,
/// `http_call_response`, `grpc` (`proxy_on_grpc_receive`, `_close`, and the
/// request body and trailers callbacks that hold a waiting request's body
/// back; without it [`Request::dispatch_grpc_call`] refuses). Every module
/// exports the ABI version, the allocator, `_initialize`, context creation,
/// VM start, configure, request headers, tick and delete (where the stages
/// see the stream end: there is no `proxy_on_log`).
#[macro_export]
macro_rules! export_module {
    ($name:expr, $stage:ty, $parse:expr $(, $extra:ident)* $(,)?) => {
        // A plain static where there are no threads (the module), a thread
        // local elsewhere (native builds of the crate, which never call it).
        #[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
        static __MESHPATTERNS_VM: $crate::vm::VmCell<$stage> =
            $crate::vm::VmCell::new($crate::vm::Vm::new($name, $parse, $crate::export_module!(@has_grpc $($extra)*)));
        #[cfg(not(all(target_family = "wasm", not(target_feature = "atomics"))))]
        thread_local! {
            static __MESHPATTERNS_VM: $crate::vm::VmCell<$stage> =
                $crate::vm::VmCell::new($crate::vm::Vm::new($name, $parse, $crate::export_module!(@has_grpc $($extra)*)));
        }

        #[cfg(target_os = "wasi")]
        extern "C" {
            fn __wasm_call_ctors();
        }

        #[no_mangle]
        pub extern "C" fn _initialize() {
            #[cfg(target_os = "wasi")]
            // SAFETY: the reactor's constructors, run once before anything else.
            unsafe {
                __wasm_call_ctors();
            }
            $crate::init($name);
        }

        #[no_mangle]
        pub extern "C" fn proxy_abi_version_0_2_1() {}

        #[no_mangle]
        pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
            $crate::abi::allocate(size)
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> u32 {
            1
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_context_create(id: u32, parent: u32) {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::context_create(vm, id, parent))
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_configure(root: u32, _size: usize) -> u32 {
            __MESHPATTERNS_VM.with(|vm| u32::from($crate::vm::Vm::configure(vm, root)))
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_request_headers(id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::request_headers(vm, id))
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_tick(root: u32) {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::tick(vm, root))
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_delete(id: u32) {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::delete(vm, id))
        }

        $( $crate::export_module!(@extra $extra); )*
    };
    (@extra response_headers) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_response_headers(id: u32, _headers: usize, end_of_stream: u32) -> u32 {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::response_headers(vm, id, end_of_stream != 0))
        }
    };
    (@extra response_body) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_response_body(id: u32, size: usize, end_of_stream: u32) -> u32 {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::response_body(vm, id, size, end_of_stream != 0))
        }
    };
    (@extra http_call_response) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_http_call_response(id: u32, token: u32, headers: usize, body_size: usize, _trailers: usize) {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::http_call_response(vm, id, token, headers, body_size))
        }
    };
    (@has_grpc) => { false };
    (@has_grpc grpc $($rest:ident)*) => { true };
    (@has_grpc $other:ident $($rest:ident)*) => { $crate::export_module!(@has_grpc $($rest)*) };
    (@extra grpc) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_grpc_receive(_root: u32, token: u32, size: usize) {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::grpc_done(vm, token, 0, size))
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_grpc_close(_root: u32, token: u32, status: u32) {
            // A unary call ends with receive (answered) or close (failed), not both.
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::grpc_done(vm, token, status.max(1), 0))
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_request_body(id: u32, _size: usize, _end_of_stream: u32) -> u32 {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::request_body(vm, id))
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_request_trailers(id: u32, _trailers: usize) -> u32 {
            __MESHPATTERNS_VM.with(|vm| $crate::vm::Vm::request_trailers(vm, id))
        }
    };
}
