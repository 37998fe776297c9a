-- Open-loop load for wrk 4 (Debian's `wrk`, LuaJIT): signed, unique fraud transactions with
-- Poisson arrivals, latency counted from each request's scheduled send time.
--
--   wrk -t16 -c16 -d20s --latency -s bench/wrk_fraud_open_loop.lua \
--       http://127.0.0.1:8000/fraud/v1/transactions -- REQUESTS_FILE RATE THREADS OUT_FILE [SEED]
--
-- REQUESTS_FILE (written by bench/fraud_sqlite_wrk.py): line 1 the API key, then one request a
-- line, "<Tessera-Signature value>\t<JSON body>", every id distinct; signatures carry a timestamp
-- valid 300 s, so write the file just before the run. RATE is the total offered rate (tx/s);
-- THREADS must equal wrk's -t and -c: ONE CONNECTION PER THREAD, so this thread's Lua state is
-- that connection's and can keep its schedule (wrk gives Lua no connection handle).
--
-- Pacing: each connection draws exponential gaps at RATE / THREADS, so the merged arrivals are a
-- Poisson process at RATE. wrk calls delay() before each send and sends only after the previous
-- answer on that connection (wrk is closed-loop per connection). When an answer comes after the
-- next request was due, that request goes at once and its latency counts from when it was due
-- (the coordinated-omission correction wrk2 makes, which Debian does not package). A request
-- sent on time counts from its send. Limits: while all THREADS connections wait on a stalled
-- server, no new connection opens (arrivals queue per connection, still timed from their due
-- time); when the server is saturated the achieved rate is its capacity, not RATE; the timer has
-- 1 ms granularity. wrk's own latency histogram (from each actual send) is printed too, for
-- comparison. OUT_FILE gets, per line, one latency in microseconds (status-200 answers) and a
-- last line "# sent=N ok=N non200=N late=N" (late: sends held back by a previous answer).

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } wrk_timespec;
int clock_gettime(int clk_id, wrk_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local clock = ffi.new("wrk_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
  return tonumber(clock.tv_sec) * 1e6 + tonumber(clock.tv_nsec) / 1e3
end

-- main Lua state: number the threads, gather their results at the end -------------------------
local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

-- thread Lua state: this connection's requests and schedule ----------------------------------
local requests, next_request = {}, 1
local gap_mean_us, due_us, start_us
-- globals: the main state reads them with thread:get() in done()
latencies, sent, ok, non200, late, out_path = {}, 0, 0, 0, 0, nil

function init(args)
  local path, rate, thread_count, seed = args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[5] or 1)
  assert(path and rate and thread_count, "args: REQUESTS_FILE RATE THREADS OUT_FILE [SEED]")
  local index = thread_index  -- set by setup() in the main state
  local file = assert(io.open(path, "r"))
  local api_key = file:read("*l")
  local line_number = 0
  for line in file:lines() do
    if line_number % thread_count == index then
      local signature, body = line:match("^([^\t]+)\t(.*)$")
      requests[#requests + 1] = wrk.format("POST", nil, {
        ["X-API-Key"] = api_key, ["Tessera-Signature"] = signature, ["Content-Type"] = "application/json",
      }, body)
    end
    line_number = line_number + 1
  end
  file:close()
  out_path = args[4]
  gap_mean_us = 1e6 * thread_count / rate
  math.randomseed(seed * 7919 + index)
end

local function exponential_gap_us()
  return -gap_mean_us * math.log(1 - math.random())
end

function delay()
  local now = now_us()
  due_us = (due_us or now) + exponential_gap_us()
  if now >= due_us then  -- held back by the previous answer: send now, time it from its due time
    start_us = due_us
    late = late + 1
    return 0
  end
  start_us = nil
  return math.floor((due_us - now) / 1000 + 0.5)
end

function request()
  if next_request > #requests then
    wrk.thread:stop()  -- out of distinct transactions: a resend would be a replay, not new work
    next_request = 1
  end
  local raw = requests[next_request]
  next_request = next_request + 1
  start_us = start_us or now_us()
  sent = sent + 1
  return raw
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
    latencies[ok] = math.floor(now_us() - start_us + 0.5)
  else
    non200 = non200 + 1
  end
end

function done(summary, latency, requests_summary)
  local out_path = threads[1] and threads[1]:get("out_path")
  local totals = { sent = 0, ok = 0, non200 = 0, late = 0 }
  local out = out_path and assert(io.open(out_path, "w"))
  for _, thread in ipairs(threads) do
    for key in pairs(totals) do
      totals[key] = totals[key] + (thread:get(key) or 0)
    end
    if out then
      for _, value in ipairs(thread:get("latencies") or {}) do
        out:write(value, "\n")
      end
    end
  end
  if out then
    out:write(string.format("# sent=%d ok=%d non200=%d late=%d\n", totals.sent, totals.ok, totals.non200,
                            totals.late))
    out:close()
  end
  io.write(string.format("open loop: sent %d, 200 %d, other status %d, held back by a previous answer %d\n",
                         totals.sent, totals.ok, totals.non200, totals.late))
end
