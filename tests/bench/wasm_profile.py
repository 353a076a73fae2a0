#!/usr/bin/env python3
"""What our code costs inside the VM, per request, exactly, in seconds and without Envoy.

    wasm_profile.py --wasm-dir DIR [SCENARIO ...]
    wasm_profile.py --wasm-dir DIR --functions SCENARIO

Each filter scenario of bench.py (its envoy/bench-<scenario>.yaml: the
module and its plugin config) runs in wasmtime (PyPI `wasmtime`) against a
proxy-wasm host written here, driven as `make bench` drives Envoy:
keep-alive GET requests over 1,000 `x-user-id` keys (16 hex digits, as
tests/bench/session.lua sends them), a 200 from the upstream with a
10-byte body, the callbacks the module exports in Envoy's order. Every
entry into the module is metered with wasmtime's fuel (one unit per wasm
instruction), so the figures are exact and the same on every run.

For each scenario it prints the wasm instructions per request, by entry,
and the same for the scenario's `crossings-*` module (the same crossings
and nothing else, filters/crossings): the difference is our own work, the
part of `make bench`'s added instructions that our code can still win.
Measured at 50a8c9e, one wasm instruction here was 0.84-0.88 of an Envoy
instruction in `make bench` (rate-limiter: 13.5 k against 11.5 k of code V8
generated). Not counted: bulk-memory copies count as one instruction
whatever their length, and nothing Envoy does for a crossing.

`--functions SCENARIO` lists the functions the instructions run in: it
runs the scenario again under callgrind (Debian valgrind) and names
wasmtime's code from its perf map. The figures are x86 instructions of
wasmtime's code, which rank functions as V8's would; the module needs its
name section (`make profile-functions` builds one that keeps it).
"""

import argparse
import os
import re
import struct
import subprocess
import sys

import wasmtime
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the scenario list)


def plugin_config(yaml_text, module_file):
    """The configuration value of the wasm filter that loads module_file."""
    doc = yaml.safe_load(re.sub(r"\{\{(\w+)\}\}", r"\1", yaml_text))
    found = []

    def walk(v):
        if isinstance(v, dict):
            code = (((v.get("config") or {}).get("vm_config") or {}).get("code") or {}).get("local") or {}
            if str(code.get("filename", "")).endswith("/" + module_file):
                found.append(v["config"]["configuration"]["value"])
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(doc)
    return found[0] if found else None


def serialize(pairs):
    out = struct.pack("<I", len(pairs))
    for k, v in pairs:
        out += struct.pack("<II", len(k), len(v))
    for k, v in pairs:
        out += k + b"\0" + v + b"\0"
    return out


class Host:
    """The proxy-wasm host: its state, and an implementation of each import
    the request path uses (any other import answers 1, NotFound)."""

    def __init__(self, config):
        self.config = config
        self.request_headers = []
        self.response_headers = []
        self.response_body = b""
        self.now = 1_780_000_000_000_000_000
        self.properties = {b"xds\0route_name": b"app", b"xds\0cluster_name": b"replicas"}
        self.shared = {}
        self.replies = []
        self.calls = {}
        self.metrics = 0
        self.instance = None
        self.store = None

    def mem(self):
        return self.instance.exports(self.store)["memory"]

    def read(self, ptr, n):
        return bytes(self.mem().read(self.store, ptr, ptr + n)) if n else b""

    def write(self, ptr, data):
        self.mem().write(self.store, data, ptr)

    def give(self, data, out_ptr, out_len):
        """Hand data over as Envoy does: in memory from the module's allocator."""
        p = self.instance.exports(self.store)["proxy_on_memory_allocate"](self.store, len(data))
        if data:
            self.write(p, data)
        self.write(out_ptr, struct.pack("<I", p))
        self.write(out_len, struct.pack("<I", len(data)))
        return 0

    def count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def headers(self, m):
        return {0: self.request_headers, 2: self.response_headers}.get(m)

    def proxy_log(self, level, p, n):
        if level >= 3:
            print("module log:", self.read(p, n).decode(errors="replace"), file=sys.stderr)
        return 0

    def proxy_get_current_time_nanoseconds(self, out):
        self.count("clock")
        self.write(out, struct.pack("<Q", self.now))
        return 0

    def proxy_set_tick_period_milliseconds(self, _ms):
        return 0

    def proxy_get_buffer_bytes(self, kind, start, size, out_p, out_n):
        self.count("get_buffer")
        data = {7: self.config, 1: self.response_body}.get(kind)
        return 1 if data is None else self.give(data[start:start + size], out_p, out_n)

    def proxy_set_buffer_bytes(self, kind, start, size, p, n):
        self.count("set_buffer")
        if kind != 1:
            return 1
        b = self.response_body
        self.response_body = b[:start] + self.read(p, n) + b[start + size:]
        return 0

    def proxy_get_header_map_pairs(self, m, out_p, out_n):
        self.count("header_pairs")
        h = self.headers(m)
        return 1 if h is None else self.give(serialize(h), out_p, out_n)

    def proxy_get_header_map_value(self, m, kp, kn, out_p, out_n):
        self.count("header_get")
        k = self.read(kp, kn)
        for name, v in self.headers(m) or []:
            if name == k:
                return self.give(v, out_p, out_n)
        return 1

    def proxy_replace_header_map_value(self, m, kp, kn, vp, vn):
        self.count("header_write")
        h = self.headers(m)
        k, v = self.read(kp, kn), self.read(vp, vn)
        h[:] = [x for x in h if x[0] != k] + [(k, v)]
        return 0

    def proxy_add_header_map_value(self, m, kp, kn, vp, vn):
        self.count("header_write")
        self.headers(m).append((self.read(kp, kn), self.read(vp, vn)))
        return 0

    def proxy_remove_header_map_value(self, m, kp, kn):
        self.count("header_remove")
        k = self.read(kp, kn)
        h = self.headers(m)
        h[:] = [x for x in h if x[0] != k]
        return 0

    def proxy_get_property(self, pp, pn, out_p, out_n):
        self.count("property_get")
        v = self.properties.get(self.read(pp, pn))
        return 1 if v is None else self.give(v, out_p, out_n)

    def proxy_set_property(self, pp, pn, vp, vn):
        self.count("property_set")
        self.properties[self.read(pp, pn)] = self.read(vp, vn)
        return 0

    def proxy_get_shared_data(self, kp, kn, out_p, out_n, cas_p):
        self.count("shared_get")
        e = self.shared.get(self.read(kp, kn))
        if e is None:
            return 1
        self.write(cas_p, struct.pack("<I", e[1]))
        return self.give(e[0], out_p, out_n)

    def proxy_set_shared_data(self, kp, kn, vp, vn, cas):
        self.count("shared_set")
        k, v = self.read(kp, kn), self.read(vp, vn)
        e = self.shared.get(k)
        if e is not None and cas and e[1] != cas:
            return 8
        self.shared[k] = (v, (e[1] + 1) if e else 1)
        return 0

    def proxy_define_metric(self, _kind, _p, _n, out):
        self.metrics += 1
        self.write(out, struct.pack("<I", self.metrics))
        return 0

    def proxy_increment_metric(self, _mid, _by):
        self.count("metric_increment")
        return 0

    def proxy_record_metric(self, _mid, _v):
        self.count("metric_record")
        return 0

    def proxy_send_local_response(self, status, _dp, _dn, bp, bn, _hp, _hn, _grpc):
        self.count("local_reply")
        self.replies.append((status, self.read(bp, bn)))
        return 0

    def proxy_continue_stream(self, _t):
        return 0

    def proxy_set_effective_context(self, _c):
        return 0

    def random_get(self, p, n):
        self.write(p, os.urandom(n))
        return 0


def instantiate(path, config, perfmap=False):
    cfg = wasmtime.Config()
    cfg.consume_fuel = True
    if perfmap:
        cfg.profiler = "perfmap"
    engine = wasmtime.Engine(cfg)
    store = wasmtime.Store(engine)
    store.set_fuel(2**62)
    module = wasmtime.Module.from_file(engine, path)
    host = Host(config.encode())
    host.store = store
    linker = wasmtime.Linker(engine)
    for imp in module.imports:
        impl = getattr(host, imp.name, None)
        if impl is None:
            def impl(*_args):
                return 1
        # i32 arguments arrive signed: pointers and sizes are unsigned.
        unsigned = [str(p) == "i32" for p in imp.type.params]

        def make(f, has_result, unsigned):
            def call(*args):
                r = f(*[a & 0xFFFFFFFF if u else a for a, u in zip(args, unsigned)])
                return r if has_result else None
            return call

        linker.define(store, imp.module, imp.name, wasmtime.Func(store, imp.type, make(impl, bool(list(imp.type.results)), unsigned)))
    host.instance = linker.instantiate(store, module)
    return host, store, module


def run(path, config, requests, warmup, on_measure=None, perfmap=False):
    """Start the module as Envoy does, warm it up, then meter `requests`
    requests: {entry: wasm instructions per request}, hostcalls, replies."""
    host, store, module = instantiate(path, config, perfmap)
    ex = host.instance.exports(store)
    exported = {e.name for e in module.exports}
    ex["_initialize"](store)
    ex["proxy_on_context_create"](store, 1, 0)
    if not ex["proxy_on_vm_start"](store, 1, 0) or not ex["proxy_on_configure"](store, 1, len(host.config)):
        raise SystemExit(f"{os.path.basename(path)} refused its configuration")
    entries = [(n, a) for n, a in [
        ("proxy_on_context_create", lambda: (1,)),
        ("proxy_on_request_headers", lambda: (len(host.request_headers), 1)),
        ("proxy_on_response_headers", lambda: (len(host.response_headers), 0)),
        ("proxy_on_response_body", lambda: (10, 1)),
        ("proxy_on_delete", lambda: ()),
    ] if n in exported]
    spent = {n: 0 for n, _ in entries}

    def request(n, meter):
        cid = 2 + n % 1000
        host.now += 100_000
        host.request_headers = [(b":authority", b"127.0.0.1:10000"), (b":path", b"/"), (b":method", b"GET"),
                                (b":scheme", b"http"), (b"x-user-id", b"%016x" % ((n * 7919) % 1000)),
                                (b"x-forwarded-proto", b"http"),
                                (b"x-request-id", b"6a1c5b3e-0f4d-4a8e-9b7c-2d1e0f3a4b5c")]
        host.response_headers = [(b":status", b"200"), (b"content-length", b"10"), (b"content-type", b"text/plain"),
                                 (b"date", b"Thu, 03 Dec 2026 12:00:00 GMT"), (b"server", b"envoy"),
                                 (b"x-envoy-upstream-service-time", b"0")]
        host.response_body = b"replica-0\n"
        for name, args in entries:
            a = args()
            before = store.get_fuel()
            ex[name](store, cid, *a)
            if meter:
                spent[name] += before - store.get_fuel()

    for n in range(warmup):
        request(n, False)
    host.calls.clear()
    host.replies.clear()
    if on_measure:
        on_measure()
    for n in range(warmup, warmup + requests):
        request(n, True)
    per = {k: v / requests for k, v in spent.items()}
    calls = {k: v / requests for k, v in sorted(host.calls.items())}
    return per, calls, host.replies


def scenario_run(wasm_dir, scenario, requests, warmup, on_measure=None, perfmap=False):
    sc = bench.SCENARIOS[scenario]
    module = sc["wasm"][0] + ".wasm"
    yaml_path = os.path.join(REPO, "envoy", f"bench-{scenario}.yaml")
    config = plugin_config(open(yaml_path).read(), module)
    if config is None:
        raise SystemExit(f"{yaml_path}: no wasm filter loads {module}")
    return run(os.path.join(wasm_dir, module), config, requests, warmup, on_measure, perfmap)


SHORT = {"proxy_on_context_create": "create", "proxy_on_request_headers": "request",
         "proxy_on_response_headers": "response", "proxy_on_response_body": "body", "proxy_on_delete": "delete"}


def functions(args):
    """Run this script again under callgrind (instrumentation off until the
    metered requests start), then name the code addresses it counted from
    wasmtime's perf map of that process."""
    import tempfile
    out = tempfile.mkdtemp(prefix="wasm-profile-")
    dump = os.path.join(out, "callgrind.out")
    child = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}",
                              sys.executable, os.path.abspath(__file__), "--wasm-dir", args.wasm_dir,
                              "--requests", str(args.requests), "--warmup", str(args.warmup), "--under-callgrind",
                              args.functions], stderr=subprocess.DEVNULL)
    if child.wait() != 0:
        raise SystemExit(f"valgrind exited with {child.returncode}")
    perfmap = f"/tmp/perf-{child.pid}.map"
    try:
        name_functions(dump, perfmap, args.requests, args.top)
    finally:
        for f in (perfmap, dump):
            if os.path.exists(f):
                os.remove(f)
        os.rmdir(out)


def name_functions(dump, perfmap, requests, top):
    import bisect
    syms = []
    for line in open(perfmap):
        a, size, name = line.split(" ", 2)
        name = re.sub(r"::h[0-9a-f]{16}$", "", re.sub(r"\[[0-9a-f]+\]", "", name.strip()))
        syms.append((int(a, 16), int(size, 16), name))
    syms.sort()
    starts = [s[0] for s in syms]
    out = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", dump], capture_output=True, text=True).stdout
    by = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+\?\?\?:0x([0-9a-f]+)", line)
        if not m:
            continue
        a = int(m.group(2), 16)
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0 and a < syms[i][0] + syms[i][1]:
            by[syms[i][2]] = by.get(syms[i][2], 0) + int(m.group(1).replace(",", ""))
    total = sum(by.values())
    print(f"wasmtime's code: {total / requests:.0f} x86 instructions per request; the functions they ran in:")
    for name, v in sorted(by.items(), key=lambda x: -x[1])[:top]:
        print(f"  {v / requests:7.0f}  {name[:140]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", help="filter scenarios of bench.py (default: every one with a crossings module)")
    ap.add_argument("--wasm-dir", required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--functions", metavar="SCENARIO",
                    help="the functions SCENARIO's module runs in (under valgrind; the module needs its name section)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--under-callgrind", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.functions:
        functions(args)
        return 0
    if args.under_callgrind:
        pid = str(os.getpid())
        scenario_run(args.wasm_dir, args.scenarios[0], args.requests, args.warmup, perfmap=True,
                     on_measure=lambda: subprocess.run(["callgrind_control", "-i", "on", pid], stdout=subprocess.DEVNULL,
                                                       check=False))
        return 0

    names = args.scenarios or [n for n, s in bench.SCENARIOS.items() if s.get("crossings")]
    print(f"wasm instructions per request (wasmtime fuel, exact; {args.requests} requests after {args.warmup} warm-up)\n")
    print(f"| scenario | module | entries: {' / '.join(SHORT.values())} | its crossings module | own work |")
    print("|---|---:|---|---:|---:|")
    failed = False
    for name in names:
        per, calls, replies = scenario_run(args.wasm_dir, name, args.requests, args.warmup)
        total = sum(per.values())
        cross = bench.SCENARIOS[name].get("crossings")
        ctotal = sum(scenario_run(args.wasm_dir, cross, args.requests, args.warmup)[0].values()) if cross else None
        split = " / ".join(f"{per[k]:.0f}" if k in per else "-" for k in SHORT)
        own = f"{total - ctotal:,.0f}" if ctotal is not None else "-"
        print(f"| {name} | {total:,.0f} | {split} | {ctotal:,.0f} | {own} |" if ctotal is not None
              else f"| {name} | {total:,.0f} | {split} | - | - |")
        print(f"|  | hostcalls per request: {', '.join(f'{k} {v:.2f}' for k, v in calls.items())} | | | |")
        if replies:
            print(f"{name}: {len(replies)} local replies (first: {replies[0]}): every request should pass", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
