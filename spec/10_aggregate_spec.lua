-- Aggregates as pure functions (no store), and every Order rule as
-- given / when / then. The examples are required as "orders.*": put
-- examples/ on LUA_PATH (scripts/test.sh does; so does the line below).
package.path = "examples/?.lua;" .. package.path

local es = require "eventsourcing"
local testing = require "eventsourcing.testing"
local Order = require "orders.order"
local given = testing.given

local function created(customer)
  return { type = "OrderCreated", data = { order_id = "o1", customer_id = customer or "c1" } }
end
local function added(product, quantity, unit_price)
  return { type = "ItemAdded", data = { product_id = product, quantity = quantity,
                                        unit_price = unit_price } }
end
local function removed(product, quantity, unit_price)
  return { type = "ItemRemoved", data = { product_id = product, quantity = quantity,
                                          unit_price = unit_price } }
end
local function placed(total, count)
  return { type = "OrderPlaced", data = { total = total, item_count = count } }
end
local function cancelled(reason, previous)
  return { type = "OrderCancelled", data = { reason = reason, previous_status = previous } }
end

local Counter = es.aggregate {
  name = "Counter",
  initial = { n = 0 },
  apply = {
    Added = function(s, e) s.n = s.n + e.data.by end,
    Reset = function() return { n = 0 } end,
  },
  decide = {
    Add = function(_, c) return { type = "Added", data = { by = c.by } } end,
    AddTwice = function(_, c)
      return { { type = "Added", data = { by = c.by } }, { type = "Added", data = { by = c.by } } }
    end,
    Short = function(_, c) return "Added", { by = c.by } end,
    Nothing = function() return nil end,
    Empty = function() return {} end,
    Refuse = function() return nil, "not today" end,
    Invalid = function() return nil, es.error("invalid", "by is wrong", { field = "by" }) end,
    Bogus = function() return { type = "Unknown", data = {} } end,
  },
}

describe("es.aggregate", function()
  describe("definition", function()
    it("rejects bad definitions with clear errors", function()
      assert.has_error(function() es.aggregate { name = "Bad-Name" } end)
      assert.has_error(function() es.aggregate { name = 42 } end)
      assert.has_error(function() es.aggregate { name = "A", apply = { X = 1 } } end)
      assert.has_error(function() es.aggregate { name = "A", snapshot_every = 0 } end)
      assert.has_error(function()
        es.aggregate { name = "A", upcast = { X = { [1] = function(d) return d end } } }
      end)
      assert.has_error(function()
        es.aggregate { name = "A", apply = { X = function() end },
                       upcast = { X = { [2] = function(d) return d end } } }
      end)
    end)
  end)

  describe("stream()", function()
    it("names the stream <name>-<id>", function()
      assert.equal("Order-42", Order:stream("42"))
      assert.equal("Order-a-b", Order:stream("a-b"))
    end)
    it("refuses empty, non-string and control-character ids", function()
      for _, bad in ipairs { "", 42, false, "a\nb", "a\0b", "\t" } do
        local ok, err = pcall(Order.stream, Order, bad)
        assert.is_false(ok)
        assert.truthy(tostring(err):find("Order: id", 1, true), tostring(err))
      end
    end)
  end)

  describe("evolve()", function()
    it("folds events into a fresh initial state each time", function()
      local s = Counter:evolve(nil, { { type = "Added", data = { by = 2 } }, { type = "Added", data = { by = 3 } } })
      assert.equal(5, s.n)
      assert.equal(0, Counter:initial().n, "the initial table is copied")
      assert.equal(7, Counter:evolve(s, { type = "Added", data = { by = 2 } }).n, "one event")
      assert.equal(0, Counter:evolve(s, { { type = "Reset" } }).n, "a handler may return a new state")
    end)
    it("names an event type without an apply handler", function()
      local ok, err = pcall(Counter.evolve, Counter, nil, { { type = "Mystery", data = {} } })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("Counter: no apply handler for event type 'Mystery'", 1, true),
        tostring(err))
    end)
  end)

  describe("decide()", function()
    it("accepts an event, an array, the shorthand, nil and {}", function()
      assert.same({ { type = "Added", data = { by = 1 } } }, Counter:decide(nil, "Add", { by = 1 }))
      assert.equal(2, #Counter:decide(nil, "AddTwice", { by = 1 }))
      assert.same({ { type = "Added", data = { by = 4 } } }, Counter:decide(nil, "Short", { by = 4 }))
      assert.same({}, Counter:decide(nil, "Nothing"))
      assert.same({}, Counter:decide(nil, "Empty"))
    end)
    it("turns nil, reason into a rejected error", function()
      local events, err = Counter:decide(nil, "Refuse", {})
      assert.is_nil(events)
      assert.equal("rejected", err.kind)
      assert.equal("not today", err.message)
      assert.equal("rejected: not today", tostring(err))
    end)
    it("passes an error table through (other kinds)", function()
      local _, err = Counter:decide(nil, "Invalid", {})
      assert.equal("invalid", err.kind)
      assert.equal("by", err.field)
    end)
    it("names an unknown command", function()
      local ok, err = pcall(Counter.decide, Counter, nil, "Fly", {})
      assert.is_false(ok)
      assert.truthy(tostring(err):find("Counter: unknown command 'Fly'", 1, true), tostring(err))
    end)
    it("names an emitted event type without an apply handler", function()
      local ok, err = pcall(Counter.decide, Counter, nil, "Bogus", {})
      assert.is_false(ok)
      assert.truthy(tostring(err):find("'Unknown'", 1, true), tostring(err))
    end)
  end)

  describe("upcast", function()
    it("converts ItemAdded v1 (price \"12.50\") to v2 (unit_price 1250) before apply", function()
      local v1 = { type = "ItemAdded", data = { product_id = "p1", quantity = 2, price = "12.50" },
                   metadata = { schema_version = 1 } }
      local s = Order:evolve(nil, { created(), v1 })
      assert.same({ { product_id = "p1", quantity = 2, unit_price = 1250 } }, s.items)
      assert.equal(2500, s.total)
      for price, cents in pairs { ["3"] = 300, ["3.5"] = 350, ["0.07"] = 7, ["1234.99"] = 123499 } do
        local e = { type = "ItemAdded", data = { product_id = "p", quantity = 1, price = price },
                    metadata = { schema_version = 1 } }
        assert.equal(cents, Order:upcast_event(e).data.unit_price, price)
      end
    end)
    it("knows ItemAdded is at schema version 2; other types are not versioned", function()
      assert.equal(2, Order:schema_version("ItemAdded"))
      assert.is_nil(Order:schema_version("OrderPlaced"))
    end)
    it("upcasts once, even when an event is applied twice", function()
      local v1 = { type = "ItemAdded", data = { product_id = "p1", quantity = 1, price = "1.00" },
                   metadata = { schema_version = 1 } }
      Order:evolve(nil, { created(), v1 })
      local s = Order:evolve(nil, { created(), v1 })
      assert.equal(100, s.items[1].unit_price)
    end)
    it("refuses a schema version newer than the code knows", function()
      local e = { type = "ItemAdded", data = {}, metadata = { schema_version = 3 } }
      assert.has_error(function() Order:evolve(nil, { created(), e }) end)
    end)
  end)
end)

describe("eventsourcing.testing", function()
  it("reports a wrong expectation readably (check returns ok, message)", function()
    local s = given(Counter):when("Add", { by = 1 })
    assert.is_true(s:check { { type = "Added", data = { by = 1 } } })
    local ok, msg = s:check { { type = "Added", data = { by = 2 } } }
    assert.is_false(ok)
    assert.truthy(msg:find("expected events:", 1, true), msg)
    assert.truthy(msg:find("Added { by = 1 }", 1, true), msg)
    ok, msg = s:check_rejection("x")
    assert.is_false(ok)
    assert.truthy(msg:find("but it decided", 1, true), msg)
  end)
  it("accepts { \"Type\", data } shorthand for given and expected events", function()
    given(Counter, { { "Added", { by = 2 } } }):when("Add", { by = 1 })
      :expect { { "Added", { by = 1 } } }
      :expect_state { n = 3 }
  end)
  it("expect raises when the expectation fails", function()
    assert.has_error(function()
      given(Counter):when("Refuse"):expect_nothing()
    end)
    assert.has_error(function()
      given(Counter):when("Add", { by = 1 }):expect_rejection("nope")
    end)
  end)
end)

describe("Order rules (given / when / then)", function()
  describe("CreateOrder", function()
    it("creates a draft order for a customer", function()
      given(Order):when("CreateOrder", { order_id = "o1", customer_id = "c1" })
        :expect { created("c1") }
        :expect_state { status = "draft", id = "o1", customer_id = "c1", total = 0 }
    end)
    it("requires customer_id to be a non-empty string", function()
      given(Order):when("CreateOrder", { order_id = "o1" }):expect_error("invalid", "customer_id")
      given(Order):when("CreateOrder", { order_id = "o1", customer_id = "" })
        :expect_error("invalid", "customer_id")
      given(Order):when("CreateOrder", { order_id = "o1", customer_id = 7 })
        :expect_error("invalid", "customer_id")
    end)
    it("rejects creating an order twice", function()
      given(Order, { created() }):when("CreateOrder", { order_id = "o1", customer_id = "c1" })
        :expect_rejection("already exists")
    end)
  end)

  describe("AddItem", function()
    it("adds an item to a draft order", function()
      given(Order, { created() })
        :when("AddItem", { product_id = "p1", quantity = 2, unit_price = 1250 })
        :expect { added("p1", 2, 1250) }
        :expect_state { total = 2500, items = { { product_id = "p1", quantity = 2, unit_price = 1250 } } }
    end)
    it("adds to the quantity of a product already in the order", function()
      given(Order, { created(), added("p1", 2, 1250) })
        :when("AddItem", { product_id = "p1", quantity = 3, unit_price = 1250 })
        :expect { added("p1", 3, 1250) }
        :expect_state(function(s)
          assert.equal(1, #s.items)
          assert.equal(5, s.items[1].quantity)
          assert.equal(6250, s.total)
        end)
    end)
    it("rejects the same product at another unit price", function()
      given(Order, { created(), added("p1", 2, 1250) })
        :when("AddItem", { product_id = "p1", quantity = 1, unit_price = 999 })
        :expect_rejection("already in the order at unit price 1250")
    end)
    it("rejects a product quantity above 10,000 in total", function()
      given(Order, { created(), added("p1", 9000, 1) })
        :when("AddItem", { product_id = "p1", quantity = 1001, unit_price = 1 })
        :expect_rejection("limit is 10000")
    end)
    it("requires product_id to be a non-empty string", function()
      given(Order, { created() }):when("AddItem", { quantity = 1, unit_price = 1 })
        :expect_error("invalid", "product_id")
      given(Order, { created() }):when("AddItem", { product_id = "", quantity = 1, unit_price = 1 })
        :expect_error("invalid", "product_id")
    end)
    it("requires quantity to be an integer from 1 to 10,000", function()
      for _, q in ipairs { 0, -1, 10001, 1.5, "2" } do
        given(Order, { created() }):when("AddItem", { product_id = "p", quantity = q, unit_price = 1 })
          :expect_error("invalid", "quantity")
      end
      given(Order, { created() }):when("AddItem", { product_id = "p", quantity = 10000, unit_price = 1 })
        :expect { added("p", 10000, 1) }
    end)
    it("requires unit_price to be an integer >= 0 (minor units)", function()
      for _, p in ipairs { -1, 12.5, "1250" } do
        given(Order, { created() }):when("AddItem", { product_id = "p", quantity = 1, unit_price = p })
          :expect_error("invalid", "unit_price")
      end
      given(Order, { created() }):when("AddItem", { product_id = "p", quantity = 1, unit_price = 0 })
        :expect { added("p", 1, 0) }
    end)
    it("rejects adding to an order that does not exist", function()
      given(Order):when("AddItem", { product_id = "p", quantity = 1, unit_price = 1 })
        :expect_rejection("does not exist")
    end)
    it("rejects adding to a placed or a cancelled order", function()
      given(Order, { created(), added("p1", 1, 100), placed(100, 1) })
        :when("AddItem", { product_id = "p2", quantity = 1, unit_price = 1 })
        :expect_rejection("only draft orders can change")
      given(Order, { created(), cancelled(nil, "draft") })
        :when("AddItem", { product_id = "p2", quantity = 1, unit_price = 1 })
        :expect_rejection("the order is cancelled")
    end)
  end)

  describe("RemoveItem", function()
    it("removes a product from a draft order", function()
      given(Order, { created(), added("p1", 2, 100), added("p2", 1, 50) })
        :when("RemoveItem", { product_id = "p1" })
        :expect { removed("p1", 2, 100) }
        :expect_state { total = 50, items = { { product_id = "p2" } } }
    end)
    it("rejects removing a product that is not in the order", function()
      given(Order, { created(), added("p1", 2, 100) })
        :when("RemoveItem", { product_id = "p9" })
        :expect_rejection("product p9 is not in the order")
    end)
    it("rejects removing from a placed order", function()
      given(Order, { created(), added("p1", 2, 100), placed(200, 1) })
        :when("RemoveItem", { product_id = "p1" })
        :expect_rejection("only draft orders can change")
    end)
    it("requires product_id", function()
      given(Order, { created() }):when("RemoveItem", {}):expect_error("invalid", "product_id")
    end)
  end)

  describe("PlaceOrder", function()
    it("places a draft order with items and records the total", function()
      given(Order, { created(), added("p1", 2, 1250), added("p2", 1, 99) })
        :when("PlaceOrder", {})
        :expect { placed(2599, 2) }
        :expect_state { status = "placed", total = 2599 }
    end)
    it("rejects placing an empty order", function()
      given(Order, { created() }):when("PlaceOrder", {}):expect_rejection("empty order cannot be placed")
      given(Order, { created(), added("p1", 1, 1), removed("p1", 1, 1) })
        :when("PlaceOrder", {}):expect_rejection("empty")
    end)
    it("is an idempotent no-op on a placed order", function()
      given(Order, { created(), added("p1", 1, 1), placed(1, 1) }):when("PlaceOrder", {}):expect_nothing()
    end)
    it("rejects placing a cancelled order", function()
      given(Order, { created(), added("p1", 1, 1), cancelled("x", "draft") })
        :when("PlaceOrder", {}):expect_rejection("cancelled")
    end)
    it("rejects placing an order that does not exist", function()
      given(Order):when("PlaceOrder", {}):expect_rejection("does not exist")
    end)
  end)

  describe("CancelOrder", function()
    it("cancels a draft order", function()
      given(Order, { created() }):when("CancelOrder", { reason = "changed my mind" })
        :expect { cancelled("changed my mind", "draft") }
        :expect_state { status = "cancelled", cancel_reason = "changed my mind" }
    end)
    it("cancels a placed order", function()
      given(Order, { created(), added("p1", 1, 1), placed(1, 1) }):when("CancelOrder", {})
        :expect { cancelled(nil, "placed") }
    end)
    it("is an idempotent no-op on a cancelled order", function()
      given(Order, { created(), cancelled(nil, "draft") }):when("CancelOrder", { reason = "again" })
        :expect_nothing()
    end)
    it("rejects cancelling an order that does not exist", function()
      given(Order):when("CancelOrder", {}):expect_rejection("does not exist")
    end)
    it("requires reason, when given, to be a string", function()
      given(Order, { created() }):when("CancelOrder", { reason = 5 }):expect_error("invalid", "reason")
    end)
  end)

  it("keeps a state that survives a JSON round trip", function()
    local s = Order:evolve(nil, { created(), added("p1", 2, 100) })
    local back = es.json.decode(es.json.encode(s))
    assert.same(s, back)
    local s2 = Order:evolve(back, { added("p2", 1, 5), removed("p1", 2, 100), removed("p2", 1, 5) })
    assert.equal("[]", es.json.encode(s2.items), "an emptied items array stays an array")
  end)
end)
