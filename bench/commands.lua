-- bench/commands.lua - AddItem commands/s end to end (load + decide +
-- append through es.repository), 2 client processes, on orders with 10 and
-- with 1,000 prior events, without snapshots and with snapshot_every = 100.
--
--   ES_BENCH_DATABASE_URL=conninfo \
--   LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/lua5.4/?.so;;" lua5.4 bench/commands.lua [URL]
--
-- Settings: BENCH_SECS (seconds per measured phase, default 5),
-- BENCH_CLIENTS (default 2), BENCH_SCHEMA (default es_bench_cmd_<pid>,
-- dropped at the end). Prints one `name value unit` line per figure:
--   commands_prior10_nosnap_<flavour>  N cmd/s   commands_prior10_snap100_<flavour>  N cmd/s
--   commands_prior1000_nosnap_<flavour> N cmd/s  commands_prior1000_snap100_<flavour> N cmd/s
--   commands_prior1000_snapshot_speedup_<flavour> X x  (snap100 / nosnap: the alternative)
--   commands_prior10_snapshot_ratio_<flavour> X x      (what snapshots cost on short streams)
-- (<flavour> is lua5.4 or luajit, from the interpreter running this file.)
-- plus `#` comment lines. The parent prepares the orders (direct appends),
-- starts the clients (this file with --client), releases them together and
-- sums their rates. Each client works on orders of its own, round robin.
package.path = "examples/?.lua;" .. package.path

local es = require "eventsourcing"

local SECS = tonumber(os.getenv("BENCH_SECS")) or 5
local CLIENTS = tonumber(os.getenv("BENCH_CLIENTS")) or 2
local PRODUCTS = 20

local function price_of(p) return p * 100 + 99 end

-- a clock of this process: no round trip inside the timed loop
local monotonic = require("eventsourcing.core").monotonic
local function now() return monotonic() end

local function order_id(scenario, client, k)
  return ("%s-c%d-%d"):format(scenario, client, k)
end

-- ---- client ------------------------------------------------------------------

local function client_main(url, schema, scenario, client, norders, snapshots, run)
  local Order = require "orders.order"
  local store = assert(es.open(url, { schema = schema }))
  local repo = es.repository(store, { snapshots = snapshots, max_retries = 3 })
  local ids = {}
  for k = 1, norders do ids[k] = order_id(scenario, client, k) end
  local i = 0
  local function one()
    i = i + 1
    local id = ids[(i - 1) % norders + 1]
    local p = math.floor((i - 1) / norders) % PRODUCTS + 1
    local r, err = repo:execute(Order, id, "AddItem",
      { product_id = "p" .. p, quantity = 1, unit_price = price_of(p) },
      { metadata = { user = "bench" } })
    if not r then error("AddItem on " .. id .. ": " .. tostring(err)) end
  end
  -- warm up: every order once (prepared statements, caches, snapshots)
  for _ = 1, norders do one() end
  local folded0 = repo.stats.events_folded
  assert(store:append("BenchReady-" .. run, { type = "Ready", data = { client = client } }))
  while store:version("BenchGo-" .. run) == 0 do
    store:query("SELECT pg_sleep(0.002)")
  end
  local n, t0 = 0, now()
  local deadline, t = t0 + SECS, t0
  while t < deadline do
    for _ = 1, 10 do one() end
    n = n + 10
    t = now()
  end
  store:close()
  io.write(("commands %d seconds %.6f folded %d\n"):format(n, t - t0,
    repo.stats.events_folded - folded0))
end

if arg[1] == "--client" then
  client_main(arg[2], arg[3], arg[4], tonumber(arg[5]), tonumber(arg[6]),
    arg[7] == "1", arg[8])
  os.exit(0)
end

-- ---- parent ------------------------------------------------------------------

local url = arg[1] or os.getenv("ES_BENCH_DATABASE_URL")
if not url or url == "" then
  io.stderr:write("bench/commands.lua: set ES_BENCH_DATABASE_URL (or pass a URL)\n")
  os.exit(2)
end
local function pid()
  local f = io.open("/proc/self/stat")
  local line = f and f:read("*l") or ""
  if f then f:close() end
  return tonumber(line:match("^(%d+)")) or os.time()
end
local schema = os.getenv("BENCH_SCHEMA") or ("es_bench_cmd_%d"):format(pid())
local store = assert(es.open(url, { schema = schema }))
assert(store:migrate())

local flavour = rawget(_G, "jit") and "luajit" or "lua5.4"
local interp = arg[-1] or flavour
local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- orders with `prior` events: OrderCreated + ItemAdded (v2) over PRODUCTS
local function prepare(scenario, norders, prior)
  for c = 1, CLIENTS do
    for k = 1, norders do
      local id = order_id(scenario, c, k)
      local events = { { type = "OrderCreated", data = { order_id = id, customer_id = "c" .. c } } }
      local version = 0
      for j = 1, prior - 1 do
        local p = j % PRODUCTS + 1
        events[#events + 1] = { type = "ItemAdded", metadata = { schema_version = 2 },
          data = { product_id = "p" .. p, quantity = 1, unit_price = price_of(p) } }
        if #events == 500 then
          version = assert(store:append("Order-" .. id, events, { expected_version = version })).version
          events = {}
        end
      end
      if #events > 0 then
        assert(store:append("Order-" .. id, events, { expected_version = version }))
      end
    end
  end
end

local results = {}
local function phase(name, prior, norders, snapshots)
  local scenario = name
  prepare(scenario, norders, prior)
  local run = scenario .. "-" .. tostring(os.time())
  local env = ("env LUA_PATH=%s LUA_CPATH=%s "):format(q(package.path), q(package.cpath))
  local pipes = {}
  for c = 1, CLIENTS do
    local cmd = env .. q(interp) .. " bench/commands.lua --client " .. table.concat({
      q(url), q(schema), q(scenario), c, norders, snapshots and 1 or 0, q(run) }, " ")
    pipes[c] = assert(io.popen(cmd, "r"))
  end
  -- release the clients together once all are warmed up
  local ready_stream = "BenchReady-" .. run
  local t_wait = now()
  while store:version(ready_stream) < CLIENTS do
    store:query("SELECT pg_sleep(0.01)")
    if now() - t_wait > 600 then error("clients did not get ready") end
  end
  assert(store:append("BenchGo-" .. run, { type = "Go", data = {} }))
  local total, folded, cmds = 0, 0, 0
  for c = 1, CLIENTS do
    local out = pipes[c]:read("*a")
    pipes[c]:close()
    local n, secs, f = out:match("commands (%d+) seconds ([%d.]+) folded (%d+)")
    if not n then error(("client %d of %s failed:\n%s"):format(c, name, out)) end
    total = total + tonumber(n) / tonumber(secs)
    folded, cmds = folded + tonumber(f), cmds + tonumber(n)
  end
  results[name] = total
  print(("%s_%s %.0f cmd/s"):format(name, flavour, total))
  print(("# %s: %d orders x %d clients, %d prior events, %.1f events folded per command")
    :format(name, norders, CLIENTS, prior, folded / math.max(cmds, 1)))
end

print(("# AddItem end to end (load + decide + append), %d clients, %ss per phase, %s")
  :format(CLIENTS, SECS, flavour))
-- enough orders that the commands of a phase add only a few events to
-- each "10 prior events" order (the # line reports the mean folded)
local short_orders = math.max(500, math.floor(SECS * 400))
phase("commands_prior10_nosnap", 10, short_orders, false)
phase("commands_prior10_snap100", 10, short_orders, true)
phase("commands_prior1000_nosnap", 1000, 40, false)
phase("commands_prior1000_snap100", 1000, 40, true)
print(("commands_prior1000_snapshot_speedup_%s %.2f x"):format(flavour,
  results.commands_prior1000_snap100 / results.commands_prior1000_nosnap))
print(("commands_prior10_snapshot_ratio_%s %.2f x"):format(flavour,
  results.commands_prior10_snap100 / results.commands_prior10_nosnap))

if not os.getenv("BENCH_SCHEMA") then
  store:query(('DROP SCHEMA IF EXISTS "%s" CASCADE'):format(schema))
end
store:close()
