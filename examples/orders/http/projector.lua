-- examples/orders/http/projector.lua: keeps the order read models up to date
-- for the HTTP service (scripts/serve.sh runs it under a supervisor that
-- restarts it if it dies).
--
--   ES_HTTP_DATABASE_URL=... [ES_HTTP_SCHEMA=...] lua5.4 examples/orders/http/projector.lua
local es = require "eventsourcing"

local url = os.getenv("ES_HTTP_DATABASE_URL") or os.getenv("ES_DATABASE_URL")
assert(url and url ~= "", "ES_HTTP_DATABASE_URL is not set")
local schema = os.getenv("ES_HTTP_SCHEMA")
if schema == "" then schema = nil end

local store = assert(es.open(url, schema and { schema = schema } or nil))
assert(store:migrate())

-- the read models the service queries (the same list it updates inline)
local models = require("orders.service").read_models
local projector = es.projector(store, models)
io.stderr:write(("projector: catching up (%d read model(s))\n"):format(#models))
assert(projector:catch_up())
io.stderr:write("projector: live\n")
assert(projector:run())
