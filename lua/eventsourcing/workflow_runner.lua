-- eventsourcing.workflow_runner: runs workflows on the follower engine
-- (eventsourcing.follower): each batch in one transaction, each event under
-- a savepoint; plus timers (workflow_timers), dead letters
-- (workflow_dead_letters) and what handlers do (workflow_context).
local aggregate = require "eventsourcing.aggregate"
local repository = require "eventsourcing.repository"
local util = require "eventsourcing.util"
local follower = require "eventsourcing.follower"
local definition = require "eventsourcing.workflow_definition"
local wstore = require "eventsourcing.workflow_store"

local is_memory = util.is_memory
local sqlq, message_of, is_connection = wstore.sqlq, wstore.message_of, wstore.is_connection
local mem, migrated = wstore.mem, wstore.migrated
local Workflow = definition.Workflow

local M = {}

local Runner = {}
Runner.__index = Runner
M.Runner = Runner

local function num_opt(opts, k, default, min)
  local v = opts[k]
  if v == nil then return default end
  if type(v) ~= "number" or v < min then
    error(("es.workflow.runner: %s must be a number >= %s"):format(k, tostring(min)), 3)
  end
  return v
end

function M.new(store, workflows, opts)
  if type(store) ~= "userdata" and type(store) ~= "table" then
    error("es.workflow.runner: expected a store", 2)
  end
  if getmetatable(workflows) == Workflow then workflows = { workflows } end
  if type(workflows) ~= "table" then error("es.workflow.runner: expected an array of workflows", 2) end
  opts = opts or {}
  local list, by_name = {}, {}
  for i, wf in ipairs(workflows) do
    if getmetatable(wf) ~= Workflow then
      error(("es.workflow.runner: item %d is not a workflow (es.workflow{...})"):format(i), 2)
    end
    if by_name[wf.name] then error("es.workflow.runner: two workflows named " .. wf.name, 2) end
    by_name[wf.name] = wf
    list[#list + 1] = wf
  end
  local aggregates = opts.aggregates or {}
  for k, A in pairs(aggregates) do
    if type(k) ~= "string" or getmetatable(A) ~= aggregate.Aggregate then
      error("es.workflow.runner: aggregates must map names to aggregates", 2)
    end
  end
  local repo = repository.new(store, { snapshots = opts.snapshots })
  local self = setmetatable({
    store = store, list = list, by_name = by_name, aggregates = aggregates,
    read_models = opts.read_models and #opts.read_models > 0 and opts.read_models or nil,
    repo = repo, memory = is_memory(store),
    batch_size = num_opt(opts, "batch_size", 50, 1),
    max_attempts = num_opt(opts, "max_attempts", 5, 1),
    backoff = num_opt(opts, "backoff", 0.05, 0),
    max_backoff = num_opt(opts, "max_backoff", 5, 0),
    max_retries = num_opt(opts, "max_retries", 3, 0),
    timer_batch = num_opt(opts, "timer_batch", 100, 1),
    log = opts.log, attempts = {},
    stats = { handled = 0, appended = 0, already_done = 0, rejected = 0, retried = 0,
              dead_lettered = 0, timers_fired = 0 },
  }, Runner)
  local subs = {}
  for _, wf in ipairs(list) do
    subs[#subs + 1] = { name = wf.name, types = wf.types, category = wf.category,
      process = function(batch, n) return self:_process(wf, batch, n) end }
  end
  -- the workflow tables come with the ledger, in its migration's transaction
  self.engine = follower.new(store, { ledger = "workflows", label = "workflow runner", subs = subs,
    batch_size = self.batch_size, log = opts.log, group = opts.group, migrate = function(s)
      local ok, err = s:migrate()
      if ok then ok, err = wstore._create_tables(s) end
      -- the tables are there: cancel_timer & co. must not migrate again
      -- (in the middle of a batch's transaction)
      if ok then migrated[s] = true end
      return ok, err
    end })
  return self
end

function Runner:_log(fmt, ...)
  if self.log then self.log(fmt:format(...)) end
end

function Runner:_q(sql) return sqlq(self.store, sql) end

function Runner:migrate() return self.engine:migrate() end

function Runner:_ensure() return self.engine:ensure() end

function Runner:_delay(attempt)
  return math.min(self.max_backoff, self.backoff * 2 ^ (attempt - 1))
end

-- Savepoints (PostgreSQL only).
function Runner:_sp(what)
  if self.memory then return true end
  return self.store:query(what .. " es_workflow_event")
end

function Runner:_begin() return util.begin(self.store) end
function Runner:_commit() return util.commit(self.store) end
function Runner:_rollback() util.rollback(self.store) end

-- Failed attempts per (workflow, event) live in <schema>.workflow_attempts,
-- written in the batch's transaction (which commits the events before the
-- failing one), so a runner started after a crash or a restart goes on
-- counting toward max_attempts instead of starting again at one.
-- self.attempts caches which events have a row (loaded once), so a
-- success deletes one only where there is one. Memory stores: the cache is
-- the count.
function Runner:_load_attempts()
  if self.attempts_loaded or self.memory then return true end
  local res, err = self.store:query(self:_q("SELECT workflow, event_id::text AS event_id, attempts "
    .. "FROM <schema>.workflow_attempts"))
  if not res then return nil, err end
  for _, r in ipairs(res) do self.attempts[r.workflow .. "\0" .. r.event_id] = r.attempts end
  self.attempts_loaded = true
  return true
end

function Runner:_count_attempt(wf_name, e, akey, message)
  if self.memory then
    self.attempts[akey] = (self.attempts[akey] or 0) + 1
    return self.attempts[akey]
  end
  local res, err = self.store:query(self:_q("INSERT INTO <schema>.workflow_attempts "
    .. "(workflow, event_id, attempts, last_error) VALUES ($1, $2, 1, $3) "
    .. "ON CONFLICT (workflow, event_id) DO UPDATE SET attempts = workflow_attempts.attempts + 1, "
    .. "last_error = excluded.last_error, updated_at = now() RETURNING attempts"), wf_name, e.id, message)
  if not res then return nil, err end
  self.attempts[akey] = res[1].attempts
  return res[1].attempts
end

function Runner:_forget_attempts(wf_name, e, akey)
  if self.attempts[akey] == nil then return true end
  self.attempts[akey] = nil
  if self.memory then return true end
  return self.store:query(self:_q("DELETE FROM <schema>.workflow_attempts WHERE workflow = $1 "
    .. "AND event_id = $2"), wf_name, e.id)
end

-- The follower's batch work for wf (see eventsourcing.follower): each
-- event under a SAVEPOINT; a failure rolls back to it and either retries
-- later (the events before it commit now) or, after max_attempts, goes to
-- the dead letters and the batch goes on. -> done, info | nil, err
function Runner:_process(wf, batch, n)
  local handled = 0
  local ok, err = self:_load_attempts()
  if not ok then return nil, err end
  local max_attempts = wf.max_attempts or self.max_attempts
  for i = 1, n do
    local e = batch[i]
    if wf.on[e.type] then
      ok, err = self:_sp("SAVEPOINT")
      if not ok then return nil, err end
      local done, ferr = self:_handle(wf, e)
      local akey = wf.name .. "\0" .. e.id
      if done then
        ok, err = self:_sp("RELEASE SAVEPOINT")
        if not ok then return nil, err end
        handled = handled + 1
        ok, err = self:_forget_attempts(wf.name, e, akey)
        if not ok then return nil, err end
      else
        ok, err = self:_sp("ROLLBACK TO SAVEPOINT")
        if not ok then return nil, err end
        if is_connection(ferr) then return nil, ferr end
        local a
        a, err = self:_count_attempt(wf.name, e, akey, message_of(ferr))
        if not a then return nil, err end
        if a >= max_attempts then
          ok, err = self:_forget_attempts(wf.name, e, akey)
          if ok then ok, err = self:_dead_letter(wf.name, e, ferr, a) end
          if not ok then return nil, err end
        else
          self.stats.retried = self.stats.retried + 1
          self:_log("workflow %s: event %s (%s) failed (attempt %d of %d), retrying: %s",
            wf.name, e.id, e.type, a, max_attempts, message_of(ferr))
          self.stats.handled = self.stats.handled + handled
          return i - 1, { handled = handled, delay = self:_delay(a) }
        end
      end
    end
  end
  self.stats.handled = self.stats.handled + handled
  return n, { handled = handled }
end

-- Every workflow up to the store's end, then the due timers; again while
-- that appended events (a workflow's own commands may trigger it: chains
-- settle within one call). -> events handled, timers fired | nil, err
function Runner:catch_up()
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local total, fired = 0, 0
  for _ = 1, 100 do
    local appended = self.stats.appended
    local n
    n, err = self.engine:catch_up()
    if not n then return nil, err end
    total = total + n
    local f
    f, err = self:run_timers()
    if not f then return nil, err end
    fired = fired + f
    if self.engine.stopping or self.stats.appended == appended then break end
  end
  return total, fired
end


-- ---------------------------------------------------------------------------
-- Live

function Runner:stop() self.engine:stop() end

-- Follows live until opts.stop() returns true or runner:stop() is called:
-- catch_up, then wait for the log to move (its head is checked every
-- opts.tick seconds, default 0.005), the next due timer or opts.poll
-- seconds (default 1). Errors go to opts.on_error (default stderr) and
-- are retried with backoff. opts.listen / the `listen` option are
-- accepted and ignored (see eventsourcing.follower).
function Runner:run(opts)
  opts = opts or {}
  local o = setmetatable({ retry = opts.retry or math.max(self.backoff, 0.05),
    on_error = opts.on_error or function(err)
      io.stderr:write(("workflow runner: %s\n"):format(message_of(err)))
    end }, { __index = opts })
  return self.engine:follow(o, function() return self:catch_up() end,
    function() return self:next_timer() end)
end

-- Replays workflow `name` from the first event (or from checkpoint
-- opts.checkpoint): handlers run again, and derived ids make the commands
-- they issued before count as already done.
function Runner:reset(name, opts)
  if not self.by_name[name] then
    error(("runner:reset: no workflow named %s"):format(tostring(name)), 2)
  end
  return self.engine:reset(name, opts and opts.checkpoint)
end

follower.delegate(Runner, "runner", "workflow", { "pause", "resume" })

-- The follower's status rows (see eventsourcing.follower) with the
-- counts of dead letters and pending timers of each workflow.
function Runner:status()
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local out
  out, err = self.engine:status()
  if not out then return nil, err end
  for i, wf in ipairs(self.list) do
    local s = out[i]
    if self.memory then
      local n = 0
      for _, d in ipairs(mem(self.store).dead_letters) do if d.workflow == wf.name then n = n + 1 end end
      s.dead_letters = n
      n = 0
      for _, t in pairs(mem(self.store).timers) do if t.workflow == wf.name then n = n + 1 end end
      s.timers = n
    else
      local rows
      rows, err = self.store:query(self:_q("SELECT "
        .. "(SELECT count(*) FROM <schema>.dead_letters d WHERE d.workflow = $1) AS dead_letters, "
        .. "(SELECT count(*) FROM <schema>.timers t WHERE t.workflow = $1) AS timers"), wf.name)
      if not rows then return nil, err end
      s.dead_letters, s.timers = rows[1].dead_letters, rows[1].timers
    end
  end
  return out
end


util.merge(Runner, require("eventsourcing.workflow_context").runner_methods)
util.merge(Runner, require "eventsourcing.workflow_timers")
util.merge(Runner, require "eventsourcing.workflow_dead_letters")

return M
