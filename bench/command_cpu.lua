-- bench/command_cpu.lua: the CPU of one POST /orders/{id}/items without
-- HTTP, one command after the other: orders.http.worker.handle (what a
-- pool thread runs) in this process, against a PostgreSQL of its own.
--
--   LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" \
--   LUA_CPATH="build/luajit/?.so;;" luajit bench/command_cpu.lua URL [COMMANDS]
--
-- Prints `name value unit` lines: this process's CPU per command
-- (os.clock: Lua, JSON, libpq), the CPU of every other client backend of
-- the database (/proc, so the database must be this benchmark's alone)
-- and the wall time, for the order service as it runs and, alternated in
-- the same run, with the repository's events appended without new_ids
-- (their ids then looked up as a retry's would be: the named
-- alternative, round 3's append), and without the state cache (each
-- command reads and folds its order's stream: `*_no_state_cache`).
-- Serial, so it holds better than the HTTP rates on a shared machine; no
-- nginx, no wake-ups of a thread pool.
local es = require "eventsourcing"
local core = require "eventsourcing.core"
local service = require "orders.service"

local URL = assert(arg[1], "usage: command_cpu.lua URL [COMMANDS]")
local N = tonumber(arg[2] or "") or 3000
local ORDERS = 300
local FLAVOUR = rawget(_G, "jit") and "luajit" or "lua54"
local SCHEMA = "es_bench_cmd_" .. FLAVOUR

local admin = assert(es.open(URL))
assert(admin:query("DROP SCHEMA IF EXISTS " .. SCHEMA .. " CASCADE"))

-- CPU ticks of the database's client backends but this admin session
local HZ = 100
local function backend_ticks()
  local rows = assert(admin:query("SELECT pid FROM pg_stat_activity"
    .. " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"))
  local sum = 0
  for _, r in ipairs(rows) do
    local f = io.open("/proc/" .. r.pid .. "/stat")
    if f then
      local fields = {}
      for x in f:read("*a"):match("%) (.*)"):gmatch("%S+") do fields[#fields + 1] = x end
      f:close()
      sum = sum + tonumber(fields[12]) + tonumber(fields[13])
    end
  end
  return sum
end

local function seed()
  local store = assert(es.open(URL, { schema = SCHEMA }))
  assert(service.migrate(store))
  local svc = service.new(store)
  local ids = {}
  for i = 1, ORDERS do
    ids[i] = assert(svc.create_order({ customer_id = "bench" }, { user = "bench" }))
    for k = 1, 3 do
      assert(svc.add_item { order_id = ids[i], product_id = "seed" .. k, quantity = k, unit_price = 100 })
    end
  end
  store:close()
  return ids
end

local worker = require "orders.http.worker"
local tokens = os.getenv("ES_BENCH_TOKENS") or "examples/orders/http/tokens.json"
local function configure(state_cache)
  worker.configure { database_url = URL, schema = SCHEMA, tokens_path = tokens,
                     state_cache = state_cache }
end
configure(true)
local AUTH = "Bearer admin-token-0123456789"
local ids = seed()
local count = 0

local function command()
  count = count + 1
  local status = worker.handle("POST", "/orders/" .. ids[count % #ids + 1] .. "/items", AUTH, nil,
    ('{"product_id":"b%d","quantity":1,"unit_price":100}'):format(count), nil, "bench-" .. count)
  assert(status == 200, "POST answered " .. tostring(status))
end

-- round 3's append: the repository's ids looked up as if sent before
local repository = require "eventsourcing.repository"
local events_to_append = repository.events_to_append
local function old_ids(on)
  repository.events_to_append = on and function(...)
    return (events_to_append(...)), false
  end or events_to_append
end

for _ = 1, 300 do command() end   -- connections, prepared statements, JIT
local totals = {}
local VARIANTS = { "new_ids", "looked_up", "no_state_cache" }
for _ = 1, 4 do
  for _, variant in ipairs(VARIANTS) do
    old_ids(variant == "looked_up")
    -- a new session and state cache (or none), then one command per order
    -- untimed: every order's state is in the cache when it is used
    configure(variant ~= "no_state_cache")
    for _ = 1, #ids do command() end
    local n = math.floor(N / 4)
    local p0, c0, t0 = backend_ticks(), os.clock(), core.monotonic()
    for _ = 1, n do command() end
    local p1, c1, t1 = backend_ticks(), os.clock(), core.monotonic()
    local t = totals[variant] or { n = 0, client = 0, server = 0, wall = 0 }
    t.n, t.client = t.n + n, t.client + (c1 - c0)
    t.server, t.wall = t.server + (p1 - p0) / HZ, t.wall + (t1 - t0)
    totals[variant] = t
  end
end
old_ids(false)
for _, variant in ipairs(VARIANTS) do
  local t = totals[variant]
  local name = ("add_item_serial_%s_%s"):format(FLAVOUR, variant)
  print(("%s_cpu_client %.1f us/cmd"):format(name, t.client / t.n * 1e6))
  print(("%s_cpu_pg %.1f us/cmd"):format(name, t.server / t.n * 1e6))
  print(("%s_wall %.1f us/cmd"):format(name, t.wall / t.n * 1e6))
end
assert(admin:query("DROP SCHEMA " .. SCHEMA .. " CASCADE"))
