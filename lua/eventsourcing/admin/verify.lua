-- eventsourcing.admin.verify: checks a store's invariants and, with an app,
-- that each read model equals a rebuild of it.
--
--   verify(store, app) -> { checks = { { name, ok, problems = { "..." } } }, ok = bool } | nil, err
--
-- Store checks: versions are dense per stream (1..n), each event's
-- category agrees with its stream name, event ids are unique, and the global order
-- (read_all) delivers every event once, each stream's in version order.
-- Read models: replayed into a scratch table up to the live table's
-- checkpoint, under its lease (so its projector cannot move meanwhile),
-- then compared row by row; the scratch table is dropped in the end.
local common = require "eventsourcing.admin.common"
local json = require("eventsourcing.core").json

local q = common.q

local M = {}

local MAX_SHOWN = 20

local function check(name, rows, describe)
  local c = { name = name, ok = #rows == 0, problems = json.array {} }
  for i = 1, math.min(#rows, MAX_SHOWN) do c.problems[i] = describe(rows[i]) end
  if #rows > MAX_SHOWN then c.problems[#c.problems + 1] = ("... and %d more"):format(#rows - MAX_SHOWN) end
  return c
end

local function query_check(store, name, sql, describe)
  local rows, err = store:query(q(store, sql .. " LIMIT 1000"))
  if not rows then return nil, err end
  return check(name, rows, describe)
end

local function dense(store)
  return query_check(store, "dense versions per stream",
    "SELECT stream, count(*) AS n, min(version) AS lo, max(version) AS hi FROM <schema>.events "
    .. "GROUP BY stream HAVING min(version) <> 1 OR max(version) <> count(*) ORDER BY stream",
    function(r) return ("stream %s: %d events with versions %d..%d"):format(r.stream, r.n, r.lo, r.hi) end)
end

-- append() writes each event's category (the stream name up to its
-- first "-"); an event written another way may carry a wrong one, and
-- category reads would then miss it.
local function categories_agree(store)
  return query_check(store, "categories agree with the stream names",
    "SELECT stream, version, category FROM <schema>.events "
    .. "WHERE category <> split_part(stream, '-', 1) ORDER BY stream, version",
    function(r)
      return ("stream %s version %d: category %q, the stream name says %q")
        :format(r.stream, r.version, r.category, (r.stream:match("^[^-]*")))
    end)
end

local function ids_unique(store)
  return query_check(store, "event ids unique",
    "SELECT id::text AS id, count(*) AS n FROM <schema>.events GROUP BY id HAVING count(*) > 1 ORDER BY 1",
    function(r) return ("id %s is used by %d events"):format(r.id, r.n) end)
end

-- Reads the whole log through read_all: every event once, streams in order.
local function global_order(store)
  local rows, after, n, last = {}, nil, 0, {}
  while true do
    local batch, cp = store:read_all({ after = after, limit = 10000 })
    if not batch then return nil, cp end
    if #batch == 0 then break end
    for _, e in ipairs(batch) do
      n = n + 1
      local want = (last[e.stream] or 0) + 1
      if e.version ~= want and #rows < 1000 then
        rows[#rows + 1] = ("stream %s: version %d came where version %d was due (position %d)")
          :format(e.stream, e.version, want, e.position)
      end
      last[e.stream] = e.version
    end
    after = cp
  end
  local t, p = (after or "0:0"):match("^(%d+):(%d+)$")
  local row, err = common.one(store, "SELECT count(*) AS n FROM <schema>.events "
    .. "WHERE (txid, position) <= ($1::xid8, $2::bigint)", t, tonumber(p))
  if not row then return nil, err end
  if row.n ~= n then
    rows[#rows + 1] = ("read_all delivered %d events where the table holds %d up to checkpoint %s")
      :format(n, row.n, tostring(after))
  end
  return check("global order readable without gaps", rows, function(s) return s end)
end

local read_model_check = require("eventsourcing.admin.verify_read_model").check

function M.verify(store, app)
  local ok, err = common.need_pg(store, "verify")
  if not ok then return nil, err end
  local out = { checks = {}, ok = true }
  local function add(c, e)
    if not c then return nil, e end
    out.checks[#out.checks + 1] = c
    out.ok = out.ok and c.ok
    return true
  end
  for _, f in ipairs { dense, categories_agree, ids_unique, global_order } do
    ok, err = add(f(store))
    if not ok then return nil, err end
  end
  for _, rm in ipairs(app and app.read_models or {}) do
    ok, err = add(read_model_check(store, rm))
    if not ok then return nil, err end
  end
  return out
end

return M
