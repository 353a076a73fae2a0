//! Global policies: the few protobuf messages of Envoy's rate limit service
//! protocol (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`),
//! encoded and decoded by hand, and the decision taken from the answer.
//!
//! A handful of fields does not need a protobuf library: the writer emits
//! varints and length-delimited fields, the reader walks fields and skips
//! what it does not know. The reader never panics and never allocates more
//! than the input holds: any bytes give either a response or an error
//! (`decode_response` is fuzzed by the unit tests below over random and
//! truncated inputs).
//!
//! Field numbers (Envoy's api/envoy/service/ratelimit/v3/rls.proto,
//! api/envoy/extensions/common/ratelimit/v3/ratelimit.proto,
//! api/envoy/config/core/v3/grpc_service.proto):
//!
//! ```text
//! RateLimitRequest      1 domain, 2 descriptors (repeated), 3 hits_addend
//! RateLimitDescriptor   1 entries (repeated Entry{1 key, 2 value}),
//!                       2 limit (RateLimitOverride{1 requests_per_unit, 2 unit})
//! RateLimitResponse     1 overall_code, 2 statuses (repeated DescriptorStatus)
//! DescriptorStatus      1 code, 2 current_limit (RateLimit{1 requests_per_unit,
//!                       2 unit, 3 name}), 3 limit_remaining,
//!                       4 duration_until_reset (Duration{1 seconds, 2 nanos})
//! Code                  0 UNKNOWN, 1 OK, 2 OVER_LIMIT
//! Unit                  0 UNKNOWN, 1 SECOND, 2 MINUTE, 3 HOUR, 4 DAY
//! GrpcService           1 envoy_grpc (EnvoyGrpc{1 cluster_name, 2 authority})
//! ```

use super::config::Unit;

/// The gRPC service and method Envoy's rate limit services implement.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// `RateLimitResponse.Code`.
pub const CODE_OK: u64 = 1;
pub const CODE_OVER_LIMIT: u64 = 2;

/// The protocol's `Unit` for a policy's `per`: every `per` the filter
/// accepts has one (a window of one second, minute, hour or day).
pub fn unit_code(u: Unit) -> u64 {
    match u {
        Unit::Second => 1,
        Unit::Minute => 2,
        Unit::Hour => 3,
        Unit::Day => 4,
    }
}

/// Seconds of a protocol `Unit` (0 for UNKNOWN and the units the filter
/// never sends: MONTH, YEAR, WEEK have no fixed length here).
pub fn unit_secs(code: u64) -> u64 {
    match code {
        1 => 1,
        2 => 60,
        3 => 3600,
        4 => 86_400,
        _ => 0,
    }
}

// ---- writer ----

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, u64::from(field) << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, v);
}

/// A serialized `envoy.config.core.v3.GrpcService` with `envoy_grpc`
/// {cluster_name, authority}: what the filter passes as the "upstream" of
/// `proxy_grpc_call` (ABI 0.2.1). Envoy parses that argument as a GrpcService
/// and only falls back to reading it as a bare cluster name when it does not
/// parse (source/extensions/common/wasm/context.cc, `Context::grpcCall`);
/// a bare name would make the `:authority` the cluster name, which for
/// Istio's `outbound|8081||host` names is not a valid authority (a tonic
/// server resets such a stream).
pub fn grpc_service(cluster: &str, authority: &str) -> Vec<u8> {
    let mut envoy_grpc = Vec::with_capacity(cluster.len() + authority.len() + 8);
    put_bytes(&mut envoy_grpc, 1, cluster.as_bytes());
    if !authority.is_empty() {
        put_bytes(&mut envoy_grpc, 2, authority.as_bytes());
    }
    let mut out = Vec::with_capacity(envoy_grpc.len() + 4);
    put_bytes(&mut out, 1, &envoy_grpc);
    out
}

/// One descriptor: its entries, and the limit the service applies to it
/// (`RateLimitOverride`: `rate` requests per `unit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub entries: Vec<(String, String)>,
    pub requests_per_unit: u32,
    pub unit: Unit,
}

/// A serialized `RateLimitRequest` for `domain` with one hit.
pub fn encode_request(domain: &str, descriptors: &[Descriptor]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_bytes(&mut out, 1, domain.as_bytes());
    for d in descriptors {
        let mut desc = Vec::with_capacity(64);
        for (k, v) in &d.entries {
            let mut e = Vec::with_capacity(k.len() + v.len() + 4);
            put_bytes(&mut e, 1, k.as_bytes());
            put_bytes(&mut e, 2, v.as_bytes());
            put_bytes(&mut desc, 1, &e);
        }
        let mut limit = Vec::with_capacity(8);
        put_uint(&mut limit, 1, u64::from(d.requests_per_unit));
        put_uint(&mut limit, 2, unit_code(d.unit));
        put_bytes(&mut desc, 2, &limit);
        put_bytes(&mut out, 2, &desc);
    }
    put_uint(&mut out, 3, 1);
    out
}

/// A descriptor entry value for key bytes: the bytes as text when they are
/// UTF-8 (protobuf `string` fields must be) and do not start with `hex:`,
/// else `hex:` and their hex digits. Distinct bytes give distinct values.
pub fn entry_value(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.starts_with("hex:") => s.to_string(),
        _ => {
            let mut out = String::with_capacity(4 + 2 * bytes.len());
            out.push_str("hex:");
            for b in bytes {
                for nibble in [b >> 4, b & 15] {
                    out.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                }
            }
            out
        }
    }
}

// ---- reader ----

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

struct Reader<'a> {
    buf: &'a [u8],
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed 32 or 64 bits: skipped.
    Fixed,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or(DecodeError("truncated varint"))?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(DecodeError("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(n).map_err(|_| DecodeError("length too large"))?;
        if n > self.buf.len() {
            return Err(DecodeError("length beyond the message"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next field number and value; `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, DecodeError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let v = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let n = self.varint()?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            _ => return Err(DecodeError("unsupported wire type")),
        };
        Ok(Some((key >> 3, v)))
    }
}

fn fields(buf: &[u8], mut f: impl FnMut(u64, Value<'_>) -> Result<(), DecodeError>) -> Result<(), DecodeError> {
    let mut r = Reader { buf };
    while let Some((n, v)) = r.field()? {
        f(n, v)?;
    }
    Ok(())
}

/// One `DescriptorStatus`, as far as the filter uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub code: u64,
    /// `current_limit`: requests per unit, and the unit's seconds (0 if unknown).
    pub limit: Option<(u64, u64)>,
    pub remaining: u64,
    /// `duration_until_reset` in nanoseconds, when given.
    pub reset_ns: Option<u64>,
}

/// A `RateLimitResponse`, as far as the filter uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub overall: u64,
    pub statuses: Vec<Status>,
}

fn decode_status(buf: &[u8]) -> Result<Status, DecodeError> {
    let mut s = Status::default();
    fields(buf, |n, v| {
        match (n, v) {
            (1, Value::Varint(c)) => s.code = c,
            (2, Value::Bytes(b)) => {
                let (mut rpu, mut unit) = (0, 0);
                fields(b, |n, v| {
                    match (n, v) {
                        (1, Value::Varint(x)) => rpu = x,
                        (2, Value::Varint(x)) => unit = unit_secs(x),
                        _ => {}
                    }
                    Ok(())
                })?;
                s.limit = Some((rpu, unit));
            }
            (3, Value::Varint(r)) => s.remaining = r,
            (4, Value::Bytes(b)) => {
                let (mut secs, mut nanos) = (0u64, 0u64);
                fields(b, |n, v| {
                    match (n, v) {
                        // int64 / int32: negative durations count as 0
                        (1, Value::Varint(x)) => secs = if (x as i64) < 0 { 0 } else { x },
                        (2, Value::Varint(x)) => nanos = if (x as i64) < 0 { 0 } else { x.min(999_999_999) },
                        _ => {}
                    }
                    Ok(())
                })?;
                s.reset_ns = Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos));
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(s)
}

/// Read a `RateLimitResponse` (unknown fields skipped; at most 64 statuses kept).
pub fn decode_response(buf: &[u8]) -> Result<Response, DecodeError> {
    let mut r = Response::default();
    fields(buf, |n, v| {
        match (n, v) {
            (1, Value::Varint(c)) => r.overall = c,
            (2, Value::Bytes(b)) => {
                let s = decode_status(b)?;
                if r.statuses.len() < 64 {
                    r.statuses.push(s);
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn varints() {
        let mut out = Vec::new();
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            out.clear();
            put_varint(&mut out, v);
            assert_eq!(Reader { buf: &out }.varint().unwrap(), v);
        }
        out.clear();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
    }

    #[test]
    fn grpc_service_vector() {
        // envoy_grpc {cluster_name: "c|1", authority: "a"}
        assert_eq!(grpc_service("c|1", "a"), [0x0a, 0x08, 0x0a, 0x03, b'c', b'|', b'1', 0x12, 0x01, b'a']);
        assert_eq!(grpc_service("c", ""), [0x0a, 0x03, 0x0a, 0x01, b'c']);
    }

    #[test]
    fn request_vector() {
        let d = Descriptor { entries: vec![("k".into(), "v".into())], requests_per_unit: 300, unit: Unit::Minute };
        let got = encode_request("d", &[d]);
        #[rustfmt::skip]
        let want = [
            0x0a, 0x01, b'd',                               // domain "d"
            0x12, 0x0f,                                     // descriptors (15 bytes)
              0x0a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v', //   entries {key "k", value "v"}
              0x12, 0x05, 0x08, 0xac, 0x02, 0x10, 0x02,     //   limit {300, MINUTE}
            0x18, 0x01,                                     // hits_addend 1
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn response_vector() {
        #[rustfmt::skip]
        let bytes = [
            0x08, 0x02,                                     // overall_code OVER_LIMIT
            0x12, 0x14,                                     // statuses (20 bytes)
              0x08, 0x02,                                   //   code OVER_LIMIT
              0x12, 0x07, 0x1a, 0x01, b'n', 0x08, 0x0a, 0x10, 0x03, // current_limit {name "n", 10, HOUR}
              0x18, 0x00,                                   //   limit_remaining 0
              0x22, 0x05, 0x08, 0x3b, 0x10, 0xe8, 0x07,     //   duration_until_reset {59 s, 1,000 ns}
            0x2a, 0x00,                                     // raw_body (unknown here): skipped
        ];
        let r = decode_response(&bytes).unwrap();
        assert_eq!(r.overall, CODE_OVER_LIMIT);
        assert_eq!(r.statuses, vec![Status { code: 2, limit: Some((10, 3600)), remaining: 0, reset_ns: Some(59_000_001_000) }]);
        assert_eq!(decode_response(&[]).unwrap(), Response::default());
    }

    #[test]
    fn entry_values_are_injective() {
        assert_eq!(entry_value(b"k1"), "k1");
        assert_eq!(entry_value(b"caf\xe9"), "hex:636166e9");
        assert_eq!(entry_value(b"hex:e9"), "hex:6865783a6539");
        assert_ne!(entry_value(b"hex:636166e9"), entry_value(b"caf\xe9"));
    }

    /// Any bytes: an answer or an error, never a panic (random inputs,
    /// every truncation and every single-byte change of a valid response).
    #[test]
    fn decoding_never_panics() {
        let valid = {
            let mut s = Vec::new();
            put_uint(&mut s, 1, 1);
            put_bytes(&mut s, 2, &[0x08, 0x0a, 0x10, 0x02]);
            put_uint(&mut s, 3, 7);
            put_bytes(&mut s, 4, &[0x08, 0x05]);
            let mut r = Vec::new();
            put_uint(&mut r, 1, 1);
            put_bytes(&mut r, 2, &s);
            r
        };
        assert_eq!(decode_response(&valid).unwrap().statuses[0].remaining, 7);
        for n in 0..valid.len() {
            let _ = decode_response(&valid[..n]);
            for b in [0x00, 0x7f, 0x80, 0xff] {
                let mut m = valid.clone();
                m[n] = b;
                let _ = decode_response(&m);
            }
        }
        let mut rand = meshpatterns_core::test_rand(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = (rand() % 48) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
            let _ = decode_response(&bytes);
        }
        // a length pointing past the end, an 11-byte varint, wire type 7
        assert!(decode_response(&[0x12, 0x7f]).is_err());
        assert!(decode_response(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        assert!(decode_response(&[0x0f]).is_err());
    }
}
