-- eventsourcing.workflow_definition: es.workflow { name, on = { T = fn },
-- category = "Order" (optional: only those streams), max_attempts }.
local M = {}

local Workflow = {}
Workflow.__index = Workflow
M.Workflow = Workflow

function M.new(def)
  if type(def) ~= "table" then error("es.workflow: expected a definition table", 2) end
  if type(def.name) ~= "string" or not def.name:match("^[%w_.:%-]+$") or #def.name > 200 then
    error("es.workflow: name must be a string of letters, digits, '_', '.', ':' or '-'", 2)
  end
  if type(def.on) ~= "table" then error(("es.workflow %s: on must be a table"):format(def.name), 2) end
  local on, types = {}, {}
  for t, f in pairs(def.on) do
    if type(t) ~= "string" or type(f) ~= "function" then
      error(("es.workflow %s: on.%s must be a function(event, ctx)"):format(def.name, tostring(t)), 2)
    end
    on[t] = f
    types[#types + 1] = t
  end
  table.sort(types)
  return setmetatable({ name = def.name, on = on, types = types,
    category = require("eventsourcing.util").category(def, "es.workflow " .. def.name),
    max_attempts = def.max_attempts }, Workflow)
end

function Workflow:__tostring() return "workflow " .. self.name end

function Workflow:runner(store, opts)
  return require("eventsourcing.workflow_runner").new(store, { self }, opts)
end

return M
