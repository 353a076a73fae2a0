//! Every manifest in istio/ against the upstream schemas: Istio's CRDs (npm
//! @kubernetes-models/istio) and Kubernetes' own (npm kubernetes-models),
//! checked by tests/schema/check.mjs with unknown fields rejected at any depth.
//! pluginConfig is opaque to those schemas; tests/tests/istio.rs parses it with
//! each filter's own code.
//!
//! Needs `make schema-deps` (npm ci into tests/schema/node_modules).

use meshpatterns_tests::{filters, paths};
use serde_norway::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Run the schema checker on `files`: (success, stdout + stderr).
fn check(files: &[PathBuf]) -> (bool, String) {
    let dir = paths::repo().join("tests/schema");
    assert!(
        dir.join("node_modules/@kubernetes-models/istio").is_dir() && dir.join("node_modules/kubernetes-models").is_dir(),
        "tests/schema/node_modules is not installed: run `make schema-deps` (make test does)"
    );
    let out = Command::new("node")
        .arg(dir.join("check.mjs"))
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node (apt-get install nodejs): {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_manifest_in_istio_matches_the_istio_and_kubernetes_schemas() {
    let files = filters::istio_files();
    assert!(!files.is_empty(), "no YAML in istio/");
    let (ok, out) = check(&files);
    assert!(ok, "schema errors in istio/:\n{out}");
    let n = filters::istio_documents().len();
    assert!(out.contains(&format!("schema ok: {n} documents")), "{out}");
}

/// Write each document of istio/ to its own file after `mutate` (which returns
/// the misspelt field path it introduced, or None to skip the document).
fn mutated(prefix: &str, mutate: impl Fn(&mut Value) -> Option<String>) -> Vec<(PathBuf, String)> {
    let dir = paths::scratch(prefix);
    let mut out = Vec::new();
    for (i, (file, mut doc)) in filters::istio_documents().into_iter().enumerate() {
        if let Some(field) = mutate(&mut doc) {
            let path = dir.join(format!("{i}-{file}"));
            std::fs::write(&path, serde_norway::to_string(&doc).unwrap()).unwrap();
            out.push((path, field));
        }
    }
    out
}

fn rename_first_key(map: &mut Value, typo: impl Fn(&str) -> String) -> Option<(String, String)> {
    let m = map.as_mapping_mut()?;
    let key = m.keys().next()?.as_str()?.to_string();
    let value = m.remove(key.as_str())?;
    let bad = typo(&key);
    m.insert(Value::String(bad.clone()), value);
    Some((key, bad))
}

/// `failStrategy` -> `failStrategyy`: a plausible slip that is no field.
fn typo(k: &str) -> String {
    format!("{k}{}", k.chars().last().unwrap_or('x'))
}

fn assert_each_named(cases: &[(PathBuf, String)]) {
    assert!(!cases.is_empty());
    let files: Vec<PathBuf> = cases.iter().map(|(p, _)| p.clone()).collect();
    let (ok, out) = check(&files);
    assert!(!ok, "the checker accepted misspelt fields:\n{out}");
    for (path, field) in cases {
        let leaf = field.rsplit('.').next().unwrap_or(field);
        let line = out.lines().find(|l| l.starts_with(&path.display().to_string()));
        let line = line.unwrap_or_else(|| panic!("no error for {}:\n{out}", path.display()));
        assert!(line.contains(&format!("at {field}: unknown field \"{leaf}\"")), "expected {field} named in:\n{line}");
    }
}

#[test]
fn a_misspelt_spec_field_fails_naming_it() {
    let cases = mutated("schema-spec", |doc| {
        let (_, bad) = rename_first_key(doc.get_mut("spec")?, typo)?;
        Some(format!("spec.{bad}"))
    });
    assert_each_named(&cases);
}

#[test]
fn a_misspelt_metadata_field_fails_naming_it() {
    let cases = mutated("schema-meta", |doc| {
        let (_, bad) = rename_first_key(doc.get_mut("metadata")?, typo)?;
        Some(format!("metadata.{bad}"))
    });
    assert_each_named(&cases);
}

#[test]
fn a_misspelt_nested_field_fails_naming_it() {
    // The deepest mapping key in each document's spec, outside the maps
    // that take any key (pluginConfig is only known to the filter's parser).
    fn deepest(v: &mut Value, path: String, depth: usize, best: &mut Option<(usize, String)>) {
        if let Some(m) = v.as_mapping_mut() {
            for (k, child) in m.iter_mut() {
                let Some(k) = k.as_str() else { continue };
                // Free-form maps take any key: plugin configs, label maps, a
                // Service's selector, an EnvoyFilter patch value.
                let free_form = ["pluginConfig", "matchLabels", "labels", "annotations", "data", "stringData", "value"].contains(&k)
                    || (k == "selector" && child.as_mapping().is_some_and(|m| m.values().all(|v| !v.is_mapping() && !v.is_sequence())));
                if free_form {
                    continue;
                }
                let p = format!("{path}.{k}");
                if best.as_ref().is_none_or(|(d, _)| depth > *d) {
                    *best = Some((depth, p.clone()));
                }
                deepest(child, p, depth + 1, best);
            }
        } else if let Some(seq) = v.as_sequence_mut() {
            for (i, child) in seq.iter_mut().enumerate() {
                deepest(child, format!("{path}[{i}]"), depth, best);
            }
        }
    }
    fn at<'a>(v: &'a mut Value, path: &str) -> Option<&'a mut Value> {
        let mut cur = v;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            let (key, idx) = match part.split_once('[') {
                Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (part, None),
            };
            cur = cur.get_mut(key)?;
            if let Some(i) = idx {
                cur = cur.get_mut(i)?;
            }
        }
        Some(cur)
    }
    let cases = mutated("schema-nested", |doc| {
        let mut best = None;
        deepest(doc.get_mut("spec")?, "spec".into(), 0, &mut best);
        let (_, path) = best?;
        let (parent, key) = path.rsplit_once('.')?;
        let m = at(doc, parent)?.as_mapping_mut()?;
        let value = m.remove(key)?;
        let bad = typo(key);
        m.insert(Value::String(bad.clone()), value);
        Some(format!("{parent}.{bad}"))
    });
    assert_each_named(&cases);
}

#[test]
fn a_wrong_enum_value_fails() {
    let dir = paths::scratch("schema-enum");
    let (file, mut doc) = filters::istio_documents().into_iter().find(|(_, d)| d["kind"] == "WasmPlugin").expect("a WasmPlugin in istio/");
    doc["spec"]["failStrategy"] = Value::String("FAIL_SOMETIMES".into());
    let path: &Path = &dir.join(&file);
    std::fs::write(path, serde_norway::to_string(&doc).unwrap()).unwrap();
    let (ok, out) = check(&[path.to_path_buf()]);
    assert!(!ok && out.contains("at spec.failStrategy:") && out.contains("FAIL_SOMETIMES"), "{out}");
}
