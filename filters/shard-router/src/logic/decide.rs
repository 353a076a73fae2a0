//! The decision for one request: which key it carries, which shard owns the
//! key under the current (and, while resharding, the previous) shard map,
//! and what to answer when there is no usable key. Then the response-side
//! choices: whether a 503 is Envoy's own for an unreachable shard and how
//! to name the shard in it, and the resharding fallback's request and reply.
//!
//! Keys are the bytes the client sent (see core's key sources): hash
//! placement hashes those bytes, so a valid UTF-8 key lands exactly where it
//! always did, and keys differing only in bytes that are not UTF-8 are
//! different keys. `keyPattern` is matched against the key as text when it
//! is valid UTF-8; a key that is not valid UTF-8 never matches (it is
//! invalid whenever a pattern is set). With `keyOrder: numeric` only ASCII
//! digits make a key.
//!
//! Local replies are gRPC-aware: for a gRPC request (content-type
//! `application/grpc` or `application/grpc+...`, Envoy's own test) the
//! reply carries the gRPC status (3 INVALID_ARGUMENT for a missing or
//! invalid key, 14 UNAVAILABLE for a shard that cannot be reached) and a
//! one-line text that Envoy sends as `grpc-message`; other requests get the
//! HTTP status with a JSON body.

use meshpatterns_core::hash::hash64;
use meshpatterns_core::key::MAX_KEY_BYTES;
use meshpatterns_core::{KeySource, RequestView};
use meshpatterns_host::stage::grpc;
use meshpatterns_host::LocalReply;
use regex_lite::Regex;

use super::config::{parse_u64, KeyOrder, Placement, RangeKey, Settings, Shard, ShardMap};

/// Why a request has no usable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    Missing,
    PatternMismatch,
    NotNumeric,
    OutOfRange,
}

impl KeyProblem {
    /// Short label for filter state and logs.
    pub fn label(self) -> &'static str {
        match self {
            KeyProblem::Missing => "missing",
            KeyProblem::PatternMismatch => "invalid:pattern",
            KeyProblem::NotNumeric => "invalid:not_numeric",
            KeyProblem::OutOfRange => "invalid:out_of_range",
        }
    }

    fn detail(self) -> &'static str {
        match self {
            KeyProblem::Missing => "no key source yielded a key (empty values and values over 1024 bytes do not count)",
            KeyProblem::PatternMismatch => "the key does not match keyPattern",
            KeyProblem::NotNumeric => "the key is not an unsigned decimal integer (keyOrder is numeric)",
            KeyProblem::OutOfRange => "the key is at or above the last range bound of the shard map",
        }
    }
}

impl ShardMap {
    /// The shard owning `key` (the bytes the client sent), or why the key
    /// cannot be placed.
    pub fn locate(&self, key: impl AsRef<[u8]>) -> Result<&Shard, KeyProblem> {
        self.place(key.as_ref()).map(|(_, s)| s)
    }

    /// [`ShardMap::locate`] with the shard's index in `shards`.
    pub fn place(&self, key: &[u8]) -> Result<(usize, &Shard), KeyProblem> {
        let idx = match &self.placement {
            Placement::Hash(ring) => ring.locate(hash64(key)),
            Placement::Range { order, bounds, tail } => {
                let k = match order {
                    KeyOrder::Bytes => RangeKey::Bytes(key.to_vec()),
                    KeyOrder::Numeric => RangeKey::Number(parse_u64(key).ok_or(KeyProblem::NotNumeric)?),
                };
                let pos = bounds.partition_point(|(b, _)| *b <= k);
                match bounds.get(pos) {
                    Some((_, idx)) => *idx,
                    None => tail.ok_or(KeyProblem::OutOfRange)?,
                }
            }
        };
        self.shards.get(idx).map(|s| (idx, s)).ok_or(KeyProblem::OutOfRange)
    }
}

/// A request placed on a shard. The stage writes `shard.cluster` into the
/// shard header (replacing any client-sent copy) and asks Envoy to select
/// the route again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    pub shard: &'a Shard,
    /// Index of `shard` in the current map.
    pub index: usize,
    /// Key source label (`header:x-key`), or `default:<problem>` for the default shard.
    pub source: String,
    /// Placed on `defaultShard` because the key was missing or invalid.
    pub defaulted: bool,
    /// While resharding: the old owner, when it differs from the new one.
    pub previous: Option<&'a Shard>,
    /// A read (GET/HEAD) of a moved key, with the fallback on: the index of
    /// the old owner in the previous map, to repeat the read there if the
    /// new owner answers with a fallback status.
    pub fallback_to: Option<usize>,
    /// The request is gRPC (local replies and rewrites take the gRPC form).
    pub grpc: bool,
}

/// A request refused: no usable key and no default shard. The stage
/// removes any client-sent shard header and sends `reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub problem: KeyProblem,
    pub reply: LocalReply,
}

/// What the stage does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    Route(Route<'a>),
    Reject(Reject),
}

/// Whether Envoy treats the request as gRPC: content-type exactly
/// `application/grpc` or starting with `application/grpc+`.
pub fn is_grpc(req: &dyn RequestView) -> bool {
    req.header_bytes("content-type").is_some_and(|ct| match ct.strip_prefix(b"application/grpc") {
        Some(rest) => rest.is_empty() || rest.starts_with(b"+"),
        None => false,
    })
}

/// Whether a request method may be replayed against the old owner.
pub fn replayable(method: &str) -> bool {
    matches!(method, "GET" | "HEAD")
}

/// Decide for one request.
pub fn decide<'a>(s: &'a Settings, req: &dyn RequestView) -> Decision<'a> {
    let grpc = is_grpc(req);
    let found = s.keys.extract(req);
    let placed = match &found {
        None => Err(KeyProblem::Missing),
        Some(m) if s.key_pattern.as_ref().is_some_and(|p| !full_match(p, &m.value)) => Err(KeyProblem::PatternMismatch),
        Some(m) => s.current.place(&m.value).map(|placed| (placed, m)),
    };
    match placed {
        Ok(((index, shard), m)) => {
            // A key the old map cannot place (a range the new map added) has no old owner.
            let previous = s.previous.as_ref().and_then(|p| p.place(&m.value).ok()).filter(|(_, old)| old.cluster != shard.cluster);
            let fallback_to =
                previous.filter(|_| !s.fallback_statuses.is_empty() && replayable(&req.method().unwrap_or_default())).map(|(i, _)| i);
            Decision::Route(Route {
                shard,
                index,
                source: s.keys.label(m).into_owned(),
                defaulted: false,
                previous: previous.map(|(_, old)| old),
                fallback_to,
                grpc,
            })
        }
        Err(problem) => match s.default_shard.and_then(|i| s.current.shards.get(i).map(|sh| (i, sh))) {
            Some((index, shard)) => Decision::Route(Route {
                shard,
                index,
                source: format!("default:{}", problem.label()),
                defaulted: true,
                previous: None,
                fallback_to: None,
                grpc,
            }),
            None => Decision::Reject(Reject {
                problem,
                reply: reject_reply(s, problem, found.as_ref().map(|m| s.keys.label(m).into_owned()), grpc),
            }),
        },
    }
}

/// Whether the whole key matches: as text when it is valid UTF-8; a key
/// that is not valid UTF-8 never matches.
fn full_match(re: &Regex, key: &[u8]) -> bool {
    let Ok(v) = std::str::from_utf8(key) else { return false };
    re.find(v).is_some_and(|m| m.start() == 0 && m.end() == v.len())
}

fn json_headers(grpc: bool) -> Vec<(String, String)> {
    if grpc {
        // Envoy answers a gRPC request with `application/grpc` itself.
        Vec::new()
    } else {
        vec![("content-type".into(), "application/json".into())]
    }
}

/// The 400 (gRPC: 3 INVALID_ARGUMENT) for a request without a usable key.
fn reject_reply(s: &Settings, problem: KeyProblem, source: Option<String>, grpc: bool) -> LocalReply {
    let source = source.unwrap_or_default();
    let (details, body) = match (problem, grpc) {
        (KeyProblem::Missing, false) => {
            let tried: Vec<String> = s.keys.sources.iter().map(KeySource::label).collect();
            let body = json_object(&[
                ("error", Json::Str("missing shard key")),
                ("detail", Json::Str(problem.detail())),
                ("keySources", Json::List(&tried)),
            ]);
            ("shard_router_missing_key", body)
        }
        (KeyProblem::Missing, true) => {
            let tried: Vec<String> = s.keys.sources.iter().map(KeySource::label).collect();
            let body = format!(
                "missing shard key: no key source yielded a key (tried {}; empty values and values over {MAX_KEY_BYTES} bytes do not count)",
                tried.join(", ")
            );
            ("shard_router_missing_key", body)
        }
        (_, false) => {
            let body = json_object(&[
                ("error", Json::Str("invalid shard key")),
                ("detail", Json::Str(problem.detail())),
                ("keySource", Json::Str(&source)),
                ("shardMapVersion", Json::Str(&s.current.version)),
            ]);
            ("shard_router_invalid_key", body)
        }
        (_, true) => {
            let body = format!("invalid shard key from {source}: {} (shard map {})", problem.detail(), s.current.version);
            ("shard_router_invalid_key", body)
        }
    };
    LocalReply { status: 400, grpc_status: grpc::INVALID_ARGUMENT, details, headers: json_headers(grpc), body }
}

/// A JSON value in an error body (a small writer keeps serde_json's
/// serializer out of the module).
pub(crate) enum Json<'a> {
    Str(&'a str),
    List(&'a [String]),
}

/// A JSON object with these fields, in this order.
pub(crate) fn json_object(fields: &[(&str, Json)]) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, k);
        out.push(':');
        match v {
            Json::Str(s) => push_json_str(&mut out, s),
            Json::List(items) => {
                out.push('[');
                for (j, it) in items.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    push_json_str(&mut out, it);
                }
                out.push(']');
            }
        }
    }
    out.push('}');
    out
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether a response may be Envoy's own answer for an unreachable shard,
/// so that its response details are worth reading: a 503, or for a gRPC
/// request Envoy's trailers-only form of it (`:status` 200, `grpc-status` 14).
pub fn may_be_unreachable(status: u32, grpc_status: Option<&[u8]>) -> bool {
    status == 503 || (status == 200 && grpc_status == Some(&b"14"[..]))
}

/// Whether a response is Envoy's own answer for a shard it could not reach
/// (no healthy replica, every connection attempt failed, cluster missing),
/// as opposed to a 503 the shard itself sent. `details` is the stream's
/// response code details (`response.code_details`).
pub fn shard_unreachable(status: u32, grpc_status: Option<&[u8]>, details: &str) -> bool {
    may_be_unreachable(status, grpc_status)
        && (details == "no_healthy_upstream"
            || details == "cluster_not_found"
            || details.starts_with("upstream_reset_before_response_started"))
}

/// The 503 body naming the shard that cannot be reached.
pub fn unavailable_body(shard: &Shard, version: &str, details: &str) -> String {
    json_object(&[
        ("error", Json::Str("shard unavailable")),
        ("shard", Json::Str(&shard.name)),
        ("cluster", Json::Str(&shard.cluster)),
        ("shardMapVersion", Json::Str(version)),
        ("detail", Json::Str(details)),
    ])
}

/// The same as one line of text, for `grpc-message`.
pub fn unavailable_message(shard: &Shard, version: &str, details: &str) -> String {
    format!("shard unavailable: shard {} (cluster {}, shard map {version}): {details}", shard.name, shard.cluster)
}

/// How Envoy's own answer for an unreachable shard is rewritten to name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// Replace the body with this JSON (`content-type: application/json`).
    Body(String),
    /// gRPC (a trailers-only answer, no body): set `grpc-message` to this
    /// value, already percent-encoded; `grpc-status` stays 14 UNAVAILABLE.
    GrpcMessage(String),
}

pub fn unavailable_rewrite(shard: &Shard, version: &str, details: &str, grpc: bool) -> Rewrite {
    if grpc {
        Rewrite::GrpcMessage(grpc_message_encode(&unavailable_message(shard, version, details)))
    } else {
        Rewrite::Body(unavailable_body(shard, version, details))
    }
}

/// Percent-encode a `grpc-message` value as the gRPC protocol asks: bytes
/// outside printable ASCII, and `%`, become `%XX`.
pub fn grpc_message_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The 503 (gRPC: 14 UNAVAILABLE) sent in place of the new owner's answer
/// when a moved key's old owner cannot be asked: passing on the new owner's
/// 404 would claim the key does not exist.
pub fn previous_owner_unavailable(s: &Settings, old: &Shard, detail: &str, grpc: bool) -> LocalReply {
    let version = s.previous.as_ref().map(|p| p.version.as_str()).unwrap_or_default();
    let mut headers = json_headers(grpc);
    if let Some(h) = &s.response_header {
        headers.push((h.clone(), old.name.clone()));
    }
    let body = if grpc { unavailable_message(old, version, detail) } else { unavailable_body(old, version, detail) };
    LocalReply { status: 503, grpc_status: grpc::UNAVAILABLE, details: "shard_router_previous_owner_unavailable", headers, body }
}

/// Headers of the fallback call: the request headers with the shard header
/// naming the old owner, without framing headers (the call has no body).
pub fn fallback_request_headers(original: &[(Vec<u8>, Vec<u8>)], shard_header: &str, old: &Shard) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = original
        .iter()
        .filter(|(k, _)| {
            !matches!(k.as_slice(), b"content-length" | b"transfer-encoding" | b"expect") && k.as_slice() != shard_header.as_bytes()
        })
        .cloned()
        .collect();
    out.push((shard_header.as_bytes().to_vec(), old.cluster.as_bytes().to_vec()));
    out
}

/// The status of an HTTP call's answer; `None` when the call failed.
pub fn call_status(headers: &[(&[u8], &[u8])]) -> Option<u32> {
    let (_, v) = headers.iter().find(|(k, _)| *k == b":status")?;
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// The reply that passes the old owner's answer on (its body is added by
/// the stage as it came): its status and headers, without pseudo and
/// framing headers (Envoy frames the reply itself), with the response
/// header naming the old owner. Header values that are not UTF-8 are passed
/// on with those bytes replaced (U+FFFD).
pub fn fallback_reply(status: u32, headers: &[(&[u8], &[u8])], response_header: Option<&str>, old: &Shard) -> LocalReply {
    let mut out: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(b":")
                && !matches!(*k, b"content-length" | b"transfer-encoding" | b"connection" | b"keep-alive")
                && Some(*k) != response_header.map(str::as_bytes)
        })
        .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    if let Some(h) = response_header {
        out.push((h.to_string(), old.name.clone()));
    }
    LocalReply {
        status,
        grpc_status: grpc_status_for_http(status),
        details: "shard_router_fallback_served",
        headers: out,
        body: String::new(),
    }
}

/// The gRPC status a client would see for an HTTP status (the mapping of
/// gRPC's "HTTP to gRPC status code mapping" document).
pub fn grpc_status_for_http(status: u32) -> u32 {
    match status {
        200 => 0,
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;
    use meshpatterns_core::error::ConfigError;
    use meshpatterns_core::key::StaticRequest;

    use crate::logic::Config;

    fn settings(json: &str) -> Result<Settings, ConfigError> {
        let c: Config = meshpatterns_core::error::parse_json(json.as_bytes())?;
        Settings::try_from_config(c)
    }

    const THREE: &str = r#"{"keySources":[{"pathSegment":1},{"header":"x-key"}],
        "shardMap":{"version":"v1","shards":[{"name":"a","cluster":"shard_a"},{"name":"b","cluster":"shard_b"},{"name":"c","cluster":"shard_c"}]}}"#;

    fn route<'a>(s: &'a Settings, req: &StaticRequest) -> Route<'a> {
        match decide(s, req) {
            Decision::Route(r) => r,
            other => panic!("{req:?}: {other:?}"),
        }
    }

    fn route_path<'a>(s: &'a Settings, path: &str) -> Route<'a> {
        route(s, &StaticRequest::new(path))
    }

    fn reject(s: &Settings, req: &StaticRequest) -> Reject {
        match decide(s, req) {
            Decision::Reject(r) => r,
            other => panic!("{req:?}: {other:?}"),
        }
    }

    /// Placement vectors for the three-shard map above: they must never change,
    /// or deployed proxies would disagree with a new release about where keys live.
    #[test]
    fn placement_vectors() {
        let s = settings(THREE).unwrap();
        let got: Vec<&str> = ["user-1", "user-2", "user-3", "user-4", "user-5", "42", "ünïcode"]
            .iter()
            .map(|k| route_path(&s, &format!("/kv/{k}")).shard.name.as_str())
            .collect();
        assert_eq!(got, ["c", "b", "c", "c", "a", "c", "c"]);
        assert_eq!(route_path(&s, "/kv/user-1").shard.cluster, "shard_c");
        assert_eq!(route_path(&s, "/kv/user-1").source, "path_segment:1");
        // The same keys from a header, given as bytes, land on the same shards.
        let by_header: Vec<&str> = ["user-1", "user-2", "user-3", "user-4", "user-5", "42", "ünïcode"]
            .iter()
            .map(|k| route(&s, &StaticRequest::new("/").with_bytes("x-key", k.as_bytes())).shard.name.as_str())
            .collect();
        assert_eq!(by_header, got);
    }

    /// Keys are the bytes sent: values differing only in bytes that are not
    /// UTF-8 are different keys (they used to collapse into U+FFFD).
    #[test]
    fn keys_that_are_not_utf8_are_their_bytes() {
        let s = settings(THREE).unwrap();
        let place = |v: &[u8]| s.current.place(v).unwrap();
        let req = |v: &[u8]| route(&s, &StaticRequest::new("/").with_bytes("x-key", v)).index;
        for v in [&b"caf\xe9"[..], b"caf\xff", "caf\u{FFFD}".as_bytes(), b"\xff", b"\xfe"] {
            assert_eq!(req(v), place(v).0, "{v:?}");
            assert_eq!(s.current.locate(v).unwrap(), place(v).1);
        }
        // The ring places on XXH64 of the bytes: distinct bytes, distinct hashes.
        let hashes: std::collections::BTreeSet<u64> =
            [&b"caf\xe9"[..], b"caf\xff", "caf\u{FFFD}".as_bytes()].iter().map(|v| hash64(v)).collect();
        assert_eq!(hashes.len(), 3);
        // Over many keys differing only in a non-UTF-8 byte, placement spreads.
        let shards: std::collections::BTreeSet<usize> = (0x80u8..=0xff).map(|b| place(&[b'k', b]).0).collect();
        assert_eq!(shards.len(), 3);
        // Range placement compares bytes too.
        let r = settings(
            r#"{"keySources":[{"header":"x-key"}],"shardMap":{"shards":[{"name":"a"},{"name":"b"}],
            "ranges":[{"shard":"a","below":"ÿ"},{"shard":"b"}]}}"#,
        )
        .unwrap();
        // "ÿ" is C3 BF in UTF-8: 0xC3 0x00 is below it, 0xFF above.
        assert_eq!(r.current.locate(b"\xc3\x00").unwrap().name, "a");
        assert_eq!(r.current.locate(b"\xff").unwrap().name, "b");
    }

    #[test]
    fn key_pattern_never_matches_keys_that_are_not_utf8() {
        let s = settings(&THREE.replace(r#""keySources""#, r#""keyPattern":"(?s).*","keySources""#)).unwrap();
        assert_eq!(route(&s, &StaticRequest::new("/").with_bytes("x-key", "é".as_bytes())).shard.name, "c");
        let r = reject(&s, &StaticRequest::new("/").with_bytes("x-key", b"caf\xe9"));
        assert_eq!(r.problem, KeyProblem::PatternMismatch);
        let v: serde_json::Value = serde_json::from_str(&r.reply.body).unwrap();
        assert_eq!(v["keySource"], "header:x-key");
        // Numeric keys are ASCII digits only.
        let n = settings(
            r#"{"keySources":[{"header":"x-key"}],"shardMap":{"keyOrder":"numeric","shards":[{"name":"a"}],"ranges":[{"shard":"a"}]}}"#,
        )
        .unwrap();
        assert_eq!(n.current.locate(b"12\xff"), Err(KeyProblem::NotNumeric));
        assert_eq!(n.current.locate("１２".as_bytes()), Err(KeyProblem::NotNumeric));
    }

    #[test]
    fn spread_and_movement_when_a_shard_is_added() {
        let three = settings(THREE).unwrap();
        let four = settings(
            &THREE.replace(r#"{"name":"c","cluster":"shard_c"}"#, r#"{"name":"c","cluster":"shard_c"},{"name":"d","cluster":"shard_d"}"#),
        )
        .unwrap();
        let mut counts = [0u32; 3];
        let mut moved = 0;
        for i in 0..10_000 {
            let key = format!("key-{i}");
            let a = three.current.locate(&key).unwrap();
            let b = four.current.locate(&key).unwrap();
            counts[three.current.shards.iter().position(|s| s == a).unwrap()] += 1;
            if a != b {
                assert_eq!(b.name, "d", "{key} moved between old shards");
                moved += 1;
            }
        }
        let max = *counts.iter().max().unwrap() as f64 / (10_000.0 / 3.0);
        assert!(max <= 1.10, "{counts:?}");
        assert!((moved as f64 / 10_000.0 - 0.25).abs() < 0.04, "moved {moved}");
    }

    #[test]
    fn missing_key_is_rejected_with_json_naming_the_sources() {
        let s = settings(THREE).unwrap();
        let r = reject(&s, &StaticRequest::new("/kv"));
        assert_eq!(r.problem, KeyProblem::Missing);
        assert_eq!((r.reply.status, r.reply.grpc_status), (400, grpc::INVALID_ARGUMENT));
        assert_eq!(r.reply.headers, [("content-type".to_string(), "application/json".to_string())]);
        let v: serde_json::Value = serde_json::from_str(&r.reply.body).unwrap();
        assert_eq!(v["error"], "missing shard key");
        assert_eq!(v["keySources"], serde_json::json!(["path_segment:1", "header:x-key"]));
    }

    #[test]
    fn grpc_requests_get_grpc_statuses_and_a_text_message() {
        let s = settings(&THREE.replace(r#""keySources""#, r#""keyPattern":"[0-9]+","keySources""#)).unwrap();
        let grpc_req = |path: &str, ct: &str| StaticRequest::new(path).with("content-type", ct);
        let r = reject(&s, &grpc_req("/kv", "application/grpc"));
        assert_eq!((r.reply.status, r.reply.grpc_status, r.reply.details), (400, 3, "shard_router_missing_key"));
        assert!(r.reply.headers.is_empty(), "no JSON content-type on a gRPC answer");
        assert_eq!(
            r.reply.body,
            "missing shard key: no key source yielded a key (tried path_segment:1, header:x-key; empty values and values over 1024 bytes do not count)"
        );
        let r = reject(&s, &grpc_req("/kv/abc", "application/grpc+proto"));
        assert_eq!((r.problem, r.reply.grpc_status), (KeyProblem::PatternMismatch, 3));
        assert_eq!(r.reply.body, "invalid shard key from path_segment:1: the key does not match keyPattern (shard map v1)");
        // Not gRPC to Envoy: grpc-web, other types; they get JSON.
        for ct in ["application/grpc-web", "application/json", "application/grpcx"] {
            let r = reject(&s, &grpc_req("/kv", ct));
            assert!(r.reply.body.starts_with('{'), "{ct}");
        }
        assert!(!route_path(&s, "/kv/12").grpc);
        assert!(route(&s, &grpc_req("/kv/12", "application/grpc")).grpc);
    }

    #[test]
    fn default_shard_takes_missing_and_invalid_keys() {
        let s = settings(&THREE.replace(r#""keySources""#, r#""defaultShard":"b","keyPattern":"[a-z0-9-]{1,16}","keySources""#)).unwrap();
        let r = route_path(&s, "/kv");
        assert_eq!((r.shard.name.as_str(), r.source.as_str(), r.defaulted), ("b", "default:missing", true));
        let r = route_path(&s, "/kv/NOT_OK");
        assert_eq!((r.shard.name.as_str(), r.source.as_str()), ("b", "default:invalid:pattern"));
        // The pattern must match the whole key, not a part of it.
        assert_eq!(route_path(&s, "/kv/abc-xyz-12345678901").source, "default:invalid:pattern");
        let r = route_path(&s, "/kv/user-1");
        assert_eq!((r.shard.name.as_str(), r.defaulted, r.index), ("c", false, 2));
    }

    #[test]
    fn invalid_key_is_rejected() {
        let s = settings(&THREE.replace(r#""keySources""#, r#""keyPattern":"[0-9]+","keySources""#)).unwrap();
        let r = reject(&s, &StaticRequest::new("/kv/abc"));
        assert_eq!(r.problem, KeyProblem::PatternMismatch);
        let v: serde_json::Value = serde_json::from_str(&r.reply.body).unwrap();
        assert_eq!((v["error"].as_str(), v["keySource"].as_str()), (Some("invalid shard key"), Some("path_segment:1")));
    }

    #[test]
    fn range_placement_bytes_and_numeric() {
        let s = settings(
            r#"{"keySources":[{"pathSegment":1}],"shardMap":{"shards":[{"name":"a"},{"name":"b"},{"name":"c"}],
            "ranges":[{"shard":"a","below":"h"},{"shard":"b","below":"q"},{"shard":"c"}]}}"#,
        )
        .unwrap();
        let names: Vec<&str> = ["/u/apple", "/u/g", "/u/h", "/u/pz", "/u/q", "/u/zebra", "/u/Zebra"]
            .iter()
            .map(|p| route_path(&s, p).shard.name.as_str())
            .collect();
        assert_eq!(names, ["a", "a", "b", "b", "c", "c", "a"]);

        let s = settings(
            r#"{"keySources":[{"pathSegment":1}],"shardMap":{"keyOrder":"numeric","shards":[{"name":"a"},{"name":"b"}],
            "ranges":[{"shard":"a","below":1000},{"shard":"b","below":"2000"}]}}"#,
        )
        .unwrap();
        assert_eq!(route_path(&s, "/u/999").shard.name, "a");
        assert_eq!(route_path(&s, "/u/1000").shard.name, "b");
        assert_eq!(route_path(&s, "/u/0099").shard.name, "a");
        let problem = |p: &str| reject(&s, &StaticRequest::new(p)).problem;
        assert_eq!(problem("/u/2000"), KeyProblem::OutOfRange);
        assert_eq!(problem("/u/-5"), KeyProblem::NotNumeric);
        assert_eq!(problem("/u/99999999999999999999999"), KeyProblem::NotNumeric);
    }

    #[test]
    fn resharding_marks_keys_whose_owner_changed() {
        let s = settings(&THREE.replace(
            r#""shardMap":{"version":"v1","shards":[{"name":"a","cluster":"shard_a"},{"name":"b","cluster":"shard_b"},{"name":"c","cluster":"shard_c"}]}"#,
            r#""shardMap":{"version":"v2","shards":[{"name":"a","cluster":"shard_a"},{"name":"b","cluster":"shard_b"},{"name":"c","cluster":"shard_c"},{"name":"d","cluster":"shard_d"}]},
               "previousShardMap":{"version":"v1","shards":[{"name":"a","cluster":"shard_a"},{"name":"b","cluster":"shard_b"},{"name":"c","cluster":"shard_c"}]}"#,
        ))
        .unwrap();
        let mut moved = 0;
        for i in 0..2000 {
            let r = route_path(&s, &format!("/kv/k{i}"));
            match r.previous {
                Some(old) => {
                    assert_eq!(r.shard.name, "d");
                    assert_ne!(old.name, "d");
                    // A GET of a moved key is repeated at its old owner on a fallback status.
                    let prev = s.previous.as_ref().unwrap();
                    assert_eq!(r.fallback_to.and_then(|i| prev.shards.get(i)), Some(old));
                    moved += 1;
                }
                None => {
                    assert_ne!(r.shard.name, "d");
                    assert_eq!(r.fallback_to, None);
                }
            }
        }
        assert!((400..600).contains(&moved), "{moved}");
        assert!(s.falls_back_on(404) && !s.falls_back_on(500));
        // Writes are never repeated; neither is anything with the fallback off.
        let moved_key = (0..).map(|i| format!("/kv/k{i}")).find(|p| route_path(&s, p).previous.is_some()).unwrap();
        let put =
            StaticRequest { headers: vec![(":path".into(), moved_key.clone()), (":method".into(), "PUT".into())], ..Default::default() };
        let r = route(&s, &put);
        assert!(r.previous.is_some() && r.fallback_to.is_none());
        let mut off = s.clone();
        off.fallback_statuses.clear();
        assert_eq!(route_path(&off, &moved_key).fallback_to, None);
    }

    #[test]
    fn json_bodies_escape_what_they_carry() {
        let body = json_object(&[("a\"b", Json::Str("x\\y\n\u{1}ü")), ("l", Json::List(&["p".into(), "q\"".into()]))]);
        assert_eq!(body, r#"{"a\"b":"x\\y\u000a\u0001ü","l":["p","q\""]}"#);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["a\"b"], "x\\y\n\u{1}ü");
    }

    #[test]
    fn unreachable_shard_detection() {
        assert!(shard_unreachable(503, None, "no_healthy_upstream"));
        assert!(shard_unreachable(503, None, "upstream_reset_before_response_started{remote_connection_failure}"));
        assert!(!shard_unreachable(503, None, "via_upstream"));
        assert!(!shard_unreachable(502, None, "no_healthy_upstream"));
        // gRPC: Envoy's trailers-only answer is :status 200 with grpc-status 14.
        assert!(shard_unreachable(200, Some(b"14"), "no_healthy_upstream"));
        assert!(!shard_unreachable(200, Some(b"0"), "no_healthy_upstream"));
        assert!(!may_be_unreachable(200, None));
        let sh = Shard { name: "b".into(), cluster: "shard_b".into(), dispatch_cluster: "shard_b".into() };
        let Rewrite::Body(body) = unavailable_rewrite(&sh, "v1", "no_healthy_upstream", false) else { panic!() };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["shard"].as_str(), v["cluster"].as_str()), (Some("b"), Some("shard_b")));
        assert_eq!(
            unavailable_rewrite(&sh, "v1", "no_healthy_upstream", true),
            Rewrite::GrpcMessage("shard unavailable: shard b (cluster shard_b, shard map v1): no_healthy_upstream".into())
        );
        assert_eq!(grpc_message_encode("a%b\nü"), "a%25b%0A%C3%BC");
    }

    #[test]
    fn fallback_headers_and_replies() {
        let s = settings(&THREE.replace(r#""keySources""#, r#""responseHeader":"x-shard","keySources""#)).unwrap();
        let old = Shard { name: "a".into(), cluster: "shard_a".into(), dispatch_cluster: "shard_a".into() };
        let h = |v: &[(&str, &[u8])]| v.iter().map(|(a, b)| (a.as_bytes().to_vec(), b.to_vec())).collect::<Vec<_>>();
        let req = h(&[(":method", b"GET"), (":path", b"/kv/x\xff"), ("content-length", b"0"), ("x-shard-cluster", b"shard_d")]);
        assert_eq!(
            fallback_request_headers(&req, "x-shard-cluster", &old),
            h(&[(":method", b"GET"), (":path", b"/kv/x\xff"), ("x-shard-cluster", b"shard_a")])
        );
        let resp: [(&[u8], &[u8]); 4] = [(b":status", b"200"), (b"content-length", b"3"), (b"x-shard", b"zzz"), (b"x-replica", b"r")];
        assert_eq!(call_status(&resp), Some(200));
        assert_eq!(call_status(&[]), None);
        let r = fallback_reply(200, &resp, Some("x-shard"), &old);
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        assert_eq!(r.headers, pairs(&[("x-replica", "r"), ("x-shard", "a")]));
        assert_eq!((r.status, r.grpc_status), (200, 0));
        assert_eq!(fallback_reply(404, &resp, None, &old).grpc_status, 12);
        assert!(replayable("GET") && replayable("HEAD") && !replayable("PUT"));

        let mut prev = s.clone();
        prev.previous = Some(s.current.clone());
        let r = previous_owner_unavailable(&prev, &old, "previous owner unreachable while resharding", false);
        assert_eq!((r.status, r.grpc_status), (503, 14));
        assert_eq!(r.headers, pairs(&[("content-type", "application/json"), ("x-shard", "a")]));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            (v["error"].as_str(), v["shard"].as_str(), v["shardMapVersion"].as_str()),
            (Some("shard unavailable"), Some("a"), Some("v1"))
        );
        let r = previous_owner_unavailable(&prev, &old, "previous owner unreachable while resharding", true);
        assert_eq!(r.headers, pairs(&[("x-shard", "a")]));
        assert_eq!(r.body, "shard unavailable: shard a (cluster shard_a, shard map v1): previous owner unreachable while resharding");
    }
}
