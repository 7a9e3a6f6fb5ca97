-- eventsourcing.admin.common: small helpers the admin modules share.
local core = require "eventsourcing.core"

local M = {}

-- nil, err of kind `kind` with a formatted message.
function M.fail(kind, fmt, ...)
  return nil, core.error(kind, select("#", ...) > 0 and fmt:format(...) or fmt)
end

-- SQL with <schema> replaced by the store's schema (validated by the
-- store when it was opened; quoted anyway).
function M.q(store, sql)
  return (sql:gsub("<schema>", '"' .. store:schema() .. '"'))
end

-- A timestamptz as the stores write instants: "YYYY-MM-DDTHH:MM:SS.ffffffZ".
function M.ts(expr, alias)
  return ([[to_char(%s AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS %s]])
    :format(expr, alias or expr)
end

-- The operations that speak SQL need PostgreSQL.
function M.need_pg(store, what)
  if store:kind() ~= "postgresql" then
    return M.fail("invalid", "%s needs a PostgreSQL store (this one is %s)", what, store:kind())
  end
  return true
end

-- The first row of a query (an empty table when there is none).
function M.one(store, sql, ...)
  local rows, err = store:query(M.q(store, sql), ...)
  if not rows then return nil, err end
  return rows[1] or {}
end

-- The read models and projections of an app, in one list.
function M.projections_of(app)
  local list = {}
  for _, p in ipairs(app and app.read_models or {}) do list[#list + 1] = p end
  for _, p in ipairs(app and app.projections or {}) do list[#list + 1] = p end
  return list
end

-- Status straight from a checkpoint ledger ("projections" or "workflows"),
-- for an operator without the app's definitions: one row per ledger row
-- (a consumer group's partitions each have theirs), with the lag and what
-- holds readers back as the follower engine reports them.
-- -> rows | nil, err
function M.ledger_status(store, ledger)
  local ok, err = M.need_pg(store, ledger .. " status")
  if not ok then return nil, err end
  local tbl = ('"%s".%s'):format(store:schema(), ledger)
  local row
  row, err = M.one(store, "SELECT to_regclass($1) IS NOT NULL AS has", tbl)
  if not row then return nil, err end
  if not row.has then
    return M.fail("not_found", "schema %s has no %s ledger (nothing has followed the log there yet)",
      store:schema(), ledger)
  end
  local rows
  rows, err = store:query(("SELECT name, checkpoint, position, handled, error, paused, %s, %s FROM %s "
    .. "ORDER BY name"):format(M.ts("updated_at"), M.ts("failed_at"), tbl))
  if not rows then return nil, err end
  local L = require "eventsourcing.follower_ledger"
  local held
  for _, r in ipairs(rows) do
    r.lag_events, r.lag_seconds = L.lag(store, r.checkpoint)
    if not r.lag_events then return nil, r.lag_seconds end
    if r.lag_events > 0 and held == nil then
      held, err = L.held_by(store)
      if held == nil and err then return nil, err end
      held = held or false
    end
    if r.lag_events > 0 and held then r.held_by = held end
    r.state = r.paused and "paused" or (r.error and "failed") or "running"
  end
  return rows
end

return M
