-- eventsourcing.projection: custom projections that run their own SQL.
--
--   local Totals = es.projection {
--     name = "customer_totals",            -- ^[a-z_][a-z0-9_]*$, the checkpoint's name
--     migrate = function(tx) tx:execute("CREATE TABLE IF NOT EXISTS ...") end,   -- optional
--     reset   = function(tx) tx:execute("TRUNCATE ...") end,   -- optional: enables rebuild
--     category = "Order",                  -- optional: only streams "Order-..."
--     on = {
--       OrderPlaced = function(event, tx)
--         tx:execute("INSERT INTO t (customer, total) VALUES ($1, $2) ON CONFLICT ...",
--                    event.data.customer_id, event.data.total)
--       end,
--     },
--   }
--   es.projector(store, { Totals }):catch_up()
--
-- Handlers run in the projector's batch transaction: their SQL commits
-- together with the checkpoint (exactly-once effects), or not at all.
-- tx:execute(sql, ...) -> rows; it raises on failure, which stops the
-- projection at that event like any handler error. tx.store is the store
-- and tx.schema its PostgreSQL schema (nil for memory stores, whose
-- projections can only keep state in Lua).
local read_model = require "eventsourcing.read_model"

local M = {}

local Projection = {}
Projection.__index = Projection
M.Projection = Projection

function M.new(def)
  if type(def) ~= "table" then error("es.projection: expected a definition table", 2) end
  if not read_model.valid_ident(def.name) then
    error(("es.projection: name %q must match ^[a-z_][a-z0-9_]*$ and be at most 63 bytes")
      :format(tostring(def.name)), 2)
  end
  local on = {}
  for t, f in pairs(def.on or {}) do
    if type(t) ~= "string" or type(f) ~= "function" then
      error(("es.projection %s: on.%s must be a function(event, tx)"):format(def.name, tostring(t)), 2)
    end
    on[t] = f
  end
  for _, k in ipairs { "migrate", "reset" } do
    if def[k] ~= nil and type(def[k]) ~= "function" then
      error(("es.projection %s: %s must be a function(tx)"):format(def.name, k), 2)
    end
  end
  return setmetatable({ kind = "projection", name = def.name, on = on,
    category = require("eventsourcing.util").category(def, "es.projection " .. def.name),
    migrate_fn = def.migrate, reset_fn = def.reset }, Projection)
end

function Projection:__tostring() return "projection " .. self.name end

local Tx = {}
Tx.__index = Tx

function Tx:execute(sql, ...)
  if type(sql) ~= "string" then error("tx:execute: sql must be a string", 2) end
  local rows, err = self.store:query(sql, ...)
  if not rows then error(err, 2) end
  return rows
end
Tx.query = Tx.execute

function M.tx(store)
  local ok, schema = pcall(store.schema, store)
  return setmetatable({ store = store, schema = ok and schema or nil }, Tx)
end

function Projection:migrate(store)
  if self.migrate_fn and store:kind() ~= "memory" then
    local ok, err = pcall(self.migrate_fn, M.tx(store))
    if not ok then return nil, err end
  end
  return true
end

-- The projector's interface: apply events[1..n] in the open transaction.
-- Returns true, handled | false, index, message | nil, err (a connection
-- failure: retried later, not a handler error).
function Projection:_apply(store, _, events, n)
  local tx, on, handled = M.tx(store), self.on, 0
  for i = 1, n do
    local e = events[i]
    local h = on[e.type]
    if h then
      local ok, err = pcall(h, e, tx)
      if not ok then
        if require("eventsourcing.util").transient(err) then return nil, err end
        return false, i, tostring(err)
      end
      handled = handled + 1
    end
  end
  return true, handled
end

return setmetatable(M, { __call = function(_, def) return M.new(def) end })
