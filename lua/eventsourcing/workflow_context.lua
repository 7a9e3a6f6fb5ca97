-- eventsourcing.workflow_context: what a handler can do (ctx:execute,
-- ctx:load, ctx:schedule, ctx:cancel) and how the runner does it: load,
-- decide and append with derived ids, record refusals, write timers.
local core = require "eventsourcing.core"
local aggregate = require "eventsourcing.aggregate"
local repository = require "eventsourcing.repository"
local util = require "eventsourcing.util"
local ids = require "eventsourcing.workflow_ids"
local wstore = require "eventsourcing.workflow_store"

local json = core.json
local now, iso, iso_epoch = util.now, util.iso, util.iso_epoch
local errkind, raise, mem = wstore.errkind, wstore.raise, wstore.mem

local BUSINESS = { rejected = true, invalid = true, not_found = true }

local M = {}
local Runner = {}     -- methods the runner takes in
M.runner_methods = Runner

local Ctx = {}
Ctx.__index = Ctx
M.Ctx = Ctx

local function new_ctx(runner, wf_name, seed, fields)
  local c = setmetatable({ runner = runner, store = runner.store, workflow = wf_name,
    seed = seed, step = 0 }, Ctx)
  for k, v in pairs(fields) do c[k] = v end
  return c
end

function Ctx:execute(A, id, command_name, command, opts)
  self.step = self.step + 1
  return self.runner:_execute(self, A, id, command_name, command, self.step, opts)
end

function Ctx:load(A, id, opts)
  local state, version = self.runner.repo:load(A, id, opts)
  if not state then raise(version) end
  return state, version
end

-- ctx:schedule(delay_seconds | iso_instant, A, id, command_name, command [, key]) -> key
function Ctx:schedule(when, A, id, command_name, command, key)
  self.step = self.step + 1
  return self.runner:_schedule(self, when, A, id, command_name, command, key, self.step)
end

-- ctx:cancel(key): removes a pending timer (in the batch's transaction).
function Ctx:cancel(key)
  local ok, err = wstore.cancel_timer(self.store, key)
  if not ok then raise(err) end
  return true
end


-- The registry name of an aggregate (for timers).
function Runner:_aggregate_name(A)
  for k, v in pairs(self.aggregates) do
    if v == A then return k end
  end
end

local function copy(t) return util.merge({}, t) end

-- Records a refused command (idempotent per workflow, event, step).
function Runner:_reject(ctx, step, A, id, command_name, command, err)
  local reason = type(err) == "table" and err.message or tostring(err)
  local kind = errkind(err) or "rejected"
  self.stats.rejected = self.stats.rejected + 1
  self:_log("workflow %s: %s %s-%s refused: %s", ctx.workflow, command_name, A.name, id, reason)
  if self.memory then
    local list = mem(self.store).rejections
    for _, r in ipairs(list) do
      if r.workflow == ctx.workflow and r.event_id == ctx.trigger_id and r.step == step then return end
    end
    list[#list + 1] = { workflow = ctx.workflow, event_id = ctx.trigger_id, step = step,
      event_type = ctx.trigger_type, event_stream = ctx.trigger_stream,
      event_position = ctx.trigger_position, aggregate = A.name, aggregate_id = id,
      command = command_name, payload = command, kind = kind, reason = reason,
      correlation_id = ctx.correlation_id, recorded_at = iso(now()) }
    return
  end
  local ok, qerr = self.store:query(self:_q([[INSERT INTO <schema>.workflow_rejections
      (workflow, event_id, step, event_type, event_stream, event_position, aggregate,
       aggregate_id, command, payload, kind, reason, correlation_id)
      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::json, $11, $12, $13)
      ON CONFLICT (workflow, event_id, step) DO NOTHING]]),
    ctx.workflow, ctx.trigger_id, step, ctx.trigger_type, ctx.trigger_stream,
    ctx.trigger_position, A.name, id, command_name, json.encode(command or json.object {}),
    kind, reason, ctx.correlation_id)
  if not ok then raise(qerr) end
end

-- A conflict that aborted the transaction it happened in (deciding again
-- cannot help): err.reason from the C core, else a database sqlstate (a
-- plain expected-version conflict has none).
local function tx_aborted(err)
  -- "order" (the stream-order rule) always aborts the transaction too
  if err.reason then return err.reason == "tx_aborted" or err.reason == "order" end
  return err.sqlstate ~= nil
end

-- Whether append failed because our derived ids are taken already (an
-- earlier run of this very step appended them): err.reason "id_taken";
-- without it, an "invalid" refusal is checked against the stream itself,
-- never against the message's words.
function Runner:_ids_taken(err, stream, first_id)
  if errkind(err) ~= "invalid" then return false end
  if err.reason then return err.reason == "id_taken" end
  local it = self.store:read(stream, { backward = true })
  if not it then return false end
  for e in it do
    if e.id == first_id then return true end
  end
  return false
end

-- ctx:execute: load, decide, append with derived ids (see the header).
function Runner:_execute(ctx, A, id, command_name, command, step, opts)
  if getmetatable(A) ~= aggregate.Aggregate then
    error("ctx:execute: expected an aggregate (es.aggregate{...})", 3)
  end
  if not A:handles(command_name) then
    error(("%s: unknown command '%s'"):format(A.name, tostring(command_name)), 3)
  end
  local store, repo = self.store, self.repo
  local stream = A:stream(id)
  local base = copy(opts and opts.metadata)
  base.correlation_id = ctx.correlation_id
  base.causation_id = ctx.causation_id
  base.workflow = ctx.workflow
  base.command = command_name
  if ctx.timer then base.timer = ctx.timer end
  local attempt = 0
  while true do
    local state, version = repo:load(A, id)
    if not state then raise(version) end
    local events, err = A:decide(state, command_name, command)
    if not events then
      if not BUSINESS[errkind(err) or "rejected"] then raise(err) end
      self:_reject(ctx, step, A, id, command_name, command, err)
      return nil, err
    end
    if #events == 0 then return { version = version, events = events, state = state } end
    local out = repository.events_to_append(A, stream, version, base, events,
      function(i) return ids.derive_id(ctx.seed, "", step, i) end)
    local res, aerr = store:append(stream, out, { expected_version = version })
    if res and res.version == version + #out then
      repository.stamp(out, res)
      if self.read_models then
        local ok, rerr = require("eventsourcing.read_model").apply_inline(store, self.read_models, out)
        if not ok then raise(rerr) end
      end
      self.stats.appended = self.stats.appended + #out
      return { version = res.version, position = res.position, events = out,
               state = A:evolve(state, out) }
    end
    if res or self:_ids_taken(aerr, stream, out[1].id) then
      -- an earlier run of this very step appended these ids already
      self.stats.already_done = self.stats.already_done + 1
      local s2, v2 = repo:load(A, id)
      if not s2 then raise(v2) end
      return { version = v2, events = {}, state = s2, already_done = true }
    end
    if errkind(aerr) ~= "conflict" or attempt >= self.max_retries or tx_aborted(aerr) then
      raise(aerr)
    end
    attempt = attempt + 1
  end
end

function Runner:_schedule(ctx, when, A, id, command_name, command, key, step)
  if getmetatable(A) ~= aggregate.Aggregate then
    error("ctx:schedule: expected an aggregate (es.aggregate{...})", 3)
  end
  if not A:handles(command_name) then
    error(("%s: unknown command '%s'"):format(A.name, tostring(command_name)), 3)
  end
  A:stream(id)   -- checks the id
  local name = self:_aggregate_name(A)
  if not name then
    error(("ctx:schedule: aggregate %s is not registered: pass it in the runner's aggregates"):format(A.name), 3)
  end
  if type(when) ~= "number" and type(when) ~= "string" then
    error("ctx:schedule: when must be a delay in seconds or an ISO-8601 instant", 3)
  end
  if type(when) == "string" and not iso_epoch(when) then
    error("ctx:schedule: cannot read the instant " .. when, 3)
  end
  if key ~= nil and (type(key) ~= "string" or key == "") then
    error("ctx:schedule: key must be a non-empty string", 3)
  end
  local timer_id = ids.derive_id(ctx.seed, "timer", step, 0)
  key = key or ("%s:%s:%d"):format(ctx.workflow, ctx.trigger_id or timer_id, step)
  local base = ctx.base_time     -- ISO-8601: the triggering event's recorded_at
  if self.memory then
    local due
    if type(when) == "number" then due = (iso_epoch(base) or now()) + when else due = iso_epoch(when) end
    mem(self.store).timers[key] = { key = key, id = timer_id, workflow = ctx.workflow, due = due,
      due_at = iso(due), aggregate = name, aggregate_id = id, command = command_name,
      payload = command or {}, correlation_id = ctx.correlation_id,
      causation_id = ctx.causation_id, attempts = 0 }
    return key
  end
  local p1, p2 = base, when
  if type(when) == "string" then p1, p2 = when, 0 end
  local ok, err = self.store:query(self:_q([[INSERT INTO <schema>.timers
      (key, id, workflow, due_at, aggregate, aggregate_id, command, payload, correlation_id, causation_id)
      VALUES ($1, $2, $3, coalesce($10::timestamptz, clock_timestamp()) + $11::float8 * interval '1 second',
              $4, $5, $6, $7::json, $8, $9)
      ON CONFLICT (key) DO UPDATE SET id = excluded.id, workflow = excluded.workflow,
      due_at = excluded.due_at, aggregate = excluded.aggregate, aggregate_id = excluded.aggregate_id,
      command = excluded.command, payload = excluded.payload, correlation_id = excluded.correlation_id,
      causation_id = excluded.causation_id, attempts = 0, last_error = NULL]]),
    key, timer_id, ctx.workflow, name, id, command_name, json.encode(command or json.object {}),
    ctx.correlation_id, ctx.causation_id, p1, p2)
  if not ok then raise(err) end
  return key
end

local function event_ctx(self, wf, e)
  local meta = type(e.metadata) == "table" and e.metadata or {}
  local corr = meta.correlation_id
  if type(corr) ~= "string" then corr = e.id end
  return new_ctx(self, wf.name, wf.name .. "\0" .. e.id, {
    event = e, trigger_id = e.id, trigger_type = e.type, trigger_stream = e.stream,
    trigger_position = e.position, correlation_id = corr, causation_id = e.id,
    base_time = e.recorded_at })
end

local function traceback(err)
  if type(err) == "table" then return err end
  return debug.traceback(tostring(err), 2)
end

-- Runs the handler of wf for event e: true | false, err
function Runner:_handle(wf, e)
  local h = wf.on[e.type]
  local ctx = event_ctx(self, wf, e)
  local ok, err = xpcall(h, traceback, e, ctx)
  if ok then return true end
  return false, err
end

M.new_ctx, M.traceback = new_ctx, traceback

return M
