//! The pluginConfig JSON Schemas (filters/<f>/config.schema.json, generated
//! from the Rust config types) are committed up to date, and the `validate`
//! command checks WasmPlugins and Envoy configs with the filters' own parsers,
//! naming the misspelt field. Filters come from the Makefile's `FILTERS`.

use meshpatterns_tests::{filters, paths};
use serde_json::Value;
use std::process::Command;

#[test]
fn every_filter_has_its_generated_schema_committed() {
    let mut errors = Vec::new();
    for f in filters::names() {
        let path = filters::schema_path(&f);
        let Some(want) = filters::schema_text(&f) else {
            errors.push(format!("{f}: not registered: add it to the `registry!` list in tests/src/filters.rs (and `features = [\"schema\"]` to its tests/Cargo.toml dependency)"));
            continue;
        };
        match std::fs::read_to_string(&path) {
            Ok(got) if got == want => {}
            Ok(_) => {
                errors.push(format!("{}: differs from the schema generated from the Rust config type: run `make schemas`", path.display()))
            }
            Err(e) => errors.push(format!("{}: {e}: run `make schemas`", path.display())),
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn schemas_close_objects_like_deny_unknown_fields() {
    // serde's deny_unknown_fields must reach the schema, or editors would
    // accept the misspelt fields the filter refuses.
    for f in filters::names() {
        let Some(schema) = filters::config_schema(&f) else { continue };
        assert_eq!(schema["additionalProperties"], Value::Bool(false), "{f}: top level of the schema is open");
        assert_eq!(schema["type"], "object", "{f}");
        assert!(schema["properties"].as_object().is_some_and(|p| !p.is_empty()), "{f}: no properties");
        // Every documented top-level field is accepted by the parser (the error,
        // if any, is about its value, not about the field being unknown).
        for (field, _) in schema["properties"].as_object().unwrap() {
            let json = format!("{{\"{field}\": {{\"meshpatterns-probe\": 1}}}}");
            if let Some(Err(e)) = filters::parse_config(&f, json.as_bytes()) {
                assert!(
                    !e.to_string().contains(&format!("unknown field `{field}`")),
                    "{f}: schema field {field} is unknown to the parser: {e}"
                );
            }
        }
    }
}

fn validate(files: &[std::path::PathBuf]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_validate")).args(files).output().expect("run validate");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// istio/ and envoy/ files holding configs only for registered filters (a
/// filter in FILTERS that is not registered fails the schema test above).
fn repo_configs() -> Vec<std::path::PathBuf> {
    let known = filters::registered();
    let mut files = filters::istio_files();
    let mut envoy: Vec<_> = std::fs::read_dir(paths::repo().join("envoy")).unwrap().flatten().map(|e| e.path()).collect();
    envoy.sort();
    files.extend(envoy.into_iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")));
    files
        .into_iter()
        .filter(|p| {
            let found = filters::check_file_text(&std::fs::read_to_string(p).unwrap()).unwrap_or_default();
            !found.is_empty() && found.iter().all(|f| known.contains(&f.filter) || f.filter == "noop")
        })
        .collect()
}

#[test]
fn validate_accepts_every_config_in_the_repository() {
    let files = repo_configs();
    assert!(files.iter().any(|p| p.starts_with(paths::repo().join("istio"))), "no WasmPlugin config found in istio/");
    assert!(files.iter().any(|p| p.starts_with(paths::repo().join("envoy"))), "no Envoy wasm config found in envoy/");
    let (ok, out) = validate(&files);
    assert!(ok, "{out}");
    assert!(out.lines().all(|l| l.starts_with("ok ")), "{out}");
}

/// Rename the first field of a JSON object: `hashHeader` -> `hashHeaderr`.
fn misspell_first_field(v: &mut Value) -> Option<String> {
    let m = v.as_object_mut()?;
    let key = m.keys().next()?.clone();
    let val = m.remove(&key)?;
    let bad = format!("{key}{}", key.chars().last().unwrap_or('x'));
    m.insert(bad.clone(), val);
    Some(bad)
}

#[test]
fn validate_names_a_misspelt_field_in_a_wasmplugin() {
    let dir = paths::scratch("validate-istio");
    let mut cases = Vec::new();
    for (i, (file, doc)) in filters::istio_documents().into_iter().enumerate() {
        if doc["kind"] != "WasmPlugin"
            || !filters::registered().contains(&filters::filter_of_url(doc["spec"]["url"].as_str().unwrap_or("")))
        {
            continue;
        }
        let mut json = serde_json::to_value(&doc).unwrap();
        let Some(bad) = misspell_first_field(&mut json["spec"]["pluginConfig"]) else { continue };
        let path = dir.join(format!("{i}-{file}"));
        std::fs::write(&path, serde_norway::to_string(&json).unwrap()).unwrap();
        cases.push((path, bad));
    }
    assert!(!cases.is_empty(), "no WasmPlugin with a pluginConfig in istio/");
    for (path, bad) in cases {
        let (ok, out) = validate(std::slice::from_ref(&path));
        assert!(!ok, "validate accepted {}:\n{out}", path.display());
        assert!(out.contains(&format!("error {}", path.display())) && out.contains(&format!("unknown field `{bad}`")), "{out}");
    }
}

#[test]
fn validate_names_a_misspelt_field_in_an_envoy_config() {
    let dir = paths::scratch("validate-envoy");
    let mut checked = 0;
    for src in repo_configs().into_iter().filter(|p| p.starts_with(paths::repo().join("envoy"))) {
        let text = std::fs::read_to_string(&src).unwrap();
        // Misspell the first field of the first wasm configuration value.
        let Some(at) = text.find("\"@type\": type.googleapis.com/google.protobuf.StringValue") else { continue };
        let Some(open) = text[at..].find('{').map(|o| at + o) else { continue };
        let Some(q1) = text[open..].find('"').map(|q| open + q + 1) else { continue };
        let Some(q2) = text[q1..].find('"').map(|q| q1 + q) else { continue };
        let field = &text[q1..q2];
        let bad = format!("{field}{}", field.chars().last().unwrap_or('x'));
        let mutated = format!("{}{bad}{}", &text[..q1], &text[q2..]);
        let path = dir.join(src.file_name().unwrap());
        std::fs::write(&path, mutated).unwrap();
        let (ok, out) = validate(std::slice::from_ref(&path));
        assert!(!ok && out.contains(&format!("unknown field `{bad}`")), "{}: expected `{bad}` named:\n{out}", src.display());
        checked += 1;
    }
    assert!(checked > 0, "no Envoy config with a JSON wasm configuration in envoy/");
}

#[test]
fn validate_refuses_a_file_without_plugin_configs() {
    let path = paths::scratch("validate-none").join("empty.yaml");
    std::fs::write(&path, "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n").unwrap();
    let (ok, out) = validate(&[path]);
    assert!(!ok && out.contains("no Istio WasmPlugin"), "{out}");
}

#[test]
fn a_rejected_field_is_reported_with_its_path() {
    // The path, not a line and column: validate says where the field is.
    let json = br#"{"keySources": [{"header": "x-user"}], "sessionCookie": {"name": "sid", "sameSit": "Lax"}}"#;
    let err = filters::parse_config("consistent-hash", json).expect("consistent-hash is registered").expect_err("misspelt field accepted");
    assert!(err.to_string().contains("unknown field `sameSit` at `sessionCookie.sameSit`"), "{err}");
}
