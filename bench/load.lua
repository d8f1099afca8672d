-- wrk script for `make bench`: one request shape per row, and a count of answers by status.
--   wrk ... -s bench/load.lua URL -- MODE [IDS_FILE]
-- MODE: baseline | restart-fail | restart-defer | create3 | create10 | get-step
-- IDS_FILE: step ids, one a line; wrk's threads take every n-th id, so no two threads share one.
-- Environment:
--   STEPD_TOKEN        the operator secret for stepd's rows
--   BENCH_WRK_THREADS  wrk's -t, so each thread takes its own share of IDS_FILE
--   BENCH_RATE         requests per second to offer, all threads together (a fixed rate); unset:
--                      as fast as the server answers (each connection sends again at once)

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

local function noop_steps(n)
  local steps = {}
  for _ = 1, n do
    table.insert(steps, '{"type": "noop"}')
  end
  return table.concat(steps, ", ")
end

function init(args)
  mode = args[1]
  statuses = {}
  not_failed = 0 -- 412s whose step was not FAILED (yet): restarted before its last restart had failed
  wrapped = 0
  late_sends, max_late_ms = 0, 0
  ids = {}
  if args[2] then
    local nthreads = tonumber(os.getenv("BENCH_WRK_THREADS") or "1")
    local n = 0
    for line in io.lines(args[2]) do
      if n % nthreads == tid - 1 then
        table.insert(ids, line)
      end
      n = n + 1
    end
  end
  next_id = 0
  wrk.headers["Content-Type"] = "application/json"
  if mode ~= "baseline" then
    wrk.headers["Authorization"] = "Bearer " .. os.getenv("STEPD_TOKEN")
  end
  if mode == "create3" then
    body = '{"name": "bench", "steps": [' .. noop_steps(3) .. ']}'
  elseif mode == "create10" then
    body = '{"name": "engine", "steps": [' .. noop_steps(10) .. ']}'
  end
end

-- The next id of this thread's share of the pool; past its end it starts over (counted).
local function take_id()
  next_id = next_id + 1
  if next_id > #ids then
    next_id = 1
    wrapped = wrapped + 1
  end
  return ids[next_id]
end

function request()
  if mode == "baseline" then
    return wrk.format("POST", "/echo", nil, '{"processStepId": "AAAAAAAAAAAAAAAAAAAAAA"}')
  elseif mode == "restart-fail" then
    return wrk.format("POST", "/api/v1/processes/restart-failed-step", nil,
      '{"processStepId": "' .. take_id() .. '"}')
  elseif mode == "restart-defer" then
    return wrk.format("POST", "/api/v1/processes/restart-failed-step", nil,
      '{"processStepId": "' .. take_id() .. '", "params": {"defer": {"type": "LONG", "longValue": 1}}}')
  elseif mode == "create3" or mode == "create10" then
    return wrk.format("POST", "/api/v1/processes", nil, body)
  elseif mode == "get-step" then
    return wrk.format("GET", "/api/v1/processes/steps/" .. take_id())
  end
  error("unknown mode " .. tostring(mode))
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  -- stepd's answer to a restart of a step that is STARTED or PENDING: the driver reports these
  -- apart from other 412s (which would be a fault of the benchmark).
  if status == 412 and body and body:find("only a FAILED step can be restarted", 1, true) then
    not_failed = not_failed + 1
  end
end

-- A fixed rate, as wrk2 offers it but in plain wrk: wrk calls delay() before each request of a
-- connection and waits that many milliseconds. Each thread keeps a schedule of send slots, one
-- every nthreads/rate seconds from its first request, and every delay() takes the next slot, so
-- the thread sends at the rate whatever the answers' latency, as long as one of its connections
-- is free when a slot comes. A send later than its slot (every connection was still waiting for
-- an answer) is counted: wrk measures latency from the send, so such a send hides a wait.
-- delay() is defined only with BENCH_RATE: wrk takes its mere presence as "delay every request".
local rate = tonumber(os.getenv("BENCH_RATE") or "")
if rate then
  local ffi = require("ffi") -- LuaJIT's, which wrk embeds: wrk's Lua has no clock finer than 1 s
  ffi.cdef([[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clock_id, bench_timespec *tp);
  ]])
  local CLOCK_MONOTONIC, LATE_MS = 1, 1
  local timespec = ffi.new("bench_timespec")
  local function now_ms()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
    return tonumber(timespec.tv_sec) * 1000 + tonumber(timespec.tv_nsec) / 1e6
  end
  local slot_ms = 1000 * tonumber(os.getenv("BENCH_WRK_THREADS") or "1") / rate
  local next_slot

  function delay()
    local now = now_ms()
    next_slot = next_slot or now
    local wait = next_slot - now
    next_slot = next_slot + slot_ms
    if wait < -LATE_MS then
      late_sends = late_sends + 1
      max_late_ms = math.max(max_late_ms, -wait)
    end
    return math.max(0, wait)
  end
end

function done(summary, latency, requests)
  local total, wraps, refused, late, max_late = {}, 0, 0, 0, 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
    wraps = wraps + thread:get("wrapped")
    refused = refused + thread:get("not_failed")
    late = late + thread:get("late_sends")
    max_late = math.max(max_late, thread:get("max_late_ms"))
  end
  local parts = {}
  for status, count in pairs(total) do
    table.insert(parts, status .. "=" .. count)
  end
  table.sort(parts)
  io.write("bench-statuses: " .. table.concat(parts, " ") .. "\n")
  io.write("bench-pool-wraps: " .. wraps .. "\n")
  io.write("bench-not-failed-yet: " .. refused .. "\n")
  io.write(string.format("bench-late-sends: %d max %.1f ms\n", late, max_late))
end
