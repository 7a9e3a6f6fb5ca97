-- Reliability of workflows (PostgreSQL, child processes): kill -9 of a
-- workflow process in the middle of chains and a restart, two workflow
-- processes at once while orders keep coming, the lease. Afterwards no
-- effect is doubled and every chain is complete.
package.path = "examples/?.lua;" .. package.path

local es = require "eventsourcing"
local helpers = require "helpers"
local service = require "orders.service"
local workflows = require "orders.workflows"

-- Every PostgreSQL test gets a fresh schema (helpers.open), memory ones a
-- fresh store.
local open_store = helpers.open

local q = helpers.shell_quote

local sh, sleep = helpers.sh, helpers.sleep

local work      -- helpers.workdir of the running test
local function spawn(code, name, env) return work:spawn(code, name, env) end
local wait_exit = helpers.wait_exit
local function read_file(path) return helpers.read_file(path) or "" end

-- A workflow process: the order workflows, each handler slowed down by
-- ES_SPEC_SLOW seconds (busy wait), until the stop file exists.
local function runner_code(schema, batch, stop_file)
  return ([[
package.path = "examples/?.lua;" .. package.path
local es = require "eventsourcing"
local workflows = require "orders.workflows"
local url = os.getenv("ES_TEST_DATABASE_URL")
local store = assert(es.open(url, { schema = %q }))
local slow = tonumber(os.getenv("ES_SPEC_SLOW") or "0")
local wf = workflows.fulfilment { draft_ttl = false }
for t, f in pairs(wf.on) do
  wf.on[t] = function(e, ctx)
    if slow > 0 then local t0 = os.clock(); while os.clock() - t0 < slow do end end
    return f(e, ctx)
  end
end
local runner = es.workflow.runner(store, { wf }, { aggregates = workflows.aggregates, batch_size = %d,
  read_models = require("orders.service").read_models, listen = url, backoff = 0.01 })
local stop_file = %q
runner:run { poll = 0.1, on_error = function(e) io.stderr:write(tostring(e), "\n") end, stop = function()
  local f = io.open(stop_file); if f then f:close(); return true end; return false end }
print("done", runner.stats.handled)
]]):format(schema, batch, stop_file)
end

describe("workflow reliability (processes, PostgreSQL)", function()
  local store, schema, svc, repo

  before_each(function()
    store, schema = open_store({ name = "postgresql", url = helpers.database_url() })
    assert(service.migrate(store))
    svc = service.new(store)
    repo = es.repository(store)
    assert(workflows.runner(store, { draft_ttl = false }):migrate())
    work = helpers.workdir("es-wf41")
  end)
  after_each(function()
    sh("touch " .. q(work.dir .. "/stop"))
    store:close()
    sh("sleep 0.3")     -- let the runners see the stop file
    work:remove()
  end)

  local function sql(s, ...)
    return assert(store:query((s:gsub("<s>", '"' .. schema .. '"')), ...))
  end

  -- Orders: i = 1..n, lines p1 x1, p2 x (i % 3 + 1), and every 4th order
  -- p3 x 2: p3 runs out, so later orders are compensated.
  local function make_orders(first, n)
    local ids = {}
    for i = first, first + n - 1 do
      local id = assert(svc:create_order { customer_id = "c" .. (i % 5) })
      assert(svc:add_item { order_id = id, product_id = "p1", quantity = 1, unit_price = 100 })
      assert(svc:add_item { order_id = id, product_id = "p2", quantity = i % 3 + 1, unit_price = 100 })
      if i % 4 == 0 then
        assert(svc:add_item { order_id = id, product_id = "p3", quantity = 2, unit_price = 100 })
      end
      assert(svc:place_order { order_id = id })
      ids[#ids + 1] = id
    end
    return ids
  end

  local function caught_up()
    local r = sql("SELECT (SELECT position FROM <s>.workflows WHERE name = 'order-fulfilment') AS cp, "
      .. "(SELECT max(position) FROM <s>.events) AS last")
    return r[1].cp == r[1].last
  end

  local function wait_caught_up(seconds)
    local stable = 0
    for _ = 1, seconds * 10 do
      if caught_up() then
        stable = stable + 1
        if stable >= 3 then return true end
      else
        stable = 0
      end
      sleep(0.1)
    end
    return false
  end

  -- No effect twice, every chain complete, stock consistent.
  local function assert_consistent(ids)
    local dups = sql([[SELECT stream, type, data->>'order_id' AS o, count(*) AS n FROM <s>.events
      WHERE category = 'Inventory' AND type <> 'StockReceived' GROUP BY 1, 2, 3 HAVING count(*) > 1]])
    assert.same({}, dups)
    local dup_cancel = sql([[SELECT stream, count(*) AS n FROM <s>.events WHERE type = 'OrderCancelled'
      GROUP BY stream HAVING count(*) > 1]])
    assert.same({}, dup_cancel)
    local held = { p1 = 0, p2 = 0, p3 = 0 }
    local placed, cancelled = 0, 0
    local inv = {}
    for _, p in ipairs { "p1", "p2", "p3" } do inv[p] = assert(repo:load(workflows.Inventory, p)) end
    for _, id in ipairs(ids) do
      local o = assert(repo:load(workflows.Order, id))
      if o.status == "placed" then
        placed = placed + 1
        for _, it in ipairs(o.items) do
          assert.equal(it.quantity, inv[it.product_id].reservations[id], "reservation of " .. id)
          held[it.product_id] = held[it.product_id] + it.quantity
        end
      else
        assert.equal("cancelled", o.status)
        assert.equal("out of stock", o.cancel_reason)
        cancelled = cancelled + 1
        for _, p in ipairs { "p1", "p2", "p3" } do
          assert.is_nil(inv[p].reservations[id], "a cancelled order still holds " .. p)
        end
      end
    end
    for p, n in pairs(held) do
      assert.equal(n, inv[p].reserved)
      assert.is_true(inv[p].on_hand - inv[p].reserved >= 0)
    end
    assert.is_true(placed > 0 and cancelled > 0, ("placed %d cancelled %d"):format(placed, cancelled))
    -- the read model saw the workflow's cancellations (inline)
    local rm = sql("SELECT count(*) AS n FROM <s>.rm_orders WHERE status = 'cancelled'")
    assert.equal(cancelled, rm[1].n)
    -- the checkpoint counted each handled event once
    local handled = sql([[SELECT (SELECT handled FROM <s>.workflows WHERE name = 'order-fulfilment') AS h,
      (SELECT count(*) FROM <s>.events WHERE type IN ('OrderCreated', 'OrderPlaced', 'OrderCancelled')) AS n]])
    assert.equal(handled[1].n, handled[1].h)
    return placed, cancelled
  end

  local function stock_up()
    assert(workflows.receive_stock(repo, { product_id = "p1", quantity = 1000 }))
    assert(workflows.receive_stock(repo, { product_id = "p2", quantity = 1000 }))
    assert(workflows.receive_stock(repo, { product_id = "p3", quantity = 8 }))
  end

  it("kill -9 of a workflow process in the middle of chains: a restart completes them, nothing twice", function()
    stock_up()
    local ids = make_orders(1, 24)
    local stop = work.dir .. "/stop-victim"
    local pid, log = spawn(runner_code(schema, 3, stop), "victim", "ES_SPEC_SLOW=0.03")
    local progressed = false
    for _ = 1, 200 do
      local r = sql("SELECT count(*) AS n FROM <s>.events WHERE type = 'StockReserved'")
      if r[1].n >= 6 then progressed = true; break end
      sleep(0.05)
    end
    assert.is_true(progressed, read_file(log))
    sh("kill -9 " .. pid)
    assert.is_true(wait_exit(pid, 10))
    assert.is_false(caught_up(), "the chains were done before the kill")
    local pid2, log2 = spawn(runner_code(schema, 5, work.dir .. "/stop"), "restarted")
    assert.is_true(wait_caught_up(60), read_file(log2))
    sh("touch " .. q(work.dir .. "/stop"))
    assert.is_true(wait_exit(pid2, 30), read_file(log2))
    assert.matches("done", read_file(log2))
    assert_consistent(ids)
    -- and a replay from the start appends nothing (derived ids)
    local before = sql("SELECT count(*) AS n FROM <s>.events")[1].n
    local r = workflows.runner(store, { draft_ttl = false })
    assert(r:reset("order-fulfilment"))
    assert(r:catch_up())
    assert.equal(before, sql("SELECT count(*) AS n FROM <s>.events")[1].n)
  end)

  it("two workflow processes at once never double an effect, while orders keep coming", function()
    stock_up()
    local stop = work.dir .. "/stop"
    local a, alog = spawn(runner_code(schema, 2, stop), "a", "ES_SPEC_SLOW=0.002")
    local b, blog = spawn(runner_code(schema, 2, stop), "b", "ES_SPEC_SLOW=0.002")
    local ids = make_orders(1, 12)
    sleep(0.2)
    for _, id in ipairs(make_orders(13, 12)) do ids[#ids + 1] = id end
    assert.is_true(wait_caught_up(60), read_file(alog) .. read_file(blog))
    sh("touch " .. q(stop))
    assert.is_true(wait_exit(a, 30), read_file(alog))
    assert.is_true(wait_exit(b, 30), read_file(blog))
    assert.matches("done", read_file(alog))
    assert.matches("done", read_file(blog))
    assert_consistent(ids)
  end)

  it("the lease: while one runner holds a workflow's checkpoint row, another skips it", function()
    stock_up()
    make_orders(1, 2)
    local other = assert(es.open(helpers.database_url(), { schema = schema }))
    local r1 = workflows.runner(store, { draft_ttl = false })
    local r2 = workflows.runner(other, { draft_ttl = false })
    assert(r1:migrate())
    local row = r1.engine:lock(r1.engine.subs[1])   -- hold the lease in an open transaction
    assert.is_table(row)
    local n, st = r2.engine:batch(r2.engine.subs[1])
    assert.equal(0, n)
    assert.equal("locked", st)
    store:rollback()
    assert(r2:catch_up())
    assert.is_true(caught_up())
    other:close()
  end)
  it("a lost connection is retried with backoff and the workflow goes on", function()
    stock_up()
    local ids = make_orders(1, 4)
    local other = assert(es.open(helpers.database_url(), { schema = schema }))
    local r = workflows.runner(other, { draft_ttl = false, listen = false, backoff = 0.01 })
    assert(r:migrate())
    local pid = assert(other:query("SELECT pg_backend_pid() AS p"))[1].p
    assert(store:query("SELECT pg_terminate_backend($1::int)", pid))
    local errors = {}
    local deadline = es.workflow.now() + 20
    r:run { poll = 0.05, on_error = function(e) errors[#errors + 1] = e end,
      stop = function() return caught_up() or es.workflow.now() > deadline end }
    assert.is_true(caught_up())
    assert.is_true(#errors >= 1)
    assert.equal("connection", errors[1].kind)
    local placed = 0
    for _, id in ipairs(ids) do
      if (repo:load(workflows.Order, id)).status == "placed" then placed = placed + 1 end
    end
    assert.equal(4, placed)
    assert.equal(4, sql("SELECT count(*) AS n FROM <s>.events WHERE type = 'StockReserved' "
      .. "AND stream = 'Inventory-p1'")[1].n)
    other:close()
  end)
end)
