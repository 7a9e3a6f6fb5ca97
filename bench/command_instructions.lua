-- bench/command_instructions.lua: the driver of bench/command_instructions.sh.
-- Serial POST /orders/{id}/items through orders.http.worker.handle (what a
-- pool thread runs), against a schema of its own:
--
--   luajit bench/command_instructions.lua URL COMMANDS [LINES]
--
-- seeds 100 orders of LINES item lines (default 3), runs 50 commands to
-- open the connection and prepare statements, then COMMANDS more, spread
-- over the orders, and drops the schema. Prints nothing: the script counts
-- the instructions of two runs and divides their difference.
local es = require "eventsourcing"
local service = require "orders.service"

local URL = assert(arg[1], "usage: command_instructions.lua URL COMMANDS [LINES]")
local N = assert(tonumber(arg[2]), "COMMANDS must be a number")
local LINES = tonumber(arg[3] or "") or 3
local SCHEMA = ("es_cmd_ins_%d_%d"):format(os.time(), math.random(1, 1e9))

local store = assert(es.open(URL, { schema = SCHEMA }))
assert(service.migrate(store))
local svc = service.new(store)
local ids = {}
for i = 1, 100 do
  ids[i] = assert(svc.create_order({ customer_id = "bench" }, { user = "bench" }))
  for k = 1, LINES do
    assert(svc.add_item { order_id = ids[i], product_id = "seed" .. k, quantity = k, unit_price = 100 })
  end
end

local worker = require "orders.http.worker"
worker.configure { database_url = URL, schema = SCHEMA,
  tokens_path = os.getenv("ES_BENCH_TOKENS") or "examples/orders/http/tokens.json" }
local AUTH = "Bearer admin-token-0123456789"
local count = 0
local function command()
  count = count + 1
  local status, body = worker.handle("POST", "/orders/" .. ids[count % #ids + 1] .. "/items", AUTH,
    nil, ('{"product_id":"b%d","quantity":1,"unit_price":100}'):format(count), nil, "bench-" .. count)
  assert(status == 200, body)
end
for _ = 1, 50 + N do command() end
worker.configure { database_url = URL, schema = SCHEMA }   -- closes its connection
assert(store:query("DROP SCHEMA " .. SCHEMA .. " CASCADE"))
store:close()
