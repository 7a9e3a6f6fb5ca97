-- eventsourcing.projector: keeps read models and projections up to date.
--
--   local projector = es.projector(store, { Orders, Totals }, {
--     batch_size = 5000,        -- events per batch (one transaction each)
--     listen = url_or_store,    -- a session of its own for LISTEN (see run);
--                               -- nil: the store's own session; false: poll only
--   })
--   projector:migrate()         -- tables + checkpoints (also done on first use)
--   projector:catch_up()        -- -> events handled (summed over projections)
--   projector:run { poll = 1, stop = function() return done end, idle = fn }
--   projector:stop()            -- from a handler or callback: run returns
--   projector:status()          -- -> { { name, checkpoint, position, lag_events,
--                               --        lag_seconds, handled, error }, ... }
--   projector:rebuild("rm_orders", { progress = function(done, total, rate, eta) end })
--   projector:retry("rm_orders")   -- clear a recorded handler error
--
-- Checkpoints live in <schema>.projections (name, checkpoint, position,
-- handled, updated_at, failed_at, error). Each batch of a projection is one
-- transaction: lock its checkpoint row (FOR UPDATE SKIP LOCKED: the lease),
-- read the events after THAT checkpoint, apply them, write the rows and the
-- new checkpoint, commit. Rows and checkpoint commit together, so every
-- event takes effect exactly once, whatever crashes or runs twice.
--
-- A handler error stops that projection only: its row records the failing
-- event (position, type, stream, version, id, message), the checkpoint
-- stays just before it (the events before it in the batch are applied),
-- status() shows it, and catch_up skips the projection until retry(name)
-- or rebuild(name).
local core = require "eventsourcing.core"
local read_model = require "eventsourcing.read_model"

local quote = read_model.quote
local M = {}

local Projector = {}
Projector.__index = Projector
M.Projector = Projector

local DEFAULT_BATCH = 5000

local util = require "eventsourcing.util"
local sleep = util.sleep
local clock = util.monotonic
local rollback = util.rollback

function M.new(store, projections, opts)
  if type(store) ~= "userdata" and type(store) ~= "table" then
    error("es.projector: expected a store", 2)
  end
  if type(projections) ~= "table" then
    error("es.projector: expected an array of read models / projections", 2)
  end
  opts = opts or {}
  local list, by_name = {}, {}
  for i, p in ipairs(projections) do
    if type(p) ~= "table" or type(p._apply) ~= "function" or type(p.name) ~= "string" then
      error(("es.projector: item %d is not a read model or projection"):format(i), 2)
    end
    if by_name[p.name] then error(("es.projector: two projections named %s"):format(p.name), 2) end
    by_name[p.name] = p
    list[#list + 1] = p
  end
  local bs = opts.batch_size or DEFAULT_BATCH
  if type(bs) ~= "number" or bs < 1 or bs % 1 ~= 0 then
    error("es.projector: batch_size must be a positive integer", 2)
  end
  return setmetatable({
    store = store, list = list, by_name = by_name, batch_size = bs,
    listen_opt = opts.listen, memory = util.is_memory(store),
    migrated = false, stopping = false, log = opts.log,
  }, Projector)
end

-- Memory stores: checkpoints in Lua, weak-keyed by store.
local mem_progress = setmetatable({}, { __mode = "k" })
local function mem_state(store, name)
  local t = mem_progress[store]
  if not t then t = {}; mem_progress[store] = t end
  local s = t[name]
  if not s then s = { position = 0, handled = 0 }; t[name] = s end
  return s
end

function Projector:_q(sql)
  return (sql:gsub("<schema>", quote(self.store:schema())))
end

-- Migration -------------------------------------------------------------------

function Projector:migrate()
  local store = self.store
  if self.memory then
    for _, p in ipairs(self.list) do
      mem_state(store, p.name)
      assert(p:migrate(store))
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
  if not step(store:query("SELECT pg_advisory_xact_lock(hashtext('eventsourcing.projections:' || $1)) IS NULL AS x",
      store:schema())) then return nil, err end
  if not step(store:query(self:_q([[CREATE TABLE IF NOT EXISTS <schema>.projections (
      name text PRIMARY KEY,
      checkpoint text,
      position bigint NOT NULL DEFAULT 0,
      handled bigint NOT NULL DEFAULT 0,
      updated_at timestamptz NOT NULL DEFAULT now(),
      failed_at timestamptz,
      error jsonb)]]))) then return nil, err end
  for _, p in ipairs(self.list) do
    if not step(p:migrate(store)) then return nil, err end
    if not step(store:query(self:_q("INSERT INTO <schema>.projections (name) VALUES ($1) ON CONFLICT DO NOTHING"),
        p.name)) then return nil, err end
  end
  ok, err = store:commit()
  if not ok then return nil, err end
  self.migrated = true
  return true
end

function Projector:_ensure()
  if self.migrated then return true end
  return self:migrate()
end

-- The checkpoint ledger -----------------------------------------------------------

-- Begins a batch: -> row { checkpoint, position, failed } | false (another
-- process holds the lease) | nil, err
function Projector:_lock(p, wait)
  local store = self.store
  if self.memory then
    local s = mem_state(store, p.name)
    return { checkpoint = s.checkpoint, position = s.position, failed = s.error ~= nil }
  end
  local ok, err = store:begin()
  if not ok then return nil, err end
  local res
  res, err = store:query(self:_q("SELECT checkpoint, position, error IS NOT NULL AS failed "
    .. "FROM <schema>.projections WHERE name = $1 FOR UPDATE" .. (wait and "" or " SKIP LOCKED")), p.name)
  if not res then rollback(store); return nil, err end
  if #res == 0 then rollback(store); return false end
  return res[1]
end

function Projector:_save(p, checkpoint, position, handled, failure)
  local store = self.store
  if self.memory then
    local s = mem_state(store, p.name)
    s.checkpoint, s.position, s.handled = checkpoint, position, s.handled + handled
    s.updated_at = util.now_iso()
    if failure then s.error, s.failed_at = failure, s.updated_at end
    return true
  end
  return store:query(self:_q("UPDATE <schema>.projections SET checkpoint = $2, position = $3, "
    .. "handled = handled + $4, updated_at = now(), failed_at = CASE WHEN $5::jsonb IS NULL "
    .. "THEN failed_at ELSE now() END, error = coalesce($5::jsonb, error) WHERE name = $1"),
    p.name, checkpoint, position, handled, failure)
end

function Projector:_commit() return util.commit(self.store) end
function Projector:_rollback() rollback(self.store) end

-- Batches ---------------------------------------------------------------------------

-- One batch of projection p. Returns handled, state where state is "more"
-- (a full batch: call again), "idle" (caught up), "locked" (another
-- process holds the lease), "failed" (stopped by a handler error) | nil, err
-- Anything raised in between (a bug, a callback) rolls the batch back
-- first, so the session and the lease are never left behind.
function Projector:_batch(p, limit)
  local ok, a, b = pcall(self._batch_in, self, p, limit)
  if ok then return a, b end
  self:_rollback()
  error(a, 0)
end

function Projector:_batch_in(p, limit)
  local store = self.store
  local row, err = self:_lock(p)
  if row == nil then return nil, err end
  if row == false then return 0, "locked" end
  if row.failed then self:_rollback(); return 0, "failed" end
  local batch, cp = store:read_all({ after = row.checkpoint, limit = limit, prefetch = true })
  if not batch then self:_rollback(); return nil, cp end
  local n = #batch
  if n == 0 then self:_rollback(); return 0, "idle" end
  local ok, a, b = p:_apply(store, p.name, batch, n)
  if ok == nil then
    self:_rollback()
    if util.transient(a) then return nil, a end
    if n > 1 then return self:_one_by_one(p, n) end
    return self:_fail(p, row, batch, 1, tostring(a))
  elseif ok == false then
    self:_rollback()
    return self:_fail(p, row, batch, a, b)
  end
  ok, err = self:_save(p, cp, batch[n].position, n)
  if not ok then self:_rollback(); return nil, err end
  ok, err = self:_commit()
  if not ok then return nil, err end
  return n, n < limit and "idle" or "more"
end

-- A write failed (a row the database refuses): find the event, one by one.
function Projector:_one_by_one(p, n)
  local total = 0
  for _ = 1, n do
    local h, st = self:_batch(p, 1)
    if not h then return nil, st end
    total = total + h
    if st ~= "more" then return total, st end
  end
  return total, "more"
end

-- events[i] of the batch read after row.checkpoint failed with message:
-- apply the events before it and record the failure, in one transaction.
function Projector:_fail(p, old, batch, i, message)
  local store = self.store
  local row, err = self:_lock(p)
  if row == nil then return nil, err end
  if row == false then return 0, "locked" end
  if row.checkpoint ~= old.checkpoint then self:_rollback(); return 0, "more" end
  local cp, pos, done = row.checkpoint, row.position, 0
  if i > 1 then
    -- Events below the read watermark form a stable prefix: the same i-1.
    local b2, cp2 = store:read_all({ after = row.checkpoint, limit = i - 1 })
    if not b2 then self:_rollback(); return nil, cp2 end
    local ok, e2 = true, nil
    -- a memory store cannot roll back what custom handlers did for the
    -- events before the failing one: they ran once already, keep them
    if not (self.memory and p.kind ~= "read_model") then
      ok, e2 = p:_apply(store, p.name, b2, #b2)
    end
    if not ok then
      -- the prefix fails too (the database refuses a row, or a handler is
      -- not deterministic): find the first failing event one by one
      self:_rollback()
      if ok == nil and util.transient(e2) then return nil, e2 end
      return self:_one_by_one(p, i)
    end
    cp, pos, done = cp2, b2[#b2].position, #b2
  end
  local e = batch[i]
  local failure = { position = e.position, type = e.type, stream = e.stream,
    version = e.version, id = e.id, message = message }
  local ok
  ok, err = self:_save(p, cp, pos, done, failure)
  if not ok then self:_rollback(); return nil, err end
  ok, err = self:_commit()
  if not ok then return nil, err end
  if self.log then
    self.log(("projection %s stopped at position %s (%s, stream %s): %s")
      :format(p.name, tostring(e.position), e.type, tostring(e.stream), message))
  end
  return done, "failed"
end

-- Public API ---------------------------------------------------------------------------

-- Processes every event up to the store's end; returns how many events
-- were handled (summed over projections; per-projection counts second).
function Projector:catch_up(opts)
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local limit = (opts and opts.batch_size) or self.batch_size
  local total, per = 0, {}
  local active = {}
  for _, p in ipairs(self.list) do active[#active + 1] = p; per[p.name] = 0 end
  while #active > 0 and not self.stopping do
    local next_active = {}
    for _, p in ipairs(active) do
      if self.stopping then break end
      local n, st = self:_batch(p, limit)
      if not n then return nil, st end
      total = total + n
      per[p.name] = per[p.name] + n
      if st == "more" then next_active[#next_active + 1] = p end
    end
    active = next_active
  end
  return total, per
end

function Projector:stop()
  self.stopping = true
end

-- Follows live until stop() returns true or projector:stop() is called.
-- Wakes on LISTEN/NOTIFY (on opts.listen's session, see es.projector) and
-- polls every opts.poll seconds (default 1) anyway: notifications are only
-- a hint, the checkpoint table is the truth. Errors (a dropped connection,
-- a restarting server) are reported to opts.on_error (default: stderr) and
-- retried after opts.retry seconds (default 0.5).
function Projector:run(opts)
  opts = opts or {}
  local poll = opts.poll or 1
  local retry = opts.retry or 0.5
  local stop_fn = opts.stop
  local on_error = opts.on_error or function(err)
    io.stderr:write(("projector: %s\n"):format(tostring(err)))
  end
  self.stopping = false
  local function stopping() return self.stopping or (stop_fn and stop_fn()) end
  local listener = util.subscribe(self, on_error)
  while not stopping() do
    local n, err = self:catch_up()
    if not n then
      on_error(err)
      if stopping() then break end
      sleep(retry)
    else
      if opts.idle then opts.idle(n) end
      if stopping() then break end
      if listener then
        local woke, werr = listener:wait(poll)
        if woke == nil then
          if werr and werr.kind ~= "connection" then on_error(werr) end
          sleep(math.min(retry, poll))
        end
      else
        sleep(poll)
      end
    end
  end
  self.stopping = false
  return true
end

-- Forgets a projection's recorded error (and with reset, its count of
-- handled events).
function Projector:_clear_error(name, reset)
  if self.memory then
    local s = mem_state(self.store, name)
    s.error, s.failed_at = nil, nil
    if reset then s.handled = 0 end
    return true
  end
  return self.store:query(self:_q("UPDATE <schema>.projections SET error = NULL, failed_at = NULL, "
    .. "updated_at = now()" .. (reset and ", handled = 0" or "") .. " WHERE name = $1"), name)
end

-- Clears the recorded error of a stopped projection: it resumes at the
-- failing event.
function Projector:retry(name)
  local p = self.by_name[name]
  if not p then error(("projector:retry: no projection named %s"):format(tostring(name)), 2) end
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  return self:_clear_error(name)
end

local function parse_cp(cp)
  if not cp then return "0", 0 end
  local t, p = cp:match("^(%d+):(%d+)$")
  return t or "0", tonumber(p) or 0
end

local iso_epoch = util.iso_epoch

function Projector:status()
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local store, out = self.store, {}
  for _, p in ipairs(self.list) do
    local s = { name = p.name }
    if self.memory then
      local m = mem_state(store, p.name)
      s.checkpoint, s.position, s.handled, s.error = m.checkpoint, m.position, m.handled, m.error
      s.updated_at, s.failed_at = m.updated_at, m.failed_at
      local lag, first = 0, nil
      local done, serr = util.scan(store, m.checkpoint, function(b)
        first = first or b[1]
        lag = lag + #b
      end)
      if done == nil and serr then return nil, serr end
      s.lag_events = lag
      local t = first and iso_epoch(first.recorded_at)
      s.lag_seconds = t and math.max(0, util.now() - t) or 0
    else
      local res
      res, err = store:query(self:_q("SELECT checkpoint, position, handled, error, "
        .. util.ts_sql("updated_at") .. ", " .. util.ts_sql("failed_at") .. " "
        .. "FROM <schema>.projections WHERE name = $1"), p.name)
      if not res then return nil, err end
      local r = res[1] or {}
      s.checkpoint, s.position, s.handled, s.error = r.checkpoint, r.position or 0, r.handled or 0, r.error
      s.updated_at, s.failed_at = r.updated_at, r.failed_at
      if util.per_shard(r.checkpoint) then
        -- Citus: a cursor per shard, not comparable in one SQL condition
        local n, first = util.lag_by_scan(store, r.checkpoint)
        if not n then return nil, first end
        local t = first and iso_epoch(first)
        s.lag_events, s.lag_seconds = n, t and math.max(0, util.now() - t) or 0
      else
        local txid, pos = parse_cp(r.checkpoint)
        res, err = store:query(self:_q("SELECT count(*) AS n, coalesce(extract(epoch FROM now() - "
          .. "min(recorded_at)), 0)::float8 AS lag FROM <schema>.events "
          .. "WHERE (txid, position) > ($1::xid8, $2::bigint)"), txid, pos)
        if not res then return nil, err end
        s.lag_events, s.lag_seconds = res[1].n, math.max(0, res[1].lag)
      end
    end
    s.status = s.error and "failed" or "running"
    out[#out + 1] = s
  end
  return out
end

-- Rebuild ------------------------------------------------------------------------

local function is_tty()
  if not os.getenv("TERM") then return false end
  local r = os.execute("test -t 2")
  return r == true or r == 0
end

local function progress_bar(done, total, rate, eta)
  local width = 30
  local frac = total > 0 and math.min(1, done / total) or 1
  local fill = math.floor(frac * width + 0.5)
  io.stderr:write(("\r[%s%s] %3d%% %d/%d events %.0f ev/s ETA %ds  ")
    :format(("#"):rep(fill), ("."):rep(width - fill), math.floor(frac * 100 + 0.5),
      done, total, rate, math.floor(eta + 0.5)))
  io.stderr:flush()
end

-- count() gives the total, asked only when progress is shown: counting
-- the whole store is work of its own.
local function reporter(opts, count)
  local cb = opts.progress
  local bar = opts.bar
  if bar == nil then bar = is_tty() end
  local total = (cb or bar) and count() or 0
  local t0 = clock()
  local last = -1
  return function(done, final)
    local t = clock()
    local el = t - t0
    local rate = el > 0 and done / el or 0
    local eta = rate > 0 and math.max(0, (total - done) / rate) or 0
    if cb then cb(done, math.max(total, done), rate, eta) end
    if bar and (final or t - last >= 0.2) then
      last = t
      progress_bar(done, math.max(total, done), rate, eta)
      if final then io.stderr:write("\n") end
    end
  end
end

function Projector:_count_events()
  if self.memory then
    local n = 0
    util.scan(self.store, nil, function(b) n = n + #b end)
    return n
  end
  local res = self.store:query(self:_q("SELECT count(*) AS n FROM <schema>.events"))
  return res and res[1].n or 0
end

-- rebuild(name, { progress = function(done, total, rate, eta) end,
--                 bar = bool (default: stderr is a terminal), batch_size })
-- Read models: replays every event into a fresh table and swaps it in
-- atomically (queries answer from the old table until then); the
-- checkpoint moves to the rebuilt one in the same transaction. Custom
-- projections need a reset(tx) function; their rebuild resets and
-- replays in place (not atomic for readers). -> events replayed | nil, err
function Projector:rebuild(name, opts)
  opts = opts or {}
  local p = self.by_name[name]
  if not p then error(("projector:rebuild: no projection named %s"):format(tostring(name)), 2) end
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local limit = opts.batch_size or math.max(self.batch_size, 10000)
  local report = reporter(opts, function() return self:_count_events() end)
  -- a raise (the progress callback, a bug) must not strand the swap's
  -- transaction and its lease
  local done, a, b = pcall(p.kind == "read_model" and self._rebuild_swap or self._rebuild_in_place,
    self, p, limit, report)
  if done then return a, b end
  self:_rollback()
  error(a, 0)
end

function Projector:_rebuild_swap(p, limit, report)
  local ok, err
  local store = self.store
  local tmp = read_model.short_ident(("%s__rebuild_%d"):format(p.name, os.time() % 100000000))
  local seen = {}
  if self.memory then
    read_model._mem_tables(store)[tmp] = {}
  else
    ok, err = store:query(p:_create_sql(store, tmp))
    if not ok then return nil, err end
  end
  local function drop_tmp()
    if self.memory then read_model._mem_tables(store)[tmp] = nil
    else store:query("DROP TABLE IF EXISTS " .. p:_qualified(store, tmp)) end
  end
  -- 1. bulk replay, outside any long transaction
  local after, done, pos = nil, 0, 0
  local function replay(max_batches)
    local batches = 0
    while not max_batches or batches < max_batches do
      local batch, cp = store:read_all({ after = after, limit = limit, prefetch = true })
      if not batch then return nil, cp end
      if #batch == 0 then return true end
      local r, a, b = p:_apply(store, tmp, batch, #batch, { seen = seen })
      if r == nil then return nil, a end
      if r == false then
        local e = batch[a]
        return nil, core.error("invalid", ("rebuild %s: handler for %s failed at position %s (stream %s): %s")
          :format(p.name, e.type, tostring(e.position), tostring(e.stream), b),
          { position = e.position, type = e.type, stream = e.stream })
      end
      after, done, pos = cp, done + #batch, batch[#batch].position
      report(done)
      batches = batches + 1
      if #batch < limit then return true end
    end
    return true
  end
  -- batches of thousands of events make garbage fast: collect less often
  local ok_gc, pause = pcall(collectgarbage, "setpause", 400)
  ok, err = replay()
  if ok_gc then pcall(collectgarbage, "setpause", pause) end
  if not ok then drop_tmp(); return nil, err end
  if not self.memory then
    ok, err = read_model._exec_all(store, p:_index_sqls(store, tmp))
    if not ok then drop_tmp(); return nil, err end
  end
  -- 2. swap: hold the lease, apply the tail, rename, move the checkpoint
  local row
  row, err = self:_lock(p, true)
  if not row then
    drop_tmp()
    return nil, err or core.error("database", "rebuild: the checkpoint row of " .. p.name .. " is missing")
  end
  ok, err = replay()
  if ok and self.memory then
    local tables = read_model._mem_tables(store)
    tables[p.name], tables[tmp] = tables[tmp], nil
  elseif ok then
    local old = read_model.short_ident(p.name .. "__old")
    local sqls = {
      ("ALTER TABLE %s RENAME TO %s"):format(p:_qualified(store), quote(old)),
      "DROP TABLE " .. p:_qualified(store, old),
      ("ALTER TABLE %s RENAME TO %s"):format(p:_qualified(store, tmp), quote(p.name)),
    }
    for _, s in ipairs(p:_rename_index_sqls(store, tmp)) do sqls[#sqls + 1] = s end
    ok, err = read_model._exec_all(store, sqls)
  end
  if ok then
    ok, err = self:_save(p, after, pos, 0)
    if ok then ok, err = self:_clear_error(p.name) end
  end
  if not ok then self:_rollback(); drop_tmp(); return nil, err end
  ok, err = self:_commit()
  if not ok then drop_tmp(); return nil, err end
  report(done, true)
  return done
end

function Projector:_rebuild_in_place(p, limit, report)
  if not p.reset_fn then
    return nil, core.error("invalid", ("projection %s has no reset(tx) function: it cannot be rebuilt")
      :format(p.name))
  end
  local row, err = self:_lock(p, true)
  if not row then return nil, err end
  local ok, e = pcall(p.reset_fn, require("eventsourcing.projection").tx(self.store))
  if ok then
    ok, e = self:_save(p, nil, 0, 0)
    if ok then ok, e = self:_clear_error(p.name, true) end
  end
  if not ok then self:_rollback(); return nil, e end
  ok, err = self:_commit()
  if not ok then return nil, err end
  local done = 0
  while true do
    local n, st = self:_batch(p, limit)
    if not n then return nil, st end
    done = done + n
    report(done)
    if st ~= "more" then break end
  end
  report(done, true)
  return done
end

return setmetatable(M, { __call = function(_, store, projections, opts)
  return M.new(store, projections, opts)
end })
