-- wrk script for tests/bench/bench.py: every request carries a session key
-- that changes from request to request, and the run ends by printing one
-- machine-readable result line.
--
--   wrk ... -s session.lua http://127.0.0.1:PORT/PATH -- HEADER KEYS
--
-- Every request goes to the URL's path (wrk.path; "/" for most scenarios).
-- HEADER: the request header that carries the key (default x-user-id).
-- KEYS:   how many distinct keys to cycle through (default 10000). Keys are
--         16 hex digits, so a header written by a filter (XXH64 in hex) and
--         one sent by the client have the same length.

local header = "x-user-id"
local keys = 10000
local n = 0

function init(args)
  if args[1] ~= nil and args[1] ~= "" then header = args[1] end
  if args[2] ~= nil then keys = tonumber(args[2]) end
end

function request()
  n = n + 1
  -- a multiplicative step spreads consecutive requests over the key space
  local k = (n * 7919) % keys
  return wrk.format("GET", wrk.path, { [header] = string.format("%016x", k) })
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
