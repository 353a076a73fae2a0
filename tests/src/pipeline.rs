//! Run a single-pattern test through the pipeline module instead.
//!
//! With `MESHPATTERNS_MODULE=pipeline`, every Envoy config the harness
//! renders loads `meshpatterns.wasm` wherever it loaded one pattern's module,
//! with that pattern's config as the pipeline's only stage:
//! `{"stages":[{"<stageKey>": <the config>}]}`. Stat and filter-state names
//! are the same, so the same assertions hold; `make test` runs every
//! pattern's integration tests both ways.

/// Whether this run tests the pipeline module.
pub fn enabled() -> bool {
    std::env::var("MESHPATTERNS_MODULE").is_ok_and(|v| v == "pipeline")
}

/// The stage key of a pattern's module file (`rate_limiter.wasm` -> `rateLimit`).
fn stage_of(file: &str) -> Option<&'static str> {
    let base = file.rsplit('/').next()?.strip_suffix(".wasm")?.replace('_', "-");
    meshpatterns::PATTERNS.iter().find(|(name, _)| *name == base).map(|(_, key)| *key)
}

/// Rewrite a rendered Envoy config (YAML) to load the pipeline module.
pub fn as_pipeline(yaml: &str) -> String {
    let mut doc: serde_norway::Value = serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("rendered config is not YAML: {e}"));
    let mut n = 0;
    rewrite(&mut doc, &mut n);
    serde_norway::to_string(&doc).unwrap_or_else(|e| panic!("cannot write YAML: {e}"))
}

fn rewrite(v: &mut serde_norway::Value, n: &mut usize) {
    use serde_norway::Value;
    match v {
        Value::Mapping(m) => {
            let is_vm =
                m.get("code").and_then(|c| c.get("local")).and_then(|l| l.get("filename")).and_then(|f| f.as_str()).and_then(stage_of);
            if let Some(_key) = is_vm {
                if let Some(Value::Mapping(local)) = m.get_mut("code").and_then(|c| c.get_mut("local")) {
                    if let Some(Value::String(f)) = local.get_mut("filename") {
                        let dir = f.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
                        *f = format!("{dir}/meshpatterns.wasm");
                    }
                }
            }
            // A Wasm filter's `config`: rewrite its configuration value with its vm's stage key.
            let key = m
                .get("vm_config")
                .and_then(|vc| vc.get("code"))
                .and_then(|c| c.get("local"))
                .and_then(|l| l.get("filename"))
                .and_then(|f| f.as_str())
                .and_then(stage_of);
            if let Some(key) = key {
                if let Some(Value::Mapping(cfg)) = m.get_mut("configuration") {
                    let text = cfg.get("value").and_then(|v| v.as_str()).unwrap_or("").to_string();
                    let inner: serde_json::Value = if text.trim().is_empty() {
                        serde_json::json!({})
                    } else {
                        serde_json::from_str(&text).unwrap_or_else(|e| panic!("wasm config is not JSON: {e}: {text}"))
                    };
                    let wrapped = serde_json::json!({"stages": [{key: inner}]});
                    cfg.insert(Value::String("value".into()), Value::String(wrapped.to_string()));
                    *n += 1;
                } else {
                    let mut cfg = serde_norway::Mapping::new();
                    cfg.insert(Value::String("@type".into()), Value::String("type.googleapis.com/google.protobuf.StringValue".into()));
                    cfg.insert(Value::String("value".into()), Value::String(serde_json::json!({"stages": [{key: {}}]}).to_string()));
                    m.insert(Value::String("configuration".into()), Value::Mapping(cfg));
                    *n += 1;
                }
            }
            for (_, c) in m.iter_mut() {
                rewrite(c, n);
            }
        }
        Value::Sequence(s) => s.iter_mut().for_each(|c| rewrite(c, n)),
        _ => {}
    }
}

/// What a single filter's error text becomes when the filter runs as the
/// pipeline's only stage: field paths gain `stages[0].<stageKey>.` and the
/// module names itself `meshpatterns`. Unchanged when testing single modules.
pub fn in_stage(filter: &str, text: &str) -> String {
    if !enabled() {
        return text.to_string();
    }
    let Some((_, key)) = meshpatterns::PATTERNS.iter().find(|(name, _)| *name == filter) else { return text.to_string() };
    text.replace("unknown field `", "\u{0}")
        .replace("field `", &format!("field `stages[0].{key}."))
        .replace('\u{0}', "unknown field `")
        .replace(&format!("{filter}: invalid plugin config"), "meshpatterns: invalid plugin config")
}

#[cfg(test)]
mod tests {
    #[test]
    fn wraps_the_config_as_one_stage() {
        let yaml = r#"
http_filters:
- name: x
  typed_config:
    config:
      vm_config:
        code: {local: {filename: /w/consistent_hash.wasm}}
      configuration:
        "@type": type.googleapis.com/google.protobuf.StringValue
        value: '{"keySources":[{"header":"x-u"}]}'
"#;
        let out = super::as_pipeline(yaml);
        assert!(out.contains("/w/meshpatterns.wasm"), "{out}");
        assert!(out.contains(r#"{"stages":[{"consistentHash":{"keySources":[{"header":"x-u"}]}}]}"#), "{out}");
    }
}
