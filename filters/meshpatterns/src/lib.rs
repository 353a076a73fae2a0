//! meshpatterns: every pattern as an ordered stage of one module.
//!
//! ```json
//! {"stages": [
//!   {"rateLimit": {"policies": [...]}},
//!   {"experimentSplit": {"experiments": [...]}},
//!   {"consistentHash": {"keySources": [...]}},
//!   {"metrics": {...}}
//! ]}
//! ```
//!
//! Each stage's config is exactly that filter's config (the same parser, the
//! same `match` and `filterState`), and errors name the stage:
//! `stages[1].rateLimit.policies[0].rate`. One header read per request feeds
//! every stage; header writes are applied once; a stage that answers locally
//! ends the pass (later stages only observe it, so a metrics stage still
//! counts the answer). Stat and filter-state names are exactly the single
//! filters'.
//!
//! The patterns are registered once, in the [`stages!`] list below.

use meshpatterns_core::error::{join, key_segment, parse_value};
use meshpatterns_core::ConfigError;
use meshpatterns_host::stage::{build_stage, Scoped};
use meshpatterns_host::{Body, BodyFlow, Flow, GrpcResponse, HttpCallResponse, Pattern, Pipeline, Request, Response, Stage};

/// Most stages one pipeline may have.
pub const MAX_STAGES: usize = 16;

macro_rules! stages {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// One stage of any pattern.
        pub enum AnyStage {
            $($variant($ty),)*
        }

        /// The per-request state of whichever stage it belongs to.
        #[derive(Default)]
        pub enum AnyStream {
            #[default]
            Empty,
            $($variant(<$ty as Stage>::Stream),)*
        }

        /// The stage keys a pipeline config accepts.
        pub const STAGE_KEYS: &[&str] = &[$(<$ty as Pattern>::STAGE,)*];

        /// (filter name, stage key) of every pattern: `("rate-limiter", "rateLimit")`.
        pub const PATTERNS: &[(&str, &str)] = &[$((<$ty as Pattern>::NAME, <$ty as Pattern>::STAGE),)*];

        /// Parse a plugin config with the parser of the module `filter` (a
        /// pattern's name, or `meshpatterns` for the pipeline), exactly as
        /// the module's `on_configure` does. `None`: no such module.
        pub fn parse_module(filter: &str, json: &[u8]) -> Option<Result<(), ConfigError>> {
            if filter == "meshpatterns" {
                return Some(parse(json).map(|_| ()));
            }
            $(
                if filter == <$ty as Pattern>::NAME {
                    return Some(meshpatterns_host::stage::parse_single::<$ty>(json).map(|_| ()));
                }
            )*
            None
        }

        /// The JSON Schema of a pattern's own config (without `match` and
        /// `filterState`, which [`schema`] adds).
        #[cfg(feature = "schema")]
        pub fn pattern_schema(filter: &str) -> Option<schemars::Schema> {
            $(
                if filter == <$ty as Pattern>::NAME {
                    return Some(schemars::schema_for!(<$ty as Pattern>::Config));
                }
            )*
            None
        }

        fn build_any(key: &str, v: serde_json::Value, at: &str) -> Result<Option<Scoped<AnyStage>>, ConfigError> {
            $(
                if key == <$ty as Pattern>::STAGE {
                    let s = build_stage::<$ty>(v, at)?;
                    return Ok(Some(Scoped { scope: s.scope, filter_state: s.filter_state, skipped: s.skipped, stage: AnyStage::$variant(s.stage) }));
                }
            )*
            Ok(None)
        }

        impl Stage for AnyStage {
            type Stream = AnyStream;

            fn on_request(&self, req: &mut Request<'_>, st: &mut AnyStream) -> Flow {
                match self {
                    $(AnyStage::$variant(s) => {
                        let mut inner = Default::default();
                        let flow = s.on_request(req, &mut inner);
                        *st = AnyStream::$variant(inner);
                        flow
                    })*
                }
            }

            fn after_local_reply(&self, req: &mut Request<'_>, st: &mut AnyStream) {
                match self {
                    $(AnyStage::$variant(s) => {
                        let mut inner = Default::default();
                        s.after_local_reply(req, &mut inner);
                        *st = AnyStream::$variant(inner);
                    })*
                }
            }

            fn on_response(&self, resp: &mut Response, st: &mut AnyStream) {
                match (self, st) {
                    $((AnyStage::$variant(s), AnyStream::$variant(inner)) => s.on_response(resp, inner),)*
                    _ => {}
                }
            }

            fn on_response_body(&self, body: &mut Body, st: &mut AnyStream) -> BodyFlow {
                match (self, st) {
                    $((AnyStage::$variant(s), AnyStream::$variant(inner)) => s.on_response_body(body, inner),)*
                    _ => BodyFlow::Continue,
                }
            }

            fn on_http_call_response(&self, call: &mut HttpCallResponse, st: &mut AnyStream) {
                match (self, st) {
                    $((AnyStage::$variant(s), AnyStream::$variant(inner)) => s.on_http_call_response(call, inner),)*
                    _ => {}
                }
            }

            fn on_grpc_response(&self, req: &mut Request<'_>, call: &GrpcResponse, st: &mut AnyStream) -> Option<Flow> {
                match (self, st) {
                    $((AnyStage::$variant(s), AnyStream::$variant(inner)) => s.on_grpc_response(req, call, inner),)*
                    _ => None,
                }
            }

            fn on_end(&self, st: &mut AnyStream) {
                match (self, st) {
                    $((AnyStage::$variant(s), AnyStream::$variant(inner)) => s.on_end(inner),)*
                    _ => {}
                }
            }

            fn on_tick(&self) {
                match self {
                    $(AnyStage::$variant(s) => s.on_tick(),)*
                }
            }
        }
    };
}

// The registry: one line per pattern.
stages! {
    RateLimit(rate_limiter::RateLimiter),
    ExperimentSplit(experiment_splitter::ExperimentSplitter),
    ShardRoute(shard_router::ShardRouter),
    ConsistentHash(consistent_hash::ConsistentHash),
    Metrics(metrics_adapter::MetricsAdapter),
}

/// Parse a pipeline config: `{"stages": [{"<stageKey>": {<that filter's config>}}, ...]}`.
pub fn parse(bytes: &[u8]) -> Result<Pipeline<AnyStage>, ConfigError> {
    let serde_json::Value::Object(obj) = parse_value(bytes)? else {
        return Err(ConfigError::new("(document)", "not an object", "an object with `stages`"));
    };
    if let Some(k) = obj.keys().find(|k| *k != "stages") {
        return Err(ConfigError::new(key_segment(k), "(unknown field)", "`stages`"));
    }
    // `stages` is the only key now (no B-tree `remove`: 4 KB of module).
    let Some(serde_json::Value::Array(list)) = obj.into_iter().next().map(|(_, v)| v) else {
        return Err(ConfigError::new("stages", "(missing or not a list)", format!("a list of 1..={MAX_STAGES} stages")));
    };
    if list.is_empty() || list.len() > MAX_STAGES {
        return Err(ConfigError::new("stages", format!("{} stages", list.len()), format!("1..={MAX_STAGES} stages")));
    }
    let mut stages = Vec::with_capacity(list.len());
    for (i, item) in list.into_iter().enumerate() {
        let at = format!("stages[{i}]");
        let serde_json::Value::Object(map) = item else {
            return Err(ConfigError::new(at, "not an object", format!("an object with one key of {}", STAGE_KEYS.join(", "))));
        };
        if map.len() != 1 {
            let keys: Vec<&String> = map.keys().collect();
            return Err(ConfigError::new(at, format!("keys {keys:?}"), format!("exactly one key of {}", STAGE_KEYS.join(", "))));
        }
        for (key, value) in map {
            let path = join(&at, &key_segment(&key));
            match build_any(&key, value, &path)? {
                Some(s) => stages.push(s),
                None => return Err(ConfigError::new(path, "(unknown field)", format!("one of {}", STAGE_KEYS.join(", ")))),
            }
        }
    }
    Ok(Pipeline { stages })
}

#[cfg(all(target_arch = "wasm32", feature = "module"))]
meshpatterns_host::export_module!("meshpatterns", AnyStage, parse, response_headers, response_body, http_call_response, grpc);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn err(json: &str) -> ConfigError {
        match parse(json.as_bytes()) {
            Ok(_) => panic!("accepted: {json}"),
            Err(e) => e,
        }
    }

    #[test]
    fn stage_errors_name_the_stage() {
        let e = err(r#"{"stages":[{"consistentHash":{"keySources":[{"header":"x-u"}]}},{"rateLimit":{"policies":[{"rate":"NaN"}]}}]}"#);
        assert!(e.field.starts_with("stages[1].rateLimit.policies[0]"), "{e}");
        assert_eq!(
            err(r#"{"stages":[{"consistentHash":{"keySources":[{"header":"bad name"}]}}]}"#).field,
            "stages[0].consistentHash.keySources[0].header"
        );
        assert_eq!(err(r#"{"stages":[{"hashing":{}}]}"#).field, "stages[0].hashing");
        assert_eq!(err(r#"{"stages":[]}"#).field, "stages");
        assert_eq!(err(r#"{"stage":[]}"#).field, "stage");
        assert_eq!(
            err(r#"{"stages":[{"consistentHash":{"keySources":[{"header":"a"}],"match":{"hosts":["a b"]}}}]}"#).field,
            "stages[0].consistentHash.match.hosts[0]"
        );
        assert!(parse(br#"{"stages":[{"consistentHash":{"keySources":[{"header":"x-u"}],"match":{"hosts":["a.com"]}}}]}"#).is_ok());
    }
}
