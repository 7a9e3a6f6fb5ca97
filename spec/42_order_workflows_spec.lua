-- The order workflows (examples/orders/workflows.lua) and the Inventory
-- aggregate, on both stores.
package.path = "examples/?.lua;" .. package.path

local es = require "eventsourcing"
local helpers = require "helpers"
local service = require "orders.service"
local workflows = require "orders.workflows"
local inventory = require "orders.inventory"
local given = require("eventsourcing.testing").given

-- Every PostgreSQL test gets a fresh schema (helpers.open), memory ones a
-- fresh store.
local open_store = helpers.open

local Inventory = inventory.Inventory

describe("Inventory aggregate", function()
  local received = { { type = "StockReceived", data = { product_id = "p1", quantity = 3 } } }

  it("reserves within the available stock, never below zero", function()
    given(Inventory, received):when("ReserveStock", { order_id = "o1", quantity = 2 })
      :expect { { type = "StockReserved", data = { order_id = "o1", quantity = 2 } } }
    given(Inventory, received):when("ReserveStock", { order_id = "o1", quantity = 4 })
      :expect { { type = "ReservationRejected", data = { order_id = "o1", quantity = 4, available = 3 } } }
    local held = { received[1], { type = "StockReserved", data = { order_id = "o1", quantity = 2 } } }
    given(Inventory, held):when("ReserveStock", { order_id = "o2", quantity = 2 })
      :expect { { type = "ReservationRejected", data = { order_id = "o2", quantity = 2, available = 1 } } }
  end)

  it("repeats are no-ops: a second reservation, a release of nothing", function()
    local held = { received[1], { type = "StockReserved", data = { order_id = "o1", quantity = 2 } } }
    given(Inventory, held):when("ReserveStock", { order_id = "o1", quantity = 2 }):expect_nothing()
    given(Inventory, received):when("ReleaseStock", { order_id = "o1" }):expect_nothing()
    given(Inventory, held):when("ReleaseStock", { order_id = "o1" })
      :expect({ { type = "StockReleased", data = { order_id = "o1", quantity = 2 } } })
      :expect_state { reserved = 0, on_hand = 3 }
  end)

  it("validates quantities and ids", function()
    given(Inventory):when("ReceiveStock", { product_id = "p1", quantity = 0 }):expect_error("invalid", "quantity")
    given(Inventory):when("ReceiveStock", { product_id = "p1", quantity = 1.5 }):expect_error("invalid", "quantity")
    given(Inventory):when("ReserveStock", { quantity = 1 }):expect_error("invalid", "order_id")
  end)
end)

for _, entry in ipairs(helpers.stores()) do
  describe("order workflows (" .. entry.name .. ")", function()
    local store, svc, repo, runner

    before_each(function()
      store = open_store(entry)
      assert(service.migrate(store))
      svc = service.new(store)
      repo = es.repository(store)
      runner = workflows.runner(store, { draft_ttl = 60 })
    end)
    after_each(function() if store then store:close() end end)

    local function stock(p) return assert(workflows.stock(repo, p)) end

    local function order(lines)
      local id = assert(svc:create_order { customer_id = "c1" })
      for _, l in ipairs(lines) do
        assert(svc:add_item { order_id = id, product_id = l[1], quantity = l[2], unit_price = 100 })
      end
      return id
    end

    local function settle()
      for _ = 1, 5 do assert(runner:catch_up()) end
    end

    local function count(stream, type_)
      local n = 0
      for e in assert(store:read(stream)) do if e.type == type_ then n = n + 1 end end
      return n
    end

    it("receive_stock and stock for the service", function()
      local r = assert(workflows.receive_stock(repo, { product_id = "p1", quantity = 5 }, { user = "u1" }))
      assert.equal(5, r.available)
      assert.same({ product_id = "p1", on_hand = 5, reserved = 0, available = 5, version = 1 }, stock("p1"))
      assert.same({ product_id = "zz", on_hand = 0, reserved = 0, available = 0, version = 0 }, stock("zz"))
      local _, err = workflows.receive_stock(repo, { product_id = "p1", quantity = -1 })
      assert.equal("invalid", err.kind)
      _, err = workflows.stock(repo, 42)
      assert.equal("invalid", err.kind)
    end)

    it("happy path: a placed order reserves every line", function()
      assert(workflows.receive_stock(repo, { product_id = "p1", quantity = 5 }))
      assert(workflows.receive_stock(repo, { product_id = "p2", quantity = 5 }))
      local id = order { { "p1", 2 }, { "p2", 3 } }
      assert(svc:place_order { order_id = id })
      settle()
      assert.equal(3, stock("p1").available)
      assert.equal(2, stock("p2").available)
      assert.equal("placed", assert(svc:get_order(id)).status)
      -- the expiry timer was cancelled on placement
      assert.equal(0, #assert(es.workflow.timers(store)))
      -- trace: OrderPlaced and the two reservations it caused
      local placed
      for _, e in ipairs(assert(svc:history(id))) do if e.type == "OrderPlaced" then placed = e end end
      local trace = assert(es.workflow.trace(store, placed.metadata.correlation_id))
      local types = {}
      for i, e in ipairs(trace) do types[i] = e.type end
      assert.same({ "OrderPlaced", "StockReserved", "StockReserved" }, types)
      assert.equal(placed.id, trace[2].metadata.causation_id)
      -- cancelling the placed order releases the stock
      assert(svc:cancel_order { order_id = id, reason = "changed my mind" })
      settle()
      assert.equal(5, stock("p1").available)
      assert.equal(5, stock("p2").available)
      assert.equal(1, count("Inventory-p1", "StockReleased"))
    end)

    it("out of stock: releases what was reserved and cancels the order", function()
      assert(workflows.receive_stock(repo, { product_id = "p1", quantity = 5 }))
      assert(workflows.receive_stock(repo, { product_id = "p2", quantity = 1 }))
      local id = order { { "p1", 2 }, { "p2", 3 } }
      assert(svc:place_order { order_id = id })
      settle()
      local o = assert(svc:get_order(id))       -- the inline read model saw the cancellation
      assert.equal("cancelled", o.status)
      assert.equal("out of stock", o.cancel_reason)
      assert.equal(5, stock("p1").available)
      assert.equal(1, stock("p2").available)
      assert.equal(1, count("Inventory-p1", "StockReserved"))
      assert.equal(1, count("Inventory-p1", "StockReleased"))
      assert.equal(1, count("Inventory-p2", "ReservationRejected"))
      local placed
      for _, e in ipairs(assert(svc:history(id))) do if e.type == "OrderPlaced" then placed = e end end
      local trace = assert(es.workflow.trace(store, placed.metadata.correlation_id))
      local types = {}
      for i, e in ipairs(trace) do types[i] = e.type end
      assert.same({ "OrderPlaced", "StockReserved", "ReservationRejected", "StockReleased", "OrderCancelled" }, types)
      -- replaying the whole history changes nothing
      assert(runner:reset("order-fulfilment"))
      settle()
      assert.equal(1, count("Inventory-p1", "StockReserved"))
      assert.equal(1, count("Inventory-p1", "StockReleased"))
      assert.equal(1, count("Order-" .. id, "OrderCancelled"))
    end)

    it("a draft not placed in time is cancelled as expired; a placed one is not", function()
      -- the ttl outlasts the settle() calls before the sleeps even on a
      -- loaded machine under the sanitizers (0.2 s did not, once)
      runner = workflows.runner(store, { draft_ttl = 1 })
      assert(workflows.receive_stock(repo, { product_id = "p1", quantity = 5 }))
      local stale = order { { "p1", 1 } }
      local placed = order { { "p1", 1 } }
      local cancelled = order { { "p1", 1 } }
      assert(svc:place_order { order_id = placed })
      assert(svc:cancel_order { order_id = cancelled })
      settle()
      assert.equal(1, #assert(es.workflow.timers(store)))
      es.workflow.sleep(1.1)
      local _, fired = assert(runner:catch_up())
      assert.equal(1, fired)
      settle()
      local o = assert(svc:get_order(stale))
      assert.equal("cancelled", o.status)
      assert.equal("expired", o.cancel_reason)
      assert.equal("placed", assert(svc:get_order(placed)).status)
      assert.equal(4, stock("p1").available)
      -- a timer that fires after the order was placed changes nothing
      local late = order { { "p1", 1 } }
      assert(runner:catch_up())
      assert(svc:place_order { order_id = late })   -- the workflow has not seen it yet
      es.workflow.sleep(1.1)
      assert(runner:run_timers())
      settle()
      assert.equal("placed", assert(svc:get_order(late)).status)
      assert.equal(3, stock("p1").available)
    end)

    it("the demo runs", function()
      local lines = {}
      local r = workflows.demo(store, function(l) lines[#lines + 1] = l end)
      local text = table.concat(lines, "\n")
      assert.truthy(text:find("out of stock", 1, true))
      assert.truthy(text:find("ReservationRejected", 1, true))
      assert.truthy(text:find("(expired)", 1, true))
      assert.equal("cancelled", (repo:load(workflows.Order, r.out_of_stock)).status)
    end)
  end)
end
