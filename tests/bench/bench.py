#!/usr/bin/env python3
"""meshpatterns benchmark harness (`make bench`); Python 3 standard library only.

Measures what each filter adds to a request through a real Envoy, against the
no-filter baseline, the empty proxy-wasm filter (noop, the floor every wasm
filter pays) and Envoy's native equivalent, all in the same run:

- the Envoy under test runs with --concurrency 1, pinned to CPU 0;
- wrk (one thread, keep-alive connections) and the upstream (a second Envoy
  answering with direct_response, envoy/bench-upstream.yaml) share CPU 1;
- every scenario runs once per round, rounds alternate the scenario order,
  and the report gives medians over the rounds;
- Envoy's CPU time (utime + stime from /proc/<pid>/stat) over the measured
  wrk run, divided by the requests wrk completed, is the cost per request.

Scenarios are Envoy config templates envoy/bench-<scenario>.yaml, rendered
with the same {{...}} placeholders as the other configs (envoy/README.md).
To benchmark a new filter, add its scenario(s) to SCENARIOS and a group to
GROUPS (see tests/bench/README.md). BENCHMARKS.md is overwritten each run.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import http.client
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
LUA = os.path.join(REPO, "tests", "bench", "session.lua")
UPSTREAM_CONFIG = "bench-upstream.yaml"
REPLICAS = 3
TARGET_RATIO = 1.2  # a filter may add at most this many times what noop adds
TARGET_WASM_BYTES = 200 * 1024  # 200 KB after wasm-opt

# Every scenario: its config (envoy/bench-<name>.yaml), its kind, the request
# header wrk puts the varying session key in, the .wasm it loads (for the
# size table and the pre-flight check), whether the same key must reach the
# same replica (checked before measuring), and one line for the report.
#
# kind: "baseline" (no filter, the zero), "floor" (noop), "filter" (a
# meshpatterns filter: gets the ratio against the floor and the target),
# "native" (Envoy's own way to do the same job, no wasm).
#
# Optional keys: "keys" (how many distinct key values wrk cycles through),
# "path" (the request path, default "/"), "check" (the pre-check: default
# "replicas", answers spread over the replicas; "origin" and "cached" for the
# cache group, see check_scenario), "speedup_over" (the report gives this
# scenario's speedup over the one named), "origin_bound" (a slow origin, not
# Envoy, limits the rate: no "Envoy not busy" warning for it).
SCENARIOS = {
    "baseline": {
        "kind": "baseline",
        "header": "x-user-id",
        "wasm": [],
        "sticky": False,
        "about": "no filter, round robin",
    },
    "noop": {
        "kind": "floor",
        "header": "x-user-id",
        "wasm": ["noop"],
        "sticky": False,
        "about": "empty proxy-wasm filter, round robin",
    },
    "consistent-hash": {
        "kind": "filter",
        "header": "x-user-id",
        "wasm": ["consistent_hash"],
        "sticky": True,
        "about": "filter hashes x-user-id into x-session-hash, Maglev",
    },
    "native-maglev": {
        "kind": "native",
        "header": "x-session-hash",
        "wasm": [],
        "sticky": True,
        "about": "client sends x-session-hash, Maglev (no wasm)",
    },
    "shard-router": {
        "kind": "filter",
        "header": "x-user-id",
        "wasm": ["shard_router"],
        "sticky": False,  # each shard cluster holds all three replicas, round robin
        "about": "filter places x-user-id on 1 of 3 shards (ring), cluster_header routing",
    },
    "native-cluster-header": {
        "kind": "native",
        "header": "x-shard-cluster",
        "keys": 3,  # the client names one of the 3 shard clusters itself
        "wasm": [],
        "sticky": False,
        "about": "client names the shard cluster in x-shard-cluster, cluster_header routing (no wasm)",
    },
    "metrics-adapter": {
        "kind": "filter",
        "header": "x-user-id",
        "wasm": ["metrics_adapter"],
        "sticky": False,
        "about": "RED metrics per request: 5 labels incl. x-user-id capped at 10 values, duration histogram",
    },
    "rate-limiter": {
        "kind": "filter",
        "header": "x-user-id",
        "wasm": ["rate_limiter"],
        "sticky": False,
        "about": "token bucket per x-user-id in shared data (CAS), budget never used up, X-RateLimit-* headers",
    },
    "native-local-ratelimit": {
        "kind": "native",
        "header": "x-user-id",
        "wasm": [],
        "sticky": False,
        "about": "Envoy local_ratelimit, one bucket per proxy, budget never used up, X-RateLimit-* headers (no wasm)",
    },
    "experiment-splitter": {
        "kind": "filter",
        "header": "x-user-id",
        "wasm": ["experiment_splitter"],
        "sticky": False,  # sticky per arm; each arm cluster holds all three replicas, round robin
        "about": "filter buckets x-user-id into control 90 % / treatment 10 %, cluster_header routing, exposure header",
    },
    "native-weighted-clusters": {
        "kind": "native",
        "header": "x-user-id",
        "wasm": [],
        "sticky": False,
        "about": "Envoy weighted_clusters 90 / 10, drawn at random per request: not sticky (no wasm)",
    },
    # The caching layer: Envoy's own cache filter, so no wasm and no "× noop".
    # Both request /cacheable, which the upstream answers after 2 ms with
    # cache-control: public, max-age=3600 (envoy/bench-upstream.yaml).
    "cache-off": {
        "kind": "native",
        "header": "x-user-id",
        "path": "/cacheable",
        "check": "origin",  # every answer from the origin: cache-control, no age
        "origin_bound": True,  # 16 connections / 2 ms caps RPS: Envoy is not saturated
        "wasm": [],
        "sticky": False,
        "about": "no cache: every request to the slow origin (2 ms, cache-control: public, max-age=3600)",
    },
    "cache": {
        "kind": "native",
        "header": "x-user-id",
        "path": "/cacheable",
        "check": "cached",  # 200s, repeats answered from the cache (age header)
        "speedup_over": "cache-off",
        "wasm": [],
        "sticky": False,
        "about": "Envoy HTTP cache filter (in-memory) in front of the same origin: repeats served by the proxy",
    },
}

# One group per filter: the filter's scenario and its native comparison.
# baseline and noop join every run, whatever groups are chosen.
GROUPS = {
    "consistent-hash": ["consistent-hash", "native-maglev"],
    "shard-router": ["shard-router", "native-cluster-header"],
    "metrics-adapter": ["metrics-adapter"],
    "rate-limiter": ["rate-limiter", "native-local-ratelimit"],
    "experiment-splitter": ["experiment-splitter", "native-weighted-clusters"],
    "cache": ["cache-off", "cache"],
}
ALWAYS = ["baseline", "noop"]


class BenchError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- templates


def endpoint_list(ports):
    items = ["{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %d}}}}" % p for p in ports]
    return "[" + ", ".join(items) + "]"


def render(name, template, wasm_dir, endpoints):
    """Fill {{...}} placeholders as tests/src/envoy.rs does: *_PORT -> 0,
    WASM_DIR, ENDPOINTS_<CLUSTER>, ACCESS_LOG; anything else is an error."""
    out = []
    rest = template
    while "{{" in rest:
        start = rest.index("{{")
        out.append(rest[:start])
        after = rest[start + 2:]
        if "}}" not in after:
            raise BenchError("%s: unterminated {{" % name)
        end = after.index("}}")
        key = after[:end].strip()
        if key == "WASM_DIR":
            value = wasm_dir
        elif key == "ACCESS_LOG":
            value = "/dev/stdout"
        elif key.startswith("ENDPOINTS_"):
            value = endpoint_list(endpoints)
        elif key.endswith("_PORT"):
            value = "0"
        else:
            raise BenchError("%s: placeholder {{%s}} has no value" % (name, key))
        out.append(value)
        rest = after[end + 2:]
    out.append(rest)
    return "".join(out)


# ---------------------------------------------------------------- processes


NICE = 0  # set from --nice


def pinned(cpu):
    """The command prefix that runs a process on `cpu` (and at priority NICE):
    taskset and nice both exec, so the PID is the process's own."""
    return ["taskset", "-c", str(cpu)] + (["nice", "-n", str(NICE)] if NICE else [])


class Processes:
    """Every process the bench starts, so that all of them are stopped (by
    PID) whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, argv, **kw):
        # Each process in its own session: with the kernel's autogroup
        # scheduling (sched_autogroup_enabled), niceness only counts inside a
        # session's group, so the group itself gets NICE too. Stopping still
        # goes by PID (stop_all), Ctrl-C included.
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.procs.append(p)
        if NICE:
            try:
                with open("/proc/%d/autogroup" % p.pid, "w") as f:
                    f.write(str(NICE))
            except OSError:
                pass  # no autogroups, or not allowed: plain nice still applies
        return p

    def stop(self, p, grace=5.0):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            try:
                self.stop(p, grace=2.0)
            except OSError:
                pass


def http_get(port, path, headers=None, timeout=5.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        c.close()


def http_get_headers(port, path, headers=None, timeout=5.0):
    """Like http_get, plus the response headers (names lowercased)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode("utf-8", "replace")
    finally:
        c.close()


class Envoy:
    def __init__(self, procs, envoy_bin, cpu, name, config_text, workdir):
        self.procs = procs
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="%s-" % name, dir=workdir)
        self.cfg = os.path.join(self.dir, "envoy.yaml")
        with open(self.cfg, "w") as f:
            f.write(config_text)
        self.admin_file = os.path.join(self.dir, "admin.addr")
        self.log_file = os.path.join(self.dir, "envoy.log")
        argv = pinned(cpu) + [envoy_bin, "-c", self.cfg, "--disable-hot-restart", "--concurrency", "1",
                              "-l", "warning", "--admin-address-path", self.admin_file, "--log-path", self.log_file]
        self.out = open(os.path.join(self.dir, "stdout.log"), "w")
        # taskset, nice and the wheel's launcher all exec, so this PID is Envoy's.
        self.proc = procs.start(argv, stdout=self.out, stderr=subprocess.STDOUT)
        self.admin_port = 0
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self):
        return self.proc.pid

    def log_tail(self, n=40):
        text = ""
        for f in (self.log_file, os.path.join(self.dir, "stdout.log")):
            try:
                with open(f) as fh:
                    text += fh.read()
            except OSError:
                pass
        return "\n".join(text.splitlines()[-n:])

    def _wait_ready(self):
        deadline = time.monotonic() + 30
        while True:
            code = self.proc.poll()
            if code is not None:
                raise BenchError("Envoy (%s) exited with %s:\n%s" % (self.name, code, self.log_tail()))
            if not self.admin_port:
                try:
                    with open(self.admin_file) as f:
                        self.admin_port = int(f.read().strip().rsplit(":", 1)[1])
                except (OSError, ValueError, IndexError):
                    pass
            if self.admin_port:
                try:
                    if http_get(self.admin_port, "/ready", timeout=2)[0] == 200:
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise BenchError("Envoy (%s) not ready after 30 s:\n%s" % (self.name, self.log_tail()))
            time.sleep(0.05)

    def admin(self, path):
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.admin_port, path), timeout=5) as r:
            return r.read().decode()

    def ports(self):
        """Listener name -> bound port, from the admin API."""
        data = json.loads(self.admin("/listeners?format=json"))
        return {ls["name"]: ls["local_address"]["socket_address"]["port_value"] for ls in data.get("listener_statuses", [])}

    def cpu_ticks(self):
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # after "pid (comm)": state is fields[0]; utime and stime are stat fields 14 and 15
        return int(fields[11]) + int(fields[12])

    def stop(self):
        self.procs.stop(self.proc)
        self.out.close()


# ---------------------------------------------------------------- wrk


def run_wrk(procs, args, port, header, duration, cpu, keys=None, path="/"):
    argv = pinned(cpu) + ["wrk", "-t", "1", "-c", str(args.connections), "-d", "%gs" % duration,
                          "--latency", "-s", LUA, "http://127.0.0.1:%d%s" % (port, path), "--", header, str(keys or args.keys)]
    p = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        procs.stop(p)
        raise BenchError("wrk did not finish within %g s" % (duration + 60))
    procs.procs.remove(p)
    if p.returncode != 0:
        raise BenchError("wrk failed (%d):\n%s" % (p.returncode, out))
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise BenchError("wrk printed no BENCH_RESULT line:\n%s" % out)


def check_cache_scenario(name, scenario, port):
    """The cache group's pre-check, on the scenario's path: every answer is a
    200 from a replica; "origin": each carries the origin's cache-control and
    none an age header (nothing in front of the origin answers); "cached":
    after the first, the answers carry an age header (the cache answered)."""
    path = scenario.get("path", "/")
    hits = 0
    for k in range(12):
        status, headers, body = http_get_headers(port, path, {scenario["header"]: "%016x" % k})
        if status != 200 or not body.startswith("replica-"):
            raise BenchError("%s: pre-check of %s got %d %r (expected 200 from a replica)" % (name, path, status, body[:200]))
        if "public" not in headers.get("cache-control", ""):
            raise BenchError("%s: %s answered without cache-control: public (headers %s); "
                             "is envoy/bench-upstream.yaml's /cacheable route there?" % (name, path, headers))
        if "age" in headers:
            hits += 1
    if scenario["check"] == "origin" and hits:
        raise BenchError("%s: %d of 12 answers carried an age header; expected all from the origin" % (name, hits))
    if scenario["check"] == "cached" and hits < 6:
        raise BenchError("%s: only %d of 12 answers carried an age header; expected the repeats from the cache" % (name, hits))


def check_scenario(name, scenario, port):
    """Before measuring: requests succeed, reach the replicas, and (for sticky
    scenarios) the same key keeps reaching the same replica. The cache group
    has checks of its own (check_cache_scenario)."""
    if scenario.get("check", "replicas") != "replicas":
        return check_cache_scenario(name, scenario, port)
    seen = set()
    for k in range(12):
        key = "%016x" % (k * 7919 % scenario.get("keys", 1 << 64))
        answers = set()
        for _ in range(3):
            status, body = http_get(port, "/", {scenario["header"]: key})
            if status != 200 or not body.startswith("replica-"):
                raise BenchError("%s: pre-check got %d %r (expected 200 from a replica)" % (name, status, body[:200]))
            answers.add(body.strip())
        seen |= answers
        if scenario["sticky"] and len(answers) != 1:
            raise BenchError("%s: key %s reached %s; the scenario should be sticky" % (name, key, sorted(answers)))
    if len(seen) < 2:
        raise BenchError("%s: 36 requests all reached %s; expected the load spread over %d replicas" % (name, seen, REPLICAS))


# ---------------------------------------------------------------- measuring


def measure(procs, args, name, scenario, upstream_ports, workdir, cpus, first):
    path = os.path.join(REPO, "envoy", "bench-%s.yaml" % name)
    with open(path) as f:
        text = render("envoy/bench-%s.yaml" % name, f.read(), args.wasm_dir, upstream_ports)
    envoy = Envoy(procs, args.envoy, cpus[0], name, text, workdir)
    try:
        ports = envoy.ports()
        if "ingress" not in ports:
            raise BenchError("envoy/bench-%s.yaml has no listener named ingress (listeners: %s)" % (name, sorted(ports)))
        port = ports["ingress"]
        if first:
            check_scenario(name, scenario, port)
        if args.warmup > 0:
            run_wrk(procs, args, port, scenario["header"], args.warmup, cpus[1], scenario.get("keys"),
                    scenario.get("path", "/"))
        tck = os.sysconf("SC_CLK_TCK")
        t0 = envoy.cpu_ticks()
        w0 = time.monotonic()
        res = run_wrk(procs, args, port, scenario["header"], args.duration, cpus[1], scenario.get("keys"),
                      scenario.get("path", "/"))
        wall = time.monotonic() - w0
        t1 = envoy.cpu_ticks()
    finally:
        envoy.stop()
    shutil.rmtree(envoy.dir, ignore_errors=True)  # kept (under the run's directory) when the run failed
    requests = res["requests"]
    if requests <= 0:
        raise BenchError("%s: wrk completed no requests" % name)
    cpu_s = (t1 - t0) / tck
    errors = sum(res["errors"].values())
    return {
        "scenario": name,
        "rps": requests / (res["duration_us"] / 1e6),
        "p50_us": res["p50_us"],
        "p99_us": res["p99_us"],
        "cpu_us": cpu_s * 1e6 / requests,
        "busy": cpu_s / wall,
        "requests": requests,
        "errors": errors,
    }


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def summarise(names, runs):
    out = {}
    for n in names:
        rs = [r for r in runs if r["scenario"] == n]
        out[n] = {
            "rps": median(rs, "rps"),
            "p50_us": median(rs, "p50_us"),
            "p99_us": median(rs, "p99_us"),
            "cpu_us": median(rs, "cpu_us"),
            "cpu_min": min(r["cpu_us"] for r in rs),
            "cpu_max": max(r["cpu_us"] for r in rs),
            "busy": median(rs, "busy"),
            "errors": sum(r["errors"] for r in rs),
        }
    base = out["baseline"]["cpu_us"]
    floor = out["noop"]["cpu_us"] - base
    for n in names:
        s = out[n]
        s["added_us"] = s["cpu_us"] - base
        s["ratio"] = s["added_us"] / floor if SCENARIOS[n]["kind"] == "filter" and floor > 0 else None
    return out, floor


# ---------------------------------------------------------------- report


def fmt_lat(us):
    return "%.0f µs" % us if us < 1000 else "%.2f ms" % (us / 1000)


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model


def envoy_version(envoy_bin):
    try:
        out = subprocess.run([envoy_bin, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError("cannot run %s --version (%s); run `make envoy` or pass --envoy" % (envoy_bin, e))
    line = next((ln for ln in out.splitlines() if "version" in ln), out.strip())
    return line.split("version:", 1)[-1].strip()


def wasm_sizes(args):
    rows = []
    # the modules `make build` optimised (cargo's directory may hold others)
    listed = args.wasm_dir if os.path.isdir(args.wasm_dir) else args.cargo_wasm_dir
    names = sorted(f[:-5] for f in os.listdir(listed) if f.endswith(".wasm")) if os.path.isdir(listed) else []
    for n in names:
        sizes = []
        for d in (args.cargo_wasm_dir, args.wasm_dir):
            p = os.path.join(d, n + ".wasm")
            sizes.append(os.path.getsize(p) if os.path.exists(p) else None)
        rows.append((n, sizes[0], sizes[1]))
    return rows


def bytes_cell(n):
    return "—" if n is None else "{:,} ({:.1f} KB)".format(n, n / 1024)


def report(args, groups, names, runs, summary, floor, info):
    L = []
    L.append("# Benchmarks")
    L.append("")
    L.append("Written by `make bench` (tests/bench/bench.py, described in tests/bench/README.md); "
             "every run overwrites this file.")
    L.append("")
    L.append("- Date: %s" % info["date"])
    L.append("- Command: %s" % info["command"])
    L.append("- Machine: %s, %d CPUs online (%s, kernel %s); load average %.2f at the start" %
             (info["cpu"], info["ncpu"], platform.machine(), platform.release(), info["load"]))
    L.append("- Envoy: %s" % info["envoy"])
    L.append("- Load: wrk, 1 thread, %d keep-alive connections, %g s per run after a %g s warm-up, %d distinct session keys; "
             "%d rounds, the scenario order rotating each round; medians over the rounds" %
             (args.connections, args.duration, args.warmup, args.keys, args.rounds))
    L.append("- Placement: Envoy under test `--concurrency 1` on CPU %d; wrk and the upstream (one Envoy answering "
             "`direct_response` as %d replicas, envoy/bench-upstream.yaml) on CPU %d; all three at nice %d" %
             (info["cpus"][0], REPLICAS, info["cpus"][1], NICE))
    L.append("")
    L.append("## How to read")
    L.append("")
    L.append("*CPU µs/req* is the Envoy under test's CPU time (user + system, all threads, from `/proc/<pid>/stat`) over "
             "the measured run, divided by the requests wrk completed; it is the figure to compare, because it does not "
             "depend on how fast the client side is. *added* is that figure minus the baseline's (no filter). For a "
             "filter, *× noop* is its added µs divided by noop's added µs (the empty proxy-wasm filter, the cost of "
             "entering wasm at all); the target is at most %.1f×. *native* rows show what Envoy's built-in way of "
             "doing the same job costs. RPS, p50 and p99 are wrk's; *Envoy busy* near 100 %% means the Envoy under "
             "test was the bottleneck. The spread column is the lowest and highest CPU µs/req over the rounds: when "
             "it is wider than the differences between rows, the machine was too noisy for them to mean much." % TARGET_RATIO)
    L.append("")
    if info["warnings"]:
        L.append("**Warnings:** " + " ".join(info["warnings"]))
        L.append("")
    for g in groups:
        rows = ALWAYS + GROUPS[g]
        L.append("## %s" % g)
        L.append("")
        L.append("| scenario | what | RPS | p50 | p99 | Envoy busy | CPU µs/req | spread | added µs | × noop |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in rows:
            s = summary[n]
            kind = SCENARIOS[n]["kind"]
            added = "—" if kind == "baseline" else "%+.1f" % s["added_us"]
            if kind == "filter":
                ratio = "n/a" if s["ratio"] is None else "**%.2f×**" % s["ratio"]
            elif kind == "floor":
                ratio = "1.00×" if floor > 0 else "n/a"
            else:
                ratio = "—"
            err = " (%d errors)" % s["errors"] if s["errors"] else ""
            L.append("| %s | %s | %s%s | %s | %s | %.0f %% | %.1f | %.1f–%.1f | %s | %s |" % (
                n, SCENARIOS[n]["about"], "{:,.0f}".format(s["rps"]), err, fmt_lat(s["p50_us"]), fmt_lat(s["p99_us"]),
                100 * s["busy"], s["cpu_us"], s["cpu_min"], s["cpu_max"], added, ratio))
        L.append("")
        for n in GROUPS[g]:
            other = SCENARIOS[n].get("speedup_over")
            if other:
                s, o = summary[n], summary[other]
                L.append("Speedup (%s over %s, medians): %.1f× the RPS (%s against %s), p50 %s against %s (%.1f× lower), "
                         "%.1f CPU µs/req against %.1f (%.2f×). %s is limited by its slow origin, not by Envoy (see "
                         "Envoy busy), so its CPU µs/req includes idle overhead." % (
                             n, other, s["rps"] / o["rps"], "{:,.0f}".format(s["rps"]), "{:,.0f}".format(o["rps"]),
                             fmt_lat(s["p50_us"]), fmt_lat(o["p50_us"]), o["p50_us"] / max(s["p50_us"], 1),
                             s["cpu_us"], o["cpu_us"], s["cpu_us"] / o["cpu_us"], other))
                L.append("")
            if SCENARIOS[n]["kind"] != "filter":
                continue
            s = summary[n]
            if s["ratio"] is None:
                L.append("Target (%s adds ≤ %.1f× noop's added µs): **not measurable** in this run, noop added %+.1f µs "
                         "(noise exceeded the floor); rerun on a quieter machine." % (n, TARGET_RATIO, floor))
            else:
                verdict = "met" if s["ratio"] <= TARGET_RATIO else "not met"
                L.append("Target (%s adds ≤ %.1f× noop's added µs): **%s**: %.1f µs against noop's %.1f µs = %.2f×." %
                         (n, TARGET_RATIO, verdict, s["added_us"], floor, s["ratio"]))
            # Interference from other work only adds CPU time, so the fastest
            # round of each scenario is a second, less noise-prone estimate.
            base_min = summary["baseline"]["cpu_min"]
            floor_min = summary["noop"]["cpu_min"] - base_min
            added_min = s["cpu_min"] - base_min
            L.append("From each scenario's fastest round instead of the medians: %s adds %.1f µs, noop %.1f µs%s." % (
                n, added_min, floor_min, " = %.2f×" % (added_min / floor_min) if floor_min > 0 else " (ratio n/a)"))
            L.append("")
    L.append("## Module sizes")
    L.append("")
    L.append("`make build` output: cargo's release build (target/wasm32-wasip1/release) and the same module after "
             "`wasm-opt -Oz --strip-debug --strip-producers` (target/meshpatterns, what Envoy loads). Target: ≤ 200 KB "
             "(204,800 bytes) after optimisation.")
    L.append("")
    L.append("| module | cargo | wasm-opt | ≤ 200 KB |")
    L.append("|---|---:|---:|---|")
    for n, cargo, opt in info["sizes"]:
        ok = "—" if opt is None else ("yes" if opt <= TARGET_WASM_BYTES else "**no**")
        L.append("| %s.wasm | %s | %s | %s |" % (n, bytes_cell(cargo), bytes_cell(opt), ok))
    L.append("")
    L.append("## Every run")
    L.append("")
    L.append("| round | scenario | RPS | p50 | p99 | Envoy busy | CPU µs/req | requests | errors |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        L.append("| %d | %s | %s | %s | %s | %.0f %% | %.1f | %s | %d |" % (
            r["round"], r["scenario"], "{:,.0f}".format(r["rps"]), fmt_lat(r["p50_us"]), fmt_lat(r["p99_us"]),
            100 * r["busy"], r["cpu_us"], "{:,}".format(r["requests"]), r["errors"]))
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark the meshpatterns filters through a real Envoy (writes BENCHMARKS.md).")
    p.add_argument("--envoy", default=os.environ.get("ENVOY") or os.path.join(REPO, ".venv", "bin", "envoy"),
                   help="Envoy binary (default: $ENVOY, else .venv/bin/envoy)")
    p.add_argument("--wasm-dir", default=os.environ.get("WASM_DIR") or os.path.join(REPO, "target", "meshpatterns"),
                   help="directory of the .wasm files Envoy loads (default: $WASM_DIR, else target/meshpatterns)")
    p.add_argument("--cargo-wasm-dir", default=os.path.join(REPO, "target", "wasm32-wasip1", "release"),
                   help="cargo's unoptimised .wasm output, for the size table")
    p.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"), help="report file (default: BENCHMARKS.md)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all scenarios, at least 3 (default 3)")
    p.add_argument("--duration", type=float, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load before each run (default 2)")
    p.add_argument("--nice", type=int, default=-10 if os.geteuid() == 0 else 0,
                   help="niceness of Envoy, wrk and the upstream, so other work on the machine disturbs them less "
                        "(default -10 as root, else 0)")
    p.add_argument("--connections", type=int, default=16, help="wrk keep-alive connections (default 16)")
    p.add_argument("--keys", type=int, default=10000, help="distinct session keys wrk cycles through (default 10000)")
    p.add_argument("--only", action="append", metavar="GROUP",
                   help="run only this group (repeatable); groups: %s" % ", ".join(GROUPS))
    p.add_argument("--list", action="store_true", help="list groups and scenarios and exit")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3 (medians over fewer rounds mean little)")
    if args.duration <= 0 or args.connections < 1 or args.keys < 1:
        p.error("--duration, --connections and --keys must be positive")
    args.envoy = os.path.abspath(args.envoy) if os.sep in args.envoy else args.envoy
    args.wasm_dir = os.path.abspath(args.wasm_dir)
    args.cargo_wasm_dir = os.path.abspath(args.cargo_wasm_dir)
    return args


def preflight(args, names):
    for tool, pkg in (("wrk", "wrk"), ("taskset", "util-linux")):
        if shutil.which(tool) is None:
            raise BenchError("%s not found: install it (apt-get install %s; `make apt-tools` installs wrk)" % (tool, pkg))
    if shutil.which(args.envoy) is None and not os.access(args.envoy, os.X_OK):
        raise BenchError("Envoy not found at %s: run `make envoy` or pass --envoy / set ENVOY" % args.envoy)
    for f in ["bench-%s.yaml" % n for n in names] + [UPSTREAM_CONFIG]:
        path = os.path.join(REPO, "envoy", f)
        if not os.path.exists(path):
            raise BenchError("missing scenario config %s" % path)
    for n in names:
        for m in SCENARIOS[n]["wasm"]:
            path = os.path.join(args.wasm_dir, m + ".wasm")
            if not os.path.exists(path):
                raise BenchError("missing %s: run `make build` first (or pass --wasm-dir)" % path)


def cpu_plan(warnings):
    online = sorted(os.sched_getaffinity(0))
    if len(online) < 2:
        w = "Fewer than 2 CPUs available (%s): Envoy, wrk and the upstream share CPU %d, so Envoy is never " \
            "saturated and every figure overstates its cost; compare the rows only with each other." % (online, online[0])
        warnings.append(w)
        log("warning: " + w)
        return (online[0], online[0])
    return (online[0], online[1])


def command_line(argv):
    cmd = " ".join(["python3", "tests/bench/bench.py"] + [shlex.quote(a) for a in argv])
    return "`make bench`, which runs `%s`" % cmd if os.environ.get("MAKELEVEL") else "`%s`" % cmd


def main(argv):
    args = parse_args(argv)
    global NICE
    NICE = args.nice
    if args.list:
        for g, members in GROUPS.items():
            print("%s: %s" % (g, ", ".join(ALWAYS + members)))
        return 0
    groups = args.only or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise BenchError("unknown group %s; groups: %s" % (", ".join(unknown), ", ".join(GROUPS)))
    skipped = []
    if not args.only:
        # Running everything: leave out groups whose module `make build` has
        # not produced (a filter not yet in the Makefile's FILTERS), and say so.
        def built(g):
            return all(os.path.exists(os.path.join(args.wasm_dir, m + ".wasm")) for n in GROUPS[g] for m in SCENARIOS[n]["wasm"])
        skipped = [g for g in groups if not built(g)]
        groups = [g for g in groups if g not in skipped]
        for g in skipped:
            log("warning: skipping group %s: its .wasm is not in %s (is the filter in the Makefile's FILTERS?)" % (g, args.wasm_dir))
    names = list(ALWAYS)
    for g in groups:
        for n in GROUPS[g]:
            if n not in names:
                names.append(n)
    preflight(args, names)
    warnings = []
    if skipped:
        warnings.append("Not measured (module not built by `make build`): %s." % ", ".join(skipped))
    cpus = cpu_plan(warnings)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(argv),
        "cpu": machine(),
        "ncpu": os.cpu_count() or 0,
        "load": os.getloadavg()[0],
        "envoy": envoy_version(args.envoy),
        "cpus": cpus,
        "warnings": warnings,
        "sizes": wasm_sizes(args),
    }
    if info["load"] > 1.0:
        warnings.append("The 1-minute load average was %.2f when the run started: other work shared the CPUs, so the "
                        "figures are noisy." % info["load"])
    total = args.rounds * len(names) * (args.duration + args.warmup + 1.5)
    log("bench: %s; %d rounds x %d scenarios, about %.0f s" % (", ".join(names), args.rounds, len(names), total))

    procs = Processes()
    workdir = tempfile.mkdtemp(prefix="meshpatterns-bench-")
    runs = []
    ok = False

    def on_term(signum, frame):
        raise SystemExit("bench: stopped by signal %d" % signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with open(os.path.join(REPO, "envoy", UPSTREAM_CONFIG)) as f:
            up_text = render("envoy/" + UPSTREAM_CONFIG, f.read(), args.wasm_dir, [])
        upstream = Envoy(procs, args.envoy, cpus[1], "upstream", up_text, workdir)
        up_ports = [p for n, p in sorted(upstream.ports().items())]
        if len(up_ports) != REPLICAS:
            raise BenchError("upstream has %d listeners, expected %d" % (len(up_ports), REPLICAS))
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for n in order:
                r = measure(procs, args, n, SCENARIOS[n], up_ports, workdir, cpus, first=(rnd == 0))
                r["round"] = rnd + 1
                runs.append(r)
                log("  round %d %-24s %8.0f req/s  p50 %-9s p99 %-9s %6.1f CPU µs/req  (Envoy busy %.0f %%)%s" % (
                    rnd + 1, n, r["rps"], fmt_lat(r["p50_us"]), fmt_lat(r["p99_us"]), r["cpu_us"], 100 * r["busy"],
                    "  %d errors" % r["errors"] if r["errors"] else ""))
        ok = True
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, old)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log("bench: failed; logs kept in %s" % workdir)

    summary, floor = summarise(names, runs)
    end_load = os.getloadavg()[0]
    if end_load > 1.0 and end_load > info["load"]:
        warnings.append("The 1-minute load average was %.2f when the run ended." % end_load)
    starved = [r for r in runs if r["busy"] < 0.5 and not SCENARIOS[r["scenario"]].get("origin_bound")]
    if starved:
        warnings.append("In %d of %d runs the Envoy under test was busy less than 50 %% of the time (other processes "
                        "held the CPUs or the client side was slow); CPU µs/req rises when Envoy is not saturated, so "
                        "those runs overstate the cost." % (len(starved), len(runs)))
    if any(s["errors"] for s in summary.values()):
        warnings.append("Some runs had errors (non-2xx responses or socket errors); see the per-run table.")
    text = report(args, groups, names, runs, summary, floor, info)
    with open(args.out, "w") as f:
        f.write(text)
    log("bench: wrote %s" % args.out)
    for g in groups:
        for n in GROUPS[g]:
            s = summary[n]
            if SCENARIOS[n]["kind"] == "filter":
                log("  %s adds %.1f µs/req; noop adds %.1f; ratio %s (target ≤ %.1f×)" % (
                    n, s["added_us"], floor, "n/a" if s["ratio"] is None else "%.2f×" % s["ratio"], TARGET_RATIO))
            other = SCENARIOS[n].get("speedup_over")
            if other:
                o = summary[other]
                log("  %s over %s: %.1f× RPS (%.0f vs %.0f), p50 %s vs %s, %.1f vs %.1f CPU µs/req" % (
                    n, other, s["rps"] / o["rps"], s["rps"], o["rps"], fmt_lat(s["p50_us"]), fmt_lat(o["p50_us"]),
                    s["cpu_us"], o["cpu_us"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        log("bench: %s" % e)
        sys.exit(1)
    except KeyboardInterrupt:
        log("bench: interrupted")
        sys.exit(130)
