-- eventsourcing.workflow_ids: the name-based UUIDs (version 5, SHA-1,
-- RFC 4122) of the events workflows append, so a replayed step appends
-- nothing twice. Made in C by libuuid's uuid_generate_sha1 (core.uuid5);
-- spec/01_uuid5_spec.lua pins them to the ids the SHA-1 written in Lua
-- made before, which stored events carry.
local core = require "eventsourcing.core"

local M = {}

-- RFC 4122 version 5 UUID of `name` in namespace `ns` (a UUID string).
M.uuid5 = core.uuid5

-- The namespace of workflow ids: uuid5(NAMESPACE_URL, "eventsourcing:workflow").
M.NAMESPACE = M.uuid5("6ba7b811-9dad-11d1-80b4-00c04fd430c8", "eventsourcing:workflow")

-- The id of event `index` of the command issued at `step` by workflow
-- `name` while handling the event with id `trigger`.
function M.derive_id(name, trigger, step, index)
  return M.uuid5(M.NAMESPACE, ("%s\0%s\0%s\0%s"):format(name, trigger, step, index or 1))
end

return M
