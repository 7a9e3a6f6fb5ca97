-- bench/rm_write.lua: PostgreSQL's CPU for a read model's row write, the
-- statements the library sends now against round 5's shape for every
-- write (the named alternative: a DELETE of the batch's deleted keys, an
-- empty JSON array, beside json_populate_recordset of the rows as JSON;
-- today's statement for batches with deletes, which is that shape).
--
--   LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" \
--   LUA_CPATH="build/lua5.4/?.so;;" lua5.4 bench/rm_write.lua URL [TRANSACTIONS]
--
-- Each transaction is BEGIN, one write of rm_orders rows (300 orders of 5
-- items, rows taken in turn), COMMIT. Prints `name value unit` lines: the
-- backend's CPU per transaction (/proc, ticks of 10 ms: use a few thousand
-- transactions) for
--   rm_write_one_typed      one row, a typed parameter per column (now)
--   rm_write_one_json       the same row by round 5's statement shape
--   rm_write_5_typed        five rows, typed parameters (now)
--   rm_write_5_upsert       the same five as JSON without the DELETE (what
--                           more than ReadModel._TYPED_MAX rows take now)
--   rm_write_5_json_delete  the same five by round 5's statement shape
-- Variants alternate in twelve rounds (3 * TRANSACTIONS each in all), in
-- one session.
local es = require "eventsourcing"
local service = require "orders.service"
local Orders = require("orders.read_model").Orders

local URL = assert(arg[1], "usage: rm_write.lua URL [TRANSACTIONS]")
local N = tonumber(arg[2] or "") or 3000
local SCHEMA = "es_bench_rm_write"

local admin = assert(es.open(URL))
assert(admin:query("DROP SCHEMA IF EXISTS " .. SCHEMA .. " CASCADE"))
local store = assert(es.open(URL, { schema = SCHEMA }))
assert(service.migrate(store))
local svc = service.new(store)
for _ = 1, 300 do
  local id = assert(svc.create_order({ customer_id = "bench" }, { user = "bench" }))
  for k = 1, 5 do
    assert(svc.add_item { order_id = id, product_id = "seed" .. k, quantity = k, unit_price = 100 })
  end
end

local pid = assert(store:query("SELECT pg_backend_pid() AS p"))[1].p
local function ticks()
  local f = assert(io.open("/proc/" .. pid .. "/stat"))
  local fields = {}
  for x in f:read("*a"):match("%) (.*)"):gmatch("%S+") do fields[#fields + 1] = x end
  f:close()
  return tonumber(fields[12]) + tonumber(fields[13])
end

-- the rows as a load gives them, cleaned as a write takes them
local rows = assert(store:query(("SELECT %s FROM %s ORDER BY id"):format(Orders:_select_list(),
  Orders:_qualified(store))))
for i, r in ipairs(rows) do rows[i] = Orders:_clean(r) end
local sqls = Orders:_write_sqls(store, nil, false)
local unpack = table.unpack or unpack   -- luacheck: ignore 143
local function batch(i, k)
  local out = {}
  for j = 0, k - 1 do out[#out + 1] = rows[(i + j) % #rows + 1] end
  return out
end
local function typed(i, k)
  local params, nc = {}, #Orders.columns
  for r, row in ipairs(batch(i, k)) do assert(Orders:_row_params(row, params, (r - 1) * nc)) end
  return Orders:_typed_sql(sqls, k), unpack(params, 1, k * nc)
end
local variants = {
  { "rm_write_one_typed", function(i) return typed(i, 1) end },
  { "rm_write_one_json", function(i) return sqls.many, assert(Orders:_encode_rows(batch(i, 1))), "[]" end },
  { "rm_write_5_typed", function(i) return typed(i, 5) end },
  { "rm_write_5_upsert", function(i) return sqls.upsert, assert(Orders:_encode_rows(batch(i, 5))) end },
  { "rm_write_5_json_delete", function(i) return sqls.many, assert(Orders:_encode_rows(batch(i, 5))), "[]" end },
}

-- many short rounds: other work on the machine comes and goes in bursts,
-- and each variant should see as much of it as the others
local ROUNDS = 12
local per = math.max(1, math.floor(3 * N / ROUNDS))
local total = {}
for round = 1, ROUNDS do
  for _, v in ipairs(variants) do
    local t0 = ticks()
    for i = 1, per do
      assert(store:begin())
      assert(store:query(v[2](i * 7 + round)))
      assert(store:commit())
    end
    total[v[1]] = (total[v[1]] or 0) + (ticks() - t0)
  end
end
for _, v in ipairs(variants) do
  print(("%s_cpu_pg %.1f us/tx"):format(v[1], total[v[1]] * 1e4 / (ROUNDS * per)))
end
store:close()
assert(admin:query("DROP SCHEMA " .. SCHEMA .. " CASCADE"))
