//! Check Istio WasmPlugins and Envoy configs you wrote with the meshpatterns
//! filters' own config parsers, before a proxy ever loads them.
//!
//! ```text
//! validate FILE...           every WasmPlugin pluginConfig and every Envoy Wasm filter config in FILE
//! validate --write-schemas   regenerate filters/<f>/config.schema.json from the Rust config types
//! ```
//!
//! `make validate FILE=my.yaml` runs the first form. Exit status 1 when any
//! config is rejected; each error names the field, the value and what is allowed.

use meshpatterns_tests::filters;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: validate FILE...   (WasmPlugin / Envoy YAML or JSON)\n       validate --write-schemas");
        return ExitCode::from(2);
    }
    if args == ["--write-schemas"] {
        return write_schemas();
    }
    let mut failed = false;
    for file in &args {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{file}: {e}");
                failed = true;
                continue;
            }
        };
        match filters::check_file_text(&text) {
            Err(e) => {
                eprintln!("{file}: {e}");
                failed = true;
            }
            Ok(found) if found.is_empty() => {
                eprintln!("{file}: no Istio WasmPlugin and no Envoy Wasm filter (envoy.extensions.filters.http.wasm.v3.Wasm) found");
                failed = true;
            }
            Ok(found) => {
                for f in found {
                    match f.result {
                        Ok(()) => println!("ok    {file}: {} ({})", f.at, f.filter),
                        Err(e) => {
                            eprintln!("error {file}: {} ({}): {e}", f.at, f.filter);
                            failed = true;
                        }
                    }
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn write_schemas() -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    for f in filters::names() {
        let path = filters::schema_path(&f);
        match filters::schema_text(&f) {
            Some(text) => match std::fs::write(&path, text) {
                Ok(()) => println!("wrote {}", path.display()),
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    status = ExitCode::FAILURE;
                }
            },
            None => {
                eprintln!("{f}: not registered: add it to the `registry!` list in tests/src/filters.rs");
                status = ExitCode::FAILURE;
            }
        }
    }
    status
}
