-- bench/rebuild_cpu.lua: CPU per event of a one-worker rebuild of rm_orders
-- and of the bare read it does, this process's (and its main thread's) and
-- the server's, for A/B work on a busy machine (CPU time sways much less
-- than rates do). The events stay between runs (schema
-- bench_rebuild_cpu_<N>), so a second call measures at once.
--
--   ES_BENCH_DATABASE_URL=... ES_BENCH_EVENTS=1000000 ES_BENCH_RUNS=3 \
--   LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/luajit/?.so;;" \
--     luajit bench/rebuild_cpu.lua
--
-- The server's CPU is the sum over every process of the cluster (its
-- backends, the rebuild's write session's included, and the background
-- workers), from /proc: run it on the machine the server runs on.
local es = require "eventsourcing"
local orders_rm = require "orders.read_model"
local now = require("eventsourcing.core").monotonic

local url = os.getenv("ES_BENCH_DATABASE_URL") or os.getenv("ES_TEST_DATABASE_URL")
if not url or url == "" then
  io.stderr:write("bench/rebuild_cpu.lua: set ES_BENCH_DATABASE_URL or ES_TEST_DATABASE_URL\n")
  os.exit(2)
end
local N = math.max(10000, math.floor(tonumber(os.getenv("ES_BENCH_EVENTS") or "1000000") / 10000) * 10000)
local RUNS = tonumber(os.getenv("ES_BENCH_RUNS") or "3")
local BATCH = tonumber(os.getenv("ES_BENCH_BATCH") or "10000")
local schema = ("bench_rebuild_cpu_%d"):format(N)
local store = assert(es.open(url, { schema = schema }))
assert(store:migrate())
local q = '"' .. schema .. '"'
local have = store:query(("SELECT count(*) AS n FROM %s.events"):format(q))[1].n
if have ~= N then
  assert(store:query(("TRUNCATE %s.events"):format(q)))
  local t0 = now()
  dofile("bench/rebuild_events.lua")(store, q, N)
  io.stderr:write(("generated %d events in %.1f s\n"):format(N, now() - t0))
end

-- the cluster's CPU seconds so far: every child of the postmaster
local function ppid_of(pid)
  local f = io.open(("/proc/%d/stat"):format(pid))
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  local rest = s:match("%) (.*)$")
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  -- fields[1] is the state: ppid is [2], utime [12], stime [13]
  return tonumber(fields[2]), (tonumber(fields[12]) + tonumber(fields[13])) / 100
end
local postmaster = ppid_of(store:query("SELECT pg_backend_pid() AS p")[1].p)
local function server_cpu()
  local total = 0
  local ls = io.popen("ls /proc")
  for name in ls:lines() do
    local pid = tonumber(name)
    if pid then
      local pp, cpu = ppid_of(pid)
      if pp == postmaster then total = total + cpu end
    end
  end
  ls:close()
  return total
end

local types = { "OrderCreated", "ItemAdded", "ItemRemoved", "OrderPlaced", "OrderCancelled" }
-- the read a rebuild does (projector.lua, _replay_on), without handlers
local function bare_read()
  local n, after = 0, nil
  repeat
    local b, cp = assert(store:read_all({ after = after, limit = BATCH, prefetch = true, types = types,
      checkpoints = false, category = "Order", lazy = true }))
    n, after = n + #b, cp
  until #b < BATCH
  assert(n == N, ("bare read got %d of %d events"):format(n, N))
end

local projector = es.projector(store, { orders_rm.Orders }, { batch_size = BATCH })
assert(projector:migrate())
local PHASES = { "read", "keys", "load", "handlers", "build", "encode", "write", "indexes", "wait", "swap" }
local last_timings
local function rebuild()
  last_timings = {}
  local done = assert(projector:rebuild("rm_orders", { batch_size = BATCH, timings = last_timings }))
  assert(done == N, ("rebuild replayed %d of %d events"):format(done, N))
end

-- this process's main thread alone (os.clock counts its threads too: the
-- store's prefetch and copy threads): the thread that builds the events
-- and runs the handlers, whose time bounds one worker's rate
local main_tid = tonumber(io.open("/proc/self/stat"):read("*l"):match("^(%d+)"))
local function main_cpu()
  local f = io.open(("/proc/self/task/%d/stat"):format(main_tid))
  if not f then return 0 end
  local s = f:read("*l")
  f:close()
  local fields = {}
  for w in s:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = w end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

local function measure(name, f)
  collectgarbage()
  local w, c, m, s = now(), os.clock(), main_cpu(), server_cpu()
  f()
  w, c, m, s = now() - w, os.clock() - c, main_cpu() - m, server_cpu() - s
  print(("%s rate %.0f events/s, client %.2f us/event (main thread %.2f), server %.2f us/event"):format(
    name, N / w, c * 1e6 / N, m * 1e6 / N, s * 1e6 / N))
end

print(("%s, %d events, load %s"):format(jit and jit.version or _VERSION, N,
  (io.open("/proc/loadavg"):read("*l"):match("^(%S+ %S+ %S+)"))))
for _ = 1, RUNS do
  measure("bare_read", bare_read)
  measure("rebuild", rebuild)
  local parts = {}
  for _, p in ipairs(PHASES) do
    parts[#parts + 1] = ("%s %.2f"):format(p, (last_timings[p] or 0) * 1e6 / N)
  end
  print("  phases (us/event): " .. table.concat(parts, ", "))
end
store:close()
