//! Where things are: the repository, the Envoy binary, the built filters.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

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
/// output of `cargo build --target wasm32-wasip1 --release`. Panics, saying
/// to run `make build`, when a module there is older than a source it is
/// built from: the tests would otherwise judge yesterday's code.
pub fn wasm_dir() -> PathBuf {
    static CHECKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let dir = match std::env::var_os("WASM_DIR") {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => repo().join("target/wasm32-wasip1/release"),
            };
            if let Err(msg) = check_fresh(&dir, &module_sources()) {
                panic!("{msg}");
            }
            dir
        })
        .clone()
}

/// Each module the crates under `filters/` build (`filters/rate-limiter`
/// builds `rate_limiter.wasm`) with the directories of its sources: its own
/// crate and every path dependency, transitively (from `cargo metadata`).
pub fn module_sources() -> Vec<(String, Vec<PathBuf>)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} metadata: {e}", cargo.to_string_lossy()));
    assert!(out.status.success(), "cargo metadata failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let mut deps: std::collections::BTreeMap<PathBuf, Vec<PathBuf>> = std::collections::BTreeMap::new();
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for p in meta["packages"].as_array().into_iter().flatten() {
        let Some(dir) = p["manifest_path"].as_str().and_then(|m| Path::new(m).parent()) else { continue };
        let dir = dir.to_path_buf();
        let paths = p["dependencies"].as_array().into_iter().flatten().filter_map(|d| d["path"].as_str()).map(PathBuf::from).collect();
        deps.insert(dir.clone(), paths);
        let cdylib =
            p["targets"].as_array().into_iter().flatten().any(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib")));
        if cdylib {
            names.push((p["name"].as_str().unwrap_or_default().replace('-', "_"), dir));
        }
    }
    names
        .into_iter()
        .map(|(name, dir)| {
            let mut seen = vec![dir.clone()];
            let mut todo = vec![dir];
            while let Some(d) = todo.pop() {
                for dep in deps.get(&d).into_iter().flatten() {
                    if !seen.contains(dep) {
                        seen.push(dep.clone());
                        todo.push(dep.clone());
                    }
                }
            }
            (format!("{name}.wasm"), seen)
        })
        .collect()
}

/// The newest `.rs` or `Cargo.toml` under `dir` (skipping `target`).
fn newest_source(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    stack.push(path);
                }
                continue;
            }
            let source = path.extension().is_some_and(|e| e == "rs") || path.file_name().is_some_and(|n| n == "Cargo.toml");
            let Ok(modified) = meta.modified() else { continue };
            if source && newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, path));
            }
        }
    }
    newest
}

/// Err naming every module in `wasm_dir` that is older than the newest
/// source it is built from (`modules`: file name and source directories, as
/// [`module_sources`] gives them). Modules not present are not checked.
pub fn check_fresh(wasm_dir: &Path, modules: &[(String, Vec<PathBuf>)]) -> Result<(), String> {
    let mut stale = Vec::new();
    for (module, dirs) in modules {
        let Ok(built) = std::fs::metadata(wasm_dir.join(module)).and_then(|m| m.modified()) else { continue };
        let newest = dirs.iter().filter_map(|d| newest_source(d)).max_by_key(|(t, _)| *t);
        if let Some((_, source)) = newest.filter(|(t, _)| *t > built) {
            stale.push(format!("{module} is older than {}", source.display()));
        }
    }
    if stale.is_empty() {
        return Ok(());
    }
    Err(format!(
        "stale modules in WASM_DIR={}: {}; run `make build` (or point WASM_DIR at freshly built modules)",
        wasm_dir.display(),
        stale.join("; ")
    ))
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

/// The Python interpreter with grpcio for the gRPC client and server tests
/// (tests/grpc/echo.py): `$GRPC_PYTHON` (`make test` installs grpcio into
/// .venv and points it there), else the project virtualenv's, else the one
/// beside `$ENVOY`, else `python3`.
pub fn grpc_python() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPC_PYTHON").filter(|p| !p.is_empty()) {
        return p.into();
    }
    let venv = repo().join(".venv/bin/python3");
    if venv.exists() {
        return venv;
    }
    let beside = envoy().with_file_name("python3");
    if beside.exists() {
        return beside;
    }
    "python3".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn touch(path: &Path, at: SystemTime) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(path).unwrap();
        f.set_modified(at).unwrap();
    }

    #[test]
    fn a_module_older_than_one_of_its_sources_is_refused() {
        let root = scratch("stale-check");
        let (filters, wasm) = (root.join("filters"), root.join("wasm"));
        let (core, limiter, bench) = (filters.join("core"), filters.join("rate-limiter"), filters.join("anchor-raw"));
        let modules = vec![
            ("rate_limiter.wasm".to_string(), vec![limiter.clone(), core.clone()]),
            ("anchor_raw.wasm".to_string(), vec![bench.clone()]),
            ("noop.wasm".to_string(), vec![filters.join("noop")]),
        ];
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        touch(&limiter.join("src/lib.rs"), t0);
        touch(&core.join("Cargo.toml"), t0);
        touch(&wasm.join("rate_limiter.wasm"), t0 + Duration::from_secs(60));
        assert_eq!(check_fresh(&wasm, &modules), Ok(()), "fresh; modules not built are not checked");

        // A crate the module does not link changes: still fresh.
        touch(&bench.join("src/lib.rs"), t0 + Duration::from_secs(120));
        touch(&limiter.join("README.md"), t0 + Duration::from_secs(120));
        assert_eq!(check_fresh(&wasm, &modules), Ok(()));

        // A dependency's source changes: stale.
        touch(&core.join("src/hash.rs"), t0 + Duration::from_secs(120));
        let err = check_fresh(&wasm, &modules).unwrap_err();
        assert!(err.contains("rate_limiter.wasm is older than") && err.contains("core/src/hash.rs"), "{err}");
        assert!(err.contains("run `make build`"), "{err}");
    }

    #[test]
    fn module_sources_follow_path_dependencies() {
        let modules = module_sources();
        let (_, dirs) = modules.iter().find(|(m, _)| m == "rate_limiter.wasm").expect("rate_limiter.wasm among the modules");
        for d in ["filters/rate-limiter", "filters/core", "filters/host"] {
            assert!(dirs.iter().any(|p| p.ends_with(d)), "{d} not in {dirs:?}");
        }
        let (_, noop) = modules.iter().find(|(m, _)| m == "noop.wasm").expect("noop.wasm");
        assert!(!noop.iter().any(|p| p.ends_with("filters/core")), "{noop:?}");
    }
}
