-- eventsourcing.cli.ops: the operator commands of bin/eventsourcing that act
-- on an app's projections and workflows, backups and checks.
-- install(H, { usage = fn }) adds handlers H[command](ctx, args) -> exit code | nil, err.
local admin = require "eventsourcing.admin"
local progress = require "eventsourcing.cli.progress"
local format = require "eventsourcing.cli.format"

local M = {}

function M.install(H, lib)
  local usage = lib.usage

  local function need_app(ctx, what)
    if not ctx.app then return usage("%s needs --app FILE (the application's definitions)", what) end
    return true
  end

  local STATUS_COLUMNS = { { "name", "NAME" }, { "state", "STATE" }, { "checkpoint", "CHECKPOINT" },
    { "lag_events", "LAG EVENTS" }, { "lag_seconds", "LAG SECONDS" }, { "handled", "HANDLED" },
    { "updated_at", "UPDATED" }, { "error", "LAST ERROR" }, { "held_by", "HELD BY" } }

  local function status_rows(rows)
    for _, r in ipairs(rows) do
      if type(r.lag_seconds) == "number" then r.lag_seconds = tonumber(("%.1f"):format(r.lag_seconds)) end
      if type(r.error) == "table" then
        r.error = ("%s at position %s: %s"):format(tostring(r.error.type), tostring(r.error.position),
          tostring(r.error.message))
      end
      -- the transaction readers wait for (a long one elsewhere)
      if type(r.held_by) == "table" then
        local h = r.held_by
        r.held_by = ("pid %s (%s@%s, %s, %.0f s): %s"):format(tostring(h.pid), tostring(h.user),
          tostring(h.database), tostring(h.state), h.seconds or 0, tostring(h.query or ""):gsub("%s+", " "))
      end
    end
    return rows
  end

  local P = {}

  function P.list(ctx)
    ctx.out:rows(admin.projections.list(ctx.app), { { "name", "NAME" }, { "kind", "KIND" } })
    return 0
  end

  function P.status(ctx)
    local rows, err = admin.projections.status(ctx.store, ctx.app)
    if not rows then return nil, err end
    ctx.out:rows(status_rows(rows), STATUS_COLUMNS)
    return 0
  end

  function P.rebuild(ctx, a)
    local report, finish = progress.new("rebuild " .. a.name, format.isatty(io.stderr))
    local r, err = admin.projections.rebuild(ctx.store, ctx.app, a.name, report)
    finish()
    if not r then return nil, err end
    ctx.out:message(("rebuilt %s from %d events"):format(r.name, r.events), r)
    return 0
  end

  local DONE = { reset = "reset to the first event", pause = "paused", resume = "resumed",
                 retry = "error cleared; it resumes at the failing event" }
  for action, text in pairs(DONE) do
    P[action] = function(ctx, a)
      local r, err = admin.projections[action](ctx.store, ctx.app, a.name)
      if not r then return nil, err end
      ctx.out:message(("%s: %s"):format(a.name, text), r)
      return 0
    end
  end

  function H.projections(ctx, a)
    -- status reads the ledger alone when there is no app
    if a.action ~= "status" then
      local ok, err = need_app(ctx, "projections " .. a.action)
      if not ok then return nil, err end
    end
    return P[a.action](ctx, a)
  end

  local W = {}

  function W.status(ctx)
    local rows, err = admin.workflows.status(ctx.store, ctx.app)
    if not rows then return nil, err end
    ctx.out:rows(status_rows(rows), { { "name", "NAME" }, { "state", "STATE" }, { "checkpoint", "CHECKPOINT" },
      { "lag_events", "LAG EVENTS" }, { "lag_seconds", "LAG SECONDS" }, { "handled", "HANDLED" },
      { "dead_letters", "DEAD LETTERS" },
      { "timers", "TIMERS" } })
    return 0
  end

  W["dead-letters"] = function(ctx, a)
    local rows, err = admin.workflows.dead_letters(ctx.store, a.name)
    if not rows then return nil, err end
    ctx.out:rows(rows, { { "event_id", "ID" }, { "workflow", "WORKFLOW" }, { "type", "TYPE" },
      { "stream", "STREAM" }, { "version", "VERSION" }, { "attempts", "ATTEMPTS" },
      { "failed_at", "FAILED AT" }, { "error", "ERROR" } })
    return 0
  end

  function W.retry(ctx, a)
    local ok, err = need_app(ctx, "workflows retry")
    if not ok then return nil, err end
    local r
    r, err = admin.workflows.retry(ctx.store, ctx.app, a.id)
    if not r then return nil, err end
    ctx.out:message(("%s %s: %s"):format(r.workflow, r.event_id,
      r.retried and "retried, done" or "retried, failed again (still a dead letter)"), r)
    return r.retried and 0 or 1
  end

  function W.discard(ctx, a)
    local r, err = admin.workflows.discard(ctx.store, a.id)
    if not r then return nil, err end
    ctx.out:message(("%s %s: discarded"):format(r.workflow, r.event_id), r)
    return 0
  end

  function W.timers(ctx)
    local rows, err = admin.workflows.timers(ctx.store)
    if not rows then return nil, err end
    ctx.out:rows(rows, { { "key", "KEY" }, { "due_at", "DUE AT" }, { "workflow", "WORKFLOW" },
      { "aggregate", "AGGREGATE" }, { "aggregate_id", "ID" }, { "command", "COMMAND" },
      { "attempts", "ATTEMPTS" }, { "last_error", "LAST ERROR" } })
    return 0
  end

  function H.workflows(ctx, a)
    return W[a.action](ctx, a)
  end

  -- Backups: export always writes NDJSON (the format import reads).
  function H.export(ctx, a)
    local r, err = admin.export(ctx.store, { category = a.category, after = a.after },
      function(line) io.stdout:write(line, "\n") end)
    if not r then return nil, err end
    io.stdout:flush()
    io.stderr:write(("exported %d events; last checkpoint %s\n"):format(r.events, tostring(r.checkpoint or "-")))
    return 0
  end

  function H.import(ctx)
    local r, err = admin.import(ctx.store, io.lines())
    if not r then return nil, err end
    local text = ("imported %d events (%d already present) from %d lines"):format(r.imported, r.present, r.lines)
    if ctx.out.json then ctx.out:record(r) else ctx.out:line(text) end
    return 0
  end

  function H.verify(ctx)
    local r, err = admin.verify(ctx.store, ctx.app)
    if not r then return nil, err end
    if ctx.out.json then
      for _, c in ipairs(r.checks) do ctx.out:record(c) end
    else
      for _, c in ipairs(r.checks) do
        ctx.out:line(("%s  %s"):format(c.ok and "ok  " or "FAIL", c.name))
        for _, p in ipairs(c.problems) do ctx.out:line("      " .. p) end
      end
    end
    return r.ok and 0 or 1
  end
end

return M
