-- bench/lag.lua: visibility lag of live projections: append one event,
-- then read the read-model row until it shows it (Orders:get), with a
-- projector PROCESS following via LISTEN/NOTIFY, against the same
-- projector polling every 100 ms without LISTEN. Prints `name value unit`.
--
--   ES_BENCH_DATABASE_URL (or ES_TEST_DATABASE_URL), ES_BENCH_LAG_N (default 300)
local es = require "eventsourcing"

local url = os.getenv("ES_BENCH_DATABASE_URL") or os.getenv("ES_TEST_DATABASE_URL")
if not url or url == "" then
  io.stderr:write("bench/lag.lua: set ES_BENCH_DATABASE_URL or ES_TEST_DATABASE_URL\n")
  os.exit(2)
end
local N = tonumber(os.getenv("ES_BENCH_LAG_N") or "300")
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

local now = require("eventsourcing.core").monotonic

local function shq(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
local stop_file = os.tmpname()
os.remove(stop_file)

local function spawn(listen)
  local code = MODEL .. ([[
local store = assert(es.open(%q, { schema = %q }))
local p = es.projector(store, { M }, { listen = %s })
p:run { poll = %s, stop = function()
  local f = io.open(%q); if f then f:close(); return true end; return false end }
]]):format(url, schema, listen and ("%q"):format(url) or "false", listen and "1" or "0.1", stop_file)
  local env = ("LUA_PATH=%s LUA_CPATH=%s"):format(shq(package.path), shq(package.cpath))
  local interp = rawget(_G, "jit") and "luajit" or "lua5.4"
  local f = assert(io.popen(("env %s %s -e %s >/dev/null 2>&1 & echo $!"):format(env, interp, shq(code))))
  local pid = f:read("*l")
  f:close()
  return pid
end

local function measure(label, listen, n)
  local pid = spawn(listen)
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
  local core = require "eventsourcing.core"
  for i = 1, n do
    -- arrive at a random moment of the poll period, as real appends do
    -- (right after the last one became visible is always just after a poll)
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
  os.execute("while kill -0 " .. pid .. " 2>/dev/null; do sleep 0.05; done")
  os.remove(stop_file)
  table.sort(lags)
  local function pct(p) return lags[math.max(1, math.ceil(#lags * p))] end
  print(("lag_%s_median %.2f ms"):format(label, pct(0.5)))
  print(("lag_%s_p99 %.2f ms"):format(label, pct(0.99)))
end

measure("listen", true, N)
measure("poll100ms", false, math.max(20, math.floor(N / 3)))
store:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
store:close()
