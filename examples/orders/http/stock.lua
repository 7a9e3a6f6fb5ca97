-- examples/orders/http/stock.lua: stock levels and where an order's stock
-- reservation stands, for the HTTP service (pool-thread side, no ngx).
--
--   local stock = require "orders.http.stock"
--   stock.view(repo, product_id)       -> { product_id, on_hand, reserved, available, version }
--   stock.receive(execute, product_id, quantity, meta) -> the same, after
--     ReceiveStock; execute(A, id, command, data, opts) runs the command
--     (repo:execute, or its idempotent form)
--   stock.reservation(repo, order_view) -> { status, items = [ { product_id, quantity, status } ] }
--
-- The reservation is read from the Inventory streams the order-fulfilment
-- workflow writes (examples/orders/workflows.lua), so it is exactly as far
-- as that workflow has got. Order-level status:
--   none       the order was never placed (a draft, or cancelled as a draft)
--   pending    placed; the workflow has not reserved every line yet
--   reserved   placed; every line is reserved
--   rejected   a line did not fit: the order is (being) cancelled "out of stock"
--   releasing  cancelled after it was placed; some lines are still held
--   released   cancelled after it was placed; nothing is held any more
-- Line status: pending, reserved, rejected, released (or none).
local es = require "eventsourcing"
local aggregate = require "eventsourcing.aggregate"
local inventory = require "orders.inventory"

local Inventory = inventory.Inventory

local M = {}

function M.view(repo, product_id)
  return inventory.stock(repo, product_id)
end

function M.receive(execute, product_id, quantity, meta)
  if type(product_id) ~= "string" or not aggregate.valid_id(product_id) then
    return nil, es.error("invalid", "product_id must be a non-empty string without control characters",
      { field = "product_id" })
  end
  local r, err = execute(Inventory, product_id, "ReceiveStock",
    { product_id = product_id, quantity = quantity }, { metadata = meta })
  if not r then return nil, err end
  return { product_id = product_id, version = r.version, on_hand = r.state.on_hand,
           reserved = r.state.reserved, available = r.state.on_hand - r.state.reserved }
end

-- The line's status from its product's Inventory state.
local function line_status(state, order_id, placed, cancelled)
  if state.reservations[order_id] then return "reserved" end
  if state.rejected[order_id] then return "rejected" end
  if not placed then return "none" end
  return cancelled and "released" or "pending"
end

local function overall(lines, o)
  if not o.placed_at then return "none" end
  local held, rejected, pending = false, false, false
  for _, l in ipairs(lines) do
    if l.status == "reserved" then held = true
    elseif l.status == "rejected" then rejected = true
    elseif l.status == "pending" then pending = true end
  end
  if rejected or o.cancel_reason == "out of stock" then return "rejected" end
  if o.status == "cancelled" then return held and "releasing" or "released" end
  if pending then return "pending" end
  return "reserved"
end

-- order_view: service.view of the order's current state.
function M.reservation(repo, o)
  local lines = es.json.array {}
  local placed, cancelled = o.placed_at ~= nil and o.placed_at ~= es.json.null,
                            o.status == "cancelled"
  for i, item in ipairs(o.items or {}) do
    local status = "none"
    if placed then
      local state, err = repo:load(Inventory, item.product_id)
      if not state then return nil, err end
      status = line_status(state, o.id, placed, cancelled)
    end
    lines[i] = { product_id = item.product_id, quantity = item.quantity, status = status }
  end
  return { status = overall(lines, { placed_at = placed and o.placed_at or nil,
                                     status = o.status, cancel_reason = o.cancel_reason }),
           items = lines }
end

return M
