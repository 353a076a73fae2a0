//! The proxy-wasm glue: reads headers and properties, calls [`crate::logic`]
//! and [`crate::legacy`], applies the result. Built only for wasm.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use log::warn;
use meshpatterns_host as host;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType, Status};

use crate::legacy::{self, LegacySpec};
use crate::logic::{self, Admission, Config, Settings};
use crate::{LEGACY_PARSE_ERRORS, LEGACY_REWRITTEN, LEGACY_UPSTREAM_ERRORS};

const FILTER: &str = "metrics-adapter";

proxy_wasm::main! {{
    host::init(FILTER);
    proxy_wasm::set_root_context(|_| Box::new(Root { settings: None, red: None }));
}}

#[derive(Clone, Copy)]
struct LegacyMetrics {
    rewritten: host::Counter,
    parse_errors: host::Counter,
    upstream_errors: host::Counter,
}

/// One label's values as this VM knows them: index 0 is `none`, 1 is
/// `other`, then every value admitted (by any worker VM) that this VM has met.
struct LabelSlot {
    name: String,
    max: u32,
    /// method and status_class are bounded by construction: no shared list.
    capped: bool,
    /// Shared-data key of the admitted-values list.
    shared_key: String,
    index: HashMap<String, u16>,
    values: Vec<String>,
    /// The shared list was seen full (it never shrinks): misses are `other`.
    full: bool,
}

const NONE_IX: u16 = 0;
const OTHER_IX: u16 = 1;

impl LabelSlot {
    fn new(name: &str, max: u32, capped: bool, shared_prefix: &str) -> LabelSlot {
        let values = vec![logic::NONE.to_string(), logic::OVERFLOW.to_string()];
        let index = values.iter().enumerate().map(|(i, v)| (v.clone(), i as u16)).collect();
        LabelSlot { name: name.into(), max, capped, shared_key: format!("{shared_prefix}{name}"), index, values, full: false }
    }

    fn remember(&mut self, value: String) -> u16 {
        let ix = self.values.len() as u16;
        self.index.insert(value.clone(), ix);
        self.values.push(value);
        ix
    }

    /// The index of the value to report: the value itself if admitted (now
    /// or before, by any worker VM), else `other`.
    fn intern(&mut self, value: String) -> u16 {
        if let Some(ix) = self.index.get(&value) {
            return *ix;
        }
        if !self.capped {
            return self.remember(value);
        }
        if self.full || self.values.len() >= usize::from(u16::MAX) {
            return OTHER_IX;
        }
        for _ in 0..4 {
            let (bytes, cas) = match hostcalls::get_shared_data(&self.shared_key) {
                Ok(r) => r,
                Err(_) => return OTHER_IX,
            };
            let mut list = logic::decode_admitted(bytes.as_deref().unwrap_or_default());
            let refs: Vec<&str> = list.iter().map(String::as_str).collect();
            match logic::admit(&refs, self.max, &value) {
                Admission::Known => return self.remember(value),
                Admission::Overflow => {
                    // Learn every admitted value once, then stop asking.
                    for v in list {
                        if !self.index.contains_key(&v) {
                            self.remember(v);
                        }
                    }
                    self.full = true;
                    return self.index.get(&value).copied().unwrap_or(OTHER_IX);
                }
                Admission::Admit => {
                    list.push(value.clone());
                    match hostcalls::set_shared_data(&self.shared_key, Some(&logic::encode_admitted(&list)), cas) {
                        Ok(()) => return self.remember(value),
                        Err(Status::CasMismatch) => continue,
                        Err(st) => {
                            warn!("{FILTER}: cannot store admitted values of label {}: {st:?}", self.name);
                            return OTHER_IX;
                        }
                    }
                }
            }
        }
        OTHER_IX
    }
}

/// Most labels a config can have: route, cluster, method, status_class and
/// `logic::MAX_HEADER_LABELS` header labels.
const MAX_LABELS: usize = 4 + logic::MAX_HEADER_LABELS;
type LabelKey = [u16; MAX_LABELS];

/// Metric ids of one label set; the error counter is defined on the first error.
struct Ids {
    requests: Option<u32>,
    errors: Option<Option<u32>>,
    duration: Option<u32>,
}

/// Per-VM RED state. Bounded: each capped label holds at most `max_values`
/// admitted values (+ none, other), so at most `Settings::max_label_sets`
/// entries in `ids`.
struct Red {
    slots: Vec<LabelSlot>,
    ids: HashMap<LabelKey, Ids>,
    legacy: LegacyMetrics,
}

impl Red {
    fn name(&self, metric: &str, key: &LabelKey) -> String {
        let labels: Vec<(&str, &str)> = self
            .slots
            .iter()
            .zip(key.iter())
            .map(|(slot, ix)| (slot.name.as_str(), slot.values.get(usize::from(*ix)).map(String::as_str).unwrap_or(logic::OVERFLOW)))
            .collect();
        logic::stat_name(metric, &labels)
    }

    fn record(&mut self, key: LabelKey, error: bool, duration_ms: Option<u64>) {
        if !self.ids.contains_key(&key) {
            let requests = hostcalls::define_metric(MetricType::Counter, &self.name(logic::REQUESTS, &key)).ok();
            let duration = hostcalls::define_metric(MetricType::Histogram, &self.name(logic::DURATION, &key)).ok();
            self.ids.insert(key, Ids { requests, errors: None, duration });
        }
        let err_name =
            if error && self.ids.get(&key).is_some_and(|i| i.errors.is_none()) { Some(self.name(logic::ERRORS, &key)) } else { None };
        let Some(ids) = self.ids.get_mut(&key) else { return };
        if let Some(id) = ids.requests {
            let _ = hostcalls::increment_metric(id, 1);
        }
        if error {
            let id = *ids.errors.get_or_insert_with(|| err_name.and_then(|n| hostcalls::define_metric(MetricType::Counter, &n).ok()));
            if let Some(id) = id {
                let _ = hostcalls::increment_metric(id, 1);
            }
        }
        if let (Some(id), Some(ms)) = (ids.duration, duration_ms) {
            let _ = hostcalls::record_metric(id, ms);
        }
    }
}

struct Root {
    settings: Option<Rc<Settings>>,
    red: Option<Rc<RefCell<Red>>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(s) = host::load_config::<Config, _>(FILTER, Settings::try_from_config) else {
            return false;
        };
        let s = Rc::new(s);
        let plugin = host::property_string(&["plugin_name"]).unwrap_or_default();
        let legacy = LegacyMetrics {
            rewritten: host::Counter::new(LEGACY_REWRITTEN),
            parse_errors: host::Counter::new(LEGACY_PARSE_ERRORS),
            upstream_errors: host::Counter::new(LEGACY_UPSTREAM_ERRORS),
        };
        let prefix = format!("meshpatterns.metrics_adapter.{plugin}.labels.");
        let slots = s
            .labels()
            .iter()
            .map(|l| LabelSlot::new(&l.name, l.max_values, !matches!(l.name.as_str(), "method" | "status_class"), &prefix))
            .collect();
        self.red = Some(Rc::new(RefCell::new(Red { slots, ids: HashMap::new(), legacy })));
        self.settings = Some(s);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let settings = self.settings.clone()?;
        let red = self.red.clone()?;
        Some(Box::new(Stream { settings, red, method: logic::NONE, header_values: Vec::new(), legacy: None, rewrite: Rewrite::Off }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rewrite {
    /// Not an adapted response (or not a 200).
    Off,
    /// Buffering the app's body until the end of the stream.
    Buffering,
    /// The body grew past `maxBodyBytes`: the error exposition was sent, the rest is dropped.
    Dropping,
}

struct Stream {
    settings: Rc<Settings>,
    red: Rc<RefCell<Red>>,
    method: &'static str,
    /// Sanitised header-label values, in `settings.header_labels` order.
    header_values: Vec<String>,
    legacy: Option<usize>,
    rewrite: Rewrite,
}

impl Context for Stream {}

impl Stream {
    fn legacy_spec(&self) -> Option<&LegacySpec> {
        self.settings.legacy.get(self.legacy?)
    }

    fn replace_body(size: usize, text: &[u8]) {
        if let Err(s) = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, text) {
            warn!("{FILTER}: cannot replace the response body: {s:?}");
        }
    }
}

/// Request headers are read once per request (one hostcall) through a
/// snapshot that never panics on header bytes that are not UTF-8.
fn request_header(snap: &host::HeaderSnapshot, name: &str) -> Option<String> {
    meshpatterns_core::RequestView::header(snap, name)
}

/// An integer property (Envoy serialises them as 8 little-endian bytes).
fn property_i64(path: &[&str]) -> Option<i64> {
    let bytes = host::abi::get_property(path).ok().flatten()?;
    let arr: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(i64::from_le_bytes(arr))
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let snap = host::HeaderSnapshot::request();
        let method = request_header(&snap, ":method");
        self.method = logic::method_label(method.as_deref());
        self.header_values = self
            .settings
            .header_labels
            .iter()
            .map(|h| request_header(&snap, &h.header).map(|v| logic::sanitize_value(&v)).unwrap_or_else(|| logic::NONE.into()))
            .collect();
        if self.settings.legacy.is_empty() || !matches!(self.method, "GET" | "HEAD") {
            return Action::Continue;
        }
        let path = request_header(&snap, ":path").unwrap_or_default();
        let (bare, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path.as_str(), None),
        };
        if let Some(i) = self.settings.legacy.iter().position(|l| l.path == bare) {
            if let Some(spec) = self.settings.legacy.get(i) {
                let target = match query {
                    Some(q) => format!("{}?{q}", spec.upstream_path),
                    None => spec.upstream_path.clone(),
                };
                host::set_request_header(":path", &target);
                // The body must reach the filter as plain text.
                host::remove_request_header("accept-encoding");
                host::clear_route_cache();
                self.legacy = Some(i);
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.legacy.is_none() {
            return Action::Continue;
        }
        let legacy = self.red.borrow().legacy;
        let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status").ok().flatten();
        if status.as_deref() != Some("200") {
            // The app's error goes to the scraper as is (Prometheus marks the target down).
            legacy.upstream_errors.inc();
            return Action::Continue;
        }
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, "content-length", None);
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, "content-encoding", None);
        host::set_response_header("content-type", legacy::CONTENT_TYPE);
        if end_of_stream {
            // No body to rewrite (HEAD, or an empty 200): an empty exposition.
            if self.method != "HEAD" {
                legacy.parse_errors.inc();
            }
        } else {
            self.rewrite = Rewrite::Buffering;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(spec) = self.legacy_spec() else {
            return Action::Continue;
        };
        let legacy = self.red.borrow().legacy;
        match self.rewrite {
            Rewrite::Off => Action::Continue,
            Rewrite::Dropping => {
                Stream::replace_body(body_size, b"");
                Action::Continue
            }
            Rewrite::Buffering if body_size > spec.max_body_bytes => {
                legacy.parse_errors.inc();
                let text = spec.too_large(body_size).text;
                Stream::replace_body(body_size, text.as_bytes());
                self.rewrite = if end_of_stream { Rewrite::Off } else { Rewrite::Dropping };
                Action::Continue
            }
            Rewrite::Buffering if !end_of_stream => Action::Pause,
            Rewrite::Buffering => {
                let body = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size).ok().flatten().unwrap_or_default();
                let adapted = spec.adapt(&body);
                if adapted.parsed {
                    legacy.rewritten.inc();
                } else {
                    legacy.parse_errors.inc();
                }
                Stream::replace_body(body_size, adapted.text.as_bytes());
                self.rewrite = Rewrite::Off;
                Action::Continue
            }
        }
    }

    fn on_log(&mut self) {
        let code = property_i64(&["response", "code"]).and_then(|c| u64::try_from(c).ok());
        let duration_ms = property_i64(&["request", "duration"]).and_then(|ns| u64::try_from(ns).ok()).map(|ns| ns / 1_000_000);
        let s = Rc::clone(&self.settings);
        let mut red = self.red.borrow_mut();
        let mut key: LabelKey = [NONE_IX; MAX_LABELS];
        // Slots are in `Settings::labels` order: dimensions, method, status_class, header labels.
        let mut values: Vec<String> = Vec::with_capacity(MAX_LABELS);
        for d in &s.dimensions {
            values.push(host::property_string(&d.property()).map(|v| logic::sanitize_value(&v)).unwrap_or_else(|| logic::NONE.into()));
        }
        values.push(self.method.into());
        values.push(logic::status_class(code).into());
        values.append(&mut self.header_values);
        for ((slot, k), v) in red.slots.iter_mut().zip(key.iter_mut()).zip(values) {
            *k = slot.intern(v);
        }
        red.record(key, logic::is_error(code), duration_ms);
    }
}
