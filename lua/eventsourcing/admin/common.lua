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

return M
