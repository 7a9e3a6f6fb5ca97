-- examples/orders/read_model.lua: the OrderReadModel (table rm_orders).
--
--   local orders_rm = require "orders.read_model"
--   local projector = es.projector(store, { orders_rm.Orders })
--   projector:catch_up()                          -- or projector:run()
--   orders_rm.get_order(store, "42")              -- -> order | nil, not_found
--   orders_rm.list_orders(store, "c1", { status = "placed", limit = 20, after = cursor })
--                                                 -- -> orders, next_cursor
--   service.new(store, { queries = orders_rm.queries(store) })
--
-- One row per order: id, customer_id, status ("draft" | "placed" |
-- "cancelled"), items (json array of { product_id, quantity, unit_price }),
-- item_count (number of item lines), total (integer cents), created_at,
-- placed_at, cancelled_at (ISO-8601 UTC), cancel_reason, version (the
-- order stream's version the row reflects).
local es = require "eventsourcing"
local Order = require "orders.order"

local M = {}

local fields = require "orders.fields"
local find_item, total_of = fields.find_item, fields.total_of

local function items_of(row)
  local items = row.items
  if type(items) ~= "table" then
    items = es.json.array {}
    row.items = items
  end
  return items
end

local function touch(row, e)
  row.version = e.version
  row.item_count = #items_of(row)
end

M.Orders = es.read_model {
  name = "rm_orders",
  keys_by_stream = true,  -- a row per Order stream: rebuilds may use workers
  -- the handlers read recorded_at by name and never change an event: a
  -- command on an order whose row the state cache keeps is one round trip
  one_trip = true,
  -- Every command rewrites its order's row (inline, in its transaction),
  -- so the table keeps half of each page free: the new version of a row
  -- then fits beside the old one (a HOT update: no index entries, no page
  -- to find), and loads do not walk long chains of versions. With the
  -- default (100) the row load took 67-77 us and its write 82-92 us of
  -- PostgreSQL's time per POST /orders/{id}/items, against 25-27 and
  -- 50-54 (server CPU per command 527-547 us against 440-463; 3,000
  -- commands on 300 orders, same run). migrate sets it on a table made
  -- before, and a rebuild's fresh table is made with it.
  fillfactor = 50,
  key = "id",
  -- Items are json, not jsonb: nothing queries inside them in SQL, and
  -- jsonb would parse the whole list into its binary form at each write
  -- and print it again at each read (about 20 us of PostgreSQL's CPU per
  -- POST /orders/{id}/items on 25-line orders; bench/command_cpu.lua:
  -- 247-253 against 220-230 us a command, same run)
  columns = {
    id = "text", customer_id = "text", status = "text", items = "json",
    item_count = "integer", total = "bigint", created_at = "timestamptz",
    placed_at = "timestamptz", cancelled_at = "timestamptz",
    cancel_reason = "text", version = "bigint",
  },
  indexes = { { "customer_id", "created_at" }, { "customer_id", "status", "created_at" } },
  on = {
    OrderCreated = function(row, e)
      row.customer_id = e.data.customer_id
      row.status = "draft"
      row.items = es.json.array {}
      row.total = 0
      row.created_at = e.recorded_at
      touch(row, e)
    end,
    ItemAdded = function(row, e)
      Order:upcast_event(e)            -- v1 events carried price = "12.50"
      local d = e.data
      local items = items_of(row)
      local item = find_item(items, d.product_id)
      if item then
        item.quantity = item.quantity + d.quantity
      else
        items[#items + 1] = { product_id = d.product_id, quantity = d.quantity,
                              unit_price = d.unit_price }
      end
      row.total = total_of(items)
      touch(row, e)
    end,
    ItemRemoved = function(row, e)
      local items = items_of(row)
      local _, i = find_item(items, e.data.product_id)
      if i then table.remove(items, i) end
      row.total = total_of(items)
      touch(row, e)
    end,
    OrderPlaced = function(row, e)
      row.status = "placed"
      if e.data.total ~= nil then row.total = e.data.total end
      row.placed_at = e.recorded_at
      touch(row, e)
    end,
    OrderCancelled = function(row, e)
      row.status = "cancelled"
      local reason = e.data.reason
      if reason == es.json.null then reason = nil end
      row.cancel_reason = reason
      row.cancelled_at = e.recorded_at
      touch(row, e)
    end,
  },
}

local function not_found(order_id)
  return nil, es.error("not_found", ("order %s not found"):format(tostring(order_id)),
    { order_id = order_id })
end

-- The row as the service presents an order.
local function view(row)
  local items = es.json.array {}
  for i, it in ipairs(row.items or {}) do
    items[i] = { product_id = it.product_id, quantity = it.quantity, unit_price = it.unit_price }
  end
  return {
    id = row.id, customer_id = row.customer_id, status = row.status, items = items,
    item_count = row.item_count, total = row.total, version = row.version,
    created_at = row.created_at, placed_at = row.placed_at,
    cancelled_at = row.cancelled_at, cancel_reason = row.cancel_reason,
  }
end
M.view = view

function M.get_order(store, order_id)
  local row, err = M.Orders:get(store, order_id)
  if row == nil then
    if err then return nil, err end
    return not_found(order_id)
  end
  return view(row)
end

-- Newest first (created_at, then id, both descending), keyset paged:
-- returns orders, next (a cursor for opts.after; nil on the last page).
function M.list_orders(store, customer_id, opts)
  opts = opts or {}
  local where = { customer_id = customer_id }
  if opts.status ~= nil and opts.status ~= es.json.null then where.status = opts.status end
  local rows, next_or_err = M.Orders:find(store, where, {
    order_by = "created_at", desc = true, limit = opts.limit or 50, after = opts.after })
  if not rows then return nil, next_or_err end
  local list = es.json.array {}
  for i, r in ipairs(rows) do list[i] = view(r) end
  return list, next_or_err
end

-- A `queries` object for service.new(store, { queries = ... }).
function M.queries(store)
  return {
    get_order = function(order_id) return M.get_order(store, order_id) end,
    list_orders = function(customer_id, opts) return M.list_orders(store, customer_id, opts) end,
  }
end

return M
