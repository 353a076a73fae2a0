//! The Redis sharding ambassador (envoy/redis-sharding.yaml): Envoy's
//! redis_proxy in front of three real redis-server shards started by the test.
//! Keys written through Envoy spread over the shards (each server's DBSIZE),
//! hash tags keep related keys together, and a stopped shard is found by
//! Envoy's Redis health checker while the others keep serving.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use meshpatterns_tests::redis::RedisServer;
use meshpatterns_tests::{wait_for, Envoy, EnvoyBuilder};

const CONFIG: &str = "redis-sharding.yaml";
const CLUSTER: &str = "redis_shards";

/// A RESP reply.
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// A tiny RESP2 client over one connection.
struct Resp {
    conn: BufReader<TcpStream>,
}

impl Resp {
    fn connect(port: u16) -> Resp {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to Envoy's redis listener");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Resp { conn: BufReader::new(s) }
    }

    fn command(&mut self, args: &[&str]) -> Reply {
        self.try_command(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn try_command(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        self.conn.get_mut().write_all(&req)?;
        self.read()
    }

    fn read(&mut self) -> std::io::Result<Reply> {
        let mut line = String::new();
        if self.conn.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        let num = || rest.parse::<i64>().map_err(|_| std::io::Error::other(format!("bad RESP line {line:?}")));
        Ok(match kind {
            "+" => Reply::Simple(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Int(num()?),
            "$" if num()? < 0 => Reply::Bulk(None),
            "$" => {
                let mut b = vec![0; num()? as usize + 2];
                self.conn.read_exact(&mut b)?;
                b.truncate(b.len() - 2);
                Reply::Bulk(Some(b))
            }
            "*" if num()? < 0 => Reply::Array(None),
            "*" => Reply::Array(Some((0..num()?).map(|_| self.read()).collect::<Result<_, _>>()?)),
            _ => return Err(std::io::Error::other(format!("bad RESP line {line:?}"))),
        })
    }

    fn set(&mut self, k: &str, v: &str) {
        assert_eq!(self.command(&["SET", k, v]), Reply::Simple("OK".into()), "SET {k}");
    }

    fn get(&mut self, k: &str) -> Option<String> {
        match self.command(&["GET", k]) {
            Reply::Bulk(b) => b.map(|b| String::from_utf8(b).unwrap()),
            other => panic!("GET {k}: {other:?}"),
        }
    }
}

/// Keys stored on one server, asked directly (not through Envoy).
fn dbsize(r: &RedisServer) -> u64 {
    let line = r.command(&["DBSIZE"]).unwrap();
    line.strip_prefix(':').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("DBSIZE on {}: {line}", r.addr()))
}

fn start(n: usize) -> (Vec<RedisServer>, Envoy) {
    let shards: Vec<RedisServer> = (0..n).map(|_| RedisServer::start()).collect();
    let ports: Vec<u16> = shards.iter().map(|r| r.port).collect();
    let envoy = EnvoyBuilder::new(CONFIG).endpoint_ports("REDIS", &ports).start();
    envoy.wait_healthy(CLUSTER, n);
    (shards, envoy)
}

/// Fixed layouts for the spread: Envoy places ring points by hashing each
/// host's address, and the kernel picks new ports every run, so the test
/// gives each shard a fixed address to hash instead (`envoy.lb` endpoint
/// metadata `hash_key`): layout `L` calls shard `i` `10.L.0.(i+1):6379`.
const LAYOUTS: usize = 6;

fn fixed_layout(ports: &[u16], layout: usize) -> String {
    let items: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}, \
                 metadata: {{filter_metadata: {{envoy.lb: {{hash_key: '10.{layout}.0.{}:6379'}}}}}}}}",
                i + 1
            )
        })
        .collect();
    format!("[{}]", items.join(", "))
}

#[test]
fn keys_spread_across_the_shards_and_read_back() {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let ports: Vec<u16> = shards.iter().map(|r| r.port).collect();
    let n = 3000;
    let mean = n as f64 / 3.0;
    let (mut largest, mut smallest) = (Vec::new(), Vec::new());
    for layout in 0..LAYOUTS {
        let envoy = EnvoyBuilder::new(CONFIG).var("ENDPOINTS_REDIS", fixed_layout(&ports, layout)).start();
        envoy.wait_healthy(CLUSTER, 3);
        let mut c = Resp::connect(envoy.port("redis"));
        assert_eq!(c.command(&["PING"]), Reply::Simple("PONG".into()));
        for i in 0..n {
            c.set(&format!("key:{i}"), &format!("value-{i}"));
        }
        for i in 0..n {
            assert_eq!(c.get(&format!("key:{i}")).as_deref(), Some(format!("value-{i}").as_str()));
        }
        let sizes: Vec<u64> = shards.iter().map(dbsize).collect();
        eprintln!("layout {layout}: {n} keys through redis_proxy over 3 redis-server shards (ring_hash): DBSIZE {sizes:?}");
        assert_eq!(sizes.iter().sum::<u64>(), n, "every key stored exactly once");
        largest.push(*sizes.iter().max().unwrap() as f64 / mean);
        smallest.push(*sizes.iter().min().unwrap() as f64 / mean);
        if layout + 1 < LAYOUTS {
            for r in &shards {
                assert_eq!(r.command(&["FLUSHALL"]).unwrap(), "+OK");
            }
        }
    }
    largest.sort_by(f64::total_cmp);
    smallest.sort_by(f64::total_cmp);
    let mmm = |v: &[f64]| format!("min {:.3} / median {:.3} / max {:.3}", v[0], v[v.len() / 2], v[v.len() - 1]);
    eprintln!("over {LAYOUTS} fixed layouts: largest shard {} of its fair share; smallest {}", mmm(&largest), mmm(&smallest));
    // The layouts are fixed, so every run measures the same split (Envoy
    // 1.40: see filters/shard-router/README.md); the bound leaves room for
    // another Envoy version's ring: every shard within 0.9–1.1 of its share.
    assert!(largest[LAYOUTS - 1] <= 1.1 && smallest[0] >= 0.9, "largest {largest:?}, smallest {smallest:?}");
    let envoy = EnvoyBuilder::new(CONFIG).var("ENDPOINTS_REDIS", fixed_layout(&ports, LAYOUTS - 1)).start();
    envoy.wait_healthy(CLUSTER, 3);
    let mut c = Resp::connect(envoy.port("redis"));

    // Hash tags: keys sharing a {tag} live on the same shard.
    for u in 0..20 {
        for f in ["name", "cart", "visits"] {
            c.set(&format!("{{user:{u}}}:{f}"), "x");
        }
        let holders: Vec<usize> = (0..3)
            .filter(|&i| {
                let exists = shards[i].command(&["EXISTS", &format!("{{user:{u}}}:name")]).unwrap();
                exists == ":1"
            })
            .collect();
        assert_eq!(holders.len(), 1, "user {u}");
        for f in ["cart", "visits"] {
            assert_eq!(shards[holders[0]].command(&["EXISTS", &format!("{{user:{u}}}:{f}")]).unwrap(), ":1", "user {u} {f}");
        }
    }
}

#[test]
fn a_stopped_shard_is_marked_unhealthy_and_the_others_keep_serving() {
    let (mut shards, envoy) = start(3);
    let mut c = Resp::connect(envoy.port("redis"));
    for i in 0..300 {
        c.set(&format!("k{i}"), "before");
    }
    // The keys the shard about to stop holds, asked of it directly.
    let on_dead: Vec<usize> = (0..300).filter(|i| shards[1].command(&["EXISTS", &format!("k{i}")]).unwrap() == ":1").collect();
    assert!(!on_dead.is_empty(), "shard 1 holds some of the 300 keys");
    let dead = shards[1].addr();
    shards[1].stop();
    envoy.wait_healthy(CLUSTER, 2);
    let hosts = envoy.hosts(CLUSTER);
    assert_eq!(hosts.iter().find(|(a, _)| *a == dead), Some(&(dead.clone(), false)), "{hosts:?}");
    let clusters = envoy.admin("/clusters");
    assert!(clusters.contains(&format!("{CLUSTER}::{dead}::health_flags::/failed_active_hc")), "{clusters}");
    assert!(envoy.stat(&format!("cluster.{CLUSTER}.health_check.failure")) > 0);

    // Every key, including the dead shard's, can be written and read again:
    // the ring sends the dead shard's keys to the next healthy shard. Write
    // all 300 in rounds until a round has no failure (a command to the dead
    // shard fails until every worker has the new host set), counting every
    // failed SET: only keys the dead shard held may fail.
    let port = envoy.port("redis");
    let mut failed: Vec<(usize, String)> = Vec::new();
    let rounds = wait_for("a round of 300 SETs with no failure", Duration::from_secs(20), {
        let mut rounds = 0;
        let failed = &mut failed;
        move || {
            rounds += 1;
            let mut c = Resp::connect(port);
            let before = failed.len();
            for i in 0..300 {
                match c.try_command(&["SET", &format!("k{i}"), "after"]) {
                    Ok(Reply::Simple(_)) => {}
                    Ok(other) => failed.push((i, format!("{other:?}"))),
                    Err(e) => {
                        failed.push((i, e.to_string()));
                        c = Resp::connect(port);
                    }
                }
            }
            (failed.len() == before).then_some(rounds)
        }
    });
    eprintln!(
        "after the stop: {} failed SETs in {rounds} rounds of 300 (shard 1 held {} of the keys): {:?}",
        failed.len(),
        on_dead.len(),
        &failed[..failed.len().min(5)]
    );
    let wrong: Vec<&(usize, String)> = failed.iter().filter(|(i, _)| !on_dead.contains(i)).collect();
    assert!(wrong.is_empty(), "{} SETs of keys on the healthy shards failed: {:?}", wrong.len(), &wrong[..wrong.len().min(5)]);
    let mut c = Resp::connect(port);
    for i in 0..300 {
        assert_eq!(c.get(&format!("k{i}")).as_deref(), Some("after"), "k{i}");
    }
    assert!(dbsize(&shards[0]) + dbsize(&shards[2]) >= 300);

    // It comes back (empty: no persistence) and is healthy again.
    shards[1].restart();
    envoy.wait_healthy(CLUSTER, 3);
}
