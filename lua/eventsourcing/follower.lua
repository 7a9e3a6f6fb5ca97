-- eventsourcing.follower: the one engine that consumes the global log.
-- The projector and the workflow runner are thin users of it: each only
-- says what to do with a batch inside its transaction.
--
--   local f = follower.new(store, {
--     ledger = "projections",       -- checkpoint table in the store's schema
--     label = "projector",          -- for messages
--     batch_size = 5000, log = function(line) end,
--     migrate = function(store) -> true | nil, err end,  -- extra, same transaction
--     subs = { {
--       name = "rm_orders",
--       types = { "OrderPlaced", ... },   -- nil: every type (filtered in SQL)
--       category = "Order",               -- nil: every stream
--       prefetch = true,                  -- read the next batch ahead
--       process = function(batch, n) end, -- see below
--       reset = function() end,           -- optional: clear effects (reset)
--     }, ... },
--   })
--
-- process(batch, n) runs in the batch's transaction (PostgreSQL) with the
-- lease held. It returns
--   n [, info]          every event done;
--   k [, info]  (k < n) events 1..k done and the transaction still usable:
--                       the checkpoint moves to batch[k].checkpoint; with
--                       info.failure (a table) the subscription stops
--                       there ("failed") until retry; without it the rest
--                       is tried again after info.delay seconds;
--   nil, err            nothing done: the batch is rolled back.
-- info.handled: events that had an effect (default: the count done).
--
-- The ledger: one row per subscription (name, checkpoint "<txid>:<position>",
-- position, handled, updated_at, failed_at, error, paused). A batch locks
-- its row FOR UPDATE SKIP LOCKED (the lease: a second process skips it),
-- reads the events after its checkpoint, lets process work, writes the new
-- checkpoint and commits: effects and checkpoint together or not at all.
-- Row locks are transaction-scoped, so this works behind PgBouncer in
-- transaction mode.
--
-- Wake-ups: follow() polls the log's head (a read of at most one event
-- after the idle subscriptions' lowest checkpoint, an index range scan on
-- (txid, position), every `tick` seconds, default 5 ms) instead of LISTEN:
-- appends never NOTIFY, so writers' commits are never serialized, and
-- nothing depends on a session surviving a pooler or a restart.
--
-- opts.group makes the follower one member of a consumer group: see
-- eventsourcing.follower_group.
local util = require "eventsourcing.util"

local M = {}

local Follower = {}
Follower.__index = Follower
M.Follower = Follower

local sleep, clock = util.sleep, util.monotonic
local rollback = util.rollback

local function quote(s) return '"' .. tostring(s):gsub('"', '""') .. '"' end

-- "<txid>:<position>" -> txid (string), position (number)
function M.parse_checkpoint(cp)
  if not cp then return "0", 0 end
  local t, p = cp:match("^(%d+):(%d+)$")
  return t or "0", tonumber(p) or 0
end
local parse_cp = M.parse_checkpoint

-- Whether checkpoint a is before b (nil: the start).
local function cp_less(a, b)
  local ta, pa = parse_cp(a)
  local tb, pb = parse_cp(b)
  if #ta ~= #tb then return #ta < #tb end
  if ta ~= tb then return ta < tb end
  return pa < pb
end
M.checkpoint_less = cp_less

-- opts.group = { name, partitions, member, ttl, heartbeat } runs this
-- follower as one member of a consumer group (see follower_group): each
-- subscription becomes one unit per partition ("<name>/<k>" rows in the
-- ledger) and the member works on the partitions it owns. Without it each
-- subscription is its own single unit.
function M.new(store, opts)
  local subs, by_name, units_of, units = {}, {}, {}, {}
  local self = setmetatable({
    store = store, ledger = opts.ledger, label = opts.label or "follower",
    subs = subs, by_name = by_name, units = units, units_of = units_of,
    batch_size = opts.batch_size or 1000,
    extra_migrate = opts.migrate, log = opts.log, memory = util.is_memory(store),
    migrated = false, stopping = false, idle_at = {},
  }, Follower)
  if opts.group then
    self.group = require("eventsourcing.follower_group").new(self, opts.group)
  end
  for _, s in ipairs(opts.subs) do
    subs[#subs + 1] = s
    by_name[s.name] = s
    units_of[s.name] = self.group and self.group:units(s) or { s }
    for _, u in ipairs(units_of[s.name]) do
      u.base = s
      units[#units + 1] = u
    end
  end
  return self
end

-- What this process works on now: every unit, or for a group member
-- (after a heartbeat when one is due) one item per subscription holding
-- the units of the partitions it owns, batched together.
function Follower:active()
  if not self.group then return self.units end
  return self.group:items()
end

-- The work items of subscription `name` whoever owns them (rebuild).
function Follower:items_of(name)
  if not self.group then return self.units_of[name] end
  return { { base = self.by_name[name], units = self.units_of[name] } }
end

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
function Follower:save(sub, checkpoint, handled, failure)
  local _, position = parse_cp(checkpoint)
  if self.memory then
    local r = self:_mem(sub.name)
    r.checkpoint, r.position, r.handled = checkpoint, position, r.handled + handled
    r.updated_at = util.now_iso()
    if failure then r.error, r.failed_at = failure, r.updated_at end
    return true
  end
  return self.store:query(self:_q("UPDATE <ledger> SET checkpoint = $2, position = $3, "
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

-- Gives class (whose objects hold .engine and .by_name) the methods
-- `names` of the engine, each first checking that the name is one of its
-- subscriptions: class:pause(name) -> engine:pause(name). `what` and
-- `noun` word the error ("projector", "projection").
function M.delegate(class, what, noun, names)
  for _, m in ipairs(names) do
    class[m] = function(self, name)
      if not self.by_name[name] then
        error(("%s:%s: no %s named %s"):format(what, m, noun, tostring(name)), 2)
      end
      return self.engine[m](self.engine, name)
    end
  end
end

-- Batches ---------------------------------------------------------------------

-- One batch of sub: handled, state where state is "more" (call again),
-- "idle" (caught up), "locked" (leased elsewhere), "failed", "paused"
-- | nil, err. Anything raised in between rolls the batch back first, so
-- the session and the lease are never left behind.
function Follower:batch(sub, limit)
  local ok, a, b = pcall(sub.units and self._set_batch or self._batch_in, self, sub, limit or self.batch_size)
  if ok then return a, b end
  self:rollback()
  error(a, 0)
end

function Follower:_batch_in(sub, limit)
  local store = self.store
  local row, err = self:lock(sub)
  if row == nil then return nil, err end
  if row == false then return 0, "locked" end
  if row.failed or row.paused then
    self:rollback()
    return 0, row.paused and "paused" or "failed"
  end
  local batch, cp = store:read_all({ after = row.checkpoint, limit = limit, prefetch = sub.prefetch,
    types = sub.types, category = sub.category })
  if not batch then self:rollback(); return nil, cp end
  local n = #batch
  if n == 0 then
    -- a filtered read may still move past events of other types
    if not cp_less(row.checkpoint, cp) then
      self:rollback()
      self.idle_at[sub] = row.checkpoint or cp
      return 0, "idle"
    end
    return self:_finish(sub, cp, 0, {}, "idle")
  end
  local done, info = (sub.process or sub.base.process)(batch, n)
  if done == nil then self:rollback(); return nil, info end
  info = info or {}
  if done == n then
    return self:_finish(sub, cp, info.handled or n, info, n < limit and "idle" or "more")
  end
  local to = done > 0 and batch[done].checkpoint or row.checkpoint
  local handled, st
  handled, st = self:_finish(sub, to, info.handled or done, info, info.failure and "failed" or "more")
  if handled and info.failure and self.log then
    local e = batch[done + 1]
    self.log(("%s %s stopped at position %s (%s, stream %s): %s"):format(self.label, sub.name,
      tostring(e.position), tostring(e.type), tostring(e.stream), tostring(info.failure.message)))
  end
  if handled and not info.failure and info.delay then sleep(info.delay) end
  return handled, st
end

-- A group's item: its units in one transaction (see follower_group).
function Follower:_set_batch(item, limit) return self.group:batch(item, limit) end

function Follower:_finish(sub, cp, handled, info, state)
  local ok, err = self:save(sub, cp, handled, info.failure)
  if not ok then self:rollback(); return nil, err end
  ok, err = self:commit()
  if not ok then return nil, err end
  if state == "idle" then self.idle_at[sub] = cp end
  return handled, state
end

-- The failure record of event e.
function M.failure(e, message)
  return { position = e.position, type = e.type, stream = e.stream, version = e.version,
           id = e.id, message = message }
end

-- Every subscription up to the store's end, round robin one batch each.
-- -> events handled (sum), { [name] = handled } | nil, err
function Follower:catch_up(opts)
  local ok, err = self:ensure()
  if not ok then return nil, err end
  local limit = (opts and opts.batch_size) or self.batch_size
  local total, per, active = 0, {}, {}
  self.idle_at = {}
  for _, s in ipairs(self.subs) do per[s.name] = 0 end
  local units, gerr = self:active()
  if not units then return nil, gerr end
  for _, u in ipairs(units) do active[#active + 1] = u end
  while #active > 0 and not self.stopping do
    local next_active = {}
    for _, u in ipairs(active) do
      if self.stopping then break end
      local n, st = self:batch(u, limit)
      if not n then return nil, st end
      total = total + n
      per[u.base.name] = per[u.base.name] + n
      if st == "more" then next_active[#next_active + 1] = u end
    end
    active = next_active
  end
  return total, per
end

function Follower:stop() self.stopping = true end

-- Live ------------------------------------------------------------------------

-- Whether the log has moved past where the idle subscriptions stand: one
-- event read after the lowest of their checkpoints. -> true | false | nil, err
function Follower:moved()
  local low, any = nil, false
  for _, cp in pairs(self.idle_at) do
    if not any or cp_less(cp, low) then low = cp end
    any = true
  end
  if not any then return false end
  local b, err = self.store:read_all({ after = low, limit = 1 })
  if not b then return nil, err end
  return #b > 0
end

-- Waits until the log moves, `deadline` (monotonic) passes or stopping().
-- It sleeps a tick before each look: a log that moves all the time (other
-- types' events a filtered follower only steps over) costs at most one
-- catch-up per tick.
function Follower:wait(deadline, tick, stopping)
  while not stopping() do
    local left = deadline - clock()
    if left <= 0 then return false end
    sleep(math.min(tick, left))
    local moved = self:moved()
    if moved ~= false then return moved end
  end
  return false
end

-- Follows live until opts.stop() returns true or stop() is called:
-- catch_up (the caller's, e.g. with timers), then wait for the head to
-- move (checked every opts.tick seconds, default 0.005), at most
-- opts.poll seconds (default 1) or until next_due() seconds. Errors go to
-- opts.on_error (default: stderr) and are retried after a growing pause
-- (opts.retry seconds, default 0.5, at most 5 s).
function Follower:follow(opts, catch_up, next_due)
  local poll, tick = opts.poll or 1, opts.tick or 0.005
  local retry = opts.retry or 0.5
  local stop_fn = opts.stop
  local label = self.label
  local on_error = opts.on_error or function(err)
    io.stderr:write(("%s: %s\n"):format(label, tostring(err)))
  end
  self.stopping = false
  local function stopping() return self.stopping or (stop_fn and stop_fn()) end
  local failures = 0
  while not stopping() do
    local n, err = catch_up()
    if not n then
      failures = failures + 1
      on_error(err)
      if stopping() then break end
      sleep(math.min(5, retry * 2 ^ math.min(failures - 1, 8)))
    else
      failures = 0
      if opts.idle then opts.idle(n, err) end
      if stopping() then break end
      local wait = poll
      local due = next_due and next_due()
      if due and due < wait then wait = math.max(0.001, due) end
      if self.group then wait = math.max(0.001, math.min(wait, self.group:until_beat())) end
      self:wait(clock() + wait, tick, stopping)
    end
  end
  self.stopping = false
  if self.group then self.group:leave() end
  return true
end

-- Status and lag ----------------------------------------------------------------

-- The one lag definition: events after `checkpoint` (any type: a filtered
-- follower's checkpoint moves past what it skips) and the age in seconds
-- of the oldest of them. -> events, seconds | nil, err
function M.lag(store, checkpoint)
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
  local txid, pos = parse_cp(checkpoint)
  local res, err = store:query(("SELECT count(*) AS n, coalesce(extract(epoch FROM now() - "
    .. "min(recorded_at)), 0)::float8 AS lag FROM %s.events "
    .. "WHERE (txid, position) > ($1::xid8, $2::bigint)"):format(quote(store:schema())), txid, pos)
  if not res then return nil, err end
  return res[1].n, math.max(0, res[1].lag)
end

local function state_of(s)
  if s.paused then return "paused" end
  if s.error then return "failed" end
  return "running"
end

-- One row per subscription: { name, checkpoint, position, lag_events,
-- lag_seconds, handled, error, state, status (= state), paused,
-- updated_at, failed_at }
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
  local out = {}
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
    s.lag_events, s.lag_seconds = M.lag(self.store, s.checkpoint)
    if not s.lag_events then return nil, s.lag_seconds end
    s.state = state_of(s)
    s.status = s.state
    out[#out + 1] = s
  end
  return out
end

return M
