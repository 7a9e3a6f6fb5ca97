-- eventsourcing.admin.workflows: workflow status, dead letters and timers.
--
-- A dead letter is named by its event id (or "<workflow>:<event id>" when
-- several workflows failed on the same event). Retrying one runs it again
-- through the app's runner; discarding one deletes it (the event stays
-- handled as far as the workflow's checkpoint goes: it is skipped).
local common = require "eventsourcing.admin.common"

local M = {}

local function workflow_mod() return require "eventsourcing.workflow" end

local function runner(store, app)
  local list = app and app.workflows or {}
  if #list == 0 then return common.fail("invalid", "the app defines no workflows (--app FILE)") end
  local opts = {}
  for k, v in pairs(app.runner_options or {}) do opts[k] = v end
  opts.aggregates = opts.aggregates or app.aggregates
  return workflow_mod().runner(store, list, opts)
end

-- runner:status() rows, each with `state`; without an app, the ledger's
-- rows (common.ledger_status).
function M.status(store, app)
  if not app then return common.ledger_status(store, "workflows") end
  local r, err = runner(store, app)
  if not r then return nil, err end
  local rows
  rows, err = r:status()
  if not rows then return nil, err end
  for _, s in ipairs(rows) do s.state = s.state or s.status or "running" end
  return rows
end

-- pause / resume one workflow through the runner's methods of those
-- names: -> { name, action } | nil, err
for _, action in ipairs { "pause", "resume" } do
  M[action] = function(store, app, name)
    local r, err = runner(store, app)
    if not r then return nil, err end
    local known = false
    for _, wf in ipairs(app.workflows) do known = known or wf.name == name end
    if not known then return common.fail("not_found", "no workflow named %s", tostring(name)) end
    if type(r[action]) ~= "function" then
      return common.fail("invalid", "this runner has no %s (it needs the follower engine's runner)", action)
    end
    local ok
    ok, err = r[action](r, name)
    if not ok then return nil, err end
    return { name = name, action = action }
  end
end

function M.dead_letters(store, name)
  return workflow_mod().dead_letters(store, name)
end

function M.timers(store)
  return workflow_mod().timers(store)
end

-- The one dead letter an id names: row | nil, err
local function find(store, id)
  local wf, event_id = tostring(id):match("^(.+):(%x+%-[%x%-]+)$")
  event_id = (event_id or tostring(id)):lower()
  local rows, err = M.dead_letters(store, wf)
  if not rows then return nil, err end
  local found = {}
  for _, d in ipairs(rows) do
    if d.event_id == event_id then found[#found + 1] = d end
  end
  if #found == 0 then return common.fail("not_found", "no dead letter with id %s", tostring(id)) end
  if #found > 1 then
    return common.fail("invalid", "dead letters of several workflows have event id %s: "
      .. "name one as <workflow>:%s", event_id, event_id)
  end
  return found[1]
end

-- Runs one dead letter again. -> { workflow, event_id, retried = bool } | nil, err
function M.retry(store, app, id)
  local d, err = find(store, id)
  if not d then return nil, err end
  local r
  r, err = runner(store, app)
  if not r then return nil, err end
  local res
  res, err = r:retry_dead_letters({ workflow = d.workflow, event_id = d.event_id })
  if not res then return nil, err end
  if res.retried + res.failed == 0 then
    return common.fail("invalid", "dead letter %s of workflow %s was not retried: is %s one of the app's workflows?",
      d.event_id, d.workflow, d.workflow)
  end
  return { workflow = d.workflow, event_id = d.event_id, retried = res.retried > 0 }
end

-- Deletes one dead letter. -> { workflow, event_id } | nil, err
function M.discard(store, id)
  local ok, err = common.need_pg(store, "discard")
  if not ok then return nil, err end
  local d
  d, err = find(store, id)
  if not d then return nil, err end
  ok, err = store:query(common.q(store, "DELETE FROM <schema>.dead_letters WHERE workflow = $1 AND event_id = $2"),
    d.workflow, d.event_id)
  if not ok then return nil, err end
  return { workflow = d.workflow, event_id = d.event_id }
end

return M
