-- eventsourcing.admin.verify_read_model: compares a read model's table with
-- a rebuild of it (see eventsourcing.admin.verify).
--
-- Everything happens in one transaction that is rolled back: the scratch
-- table is created in it, so nobody else ever sees it and nothing is left
-- behind. A read model kept by a projector is compared at its checkpoint,
-- holding its lease (FOR UPDATE) so it cannot move meanwhile; one kept
-- only inline (its checkpoint never moved) is compared with the whole log
-- in one REPEATABLE READ snapshot. A rebuild moves the checkpoint of a
-- read model kept inline too, and inline writers go on writing past it:
-- so a moved read model that differs from the replay at its checkpoint is
-- compared once more with the whole log, and passes if it equals that.
local common = require "eventsourcing.admin.common"
local core = require "eventsourcing.core"

local json = core.json
local q = common.q

local M = {}

local MAX_SHOWN = 20

-- Has a projector ever moved this read model's checkpoint? (A read model
-- kept inline has a checkpoint row from migrate, never moved.)
local function projected(store, rm)
  local row, err = common.one(store, "SELECT to_regclass($1) IS NOT NULL AS has",
    ('"%s".projections'):format(store:schema()))
  if not row then return nil, err end
  if not row.has then return false end
  row, err = common.one(store, "SELECT checkpoint IS NOT NULL AS moved FROM <schema>.projections WHERE name = $1",
    rm.name)
  if not row then return nil, err end
  return row.moved == true
end

-- Begins the transaction. whole: compare with the whole log even if a
-- projector moved the checkpoint. -> events to replay (false: all),
-- whether the checkpoint has moved | nil, err
local function begin_at_checkpoint(store, rm, whole)
  local moved, err = projected(store, rm)
  if moved == nil then return nil, err end
  local ok
  ok, err = store:begin()
  if not ok then return nil, err end
  if whole or not moved then
    ok, err = store:query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    if not ok then return nil, err end
    return false, moved
  end
  local rows
  rows, err = store:query(q(store, "SELECT checkpoint FROM <schema>.projections WHERE name = $1 FOR UPDATE"),
    rm.name)
  if not rows then return nil, err end
  local t, p = (rows[1] and rows[1].checkpoint or "0:0"):match("^(%d+):(%d+)$")
  local row
  row, err = common.one(store, "SELECT count(*) AS n FROM <schema>.events "
    .. "WHERE (txid, position) <= ($1::xid8, $2::bigint)", t, tonumber(p))
  if not row then return nil, err end
  return row.n, true
end

-- Replays up to `limit` events (false: all) into table tmp.
local function replay(store, rm, tmp, limit)
  local after, done, seen = nil, 0, {}
  while not limit or done < limit do
    local want = limit and math.min(5000, limit - done) or 5000
    local batch, cp = store:read_all({ after = after, limit = want })
    if not batch then return nil, cp end
    if #batch == 0 then break end
    local r, a, b = rm:_apply(store, tmp, batch, #batch, { seen = seen })
    if r == nil then return nil, a end
    if r == false then
      local e = batch[a]
      return common.fail("invalid", "%s: handler for %s failed at position %d (stream %s): %s",
        rm.name, e.type, e.position, e.stream, tostring(b))
    end
    done, after = done + #batch, cp
  end
  return true
end

local function differing_columns(live, rebuilt)
  local cols = {}
  for k, v in pairs(live) do
    if json.encode(v) ~= json.encode(rebuilt[k]) then cols[#cols + 1] = k end
  end
  for k in pairs(rebuilt) do
    if live[k] == nil then cols[#cols + 1] = k end
  end
  table.sort(cols)
  return cols
end

local function describe(rm, r)
  local key = tostring(r.key)
  if r.live == nil then return ("%s %s: missing from the table (the rebuild has it)"):format(rm.name, key) end
  if r.rebuilt == nil then return ("%s %s: in the table but not in the rebuild"):format(rm.name, key) end
  local parts = {}
  for _, c in ipairs(differing_columns(r.live, r.rebuilt)) do
    parts[#parts + 1] = ("%s: table %s, rebuild %s"):format(c, json.encode(r.live[c] == nil and json.null
      or r.live[c]), json.encode(r.rebuilt[c] == nil and json.null or r.rebuilt[c]))
  end
  return ("%s %s: %s"):format(rm.name, key, table.concat(parts, "; "))
end

local function compare(store, rm, tmp)
  local k = '"' .. rm.key .. '"'
  local rows, err = store:query(("SELECT coalesce(a.%s, b.%s)::text AS key, "
    .. "CASE WHEN a.%s IS NULL THEN NULL ELSE to_jsonb(a) END AS live, "
    .. "CASE WHEN b.%s IS NULL THEN NULL ELSE to_jsonb(b) END AS rebuilt "
    .. "FROM %s a FULL JOIN %s b ON a.%s = b.%s WHERE to_jsonb(a) IS DISTINCT FROM to_jsonb(b) "
    .. "ORDER BY 1 LIMIT %d"):format(k, k, k, k, rm:_qualified(store), rm:_qualified(store, tmp), k, k,
      MAX_SHOWN + 1))
  if not rows then return nil, err end
  local c = { name = "read model " .. rm.name .. " equals a rebuild", ok = #rows == 0, problems = json.array {} }
  for i = 1, math.min(#rows, MAX_SHOWN) do c.problems[i] = describe(rm, rows[i]) end
  if #rows > MAX_SHOWN then c.problems[#c.problems + 1] = "... and more" end
  return c
end

-- One comparison in its own transaction, rolled back.
-- -> check, whether the checkpoint has moved | nil, err
local function check_once(store, rm, whole)
  local tmp = ("%s__verify"):format(rm.name):sub(1, 63)
  local limit, moved = begin_at_checkpoint(store, rm, whole)
  if limit == nil then
    store:rollback()
    return nil, moved
  end
  local res
  local ok, err = store:query(rm:_create_sql(store, tmp))
  if ok then ok, err = replay(store, rm, tmp, limit) end
  if ok then res, err = compare(store, rm, tmp) end
  store:rollback()
  if not res then return nil, err end
  return res, moved
end

function M.check(store, rm)
  if rm.kind ~= "read_model" then
    return common.fail("invalid", "%s is not a read model", tostring(rm.name))
  end
  local res, moved = check_once(store, rm, false)
  if not res or res.ok or not moved then return res, moved end
  -- kept inline and rebuilt (see the top of this file)?
  local whole, err = check_once(store, rm, true)
  if not whole then return nil, err end
  if whole.ok then return whole end
  res.problems[#res.problems + 1] = "(nor does it equal a replay of the whole log, as a read model kept inline would)"
  return res
end

return M
