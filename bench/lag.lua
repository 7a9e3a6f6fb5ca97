-- bench/lag.lua: visibility lag of live projections: append one event,
-- then read the read-model row until it shows it (Orders:get), with a
-- projector PROCESS following the log by polling its head every 5 ms (the
-- default `tick`; appends do not NOTIFY), against the same projector doing
-- a full catch-up every 100 ms. Each is measured idle and while
-- ES_BENCH_LAG_WRITERS writer processes (default 4) append other events
-- as fast as they can. Prints `name value unit`.
--
--   ES_BENCH_DATABASE_URL (or ES_TEST_DATABASE_URL), ES_BENCH_LAG_N (default 300)
local es = require "eventsourcing"

local url = os.getenv("ES_BENCH_DATABASE_URL") or os.getenv("ES_TEST_DATABASE_URL")
if not url or url == "" then
  io.stderr:write("bench/lag.lua: set ES_BENCH_DATABASE_URL or ES_TEST_DATABASE_URL\n")
  os.exit(2)
end
local N = tonumber(os.getenv("ES_BENCH_LAG_N") or "300")
local WRITERS = tonumber(os.getenv("ES_BENCH_LAG_WRITERS") or "4")
local schema = ("bench_lag_%d"):format(os.time() % 1000000)
local store = assert(es.open(url, { schema = schema }))
assert(store:migrate())

local MODEL = [[
local es = require "eventsourcing"
local M = es.read_model { name = "rm_lag", columns = { id = "text", n = "bigint" },
  on = { Tick = function(row) row.n = (row.n or 0) + 1 end } }
]]
local Lag = assert(load(MODEL .. " return M"))()
assert(es.projector(store, { Lag }):migrate())

local core = require "eventsourcing.core"
local now = core.monotonic

local function shq(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
local stop_file = os.tmpname()
os.remove(stop_file)
local STOP = ("function() local f = io.open(%q); if f then f:close(); return true end; return false end")
  :format(stop_file)

local function spawn(code)
  local env = ("LUA_PATH=%s LUA_CPATH=%s"):format(shq(package.path), shq(package.cpath))
  local interp = rawget(_G, "jit") and "luajit" or "lua5.4"
  local f = assert(io.popen(("env %s %s -e %s >/dev/null 2>&1 & echo $!"):format(env, interp, shq(code))))
  local pid = f:read("*l")
  f:close()
  return pid
end

local function projector(tick, poll)
  return spawn(MODEL .. ([[
local store = assert(es.open(%q, { schema = %q }))
local p = es.projector(store, { M })
local stop = %s
p:run { tick = %s, poll = %s, stop = stop }
]]):format(url, schema, STOP, tick, poll))
end

local function writer(i)
  return spawn(([[
local es = require "eventsourcing"
local store = assert(es.open(%q, { schema = %q }))
local stop, n = %s, 0
while not stop() do
  for _ = 1, 50 do n = n + 1; assert(store:append("Noise-%d-" .. n, { type = "Noise" })) end
end
]]):format(url, schema, STOP, i))
end

local function wait_gone(pids)
  for _, pid in ipairs(pids) do
    os.execute("while kill -0 " .. pid .. " 2>/dev/null; do sleep 0.05; done")
  end
end

local function measure(label, tick, poll, writers, n)
  local pids = { projector(tick, poll) }
  for i = 1, writers do pids[#pids + 1] = writer(i) end
  local key = label
  -- warm up: wait until the projector answers
  assert(store:append("Lag-" .. key, { type = "Tick" }))
  local expect = 1
  local t_end = now() + 30
  while true do
    local row = Lag:get(store, key)
    if row and row.n == expect then break end
    assert(now() < t_end, "the projector process did not start")
  end
  local lags = {}
  for i = 1, n do
    -- arrive at a random moment, as real appends do (right after the last
    -- one became visible is always just after a poll)
    core.sleep(math.random() * 0.1)
    local t0 = now()
    assert(store:append("Lag-" .. key, { type = "Tick" }))
    expect = expect + 1
    while true do
      local row = Lag:get(store, key)
      if row and row.n == expect then break end
    end
    lags[i] = (now() - t0) * 1000
  end
  local f = io.open(stop_file, "w"); f:close()
  wait_gone(pids)
  os.remove(stop_file)
  table.sort(lags)
  local function pct(p) return lags[math.max(1, math.ceil(#lags * p))] end
  print(("lag_%s_median %.2f ms"):format(label, pct(0.5)))
  print(("lag_%s_p99 %.2f ms"):format(label, pct(0.99)))
end

local few = math.max(20, math.floor(N / 3))
measure("headpoll", 0.005, 1, 0, N)
measure(("headpoll_%dwriters"):format(WRITERS), 0.005, 1, WRITERS, N)
measure("poll100ms", 0.1, 0.1, 0, few)
measure(("poll100ms_%dwriters"):format(WRITERS), 0.1, 0.1, WRITERS, few)
store:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
store:close()
