-- eventsourcing.rebuild: a read model's rebuild into a shadow table of its
-- own, swapped in atomically, safe with writers running (projector:rebuild
-- calls it; see README, "Rebuilds").
--
-- 1. The shadow table gets a random name (created without IF NOT EXISTS:
--    two rebuilds never share one) and a marker row in
--    <schema>.read_model_rebuilds. From then on every transaction that
--    updates the read model inline records its txid in
--    read_model_rebuild_writes (read_model.apply_inline), in the statement
--    that writes its rows, after its append.
-- 2. Bulk replay into the shadow table under read_all's watermark, outside
--    any long transaction; then its indexes.
-- 3. Wait until every transaction that was running when the marker
--    committed has ended (so that each one committing later saw it). Only
--    transactions with a transaction id count as running: an inline
--    writer's row load, sent ahead of its append, has none yet, which is
--    why the record is made by the write (see read_model_storage).
-- 4. Swap, in one transaction: the projector's lease (no batch of a
--    projector runs), then LOCK the live table (inline writers that touched
--    it have committed; new ones wait and, after the swap, write into the
--    new table), the tail up to the watermark W, then the events of the
--    recorded inline transactions that committed above W (their rows were
--    in the live table), the renames, the checkpoint at W, the marker gone.
--    Events above W of plain appends are left to the projector, as before.
local core = require "eventsourcing.core"
local read_model = require "eventsourcing.read_model"
local util = require "eventsourcing.util"

local quote, json = read_model.quote, core.json
local M = {}

local function one(store, sql, ...)
  local rows, err = store:query(sql, ...)
  if not rows then return nil, err end
  return rows[1]
end

-- Forgets markers of rebuilds whose session is gone (a crash) and their
-- shadow tables, and recorded txids no marker wants any more.
local function clean_stale(store, p)
  local s = quote(store:schema())
  local rows, err = store:query(("DELETE FROM %s.read_model_rebuilds WHERE pid NOT IN "
    .. "(SELECT pid FROM pg_stat_activity) RETURNING id"):format(s))
  if not rows then return nil, err end
  for _, r in ipairs(rows) do
    local ok, derr = store:query("DROP TABLE IF EXISTS " .. p:_qualified(store, r.id))
    if not ok then return nil, derr end
  end
  return store:query(("DELETE FROM %s.read_model_rebuild_writes w WHERE NOT EXISTS "
    .. "(SELECT 1 FROM %s.read_model_rebuilds r WHERE r.id = w.id)"):format(s, s))
end

-- Creates the shadow table and its marker. -> name, marker txid | nil, err
function M.start(store, p)
  -- the marker tables, on stores migrated before they existed
  local ok, err = read_model._exec_all(store, p._marker_sqls(store))
  if ok then ok, err = clean_stale(store, p) end
  if not ok then return nil, err end
  local row
  row, err = one(store, "SELECT substr(md5(gen_random_uuid()::text), 1, 12) AS r")
  if not row then return nil, err end
  local tmp = read_model.short_ident(("%s__rebuild_%s"):format(p.name, row.r))
  ok, err = store:query(p:_create_sql(store, tmp, true))
  if not ok then return nil, err end
  row, err = one(store, ("INSERT INTO %s.read_model_rebuilds (id, name, txid, pid) VALUES "
    .. "($1, $2, pg_current_xact_id(), pg_backend_pid()) RETURNING txid::text AS txid")
    :format(quote(store:schema())), tmp, p.name)
  if not row then
    store:query("DROP TABLE IF EXISTS " .. p:_qualified(store, tmp))
    return nil, err
  end
  return tmp
end

-- The last event below the watermark now ("<txid>:<position>"), the
-- common bound of a rebuild's workers: every event at or below it has
-- committed, so the set they replay is fixed. -> checkpoint | nil (no
-- event), nil | nil, err
function M.bound(store)
  local rows, err = store:query(("SELECT txid::text || ':' || position AS cp FROM %s.events "
    .. "WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY txid DESC, position DESC LIMIT 1")
    :format(quote(store:schema())))
  if not rows then return nil, err end
  return rows[1] and rows[1].cp or nil
end

-- Drops the shadow table and the marker (a rebuild that failed).
function M.abandon(store, p, tmp)
  store:query("DROP TABLE IF EXISTS " .. p:_qualified(store, tmp))
  store:query(("DELETE FROM %s.read_model_rebuilds WHERE id = $1"):format(quote(store:schema())), tmp)
  store:query(("DELETE FROM %s.read_model_rebuild_writes WHERE id = $1"):format(quote(store:schema())), tmp)
end

-- Step 3: every transaction running now has ended (polled; a
-- long-running transaction delays it, as it delays read_all).
function M.wait_running(store)
  local row, err = one(store, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text AS x")
  if not row then return nil, err end
  local sql = "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::xid8 AS done"
  while true do
    local r, qerr = one(store, sql, row.x)
    if not r then return nil, qerr end
    if r.done then return true end
    util.sleep(0.01)
  end
end

-- In the swap's transaction: the live table locked against inline writers.
function M.lock_live(store, p)
  return store:query(("LOCK TABLE %s IN ACCESS EXCLUSIVE MODE"):format(p:_qualified(store)))
end

local EXTRA_SQL = [[SELECT e.id::text AS id, e.stream, e.version, e.type, e.data::text AS data,
  e.metadata::text AS metadata, %s, e.position, e.txid::text AS txid
  FROM %s.events e
  WHERE (e.txid, e.position) > ($1::xid8, $2::bigint)
    AND e.txid IN (SELECT w.txid FROM %s.read_model_rebuild_writes w WHERE w.id = $3)
    AND e.type = ANY($4::text[]) AND ($5::text IS NULL OR e.category = $5)
  ORDER BY e.txid, e.position]]

local function array_literal(list)
  local out = {}
  for i, t in ipairs(list) do out[i] = '"' .. t:gsub('[\\"]', '\\%0') .. '"' end
  return "{" .. table.concat(out, ",") .. "}"
end

-- Step 4's second replay: the events of inline transactions that
-- committed above the watermark `after`, applied to tmp. -> count | nil, err
function M.replay_inline(store, p, tmp, after, types, seen)
  local s = quote(store:schema())
  local t, pos = "0", 0
  if after then t, pos = after:match("^(%d+):(%d+)$") end
  local rows, err = store:query(EXTRA_SQL:format(util.ts_sql("e.recorded_at", "recorded_at"), s, s),
    t, tonumber(pos), tmp, array_literal(types), p.category)
  if not rows then return nil, err end
  if #rows == 0 then return 0 end
  for i, r in ipairs(rows) do
    r.data, r.metadata = json.decode(r.data), json.decode(r.metadata)
    r.checkpoint = r.txid .. ":" .. tostring(r.position)
    rows[i] = r
  end
  local res, a, b = p:_apply(store, tmp, rows, #rows, { seen = seen })
  if res == nil then return nil, a end
  if res == false then
    local e = rows[a]
    return nil, core.error("invalid", ("rebuild %s: handler for %s failed at position %s (stream %s): %s")
      :format(p.name, e.type, tostring(e.position), tostring(e.stream), b))
  end
  return #rows
end

-- In the swap's transaction: the shadow table takes the live one's name
-- and indexes; the marker goes.
function M.swap(store, p, tmp)
  local old = read_model.short_ident(p.name .. "__old")
  local s = quote(store:schema())
  local sqls = {
    ("ALTER TABLE %s RENAME TO %s"):format(p:_qualified(store), quote(old)),
    "DROP TABLE " .. p:_qualified(store, old),
    ("ALTER TABLE %s RENAME TO %s"):format(p:_qualified(store, tmp), quote(p.name)),
  }
  for _, sql in ipairs(p:_rename_index_sqls(store, tmp)) do sqls[#sqls + 1] = sql end
  sqls[#sqls + 1] = ("DELETE FROM %s.read_model_rebuilds WHERE id = '%s'"):format(s, tmp)
  sqls[#sqls + 1] = ("DELETE FROM %s.read_model_rebuild_writes WHERE id = '%s'"):format(s, tmp)
  return read_model._exec_all(store, sqls)
end

return M
