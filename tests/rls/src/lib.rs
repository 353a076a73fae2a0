//! A small Envoy rate limit service (RLS) for the tests and the demo: gRPC
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` in,
//! Kuadrant's Limitador out, counters in Redis so that every proxy asking it
//! shares one budget.
//!
//! Neither Limitador's server nor envoyproxy/ratelimit installs from the
//! registries this project reaches; their pieces do. The limiting is the
//! library's: this crate only maps the protocol onto it.
//!
//! - **Domain** is Limitador's namespace; **each descriptor** of a request is
//!   checked on its own (a Limitador context holding its entries as the map
//!   `descriptors[0]`) and counted on the limits that match it, as Envoy's
//!   reference service counts every descriptor even when another one is over
//!   its limit. The response is OVER_LIMIT when any descriptor is.
//! - A limit matches a descriptor with exactly its keys (in any order), and
//!   the configured value where one is given ([`config`]); every matching
//!   limit is counted (Limitador's semantics), and the status reported for
//!   the descriptor is the one with the least remaining.
//! - Each status carries `current_limit` (name, max per unit),
//!   `limit_remaining` and `duration_until_reset`, which Envoy turns into
//!   X-RateLimit-* headers.
//! - **Limit overrides**: a descriptor carrying `limit` (Envoy's
//!   `RateLimitOverride`, as the rate-limiter filter's global policies send
//!   it) is counted on that limit instead of the configured ones: `max` =
//!   `requests_per_unit` per window of its unit, one counter per distinct
//!   set of entry values, in a namespace of its own per domain, limit and
//!   set of keys (as envoyproxy/ratelimit applies an override without any
//!   configured limit).
//! - Hits: the descriptor's `hits_addend`, else the request's, else 1.
//!   `is_negative_hits` (a refund) is answered OK without counting:
//!   Limitador has no decrement.
//! - Windows are fixed, started by a counter's first hit (Redis `EXPIRE NX`).
//! - Storage: Limitador's non-caching async Redis storage. The cached one
//!   batches counts and can admit more than the limit. The non-caching one
//!   reads the counters, decides, then increments (two round trips, not one
//!   atomic step): requests checked concurrently at the budget's edge can
//!   each be admitted, so a window admits at most `max + c - 1` where `c` is
//!   the number of checks in flight at once.
//! - Redis down or failing: the call fails with gRPC UNAVAILABLE and Envoy
//!   applies its configured failure mode (`failure_mode_deny`). Counters
//!   live only in Redis: a Redis restart without persistence loses them and
//!   every budget starts again.

pub mod config;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Mutex;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{rate_limit::Unit, Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use limitador::counter::Counter;
use limitador::limit::{Context, Limit, Namespace};
use limitador::storage::redis::AsyncRedisStorage;
use limitador::AsyncRateLimiter;

/// The service: one Limitador over one Redis.
pub struct Rls {
    limiter: AsyncRateLimiter,
    /// Namespaces of the override limits added so far.
    overrides: Mutex<HashSet<String>>,
}

impl Rls {
    /// Connect to Redis at `redis_url` (`redis://127.0.0.1:6379`) and load `limits`.
    pub async fn connect(redis_url: &str, limits: Vec<Limit>) -> Result<Rls, String> {
        let storage = AsyncRedisStorage::new(redis_url).await.map_err(|e| format!("redis {redis_url}: {e}"))?;
        let limiter = AsyncRateLimiter::new_with_storage(Box::new(storage));
        for l in limits {
            limiter.add_limit(l);
        }
        Ok(Rls { limiter, overrides: Mutex::new(HashSet::new()) })
    }

    /// The namespace a descriptor with a limit override is counted in
    /// (its limit added on first sight).
    fn override_namespace(&self, domain: &str, d: &RateLimitDescriptor) -> Result<Namespace, tonic::Status> {
        let Some(o) = d.limit else { return Ok(Namespace::from(domain)) };
        let seconds = match o.unit {
            1 => 1,
            2 => 60,
            3 => 3600,
            4 => 86_400,
            u => return Err(tonic::Status::invalid_argument(format!("limit override: unit {u} has no fixed window here"))),
        };
        if o.requests_per_unit == 0 {
            return Err(tonic::Status::invalid_argument("limit override: requests_per_unit 0"));
        }
        let mut keys: Vec<&str> = d.entries.iter().map(|e| e.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let ns = format!("{domain}#override:{}/{seconds}s:{}", o.requests_per_unit, keys.join(","));
        let mut seen = self.overrides.lock().map_err(|_| tonic::Status::internal("poisoned lock"))?;
        if !seen.contains(&ns) {
            let limit = config::override_limit(&ns, &keys, u64::from(o.requests_per_unit), seconds)
                .map_err(|e| tonic::Status::invalid_argument(e.0))?;
            self.limiter.add_limit(limit);
            seen.insert(ns.clone());
        }
        Ok(Namespace::from(ns.as_str()))
    }

    /// Answer one `ShouldRateLimit` call.
    pub async fn check(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, tonic::Status> {
        let mut statuses = Vec::with_capacity(req.descriptors.len());
        for d in &req.descriptors {
            if d.is_negative_hits {
                statuses.push(DescriptorStatus { code: Code::Ok.into(), ..Default::default() });
                continue;
            }
            let hits = d.hits_addend.as_ref().map_or(u64::from(req.hits_addend), |h| h.value).max(1);
            let ctx = context(d);
            let namespace = self.override_namespace(&req.domain, d)?;
            let result = self
                .limiter
                .check_rate_limited_and_update(&namespace, &ctx, hits)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("limitador: {e}")))?;
            statuses.push(status(result.limited, &result.counters));
        }
        let over = statuses.iter().any(|s| s.code == i32::from(Code::OverLimit));
        Ok(RateLimitResponse { overall_code: if over { Code::OverLimit } else { Code::Ok }.into(), statuses, ..Default::default() })
    }
}

/// The Limitador context of one descriptor: its entries as the map
/// `descriptors[0]` (see [`config::DESCRIPTORS`]).
pub fn context(d: &RateLimitDescriptor) -> Context<'static> {
    let entries: HashMap<String, String> = d.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect();
    let mut ctx = Context::default();
    ctx.list_binding(config::DESCRIPTORS.to_string(), vec![entries]);
    ctx
}

/// Envoy's unit for a window length (the lengths [`config`] accepts).
pub fn unit(seconds: u64) -> Unit {
    match seconds {
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86400 => Unit::Day,
        _ => Unit::Unknown,
    }
}

/// One descriptor's status from the counters Limitador checked: the most
/// restrictive (least remaining) one is reported; none matched is plain OK.
pub fn status(limited: bool, counters: &[Counter]) -> DescriptorStatus {
    let code = if limited { Code::OverLimit } else { Code::Ok };
    let Some(c) = counters.iter().min_by_key(|c| c.remaining().unwrap_or(c.max_value())) else {
        return DescriptorStatus { code: code.into(), ..Default::default() };
    };
    let reset = c.expires_in().unwrap_or(c.window());
    DescriptorStatus {
        code: code.into(),
        current_limit: Some(RateLimit {
            name: c.limit().name().unwrap_or_default().to_string(),
            requests_per_unit: u32::try_from(c.max_value()).unwrap_or(u32::MAX),
            unit: unit(c.window().as_secs()).into(),
        }),
        limit_remaining: u32::try_from(c.remaining().unwrap_or(c.max_value())).unwrap_or(u32::MAX),
        duration_until_reset: Some(PbDuration {
            seconds: i64::try_from(reset.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(reset.subsec_nanos()).unwrap_or(0),
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let resp = self.check(request.get_ref()).await;
        if let Err(e) = &resp {
            eprintln!("rls: {}", e.message());
        }
        resp.map(tonic::Response::new)
    }
}

/// Serve `rls` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, rls: Rls) -> Result<(), String> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(rls))
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| format!("serve: {e}"))
}

const USAGE: &str = "usage: meshpatterns-rls --config LIMITS.yaml --redis redis://HOST:PORT [--listen 127.0.0.1:8081]\n\
    Prints the bound address (HOST:PORT) as the first line of stdout once it accepts calls.";

struct Args {
    config: String,
    redis: String,
    listen: SocketAddr,
}

fn args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut config, mut redis, mut listen) = (None, None, "127.0.0.1:8081".to_string());
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--config" => config = Some(value()?),
            "--redis" => redis = Some(value()?),
            "--listen" => listen = value()?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        config: config.ok_or("--config is required")?,
        redis: redis.ok_or("--redis is required")?,
        listen: listen.parse().map_err(|e| format!("--listen {listen}: {e}"))?,
    })
}

async fn run(a: Args) -> Result<(), String> {
    let text = std::fs::read_to_string(&a.config).map_err(|e| format!("{}: {e}", a.config))?;
    let limits = config::parse(&text).map_err(|e| format!("{}: {e}", a.config))?;
    let rls = Rls::connect(&a.redis, limits).await?;
    let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| format!("listen {}: {e}", a.listen))?;
    let bound = listener.local_addr().map_err(|e| format!("listen {}: {e}", a.listen))?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{bound}").and_then(|()| out.flush()).map_err(|e| format!("stdout: {e}"))?;
    }
    serve(listener, rls).await
}

/// The command line: `meshpatterns-rls --config FILE --redis URL [--listen ADDR]`.
pub fn main() -> ExitCode {
    let a = match args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("meshpatterns-rls: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshpatterns-rls: tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshpatterns-rls: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;

    #[test]
    fn arguments() {
        let a = args(["--config", "l.yaml", "--redis", "redis://127.0.0.1:1", "--listen", "127.0.0.1:0"].map(String::from).into_iter())
            .unwrap();
        assert_eq!((a.config.as_str(), a.redis.as_str(), a.listen.port()), ("l.yaml", "redis://127.0.0.1:1", 0));
        assert_eq!(args(["--config", "x"].map(String::from).into_iter()).err().unwrap(), "--redis is required");
        assert_eq!(args(["--config"].map(String::from).into_iter()).err().unwrap(), "--config needs a value");
        assert!(args(["--bogus"].map(String::from).into_iter()).err().unwrap().contains("--bogus"));
    }

    #[test]
    fn units() {
        assert_eq!(config::WINDOWS.map(unit), [Unit::Second, Unit::Minute, Unit::Hour, Unit::Day]);
        assert_eq!(unit(10), Unit::Unknown);
    }

    fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
            ..Default::default()
        }
    }

    /// Limitador in memory (same matching and counting, no Redis): one
    /// descriptor checked and counted, its status as the service reports it.
    fn check(limiter: &limitador::RateLimiter, domain: &str, entries: &[(&str, &str)]) -> DescriptorStatus {
        let r = limiter.check_rate_limited_and_update(&Namespace::from(domain), &context(&descriptor(entries)), 1).unwrap();
        status(r.limited, &r.counters)
    }

    fn limiter(yaml: &str) -> limitador::RateLimiter {
        let limiter = limitador::RateLimiter::new(1000);
        for l in config::parse(yaml).unwrap() {
            limiter.add_limit(l);
        }
        limiter
    }

    #[test]
    fn a_budget_per_value_then_over_limit_with_statuses() {
        let l = limiter("limits: [{name: per-key, domain: d, descriptor: [{key: x-api-key}], max: 3, seconds: 60}]");
        for left in [2, 1, 0] {
            let s = check(&l, "d", &[("x-api-key", "a")]);
            assert_eq!(s.code, i32::from(Code::Ok));
            assert_eq!(s.limit_remaining, left);
            let limit = s.current_limit.unwrap();
            assert_eq!((limit.name.as_str(), limit.requests_per_unit, limit.unit), ("per-key", 3, i32::from(Unit::Minute)));
            let reset = s.duration_until_reset.unwrap();
            assert!((1..=60).contains(&reset.seconds), "{reset:?}");
        }
        let s = check(&l, "d", &[("x-api-key", "a")]);
        assert_eq!((s.code, s.limit_remaining), (i32::from(Code::OverLimit), 0));
        // another value has its own counter; another domain, no limit
        assert_eq!(check(&l, "d", &[("x-api-key", "b")]).limit_remaining, 2);
        assert!(check(&l, "other", &[("x-api-key", "a")]).current_limit.is_none());
    }

    #[test]
    fn a_limit_matches_exactly_its_keys_and_values() {
        let l = limiter(
            "limits:\n\
             - {domain: d, descriptor: [{key: remote_address}], max: 5, seconds: 1}\n\
             - {domain: d, descriptor: [{key: api_key, value: gold}, {key: path}], max: 7, seconds: 3600}\n",
        );
        assert_eq!(check(&l, "d", &[("remote_address", "10.0.0.1")]).current_limit.unwrap().requests_per_unit, 5);
        // extra or missing keys: no limit
        assert!(check(&l, "d", &[("remote_address", "10.0.0.1"), ("path", "/")]).current_limit.is_none());
        assert!(check(&l, "d", &[("api_key", "gold")]).current_limit.is_none());
        assert!(check(&l, "d", &[("api_key", "silver"), ("path", "/")]).current_limit.is_none());
        let s = check(&l, "d", &[("path", "/x"), ("api_key", "gold")]);
        assert_eq!((s.current_limit.unwrap().requests_per_unit, s.limit_remaining), (7, 6));
    }

    #[test]
    fn the_least_remaining_limit_is_reported() {
        let l = limiter(
            "limits:\n\
             - {name: wide, domain: d, descriptor: [{key: k}], max: 100, seconds: 60}\n\
             - {name: narrow, domain: d, descriptor: [{key: k, value: v}], max: 2, seconds: 1}\n",
        );
        let s = check(&l, "d", &[("k", "v")]);
        assert_eq!((s.current_limit.unwrap().name.as_str(), s.limit_remaining), ("narrow", 1));
        check(&l, "d", &[("k", "v")]);
        let s = check(&l, "d", &[("k", "v")]);
        assert_eq!((s.code, s.current_limit.unwrap().name.as_str()), (i32::from(Code::OverLimit), "narrow"));
        // the limited call was counted on neither limit
        let counters = l.get_counters(&Namespace::from("d")).unwrap();
        let wide = counters.iter().find(|c| c.limit().name() == Some("wide")).unwrap();
        assert_eq!(wide.remaining(), Some(98));
    }

    /// The rate-limiter filter's hand-written codec against prost (the
    /// generated types the service uses).
    #[test]
    fn the_filters_codec_agrees_with_prost() {
        use prost::Message;
        use rate_limiter::logic::config::Unit as PolicyUnit;
        use rate_limiter::logic::rls;
        let d = rls::Descriptor {
            entries: vec![("policy".into(), "per-key".into()), ("key0".into(), rls::entry_value(b"k\xff"))],
            requests_per_unit: 2000,
            unit: PolicyUnit::Hour,
        };
        let bytes = rls::encode_request("meshpatterns", &[d]);
        let req = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!((req.domain.as_str(), req.hits_addend), ("meshpatterns", 1));
        let got = &req.descriptors[0];
        let entries: Vec<(&str, &str)> = got.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect();
        assert_eq!(entries, [("policy", "per-key"), ("key0", "hex:6bff")]);
        let o = got.limit.unwrap();
        assert_eq!((o.requests_per_unit, o.unit), (2000, 3));

        let resp = RateLimitResponse {
            overall_code: Code::OverLimit.into(),
            statuses: vec![DescriptorStatus {
                code: Code::OverLimit.into(),
                current_limit: Some(RateLimit { name: "n".into(), requests_per_unit: 2000, unit: Unit::Hour.into() }),
                limit_remaining: 0,
                duration_until_reset: Some(PbDuration { seconds: 3599, nanos: 5 }),
                ..Default::default()
            }],
            raw_body: b"ignored".to_vec(),
            ..Default::default()
        };
        let r = rls::decode_response(&resp.encode_to_vec()).unwrap();
        assert_eq!(r.overall, rls::CODE_OVER_LIMIT);
        assert_eq!(r.statuses, vec![rls::Status { code: 2, limit: Some((2000, 3600)), remaining: 0, reset_ns: Some(3_599_000_000_005) }]);

        // The GrpcService the filter passes to Envoy.
        use envoy_types::pb::envoy::config::core::v3::{grpc_service::TargetSpecifier, GrpcService};
        let g =
            GrpcService::decode(rls::grpc_service("outbound|8081||r.ns.svc.cluster.local", "r.ns.svc.cluster.local").as_slice()).unwrap();
        let Some(TargetSpecifier::EnvoyGrpc(e)) = g.target_specifier else { panic!("{g:?}") };
        assert_eq!((e.cluster_name.as_str(), e.authority.as_str()), ("outbound|8081||r.ns.svc.cluster.local", "r.ns.svc.cluster.local"));
    }

    #[test]
    fn no_matching_limit_is_plain_ok() {
        let s = status(false, &[]);
        assert_eq!(s.code, i32::from(Code::Ok));
        assert!(s.current_limit.is_none());
    }
}
