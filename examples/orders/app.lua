-- examples/orders/app.lua: the order service's definitions, for the
-- command-line tool and es.migrate:
--   bin/eventsourcing --app examples/orders/app.lua migrate
--   local app = dofile("examples/orders/app.lua"); es.migrate(store, app)
-- Loaded as a file, so it finds its own modules (orders.*) next to it.
local here = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".") .. "/.."
if not package.path:find(here .. "/?.lua", 1, true) then
  package.path = here .. "/?.lua;" .. package.path
end

local read_model = require "orders.read_model"
local workflows = require "orders.workflows"

return {
  aggregates = workflows.aggregates,
  read_models = { read_model.Orders },
  projections = {},
  workflows = { workflows.fulfilment() },
  -- the workflow runner updates rm_orders inline with the orders it cancels
  runner_options = { read_models = { read_model.Orders } },
}
