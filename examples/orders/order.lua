-- examples/orders/order.lua: the Order aggregate (pure business rules).
--
--   local Order = require "orders.order"      -- with examples/ on LUA_PATH
--
-- Commands: CreateOrder { order_id, customer_id }, AddItem { product_id,
-- quantity, unit_price }, RemoveItem { product_id }, PlaceOrder {},
-- CancelOrder { reason }. Money is integer minor units (cents).
-- Events: OrderCreated { order_id, customer_id }, ItemAdded { product_id,
-- quantity, unit_price } (schema v2; v1 had price = "12.50"), ItemRemoved
-- { product_id, quantity, unit_price }, OrderPlaced { total, item_count },
-- OrderCancelled { reason, previous_status }.
-- State: { status = "none"|"draft"|"placed"|"cancelled", id, customer_id,
-- items = [ { product_id, quantity, unit_price } ], total, created_at,
-- placed_at, cancelled_at, cancel_reason } (JSON-encodable: snapshots).
local es = require "eventsourcing"

local array, null = es.json.array, es.json.null

local MAX_QUANTITY = 10000
local MAX_UNIT_PRICE = 100000000000      -- 1e9 in major units
local MAX_LINES = 1000                    -- item lines per order
local MAX_TOTAL = 9007199254740991        -- 2^53 - 1: exact on LuaJIT too

local fields = require "orders.fields"
local invalid, as_integer, total_of = fields.invalid, fields.as_integer, fields.total_of

local function is_integer(v)
  return type(v) == "number" and v == v and v % 1 == 0 and v > -2^53 and v < 2^53
end


local function check_id(cmd, field)
  local v = cmd[field]
  if v == nil or v == null then return invalid(field, "is required") end
  if type(v) ~= "string" then return invalid(field, "must be a string") end
  if v == "" then return invalid(field, "must not be empty") end
  if v:find("%c") then return invalid(field, "must not contain control characters") end
  if #v > 200 then return invalid(field, "must be at most 200 bytes") end
end

local function check_int(cmd, field, lo, hi)
  local v = cmd[field]
  if v == nil or v == null then return invalid(field, "is required") end
  if not is_integer(v) then return invalid(field, "must be an integer") end
  if v < lo or v > hi then
    return invalid(field, ("must be from %d to %d"):format(lo, hi))
  end
end

local function find_item(state, product_id)
  return fields.find_item(state.items, product_id)
end

local function must_be_draft(state, what)
  if state.status == "none" then return "the order does not exist" end
  if state.status ~= "draft" then
    return ("cannot %s: the order is %s, and only draft orders can change")
      :format(what, state.status)
  end
end

-- ItemAdded v1 stored the price as a decimal string of major units
-- ("12.50"); v2 stores unit_price in integer cents (1250).
local function cents(price)
  if type(price) == "number" then return as_integer(math.floor(price * 100 + 0.5)) end
  local whole, frac = tostring(price):match("^%s*(%d+)%.?(%d*)%s*$")
  if not whole or #frac > 2 then
    error(("ItemAdded v1: cannot read price %q"):format(tostring(price)))
  end
  frac = (frac .. "00"):sub(1, 2)
  return as_integer(tonumber(whole) * 100 + tonumber(frac))
end

return es.aggregate {
  name = "Order",
  snapshot_every = 100,
  snapshot_version = 1,

  initial = function()
    return { status = "none", items = array {}, total = 0 }
  end,

  upcast = {
    ItemAdded = {
      [1] = function(data)
        return { product_id = data.product_id, quantity = data.quantity,
                 unit_price = cents(data.price) }
      end,
    },
  },

  decide = {
    CreateOrder = function(state, cmd)
      local err = check_id(cmd, "order_id") or check_id(cmd, "customer_id")
      if err then return nil, err end
      if state.status ~= "none" then
        return nil, ("order %s already exists"):format(state.id or cmd.order_id)
      end
      return { type = "OrderCreated",
               data = { order_id = cmd.order_id, customer_id = cmd.customer_id } }
    end,

    AddItem = function(state, cmd)
      local err = check_id(cmd, "product_id")
        or check_int(cmd, "quantity", 1, MAX_QUANTITY)
        or check_int(cmd, "unit_price", 0, MAX_UNIT_PRICE)
      if err then return nil, err end
      local why = must_be_draft(state, "add items")
      if why then return nil, why end
      local item = find_item(state, cmd.product_id)
      if item then
        if item.unit_price ~= cmd.unit_price then
          return nil, ("product %s is already in the order at unit price %d, not %d")
            :format(cmd.product_id, item.unit_price, cmd.unit_price)
        end
        if item.quantity + cmd.quantity > MAX_QUANTITY then
          return nil, ("product %s would reach quantity %d; the limit is %d per product")
            :format(cmd.product_id, item.quantity + cmd.quantity, MAX_QUANTITY)
        end
      elseif #state.items >= MAX_LINES then
        return nil, ("an order holds at most %d different products"):format(MAX_LINES)
      end
      if (state.total or 0) + cmd.quantity * cmd.unit_price > MAX_TOTAL then
        return nil, "the order total would exceed 9007199254740991 minor units"
      end
      return { type = "ItemAdded", data = { product_id = cmd.product_id,
        quantity = as_integer(cmd.quantity), unit_price = as_integer(cmd.unit_price) } }
    end,

    RemoveItem = function(state, cmd)
      local err = check_id(cmd, "product_id")
      if err then return nil, err end
      local why = must_be_draft(state, "remove items")
      if why then return nil, why end
      local item = find_item(state, cmd.product_id)
      if not item then
        return nil, ("product %s is not in the order"):format(cmd.product_id)
      end
      return { type = "ItemRemoved", data = { product_id = item.product_id,
        quantity = item.quantity, unit_price = item.unit_price } }
    end,

    PlaceOrder = function(state)
      if state.status == "placed" then return nil end            -- idempotent
      if state.status == "none" then return nil, "the order does not exist" end
      if state.status == "cancelled" then
        return nil, "cannot place the order: it was cancelled"
      end
      if #state.items == 0 then return nil, "an empty order cannot be placed" end
      return { type = "OrderPlaced",
               data = { total = total_of(state.items), item_count = #state.items } }
    end,

    CancelOrder = function(state, cmd)
      local reason = cmd.reason
      if reason == null then reason = nil end
      if reason ~= nil and type(reason) ~= "string" then
        return nil, invalid("reason", "must be a string")
      end
      if reason and #reason > 1000 then
        return nil, invalid("reason", "must be at most 1000 bytes")
      end
      if state.status == "cancelled" then return nil end         -- idempotent
      if state.status == "none" then return nil, "the order does not exist" end
      return { type = "OrderCancelled",
               data = { reason = reason, previous_status = state.status } }
    end,
  },

  apply = {
    OrderCreated = function(state, e)
      state.status = "draft"
      state.id = e.data.order_id
      state.customer_id = e.data.customer_id
      state.created_at = e.recorded_at
    end,

    -- The total follows each line's change instead of being summed again
    -- over every line (a fold of n lines was n^2 steps). The same figure:
    -- integer minor units below 2^53 add up exactly in any order.
    ItemAdded = function(state, e)
      local d = e.data
      local item = find_item(state, d.product_id)
      if item then
        item.quantity = item.quantity + d.quantity
        state.total = as_integer(state.total + d.quantity * item.unit_price)
      else
        state.items[#state.items + 1] = { product_id = d.product_id,
          quantity = d.quantity, unit_price = d.unit_price }
        state.total = as_integer(state.total + d.quantity * d.unit_price)
      end
    end,

    ItemRemoved = function(state, e)
      local item, i = find_item(state, e.data.product_id)
      if i then
        table.remove(state.items, i)
        state.total = as_integer(state.total - item.quantity * item.unit_price)
      end
    end,

    OrderPlaced = function(state, e)
      state.status = "placed"
      state.total = e.data.total
      state.placed_at = e.recorded_at
    end,

    OrderCancelled = function(state, e)
      state.status = "cancelled"
      state.cancel_reason = e.data.reason
      state.cancelled_at = e.recorded_at
    end,
  },
}
