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
  return core.open(target, opts)
end

return es
