-- eventsourcing.cli.commands: what each command of bin/eventsourcing does
-- with eventsourcing.admin's results. run(args) -> exit code | nil, err
-- (err.usage: a usage error, exit 2).
local es = require "eventsourcing"
local admin = require "eventsourcing.admin"
local format = require "eventsourcing.cli.format"

local M = {}

local function usage(fmt, ...)
  local e = es.error("invalid", fmt:format(...))
  e.usage = true
  return nil, e
end

local EVENT_COLUMNS = { { "position", "POSITION" }, { "stream", "STREAM" }, { "version", "VERSION" },
  { "type", "TYPE" }, { "recorded_at", "RECORDED_AT" }, { "data", "DATA" } }

-- Events as NDJSON carry every field; on a terminal the main ones.
local function event_row(e)
  return { id = e.id, stream = e.stream, version = e.version, position = e.position, type = e.type,
           data = e.data, metadata = e.metadata, recorded_at = e.recorded_at, checkpoint = e.checkpoint }
end

local function print_events(out, events)
  local rows = {}
  for i, e in ipairs(events) do rows[i] = event_row(e) end
  out:rows(rows, EVENT_COLUMNS)
end

local H = {}   -- command handlers: H[name](ctx, args) -> code | nil, err

function H.migrate(ctx)
  local r, err = admin.migrate(ctx.store, ctx.app)
  if not r then return nil, err end
  local function list(t) return #t > 0 and table.concat(t, ", ") or "-" end
  ctx.out:message(("schema %s is up to date; read models: %s; projections: %s; workflows: %s")
    :format(r.schema, list(r.read_models), list(r.projections), list(r.workflows)), r)
  return 0
end

function H.stats(ctx)
  local s, err = admin.stats(ctx.store)
  if not s then return nil, err end
  local out = ctx.out
  if out.json then out:record(s); return 0 end
  out:record(s, { { "schema", "schema" }, { "events", "events" }, { "streams", "streams" },
    { "last_position", "last position" }, { "first_recorded_at", "first recorded" },
    { "last_recorded_at", "last recorded" }, { "size_bytes", "size on disk (bytes)" },
    { "events_bytes", "events table (bytes)" } })
  out:line("")
  out:rows(s.categories, { { "category", "CATEGORY" }, { "events", "EVENTS" }, { "streams", "STREAMS" },
    { "first_recorded_at", "FIRST" }, { "last_recorded_at", "LAST" } })
  return 0
end

function H.streams(ctx, a)
  local rows, err = admin.streams(ctx.store, { category = a.category, limit = a.limit })
  if not rows then return nil, err end
  ctx.out:rows(rows, { { "stream", "STREAM" }, { "version", "VERSION" }, { "last_type", "LAST TYPE" },
    { "last_recorded_at", "LAST RECORDED" } })
  return 0
end

function H.read(ctx, a)
  if a.at and not require("eventsourcing.core").time_parse(a.at) then
    return usage("--at must be an ISO-8601 instant such as 2026-01-15T10:00:00Z, not %q", a.at)
  end
  local events, err = admin.read(ctx.store, a.stream, { from = a.from, to = a.to, backward = a.backward, at = a.at })
  if not events then return nil, err end
  print_events(ctx.out, events)
  return 0
end

local function follow(ctx, a, cp)
  local sleep = require("eventsourcing.core").sleep
  local ok, err = pcall(function()
    while true do
      local events, ncp = admin.follow(ctx.store, cp, a)
      if not events then error(ncp, 0) end
      cp = ncp
      for _, e in ipairs(events) do
        if ctx.out.json then ctx.out:rows({ event_row(e) })
        else
          local c = format.cell
          ctx.out:line(table.concat({ c(e.position), c(e.stream), c(e.version), c(e.type), c(e.recorded_at),
            c(e.data) }, "  "))
        end
      end
      ctx.out:flush()
      if #events == 0 then sleep(a.poll) end
    end
  end)
  if not ok and tostring(err):match("interrupted!$") then return 0 end
  if type(err) == "table" then return nil, err end
  error(err, 0)
end

function H.tail(ctx, a)
  local events, cp = admin.tail(ctx.store, { category = a.category, type = a.type, limit = a.limit })
  if not events then return nil, cp end
  print_events(ctx.out, events)
  ctx.out:flush()
  if not a.follow then return 0 end
  return follow(ctx, a, cp)
end

M.handlers = H
require("eventsourcing.cli.ops").install(H, { usage = usage })

-- Opens the store and runs the command.
function M.run(a)
  local url = a.db or os.getenv("ES_DATABASE_URL")
  if not url or url == "" then return usage("no database: pass --db URL or set ES_DATABASE_URL") end
  if a.schema and not a.schema:match("^[a-z_][a-z0-9_]*$") then
    return usage("--schema %q must be lower-case letters, digits and _", a.schema)
  end
  local ctx = { out = format.new({ json = a.json }) }
  if a.app then
    local app, err = admin.load_app(a.app)
    if not app then return nil, err end
    ctx.app = app
  end
  local store, err = es.open(url, a.schema and { schema = a.schema } or nil)
  if not store then return nil, err end
  ctx.store = store
  local code, cerr = H[a.command](ctx, a)
  store:close()
  return code, cerr
end

return M
