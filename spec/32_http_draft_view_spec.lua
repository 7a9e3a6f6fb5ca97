-- GET /orders/{id}'s one-statement answer for drafts
-- (examples/orders/http/draft_view.lua): the JSON PostgreSQL builds from
-- rm_orders must say exactly what the fold of the stream says, and the
-- row must not serve when it is behind the stream or not a draft.
package.path = "examples/?.lua;" .. package.path

local es = require "eventsourcing"
local helpers = require "helpers"
local service = require "orders.service"
local stock = require "orders.http.stock"
local draft_view = require "orders.http.draft_view"

describe("draft orders answered from the read model's row", function()
  local store, svc, folded

  before_each(function()
    store = assert(es.open(helpers.database_url(), { schema = helpers.fresh_schema() }))
    assert(service.migrate(store))
    svc = service.new(store)
    folded = service.fold_queries(store, svc.repository)
  end)
  after_each(function() if store then store:close() end end)

  -- what the fold path answers (orders.http.worker's get_order)
  local function by_fold(id)
    local o = assert(folded.get_order(id))
    o.reservation = assert(stock.reservation(svc.repository, o))
    return es.json.decode(es.json.encode(o))
  end

  local function by_row(id)
    local found, body, version = draft_view.get(store, id)
    assert.is_not_nil(found, body)
    if not found then return nil end
    assert.are.equal("\n", body:sub(-1))
    local o = assert(es.json.decode(body))
    assert.are.equal(o.version, version)
    return o
  end

  it("gives the fold's answer for drafts with no, added, merged and removed items", function()
    local empty = assert(svc:create_order { customer_id = "c1" })
    local id = assert(svc:create_order { customer_id = "c2" })
    assert(svc:add_item { order_id = id, product_id = "p1", quantity = 2, unit_price = 1250 })
    assert(svc:add_item { order_id = id, product_id = "p2", quantity = 1, unit_price = 99 })
    assert(svc:add_item { order_id = id, product_id = "p1", quantity = 3, unit_price = 1250 })
    assert(svc:add_item { order_id = id, product_id = "p3", quantity = 1, unit_price = 5 })
    assert(svc:remove_item { order_id = id, product_id = "p2" })
    for _, oid in ipairs { empty, id } do
      local row = by_row(oid)
      assert.is_table(row)
      assert.are.same(by_fold(oid), row)
    end
    local o = by_row(id)
    assert.are.equal(5, o.items[1].quantity)
    assert.are.equal("p3", o.items[2].product_id)
    assert.are.equal(0, #by_row(empty).items)
    -- an empty array stays an array
    local _, body = draft_view.get(store, empty)
    assert.truthy(body:find('"items" : %[%]') or body:find('"items":%[%]'), body)
  end)

  it("leaves placed and cancelled orders, unknown ids and rows behind the stream to the fold", function()
    local placed = assert(svc:create_order { customer_id = "c1" })
    assert(svc:add_item { order_id = placed, product_id = "p1", quantity = 1, unit_price = 10 })
    assert(svc:place_order { order_id = placed })
    local cancelled = assert(svc:create_order { customer_id = "c1" })
    assert(svc:cancel_order { order_id = cancelled })
    assert.is_nil(by_row(placed))
    assert.is_nil(by_row(cancelled))
    assert.is_nil(by_row("6f1c2d3e-0000-4000-8000-000000000000"))
    -- a command whose read model update did not happen (a projector that
    -- is behind): the row is at version 1, the stream at 2
    local id = assert(svc:create_order { customer_id = "c1" })
    local behind = service.new(store, { inline = false })
    assert(behind:add_item { order_id = id, product_id = "p1", quantity = 1, unit_price = 10 })
    assert.is_nil(by_row(id))
    assert.are.equal(2, by_fold(id).version)
  end)

  it("falls back when the store has no rm_orders table", function()
    local bare = assert(es.open(helpers.database_url(), { schema = helpers.fresh_schema() }))
    assert(bare:migrate())
    assert.are.equal(false, (draft_view.get(bare, "6f1c2d3e-0000-4000-8000-000000000000")))
    bare:close()
  end)
end)
