-- examples/orders/fields.lua: what the order domain's modules share:
-- field errors, integer money and the order's item lines.
local es = require "eventsourcing"

local M = {}

-- The error of a command field that is wrong (kind "invalid", err.field).
function M.invalid(field, message)
  return es.error("invalid", field .. " " .. message, { field = field })
end

-- Lua 5.4: an integral float as an integer (math.type), so it stays one
-- in JSON; LuaJIT has only doubles.
function M.as_integer(v)
  if math.tointeger then return math.tointeger(v) or v end
  return v
end

-- The line of items holding product_id: item, index.
function M.find_item(items, product_id)
  for i, item in ipairs(items) do
    if item.product_id == product_id then return item, i end
  end
end

-- The sum of quantity x unit_price over items, in minor units.
function M.total_of(items)
  local t = 0
  for _, item in ipairs(items) do t = t + item.quantity * item.unit_price end
  return M.as_integer(t)
end

return M
