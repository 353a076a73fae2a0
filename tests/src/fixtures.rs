//! Values for config placeholders that must name real files, for runs that
//! only validate a config (`envoy --mode validate` in tests/tests/configs.rs):
//! `CERT_DIR` (a generated PKI, see [`crate::tls`]) and `XDS_DIR` (an xDS
//! directory holding the shipped ECDS resource, see [`crate::xds`]).

use std::path::PathBuf;
use std::sync::OnceLock;

/// A value for placeholder `key`, or None if it needs no files.
pub fn placeholder(key: &str) -> Option<String> {
    static CERTS: OnceLock<PathBuf> = OnceLock::new();
    static XDS: OnceLock<PathBuf> = OnceLock::new();
    let dir = match key {
        "CERT_DIR" => CERTS.get_or_init(|| crate::tls::Pki::generate("certs").dir),
        "XDS_DIR" => XDS.get_or_init(|| crate::xds::consistent_hash_dir(crate::xds::CONSISTENT_HASH_DEFAULT)),
        _ => return None,
    };
    Some(dir.display().to_string())
}
