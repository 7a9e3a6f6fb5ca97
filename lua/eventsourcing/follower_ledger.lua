-- eventsourcing.follower_ledger: the follower's checkpoint ledger: one
-- row per unit (name, checkpoint "<txid>:<position>", position, handled,
-- updated_at, failed_at, error, paused) in a table of the store's schema
-- (a Lua table on memory stores), its migration, leases (row locks taken
-- FOR UPDATE [SKIP LOCKED]), pause/resume/retry/reset, status and lag.
local util = require "eventsourcing.util"

local L = {}
local Follower = {}   -- methods the follower takes in
L.methods = Follower

local rollback = util.rollback

local function quote(s) return '"' .. tostring(s):gsub('"', '""') .. '"' end

-- "<txid>:<position>" -> txid (string), position (number)
function L.parse_checkpoint(cp)
  if not cp then return "0", 0 end
  local t, p = cp:match("^(%d+):(%d+)$")
  return t or "0", tonumber(p) or 0
end
local parse_cp = L.parse_checkpoint

-- The cursors of a per-shard checkpoint (Citus, "c1:<shard>@<group>=
-- <txid>:<position>,..."): { [shard] = { group, txid (string), position } }
local function shard_cursors(cp)
  local out = {}
  for shard, group, t, p in cp:gmatch("(%d+)@(%d+)=(%d+):(%d+)") do
    out[shard] = { group, t, tonumber(p) }
  end
  return out
end

local function txpos_less(ta, pa, tb, pb)
  if #ta ~= #tb then return #ta < #tb end
  if ta ~= tb then return ta < tb end
  return pa < pb
end

-- Per-shard checkpoints: a is before b when they differ and no cursor of
-- a is past b's (a partial order: cursors of different shards or node
-- groups do not compare).
local function shard_cp_less(a, b)
  if a == b then return false end
  local ca, cb = shard_cursors(a), shard_cursors(b)
  for shard, x in pairs(ca) do
    local y = cb[shard]
    if not y or y[1] ~= x[1] or txpos_less(y[2], y[3], x[2], x[3]) then return false end
  end
  for shard in pairs(cb) do if not ca[shard] then return false end end
  return true
end

-- Whether checkpoint a is before b (nil: the start).
local function cp_less(a, b)
  if util.per_shard(b) then return a == nil or (util.per_shard(a) and shard_cp_less(a, b)) end
  if util.per_shard(a) then return false end
  local ta, pa = parse_cp(a)
  local tb, pb = parse_cp(b)
  return txpos_less(ta, pa, tb, pb)
end
L.checkpoint_less = cp_less

-- Memory stores: the ledger in Lua, weak-keyed by store.
local mem_ledgers = setmetatable({}, { __mode = "k" })
function Follower:_mem(name)
  local by_store = mem_ledgers[self.store]
  if not by_store then by_store = {}; mem_ledgers[self.store] = by_store end
  local t = by_store[self.ledger]
  if not t then t = {}; by_store[self.ledger] = t end
  local r = t[name]
  if not r then r = { position = 0, handled = 0, paused = false }; t[name] = r end
  return r
end

function Follower:_q(sql)
  local tbl = quote(self.store:schema()) .. "." .. quote(self.ledger)
  return (sql:gsub("<ledger>", function() return tbl end))
end

-- Migration -----------------------------------------------------------------

local LEDGER = [[CREATE TABLE IF NOT EXISTS <ledger> (
  name text PRIMARY KEY,
  checkpoint text,
  position bigint NOT NULL DEFAULT 0,
  handled bigint NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT now(),
  failed_at timestamptz,
  error jsonb,
  paused boolean NOT NULL DEFAULT false)]]

-- Ledgers made by older versions lack some columns. ALTER TABLE would wait
-- for every open lease on the table, so it runs only when one is missing.
local COLUMNS = { failed_at = "timestamptz", error = "jsonb",
                  paused = "boolean NOT NULL DEFAULT false" }

function Follower:_upgrade()
  local store = self.store
  local rows, err = store:query("SELECT column_name AS c FROM information_schema.columns "
    .. "WHERE table_schema = $1 AND table_name = $2", store:schema(), self.ledger)
  if not rows then return nil, err end
  local have = {}
  for _, r in ipairs(rows) do have[r.c] = true end
  for col, def in pairs(COLUMNS) do
    if not have[col] then
      local ok, aerr = store:query(self:_q(("ALTER TABLE <ledger> ADD COLUMN IF NOT EXISTS %s %s")
        :format(col, def)))
      if not ok then return nil, aerr end
    end
  end
  return true
end

-- Creates the ledger (and the users' tables, opts.migrate) under a
-- transaction-scoped advisory lock, and a row per subscription.
function Follower:migrate()
  local store = self.store
  if self.memory then
    for _, u in ipairs(self.units) do self:_mem(u.name) end
    if self.extra_migrate then
      local ok, err = self.extra_migrate(store)
      if not ok then return nil, err end
    end
    self.migrated = true
    return true
  end
  local ok, err = store:begin()
  if not ok then return nil, err end
  local function step(res, e)
    if not res then rollback(store); err = e end
    return res
  end
  if not step(store:query("SELECT pg_advisory_xact_lock(hashtext($1)) IS NULL AS x",
      ("eventsourcing.%s:%s"):format(self.ledger, store:schema()))) then return nil, err end
  if self.extra_migrate and not step(self.extra_migrate(store)) then return nil, err end
  if not step(store:query(self:_q(LEDGER))) then return nil, err end
  if not step(self:_upgrade()) then return nil, err end
  for _, u in ipairs(self.units) do
    if not step(store:query(self:_q("INSERT INTO <ledger> (name) VALUES ($1) ON CONFLICT DO NOTHING"),
        u.name)) then return nil, err end
  end
  if self.group and not step(self.group:migrate()) then return nil, err end
  ok, err = store:commit()
  if not ok then return nil, err end
  self.migrated = true
  return true
end

function Follower:ensure()
  if self.migrated then return true end
  return self:migrate()
end

-- The ledger ------------------------------------------------------------------

-- Begins a batch: -> row { checkpoint, position, failed, paused } | false
-- (another process holds the lease) | nil, err. wait: wait for the lease.
function Follower:lock(sub, wait)
  if self.memory then return self:lock_row(sub) end
  local ok, err = self.store:begin()
  if not ok then return nil, err end
  return self:lock_row(sub, wait)
end

-- The same inside the open transaction (rolled back when it fails).
function Follower:lock_row(sub, wait)
  local store = self.store
  if self.memory then
    local r = self:_mem(sub.name)
    return { checkpoint = r.checkpoint, position = r.position, failed = r.error ~= nil,
             paused = r.paused }
  end
  local res, err = store:query(self:_q("SELECT checkpoint, position, error IS NOT NULL AS failed, paused "
    .. "FROM <ledger> WHERE name = $1 FOR UPDATE" .. (wait and "" or " SKIP LOCKED")), sub.name)
  if not res then rollback(store); return nil, err end
  if #res == 0 then rollback(store); return false end
  return res[1]
end

-- Begins a transaction holding every unit of subscription `name`
-- (waiting for them): -> true | nil, err
function Follower:lock_all(name)
  local ok, err = util.begin(self.store)
  if not ok then return nil, err end
  for _, u in ipairs(self.units_of[name]) do
    local row
    row, err = self:lock_row(u, true)
    if not row then
      self:rollback()
      return nil, err or ("no ledger row for " .. u.name)
    end
  end
  return true
end

-- In the open transaction: every unit of `name` at checkpoint; errors
-- forgotten; reset_handled: handled back to 0. -> true | nil, err
function Follower:set_all(name, checkpoint, reset_handled)
  for _, u in ipairs(self.units_of[name]) do
    local ok, err = self:save(u, checkpoint, 0)
    if ok then ok, err = self:clear_error(u, reset_handled) end
    if not ok then return nil, err end
  end
  return true
end

-- Moves the checkpoint (in the open transaction); failure: record it.
-- The recorded position is the checkpoint's; a per-shard checkpoint
-- (Citus) names none, so there it is `last` (the position of the last
-- event done), or stays as it was when no event was done.
function Follower:save(sub, checkpoint, handled, failure, last)
  local position
  if util.per_shard(checkpoint) then position = last else position = select(2, parse_cp(checkpoint)) end
  if self.memory then
    local r = self:_mem(sub.name)
    r.checkpoint, r.position, r.handled = checkpoint, position or r.position, r.handled + handled
    r.updated_at = util.now_iso()
    if failure then r.error, r.failed_at = failure, r.updated_at end
    return true
  end
  return self.store:query(self:_q("UPDATE <ledger> SET checkpoint = $2, position = coalesce($3::bigint, position), "
    .. "handled = handled + $4, updated_at = now(), failed_at = CASE WHEN $5::jsonb IS NULL "
    .. "THEN failed_at ELSE now() END, error = coalesce($5::jsonb, error) WHERE name = $1"),
    sub.name, checkpoint, position, handled, failure)
end

-- Forgets sub's recorded error (and with reset_handled its count), in the
-- open transaction.
function Follower:clear_error(sub, reset_handled)
  if self.memory then
    local r = self:_mem(sub.name)
    r.error, r.failed_at = nil, nil
    if reset_handled then r.handled = 0 end
    return true
  end
  return self.store:query(self:_q("UPDATE <ledger> SET error = NULL, failed_at = NULL, updated_at = now()"
    .. (reset_handled and ", handled = 0" or "") .. " WHERE name = $1"), sub.name)
end

function Follower:commit() return util.commit(self.store) end
function Follower:rollback() rollback(self.store) end

-- Sets fields of a subscription's row outside any batch: error = nil
-- (retry), paused, reset (checkpoint, handled = 0). -> true | nil, err
-- (every unit of it: all partitions of a group).
function Follower:_update(name, what)
  local sub = self.by_name[name]
  local ok, err = self:ensure()
  if not ok then return nil, err end
  if what.reset then
    -- hold every lease so no batch runs meanwhile; effects cleared in the
    -- same transaction as the checkpoints go back
    ok, err = self:lock_all(name)
    if not ok then return nil, err end
    if sub.reset then ok, err = sub.reset() end
    if ok then ok, err = self:set_all(name, what.checkpoint, true) end
    if not ok then self:rollback(); return nil, err end
    return self:commit()
  end
  for _, u in ipairs(self.units_of[name]) do
    if self.memory then
      local r = self:_mem(u.name)
      if what.clear_error then r.error, r.failed_at = nil, nil end
      if what.paused ~= nil then r.paused = what.paused end
      r.updated_at = util.now_iso()
    else
      local sets = {}
      if what.clear_error then sets[#sets + 1] = "error = NULL, failed_at = NULL" end
      if what.paused ~= nil then sets[#sets + 1] = what.paused and "paused = true" or "paused = false" end
      sets[#sets + 1] = "updated_at = now()"
      ok, err = self.store:query(self:_q("UPDATE <ledger> SET " .. table.concat(sets, ", ")
        .. " WHERE name = $1"), u.name)
      if not ok then return nil, err end
    end
  end
  return true
end

function Follower:pause(name) return self:_update(name, { paused = true }) end
function Follower:resume(name) return self:_update(name, { paused = false }) end
function Follower:retry(name) return self:_update(name, { clear_error = true }) end
function Follower:reset(name, checkpoint)
  return self:_update(name, { reset = true, checkpoint = checkpoint })
end

-- Status and lag ----------------------------------------------------------------

-- The one lag definition: events after `checkpoint` (any type: a filtered
-- follower's checkpoint moves past what it skips) and the age in seconds
-- of the oldest of them. -> events, seconds | nil, err
function L.lag(store, checkpoint)
  if util.is_memory(store) then
    local n, first = 0, nil
    local done, err = util.scan(store, checkpoint, function(b)
      first = first or b[1]
      n = n + #b
    end)
    if done == nil and err then return nil, err end
    local t = first and util.iso_epoch(first.recorded_at)
    return n, t and math.max(0, util.now() - t) or 0
  end
  if util.per_shard(checkpoint) then
    -- a cursor per shard (Citus): not comparable in SQL, so read what follows
    local n, first = util.lag_by_scan(store, checkpoint)
    if not n then return nil, first end
    local t = first and util.iso_epoch(first)
    return n, t and math.max(0, util.now() - t) or 0
  end
  local txid, pos = parse_cp(checkpoint)
  local res, err = store:query(("SELECT count(*) AS n, coalesce(extract(epoch FROM now() - "
    .. "min(recorded_at)), 0)::float8 AS lag FROM %s.events "
    .. "WHERE (txid, position) > ($1::xid8, $2::bigint)"):format(quote(store:schema())), txid, pos)
  if not res then return nil, err end
  return res[1].n, math.max(0, res[1].lag)
end

-- The transaction that holds readers back: read_all delivers only events
-- of transactions older than every one still running, so while an event
-- waits, the oldest running transaction is the reason. Its backend, age,
-- state and the start of its statement, or nil when none runs (or the
-- store keeps no such thing: memory). Any database of the cluster counts:
-- transaction ids are the cluster's.
function L.held_by(store)
  if util.is_memory(store) then return nil end
  local res, err = store:query("SELECT pid, datname AS database, usename AS user, state, "
    .. "coalesce(extract(epoch FROM now() - xact_start), 0)::float8 AS seconds, "
    .. "left(query, 200) AS query FROM pg_stat_activity "
    .. "WHERE backend_xid IS NOT NULL AND backend_xid::text = "
    .. "(pg_snapshot_xmin(pg_current_snapshot())::text::numeric % 4294967296)::text "
    .. "AND pid <> pg_backend_pid() LIMIT 1")
  if not res then return nil, err end
  return res[1]
end

local function state_of(s)
  if s.paused then return "paused" end
  if s.error then return "failed" end
  return "running"
end

-- One row per subscription: { name, checkpoint, position, lag_events,
-- lag_seconds, handled, error, state, status (= state), paused,
-- updated_at, failed_at }, and while events wait, held_by (L.held_by)
function Follower:_row(unit)
  if self.memory then
    local r, s = self:_mem(unit.name), {}
    for _, k in ipairs { "checkpoint", "position", "handled", "error", "updated_at",
                         "failed_at", "paused" } do s[k] = r[k] end
    return s
  end
  local res, err = self.store:query(self:_q("SELECT checkpoint, position, handled, error, paused, "
    .. util.ts_sql("updated_at") .. ", " .. util.ts_sql("failed_at") .. " "
    .. "FROM <ledger> WHERE name = $1"), unit.name)
  if not res then return nil, err end
  local r = res[1] or {}
  r.position, r.handled, r.paused = r.position or 0, r.handled or 0, r.paused or false
  return r
end

-- One row per subscription; a group's partitions are summed up (handled),
-- its checkpoint is the lowest (lag counts from there) and each
-- partition's row is in `partitions`.
function Follower:status()
  local ok, err = self:ensure()
  if not ok then return nil, err end
  local out, held = {}, nil   -- held: asked once, when something lags
  for _, sub in ipairs(self.subs) do
    local s, parts = nil, {}
    for _, u in ipairs(self.units_of[sub.name]) do
      local r
      r, err = self:_row(u)
      if not r then return nil, err end
      r.name = u.name
      parts[#parts + 1] = r
      if not s then
        s = util.merge({}, r)
      else
        if cp_less(r.checkpoint, s.checkpoint) then s.checkpoint, s.position = r.checkpoint, r.position end
        s.handled = s.handled + r.handled
        s.error, s.failed_at = s.error or r.error, s.failed_at or r.failed_at
        s.paused = s.paused or r.paused
        if (r.updated_at or "") > (s.updated_at or "") then s.updated_at = r.updated_at end
      end
    end
    s.name = sub.name
    if self.group then s.partitions = parts end
    if self.group and self.group.on_shards then   -- each partition on its own shard
      s.lag_events, s.lag_seconds = self.group:shard_lag(parts)
    else
      s.lag_events, s.lag_seconds = L.lag(self.store, s.checkpoint)
    end
    if not s.lag_events then return nil, s.lag_seconds end
    if s.lag_events > 0 and held == nil then
      held, err = L.held_by(self.store)
      if held == nil and err then return nil, err end
      held = held or false
    end
    if s.lag_events > 0 and held then s.held_by = held end
    s.state = state_of(s)
    s.status = s.state
    out[#out + 1] = s
  end
  return out
end

return L
