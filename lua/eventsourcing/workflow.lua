-- eventsourcing.workflow: event-driven workflows (process managers).
--
--   local fulfilment = es.workflow {
--     name = "order-fulfilment",
--     on = {
--       OrderPlaced = function(event, ctx)
--         local r, err = ctx:execute(Inventory, "p1", "ReserveStock", { order_id = ..., quantity = 2 })
--         ctx:schedule(3600, Order, id, "ExpireDraft", {}, "expire:" .. id)   -- a timer
--         ctx:cancel("expire:" .. id)
--       end,
--     },
--   }
--   local runner = es.workflow.runner(store, { fulfilment }, {
--     aggregates  = { Order = Order, Inventory = Inventory },  -- timers find them by name
--     read_models = { Orders },      -- inline read models updated with the appends
--     batch_size = 50, max_attempts = 5, backoff = 0.05, max_backoff = 5,
--     listen = url_or_store,         -- as es.projector; false: poll only
--     log = function(line) end,
--   })
--   runner:catch_up()        -- every workflow up to the store's end + due timers
--   runner:run { poll = 1, stop = function() return done end }
--   runner:run_timers()      -- due timers only
--   runner:retry_dead_letters()  -> { retried = n, failed = n }
--   runner:status()
--   es.workflow.trace(store, correlation_id)  -> events of one chain, in order
--   es.workflow.cancel_timer(store, key)      -> true, removed
--   es.workflow.timers(store) / dead_letters(store [, workflow]) /
--   rejections(store [, workflow])            -> arrays of rows
--
-- Handlers: on[type](event, ctx). ctx:execute(A, id, command, data [, { metadata }])
-- loads A, decides and appends like repository:execute and returns
-- { version, position, events, state, already_done } or nil, err for a
-- business refusal (err.kind "rejected", "invalid" or "not_found"), which
-- is also recorded in <schema>.workflow_rejections. Any other failure
-- (connection, database, conflict beyond retries) raises: the event is
-- retried with backoff, and after max_attempts it goes to
-- <schema>.dead_letters while the workflow goes on with the next events.
-- A handler that raises is treated the same way.
--
-- Events appended by a workflow carry metadata correlation_id (the
-- triggering event's, or its id when it has none), causation_id (the
-- triggering event's id), workflow (the name) and command.
--
-- Exactly once, on PostgreSQL: each batch is ONE transaction on the
-- store's session: lock the workflow's checkpoint row in
-- <schema>.workflows (FOR UPDATE SKIP LOCKED: the lease; a second process
-- skips it), read the events after that checkpoint, run the handlers (each
-- event under a SAVEPOINT), append their commands' events, write timers,
-- rejections and dead letters, move the checkpoint, commit. Effects and
-- checkpoint commit together or not at all, so a crash (even kill -9)
-- anywhere leaves either the whole batch done or none of it. On top of
-- that, every event a workflow appends has an id derived from (workflow
-- name, triggering event id, step number, index) - a name-based UUID
-- (version 5, SHA-1, RFC 4122) - so running an event again after a replay
-- (a reset checkpoint, a dead letter retried, a memory store) appends
-- nothing twice: the store accepts the same ids at the same versions as an
-- idempotent success, and when the command is decided again on a newer
-- state the ids are found at their old versions ("already used"); both
-- count as "already done" (result.already_done = true).
--
-- Memory stores have no transactions: checkpoints, timers, rejections and
-- dead letters live in Lua tables and effects happen at once; the derived
-- ids make re-running an event harmless, so the same guarantees hold within
-- one process (a memory store does not outlive it anyway).
--
-- Timers: ctx:schedule(delay_seconds | "ISO-8601 instant", A, id, command,
-- data [, key]) writes a row of <schema>.timers (key unique; due_at =
-- the triggering event's recorded_at + delay, so a replay schedules the
-- same instant) in the batch's transaction. run_timers() takes due rows
-- FOR UPDATE SKIP LOCKED, executes each command and deletes the row in one
-- transaction, with event ids derived from the timer's id: a timer fires
-- exactly once, whoever runs it and whatever crashes. A timer command
-- that keeps failing goes to the dead letters too. A is looked up by its
-- key in opts.aggregates (register every aggregate a timer uses).
local core = require "eventsourcing.core"
local aggregate = require "eventsourcing.aggregate"

local json = core.json
local M = {}

-- ---------------------------------------------------------------------------
-- Name-based UUIDs: SHA-1 in pure Lua (5.4 operators or LuaJIT's bit).

local band, bor, bxor, bnot, lshift, rshift
do
  local native = load and load([[
    return function(a, b) return a & b end, function(a, b) return a | b end,
      function(a, b) return a ~ b end, function(a) return (~a) & 0xffffffff end,
      function(a, n) return (a << n) & 0xffffffff end,
      function(a, n) return (a & 0xffffffff) >> n end]])
  if native then
    band, bor, bxor, bnot, lshift, rshift = native()
  else
    local bit = require "bit"
    local function u(x) return x % 4294967296 end
    band = function(a, b) return u(bit.band(a, b)) end
    bor = function(a, b) return u(bit.bor(a, b)) end
    bxor = function(a, b) return u(bit.bxor(a, b)) end
    bnot = function(a) return u(bit.bnot(a)) end
    lshift = function(a, n) return u(bit.lshift(a, n)) end
    rshift = function(a, n) return u(bit.rshift(a, n)) end
  end
end

local TWO32 = 4294967296

local function rol(x, n) return bor(lshift(x, n), rshift(x, 32 - n)) end

local function hex32(x)
  return ("%04x%04x"):format(math.floor(x / 65536), x % 65536)
end

-- SHA-1 of a string, as 40 hex digits.
function M.sha1(msg)
  local h0, h1, h2, h3, h4 = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0
  local len = #msg
  local bits = len * 8
  local tail = {}
  for k = 7, 0, -1 do tail[#tail + 1] = string.char(math.floor(bits / 256 ^ k) % 256) end
  msg = msg .. "\128" .. ("\0"):rep((55 - len) % 64) .. table.concat(tail)
  local w = {}
  for chunk = 1, #msg, 64 do
    for i = 0, 15 do
      local a, b, c, d = msg:byte(chunk + i * 4, chunk + i * 4 + 3)
      w[i] = ((a * 256 + b) * 256 + c) * 256 + d
    end
    for i = 16, 79 do
      w[i] = rol(bxor(bxor(w[i - 3], w[i - 8]), bxor(w[i - 14], w[i - 16])), 1)
    end
    local a, b, c, d, e = h0, h1, h2, h3, h4
    for i = 0, 79 do
      local f, k
      if i < 20 then
        f, k = bor(band(b, c), band(bnot(b), d)), 0x5A827999
      elseif i < 40 then
        f, k = bxor(bxor(b, c), d), 0x6ED9EBA1
      elseif i < 60 then
        f, k = bor(bor(band(b, c), band(b, d)), band(c, d)), 0x8F1BBCDC
      else
        f, k = bxor(bxor(b, c), d), 0xCA62C1D6
      end
      local t = (rol(a, 5) + f + e + k + w[i]) % TWO32
      e, d, c, b, a = d, c, rol(b, 30), a, t
    end
    h0, h1, h2 = (h0 + a) % TWO32, (h1 + b) % TWO32, (h2 + c) % TWO32
    h3, h4 = (h3 + d) % TWO32, (h4 + e) % TWO32
  end
  return hex32(h0) .. hex32(h1) .. hex32(h2) .. hex32(h3) .. hex32(h4)
end

local function uuid_bytes(u)
  local hex = u:gsub("-", "")
  return (hex:gsub("..", function(h) return string.char(tonumber(h, 16)) end))
end

-- RFC 4122 version 5 UUID of `name` in namespace `ns` (a UUID string).
function M.uuid5(ns, name)
  local h = M.sha1(uuid_bytes(ns) .. name)
  local b6 = tonumber(h:sub(13, 14), 16) % 16 + 0x50
  local b8 = tonumber(h:sub(17, 18), 16) % 64 + 0x80
  h = h:sub(1, 12) .. ("%02x"):format(b6) .. h:sub(15, 16) .. ("%02x"):format(b8) .. h:sub(19, 32)
  return ("%s-%s-%s-%s-%s"):format(h:sub(1, 8), h:sub(9, 12), h:sub(13, 16), h:sub(17, 20), h:sub(21, 32))
end

-- The namespace of workflow ids: uuid5(NAMESPACE_URL, "eventsourcing:workflow").
M.NAMESPACE = M.uuid5("6ba7b811-9dad-11d1-80b4-00c04fd430c8", "eventsourcing:workflow")

-- The id of event `index` of the command issued at `step` by workflow
-- `name` while handling the event with id `trigger`.
function M.derive_id(name, trigger, step, index)
  return M.uuid5(M.NAMESPACE, ("%s\0%s\0%s\0%s"):format(name, trigger, step, index or 1))
end

-- ---------------------------------------------------------------------------
-- Helpers

local util = require "eventsourcing.util"
local repository = require "eventsourcing.repository"
local sleep = util.sleep
M.sleep = sleep
local now = util.now          -- wall clock, seconds
M.now = now
local iso_epoch = util.iso_epoch
M.iso_epoch = iso_epoch
local iso = util.iso

local is_memory = util.is_memory

local function quote_ident(s) return '"' .. tostring(s):gsub('"', '""') .. '"' end

local function sqlq(store, sql)
  return (sql:gsub("<schema>", quote_ident(store:schema())))
end

local function errkind(err) return type(err) == "table" and err.kind or nil end

local function is_connection(err) return errkind(err) == "connection" end

local function message_of(err)
  if type(err) == "table" and err.message then
    return ("%s: %s"):format(tostring(err.kind), tostring(err.message))
  end
  return tostring(err)
end

local function raise(err) error(err, 0) end

local BUSINESS = { rejected = true, invalid = true, not_found = true }

local ts = util.ts_sql

-- Memory stores: everything in Lua, weak-keyed by store.
local mem_states = setmetatable({}, { __mode = "k" })
local function mem(store)
  local s = mem_states[store]
  if not s then
    s = { checkpoints = {}, timers = {}, rejections = {}, dead_letters = {} }
    mem_states[store] = s
  end
  return s
end

local function mem_checkpoint(store, name)
  local cps = mem(store).checkpoints
  local c = cps[name]
  if not c then c = { position = 0, handled = 0 }; cps[name] = c end
  return c
end

-- ---------------------------------------------------------------------------
-- Schema

local TABLES = {
  [[CREATE TABLE IF NOT EXISTS <schema>.workflows (
      name text PRIMARY KEY,
      checkpoint text,
      position bigint NOT NULL DEFAULT 0,
      handled bigint NOT NULL DEFAULT 0,
      updated_at timestamptz NOT NULL DEFAULT now())]],
  [[CREATE TABLE IF NOT EXISTS <schema>.workflow_rejections (
      id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      workflow text NOT NULL,
      event_id uuid NOT NULL,
      step integer NOT NULL,
      event_type text,
      event_stream text,
      event_position bigint,
      aggregate text,
      aggregate_id text,
      command text,
      payload json,
      kind text,
      reason text,
      correlation_id text,
      recorded_at timestamptz NOT NULL DEFAULT now(),
      UNIQUE (workflow, event_id, step))]],
  [[CREATE TABLE IF NOT EXISTS <schema>.dead_letters (
      workflow text NOT NULL,
      event_id uuid NOT NULL,
      position bigint,
      type text,
      stream text,
      version bigint,
      error text,
      attempts integer NOT NULL DEFAULT 0,
      first_failed_at timestamptz NOT NULL DEFAULT now(),
      failed_at timestamptz NOT NULL DEFAULT now(),
      timer json,
      PRIMARY KEY (workflow, event_id))]],
  [[CREATE TABLE IF NOT EXISTS <schema>.timers (
      key text PRIMARY KEY,
      id uuid NOT NULL,
      workflow text,
      due_at timestamptz NOT NULL,
      aggregate text NOT NULL,
      aggregate_id text NOT NULL,
      command text NOT NULL,
      payload json NOT NULL,
      correlation_id text,
      causation_id text,
      attempts integer NOT NULL DEFAULT 0,
      last_error text,
      created_at timestamptz NOT NULL DEFAULT now())]],
  "CREATE INDEX IF NOT EXISTS timers_due_at ON <schema>.timers (due_at)",
  -- trace(): every event of one correlation id
  "CREATE INDEX IF NOT EXISTS events_correlation_id ON <schema>.events ((metadata->>'correlation_id'))",
}

local migrated = setmetatable({}, { __mode = "k" })

-- Creates the workflow tables (idempotent; also creates the store's own).
-- names: workflow names whose checkpoint rows to create.
function M.migrate(store, names)
  if is_memory(store) then
    for _, n in ipairs(names or {}) do mem_checkpoint(store, n) end
    migrated[store] = true
    return true
  end
  local ok, err = store:migrate()
  if not ok then return nil, err end
  ok, err = store:begin()
  if not ok then return nil, err end
  local function step(r, e)
    if not r then store:rollback(); err = e end
    return r
  end
  if not step(store:query("SELECT pg_advisory_xact_lock(hashtext('eventsourcing.workflows:' || $1)) IS NULL AS x",
      store:schema())) then return nil, err end
  for _, sql in ipairs(TABLES) do
    if not step(store:query(sqlq(store, sql))) then return nil, err end
  end
  for _, n in ipairs(names or {}) do
    if not step(store:query(sqlq(store,
        "INSERT INTO <schema>.workflows (name) VALUES ($1) ON CONFLICT DO NOTHING"), n)) then
      return nil, err
    end
  end
  ok, err = store:commit()
  if not ok then return nil, err end
  migrated[store] = true
  return true
end

local function ensure(store)
  if migrated[store] then return true end
  return M.migrate(store)
end

-- ---------------------------------------------------------------------------
-- Definitions

local Workflow = {}
Workflow.__index = Workflow
M.Workflow = Workflow

function M.new(def)
  if type(def) ~= "table" then error("es.workflow: expected a definition table", 2) end
  if type(def.name) ~= "string" or not def.name:match("^[%w_.:%-]+$") or #def.name > 200 then
    error("es.workflow: name must be a string of letters, digits, '_', '.', ':' or '-'", 2)
  end
  if type(def.on) ~= "table" then error(("es.workflow %s: on must be a table"):format(def.name), 2) end
  local on, types = {}, {}
  for t, f in pairs(def.on) do
    if type(t) ~= "string" or type(f) ~= "function" then
      error(("es.workflow %s: on.%s must be a function(event, ctx)"):format(def.name, tostring(t)), 2)
    end
    on[t] = f
    types[#types + 1] = t
  end
  table.sort(types)
  return setmetatable({ name = def.name, on = on, types = types,
    max_attempts = def.max_attempts }, Workflow)
end

function Workflow:__tostring() return "workflow " .. self.name end

function Workflow:runner(store, opts) return M.runner(store, { self }, opts) end

-- ---------------------------------------------------------------------------
-- The context handlers get

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
  local ok, err = M.cancel_timer(self.store, key)
  if not ok then raise(err) end
  return true
end

-- ---------------------------------------------------------------------------
-- The runner

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

function M.runner(store, workflows, opts)
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
  return setmetatable({
    store = store, list = list, by_name = by_name, aggregates = aggregates,
    read_models = opts.read_models and #opts.read_models > 0 and opts.read_models or nil,
    repo = repo, memory = is_memory(store),
    batch_size = num_opt(opts, "batch_size", 50, 1),
    max_attempts = num_opt(opts, "max_attempts", 5, 1),
    backoff = num_opt(opts, "backoff", 0.05, 0),
    max_backoff = num_opt(opts, "max_backoff", 5, 0),
    max_retries = num_opt(opts, "max_retries", 3, 0),
    timer_batch = num_opt(opts, "timer_batch", 100, 1),
    listen_opt = opts.listen, log = opts.log,
    attempts = {}, migrated = false, stopping = false,
    stats = { handled = 0, appended = 0, already_done = 0, rejected = 0, retried = 0,
              dead_lettered = 0, timers_fired = 0 },
  }, Runner)
end

function Runner:_log(fmt, ...)
  if self.log then self.log(fmt:format(...)) end
end

function Runner:_q(sql) return sqlq(self.store, sql) end

function Runner:migrate()
  local names = {}
  for _, wf in ipairs(self.list) do names[#names + 1] = wf.name end
  local ok, err = M.migrate(self.store, names)
  if ok then self.migrated = true end
  return ok, err
end

function Runner:_ensure()
  if self.migrated then return true end
  return self:migrate()
end

function Runner:_delay(attempt)
  return math.min(self.max_backoff, self.backoff * 2 ^ (attempt - 1))
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
      function(i) return M.derive_id(ctx.seed, "", step, i) end)
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
    if res or (errkind(aerr) == "invalid" and tostring(aerr.message):find("already used", 1, true)) then
      -- an earlier run of this very step appended these ids already
      self.stats.already_done = self.stats.already_done + 1
      local s2, v2 = repo:load(A, id)
      if not s2 then raise(v2) end
      return { version = v2, events = {}, state = s2, already_done = true }
    end
    if errkind(aerr) ~= "conflict" or attempt >= self.max_retries
        or tostring(aerr.message):find("aborted", 1, true) then
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
  local timer_id = M.derive_id(ctx.seed, "timer", step, 0)
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

-- Savepoints (PostgreSQL only).
function Runner:_sp(what)
  if self.memory then return true end
  return self.store:query(what .. " es_workflow_event")
end

function Runner:_save(wf, checkpoint, position, handled)
  if self.memory then
    local c = mem_checkpoint(self.store, wf.name)
    c.checkpoint, c.position, c.handled = checkpoint, position, c.handled + handled
    return true
  end
  return self.store:query(self:_q("UPDATE <schema>.workflows SET checkpoint = $2, position = $3, "
    .. "handled = handled + $4, updated_at = now() WHERE name = $1"), wf.name, checkpoint, position, handled)
end

function Runner:_dead_letter(wf_name, e, err, attempts, timer)
  local message = message_of(err)
  self.stats.dead_lettered = self.stats.dead_lettered + 1
  self:_log("workflow %s: event %s (%s, position %s) goes to the dead letters after %d attempts: %s",
    wf_name, tostring(e.id), tostring(e.type), tostring(e.position), attempts, message)
  if self.memory then
    local dl = mem(self.store).dead_letters
    for _, d in ipairs(dl) do
      if d.workflow == wf_name and d.event_id == e.id then
        d.error, d.attempts, d.failed_at = message, d.attempts + attempts, iso(now())
        return true
      end
    end
    dl[#dl + 1] = { workflow = wf_name, event_id = e.id, position = e.position, type = e.type,
      stream = e.stream, version = e.version, error = message, attempts = attempts,
      first_failed_at = iso(now()), failed_at = iso(now()), timer = timer }
    return true
  end
  return self.store:query(self:_q([[INSERT INTO <schema>.dead_letters
      (workflow, event_id, position, type, stream, version, error, attempts, timer)
      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::json)
      ON CONFLICT (workflow, event_id) DO UPDATE SET error = excluded.error,
      attempts = dead_letters.attempts + excluded.attempts, failed_at = now()]]),
    wf_name, e.id, e.position, e.type, e.stream, e.version, message, attempts,
    timer and json.encode(timer) or nil)
end

function Runner:_begin() return util.begin(self.store) end
function Runner:_commit() return util.commit(self.store) end
function Runner:_rollback() util.rollback(self.store) end

-- Locks the checkpoint row: row | false (leased elsewhere) | nil, err
function Runner:_lock(wf)
  if self.memory then
    local c = mem_checkpoint(self.store, wf.name)
    return { checkpoint = c.checkpoint }
  end
  local ok, err = self.store:begin()
  if not ok then return nil, err end
  local rows
  rows, err = self.store:query(self:_q("SELECT checkpoint FROM <schema>.workflows WHERE name = $1 "
    .. "FOR UPDATE SKIP LOCKED"), wf.name)
  if not rows then self:_rollback(); return nil, err end
  if #rows == 0 then self:_rollback(); return false end
  return rows[1]
end

-- One batch of workflow wf: handled, "more" | "idle" | "locked" | nil, err
function Runner:_batch(wf)
  local store, limit = self.store, self.batch_size
  local row, err = self:_lock(wf)
  if row == nil then return nil, err end
  if row == false then return 0, "locked" end
  local batch, cp = store:read_all({ after = row.checkpoint, limit = limit })
  if not batch then self:_rollback(); return nil, cp end
  if #batch == 0 then self:_rollback(); return 0, "idle" end
  local handled, ok = 0
  local max_attempts = wf.max_attempts or self.max_attempts
  for i, e in ipairs(batch) do
    if wf.on[e.type] then
      ok, err = self:_sp("SAVEPOINT")
      if not ok then self:_rollback(); return nil, err end
      local done, ferr = self:_handle(wf, e)
      local akey = wf.name .. "\0" .. e.id
      if done then
        ok, err = self:_sp("RELEASE SAVEPOINT")
        if not ok then self:_rollback(); return nil, err end
        handled = handled + 1
        self.attempts[akey] = nil
      else
        ok, err = self:_sp("ROLLBACK TO SAVEPOINT")
        if not ok or is_connection(ferr) then self:_rollback(); return nil, is_connection(ferr) and ferr or err end
        local n = (self.attempts[akey] or 0) + 1
        if n >= max_attempts then
          self.attempts[akey] = nil
          ok, err = self:_dead_letter(wf.name, e, ferr, n)
          if not ok then self:_rollback(); return nil, err end
        else
          -- commit the events before this one, then retry it after a pause
          self.attempts[akey] = n
          self.stats.retried = self.stats.retried + 1
          self:_log("workflow %s: event %s (%s) failed (attempt %d of %d), retrying: %s",
            wf.name, e.id, e.type, n, max_attempts, message_of(ferr))
          if i > 1 then
            local pre, pcp = store:read_all({ after = row.checkpoint, limit = i - 1 })
            if not pre then self:_rollback(); return nil, pcp end
            ok, err = self:_save(wf, pcp, pre[#pre].position, handled)
            if not ok then self:_rollback(); return nil, err end
            ok, err = self:_commit()
            if not ok then return nil, err end
          else
            self:_rollback()
          end
          sleep(self:_delay(n))
          return handled, "more"
        end
      end
    end
  end
  ok, err = self:_save(wf, cp, batch[#batch].position, handled)
  if not ok then self:_rollback(); return nil, err end
  ok, err = self:_commit()
  if not ok then return nil, err end
  self.stats.handled = self.stats.handled + handled
  return handled, #batch < limit and "idle" or "more"
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
    local active = {}
    for _, wf in ipairs(self.list) do active[#active + 1] = wf end
    while #active > 0 and not self.stopping do
      local next_active = {}
      for _, wf in ipairs(active) do
        local n, st = self:_batch(wf)
        if not n then return nil, st end
        total = total + n
        if st == "more" then next_active[#next_active + 1] = wf end
      end
      active = next_active
    end
    local f
    f, err = self:run_timers()
    if not f then return nil, err end
    fired = fired + f
    if self.stopping or self.stats.appended == appended then break end
  end
  return total, fired
end

-- ---------------------------------------------------------------------------
-- Timers

local function timer_ctx(self, t)
  return new_ctx(self, t.workflow or "timers", "timer\0" .. t.id, {
    timer = t.key, trigger_id = t.id, trigger_type = "timer", trigger_stream = nil,
    correlation_id = t.correlation_id or t.id, causation_id = t.causation_id or t.id })
end

-- Executes one timer: true | false, err
function Runner:_fire(t)
  local A = self.aggregates[t.aggregate]
  if not A then
    return false, core.error("invalid", ("timer %s: aggregate %s is not registered with this runner")
      :format(t.key, tostring(t.aggregate)))
  end
  local ctx = timer_ctx(self, t)
  local ok, err = xpcall(function()
    return self:_execute(ctx, A, t.aggregate_id, t.command, t.payload, 1)
  end, traceback)
  if ok then return true end
  return false, err
end

local function timer_event(t, A)
  return { id = t.id, type = "timer:" .. t.command, position = nil,
    stream = (A and A.prefix or (t.aggregate .. "-")) .. t.aggregate_id, version = nil }
end

-- Fires the due timers (each exactly once): -> fired | nil, err
function Runner:run_timers()
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local store, fired = self.store, 0
  if self.memory then
    local timers, due = mem(store).timers, {}
    local t_now = now()
    for _, t in pairs(timers) do if t.due <= t_now then due[#due + 1] = t end end
    table.sort(due, function(a, b) return a.due < b.due end)
    for _, t in ipairs(due) do
      local done, ferr = self:_fire(t)
      if done then
        timers[t.key] = nil
        fired = fired + 1
      else
        t.attempts = t.attempts + 1
        t.last_error = message_of(ferr)
        if t.attempts >= self.max_attempts then
          timers[t.key] = nil
          self:_dead_letter(t.workflow or "timers", timer_event(t, self.aggregates[t.aggregate]),
            ferr, t.attempts, t)
        else
          t.due = now() + self:_delay(t.attempts)
        end
      end
    end
    self.stats.timers_fired = self.stats.timers_fired + fired
    return fired
  end
  while true do
    ok, err = store:begin()
    if not ok then return nil, err end
    local rows
    rows, err = store:query(self:_q("SELECT key, id, workflow, aggregate, aggregate_id, command, payload, "
      .. "correlation_id, causation_id, attempts, " .. ts("due_at") .. " FROM <schema>.timers "
      .. "WHERE due_at <= clock_timestamp() ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED"), self.timer_batch)
    if not rows then self:_rollback(); return nil, err end
    if #rows == 0 then self:_rollback(); break end
    local batch_fired = 0
    for _, t in ipairs(rows) do
      ok, err = self:_sp("SAVEPOINT")
      if not ok then self:_rollback(); return nil, err end
      local done, ferr = self:_fire(t)
      if done then
        ok, err = self:_sp("RELEASE SAVEPOINT")
        if ok then ok, err = store:query(self:_q("DELETE FROM <schema>.timers WHERE key = $1"), t.key) end
        if not ok then self:_rollback(); return nil, err end
        batch_fired = batch_fired + 1
      else
        ok, err = self:_sp("ROLLBACK TO SAVEPOINT")
        if not ok or is_connection(ferr) then self:_rollback(); return nil, is_connection(ferr) and ferr or err end
        local n = t.attempts + 1
        if n >= self.max_attempts then
          t.attempts = n
          ok, err = self:_dead_letter(t.workflow or "timers", timer_event(t, self.aggregates[t.aggregate]), ferr, n, t)
          if ok then ok, err = store:query(self:_q("DELETE FROM <schema>.timers WHERE key = $1"), t.key) end
        else
          self:_log("timer %s failed (attempt %d of %d): %s", t.key, n, self.max_attempts, message_of(ferr))
          ok, err = store:query(self:_q("UPDATE <schema>.timers SET attempts = $2, last_error = $3, "
            .. "due_at = clock_timestamp() + $4::float8 * interval '1 second' WHERE key = $1"),
            t.key, n, message_of(ferr), self:_delay(n))
        end
        if not ok then self:_rollback(); return nil, err end
      end
    end
    ok, err = store:commit()
    if not ok then return nil, err end
    fired = fired + batch_fired
    if #rows < self.timer_batch then break end
  end
  self.stats.timers_fired = self.stats.timers_fired + fired
  return fired
end

-- Seconds until the next timer is due (nil: none).
function Runner:next_timer()
  if self.memory then
    local first
    for _, t in pairs(mem(self.store).timers) do
      if not first or t.due < first then first = t.due end
    end
    return first and math.max(0, first - now()) or nil
  end
  local rows = self.store:query(self:_q("SELECT extract(epoch FROM min(due_at) - clock_timestamp())::float8 AS s "
    .. "FROM <schema>.timers"))
  local s = rows and rows[1] and rows[1].s
  return s and math.max(0, s) or nil
end

-- ---------------------------------------------------------------------------
-- Dead letters

local function read_event(store, stream, version, id)
  local it, err = store:read(stream, { from = version, to = version, limit = 1 })
  if not it then return nil, err end
  for e in it do
    if e.id == id then return e end
  end
  return nil, core.error("not_found", ("event %s (stream %s, version %s) not found")
    :format(tostring(id), tostring(stream), tostring(version)))
end

-- Runs the dead letters of this runner's workflows again (oldest event
-- first), once each: a success removes the dead letter, a failure
-- updates it (attempts, error). Dead timers are put back as due now.
-- opts.workflow: only that workflow's. -> { retried = n, failed = n } | nil, err
function Runner:retry_dead_letters(opts)
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local only = opts and opts.workflow
  local store = self.store
  local list
  list, err = M.dead_letters(store, only)
  if not list then return nil, err end
  local out = { retried = 0, failed = 0 }
  for _, d in ipairs(list) do
    local wf = self.by_name[d.workflow]
    if d.timer then
      local t = d.timer
      if self.memory then
        local ts_ = mem(store).timers
        if not ts_[t.key] then
          t.attempts, t.due = 0, now()
          ts_[t.key] = t
        end
        local dl = mem(store).dead_letters
        for i, x in ipairs(dl) do if x == d then table.remove(dl, i); break end end
      else
        ok, err = store:begin()
        if not ok then return nil, err end
        ok, err = store:query(self:_q([[INSERT INTO <schema>.timers
            (key, id, workflow, due_at, aggregate, aggregate_id, command, payload, correlation_id, causation_id)
            VALUES ($1, $2, $3, clock_timestamp(), $4, $5, $6, $7::json, $8, $9) ON CONFLICT (key) DO NOTHING]]),
          t.key, t.id, t.workflow, t.aggregate, t.aggregate_id, t.command, json.encode(t.payload or json.object {}),
          t.correlation_id, t.causation_id)
        if ok then
          ok, err = store:query(self:_q("DELETE FROM <schema>.dead_letters WHERE workflow = $1 AND event_id = $2"),
            d.workflow, d.event_id)
        end
        if not ok then self:_rollback(); return nil, err end
        ok, err = store:commit()
        if not ok then return nil, err end
      end
      out.retried = out.retried + 1
    elseif wf then
      local e
      e, err = read_event(store, d.stream, d.version, d.event_id)
      if not e then return nil, err end
      local locked = true
      ok, err = self:_begin()
      if not ok then return nil, err end
      if not self.memory then
        local rows
        rows, err = store:query(self:_q("SELECT 1 AS x FROM <schema>.dead_letters WHERE workflow = $1 "
          .. "AND event_id = $2 FOR UPDATE SKIP LOCKED"), d.workflow, d.event_id)
        if not rows then self:_rollback(); return nil, err end
        locked = #rows > 0
      end
      if locked then
        ok, err = self:_sp("SAVEPOINT")
        if not ok then self:_rollback(); return nil, err end
        local done, ferr = self:_handle(wf, e)
        if done then
          ok, err = self:_sp("RELEASE SAVEPOINT")
          if ok then
            if self.memory then
              local dl = mem(store).dead_letters
              for i, x in ipairs(dl) do if x == d then table.remove(dl, i); break end end
            else
              ok, err = store:query(self:_q("DELETE FROM <schema>.dead_letters WHERE workflow = $1 AND event_id = $2"),
                d.workflow, d.event_id)
            end
          end
          out.retried = out.retried + 1
        else
          ok, err = self:_sp("ROLLBACK TO SAVEPOINT")
          if ok then ok, err = self:_dead_letter(wf.name, e, ferr, 1) end
          out.failed = out.failed + 1
        end
        if not ok then self:_rollback(); return nil, err end
        ok, err = self:_commit()
        if not ok then return nil, err end
      else
        self:_rollback()
      end
    end
  end
  return out
end

-- ---------------------------------------------------------------------------
-- Live

function Runner:stop() self.stopping = true end

-- Follows live until opts.stop() returns true or runner:stop() is called:
-- catch_up, then wait for a wake-up (LISTEN), the next due timer or
-- opts.poll seconds (default 1). Errors go to opts.on_error (default
-- stderr) and are retried with backoff.
function Runner:run(opts)
  opts = opts or {}
  local poll = opts.poll or 1
  local stop_fn = opts.stop
  local on_error = opts.on_error or function(err)
    io.stderr:write(("workflow runner: %s\n"):format(message_of(err)))
  end
  self.stopping = false
  local function stopping() return self.stopping or (stop_fn and stop_fn()) end
  local listener = util.subscribe(self, on_error)
  local failures = 0
  while not stopping() do
    local n, err = self:catch_up()
    if not n then
      failures = failures + 1
      on_error(err)
      if stopping() then break end
      sleep(math.max(self:_delay(failures), 0.05))
      if listener and listener ~= self.store and is_connection(err) then listener:listen() end
    else
      if failures > 0 and listener then listener:listen() end
      failures = 0
      if opts.idle then opts.idle(n, err) end
      if stopping() then break end
      local wait = poll
      local due = self:next_timer()
      if due and due < wait then wait = math.max(0.01, due) end
      if listener then
        local woke = listener:wait(wait)
        if woke == nil then sleep(math.min(0.5, wait)) end
      else
        sleep(wait)
      end
    end
  end
  self.stopping = false
  return true
end

-- Replays workflow `name` from the first event (or from checkpoint
-- opts.checkpoint): handlers run again, and derived ids make the commands
-- they issued before count as already done.
function Runner:reset(name, opts)
  local wf = self.by_name[name]
  if not wf then error(("runner:reset: no workflow named %s"):format(tostring(name)), 2) end
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local cp = opts and opts.checkpoint
  if self.memory then
    local c = mem_checkpoint(self.store, name)
    c.checkpoint, c.position = cp, 0
    return true
  end
  return self.store:query(self:_q("UPDATE <schema>.workflows SET checkpoint = $2, position = 0, "
    .. "updated_at = now() WHERE name = $1"), name, cp)
end

function Runner:status()
  local ok, err = self:_ensure()
  if not ok then return nil, err end
  local out = {}
  for _, wf in ipairs(self.list) do
    local s = { name = wf.name }
    if self.memory then
      local c = mem_checkpoint(self.store, wf.name)
      s.checkpoint, s.position, s.handled = c.checkpoint, c.position, c.handled
      local n = 0
      for _, d in ipairs(mem(self.store).dead_letters) do if d.workflow == wf.name then n = n + 1 end end
      s.dead_letters = n
      n = 0
      for _, t in pairs(mem(self.store).timers) do if t.workflow == wf.name then n = n + 1 end end
      s.timers = n
    else
      local rows
      rows, err = self.store:query(self:_q("SELECT w.checkpoint, w.position, w.handled, "
        .. "(SELECT count(*) FROM <schema>.dead_letters d WHERE d.workflow = w.name) AS dead_letters, "
        .. "(SELECT count(*) FROM <schema>.timers t WHERE t.workflow = w.name) AS timers "
        .. "FROM <schema>.workflows w WHERE w.name = $1"), wf.name)
      if not rows then return nil, err end
      for k, v in pairs(rows[1] or {}) do s[k] = v end
      -- apart: on Citus events are distributed and the workflows table is
      -- not (no joins), and checkpoints hold a cursor per shard
      if util.per_shard(s.checkpoint) then
        s.lag_events, err = util.lag_by_scan(self.store, s.checkpoint)
      else
        rows, err = self.store:query(self:_q("SELECT count(*) AS n FROM <schema>.events "
          .. "WHERE position > $1::bigint"), s.position or 0)
        s.lag_events = rows and rows[1].n
      end
      if not s.lag_events then return nil, err end
    end
    out[#out + 1] = s
  end
  return out
end

-- ---------------------------------------------------------------------------
-- Queries

local EVENT_COLS = "id::text AS id, stream, version, position, type, data, metadata, "
  .. ts("recorded_at")

-- Every event of one correlation id, in the global order.
function M.trace(store, correlation_id)
  if type(correlation_id) ~= "string" then error("workflow.trace: correlation_id must be a string", 2) end
  if is_memory(store) then
    local out = {}
    local ok, err = util.scan(store, nil, function(b)
      for _, e in ipairs(b) do
        local m = e.metadata
        if (type(m) == "table" and m.correlation_id == correlation_id) or e.id == correlation_id then
          out[#out + 1] = e
        end
      end
    end)
    if ok == nil and err then return nil, err end
    return out
  end
  -- on Citus transaction ids are per worker: a chain crosses workers in
  -- the order its events were recorded
  local info = store:info()
  local order = info and info.distributed and "recorded_at, position" or "txid, position"
  return store:query(sqlq(store, "SELECT " .. EVENT_COLS .. " FROM <schema>.events "
    .. "WHERE metadata->>'correlation_id' = $1 OR id = $2::uuid ORDER BY " .. order),
    correlation_id, correlation_id:match("^%x+%-%x+%-%x+%-%x+%-%x+$") and correlation_id
      or "00000000-0000-0000-0000-000000000000")
end

-- The checkpoint at the store's current end (for runner:reset(name,
-- { checkpoint = ... }): a new workflow that should ignore the past).
function M.end_checkpoint(store)
  return util.scan(store, nil)
end

-- Removes a pending timer: true, removed (boolean) | nil, err
function M.cancel_timer(store, key)
  if type(key) ~= "string" then error("workflow.cancel_timer: key must be a string", 2) end
  if is_memory(store) then
    local t = mem(store).timers
    local had = t[key] ~= nil
    t[key] = nil
    return true, had
  end
  local ok, err = ensure(store)
  if not ok then return nil, err end
  local rows
  rows, err = store:query(sqlq(store, "DELETE FROM <schema>.timers WHERE key = $1 RETURNING key"), key)
  if not rows then return nil, err end
  return true, #rows > 0
end

local function sorted(list, field)
  table.sort(list, function(a, b) return (a[field] or "") < (b[field] or "") end)
  return list
end

-- Pending timers, soonest first.
function M.timers(store)
  if is_memory(store) then
    local out = {}
    for _, t in pairs(mem(store).timers) do out[#out + 1] = t end
    return sorted(out, "due_at")
  end
  local ok, err = ensure(store)
  if not ok then return nil, err end
  return store:query(sqlq(store, "SELECT key, id::text AS id, workflow, aggregate, aggregate_id, command, "
    .. "payload, correlation_id, causation_id, attempts, last_error, " .. ts("due_at")
    .. " FROM <schema>.timers ORDER BY due_at, key"))
end

-- Dead letters (of one workflow, or all), oldest event first.
function M.dead_letters(store, workflow)
  if is_memory(store) then
    local out = {}
    for _, d in ipairs(mem(store).dead_letters) do
      if not workflow or d.workflow == workflow then out[#out + 1] = d end
    end
    table.sort(out, function(a, b) return (a.position or math.huge) < (b.position or math.huge) end)
    return out
  end
  local ok, err = ensure(store)
  if not ok then return nil, err end
  return store:query(sqlq(store, "SELECT workflow, event_id::text AS event_id, position, type, stream, version, "
    .. "error, attempts, timer, " .. ts("first_failed_at") .. ", " .. ts("failed_at")
    .. " FROM <schema>.dead_letters WHERE $1::text IS NULL OR workflow = $1 "
    .. "ORDER BY position NULLS LAST, failed_at"), workflow)
end

-- Refused commands (of one workflow, or all), in the order recorded.
function M.rejections(store, workflow)
  if is_memory(store) then
    local out = {}
    for _, r in ipairs(mem(store).rejections) do
      if not workflow or r.workflow == workflow then out[#out + 1] = r end
    end
    return out
  end
  local ok, err = ensure(store)
  if not ok then return nil, err end
  return store:query(sqlq(store, "SELECT workflow, event_id::text AS event_id, step, event_type, event_stream, "
    .. "event_position, aggregate, aggregate_id, command, payload, kind, reason, correlation_id, "
    .. ts("recorded_at") .. " FROM <schema>.workflow_rejections WHERE $1::text IS NULL OR workflow = $1 "
    .. "ORDER BY id"), workflow)
end

-- retry_dead_letters(store, workflows, runner_opts) for scripts.
function M.retry_dead_letters(store, workflows, opts)
  return M.runner(store, workflows, opts):retry_dead_letters(opts)
end

return setmetatable(M, { __call = function(_, def) return M.new(def) end })
