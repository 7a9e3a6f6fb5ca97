-- examples/orders/http/workflows.lua: the order workflows for the HTTP
-- service (stock reservation, out-of-stock compensation, draft expiry:
-- examples/orders/workflows.lua) as a process of its own. scripts/serve.sh
-- runs it under scripts/supervise.sh, which restarts it if it dies.
--
--   ES_HTTP_DATABASE_URL=... [ES_HTTP_SCHEMA=...] lua5.4 examples/orders/http/workflows.lua
--
-- ES_HTTP_DRAFT_TTL: seconds a draft order lives before it expires (default
-- 86400); ES_HTTP_WORKFLOW_POLL: seconds between polls of the log when no
-- wake-up comes (default 0.5); ES_HTTP_READ_MODEL=projector: a projector
-- keeps rm_orders, so the workflow must not update it inline.
-- Exactly once however often it is restarted: each batch and its
-- checkpoint commit together (eventsourcing.workflow).
local es = require "eventsourcing"
local workflows = require "orders.workflows"

local url = os.getenv("ES_HTTP_DATABASE_URL") or os.getenv("ES_DATABASE_URL")
assert(url and url ~= "", "ES_HTTP_DATABASE_URL is not set")
local schema = os.getenv("ES_HTTP_SCHEMA")
if schema == "" then schema = nil end

local function number_env(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  local n = tonumber(v)
  assert(n and n > 0, name .. " must be a positive number of seconds")
  return n
end

local store = assert(es.open(url, schema and { schema = schema } or nil))
assert(require("orders.service").migrate(store))
local runner = workflows.runner(store, {
  draft_ttl = number_env("ES_HTTP_DRAFT_TTL", workflows.DEFAULT_DRAFT_TTL),
  read_models = os.getenv("ES_HTTP_READ_MODEL") == "projector" and false or nil,
  log = function(line) io.stderr:write("workflows: ", line, "\n") end,
})
assert(runner:migrate())
io.stderr:write("workflows: running\n")
assert(runner:run { poll = number_env("ES_HTTP_WORKFLOW_POLL", 0.5) })
