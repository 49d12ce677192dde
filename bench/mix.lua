-- wrk script: replay the pre-rendered request mix written by bench/mix.py.
--
--   wrk -s bench/mix.lua URL -- FILE [RATE]
--
-- FILE holds each request as "<length>\n<raw HTTP/1.1 bytes>"; each thread cycles through
-- them from its own offset, so the only per-request work here is an index increment.
-- RATE (requests per second over all threads, optional) paces the run: every thread keeps
-- a schedule of send slots at a fixed interval and each connection waits for the next free
-- slot before sending. The latency wrk records starts when the request is written, after
-- the wait, so it is the service's latency at that offered rate; with more connections
-- than requests in flight a slow response does not delay the next slot (no coordinated
-- omission while latency stays below connections x interval).
-- done() prints one line "BENCH_JSON {...}" for the driver.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}
local thread_count = 0

function setup(thread)
  thread:set("id", thread_count)
  thread_count = thread_count + 1
  table.insert(threads, thread)
end

local reqs = {}
local n = 0
local interval_ms = nil
local next_slot = nil

local function load(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  local pos = 1
  while pos <= #data do
    local nl = data:find("\n", pos, true)
    local len = tonumber(data:sub(pos, nl - 1))
    table.insert(reqs, data:sub(nl + 1, nl + len))
    pos = nl + 1 + len
  end
end

function init(args)
  load(args[1])
  n = (id or 0) * 7919 % #reqs
  local rate = tonumber(args[2] or "0")
  if rate > 0 then
    interval_ms = 1000 * (args[3] and tonumber(args[3]) or 1) / rate
    function delay()
      local t = now_ms()
      if next_slot == nil or next_slot < t then
        next_slot = t
      end
      local wait = next_slot - t
      next_slot = next_slot + interval_ms
      return math.floor(wait + 0.5)
    end
  end
end

function request()
  n = n % #reqs + 1
  return reqs[n]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
