-- eventsourcing.util: small helpers the Lua layer shares (time, copies,
-- transactions, errors worth retrying). Time comes from the C core, so
-- instants are read and written exactly as the stores do.
local core = require "eventsourcing.core"

local M = {}

-- A copy of v with every nested table copied too (metatables kept, so
-- JSON shapes survive).
function M.deep_copy(v)
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = M.deep_copy(x) end
  return setmetatable(t, getmetatable(v))
end

-- into with from's keys laid over it (from may be nil); returns into.
function M.merge(into, from)
  if from then for k, v in pairs(from) do into[k] = v end end
  return into
end

function M.is_memory(store) return store:kind() == "memory" end

-- How each store was opened (es.open records it): a rebuild's workers open
-- sessions of their own to the same database and schema.
local opened = setmetatable({}, { __mode = "k" })
function M.note_open(store, target, opts)
  if store then opened[store] = { target = target, opts = opts and M.deep_copy(opts) } end
  return store
end

-- -> a function opening another store like `store` | nil (not opened by es.open)
function M.reopener(store)
  local o = opened[store]
  if not o then return nil end
  return function() return core.open(o.target, o.opts) end
end

-- Transactions, which a memory store does not have: there they are no-ops.
-- rollback ignores errors (the session may be gone already).
function M.begin(store)
  if M.is_memory(store) then return true end
  return store:begin()
end

function M.commit(store)
  if M.is_memory(store) then return true end
  return store:commit()
end

function M.rollback(store)
  if not M.is_memory(store) then store:rollback() end
end

-- SQL selecting a timestamptz as the stores write instants
-- ("YYYY-MM-DDTHH:MM:SS.ffffffZ"), named alias (default: the expression).
function M.ts_sql(expr, alias)
  return ([[to_char(%s AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS %s]])
    :format(expr, alias or expr)
end

-- Pages through every event after checkpoint `after` (nil: all), calling
-- each_batch(batch) for each page. -> the checkpoint after the last event
-- (`after` when there was none) | nil, err
-- shards: only those shards' events (Citus; read_all's option).
function M.scan(store, after, each_batch, shards)
  while true do
    local batch, cp = store:read_all({ after = after, limit = 10000, shards = shards })
    if not batch then return nil, cp end
    if #batch == 0 then return after end
    if each_batch then each_batch(batch) end
    after = cp
  end
end

-- The optional `category` of a definition (read model, projection,
-- workflow): only streams "<category>-..." are read, filtered in SQL.
function M.category(def, what)
  local c = def.category
  if c == nil then return nil end
  if type(c) ~= "string" or c == "" or c:find("-", 1, true) then
    error(("%s: category must be a stream prefix without '-' (a non-empty string)"):format(what), 3)
  end
  return c
end

-- Whether checkpoint cp holds a cursor per shard (a store distributed on
-- Citus, docs/scale-out.md): it cannot be compared in SQL.
function M.per_shard(cp)
  return type(cp) == "string" and cp:sub(1, 3) == "c1:"
end

-- How far behind checkpoint cp is, by reading what comes after it:
-- -> events, oldest recorded_at (nil when none) | nil, err
-- shards: only those shards (Citus: a checkpoint of some shards).
function M.lag_by_scan(store, cp, shards)
  local n, first = 0, nil
  local done, err = M.scan(store, cp, function(b)
    for _, e in ipairs(b) do
      if not first or e.recorded_at < first then first = e.recorded_at end
    end
    n = n + #b
  end, shards)
  if done == nil and err then return nil, err end
  return n, first
end

M.now = core.now                 -- wall clock, seconds since the epoch
M.monotonic = core.monotonic     -- for durations and rates
M.iso = core.time_format         -- epoch seconds -> "YYYY-MM-DDTHH:MM:SS.ffffffZ"

function M.sleep(seconds)
  if seconds > 0 then core.sleep(seconds) end
end

-- ISO-8601 instant -> epoch seconds, or nil when it is not one.
function M.iso_epoch(s)
  if type(s) ~= "string" then return nil end
  return (core.time_parse(s))
end

function M.now_iso() return core.time_format(core.now()) end

-- Errors worth trying again later rather than stopping for: a lost
-- connection, and the database's passing refusals (serialization failure,
-- deadlock, lock or statement timeout, too many connections, out of
-- resources, a transaction aborted by one of them). Decided from err.kind,
-- err.reason and err.sqlstate, never from message text.
local TRANSIENT = { ["40001"] = true, ["40P01"] = true, ["55P03"] = true,
                    ["57014"] = true, ["53000"] = true, ["53100"] = true,
                    ["53200"] = true, ["53300"] = true }
-- "tx_aborted" only says the caller's transaction is now aborted; whether
-- trying again can help is the cause's, its sqlstate (a missing table is
-- no better next time, a serialization failure may be).
local TRANSIENT_REASON = { serialization = true, timeout = true }
function M.transient(err)
  if type(err) ~= "table" then return false end
  if err.kind == "connection" then return true end
  if TRANSIENT_REASON[err.reason] then return true end
  return TRANSIENT[err.sqlstate] == true
end

return M
