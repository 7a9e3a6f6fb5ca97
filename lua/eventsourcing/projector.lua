-- eventsourcing.projector: keeps read models and projections up to date.
--
--   local projector = es.projector(store, { Orders, Totals }, {
--     batch_size = 5000,        -- events per batch (one transaction each)
--   })
--   projector:migrate()         -- tables + checkpoints (also done on first use)
--   projector:catch_up()        -- -> events handled (summed over projections)
--   projector:run { poll = 1, tick = 0.005, stop = function() return done end, idle = fn }
--   projector:stop()            -- from a handler or callback: run returns
--   projector:status()          -- -> { { name, checkpoint, position, lag_events,
--                               --        lag_seconds, handled, error, state,
--                               --        updated_at, failed_at }, ... }
--   projector:rebuild("rm_orders", { progress = function(done, total, rate, eta, final) end })
--   projector:rebuild("rm_orders", { workers = 2 })  -- replay over 2 processes
--   projector:retry("rm_orders")   -- clear a recorded handler error
--   projector:pause(name) / resume(name)
--   projector:reset(name)       -- back to the first event; a read model's
--                               -- rows are cleared in the same transaction
--
-- opts.group = { partitions = 16, member = "...", ttl = 5, heartbeat = 1 }
-- runs this projector as one member of a consumer group (see
-- eventsourcing.follower_group): start the same projector in N processes.
--
-- Everything about following the log (the checkpoint ledger
-- <schema>.projections and its lease, batches, catch-up, the live loop,
-- lag, pause/resume) is eventsourcing.follower's; this module only says
-- what a batch does: apply the events to the projection in the batch's
-- transaction. Each projection reads only the event types it has
-- handlers for (filtered in SQL; its checkpoint still moves past the
-- others).
--
-- A handler error stops that projection only: its row records the failing
-- event (position, type, stream, version, id, message), the checkpoint
-- stays just before it (the events before it in the batch are applied),
-- status() shows it, and catch_up skips the projection until retry(name),
-- reset(name) or rebuild(name).
local core = require "eventsourcing.core"
local read_model = require "eventsourcing.read_model"
local follower = require "eventsourcing.follower"
local progress = require "eventsourcing.progress"
local rebuild = require "eventsourcing.rebuild"
local rebuild_workers = require "eventsourcing.rebuild_workers"
local util = require "eventsourcing.util"

local quote = read_model.quote
local M = {}

local Projector = {}
Projector.__index = Projector
M.Projector = Projector

local DEFAULT_BATCH = 5000

-- The event types a projection has handlers for, sorted.
local function types_of(p)
  local t = {}
  for k in pairs(p.on or {}) do t[#t + 1] = k end
  table.sort(t)
  return t
end

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
  local self = setmetatable({ store = store, list = list, by_name = by_name, batch_size = bs,
    memory = util.is_memory(store), log = opts.log }, Projector)
  local subs = {}
  for _, p in ipairs(list) do
    -- read model handlers get no e.checkpoint (no string per event), and
    -- their events' id and metadata are made when first read (lazy), as
    -- in a rebuild: a catch-up hands them the same events
    subs[#subs + 1] = { name = p.name, types = types_of(p), category = p.category, prefetch = true,
      checkpoints = p.kind ~= "read_model", lazy = p.kind == "read_model",
      process = function(batch, n) return self:_process(p, batch, n) end,
      reset = function() return self:_clear_rows(p) end }
  end
  self.engine = follower.new(store, { ledger = "projections", label = "projector", subs = subs,
    batch_size = bs, log = opts.log, group = opts.group, migrate = function(s)
      for _, p in ipairs(list) do
        local ok, err = p:migrate(s)
        if not ok then return nil, err end
      end
      return true
    end })
  return self
end

function Projector:migrate() return self.engine:migrate() end

-- Applying a batch --------------------------------------------------------------

local SAVEPOINT = "es_projector_batch"
-- a batch runs in its own transaction: upserts may be staged (read_model)
local STAGE = { stage = true }

function Projector:_sp(what)
  if self.memory then return true end
  return self.store:query(what .. " " .. SAVEPOINT)
end

-- Applies events[1..n] to p in the batch's transaction, under a savepoint
-- so that a failure leaves the transaction usable: -> done, info (the
-- follower's contract: info.failure names the event that failed) | nil, err
function Projector:_process(p, batch, n)
  if n == 0 then return 0 end
  local ok, err = self:_sp("SAVEPOINT")
  if not ok then return nil, err end
  local res, a, b = p:_apply(self.store, p.name, batch, n, STAGE)
  if res then
    ok, err = self:_sp("RELEASE SAVEPOINT")
    if not ok then return nil, err end
    return n, { handled = a }
  end
  ok, err = self:_sp("ROLLBACK TO SAVEPOINT")
  if not ok then return nil, err end
  if res == nil then
    if util.transient(a) then return nil, a end
    -- the database refused a row: find the event, one by one
    if n == 1 then return 0, { failure = follower.failure(batch[1], tostring(a)), handled = 0 } end
    return self:_one_by_one(p, batch, n)
  end
  local failure = follower.failure(batch[a], b)
  -- a memory store cannot undo what custom handlers did for the events
  -- before the failing one: they ran once already, keep them
  if self.memory and p.kind ~= "read_model" then
    return a - 1, { failure = failure, handled = a - 1 }
  end
  -- the events before it, again (a handler that is not deterministic may
  -- fail earlier this time: then that is the failure)
  local done, info = self:_process(p, batch, a - 1)
  if done == nil or done < a - 1 then return done, info end
  return done, { failure = failure, handled = info and info.handled or 0 }
end

function Projector:_one_by_one(p, batch, n)
  local handled = 0
  for i = 1, n do
    local done, info = self:_process(p, { batch[i] }, 1)
    if done == nil then return nil, info end
    if done == 0 then
      info.handled = handled
      return i - 1, info
    end
    handled = handled + (info.handled or 1)
  end
  return n, { handled = handled }
end

-- Clears the rows of p (reset, in the ledger's transaction).
function Projector:_clear_rows(p)
  local store = self.store
  if p.kind == "read_model" then
    if self.memory then read_model._mem_tables(store)[p.name] = {}; return true end
    return store:query("DELETE FROM " .. p:_qualified(store))
  end
  if not p.reset_fn then
    return nil, core.error("invalid", ("projection %s has no reset(tx) function: it cannot be reset")
      :format(p.name))
  end
  local ok, err = pcall(p.reset_fn, require("eventsourcing.projection").tx(store))
  if not ok then return nil, err end
  return true
end

-- Public API ---------------------------------------------------------------------------

-- Processes every event up to the store's end; returns how many events
-- were handled (summed over projections; per-projection counts second).
function Projector:catch_up(opts) return self.engine:catch_up(opts) end

function Projector:stop() self.engine:stop() end

-- Follows live until stop() returns true or projector:stop() is called
-- (see follower.follow: opts.poll, opts.tick, opts.retry, opts.on_error,
-- opts.idle). opts.listen / the `listen` option of older versions are
-- accepted and ignored: wake-ups come from polling the log's head.
function Projector:run(opts)
  opts = opts or {}
  return self.engine:follow(opts, function() return self:catch_up() end)
end

-- retry(name): clears the recorded error of a stopped projection (it
-- resumes at the failing event); pause(name), resume(name); reset(name):
-- back to the first event, the checkpoint and the rows (a read model's are
-- deleted; a custom projection's reset(tx) runs) in one transaction.
follower.delegate(Projector, "projector", "projection", { "retry", "pause", "resume", "reset" })

function Projector:status() return self.engine:status() end

-- Rebuild ------------------------------------------------------------------------

-- types as elements of a PostgreSQL array literal
local function quoted_types(types)
  local out = {}
  for i, t in ipairs(types) do out[i] = '"' .. t:gsub('[\\"]', '\\%0') .. '"' end
  return out
end

-- The events a rebuild of p replays: those of the types it handles.
function Projector:_count_events(p)
  local types = self.engine.by_name[p.name].types
  if self.memory then
    local n, after = 0, nil
    repeat
      local b, cp = self.store:read_all({ after = after, limit = 10000, types = types,
        category = p.category })
      if not b then return 0 end
      n, after = n + #b, cp
    until #b < 10000
    return n
  end
  local res = self.store:query(("SELECT count(*) AS n FROM %s.events WHERE type = ANY($1::text[]) "
    .. "AND ($2::text IS NULL OR category = $2)"):format(quote(self.store:schema())),
    "{" .. table.concat(quoted_types(types), ",") .. "}", p.category)
  return res and res[1].n or 0
end

-- opts.workers of rebuild: 1 (default) or the processes to spread the
-- replay over. More than one needs a read model whose rows each follow
-- one stream (partitions split streams apart, never one stream; see
-- README, "Rebuilds"): the default key_of with a category, or
-- keys_by_stream = true in its definition. A memory store rebuilds in one.
function Projector:_workers(p, w)
  if w == nil or w == 1 then return 1 end
  if type(w) ~= "number" or w % 1 ~= 0 or w < 1 or w > 64 then
    error("projector:rebuild: workers must be an integer from 1 to 64", 3)
  end
  if p.kind ~= "read_model" then
    error(("projector:rebuild: workers is for read models (%s is rebuilt in place)"):format(p.name), 3)
  end
  if not (p.keys_by_stream or (p.key_of == read_model.default_key_of and p.category)) then
    error(("projector:rebuild: %s cannot be rebuilt by %d workers: its rows must each follow one "
      .. "stream (the default key_of with a category, or keys_by_stream = true)"):format(p.name, w), 3)
  end
  if self.memory then return 1 end
  local info = self.store:info()
  if info and info.distributed then
    error("projector:rebuild: workers > 1 is not for stores distributed on Citus", 3)
  end
  return w
end

-- rebuild(name, { progress = function(done, total, rate, eta, final) end,
--                 workers = 1 (processes replaying, see _workers),
--                 bar = true (draw eventsourcing.progress.bar on stderr), batch_size,
--                 timings = {} (gets seconds per phase: read, keys, load, handlers,
--                 build, encode, write, indexes, wait, swap) })
-- Read models: replays every event into a fresh table and swaps it in
-- atomically (queries answer from the old table until then); the
-- checkpoint moves to the rebuilt one in the same transaction. Custom
-- projections need a reset(tx) function; their rebuild resets and
-- replays in place (not atomic for readers). -> events replayed | nil, err
function Projector:rebuild(name, opts)
  opts = opts or {}
  local p = self.by_name[name]
  if not p then error(("projector:rebuild: no projection named %s"):format(tostring(name)), 2) end
  local ok, err = self.engine:ensure()
  if not ok then return nil, err end
  local limit = opts.batch_size or math.max(self.batch_size, 10000)
  local workers = self:_workers(p, opts.workers)
  local cb = opts.progress
  if opts.bar then
    local bar, user = progress.bar(), cb
    cb = function(...)
      if user then user(...) end
      bar(...)
    end
  end
  local report = progress.reporter(cb, function() return self:_count_events(p) end)
  self._timings = opts.timings
  -- a raise (the progress callback, a bug) must not strand the swap's
  -- transaction and its lease
  local done, a, b = pcall(p.kind == "read_model" and self._rebuild_swap or self._rebuild_in_place,
    self, p, limit, report, workers)
  self._timings = nil
  local tmp = self._rebuild_tmp
  self._rebuild_tmp = nil
  if done then return a, b end
  self.engine:rollback()
  -- nor leave its shadow table and marker (inline writers would go on
  -- recording their transactions for it)
  if tmp then rebuild.abandon(self.store, p, tmp) end
  error(a, 0)
end

-- A second session for a bulk replay's writes, so that the server stores
-- one batch's rows while this process reads and applies the next (the
-- rows go by COPY without waiting, see store:copy_rows). nil where there
-- is none to open (a memory store, a store not opened with es.open): the
-- writes then go on the reading session and wait.
local function write_session(self)
  if self.memory then return nil end
  local reopen = util.reopener(self.store)
  return reopen and reopen() or nil
end

-- Replays the events of p after `after` into tbl in batches of `limit`
-- (read_all's watermark). part (a rebuild's worker): { store = its own
-- session, partitions = n, partition = k, upto = W }. bulk: outside any
-- transaction (not the swap's tail), so writes may go on a session of
-- their own.
-- -> true, checkpoint, events | nil, err
function Projector:_replay(p, tbl, after, limit, seen, report, done, part, bulk)
  local store, types = part and part.store or self.store, self.engine.by_name[p.name].types
  local wstore = bulk and write_session(self)
  if not wstore then
    return self:_replay_on(store, store, p, tbl, after, limit, seen, report, done, part, false, types)
  end
  -- the write session is waited for and closed whatever happens, a raise
  -- included (a progress callback may raise): the caller drops the
  -- shadow table next, which a copy still running would hold up
  local ran, ok, a, b = pcall(self._replay_on, self, store, wstore, p, tbl, after, limit, seen, report, done,
    part, true, types)
  local copied, werr = wstore:copy_wait()
  wstore:close()
  if not ran then error(ok, 0) end
  if ok and not copied then return nil, werr end
  return ok, a, b
end

function Projector:_replay_on(store, wstore, p, tbl, after, limit, seen, report, done, part, async, types)
  local timings, clock = self._timings, util.monotonic
  local opts = { seen = seen, timings = timings, async = async }
  -- lazy: e.id and e.metadata made only for the handlers that read them
  -- (rm_orders' upcast reads the metadata of ItemAdded events only)
  local ropts = { after = after, limit = limit, prefetch = true, types = types,
    category = p.category, checkpoints = false, lazy = true,
    partitions = part and part.partitions, partition = part and part.partition, upto = part and part.upto }
  while true do
    local t0 = timings and clock()
    ropts.after = after
    local batch, cp = store:read_all(ropts)
    if not batch then return nil, cp end
    if timings then timings.read = (timings.read or 0) + (clock() - t0) end
    if #batch == 0 then return true, cp or after, done end
    local r, a, b = p:_apply(wstore, tbl, batch, #batch, opts)
    if r == nil then return nil, a end
    if r == false then
      local e = batch[a]
      return nil, core.error("invalid", ("rebuild %s: handler for %s failed at position %s (stream %s): %s")
        :format(p.name, e.type, tostring(e.position), tostring(e.stream), b),
        { position = e.position, type = e.type, stream = e.stream })
    end
    after, done = cp, done + #batch
    report(done)
    if #batch < limit then return true, after, done end
  end
end

-- Workers > 1: the events up to the bound W replayed by `workers`
-- processes, one stream-hash partition each (eventsourcing.rebuild_workers).
-- The parent's progress counts its own partition times the workers.
-- -> true, W, events | nil, err
function Projector:_replay_workers(p, tmp, limit, report, workers, upto)
  local function replay(store, k)
    local seen = core.keyset()  -- keys of this partition only: none is in another's
    local ok, a, done = self:_replay(p, tmp, nil, limit, seen,
      k == 0 and function(n) report(n * workers) end or function() end, 0,
      { store = store, partitions = workers, partition = k, upto = upto }, true)
    if not ok then return nil, a end
    return done
  end
  local done, err = rebuild_workers.run(self.store, workers, replay, "rebuild " .. p.name)
  if not done then return nil, err end
  report(done)
  return true, upto, done
end

-- Memory stores: one process, no concurrent writers; replay and swap.
function Projector:_rebuild_memory(p, limit, report)
  local store, engine = self.store, self.engine
  local tables = read_model._mem_tables(store)
  self._mem_rebuilds = (self._mem_rebuilds or 0) + 1
  local tmp = ("%s__rebuild_%d"):format(p.name, self._mem_rebuilds)
  tables[tmp] = {}
  local seen = {}
  local ok, after, done = self:_replay(p, tmp, nil, limit, seen, report, 0)
  local err = after
  if ok then ok, err = engine:lock_all(p.name) end
  if not ok then tables[tmp] = nil; return nil, err end
  tables[p.name], tables[tmp] = tables[tmp], nil
  ok, err = engine:set_all(p.name, after)
  if not ok then engine:rollback(); return nil, err end
  ok, err = engine:commit()
  if not ok then return nil, err end
  report(done, true)
  return done
end

-- In the swap's transaction: the live table locked, the tail, the inline
-- transactions above the watermark, the renames. -> true, checkpoint,
-- events | nil, err
function Projector:_swap_tail(p, tmp, after, limit, seen, report, done)
  local store = self.store
  local ok, err = rebuild.lock_live(store, p)
  if not ok then return nil, err end
  ok, after, done = self:_replay(p, tmp, after, limit, seen, report, done)
  if not ok then return nil, after end
  local extra
  extra, err = rebuild.replay_inline(store, p, tmp, after, self.engine.by_name[p.name].types, seen)
  if not extra then return nil, err end
  ok, err = rebuild.swap(store, p, tmp)
  if not ok then return nil, err end
  return true, after, done + extra
end

-- PostgreSQL: see eventsourcing.rebuild for why each step is safe with
-- projectors and inline writers running. workers > 1: the bulk replay up
-- to a bound W fixed first, spread over that many processes; the tail
-- (after W) and the swap as with one.
function Projector:_rebuild_swap(p, limit, report, workers)
  if self.memory then return self:_rebuild_memory(p, limit, report) end
  local store, engine = self.store, self.engine
  local tmp, err = rebuild.start(store, p)
  if not tmp then return nil, err end
  self._rebuild_tmp = tmp    -- for rebuild() to clean up after a raise
  local function fail(e) rebuild.abandon(store, p, tmp); return nil, e end
  -- the keys written into the shadow table: a core.keyset, which the
  -- collector does not walk key by key on every cycle as it would a table
  local seen, upto = core.keyset(), nil
  if workers > 1 then
    upto, err = rebuild.bound(store)
    if err then return fail(err) end
  end
  -- batches of thousands of events make garbage fast: collect less often
  local ok_gc, pause = pcall(collectgarbage, "setpause", 400)
  local ok, after, done
  if upto then
    ok, after, done = self:_replay_workers(p, tmp, limit, report, workers, upto)
    -- rows of the other partitions are not in seen: the tail looks keys up
    seen = nil
  else
    ok, after, done = self:_replay(p, tmp, nil, limit, seen, report, 0, nil, true)
  end
  if ok_gc then pcall(collectgarbage, "setpause", pause) end
  if not ok then return fail(after) end
  local timings, t0 = self._timings, util.monotonic()
  ok, err = read_model._exec_all(store, p:_index_sqls(store, tmp))
  if timings then timings.indexes = util.monotonic() - t0; t0 = util.monotonic() end
  if ok then ok, err = rebuild.wait_running(store) end
  if timings then timings.wait = util.monotonic() - t0; t0 = util.monotonic() end
  if not ok then return fail(err) end
  ok, err = engine:lock_all(p.name)
  if not ok then return fail(err) end
  ok, after, done = self:_swap_tail(p, tmp, after, limit, seen, report, done)
  err = after
  if ok then ok, err = engine:set_all(p.name, after) end
  if not ok then engine:rollback(); return fail(err) end
  ok, err = engine:commit()
  if not ok then return fail(err) end
  if timings then timings.swap = util.monotonic() - t0 end
  report(done, true)
  return done
end

function Projector:_rebuild_in_place(p, limit, report)
  if not p.reset_fn then
    return nil, core.error("invalid", ("projection %s has no reset(tx) function: it cannot be rebuilt")
      :format(p.name))
  end
  local engine = self.engine
  local ok, err = engine:lock_all(p.name)
  if not ok then return nil, err end
  local e
  ok, e = pcall(p.reset_fn, require("eventsourcing.projection").tx(self.store))
  if ok then ok, e = engine:set_all(p.name, nil, true) end
  if not ok then engine:rollback(); return nil, e end
  ok, err = engine:commit()
  if not ok then return nil, err end
  local done = 0
  for _, item in ipairs(engine:items_of(p.name)) do
    while true do
      local n, st = engine:batch(item, limit)
      if not n then return nil, st end
      done = done + n
      report(done)
      if st ~= "more" then break end
    end
  end
  report(done, true)
  return done
end

return setmetatable(M, { __call = function(_, store, projections, opts)
  return M.new(store, projections, opts)
end })
