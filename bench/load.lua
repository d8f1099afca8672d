-- wrk script for `make bench`: one request shape per row, and a count of answers by status.
--   wrk ... -s bench/load.lua URL -- MODE [IDS_FILE]
-- MODE: baseline | restart-fail | restart-defer | create3 | create10 | get-step
-- IDS_FILE: step ids, one a line; wrk's threads take every n-th id, so no two threads share one.
-- STEPD_TOKEN (environment): the operator secret for stepd's rows.

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
  wrapped = 0
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
end

function done(summary, latency, requests)
  local total, wraps = {}, 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
    wraps = wraps + thread:get("wrapped")
  end
  local parts = {}
  for status, count in pairs(total) do
    table.insert(parts, status .. "=" .. count)
  end
  table.sort(parts)
  io.write("bench-statuses: " .. table.concat(parts, " ") .. "\n")
  io.write("bench-pool-wraps: " .. wraps .. "\n")
end
