-- eventsourcing.admin.projections: an app's read models and projections
-- (list, status, rebuild, reset, pause, resume, retry), through the
-- projector's own API.
local common = require "eventsourcing.admin.common"

local M = {}

local list_of = common.projections_of

local function projector(store, app)
  local list = list_of(app)
  if #list == 0 then
    return common.fail("invalid", "the app defines no read models or projections (--app FILE)")
  end
  return require("eventsourcing.projector")(store, list)
end

local function names(app)
  local out = {}
  for _, p in ipairs(list_of(app)) do out[#out + 1] = p.name end
  return table.concat(out, ", ")
end

local function check_name(app, name)
  for _, p in ipairs(list_of(app)) do
    if p.name == name then return true end
  end
  return common.fail("not_found", "no projection named %s (the app has: %s)", tostring(name), names(app))
end

-- -> { { name, kind } }
function M.list(app)
  local out = {}
  for _, p in ipairs(list_of(app)) do out[#out + 1] = { name = p.name, kind = p.kind or "projection" } end
  return out
end

-- projector:status() rows, each with `state` ("running", "paused", "failed");
-- without an app, the ledger's rows (common.ledger_status).
function M.status(store, app)
  if not app then return common.ledger_status(store, "projections") end
  local p, err = projector(store, app)
  if not p then return nil, err end
  local rows
  rows, err = p:status()
  if not rows then return nil, err end
  for _, r in ipairs(rows) do r.state = r.state or r.status end
  return rows
end

-- rebuild(store, app, name, progress): progress(done, total, rate, eta).
-- -> { name, events } | nil, err
function M.rebuild(store, app, name, progress)
  local ok, err = check_name(app, name)
  if not ok then return nil, err end
  local p
  p, err = projector(store, app)
  if not p then return nil, err end
  local n
  n, err = p:rebuild(name, { progress = progress, bar = false })
  if not n then return nil, err end
  return { name = name, events = n }
end

-- reset / pause / resume / retry: -> { name, action } | nil, err
for _, action in ipairs { "reset", "pause", "resume", "retry" } do
  M[action] = function(store, app, name)
    local ok, err = check_name(app, name)
    if not ok then return nil, err end
    local p
    p, err = projector(store, app)
    if not p then return nil, err end
    if type(p[action]) ~= "function" then
      return common.fail("invalid", "this projector has no %s (it needs the follower engine's projector)", action)
    end
    ok, err = p[action](p, name)
    if not ok then return nil, err end
    return { name = name, action = action }
  end
end

return M
