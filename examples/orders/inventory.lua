-- examples/orders/inventory.lua: the Inventory aggregate, one stream per
-- product ("Inventory-<product_id>").
--
--   local inventory = require "orders.inventory"
--   local Inventory = inventory.Inventory
--   inventory.receive_stock(repo, { product_id = "p1", quantity = 10 }, meta)
--   inventory.stock(repo, "p1") -> { product_id, on_hand, reserved, available, version }
--
-- Commands: ReceiveStock { product_id, quantity }, ReserveStock { order_id,
-- quantity }, ReleaseStock { order_id }.
-- Events: StockReceived { product_id, quantity }, StockReserved { order_id,
-- quantity }, StockReleased { order_id, quantity }, ReservationRejected
-- { order_id, quantity, available }.
-- Rules: stock never goes negative (available = on_hand - reserved); one
-- reservation per order and product: reserving again for the same order is
-- a no-op, and so is releasing an order that holds nothing - workflows can
-- repeat these commands safely. A reservation that does not fit is not a
-- refused command but a fact (ReservationRejected), kept in the state.
local es = require "eventsourcing"
local aggregate = require "eventsourcing.aggregate"

local M = {}

local fields = require "orders.fields"
local invalid, as_integer = fields.invalid, fields.as_integer

local function is_count(v)
  return type(v) == "number" and v == v and v % 1 == 0 and v >= 1 and v <= 1e9
end


local function check_id(cmd, field)
  local v = cmd[field]
  if type(v) ~= "string" or v == "" then return invalid(field, "is required (a string)") end
  if not aggregate.valid_id(v) then return invalid(field, "must not contain control characters") end
end

M.Inventory = es.aggregate {
  name = "Inventory",
  initial = function()
    return { on_hand = 0, reserved = 0, reservations = {}, rejected = {} }
  end,

  decide = {
    ReceiveStock = function(_, cmd)
      local err = check_id(cmd, "product_id")
      if err then return nil, err end
      if not is_count(cmd.quantity) then return nil, invalid("quantity", "must be a positive integer") end
      return { type = "StockReceived",
               data = { product_id = cmd.product_id, quantity = as_integer(cmd.quantity) } }
    end,

    ReserveStock = function(state, cmd)
      local err = check_id(cmd, "order_id")
      if err then return nil, err end
      if not is_count(cmd.quantity) then return nil, invalid("quantity", "must be a positive integer") end
      if state.reservations[cmd.order_id] or state.rejected[cmd.order_id] then return nil end
      local available = state.on_hand - state.reserved
      if cmd.quantity > available then
        return { type = "ReservationRejected", data = { order_id = cmd.order_id,
          quantity = as_integer(cmd.quantity), available = as_integer(available) } }
      end
      return { type = "StockReserved",
               data = { order_id = cmd.order_id, quantity = as_integer(cmd.quantity) } }
    end,

    ReleaseStock = function(state, cmd)
      local err = check_id(cmd, "order_id")
      if err then return nil, err end
      local q = state.reservations[cmd.order_id]
      if not q then return nil end                      -- nothing held: no-op
      return { type = "StockReleased", data = { order_id = cmd.order_id, quantity = q } }
    end,
  },

  apply = {
    StockReceived = function(state, e)
      state.product_id = state.product_id or e.data.product_id
      state.on_hand = state.on_hand + e.data.quantity
    end,
    StockReserved = function(state, e)
      state.reservations[e.data.order_id] = e.data.quantity
      state.reserved = state.reserved + e.data.quantity
    end,
    StockReleased = function(state, e)
      local q = state.reservations[e.data.order_id]
      if q then
        state.reservations[e.data.order_id] = nil
        state.reserved = state.reserved - q
      end
    end,
    ReservationRejected = function(state, e)
      state.rejected[e.data.order_id] = true
    end,
  },
}

local function check_product(product_id)
  if type(product_id) ~= "string" then
    return nil, invalid("product_id", "is required (a string)")
  end
  local ok, why = aggregate.valid_id(product_id)
  if not ok then return nil, invalid("product_id", (why:gsub("^id ", ""))) end
  return true
end

-- For the service: receive_stock{ product_id, quantity } -> { product_id,
-- version, on_hand, available } | nil, err (kind "invalid", or a store error)
function M.receive_stock(repo, args, meta)
  if type(args) ~= "table" then error("receive_stock: arguments must be a table", 2) end
  local ok, err = check_product(args.product_id)
  if not ok then return nil, err end
  local r
  r, err = repo:execute(M.Inventory, args.product_id, "ReceiveStock",
    { product_id = args.product_id, quantity = args.quantity }, { metadata = meta })
  if not r then return nil, err end
  return { product_id = args.product_id, version = r.version, on_hand = r.state.on_hand,
           reserved = r.state.reserved, available = r.state.on_hand - r.state.reserved }
end

-- For the service: stock(product_id) -> { product_id, on_hand, reserved,
-- available, version } (zeros for a product never received)
function M.stock(repo, product_id)
  local ok, err = check_product(product_id)
  if not ok then return nil, err end
  local state, version = repo:load(M.Inventory, product_id)
  if not state then return nil, version end
  return { product_id = product_id, on_hand = state.on_hand, reserved = state.reserved,
           available = state.on_hand - state.reserved, version = version }
end

return M
