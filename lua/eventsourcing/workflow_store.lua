-- eventsourcing.workflow_store: the tables workflows keep besides their
-- checkpoints (timers, dead letters, refused commands), their memory-store
-- twins, the queries over them, and the helpers the workflow modules share.
-- The checkpoints themselves are the follower's ledger (<schema>.workflows).
local util = require "eventsourcing.util"

local M = {}

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

local ts = util.ts_sql

-- Memory stores: everything in Lua, weak-keyed by store.
local mem_states = setmetatable({}, { __mode = "k" })
local function mem(store)
  local s = mem_states[store]
  if not s then
    s = { timers = {}, rejections = {}, dead_letters = {} }
    mem_states[store] = s
  end
  return s
end

-- ---------------------------------------------------------------------------
-- Schema

local TABLES = {
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
  -- failed attempts at an event not yet dead-lettered: written in the
  -- batch's transaction, so a restarted runner goes on counting
  [[CREATE TABLE IF NOT EXISTS <schema>.workflow_attempts (
      workflow text NOT NULL,
      event_id uuid NOT NULL,
      attempts integer NOT NULL,
      last_error text,
      updated_at timestamptz NOT NULL DEFAULT now(),
      PRIMARY KEY (workflow, event_id))]],
  -- trace(): every event of one correlation id
  "CREATE INDEX IF NOT EXISTS events_correlation_id ON <schema>.events ((metadata->>'correlation_id'))",
}

local migrated = setmetatable({}, { __mode = "k" })

-- The workflow tables, in the open transaction (idempotent).
function M._create_tables(store)
  if is_memory(store) then return true end
  for _, sql in ipairs(TABLES) do
    local ok, err = store:query(sqlq(store, sql))
    if not ok then return nil, err end
  end
  return true
end

-- Creates the workflow tables (idempotent; also creates the store's own).
-- The checkpoints (<schema>.workflows) are the follower's ledger: a
-- runner's migrate creates them.
function M.migrate(store)
  if is_memory(store) then
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
  if not step(M._create_tables(store)) then return nil, err end
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
-- Queries

local EVENT_COLS = "id::text AS id, stream, version, position, type, data, metadata, "
  .. ts("recorded_at")

-- Events in the order given, except that an event whose cause
-- (metadata.causation_id) is among them comes after it: on Citus the
-- (txid, position) order holds only within a worker, and a chain hops
-- between workers. On one PostgreSQL a cause always commits before what
-- it causes, so this keeps the order as it is.
local function causes_first(events)
  local ids, placed, waiting, out = {}, {}, {}, {}
  for _, e in ipairs(events) do ids[e.id] = true end
  local function place(e)
    out[#out + 1] = e
    placed[e.id] = true
    local kids = waiting[e.id]
    waiting[e.id] = nil
    for _, k in ipairs(kids or {}) do place(k) end
  end
  for _, e in ipairs(events) do
    local m = type(e.metadata) == "table" and e.metadata or {}
    local cause = m.causation_id
    if cause and cause ~= e.id and ids[cause] and not placed[cause] then
      waiting[cause] = waiting[cause] or {}
      table.insert(waiting[cause], e)
    else
      place(e)
    end
  end
  for _, kids in pairs(waiting) do       -- a cycle of causes (bad metadata)
    for _, k in ipairs(kids) do if not placed[k.id] then place(k) end end
  end
  return out
end

-- Every event of one correlation id, in the global order (causes first).
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
  local rows, err = store:query(sqlq(store, "SELECT " .. EVENT_COLS .. " FROM <schema>.events "
    .. "WHERE metadata->>'correlation_id' = $1 OR id = $2::uuid ORDER BY txid, position"),
    correlation_id, correlation_id:match("^%x+%-%x+%-%x+%-%x+%-%x+$") and correlation_id
      or "00000000-0000-0000-0000-000000000000")
  if not rows then return nil, err end
  return causes_first(rows)
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


M.sqlq, M.errkind, M.is_connection, M.message_of, M.raise = sqlq, errkind, is_connection, message_of, raise
M.mem, M.migrated, M.ensure = mem, migrated, ensure

return M
