//! Every config in envoy/ passes `envoy --mode validate`, which also runs each
//! filter's own `on_configure` on the plugin configs it carries.

use meshpatterns_tests::{paths, EnvoyBuilder};

#[test]
fn every_envoy_config_validates() {
    let mut names: Vec<String> = std::fs::read_dir(paths::repo().join("envoy"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    let mut failures = Vec::new();
    for name in &names {
        let mut b = EnvoyBuilder::new(name);
        let template = std::fs::read_to_string(paths::envoy_config(name)).unwrap();
        for part in template.split("{{").skip(1) {
            let key = part.split("}}").next().unwrap().trim();
            if let Some(cluster) = key.strip_prefix("ENDPOINTS_") {
                b = b.endpoint_ports(cluster, &[1, 2, 3]);
            } else if let Some(dir) = meshpatterns_tests::fixtures::placeholder(key) {
                b = b.var(key, dir);
            }
        }
        if let Err(out) = b.validate() {
            failures.push(format!("envoy/{name}:\n{out}"));
        }
        eprintln!("validated envoy/{name}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
