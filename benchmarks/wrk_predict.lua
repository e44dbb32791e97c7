-- wrk script of the serving benchmark: single-tweet POST /predict requests, a unique text each.
--
-- Driven by benchmarks/wrk.py, which passes (after `--`): the tweets file (one JSON string per
-- line), the arrival rate per wrk thread (0: closed loop), this run's base number, a random
-- seed and wrk's thread count. Each text is a tweet followed by " <n>", n = base + the pass over
-- the tweets (times the threads, plus the thread): unique within the run, and across runs whose
-- bases are 1000 apart, for one or two word pieces more per text. See docs/serving.md.
--
-- Closed loop: every connection sends its next request as soon as the last one is answered.
-- Open loop (rate > 0): each thread draws Poisson arrival times at its rate; a connection that
-- becomes free takes the next arrival time and waits for it (wrk's delay()). A request whose
-- time came while every connection was busy goes out late; `late` counts those, so a run
-- short of connections shows itself instead of quietly offering less load.
--
-- done() prints one line, "WRK_JSON {...}", that benchmarks/wrk.py parses.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } driftloop_timespec;
int clock_gettime(int clk_id, driftloop_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("driftloop_timespec")
local LATE_MS = 5 -- sent this much past its arrival time: late

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

-- ------------------------------------------------------------------- main state (setup, done)

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("id", thread_count)
  table.insert(threads, thread)
end

-- --------------------------------------------------------------------- each thread's state

local tweets = {}
local position, number, step = 0, 0, 1
local rate = 0 -- arrivals per second on this thread; 0 = closed loop
local next_at = nil
local due = {} -- FIFO of the arrival times handed out by delay(), consumed by request()
local due_head, due_tail = 1, 0

-- Globals, so that done() can read them with thread:get().
sent = 0
late = 0
max_late_ms = 0
statuses = {}

local function open_delay()
  local now = now_ms()
  if next_at == nil then
    next_at = now
  end
  next_at = next_at - math.log(1 - math.random()) * 1000 / rate
  due_tail = due_tail + 1
  due[due_tail] = next_at
  local wait = next_at - now
  if wait <= 0 then
    return 0
  end
  return math.floor(wait)
end

function init(args)
  local path = args[1]
  rate = tonumber(args[2]) or 0
  local base = tonumber(args[3]) or 0
  local seed = tonumber(args[4]) or 0
  local thread_total = tonumber(args[5]) or 1
  for line in io.lines(path) do
    if #line > 2 then
      table.insert(tweets, line)
    end
  end
  if #tweets == 0 then
    error("no tweets in " .. path)
  end
  -- Threads start at different tweets and number their passes apart: no two requests of a
  -- run carry the same text.
  position = math.floor((id - 1) * #tweets / thread_total)
  number = base + id - 1
  step = thread_total
  math.randomseed(seed * 7919 + id)
  if rate > 0 then
    delay = open_delay -- wrk checks for delay() after init: only the open loop has one
  end
end

function request()
  if due_head <= due_tail then
    local lateness = now_ms() - due[due_head]
    due[due_head] = nil
    due_head = due_head + 1
    if lateness > LATE_MS then
      late = late + 1
    end
    if lateness > max_late_ms then
      max_late_ms = lateness
    end
  end
  position = position + 1
  if position > #tweets then
    position = 1
    number = number + step
  end
  sent = sent + 1
  -- The line is a JSON string literal: the number goes inside its closing quote.
  local line = tweets[position]
  local text = line:sub(1, -2) .. " " .. string.format("%d", number) .. '"'
  return wrk.format("POST", wrk.path, nil, '{"texts":[' .. text .. "]}")
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

-- --------------------------------------------------------------------------------- summary

local function json_value(v)
  if type(v) == "table" then
    local parts = {}
    for k, x in pairs(v) do
      table.insert(parts, string.format("%q:%s", tostring(k), json_value(x)))
    end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif v == nil then
    return "null"
  end
  return string.format("%.17g", v)
end

function done(summary, latency, requests)
  local out = {
    requests = summary.requests,
    duration_us = summary.duration,
    bytes = summary.bytes,
    errors = summary.errors,
    threads = thread_count,
    sent = 0,
    late = 0,
    max_late_ms = 0,
    statuses = {},
  }
  for i, thread in ipairs(threads) do
    local thread_sent = thread:get("sent")
    if i == 1 then
      thread_sent = thread_sent - 1 -- wrk builds one request on thread 1 to check it; never sent
    end
    out.sent = out.sent + thread_sent
    out.late = out.late + thread:get("late")
    out.max_late_ms = math.max(out.max_late_ms, thread:get("max_late_ms"))
    for status, n in pairs(thread:get("statuses")) do
      out.statuses[status] = (out.statuses[status] or 0) + n
    end
  end
  if summary.requests > 0 then
    out.latency_us = {
      min = latency.min,
      mean = latency.mean,
      max = latency.max,
      stdev = latency.stdev,
      p50 = latency:percentile(50),
      p90 = latency:percentile(90),
      p95 = latency:percentile(95),
      p99 = latency:percentile(99),
    }
  end
  io.write("WRK_JSON " .. json_value(out) .. "\n")
end
