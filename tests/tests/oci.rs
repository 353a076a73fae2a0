//! The Istio delivery path for every filter in the Makefile's `FILTERS`: the
//! OCI image `make image` builds (tests/oci/build.py) is reproducible, goes
//! through a real registry (Debian's docker-registry on loopback, pushed and
//! pulled with skopeo) unchanged, holds exactly the module `make build` wrote
//! in the layout Istio's image fetcher reads, and every WasmPlugin in istio/
//! pins the digest Istio verifies.
//!
//! Needs `make build` (target/meshpatterns/*.wasm), python3, skopeo,
//! docker-registry, tar and sha256sum.

use meshpatterns_tests::filters;
use meshpatterns_tests::{paths, wait_for};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TAG: &str = env!("CARGO_PKG_VERSION");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_file(p: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(p));
    out.split_whitespace().next().unwrap_or_default().to_string()
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The filters in FILTERS, each with its built module; fails clearly when
/// `make build` has not run.
fn built_filters() -> Vec<(String, PathBuf)> {
    let names = filters::names();
    assert!(!names.is_empty(), "FILTERS in the Makefile is empty");
    names
        .into_iter()
        .map(|f| {
            let m = filters::built_module(&f);
            assert!(m.is_file(), "{} is missing: run `make build` (make test does) before this test", m.display());
            (f, m)
        })
        .collect()
}

/// Run the image builder `make image` uses into `out`; returns digests.json.
fn build_images(out: &Path) -> Value {
    let names: Vec<String> = built_filters().into_iter().map(|(f, _)| f).collect();
    run(Command::new("python3")
        .arg(paths::repo().join("tests/oci/build.py"))
        .arg("--wasm-dir")
        .arg(paths::repo().join("target/meshpatterns"))
        .arg("--out")
        .arg(out)
        .args(["--tag", TAG])
        .args(&names));
    read_json(&out.join("digests.json"))
}

fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn building_twice_gives_byte_identical_images() {
    let (a, b) = (paths::scratch("oci-a"), paths::scratch("oci-b"));
    let (da, db) = (build_images(&a), build_images(&b));
    for (f, _) in built_filters() {
        assert_eq!(da[&f]["manifest"], db[&f]["manifest"], "{f}: manifest digest differs between two builds");
        let (fa, fb) = (files_under(&a.join(&f)), files_under(&b.join(&f)));
        assert_eq!(fa.len(), 5, "{f}: expected oci-layout, index.json and 3 blobs, got {:?}", fa.iter().map(|x| &x.0).collect::<Vec<_>>());
        assert!(fa == fb, "{f}: the two OCI layouts differ");
    }
}

#[test]
fn a_different_module_gives_a_different_digest() {
    // The pin check below is only meaningful if the digest follows the module.
    let (f, module) = built_filters().remove(0);
    let wasm_dir = paths::scratch("oci-mod");
    let mut bytes = std::fs::read(&module).unwrap();
    // A custom section appended to a module keeps it valid and changes it.
    bytes.extend_from_slice(&[0, 4, 3, b'm', b'p', b'x']);
    std::fs::write(wasm_dir.join(filters::module_file(&f)), bytes).unwrap();
    let out = paths::scratch("oci-mod-out");
    run(Command::new("python3")
        .arg(paths::repo().join("tests/oci/build.py"))
        .arg("--wasm-dir")
        .arg(&wasm_dir)
        .arg("--out")
        .arg(&out)
        .args(["--tag", TAG, &f]));
    let changed = read_json(&out.join("digests.json"));
    let original = build_images(&paths::scratch("oci-orig"));
    assert_ne!(changed[&f]["manifest"], original[&f]["manifest"]);
    assert_ne!(changed[&f]["module"], original[&f]["module"]);
}

/// What a WasmPlugin's `sha256` must hold for Istio to accept the module: for
/// `oci://` URLs Istio compares it with the hex of the image *manifest* digest
/// (pkg/wasm: the image fetcher returns the manifest digest as the checksum);
/// for `https://`/`http://` (and `file://`) with the sha256 of the module file.
fn pin_errors(docs: &[(String, serde_norway::Value)], digests: &Value) -> Vec<String> {
    let known = filters::names();
    let mut errors = Vec::new();
    for (file, doc) in docs.iter().filter(|(_, d)| d["kind"] == "WasmPlugin") {
        let name = doc["metadata"]["name"].as_str().unwrap_or("?");
        let at = format!("istio/{file}: WasmPlugin {name}");
        let url = doc["spec"]["url"].as_str().unwrap_or("");
        let filter = filters::filter_of_url(url);
        if !known.contains(&filter) {
            errors.push(format!("{at}: url {url:?} names {filter:?}, which is not in the Makefile's FILTERS {known:?}"));
            continue;
        }
        let (want, what) = if url.starts_with("oci://") {
            (digests[&filter]["manifest"].as_str().unwrap_or(""), "the image manifest digest (what Istio checks for oci:// URLs)")
        } else {
            (digests[&filter]["module"].as_str().unwrap_or(""), "the module's sha256 (what Istio checks for http(s):// URLs)")
        };
        match doc["spec"]["sha256"].as_str() {
            None => errors.push(format!("{at}: no sha256 pin; `make pin` writes {what}: {want}")),
            Some(got) if got != want => errors.push(format!(
                "{at}: pinned sha256 {got} does not match {what} built from target/meshpatterns/{}: {want}; \
                 the module changed or the pin was edited by hand: run `make pin`",
                filters::module_file(&filter)
            )),
            Some(_) => {}
        }
    }
    errors
}

#[test]
fn every_wasmplugin_pins_the_digest_istio_verifies() {
    let docs = filters::istio_documents();
    assert!(docs.iter().any(|(_, d)| d["kind"] == "WasmPlugin"), "no WasmPlugin in istio/");
    let digests = build_images(&paths::scratch("oci-pin"));
    let errors = pin_errors(&docs, &digests);
    assert!(errors.is_empty(), "stale or missing WasmPlugin pins:\n  {}", errors.join("\n  "));
}

#[test]
fn a_hand_edited_pin_is_reported_with_the_fix() {
    let mut docs = filters::istio_documents();
    let digests = build_images(&paths::scratch("oci-edit"));
    let before = pin_errors(&docs, &digests);
    let known = filters::names();
    let (file, doc) = docs
        .iter_mut()
        .find(|(_, d)| d["kind"] == "WasmPlugin" && known.contains(&filters::filter_of_url(d["spec"]["url"].as_str().unwrap_or(""))))
        .expect("a WasmPlugin for a filter in FILTERS in istio/");
    let file = file.clone();
    let edited = "0".repeat(64);
    doc["spec"]["sha256"] = serde_norway::Value::String(edited.clone());
    let after = pin_errors(&docs, &digests);
    let new: Vec<&String> = after.iter().filter(|e| !before.contains(e)).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].contains(&format!("istio/{file}")) && new[0].contains(&edited) && new[0].contains("run `make pin`"), "{}", new[0]);
}

/// Debian's docker-registry (distribution 2.8) on 127.0.0.1, storing into a
/// scratch directory; stopped when dropped.
struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    fn start() -> Registry {
        let dir = paths::scratch("registry");
        for _attempt in 0..5 {
            // The kernel picks a free port; the registry binds it right after.
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let config = dir.join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: meshpatterns-test\n",
                    dir.join("store").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.join("registry.log")).unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start docker-registry (apt-get install docker-registry): {e}"));
            let mut r = Registry { child, port, dir: dir.clone() };
            let up = wait_for("docker-registry to answer /v2/", Duration::from_secs(30), || {
                if let Ok(Some(_)) = r.child.try_wait() {
                    return Some(false); // exited: most likely the port was taken meanwhile
                }
                let mut c = meshpatterns_tests::Client::new(port);
                match c.try_request("GET", "/v2/", &[], b"") {
                    Ok(resp) if resp.status == 200 => Some(true),
                    _ => None,
                }
            });
            if up {
                return r;
            }
            let _ = r.child.wait();
        }
        panic!("docker-registry did not start; log:\n{}", std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default());
    }

    fn reference(&self, filter: &str) -> String {
        format!("docker://127.0.0.1:{}/meshpatterns/{filter}:{TAG}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- docker-registry log ---\n{}", self.log());
        }
    }
}

/// Take the module out of a pulled OCI layout the way Istio's image fetcher
/// does for the "compat" variant: an OCI (not Docker) manifest, exactly one
/// layer of type application/vnd.oci.image.layer.v1.tar+gzip, and in that
/// tar.gz a file named plugin.wasm.
fn extract_like_istio(layout: &Path, into: &Path) -> PathBuf {
    let index = read_json(&layout.join("index.json"));
    let blob = |digest: &str| layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().expect("index.json names a manifest");
    let manifest = read_json(&blob(manifest_digest));
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let layers = manifest["layers"].as_array().expect("manifest has layers");
    assert_eq!(layers.len(), 1, "Istio requires a single layer: {manifest}");
    assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    let layer = blob(layers[0]["digest"].as_str().unwrap());
    let listing = run(Command::new("tar").arg("-tzf").arg(&layer));
    assert_eq!(listing.trim(), "plugin.wasm", "the layer must hold plugin.wasm only");
    run(Command::new("tar").arg("-xzf").arg(&layer).arg("-C").arg(into).arg("plugin.wasm"));
    into.join("plugin.wasm")
}

#[test]
fn every_image_round_trips_through_a_real_registry() {
    let out = paths::scratch("oci-push");
    let digests = build_images(&out);
    let registry = Registry::start();
    for (f, module) in built_filters() {
        let want = digests[&f]["manifest"].as_str().unwrap().to_string();
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{TAG}", out.join(&f).display()))
            .arg(registry.reference(&f)));

        // The digest the registry serves is the one Istio compares with the pin.
        let raw = out.join(format!("{f}.manifest.json"));
        std::fs::write(&raw, run(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false"]).arg(registry.reference(&f))))
            .unwrap();
        assert_eq!(sha256_file(&raw), want, "{f}: the registry serves a different manifest than we built");

        let pulled = out.join(format!("{f}-pulled"));
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(registry.reference(&f))
            .arg(format!("oci:{}:{TAG}", pulled.display())));
        let dir = out.join(format!("{f}-extracted"));
        std::fs::create_dir_all(&dir).unwrap();
        let wasm = extract_like_istio(&pulled, &dir);
        assert!(
            std::fs::read(&wasm).unwrap() == std::fs::read(&module).unwrap(),
            "{f}: pulled plugin.wasm differs from {}",
            module.display()
        );
        assert_eq!(sha256_file(&wasm), digests[&f]["module"].as_str().unwrap(), "{f}: module sha256");
        assert_eq!(sha256_file(&wasm), sha256_file(&module));
    }
}

#[test]
fn make_pin_fixes_every_pin_and_changes_only_sha256_lines() {
    // `make pin` on a copy of istio/ with every pin missing or wrong.
    let dir = paths::scratch("oci-pin-copy");
    let mut originals = Vec::new();
    for f in filters::istio_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let broken: String = text
            .lines()
            .map(|l| match l.find("sha256:") {
                Some(i) if l.trim_start().starts_with("sha256:") => format!("{}sha256: {}\n", &l[..i], "0".repeat(64)),
                _ => format!("{l}\n"),
            })
            .collect();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::write(dir.join(&name), broken).unwrap();
        originals.push((name, text));
    }
    let names: Vec<String> = built_filters().into_iter().map(|(f, _)| f).collect();
    let out = paths::scratch("oci-pin-out");
    let status = Command::new("python3")
        .arg(paths::repo().join("tests/oci/build.py"))
        .arg("--wasm-dir")
        .arg(paths::repo().join("target/meshpatterns"))
        .arg("--out")
        .arg(&out)
        .args(["--tag", TAG, "--pin"])
        .arg(&dir)
        .args(&names)
        .output()
        .unwrap()
        .status;
    let digests = read_json(&out.join("digests.json"));
    let mut docs = Vec::new();
    for (name, original) in &originals {
        let pinned = std::fs::read_to_string(dir.join(name)).unwrap();
        // Apart from sha256 lines, the file is byte for byte what it was.
        let strip = |t: &str| t.lines().filter(|l| !l.trim_start().starts_with("sha256:")).map(str::to_string).collect::<Vec<_>>();
        assert_eq!(strip(&pinned), strip(original), "{name}: make pin changed more than sha256 lines");
        for d in filters::yaml_documents(&pinned).unwrap() {
            docs.push((name.clone(), d));
        }
    }
    // What is left can only be WasmPlugins for filters not in FILTERS, which
    // `make pin` reports and exits 1 for.
    let left = pin_errors(&docs, &digests);
    assert!(left.iter().all(|e| e.contains("not in the Makefile's FILTERS")), "{left:#?}");
    assert_eq!(status.success(), left.is_empty(), "exit status {status} with {left:?}");
    assert!(docs.iter().any(|(_, d)| d["kind"] == "WasmPlugin" && d["spec"]["sha256"].is_string()));
}
