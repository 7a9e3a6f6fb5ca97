-- eventsourcing.admin: the operations behind the `eventsourcing` command
-- (and any other console). Every function takes an open store and returns
-- plain Lua tables (or nil, err with err.kind as everywhere else); none
-- prints or formats: lua/eventsourcing/cli/ does that.
--
--   local admin = require "eventsourcing.admin"
--   local app = assert(admin.load_app("examples/orders/app.lua"))
--   admin.migrate(store, app)        -> { schema, read_models, projections, workflows }
--   admin.stats(store)               -> { events, streams, categories = {...}, size_bytes, ... }
--   admin.overview(store)            -> stats without instants (one pass over the events)
--   admin.streams(store, { category, search, after, limit }) -> rows
--   admin.trace(store, correlation_id)                 -> events of one chain
--   admin.read(store, stream, { from, to, backward, at, limit })  -> events
--   admin.tail(store, { category, type, limit })       -> events, checkpoint
--   admin.follow(store, checkpoint, { category, type, limit }) -> events, checkpoint
--   admin.before(store, checkpoint, { limit })         -> older events, checkpoint further back
--   admin.export / import            (eventsourcing.admin.transfer)
--   admin.verify(store, app)         (eventsourcing.admin.verify)
--   admin.projections.* / admin.workflows.*   (below)
local common = require "eventsourcing.admin.common"

local M = {}

local fail, q, ts, need_pg, one = common.fail, common.q, common.ts, common.need_pg, common.one

-- The application -------------------------------------------------------------

local APP_KEYS = { aggregates = "table", read_models = "table", projections = "table",
                   workflows = "table", runner_options = "table" }

-- Loads a Lua file returning { aggregates = { Name = A }, read_models = { ... },
-- projections = { ... }, workflows = { ... }, runner_options = { ... } }.
function M.load_app(path)
  local chunk, err = loadfile(path)
  if not chunk then return fail("invalid", "app %s: %s", path, err) end
  local ok, app = pcall(chunk, path)
  if not ok then return fail("invalid", "app %s failed: %s", path, tostring(app)) end
  if type(app) ~= "table" then return fail("invalid", "app %s must return a table, not %s", path, type(app)) end
  for k, v in pairs(app) do
    if APP_KEYS[k] and type(v) ~= APP_KEYS[k] then
      return fail("invalid", "app %s: %s must be a table", path, k)
    end
  end
  return app
end

M.projections_of = common.projections_of

-- Migrations --------------------------------------------------------------------

-- Creates or upgrades the store's schema and the app's tables: read model
-- tables, projection checkpoints, workflow tables and checkpoints.
-- Idempotent; also es.migrate(store, app).
function M.migrate(store, app)
  local ok, err = store:migrate()
  if not ok then return nil, err end
  local array = require("eventsourcing.core").json.array
  local out = { schema = store:schema(), read_models = array {}, projections = array {}, workflows = array {} }
  local list = M.projections_of(app)
  if #list > 0 then
    ok, err = require("eventsourcing.projector")(store, list):migrate()
    if not ok then return nil, err end
    for _, p in ipairs(list) do
      local into = p.kind == "read_model" and out.read_models or out.projections
      into[#into + 1] = p.name
    end
  end
  local names = {}
  for _, wf in ipairs(app and app.workflows or {}) do names[#names + 1] = wf.name end
  if #names > 0 then
    ok, err = require("eventsourcing.workflow").migrate(store, names)
    if not ok then return nil, err end
    out.workflows = array(names)
  end
  return out
end

-- The store ---------------------------------------------------------------------

-- Counts, categories, first and last instants, size on disk.
function M.stats(store)
  local ok, err = need_pg(store, "stats")
  if not ok then return nil, err end
  local out
  out, err = one(store, "SELECT (SELECT count(*) FROM <schema>.events) AS events, "
    .. "(SELECT count(*) FROM <schema>.events WHERE version = 1) AS streams, "
    .. "(SELECT max(position) FROM <schema>.events) AS last_position, "
    .. ts("(SELECT min(recorded_at) FROM <schema>.events)", "first_recorded_at") .. ", "
    .. ts("(SELECT max(recorded_at) FROM <schema>.events)", "last_recorded_at") .. ", "
    .. "(SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
    .. "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r')::bigint AS size_bytes, "
    .. "pg_total_relation_size('<schema>.events') AS events_bytes", store:schema())
  if not out then return nil, err end
  out.schema = store:schema()
  local rows
  rows, err = store:query(q(store, "SELECT category, count(*) AS events, count(DISTINCT stream) AS streams, "
    .. ts("min(recorded_at)", "first_recorded_at") .. ", " .. ts("max(recorded_at)", "last_recorded_at")
    .. " FROM <schema>.events GROUP BY category ORDER BY category"))
  if not rows then return nil, err end
  out.categories = rows
  return out
end

-- What stats gives without first/last instants, in one pass over the
-- events (a stream's first event has version 1, so counting those counts
-- streams), for pages that show it on every visit.
-- -> { schema, events, streams, last_position, size_bytes, categories = { category, events, streams } }
function M.overview(store)
  local ok, err = need_pg(store, "overview")
  if not ok then return nil, err end
  local out
  out, err = one(store, "SELECT (SELECT max(position) FROM <schema>.events) AS last_position, "
    .. "(SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
    .. "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r')::bigint AS size_bytes",
    store:schema())
  if not out then return nil, err end
  out.schema = store:schema()
  out.categories, err = store:query(q(store, "SELECT category, count(*) AS events, "
    .. "count(*) FILTER (WHERE version = 1) AS streams FROM <schema>.events GROUP BY 1 ORDER BY 1"))
  if not out.categories then return nil, err end
  out.events, out.streams = 0, 0
  for _, c in ipairs(out.categories) do
    out.events, out.streams = out.events + c.events, out.streams + c.streams
  end
  return out
end

-- Streams with their version and last event, by name. opts: category,
-- search (part of the name), after (a name: the next page, keyset), limit.
-- The names come from the (stream, version) index one at a time (a
-- recursive skip scan), so a page costs its length, not the log's.
function M.streams(store, opts)
  opts = opts or {}
  local ok, err = need_pg(store, "streams")
  if not ok then return nil, err end
  local filter = "($1::text IS NULL OR e.category = $1) "
    .. "AND ($3::text IS NULL OR strpos(lower(e.stream), lower($3)) > 0)"
  return store:query(q(store, "WITH RECURSIVE s(stream) AS ("
    .. "(SELECT e.stream FROM <schema>.events e WHERE ($4::text IS NULL OR e.stream > $4) AND " .. filter
    .. " ORDER BY e.stream LIMIT 1) UNION ALL "
    .. "SELECT (SELECT e.stream FROM <schema>.events e WHERE e.stream > s.stream AND " .. filter
    .. " ORDER BY e.stream LIMIT 1) FROM s WHERE s.stream IS NOT NULL) "
    .. "SELECT s.stream, l.version, l.type AS last_type, " .. ts("l.recorded_at", "last_recorded_at")
    .. " FROM s CROSS JOIN LATERAL (SELECT version, type, recorded_at FROM <schema>.events e "
    .. "WHERE e.stream = s.stream ORDER BY version DESC LIMIT 1) l WHERE s.stream IS NOT NULL "
    .. "ORDER BY s.stream LIMIT $2"), opts.category, opts.limit or 100, opts.search, opts.after)
end

-- One stream's events (opts as store:read; at = before that instant).
function M.read(store, stream, opts)
  opts = opts or {}
  local it, err = store:read(stream, { from = opts.from, to = opts.to, backward = opts.backward,
    before = opts.at, limit = opts.limit })
  if not it then return nil, err end
  local out = {}
  for e in it do out[#out + 1] = e end
  if #out == 0 and store:version(stream) == 0 then
    return fail("not_found", "stream %s does not exist", stream)
  end
  return out
end

local function filters(opts)
  return { category = opts.category, types = opts.type and { opts.type } or nil }
end

-- The last opts.limit (default 20) events of the global log, oldest first,
-- and the checkpoint to follow from.
function M.tail(store, opts)
  opts = opts or {}
  local limit = opts.limit or 20
  local after
  if store:kind() == "postgresql" then
    -- the checkpoint just before the last `limit` matching events, under
    -- read_all's watermark
    local row, err = one(store, "SELECT txid::text || ':' || position AS cp FROM <schema>.events "
      .. "WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) AND ($1::text IS NULL OR category = $1) "
      .. "AND ($2::text IS NULL OR type = $2) ORDER BY txid DESC, position DESC OFFSET $3 LIMIT 1",
      opts.category, opts.type, limit)
    if not row then return nil, err end
    after = row.cp
  end
  local f = filters(opts)
  local out, cp = {}, after
  repeat
    local batch, ncp = store:read_all({ after = cp, limit = 1000, category = f.category, types = f.types })
    if not batch then return nil, ncp end
    for _, e in ipairs(batch) do out[#out + 1] = e end
    if #batch > 0 then cp = ncp end
  until #batch == 0
  while #out > limit do table.remove(out, 1) end
  return out, cp
end

-- The events after checkpoint (one page of opts.limit, default 1000):
-- events, new checkpoint.
function M.follow(store, checkpoint, opts)
  opts = opts or {}
  local f = filters(opts)
  local batch, cp = store:read_all({ after = checkpoint, limit = opts.limit or 1000, category = f.category,
    types = f.types })
  if not batch then return nil, cp end
  return batch, #batch > 0 and cp or checkpoint
end

-- The events of one correlation chain (workflow metadata correlation_id,
-- or the event that started it), in the global order.
function M.trace(store, correlation_id)
  return require("eventsourcing.workflow").trace(store, correlation_id)
end

-- One page of the global log going back in time: the opts.limit (default
-- 50) events just before checkpoint in read_all's order, oldest first,
-- and the checkpoint to page further back from (nil at the beginning).
-- opts.inclusive: the page ends with the event at checkpoint itself.
-- Each event carries its checkpoint.
-- Keyset paging over the (txid, position) index: as quick at the start
-- of a long log as at its end.
function M.before(store, checkpoint, opts)
  opts = opts or {}
  local ok, err = need_pg(store, "before")
  if not ok then return nil, err end
  local txid, pos = tostring(checkpoint):match("^(%d+):(%d+)$")
  if not txid then return fail("invalid", "checkpoint must look like 1234:56, not %s", tostring(checkpoint)) end
  local rows
  rows, err = store:query(q(store, "SELECT id::text AS id, stream, version, position, type, data, metadata, "
    .. ts("recorded_at") .. ", txid::text || ':' || position AS checkpoint FROM <schema>.events "
    .. "WHERE (txid, position) " .. (opts.inclusive and "<=" or "<") .. " ($1::xid8, $2::bigint) "
    .. "ORDER BY txid DESC, position DESC LIMIT $3"),
    txid, tonumber(pos), opts.limit or 50)
  if not rows then return nil, err end
  local out = {}
  for i = #rows, 1, -1 do out[#out + 1] = rows[i] end
  local oldest = out[1]
  return out, oldest and #rows == (opts.limit or 50) and oldest.checkpoint or nil
end

local transfer = require "eventsourcing.admin.transfer"
M.export, M.import = transfer.export, transfer.import
M.verify = require("eventsourcing.admin.verify").verify

M.projections = require "eventsourcing.admin.projections"
M.workflows = require "eventsourcing.admin.workflows"

return M
