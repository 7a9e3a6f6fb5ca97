-- bench/group_catchup.lua: catch-up of a read model over ES_BENCH_GROUP_EVENTS
-- events (default 1,000,000, on 10,000 streams) by a consumer group of 1,
-- 2 and 4 member processes (16 partitions), against one plain projector
-- process (no group: one checkpoint, the C read path). Each run is a new
-- read model, timed from the start of the processes until every partition
-- has no lag. Prints `name value unit`.
--
--   ES_BENCH_DATABASE_URL (or ES_TEST_DATABASE_URL), ES_BENCH_GROUP_EVENTS,
--   ES_BENCH_GROUP_MEMBERS (default "1 2 4")
local es = require "eventsourcing"
local core = require "eventsourcing.core"

local url = os.getenv("ES_BENCH_DATABASE_URL") or os.getenv("ES_TEST_DATABASE_URL")
if not url or url == "" then
  io.stderr:write("bench/group_catchup.lua: set ES_BENCH_DATABASE_URL or ES_TEST_DATABASE_URL\n")
  os.exit(2)
end
local N = tonumber(os.getenv("ES_BENCH_GROUP_EVENTS") or "1000000")
local STREAMS = math.max(1, math.min(10000, math.floor(N / 100)))
local schema = ("bench_group_%d"):format(os.time() % 1000000)
local store = assert(es.open(url, { schema = schema }))
assert(store:migrate())
local now = core.monotonic

-- 1. the log: 100-event appends, streams round robin
local t0 = now()
local per = math.floor(N / STREAMS)
for s = 1, STREAMS do
  local left = per
  while left > 0 do
    local evs = {}
    for k = 1, math.min(100, left) do evs[k] = { type = "Counted", data = { k = k } } end
    assert(store:append("Acct-" .. s, evs))
    left = left - #evs
  end
end
local total = per * STREAMS
io.stderr:write(("group_catchup: %d events appended in %.1f s\n"):format(total, now() - t0))

local MODEL = [[
local es = require "eventsourcing"
local function model(name)
  return es.read_model { name = name, columns = { id = "text", n = "bigint", last = "bigint" },
    on = { Counted = function(row, e) row.n = (row.n or 0) + 1; row.last = e.version end } }
end
]]
local model = assert(load(MODEL .. " return model"))()

local function shq(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
local interp = rawget(_G, "jit") and "luajit" or "lua5.4"
local env = ("LUA_PATH=%s LUA_CPATH=%s"):format(shq(package.path), shq(package.cpath))

local function spawn(code)
  local f = assert(io.popen(("env %s %s -e %s >/dev/null 2>&1 & echo $!"):format(env, interp, shq(code))))
  local pid = f:read("*l")
  f:close()
  return pid
end

local function run(label, name, members, group)
  local stop_file = os.tmpname()
  os.remove(stop_file)
  -- migrate first, so the members do not all race to create the table
  local rm = model(name)
  local p = es.projector(store, { rm }, group and { group = { name = name, partitions = 16, member = "setup" } })
  assert(p:migrate())
  local t_start = now()
  local pids = {}
  for m = 1, members do
    local opts = group and ("group = { name = %q, partitions = 16, member = 'm%d', heartbeat = 0.5 }")
      :format(name, m) or ""
    pids[m] = spawn(MODEL .. ([[
local store = assert(es.open(%q, { schema = %q }))
local p = es.projector(store, { model(%q) }, { batch_size = 5000, %s })
p:run { poll = 0.2, stop = function()
  local f = io.open(%q); if f then f:close(); return true end; return false end }
]]):format(url, schema, name, opts, stop_file))
  end
  -- done when every unit is past the last event
  local t_end
  while true do
    core.sleep(0.2)
    local st = assert(p:status())[1]
    if st.handled >= total and st.lag_events == 0 then t_end = now(); break end
    assert(now() - t_start < 3600, "catch-up did not finish")
  end
  local f = io.open(stop_file, "w"); f:close()
  for _, pid in ipairs(pids) do os.execute("while kill -0 " .. pid .. " 2>/dev/null; do sleep 0.05; done") end
  os.remove(stop_file)
  local secs = t_end - t_start
  -- every stream counted exactly
  local r = assert(store:query(('SELECT count(*) AS n, sum(n) AS s FROM "%s".%s'):format(schema, name)))
  assert(r[1].n == STREAMS and tonumber(r[1].s) == total, ("%s: %s rows, %s events"):format(name, r[1].n, r[1].s))
  print(("group_catchup_%s %.0f events/s"):format(label, total / secs))
  print(("group_catchup_%s_seconds %.1f s"):format(label, secs))
end

run("plain_1", "rm_plain", 1, false)
for m in (os.getenv("ES_BENCH_GROUP_MEMBERS") or "1 2 4"):gmatch("%d+") do
  run(m .. "_members", "rm_group" .. m, tonumber(m), true)
end
store:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
store:close()
