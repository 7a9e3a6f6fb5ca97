-- The order service end to end, on both stores.
package.path = "examples/?.lua;" .. package.path

local es = require "eventsourcing"
local helpers = require "helpers"
local service = require "orders.service"
local read_model = require "orders.read_model"

local function pause()       -- let the clock move: distinct recorded_at
  local t0 = os.clock()
  while os.clock() - t0 < 0.002 do end
end

for _, entry in ipairs(helpers.stores()) do
  describe("order service (" .. entry.name .. ")", function()
    local store, svc

    before_each(function()
      store = helpers.open(entry)
      assert(service.migrate(store))
      svc = service.new(store)
    end)
    after_each(function()
      if store then store:close() end
    end)

    local function new_order(customer, items)
      local id = assert(svc:create_order { customer_id = customer or "c1" })
      for _, it in ipairs(items or {}) do
        assert(svc:add_item { order_id = id, product_id = it[1], quantity = it[2], unit_price = it[3] })
      end
      return id
    end

    it("creates an order and returns its id (a UUID)", function()
      local id = assert(svc:create_order({ customer_id = "c1" }, { user = "alice" }))
      assert.matches("^%x+%-%x+%-%x+%-%x+%-%x+$", id)
      local o = assert(svc:get_order(id))
      assert.equal(id, o.id)
      assert.equal("c1", o.customer_id)
      assert.equal("draft", o.status)
      assert.same({}, o.items)
      assert.equal(0, o.total)
      assert.equal(1, o.version)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT", o.created_at)
      assert.is_nil(o.placed_at)
      assert.is_nil(o.cancelled_at)
    end)

    it("works with svc.method(...) as well as svc:method(...)", function()
      local id = assert(svc.create_order { customer_id = "c1" })
      assert(svc.add_item { order_id = id, product_id = "p", quantity = 1, unit_price = 1 })
      assert.equal(1, svc.get_order(id).total)
    end)

    it("adds, merges and removes items and keeps the total", function()
      local id = new_order("c1", { { "p1", 2, 1250 }, { "p2", 1, 99 }, { "p1", 1, 1250 } })
      local o = svc:get_order(id)
      assert.same({ { product_id = "p1", quantity = 3, unit_price = 1250 },
                    { product_id = "p2", quantity = 1, unit_price = 99 } }, o.items)
      assert.equal(3849, o.total)
      local r = assert(svc:remove_item { order_id = id, product_id = "p1" })
      assert.equal(99, r.total)
      assert.equal(5, r.version)
      o = svc:get_order(id)
      assert.same({ { product_id = "p2", quantity = 1, unit_price = 99 } }, o.items)
    end)

    it("keeps the total the sum of its lines through adds, merges and removes", function()
      local id, seed = new_order("c1"), 7
      for _ = 1, 30 do
        seed = (seed * 1103515245 + 12345) % 2147483648
        local p = "p" .. (seed % 5)
        local price
        for _, it in ipairs(svc:get_order(id).items) do
          if it.product_id == p then price = it.unit_price end
        end
        if price and seed % 3 == 0 then
          assert(svc:remove_item { order_id = id, product_id = p })
        else
          assert(svc:add_item { order_id = id, product_id = p, quantity = 1 + seed % 4,
            unit_price = price or (100 + seed % 900) })
        end
        local o, sum = svc:get_order(id), 0   -- folded from the first event
        for _, it in ipairs(o.items) do sum = sum + it.quantity * it.unit_price end
        assert.equal(sum, o.total)
      end
    end)

    it("returns invalid errors naming the field", function()
      local id = new_order()
      local cases = {
        { "create_order", { customer_id = "" }, "customer_id" },
        { "create_order", {}, "customer_id" },
        { "add_item", { order_id = id, product_id = "", quantity = 1, unit_price = 1 }, "product_id" },
        { "add_item", { order_id = id, product_id = "p", quantity = 0, unit_price = 1 }, "quantity" },
        { "add_item", { order_id = id, product_id = "p", quantity = 10001, unit_price = 1 }, "quantity" },
        { "add_item", { order_id = id, product_id = "p", quantity = 2.5, unit_price = 1 }, "quantity" },
        { "add_item", { order_id = id, product_id = "p", quantity = 1, unit_price = -1 }, "unit_price" },
        { "add_item", { order_id = id, product_id = "p", quantity = 1, unit_price = 9.99 }, "unit_price" },
        { "add_item", { order_id = "", product_id = "p", quantity = 1, unit_price = 1 }, "order_id" },
        { "remove_item", { order_id = id }, "product_id" },
        { "place_order", { order_id = 42 }, "order_id" },
        { "cancel_order", { order_id = id, reason = {} }, "reason" },
      }
      for _, c in ipairs(cases) do
        local r, err = svc[c[1]](svc, c[2])
        assert.is_nil(r, c[1] .. " " .. c[3])
        assert.equal("invalid", err.kind, c[1] .. " " .. c[3] .. ": " .. tostring(err))
        assert.equal(c[3], err.field)
        assert.truthy(err.message:find(c[3], 1, true), err.message)
      end
      local _, err = svc:get_order("")
      assert.equal("invalid", err.kind)
      _, err = svc:list_orders(nil)
      assert.equal("invalid", err.kind)
      assert.equal(1, svc:get_order(id).version, "nothing was appended")
    end)

    it("returns not_found for an unknown order", function()
      local missing = "00000000-0000-7000-8000-000000000000"
      for _, call in ipairs {
        function() return svc:get_order(missing) end,
        function() return svc:add_item { order_id = missing, product_id = "p", quantity = 1, unit_price = 1 } end,
        function() return svc:remove_item { order_id = missing, product_id = "p" } end,
        function() return svc:place_order { order_id = missing } end,
        function() return svc:cancel_order { order_id = missing } end,
        function() return svc:history(missing) end,
        function() return svc:order_at(missing, 1) end,
      } do
        local r, err = call()
        assert.is_nil(r)
        assert.equal("not_found", err.kind, tostring(err))
      end
      assert.equal(0, store:version("Order-" .. missing), "no stream was created")
    end)

    it("enforces the rules with readable rejections", function()
      local id = new_order("c1", { { "p1", 1, 500 } })
      local _, err = svc:add_item { order_id = id, product_id = "p1", quantity = 1, unit_price = 600 }
      assert.equal("rejected", err.kind)
      assert.truthy(err.message:find("unit price 500", 1, true), err.message)
      _, err = svc:remove_item { order_id = id, product_id = "p9" }
      assert.equal("rejected", err.kind)
      assert.equal("product p9 is not in the order", err.message)
      local empty = new_order("c1")
      _, err = svc:place_order { order_id = empty }
      assert.equal("rejected", err.kind)
      assert.equal("an empty order cannot be placed", err.message)
    end)

    it("places an order (recording the total), idempotently", function()
      local id = new_order("c1", { { "p1", 2, 500 } })
      local r = assert(svc:place_order { order_id = id })
      assert.equal("placed", r.status)
      assert.equal(1000, r.total)
      assert.equal(3, r.version)
      r = assert(svc:place_order { order_id = id })
      assert.equal(3, r.version, "no new event")
      assert.equal(0, r.events)
      local o = svc:get_order(id)
      assert.equal("placed", o.status)
      assert.matches("^%d%d%d%d%-", o.placed_at)
      local trail = svc:history(id)
      assert.equal("OrderPlaced", trail[3].type)
      assert.equal(1000, trail[3].data.total)
      local _, err = svc:add_item { order_id = id, product_id = "p2", quantity = 1, unit_price = 1 }
      assert.equal("rejected", err.kind)
      assert.truthy(err.message:find("only draft orders can change", 1, true), err.message)
    end)

    it("cancels draft and placed orders, idempotently; a cancelled order is final", function()
      local draft = new_order("c1", { { "p1", 1, 1 } })
      local placed = new_order("c1", { { "p1", 1, 1 } })
      assert(svc:place_order { order_id = placed })
      assert.equal("cancelled", assert(svc:cancel_order { order_id = draft, reason = "dup" }).status)
      assert.equal("cancelled", assert(svc:cancel_order { order_id = placed }).status)
      local r = assert(svc:cancel_order { order_id = draft })
      assert.equal(0, r.events)
      local o = svc:get_order(draft)
      assert.equal("cancelled", o.status)
      assert.equal("dup", o.cancel_reason)
      assert.matches("^%d%d%d%d%-", o.cancelled_at)
      local _, err = svc:place_order { order_id = draft }
      assert.equal("rejected", err.kind)
      _, err = svc:remove_item { order_id = draft, product_id = "p1" }
      assert.equal("rejected", err.kind)
    end)

    it("lists a customer's orders, newest first", function()
      local a1 = new_order("alice"); pause()
      local b1 = new_order("bob"); pause()
      local a2 = new_order("alice", { { "p", 1, 7 } }); pause()
      local a3 = new_order("alice")
      local list = assert(svc:list_orders("alice"))
      assert.equal(3, #list)
      assert.equal(a3, list[1].id)
      assert.equal(a2, list[2].id)
      assert.equal(a1, list[3].id)
      assert.equal(7, list[2].total)
      local bl = assert(svc:list_orders("bob"))
      assert.equal(1, #bl)
      assert.equal(b1, bl[1].id)
      assert.same({}, assert(svc:list_orders("nobody")))
    end)

    it("keeps the audit trail: who did what, when", function()
      local id = assert(svc:create_order({ customer_id = "c1" }, { user = "alice" }))
      assert(svc:add_item({ order_id = id, product_id = "p", quantity = 1, unit_price = 5 }, { user = "bob" }))
      assert(svc:place_order({ order_id = id }, { user = "carol", correlation_id = "req-7" }))
      local trail = assert(svc:history(id))
      assert.equal(3, #trail)
      local who = {}
      for i, e in ipairs(trail) do
        who[i] = e.metadata.user .. ":" .. e.type
        assert.equal(i, e.version)
        assert.is_string(e.recorded_at)
        assert.is_string(e.metadata.correlation_id)
      end
      assert.same({ "alice:OrderCreated", "bob:ItemAdded", "carol:OrderPlaced" }, who)
      assert.equal("req-7", trail[3].metadata.correlation_id)
    end)

    it("shows an order at an earlier version or instant", function()
      local id = new_order("c1", { { "p1", 1, 100 } }); pause()
      assert(svc:add_item { order_id = id, product_id = "p2", quantity = 1, unit_price = 50 }); pause()
      assert(svc:place_order { order_id = id })
      local v2 = assert(svc:order_at(id, 2))
      assert.equal(2, v2.version)
      assert.equal("draft", v2.status)
      assert.equal(100, v2.total)
      local trail = svc:history(id)
      local before_place = assert(svc:order_at(id, trail[4].recorded_at))
      assert.equal(3, before_place.version)
      assert.equal("draft", before_place.status)
      assert.equal(150, before_place.total)
      local _, err = svc:order_at(id, "1999-01-01T00:00:00Z")
      assert.equal("not_found", err.kind)
      _, err = svc:order_at(id, 9)
      assert.equal("not_found", err.kind)
      _, err = svc:order_at(id, "yesterday")
      assert.equal("invalid", err.kind)
      assert.equal("placed", svc:get_order(id).status, "the present is unchanged")
    end)

    it("snapshots long orders and still answers correctly", function()
      local id = new_order("c1")
      for i = 1, 105 do
        assert(svc:add_item { order_id = id, product_id = "p" .. (i % 7), quantity = 1, unit_price = (i % 7) * 10 })
      end
      local snap = assert(store:load_snapshot("Order-" .. id))
      assert.equal(100, snap.version)
      local o = svc:get_order(id)
      assert.equal(106, o.version)
      local total = 0
      for i = 1, 105 do total = total + (i % 7) * 10 end
      assert.equal(total, o.total)
      assert.equal(7, #o.items)
      assert.equal(total, service.view(es.repository(store, { snapshots = false })
        :load(service.Order, id), 106).total)
    end)

    if entry.name == "postgresql" then
      -- rows rewritten by every command: half of each page kept free (HOT
      -- updates), by service.migrate and by es.migrate with the app
      it("keeps half of each rm_orders page free, set once by either migrate", function()
        local function options()
          return assert(store:query("SELECT coalesce(array_to_string(reloptions, ','), '') AS o"
            .. " FROM pg_class WHERE oid = to_regclass($1)", ('"%s".rm_orders'):format(store:schema())))[1].o
        end
        assert.equal("fillfactor=50", options())
        assert(store:query(('ALTER TABLE "%s".rm_orders RESET (fillfactor)'):format(store:schema())))
        assert.equal("", options())
        assert(es.migrate(store, dofile("examples/orders/app.lua")))
        assert.equal("fillfactor=50", options())
        assert(service.migrate(store))
        assert.equal("fillfactor=50", options())
        local id = new_order("c1", { { "p1", 1, 100 } })
        assert.equal(100, svc:get_order(id).total)
        -- a rebuild swaps in a table made with it
        local projector = es.projector(store, { read_model.Orders })
        assert(projector:catch_up())
        assert(projector:rebuild("rm_orders", { bar = false }))
        assert.equal("fillfactor=50", options())
        assert.equal(100, svc:get_order(id).total)
      end)
    end
  end)
end
