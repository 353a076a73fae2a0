//! File-based xDS for the dynamic-configuration pattern: render the ECDS
//! resource in `envoy/dynamic-config/` with a plugin config of the test's
//! choosing, and replace the watched file atomically (temp file + rename).

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
