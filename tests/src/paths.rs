//! Where things are: the repository, the Envoy binary, the built filters.

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Envoy binary: `$ENVOY`, else the project virtualenv's (`make envoy`).
pub fn envoy() -> PathBuf {
    match std::env::var_os("ENVOY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo().join(".venv/bin/envoy"),
    }
}

/// Directory holding the built `.wasm` files: `$WASM_DIR`, else the release
/// output of `cargo build --target wasm32-wasip1 --release`.
pub fn wasm_dir() -> PathBuf {
    match std::env::var_os("WASM_DIR") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo().join("target/wasm32-wasip1/release"),
    }
}

/// A config file under `envoy/`.
pub fn envoy_config(name: &str) -> PathBuf {
    repo().join("envoy").join(name)
}

/// A fresh, empty scratch directory (removed by the OS, not by us, so that
/// logs survive a failing test for inspection).
pub fn scratch(prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("meshpatterns-{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}
