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
--       lazy = true,                      -- e.id, e.metadata made when read
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
-- The ledger (follower_ledger): one row per subscription (name, checkpoint
-- "<txid>:<position>", position, handled, updated_at, failed_at, error,
-- paused). A batch locks its row FOR UPDATE SKIP LOCKED (the lease: a
-- second process skips it), reads the events after its checkpoint, lets
-- process work, writes the new checkpoint and commits: effects and
-- checkpoint together or not at all.
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
local core = require "eventsourcing.core"
local util = require "eventsourcing.util"

local M = {}

local Follower = {}
Follower.__index = Follower
M.Follower = Follower

local sleep, clock = util.sleep, util.monotonic

-- the checkpoint ledger (rows, leases, status, lag): follower_ledger
local ledger = require "eventsourcing.follower_ledger"
M.parse_checkpoint, M.checkpoint_less, M.lag = ledger.parse_checkpoint, ledger.checkpoint_less, ledger.lag
local cp_less = ledger.checkpoint_less

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
    self.group = require("eventsourcing.follower_group").new(self, opts.group, opts.subs)
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
  local row, err = self:lock(sub)
  if row == nil then return nil, err end
  if row == false then return 0, "locked" end
  if row.failed or row.paused then
    self:rollback()
    return 0, row.paused and "paused" or "failed"
  end
  local batch, cp = self:_reader(sub):read_all({ after = row.checkpoint, limit = limit,
    prefetch = sub.prefetch, types = sub.types, category = sub.category, checkpoints = sub.checkpoints,
    lazy = sub.lazy })
  if not batch then self:rollback(); return nil, cp end
  local n = #batch
  if n == limit then self.behind = true end
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
    return self:_finish(sub, cp, info.handled or n, info, n < limit and "idle" or "more", batch[n].position)
  end
  local to = row.checkpoint
  if done > 0 then
    to, err = self:_checkpoint_at(sub, row.checkpoint, batch, done)
    if not to then self:rollback(); return nil, err end
  end
  local handled, st
  handled, st = self:_finish(sub, to, info.handled or done, info, info.failure and "failed" or "more",
    done > 0 and batch[done].position or nil)
  if handled and info.failure and self.log then
    local e = batch[done + 1]
    self.log(("%s %s stopped at position %s (%s, stream %s): %s"):format(self.label, sub.name,
      tostring(e.position), tostring(e.type), tostring(e.stream), tostring(info.failure.message)))
  end
  if handled and not info.failure and info.delay then sleep(info.delay) end
  return handled, st
end

-- The session a subscription's events are read on. While the follower is
-- behind (a batch came back full), a prefetching subscription reads on a
-- second session of its own: the batch ahead is then read by one backend
-- while another applies the current batch (load, copy, merge, checkpoint,
-- commit), where on one session the server does the two one after the
-- other and the batch's first statement waits for the read ahead. The
-- read is the one the batch's session would make (events below the
-- watermark do not change, and a batch read ahead is used only for the
-- checkpoint the lease row then holds), so the lease, the checkpoint and
-- the effects stay on the batch's session and transaction as before.
-- The session closes at the end of a catch_up that found no full batch
-- (live, follow keeps it while catch-ups still do), and when follow ends;
-- a memory store, or one not opened by es.open, reads on its only one.
function Follower:_reader(sub)
  local r = self.reader
  if r then return r end
  if not (self.behind and sub.prefetch) or self.memory or self.no_reader then return self.store end
  local reopen = util.reopener(self.store)
  if not reopen then
    self.no_reader = true
    return self.store
  end
  -- a session that cannot be opened now (the server restarting) only
  -- means this batch reads on the batch's session; the next one tries again
  r = reopen()
  if not r then return self.store end
  self.reader = r
  return r
end

function Follower:_close_reader()
  local r = self.reader
  self.reader, self.behind = nil, false
  if r then r:close() end
end

-- The checkpoint after batch[done] (a batch stopped early). Read without
-- per-event checkpoints (sub.checkpoints == false, which saves building a
-- string per event), the first `done` events are read again: rows below
-- the first read's watermark were all settled then, so they come back the
-- same and first; checked, a mismatch only retries the batch.
function Follower:_checkpoint_at(sub, after, batch, done)
  local e = batch[done]
  if e.checkpoint then return e.checkpoint end
  local again, err = self.store:read_all({ after = after, limit = done, types = sub.types,
    category = sub.category })
  if not again then return nil, err end
  local last = again[done]
  if #again ~= done or last.id ~= e.id or last.position ~= e.position then
    return nil, core.error("conflict", ("%s %s: a batch read again differs at event %d; retrying")
      :format(self.label, sub.name, done), { reason = "serialization" })
  end
  return last.checkpoint
end

-- A group's item: its units in one transaction (see follower_group).
function Follower:_set_batch(item, limit) return self.group:batch(item, limit) end

-- last: the position of the last event done (nil: none), recorded as the
-- unit's position when the checkpoint does not say it (Citus).
function Follower:_finish(sub, cp, handled, info, state, last)
  local ok, err = self:save(sub, cp, handled, info.failure, last)
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
  self.behind = false        -- set again by a batch that comes back full
  local ok, total, per = pcall(self._catch_up, self, opts)
  -- live (follow), the read session stays only while a catch-up still
  -- finds a full batch: under a steady trickle it closes
  if not ok or not self.following or not self.behind then self:_close_reader() end
  if not ok then
    self.following = false   -- a raise ends follow() too
    error(total, 0)
  end
  return total, per
end

function Follower:_catch_up(opts)
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
  if self.group and self.group.on_shards then return self.group:moved(self.idle_at) end
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
local function seconds(opts, k, default)
  local v = opts[k]
  if v == nil then return default end
  if type(v) ~= "number" or v <= 0 or v ~= v then
    error(("run: %s must be a positive number of seconds"):format(k), 4)
  end
  return v
end

function Follower:follow(opts, catch_up, next_due)
  local poll, tick = seconds(opts, "poll", 1), seconds(opts, "tick", 0.005)
  local retry = seconds(opts, "retry", 0.5)
  local stop_fn = opts.stop
  local label = self.label
  local on_error = opts.on_error or function(err)
    io.stderr:write(("%s: %s\n"):format(label, tostring(err)))
  end
  self.stopping, self.following = false, true
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
  self.stopping, self.following = false, false
  self:_close_reader()
  if self.group then self.group:leave() end
  return true
end

util.merge(Follower, ledger.methods)

return M
