//! References between the Istio resources in istio/. The schema tests
//! (manifests.rs) check each document alone; Istio also needs the documents
//! to agree with each other, and reports a broken reference only at run time
//! (a route that attaches nowhere, a subset that sends 503s). This file loads
//! every istio/*.yaml and checks, the way Istio 1.28–1.30 resolves names:
//!
//! - every gateway a VirtualService binds is a Gateway defined in istio/
//!   (`ns/name`; a bare `name` or `./name` is in the VirtualService's own
//!   namespace; `mesh` means the sidecars), and every `delegate` names a
//!   VirtualService without hosts that is defined here;
//! - each bound Gateway has a server that accepts at least one of the
//!   VirtualService's hosts, and every host is accepted by some binding;
//! - a host of a mesh VirtualService is a ServiceEntry host in istio/ or a
//!   Kubernetes Service defined in istio/ (rule: see [`kubernetes_service`]);
//! - no two VirtualServices claim the same host on the same gateway (or
//!   both on `mesh`): Istio appends their routes in creation order, so the
//!   order of `kubectl apply` would decide which one answers;
//! - every subset a route uses is defined by a DestinationRule for that host;
//! - a WasmPlugin that fails closed on a gateway (FAIL_CLOSE, the default)
//!   is alone there with its own hosts: if its module cannot be fetched, a
//!   deny-all filter replaces it in front of every host that gateway serves;
//! - every WasmPlugin agrees with the resources it pairs with, which are the
//!   ones in its own file (istio/README.md, "Which networking resources pair
//!   with each filter"): the header it writes is the header the
//!   DestinationRule hashes or the VirtualService matches, with the values
//!   it writes, and it runs on the gateway the VirtualService is bound to.

use meshpatterns_tests::filters::{istio_documents, yaml_documents};
use serde_norway::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Istio's root namespace as installed by default: configs here apply to
/// every namespace.
const ROOT_NAMESPACE: &str = "istio-system";
/// The Kubernetes cluster domain (the default, `cluster.local`).
const SERVICE_SUFFIX: &str = ".svc.cluster.local";

struct Doc {
    file: String,
    v: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.v["kind"].as_str().unwrap_or("")
    }
    fn ns(&self) -> &str {
        self.v["metadata"]["namespace"].as_str().unwrap_or("default")
    }
    fn name(&self) -> &str {
        self.v["metadata"]["name"].as_str().unwrap_or("")
    }
    fn key(&self) -> String {
        format!("{}/{}", self.ns(), self.name())
    }
    fn spec(&self) -> &Value {
        &self.v["spec"]
    }
    /// `istio/file.yaml: Kind ns/name`, for messages.
    fn at(&self) -> String {
        format!("istio/{}: {} {}", self.file, self.kind(), self.key())
    }
    fn hosts(&self) -> Vec<String> {
        strings(&self.spec()["hosts"])
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

fn seq(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_sequence().into_iter().flatten()
}

fn load_istio() -> Vec<Doc> {
    istio_documents().into_iter().map(|(file, v)| Doc { file, v }).collect()
}

/// Documents from inline YAML, for the tests that show a check can fail.
fn load(files: &[(&str, &str)]) -> Vec<Doc> {
    let mut docs = Vec::new();
    for (file, text) in files {
        for v in yaml_documents(text).unwrap_or_else(|e| panic!("{file}: {e}")) {
            docs.push(Doc { file: file.to_string(), v });
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [Doc], kind: &'a str) -> impl Iterator<Item = &'a Doc> {
    docs.iter().filter(move |d| d.kind() == kind)
}

// ---------------------------------------------------------------------------
// How Istio resolves names

/// A VirtualService's `gateways` entry as `ns/name`, or `mesh`
/// (resolveGatewayName, pilot/pkg/model/config.go): `ns/name` as written,
/// `./name` and a bare `name` in the VirtualService's namespace, and the
/// legacy `name.ns[.svc.cluster.local]` as `ns/name`.
fn resolve_gateway(g: &str, vs_ns: &str) -> String {
    if g == "mesh" {
        return g.to_string();
    }
    match g.split_once('/') {
        Some((".", name)) => format!("{vs_ns}/{name}"),
        Some(_) => g.to_string(),
        None => match g.split_once('.') {
            Some((name, rest)) => format!("{}/{name}", rest.split('.').next().unwrap_or(rest)),
            None => format!("{vs_ns}/{g}"),
        },
    }
}

/// A VirtualService's bindings: its `gateways`, resolved; none means `mesh`.
fn bindings(vs: &Doc) -> Vec<String> {
    let gws = strings(&vs.spec()["gateways"]);
    if gws.is_empty() {
        return vec!["mesh".into()];
    }
    gws.iter().map(|g| resolve_gateway(g, vs.ns())).collect()
}

/// A VirtualService without hosts is a delegate: it is reached only through
/// a root VirtualService's `delegate`, and takes the root's gateways.
fn is_delegate(vs: &Doc) -> bool {
    vs.hosts().is_empty()
}

/// The delegates a root VirtualService names, as `ns/name` (the namespace
/// defaults to the root's).
fn delegates(vs: &Doc) -> Vec<String> {
    seq(&vs.spec()["http"])
        .filter_map(|r| {
            let d = &r["delegate"];
            let name = d["name"].as_str()?;
            Some(format!("{}/{name}", d["namespace"].as_str().unwrap_or(vs.ns())))
        })
        .collect()
}

/// Do two host patterns have a host in common? `*` is every host;
/// `*.example.com` is every host ending in `.example.com`, at any depth,
/// but not `example.com` itself (host.Name, pkg/config/host). Case-insensitive.
fn hosts_intersect(a: &str, b: &str) -> bool {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    if a == b || a == "*" || b == "*" {
        return true;
    }
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(sa), Some(sb)) => sa.ends_with(sb) || sb.ends_with(sa),
        (Some(sa), None) => b.ends_with(sa),
        (None, Some(sb)) => a.ends_with(sb),
        (None, None) => false,
    }
}

/// Does a Gateway server host (`[namespace/]dnsName`; no namespace means
/// `*/`, `.` means the Gateway's namespace) accept a VirtualService host from
/// namespace `vs_ns`? (host.NamesForNamespace, then Intersection, in
/// pilot/pkg/networking/core/gateway.go.)
fn server_accepts(server_host: &str, gateway_ns: &str, vs_ns: &str, vs_host: &str) -> bool {
    let (ns, dns) = server_host.split_once('/').unwrap_or(("*", server_host));
    let ns_ok = ns == "*" || ns == vs_ns || (ns == "." && gateway_ns == vs_ns);
    ns_ok && hosts_intersect(dns, vs_host)
}

/// A service host as Istio reads it (ResolveShortnameToFQDN,
/// pilot/pkg/model/config.go): a host without a dot is a short name and
/// becomes `name.<namespace of the resource>.svc.cluster.local`; a host
/// with a dot is taken as written.
fn fqdn(host: &str, ns: &str) -> String {
    if host == "*" || host.contains('.') {
        host.to_ascii_lowercase()
    } else {
        format!("{}.{ns}{SERVICE_SUFFIX}", host.to_ascii_lowercase())
    }
}

/// The rule for "a Kubernetes service host": the host, resolved with
/// [`fqdn`], must be `<name>.<namespace>.svc.cluster.local`, which is the
/// only name the Kubernetes registry gives a Service. So `catalog` (in the
/// VirtualService's namespace) and `catalog.shop.svc.cluster.local` name
/// the Service shop/catalog; `catalog.shop` and `catalog.shop.svc` do not
/// (Istio does not expand a host that has a dot) and name nothing.
/// Returns the Service as `ns/name`.
fn kubernetes_service(host: &str, ns: &str) -> Option<String> {
    let full = fqdn(host, ns);
    let (name, svc_ns) = full.strip_suffix(SERVICE_SUFFIX)?.split_once('.')?;
    (!svc_ns.contains('.') && !name.is_empty() && !svc_ns.is_empty()).then(|| format!("{svc_ns}/{name}"))
}

// ---------------------------------------------------------------------------
// The checks. Each returns one line per problem, naming the file and resource.

/// `gateways` and `delegate` references resolve to resources in istio/.
fn check_references(docs: &[Doc]) -> Vec<String> {
    let gateways: BTreeSet<String> = of_kind(docs, "Gateway").map(Doc::key).collect();
    let services: BTreeMap<String, &Doc> = of_kind(docs, "VirtualService").map(|d| (d.key(), d)).collect();
    let mut problems = Vec::new();
    let mut delegated = BTreeSet::new();
    for vs in of_kind(docs, "VirtualService") {
        for (written, g) in strings(&vs.spec()["gateways"]).iter().zip(bindings(vs)) {
            if g != "mesh" && !gateways.contains(&g) {
                problems.push(format!(
                    "{}: gateway {written:?} (resolved to {g}) is defined by no Gateway in istio/ (Gateways here: {})",
                    vs.at(),
                    gateways.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        for d in delegates(vs) {
            match services.get(&d) {
                None => problems.push(format!("{}: delegate {d} is defined by no VirtualService in istio/", vs.at())),
                Some(target) if !is_delegate(target) => {
                    problems.push(format!("{}: delegate {d} has hosts; Istio only delegates to a VirtualService without hosts", vs.at()))
                }
                Some(_) => {}
            }
            delegated.insert(d);
        }
    }
    for vs in of_kind(docs, "VirtualService").filter(|d| is_delegate(d)) {
        if !delegated.contains(&vs.key()) {
            problems.push(format!("{}: has no hosts, and no VirtualService in istio/ delegates to it, so it routes nothing", vs.at()));
        }
        if !strings(&vs.spec()["gateways"]).is_empty() {
            problems.push(format!("{}: a delegate must not name gateways (it takes its root's)", vs.at()));
        }
    }
    problems
}

/// Each Gateway a VirtualService binds accepts at least one of its hosts,
/// and each host is accepted by some binding (`mesh` accepts any host; see
/// [`check_mesh_hosts`]).
fn check_gateway_hosts(docs: &[Doc]) -> Vec<String> {
    let gateways: BTreeMap<String, &Doc> = of_kind(docs, "Gateway").map(|d| (d.key(), d)).collect();
    let mut problems = Vec::new();
    for vs in of_kind(docs, "VirtualService").filter(|d| !is_delegate(d)) {
        let hosts = vs.hosts();
        let binds = bindings(vs);
        if binds.iter().any(|g| g != "mesh" && !gateways.contains_key(g)) {
            continue; // reported by check_references
        }
        let mut accepted: BTreeSet<&str> = BTreeSet::new();
        for g in &binds {
            let Some(gw) = gateways.get(g) else {
                accepted.extend(hosts.iter().map(String::as_str)); // mesh: see check_mesh_hosts
                continue;
            };
            let server_hosts: Vec<String> = seq(&gw.spec()["servers"]).flat_map(|s| strings(&s["hosts"])).collect();
            let ok: Vec<&str> =
                hosts.iter().filter(|h| server_hosts.iter().any(|s| server_accepts(s, gw.ns(), vs.ns(), h))).map(String::as_str).collect();
            if ok.is_empty() {
                problems.push(format!(
                    "{}: bound to Gateway {g}, whose servers accept none of its hosts {hosts:?} (the Gateway's server hosts: {server_hosts:?}); Istio attaches none of its routes there",
                    vs.at()
                ));
            }
            accepted.extend(ok);
        }
        // When no host is accepted at all, the line per gateway said so.
        for h in hosts.iter().filter(|h| !accepted.is_empty() && !accepted.contains(h.as_str())) {
            problems.push(format!("{}: host {h:?} is accepted by none of its gateways {binds:?}, so it is never routed", vs.at()));
        }
    }
    problems
}

/// A host of a VirtualService bound to `mesh` is a ServiceEntry host in
/// istio/ or a Kubernetes Service defined in istio/ ([`kubernetes_service`]).
fn check_mesh_hosts(docs: &[Doc]) -> Vec<String> {
    let services: BTreeSet<String> = of_kind(docs, "Service").map(Doc::key).collect();
    let entries: Vec<String> = of_kind(docs, "ServiceEntry").flat_map(|d| d.hosts().into_iter().map(|h| fqdn(&h, d.ns()))).collect();
    let mut problems = Vec::new();
    for vs in of_kind(docs, "VirtualService").filter(|d| !is_delegate(d) && bindings(d).iter().any(|g| g == "mesh")) {
        for h in vs.hosts() {
            if entries.iter().any(|e| hosts_intersect(e, &fqdn(&h, vs.ns()))) {
                continue;
            }
            match kubernetes_service(&h, vs.ns()) {
                Some(svc) if services.contains(&svc) => {}
                Some(svc) => problems.push(format!(
                    "{}: mesh host {h:?} is the Kubernetes Service {svc}, which istio/ does not define (and no ServiceEntry here has that host)",
                    vs.at()
                )),
                None => problems.push(format!(
                    "{}: mesh host {h:?} is neither a ServiceEntry host in istio/ nor a Kubernetes service host; write `name` (a Service in {}) or `name.namespace{SERVICE_SUFFIX}` (Istio takes any host with a dot as written)",
                    vs.at(),
                    vs.ns()
                )),
            }
        }
    }
    problems
}

/// No two VirtualServices claim the same host on the same gateway, or both
/// on `mesh`.
fn check_host_conflicts(docs: &[Doc]) -> Vec<String> {
    let mut claims: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for vs in of_kind(docs, "VirtualService").filter(|d| !is_delegate(d)) {
        for g in bindings(vs) {
            for h in vs.hosts() {
                let host = if g == "mesh" { fqdn(&h, vs.ns()) } else { h.to_ascii_lowercase() };
                claims.entry((g.clone(), host)).or_default().push(vs.at());
            }
        }
    }
    claims
        .into_iter()
        .filter(|(_, by)| by.len() > 1)
        .map(|((g, h), by)| {
            format!(
                "host {h:?} on {g} is claimed by {}; Istio appends their routes in creation order, so the first catch-all wins whatever the others say: keep one VirtualService per host and `delegate` parts of it",
                by.join(" and ")
            )
        })
        .collect()
}

/// Every route destination of a VirtualService, with the namespace its host
/// is resolved in.
fn destinations(vs: &Doc) -> Vec<&Value> {
    let spec = vs.spec();
    let mut out = Vec::new();
    for kind in ["http", "tcp", "tls"] {
        for r in seq(&spec[kind]) {
            out.extend(seq(&r["route"]).map(|d| &d["destination"]));
            if kind == "http" {
                if r.get("mirror").is_some() {
                    out.push(&r["mirror"]);
                }
                out.extend(seq(&r["mirrors"]).map(|m| &m["destination"]));
            }
        }
    }
    out
}

/// Every subset a route uses is defined by a DestinationRule for that host.
fn check_subsets(docs: &[Doc]) -> Vec<String> {
    let rules: Vec<(String, &Doc)> =
        of_kind(docs, "DestinationRule").filter_map(|d| Some((fqdn(d.spec()["host"].as_str()?, d.ns()), d))).collect();
    let mut problems = Vec::new();
    for vs in of_kind(docs, "VirtualService") {
        for dest in destinations(vs) {
            let (Some(host), Some(subset)) = (dest["host"].as_str(), dest["subset"].as_str()) else { continue };
            let host = fqdn(host, vs.ns());
            let matching: Vec<&Doc> =
                rules.iter().filter(|(h, _)| hosts_intersect(h, &host) && (h == &host || h.starts_with('*'))).map(|(_, d)| *d).collect();
            let defined: BTreeSet<String> =
                matching.iter().flat_map(|d| seq(&d.spec()["subsets"])).filter_map(|s| s["name"].as_str().map(str::to_string)).collect();
            if !defined.contains(subset) {
                let names: Vec<String> = matching.iter().map(|d| d.at()).collect();
                problems.push(format!(
                    "{}: routes to subset {subset:?} of {host}, which no DestinationRule for that host defines (DestinationRules for it: {names:?}, subsets {defined:?})",
                    vs.at()
                ));
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------
// WasmPlugins and the resources they pair with

/// Filter name from the module URL: `oci://.../consistent-hash:0.1.0` -> consistent-hash.
fn filter_of(plugin: &Doc) -> String {
    let url = plugin.spec()["url"].as_str().unwrap_or("");
    let last = url.rsplit('/').next().unwrap_or("");
    last.split([':', '@']).next().unwrap_or("").trim_end_matches(".wasm").replace('_', "-")
}

/// The pluginConfig as Istio hands it to the module: JSON bytes.
fn plugin_json(plugin: &Doc) -> Vec<u8> {
    serde_json::to_vec(&serde_json::to_value(&plugin.spec()["pluginConfig"]).unwrap_or_default()).unwrap_or_default()
}

/// Exact values a VirtualService route matches on `header`, and the match
/// forms other than `exact` it uses for it.
fn header_matches(vs: &Doc, header: &str) -> (Vec<String>, Vec<String>) {
    let (mut exact, mut other) = (Vec::new(), Vec::new());
    for r in seq(&vs.spec()["http"]) {
        for m in seq(&r["match"]) {
            let Some(headers) = m["headers"].as_mapping() else { continue };
            for (name, cond) in headers {
                if name.as_str().is_some_and(|n| n.eq_ignore_ascii_case(header)) {
                    match cond["exact"].as_str() {
                        Some(v) => exact.push(v.to_string()),
                        None => other.push(serde_json::to_string(&serde_json::to_value(cond).unwrap_or_default()).unwrap_or_default()),
                    }
                }
            }
        }
    }
    (exact, other)
}

/// A VirtualService in the plugin's file routes on `header`: with exactly
/// the values in `written`, each of `required` among them.
fn check_routes_on(
    plugin: &Doc,
    pair: &[&Doc],
    what: &str,
    header: &str,
    written: &BTreeSet<String>,
    required: &BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut matched = BTreeSet::new();
    for vs in pair.iter().filter(|d| d.kind() == "VirtualService") {
        let (exact, other) = header_matches(vs, header);
        for o in other {
            problems.push(format!("{}: matches {header} with {o}; the filter writes whole values, match them with `exact`", vs.at()));
        }
        for v in exact {
            if !written.contains(&v) {
                problems.push(format!("{}: matches {header}: {v:?}, which {} never writes ({what}: {written:?})", vs.at(), plugin.at()));
            }
            matched.insert(v);
        }
    }
    if matched.is_empty() {
        problems.push(format!("{}: writes {header} ({what}), and no VirtualService in istio/{} routes on it", plugin.at(), plugin.file));
    } else {
        for v in required.difference(&matched) {
            problems.push(format!(
                "{}: writes {header}: {v:?}, and no VirtualService route in istio/{} matches it",
                plugin.at(),
                plugin.file
            ));
        }
    }
    problems
}

/// The header pairing of one plugin with the resources of its file. The
/// pipeline module (`meshpatterns`) pairs stage by stage: each stage is
/// checked as the single filter of its pattern would be.
fn check_header_pairing(plugin: &Doc, pair: &[&Doc]) -> Vec<String> {
    let filter = filter_of(plugin);
    if filter != "meshpatterns" {
        return check_pattern_pairing(plugin, pair, &filter, &plugin_json(plugin));
    }
    let mut problems = Vec::new();
    for stage in seq(&plugin.spec()["pluginConfig"]["stages"]) {
        for (key, config) in stage.as_mapping().into_iter().flatten() {
            let Some((name, _)) = meshpatterns::PATTERNS.iter().find(|(_, k)| key.as_str() == Some(*k)) else { continue };
            let json = serde_json::to_vec(&serde_json::to_value(config).unwrap_or_default()).unwrap_or_default();
            problems.extend(check_pattern_pairing(plugin, pair, name, &json));
        }
    }
    problems
}

/// The header pairing of one pattern's config (`json`) in `plugin`.
fn check_pattern_pairing(plugin: &Doc, pair: &[&Doc], filter: &str, json: &[u8]) -> Vec<String> {
    /// The pattern's own config, without the stage-level `match` and `filterState`.
    fn parse_json<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, meshpatterns_core::error::ConfigError> {
        let mut v = meshpatterns_core::error::parse_value(json)?;
        meshpatterns_host::stage::take_scope(&mut v, "")?;
        meshpatterns_core::error::from_value(v, "")
    }
    let bad = |e: meshpatterns_core::error::ConfigError| vec![format!("{}: pluginConfig ({filter}): {e}", plugin.at())];
    match filter {
        "consistent-hash" => {
            let s = match parse_json(json).and_then(consistent_hash::logic::Settings::try_from_config) {
                Ok(s) => s,
                Err(e) => return bad(e),
            };
            let mut problems = Vec::new();
            let mut hashed = false;
            for dr in pair.iter().filter(|d| d.kind() == "DestinationRule") {
                let policies = std::iter::once(&dr.spec()["trafficPolicy"]).chain(seq(&dr.spec()["subsets"]).map(|s| &s["trafficPolicy"]));
                for ch in policies.map(|p| &p["loadBalancer"]["consistentHash"]).filter(|c| !c.is_null()) {
                    match ch["httpHeaderName"].as_str() {
                        Some(h) if h.eq_ignore_ascii_case(&s.hash_header) => hashed = true,
                        Some(h) => problems.push(format!(
                            "{}: consistentHash.httpHeaderName is {h:?}, but {} writes the hash into {:?} (hashHeader)",
                            dr.at(),
                            plugin.at(),
                            s.hash_header
                        )),
                        None => problems.push(format!(
                            "{}: consistentHash does not hash a header; {} writes its hash into {:?} (hashHeader) for httpHeaderName",
                            dr.at(),
                            plugin.at(),
                            s.hash_header
                        )),
                    }
                }
            }
            if !hashed && problems.is_empty() {
                problems.push(format!(
                    "{}: writes {:?} (hashHeader), and no DestinationRule in istio/{} hashes it (consistentHash.httpHeaderName)",
                    plugin.at(),
                    s.hash_header,
                    plugin.file
                ));
            }
            problems
        }
        "experiment-splitter" => {
            let s = match parse_json(json).and_then(experiment_splitter::logic::Settings::try_from_config) {
                Ok(s) => s,
                Err(e) => return bad(e),
            };
            let mut problems = Vec::new();
            for e in &s.experiments {
                let written: BTreeSet<String> = e.arms.iter().map(|a| a.target.clone()).collect();
                // The control arm may ride the default route; every other arm needs its own.
                let control = e.arms.get(e.control).map(|a| a.target.clone());
                let required: BTreeSet<String> = written.iter().filter(|t| Some(*t) != control.as_ref()).cloned().collect();
                let what = format!("arm targets of experiment {}", e.name);
                problems.extend(check_routes_on(plugin, pair, &what, &e.routing_header, &written, &required));
            }
            problems
        }
        "shard-router" => {
            let s = match parse_json(json).and_then(shard_router::logic::Settings::try_from_config) {
                Ok(s) => s,
                Err(e) => return bad(e),
            };
            let maps = std::iter::once(&s.current).chain(s.previous.as_ref());
            let written: BTreeSet<String> = maps.flat_map(|m| m.shards.iter().map(|sh| sh.cluster.clone())).collect();
            check_routes_on(plugin, pair, "shard clusters of shardMap and previousShardMap", &s.shard_header, &written, &written)
        }
        _ => Vec::new(),
    }
}

/// A plugin paired with a gateway-bound VirtualService must run on that
/// gateway: its `selector` selects the Gateway's workload (its labels are a
/// subset of the Gateway's `selector`, and it lives in the root namespace or
/// the Gateway's), and its `match` lets gateway listeners through (they are
/// CLIENT: workloadModeForListenerClass, pilot/pkg/model/extensions.go).
/// `targetRefs` is no way to reach an Istio Gateway: with targetRefs set, a
/// workload that is not a Kubernetes Gateway API gateway ignores the plugin
/// (ShouldAttachPolicy, pilot/pkg/model/policyattachment.go).
fn check_plugin_placement(plugin: &Doc, gateways: &[&Doc]) -> Vec<String> {
    let mut problems = Vec::new();
    let spec = plugin.spec();
    if spec.get("targetRefs").is_some() || spec.get("targetRef").is_some() {
        for gw in gateways {
            problems.push(format!(
                "{}: pairs with {}, an Istio Gateway, but uses targetRefs, which only attach to Kubernetes Gateway API gateways; use selector",
                plugin.at(),
                gw.at()
            ));
        }
        return problems;
    }
    let wanted = spec["selector"]["matchLabels"].as_mapping();
    for gw in gateways {
        let labels = gw.spec()["selector"].as_mapping();
        let selected = wanted.is_none_or(|w| w.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)));
        if !selected {
            problems.push(format!(
                "{}: selector {:?} does not select the workload of {} (selector {:?}), where its paired routes run",
                plugin.at(),
                spec["selector"]["matchLabels"],
                gw.at(),
                gw.spec()["selector"]
            ));
        }
        if plugin.ns() != ROOT_NAMESPACE && plugin.ns() != gw.ns() {
            problems.push(format!(
                "{}: a selector applies in its own namespace only (or everywhere from {ROOT_NAMESPACE}); {} runs in {}",
                plugin.at(),
                gw.at(),
                gw.ns()
            ));
        }
    }
    let modes: Vec<&str> = seq(&spec["match"]).map(|m| m["mode"].as_str().unwrap_or("UNDEFINED")).collect();
    if !gateways.is_empty() && !modes.is_empty() && !modes.iter().any(|m| matches!(*m, "CLIENT" | "CLIENT_AND_SERVER" | "UNDEFINED")) {
        problems.push(format!("{}: match modes {modes:?} exclude gateway listeners, which Istio treats as CLIENT", plugin.at()));
    }
    problems
}

/// Does a plugin's selector pick the workload of a Gateway? The Gateway's
/// `selector` stands for its workload's labels. A plugin without selector
/// picks every workload of its namespace, or of the mesh from the root
/// namespace. A plugin with targetRefs picks no Istio Gateway.
fn selects(plugin: &Doc, gateway: &Doc) -> bool {
    let spec = plugin.spec();
    if spec.get("targetRefs").is_some() || spec.get("targetRef").is_some() {
        return false;
    }
    let labels = gateway.spec()["selector"].as_mapping();
    let in_scope = plugin.ns() == ROOT_NAMESPACE || plugin.ns() == gateway.ns();
    let on_gateways = seq(&spec["match"]).next().is_none()
        || seq(&spec["match"]).any(|m| matches!(m["mode"].as_str().unwrap_or("UNDEFINED"), "CLIENT" | "CLIENT_AND_SERVER" | "UNDEFINED"));
    in_scope
        && on_gateways
        && spec["selector"]["matchLabels"].as_mapping().is_none_or(|w| w.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)))
}

/// FAIL_CLOSE (also Istio's default) on a gateway: when the module cannot be
/// fetched, istio-agent replaces the plugin with a deny-all RBAC filter
/// (MaybeConvertWasmExtensionConfig, pkg/wasm/convert.go), and the plugin is
/// in every HTTP listener of the proxy (listener_builder.go). So a plugin
/// that fails closed on a gateway must be alone there with its own hosts:
/// every host the selected gateways serve is a host of a VirtualService in
/// the plugin's file (a delegate's: its root's).
fn check_fail_closed(docs: &[Doc]) -> Vec<String> {
    let gateways: Vec<&Doc> = of_kind(docs, "Gateway").collect();
    let services: Vec<&Doc> = of_kind(docs, "VirtualService").collect();
    let mut problems = Vec::new();
    for plugin in of_kind(docs, "WasmPlugin") {
        let strategy = plugin.spec()["failStrategy"].as_str().unwrap_or("FAIL_CLOSE (default)");
        if !strategy.starts_with("FAIL_CLOSE") {
            continue;
        }
        let mut own: BTreeSet<String> = BTreeSet::new();
        for vs in services.iter().filter(|d| d.file == plugin.file) {
            own.extend(vs.hosts().iter().map(|h| h.to_ascii_lowercase()));
            for root in services.iter().filter(|r| delegates(r).contains(&vs.key())) {
                own.extend(root.hosts().iter().map(|h| h.to_ascii_lowercase()));
            }
        }
        let reached: Vec<&&Doc> = gateways.iter().filter(|g| selects(plugin, g)).collect();
        let foreign: BTreeSet<String> = reached
            .iter()
            .flat_map(|g| seq(&g.spec()["servers"]).flat_map(|s| strings(&s["hosts"])))
            .map(|h| h.rsplit('/').next().unwrap_or(&h).to_ascii_lowercase())
            .filter(|h| !own.contains(h))
            .collect();
        if !foreign.is_empty() {
            problems.push(format!(
                "{}: failStrategy {strategy} on the workload of {}, which also serves {foreign:?}: if the module cannot be fetched, a deny-all filter takes its place and those hosts get 403 too; fail open, or give the plugin a gateway of its own",
                plugin.at(),
                reached.iter().map(|g| g.at()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    problems
}

fn check_plugins(docs: &[Doc]) -> Vec<String> {
    let gateways: BTreeMap<String, &Doc> = of_kind(docs, "Gateway").map(|d| (d.key(), d)).collect();
    let services: BTreeMap<String, &Doc> = of_kind(docs, "VirtualService").map(|d| (d.key(), d)).collect();
    // A delegate takes the gateways of the roots that name it.
    let mut roots: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for vs in services.values() {
        for d in delegates(vs) {
            roots.entry(d).or_default().extend(bindings(vs));
        }
    }
    let mut problems = Vec::new();
    for plugin in of_kind(docs, "WasmPlugin") {
        let pair: Vec<&Doc> = docs.iter().filter(|d| d.file == plugin.file && d.kind() != "WasmPlugin").collect();
        problems.extend(check_header_pairing(plugin, &pair));
        let mut bound = BTreeSet::new();
        for vs in pair.iter().filter(|d| d.kind() == "VirtualService") {
            let binds = if is_delegate(vs) { roots.get(&vs.key()).cloned().unwrap_or_default() } else { bindings(vs) };
            bound.extend(binds.into_iter().filter(|g| g != "mesh"));
        }
        let on: Vec<&Doc> = bound.iter().filter_map(|g| gateways.get(g).copied()).collect();
        problems.extend(check_plugin_placement(plugin, &on));
    }
    problems
}

fn assert_none(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

// ---------------------------------------------------------------------------
// The manifests in istio/

#[test]
fn every_gateway_and_delegate_a_virtual_service_names_is_defined_in_istio() {
    let docs = load_istio();
    assert!(of_kind(&docs, "VirtualService").count() > 0, "no VirtualService in istio/");
    assert_none("references to resources istio/ does not define", check_references(&docs));
}

#[test]
fn every_gateway_a_virtual_service_binds_accepts_its_hosts() {
    assert_none("VirtualService hosts that their gateways do not serve", check_gateway_hosts(&load_istio()));
}

#[test]
fn every_mesh_virtual_service_host_is_a_service_or_service_entry_in_istio() {
    assert_none("mesh hosts that name nothing", check_mesh_hosts(&load_istio()));
}

#[test]
fn no_two_virtual_services_claim_one_host_on_one_gateway() {
    assert_none("hosts claimed twice", check_host_conflicts(&load_istio()));
}

#[test]
fn every_subset_a_route_uses_is_defined_by_a_destination_rule() {
    assert_none("subsets no DestinationRule defines", check_subsets(&load_istio()));
}

#[test]
fn every_wasmplugin_agrees_with_the_resources_it_pairs_with() {
    let docs = load_istio();
    assert!(of_kind(&docs, "WasmPlugin").count() > 0, "no WasmPlugin in istio/");
    assert_none("WasmPlugins that disagree with their pair", check_plugins(&docs));
}

#[test]
fn a_plugin_that_fails_closed_on_a_gateway_serves_only_its_own_hosts_there() {
    assert_none("fail-closed plugins that would deny other hosts", check_fail_closed(&load_istio()));
}

// ---------------------------------------------------------------------------
// Each check fails on the mistake it is for

const BROKEN: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["shop/*.example.com", "api.example.com"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: missing-gateway, namespace: shop}
spec:
  hosts: [shop.example.com]
  gateways: [istio-system/shop-gateway]
  http:
  - route: [{destination: {host: checkout}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wrong-namespace, namespace: other}
spec:
  hosts: [www.example.com]
  gateways: [istio-system/edge]
  http:
  - route: [{destination: {host: www}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wildcard-ok, namespace: shop}
spec:
  hosts: [www.example.com, nothing.example.org]
  gateways: [istio-system/edge]
  http:
  - route: [{destination: {host: www}}]
  - delegate: {name: nowhere}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: also-www, namespace: shop}
spec:
  hosts: [www.example.com]
  gateways: [istio-system/edge]
  http:
  - route: [{destination: {host: www, subset: v3}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: orphan, namespace: shop}
spec:
  http:
  - route: [{destination: {host: www}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-hosts, namespace: shop}
spec:
  hosts: [catalog, catalog.shop, cart.shop.svc.cluster.local, ext.example.net, api.partner.example.com]
  http:
  - route: [{destination: {host: catalog, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: shop}
spec:
  hosts: ["*.partner.example.com"]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: v1
kind: Service
metadata: {name: catalog, namespace: shop}
spec:
  ports: [{port: 80}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: www, namespace: shop}
spec:
  host: www.shop.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}]
"#;

fn expect(problems: &[String], parts: &[&str]) {
    assert!(
        problems.iter().any(|p| parts.iter().all(|s| p.contains(s))),
        "no problem containing {parts:?} in:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn each_broken_reference_is_named() {
    let docs = load(&[("broken.yaml", BROKEN)]);

    let refs = check_references(&docs);
    expect(&refs, &["VirtualService shop/missing-gateway", "\"istio-system/shop-gateway\"", "defined by no Gateway", "istio-system/edge"]);
    expect(&refs, &["VirtualService shop/wildcard-ok", "delegate shop/nowhere is defined by no VirtualService"]);
    expect(&refs, &["VirtualService shop/orphan", "no VirtualService in istio/ delegates to it"]);
    assert_eq!(refs.len(), 3, "{refs:#?}");

    let hosts = check_gateway_hosts(&docs);
    // `shop/*.example.com` admits VirtualServices from shop only.
    expect(&hosts, &["VirtualService other/wrong-namespace", "accept none of its hosts"]);
    expect(&hosts, &["VirtualService shop/wildcard-ok", "\"nothing.example.org\" is accepted by none"]);
    assert_eq!(hosts.len(), 2, "{hosts:#?}");

    let mesh = check_mesh_hosts(&docs);
    expect(&mesh, &["\"catalog.shop\" is neither"]);
    expect(&mesh, &["\"cart.shop.svc.cluster.local\" is the Kubernetes Service shop/cart"]);
    expect(&mesh, &["\"ext.example.net\" is neither"]);
    assert_eq!(mesh.len(), 3, "`catalog` and the ServiceEntry host pass: {mesh:#?}");

    let conflicts = check_host_conflicts(&docs);
    expect(&conflicts, &["\"www.example.com\" on istio-system/edge", "shop/wildcard-ok", "shop/also-www"]);
    assert_eq!(conflicts.len(), 1, "{conflicts:#?}");

    let subsets = check_subsets(&docs);
    expect(&subsets, &["shop/also-www", "subset \"v3\" of www.shop.svc.cluster.local", "DestinationRule shop/www"]);
    expect(&subsets, &["shop/mesh-hosts", "subset \"v1\" of catalog.shop.svc.cluster.local"]);
    assert_eq!(subsets.len(), 2, "{subsets:#?}");
}

#[test]
fn istio_resolves_names_the_way_the_checks_assume() {
    assert_eq!(resolve_gateway("edge", "shop"), "shop/edge");
    assert_eq!(resolve_gateway("./edge", "shop"), "shop/edge");
    assert_eq!(resolve_gateway("istio-system/edge", "shop"), "istio-system/edge");
    assert_eq!(resolve_gateway("edge.istio-system.svc.cluster.local", "shop"), "istio-system/edge");
    assert_eq!(resolve_gateway("mesh", "shop"), "mesh");
    assert!(hosts_intersect("*.example.com", "a.b.example.com"));
    assert!(!hosts_intersect("*.example.com", "example.com"));
    assert!(hosts_intersect("*.example.com", "*.shop.example.com"));
    assert!(hosts_intersect("SHOP.example.com", "shop.EXAMPLE.com"));
    assert!(server_accepts("./shop.example.com", "shop", "shop", "shop.example.com"));
    assert!(!server_accepts("./shop.example.com", "istio-system", "shop", "shop.example.com"));
    assert!(server_accepts("*/shop.example.com", "istio-system", "shop", "shop.example.com"));
    assert_eq!(kubernetes_service("catalog", "shop").as_deref(), Some("shop/catalog"));
    assert_eq!(kubernetes_service("catalog.shop.svc.cluster.local", "x").as_deref(), Some("shop/catalog"));
    assert_eq!(kubernetes_service("catalog.shop", "shop"), None);
    assert_eq!(kubernetes_service("catalog.shop.svc", "shop"), None);
    assert_eq!(kubernetes_service("a.b.c.svc.cluster.local", "shop"), None);
}

/// The shipped files with one value changed in the document of `kind`
/// (`edit` returns false when the document is not the one to change).
fn mutated(file: &str, kind: &str, edit: impl Fn(&mut Value) -> bool) -> Vec<Doc> {
    let mut docs = load_istio();
    let mut changed = false;
    for d in docs.iter_mut().filter(|d| d.file == file && d.kind() == kind) {
        changed |= edit(&mut d.v);
    }
    assert!(changed, "nothing to change in istio/{file} {kind}");
    docs
}

fn set(v: &mut Value, path: &[&str], value: &str) -> bool {
    let mut at = v;
    for p in path {
        match at.get_mut(*p) {
            Some(next) => at = next,
            None => return false,
        }
    }
    *at = Value::String(value.into());
    true
}

#[test]
fn a_wasmplugin_that_disagrees_with_its_pair_is_named() {
    // consistent-hash: the DestinationRule hashes another header.
    let docs = mutated("consistent-hash.yaml", "DestinationRule", |d| {
        set(d, &["spec", "trafficPolicy", "loadBalancer", "consistentHash", "httpHeaderName"], "x-user-id")
    });
    expect(&check_plugins(&docs), &["consistentHash.httpHeaderName is \"x-user-id\"", "x-session-hash"]);

    // consistent-hash: the plugin writes another header than the rule hashes.
    let docs = mutated("consistent-hash.yaml", "WasmPlugin", |d| set(d, &["spec", "pluginConfig", "hashHeader"], "x-other-hash"));
    expect(&check_plugins(&docs), &["consistentHash.httpHeaderName is \"x-session-hash\"", "\"x-other-hash\" (hashHeader)"]);

    // experiment-splitter: the treatment arm writes a value no route matches,
    // and the route matches one nobody writes.
    let docs = mutated("experiment-splitter.yaml", "WasmPlugin", |d| {
        d["spec"]["pluginConfig"]["experiments"][0]["arms"][1].as_mapping_mut().map(|m| m.insert("target".into(), "v2".into())).is_some()
    });
    let p = check_plugins(&docs);
    expect(&p, &["matches x-experiment-arm: \"treatment\"", "never writes"]);
    expect(&p, &["writes x-experiment-arm: \"v2\"", "no VirtualService route"]);

    // experiment-splitter: the plugin writes another header.
    let docs = mutated("experiment-splitter.yaml", "WasmPlugin", |d| {
        d["spec"]["pluginConfig"]["experiments"][0].as_mapping_mut().map(|m| m.insert("routingHeader".into(), "x-arm".into())).is_some()
    });
    expect(&check_plugins(&docs), &["writes x-arm", "no VirtualService in istio/experiment-splitter.yaml routes on it"]);

    // shard-router: a shard the VirtualService does not route.
    let docs = mutated("shard-router.yaml", "WasmPlugin", |d| {
        d["spec"]["pluginConfig"]["shardMap"]["shards"][2].as_mapping_mut().map(|m| m.insert("cluster".into(), "shard-d".into())).is_some()
    });
    let p = check_plugins(&docs);
    expect(&p, &["writes x-shard-cluster: \"shard-d\""]);
    expect(&p, &["matches x-shard-cluster: \"shard-c\"", "never writes"]);

    // The pipeline pairs stage by stage.
    let docs = mutated("meshpatterns.yaml", "DestinationRule", |d| {
        set(d, &["spec", "trafficPolicy", "loadBalancer", "consistentHash", "httpHeaderName"], "x-user-id")
    });
    expect(
        &check_plugins(&docs),
        &["consistentHash.httpHeaderName is \"x-user-id\"", "WasmPlugin istio-system/meshpatterns", "x-session-hash"],
    );
    let docs = mutated("meshpatterns.yaml", "VirtualService", |d| {
        d["spec"]["http"][0]["match"][0]["headers"]["x-experiment-arm"]
            .as_mapping_mut()
            .map(|m| m.insert("exact".into(), "v3".into()))
            .is_some()
    });
    let p = check_plugins(&docs);
    expect(&p, &["matches x-experiment-arm: \"v3\"", "never writes"]);
    expect(&p, &["writes x-experiment-arm: \"v2\"", "no VirtualService route"]);

    // A plugin that fails closed on the shared ingress gateway.
    let docs = mutated("rate-limiter.yaml", "WasmPlugin", |d| set(d, &["spec", "failStrategy"], "FAIL_CLOSE"));
    expect(
        &check_fail_closed(&docs),
        &["WasmPlugin istio-system/rate-limiter: failStrategy FAIL_CLOSE", "Gateway istio-system/edge", "shop.example.com"],
    );
    let docs =
        mutated("consistent-hash.yaml", "WasmPlugin", |d| d["spec"].as_mapping_mut().and_then(|m| m.remove("failStrategy")).is_some());
    expect(&check_fail_closed(&docs), &["consistent-hash: failStrategy FAIL_CLOSE (default)", "api.example.com"]);
    let docs = mutated("shard-router.yaml", "WasmPlugin", |d| set(d, &["spec", "selector", "matchLabels", "istio"], "ingressgateway"));
    expect(&check_fail_closed(&docs), &["WasmPlugin istio-system/shard-router", "partner.example.com"]);

    // shard-router: the plugin runs on another workload than the gateway.
    let docs = mutated("shard-router.yaml", "WasmPlugin", |d| set(d, &["spec", "selector", "matchLabels", "istio"], "eastwestgateway"));
    expect(&check_plugins(&docs), &["does not select the workload of", "Gateway istio-system/kv-gateway"]);
}
