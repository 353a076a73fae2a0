//! File-based xDS for the dynamic-configuration pattern: render the ECDS
//! resource in `envoy/dynamic-config/` with a plugin config of the test's
//! choosing, and replace the watched file atomically (temp file + rename).
//! [`dynamic_filter`] does the same for any shipped config in `envoy/`: it
//! moves that config's wasm filter into an ECDS resource file, so every
//! module can be reconfigured (and refused) by ECDS from one code path.

use std::path::Path;

use crate::envoy::EnvoyBuilder;
use crate::paths;

/// The ECDS resource template for the consistent-hash filter.
pub const CONSISTENT_HASH_ECDS: &str = "dynamic-config/consistent_hash.yaml";
/// The plugin config the template ships with.
pub const CONSISTENT_HASH_DEFAULT: &str =
    r#"{"keySources": [{"header": "x-user-id"}], "hashHeader": "x-session-hash", "fallbackKey": "anonymous"}"#;

/// The ECDS resource file text with `plugin_json` as the filter's config and
/// `version` as its version_info. `plugin_json` must not contain `'`.
pub fn consistent_hash_ecds(plugin_json: &str, version: u32) -> String {
    assert!(!plugin_json.contains('\''), "plugin JSON goes into a single-quoted YAML string");
    let path = paths::envoy_config(CONSISTENT_HASH_ECDS);
    let template = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    EnvoyBuilder::from_template(CONSISTENT_HASH_ECDS, &template)
        .replace(CONSISTENT_HASH_DEFAULT, plugin_json)
        .replace("version_info: \"1\"", &format!("version_info: \"{version}\""))
        .render()
}

/// Write `content` to `dir/name` the way a watched xDS file must be
/// replaced: into a temp file on the same file system but outside the
/// watched directory (so that writing it triggers nothing), then rename it
/// over the old file in one step.
pub fn write_atomically(dir: &Path, name: &str, content: &str) {
    let tmp = dir.parent().unwrap_or(dir).join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, dir.join(name)).unwrap_or_else(|e| panic!("cannot rename {} into place: {e}", tmp.display()));
}

/// A fresh xDS directory (`<scratch>/watched`) holding the consistent-hash
/// ECDS resource with `plugin_json`.
pub fn consistent_hash_dir(plugin_json: &str) -> std::path::PathBuf {
    let dir = paths::scratch("xds").join("watched");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    write_atomically(&dir, "consistent_hash.yaml", &consistent_hash_ecds(plugin_json, 1));
    dir
}

/// The type URL of the wasm HTTP filter's config (what ECDS is told to accept).
pub const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// Any shipped Envoy config in its dynamic-configuration form: the wasm
/// HTTP filter's `typed_config` moves into an ECDS resource file in a
/// watched directory, and the listener names the filter with
/// `config_discovery` instead. Routes, clusters and the module are the
/// shipped ones; only where the filter's config comes from changes, so one
/// function serves every filter (and the pipeline module) without a second
/// copy of its YAML.
pub struct DynamicFilter {
    /// The watched directory (`XDS_DIR`).
    pub dir: std::path::PathBuf,
    /// The http filter's name: the ECDS resource name and the stat scope
    /// `extension_config_discovery.http_filter.<name>.`.
    pub name: String,
    /// The filter's `typed_config` (the `Wasm` message) as shipped.
    wasm: serde_json::Value,
}

impl DynamicFilter {
    /// The resource file's name inside [`DynamicFilter::dir`].
    pub fn file(&self) -> String {
        format!("{}.yaml", self.name)
    }

    /// The ECDS resource text: the shipped `Wasm` message with `plugin_json`
    /// as its `configuration.value` and `version` as the version_info.
    pub fn resource(&self, plugin_json: &str, version: u32) -> String {
        let mut wasm = self.wasm.clone();
        wasm["config"]["configuration"] =
            serde_json::json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin_json});
        let doc = serde_json::json!({
            "version_info": version.to_string(),
            "resources": [{
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": self.name,
                "typed_config": wasm,
            }],
        });
        serde_norway::to_string(&doc).unwrap_or_else(|e| panic!("cannot write the ECDS resource as YAML: {e}"))
    }

    /// Replace the watched resource file (atomically) with `plugin_json` at `version`.
    pub fn publish(&self, plugin_json: &str, version: u32) {
        write_atomically(&self.dir, &self.file(), &self.resource(plugin_json, version));
    }

    /// The plugin config (`configuration.value` of the `Wasm` message) as
    /// shipped, before any [`DynamicFilter::publish`]; "" when it has none.
    pub fn shipped_config(&self) -> &str {
        self.wasm["config"]["configuration"]["value"].as_str().unwrap_or("")
    }

    /// The plugin's name (`config.name` of the `Wasm` message), as Envoy's
    /// wasm log lines name it.
    pub fn plugin_name(&self) -> &str {
        self.wasm["config"]["name"].as_str().unwrap_or("")
    }

    /// `extension_config_discovery.http_filter.<name>.<counter>`.
    pub fn stat(&self, counter: &str) -> String {
        format!("extension_config_discovery.http_filter.{}.{counter}", self.name)
    }
}

/// Turn a rendered Envoy config (YAML, one wasm HTTP filter) into its
/// dynamic form: returns the bootstrap text and the filter, whose resource
/// file already holds `plugin_json` at version 1 in a fresh watched directory.
/// Panics unless the config has exactly one wasm HTTP filter.
pub fn dynamic_filter(rendered: &str, plugin_json: &str) -> (String, DynamicFilter) {
    dynamic_filter_with(rendered, |_| plugin_json.to_string())
}

/// [`dynamic_filter`] with version 1 derived from the shipped plugin config:
/// `v1(shipped)` is published (each call has its own watched directory).
pub fn dynamic_filter_with(rendered: &str, v1: impl FnOnce(&str) -> String) -> (String, DynamicFilter) {
    let mut doc: serde_json::Value =
        serde_norway::from_str(rendered).unwrap_or_else(|e| panic!("the rendered Envoy config is not YAML: {e}"));
    let dir = paths::scratch("xds").join("watched");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let mut found = Vec::new();
    move_wasm_filters(&mut doc, &dir, &mut found);
    assert_eq!(found.len(), 1, "expected exactly one wasm HTTP filter, found {:?}", found.iter().map(|(n, _)| n).collect::<Vec<_>>());
    let (name, wasm) = found.remove(0);
    // Every xDS subscription, a file-based one included, needs a node identity.
    if doc.get("node").is_none() {
        doc["node"] = serde_json::json!({"id": "meshpatterns-test", "cluster": "meshpatterns"});
    }
    let filter = DynamicFilter { dir, name, wasm };
    filter.publish(&v1(filter.shipped_config()), 1);
    let bootstrap = serde_norway::to_string(&doc).unwrap_or_else(|e| panic!("cannot write YAML: {e}"));
    (bootstrap, filter)
}

/// Replace every http filter whose `typed_config` is `Wasm` with a
/// `config_discovery` of the file `<dir>/<name>.yaml`; collect (name, typed_config).
fn move_wasm_filters(v: &mut serde_json::Value, dir: &Path, found: &mut Vec<(String, serde_json::Value)>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::Array(filters)) = m.get_mut("http_filters") {
                for f in filters.iter_mut() {
                    if f["typed_config"]["@type"] != WASM_TYPE {
                        continue;
                    }
                    let name = f["name"].as_str().unwrap_or_else(|| panic!("a wasm http filter without a name: {f}")).to_string();
                    let Some(obj) = f.as_object_mut() else { continue };
                    let wasm = obj.remove("typed_config").unwrap_or_default();
                    obj.insert(
                        "config_discovery".into(),
                        serde_json::json!({
                            "config_source": {"path_config_source": {
                                "path": dir.join(format!("{name}.yaml")).display().to_string(),
                                "watched_directory": {"path": dir.display().to_string()},
                            }},
                            "type_urls": [WASM_TYPE],
                        }),
                    );
                    found.push((name, wasm));
                }
            }
            for c in m.values_mut() {
                move_wasm_filters(c, dir, found);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|c| move_wasm_filters(c, dir, found)),
        _ => {}
    }
}
