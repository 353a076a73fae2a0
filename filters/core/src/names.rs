//! Validation of the names users write in configs: header and cookie names.

use crate::ConfigError;

/// RFC 9110 `tchar`: the characters allowed in a header field name and, by
/// RFC 6265, in a cookie name.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
        })
}

/// Headers a filter may never read a key from or write a decision to: pseudo
/// headers, hop-by-hop headers and the ones Envoy itself rewrites.
const RESERVED: &[&str] = &["host", "connection", "keep-alive", "transfer-encoding", "upgrade", "te", "content-length", "proxy-connection"];

/// Validate a header name and return it lowercased (Envoy stores header names
/// in lowercase; HTTP/2 requires it).
pub fn header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    if !is_token(name) {
        return Err(ConfigError::new(
            field,
            format!("{name:?}"),
            "a non-empty HTTP header name made of RFC 9110 token characters (letters, digits, !#$%&'*+-.^_`|~)",
        ));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED.contains(&lower.as_str()) {
        return Err(ConfigError::new(
            field,
            format!("{name:?}"),
            format!("any header name except the connection-level ones: {}", RESERVED.join(", ")),
        ));
    }
    Ok(lower)
}

/// Validate a header the filter will write (so it must not be one clients use
/// to carry keys, such as `cookie`).
pub fn output_header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let lower = header_name(field, name)?;
    if matches!(lower.as_str(), "cookie" | "set-cookie" | "authorization" | "x-forwarded-for" | "x-request-id") {
        return Err(ConfigError::new(
            field,
            format!("{name:?}"),
            "a header the filter owns; not cookie, set-cookie, authorization, x-forwarded-for or x-request-id",
        ));
    }
    Ok(lower)
}

/// Validate a cookie name (RFC 6265 token).
pub fn cookie_name(field: &str, name: &str) -> Result<String, ConfigError> {
    if !is_token(name) {
        return Err(ConfigError::new(field, format!("{name:?}"), "a non-empty cookie name made of RFC 6265 token characters"));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn header_names() {
        assert_eq!(header_name("f", "X-User-Id").unwrap(), "x-user-id");
        assert!(header_name("f", "").is_err());
        assert!(header_name("f", ":path").is_err());
        assert!(header_name("f", "bad header").is_err());
        assert!(header_name("f", "Host").is_err());
        assert!(output_header_name("f", "cookie").is_err());
        assert!(cookie_name("f", "sid").is_ok());
        assert!(cookie_name("f", "s;id").is_err());
    }
}
