//! `make demo`: a local mesh on loopback, one Envoy per pattern in front of
//! real upstream replicas, with a self-check and the commands to try.
//!
//! Each pattern adds a [`Section`]: it starts what it needs, checks that it
//! works, and prints what a user can try by hand. The processes stop when the
//! demo returns (Ctrl-C also stops Envoy, which is in the same process group).

use std::time::Duration;

use crate::{Client, Envoy, EnvoyBuilder, Upstream};

/// One running pattern in the demo.
pub struct Section {
    pub title: &'static str,
    /// Lines to print: what runs and the commands to try.
    pub lines: Vec<String>,
    /// Keep processes alive while the section is shown.
    _envoy: Envoy,
    _upstreams: Vec<Upstream>,
}

/// Session-tracked service: consistent-hash in front of three replicas.
pub fn consistent_hash() -> Result<Section, String> {
    let ups = Upstream::start_many("replica", 3);
    let envoy = EnvoyBuilder::new("consistent-hash.yaml").endpoints("REPLICAS", &ups).try_start()?;
    envoy.wait_healthy("replicas", 3);
    let port = envoy.port("ingress");
    let mut c = Client::new(port);
    let mut lines = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let replicas: std::collections::BTreeSet<String> =
            (0..10).map(|_| c.get("/", &[("x-user-id", user)]).replica().to_string()).collect();
        if replicas.len() != 1 {
            return Err(format!("user {user} was served by {replicas:?}"));
        }
        lines.push(format!("self-check: x-user-id {user:<6} -> {} (10 of 10 requests)", replicas.iter().next().unwrap_or(&String::new())));
    }
    let first = c.get("/", &[]);
    let cookie = first.header("set-cookie").ok_or("no session cookie issued")?.split(';').next().unwrap_or("").to_string();
    lines.push(format!("self-check: no key -> issued {cookie}, served by {}", first.replica()));
    lines.push(String::new());
    lines.push("try:".into());
    lines.push(format!("  curl -s -H 'x-user-id: alice' http://127.0.0.1:{port}/ | head -c 300; echo   # always the same replica"));
    lines.push(format!("  for u in a b c d e f; do curl -s -o /dev/null -D - -H \"x-user-id: $u\" http://127.0.0.1:{port}/ | grep -i x-replica; done"));
    lines.push(format!("  curl -si http://127.0.0.1:{port}/ | grep -i -E 'set-cookie|x-replica'   # a new session cookie"));
    lines.push(format!("  curl -s -H 'x-user-id: alice' -H 'x-session-hash: forged' http://127.0.0.1:{port}/ | grep -o '\"x-session-hash\":\"[^\"]*'   # overwritten"));
    lines.push(format!("  curl -s http://127.0.0.1:{}/stats | grep consistent_hash", envoy.admin_port));
    Ok(Section { title: "Session-tracked service (consistent-hash filter, Envoy maglev)", lines, _envoy: envoy, _upstreams: ups })
}

/// A function that starts one section.
pub type SectionFn = fn() -> Result<Section, String>;

/// Start every section. Errors name the section that failed.
pub fn start_all() -> Result<Vec<Section>, String> {
    let builders: Vec<(&str, SectionFn)> = vec![
        ("consistent-hash", consistent_hash),
        // one line per pattern: ("name", function),
    ];
    builders.into_iter().map(|(name, f)| f().map_err(|e| format!("{name}: {e}"))).collect()
}

/// Print the sections and keep them running for `hold` (or until Ctrl-C).
pub fn run(hold: Option<Duration>) -> Result<(), String> {
    let sections = start_all()?;
    for s in &sections {
        println!("\n== {} ==", s.title);
        for l in &s.lines {
            println!("{l}");
        }
    }
    println!("\nEverything is running. Press Ctrl-C to stop.");
    // Ctrl-C (SIGINT) or SIGTERM ends the wait; returning drops every section,
    // which stops its Envoy and upstream servers.
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
    let _ = match hold {
        Some(d) => rx.recv_timeout(d).ok(),
        None => rx.recv().ok(),
    };
    println!("stopping ...");
    drop(sections);
    println!("stopped.");
    Ok(())
}
