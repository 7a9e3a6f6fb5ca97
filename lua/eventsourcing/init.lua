-- eventsourcing: event sourcing for Lua on PostgreSQL (entry module).
local core = require "eventsourcing.core"

local es = {
  _VERSION = core._VERSION,
  ANY = "any",
  NO_STREAM = "no_stream",
  STREAM_EXISTS = "stream_exists",
  json = core.json,
  error = core.error,
  is_error = core.is_error,
}

function es.open(target, opts)
  local store, err = core.open(target, opts)
  if not store then return nil, err end
  -- remembered for a rebuild's worker processes (projector:rebuild workers)
  return require("eventsourcing.util").note_open(store, target, opts)
end

-- aggregates, repository (modules loaded on first use), given/when/then helpers
function es.aggregate(def) return require("eventsourcing.aggregate").new(def) end
function es.repository(store, opts) return require("eventsourcing.repository").new(store, opts) end
-- where repositories keep the state each command left (repository opts.cache)
function es.state_cache(opts) return require("eventsourcing.state_cache").new(opts) end
es.testing = require "eventsourcing.testing"

-- read models, projections and the projector (callable module tables:
-- es.read_model{...}, es.read_model.DELETE, es.read_model.apply_inline)
es.read_model = require "eventsourcing.read_model"
es.projection = require "eventsourcing.projection"
es.projector = require "eventsourcing.projector"
es.workflow = require "eventsourcing.workflow"   -- es.workflow{...}, es.workflow.runner(...)

-- The store's schema and an application's tables (read models, projection
-- checkpoints, workflow tables): es.migrate(store, { read_models = { ... },
-- projections = { ... }, workflows = { ... } }). Idempotent; what
-- `eventsourcing migrate --app FILE` runs.
function es.migrate(store, app) return require("eventsourcing.admin").migrate(store, app) end

return es
