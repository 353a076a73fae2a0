//! The normalised access-log schema (`envoy/ACCESS_LOG.md`) as tests see it:
//! the documented fields, the access logs a config declares, and checks on
//! the JSON lines Envoy writes.
//!
//! ```no_run
//! let envoy = meshpatterns_tests::EnvoyBuilder::new("metrics-adapter.yaml").endpoint_ports("APP", &[1]).start();
//! for line in meshpatterns_tests::access_log::lines(&envoy.stdout()) {
//!     meshpatterns_tests::access_log::check_line(&line).unwrap();
//! }
//! ```

use std::collections::BTreeMap;

use serde_norway::Value;

use crate::paths;

/// `field -> Envoy command`, from the table in `envoy/ACCESS_LOG.md`.
pub fn schema() -> BTreeMap<String, String> {
    let path = paths::repo().join("envoy/ACCESS_LOG.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut fields = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split(" | ").map(|c| c.trim().trim_matches('|').trim()).collect();
        let (Some(field), Some(command)) = (cells.first(), cells.get(1)) else { continue };
        let (Some(field), Some(command)) = (unquote(field), unquote(command)) else { continue };
        if command.starts_with('%') {
            let previous = fields.insert(field.to_string(), command.to_string());
            assert!(previous.is_none(), "envoy/ACCESS_LOG.md documents {field} twice");
        }
    }
    assert!(fields.len() >= 10, "envoy/ACCESS_LOG.md: schema table not found (got {fields:?})");
    fields
}

fn unquote(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`')
}

/// Every access logger in an Envoy config (a parsed YAML document), as
/// `(where, json_format)`; `json_format` is `None` when the logger does not
/// write JSON. The admin interface's own access log is not counted.
pub fn access_logs(config: &Value) -> Vec<(String, Option<BTreeMap<String, String>>)> {
    let mut out = Vec::new();
    walk(config, "", &mut out);
    out
}

fn walk(v: &Value, at: &str, out: &mut Vec<(String, Option<BTreeMap<String, String>>)>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                let key = k.as_str().unwrap_or("?");
                let here = format!("{at}.{key}");
                if here == ".admin" {
                    continue;
                }
                if key == "access_log" {
                    for (i, logger) in child.as_sequence().into_iter().flatten().enumerate() {
                        let fmt = &logger["typed_config"]["log_format"]["json_format"];
                        let map = fmt.as_mapping().map(|m| {
                            m.iter()
                                .map(|(k, v)| {
                                    let text = match v {
                                        Value::String(s) => s.clone(),
                                        other => serde_norway::to_string(other).unwrap_or_default().trim().to_string(),
                                    };
                                    (k.as_str().unwrap_or("?").to_string(), text)
                                })
                                .collect()
                        });
                        out.push((format!("{here}[{i}]"), map));
                    }
                } else {
                    walk(child, &here, out);
                }
            }
        }
        Value::Sequence(s) => {
            for (i, child) in s.iter().enumerate() {
                walk(child, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The JSON objects among Envoy's stdout lines (other lines are skipped).
pub fn lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|v| v.is_object()).collect()
}

/// A line has exactly the documented fields, and the numeric ones are numbers.
pub fn check_line(line: &serde_json::Value) -> Result<(), String> {
    let obj = line.as_object().ok_or_else(|| format!("not a JSON object: {line}"))?;
    let want: Vec<String> = schema().into_keys().collect();
    let got: Vec<String> = obj.keys().cloned().collect();
    if want != got {
        return Err(format!("fields differ from envoy/ACCESS_LOG.md:\n  documented: {want:?}\n  logged:     {got:?}"));
    }
    for f in ["http.response.status_code", "duration_ms", "http.request.body.size", "http.response.body.size"] {
        if !obj.get(f).is_some_and(|v| v.is_number()) {
            return Err(format!("{f} is not a number in {line}"));
        }
    }
    Ok(())
}
