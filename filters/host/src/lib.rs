//! The only code that talks to Envoy: the proxy-wasm ABI implemented
//! directly (no SDK dispatcher), one generic root for every module, the
//! header snapshot, batched mutations and counters.
//!
//! Why not the SDK: Envoy enters the VM only for the callbacks a module
//! exports, and the `proxy-wasm` crate exports all of them (linking it at all
//! does), so every stream paid for callbacks nobody used; its hostcall
//! wrappers also panic on unexpected statuses and non-UTF-8 header values. A
//! module built here exports exactly what [`export_module!`] lists. See
//! README.md for the exports and the measured reason.

pub mod abi;
pub mod headers;
pub mod pools;
pub mod slots;
pub mod stage;
pub mod vm;

pub use stage::{Body, BodyFlow, Flow, GrpcResponse, HttpCallResponse, LocalReply, Pattern, Pipeline, Request, Response, Stage};

use std::cell::Cell;

/// Send `log` records to Envoy's log and install a last-resort panic hook
/// naming the module. Called once from `_initialize`.
pub fn init(module: &'static str) {
    struct HostLog;
    impl log::Log for HostLog {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.level() <= log::Level::Info
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                let level = match r.level() {
                    log::Level::Error => 4,
                    log::Level::Warn => 3,
                    log::Level::Info => 2,
                    log::Level::Debug => 1,
                    log::Level::Trace => 0,
                };
                abi::log(level, &r.args().to_string());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: HostLog = HostLog;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    std::panic::set_hook(Box::new(move |info| {
        abi::log(5, &format!("{module}: panic (this VM is now unusable): {info}"));
    }));
}

/// A counter that counts in the VM and adds to Envoy's stat on [`flush`],
/// which the module calls from its tick: one hostcall per tick instead of
/// one per request. Stats lag by at most [`FLUSH_PERIOD_MS`].
///
/// [`flush`]: BatchedCounter::flush
#[derive(Debug)]
pub struct BatchedCounter {
    id: Option<u32>,
    pending: Cell<u64>,
}

impl BatchedCounter {
    pub fn new(name: &str) -> BatchedCounter {
        BatchedCounter { id: abi::define_metric(abi::MetricKind::Counter, name).ok(), pending: Cell::new(0) }
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.pending.set(self.pending.get().saturating_add(n));
    }
    /// Add what was counted since the last flush to Envoy's stat.
    pub fn flush(&self) {
        let n = self.pending.replace(0);
        if let (Some(id), true) = (self.id, n > 0) {
            let _ = abi::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// How often modules flush batched counters.
pub const FLUSH_PERIOD_MS: u32 = 500;

/// A histogram (each value is one hostcall: there is no batching a histogram).
#[derive(Debug, Clone, Copy)]
pub struct Histogram(Option<u32>);

impl Histogram {
    pub fn new(name: &str) -> Histogram {
        Histogram(abi::define_metric(abi::MetricKind::Histogram, name).ok())
    }
    #[inline]
    pub fn record(&self, v: u64) {
        if let Some(id) = self.0 {
            let _ = abi::record_metric(id, v);
        }
    }
}

thread_local! {
    /// Ids minted without the CSPRNG since the last flush; the stat is
    /// defined only when it first has something to count.
    static MINT_FALLBACKS: Cell<u64> = const { Cell::new(0) };
    static MINT_FALLBACK_STAT: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Flush the module-wide counters (from the tick).
pub fn flush_module_counters() {
    let n = MINT_FALLBACKS.with(|c| c.replace(0));
    if n == 0 {
        return;
    }
    let id = MINT_FALLBACK_STAT.with(|s| {
        if s.get().is_none() {
            s.set(abi::define_metric(abi::MetricKind::Counter, "meshpatterns.id_mint_fallback").ok());
        }
        s.get()
    });
    if let Some(id) = id {
        let _ = abi::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// A new id for a cookie the filter issues: 16 bytes from the host's CSPRNG
/// as 32 hex digits. If the host cannot provide them (never seen on Envoy),
/// a hash of the time and `context_id` (unique, not secret), counted in
/// `meshpatterns.id_mint_fallback`.
pub fn mint_id(context_id: u32) -> String {
    let mut bytes = [0u8; 16];
    if !random_bytes(&mut bytes) {
        MINT_FALLBACKS.with(|c| c.set(c.get().saturating_add(1)));
        let seed = format!("{}:{context_id}", abi::now_nanos());
        let a = meshpatterns_core::hash::hash64_seeded(seed.as_bytes(), 1);
        let b = meshpatterns_core::hash::hash64_seeded(seed.as_bytes(), 2);
        for (dst, src) in bytes.iter_mut().zip(a.to_le_bytes().into_iter().chain(b.to_le_bytes())) {
            *dst = src;
        }
    }
    meshpatterns_core::cookie::id_from_bytes(&bytes)
}

#[cfg(target_os = "wasi")]
mod wasi {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        pub fn random_get(buf: *mut u8, len: usize) -> u16;
    }
}

/// Fill `buf` with random bytes from the host (WASI `random_get`, which Envoy
/// serves from its CSPRNG). Returns false if the host refused.
pub fn random_bytes(buf: &mut [u8]) -> bool {
    #[cfg(target_os = "wasi")]
    {
        // SAFETY: random_get writes exactly `len` bytes into the buffer we own.
        unsafe { wasi::random_get(buf.as_mut_ptr(), buf.len()) == 0 }
    }
    #[cfg(not(target_os = "wasi"))]
    {
        let _ = buf;
        false
    }
}

/// Record filter state `wasm.<key>` outside the request callback (where
/// [`Request::record`] is not at hand); the caller checks the stage's
/// `filterState` switch ([`Request::records_state`]).
#[inline]
pub fn set_filter_state(key: &str, value: &str) {
    if let Err(s) = abi::set_property(&[key], value.as_bytes()) {
        log::warn!("cannot set filter state {key}: status {s}");
    }
}

/// A property as UTF-8 text (`["plugin_name"]`, `["xds", "cluster_name"]`).
#[inline]
pub fn property_string(path: &[&str]) -> Option<String> {
    headers::property_text(abi::get_property(path).ok().flatten()?)
}

/// An integer property (Envoy serialises them as 8 little-endian bytes).
#[inline]
pub fn property_i64(path: &[&str]) -> Option<i64> {
    headers::property_i64(&abi::get_property(path).ok().flatten()?)
}

/// A xorshift generator for the randomised unit tests: `rand(n)` is in `0..n`.
#[cfg(test)]
pub(crate) fn test_rand(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut next = meshpatterns_core::test_rand(seed);
    move |n| next() % n
}
