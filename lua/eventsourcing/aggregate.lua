-- eventsourcing.aggregate: aggregates as pure business rules.
--
--   local Order = es.aggregate {
--     name    = "Order",                 -- streams are "Order-<id>"
--     initial = function() return { status = "none" } end,   -- or a table (deep-copied)
--     apply   = { OrderCreated = function(state, event) ... end, ... },
--     decide  = { CreateOrder = function(state, command) ... end, ... },
--     snapshot_every   = 100,            -- optional: see eventsourcing.repository
--     snapshot_version = 1,              -- bump when the state's shape changes
--     upcast  = { ItemAdded = { [1] = function(data, event) return v2_data end } },
--   }
--
-- apply[type](state, event) returns the new state, or nil when it changed
-- `state` in place. `event` is { type, data, metadata, version, recorded_at,
-- ... } (only type/data/metadata for events that were just decided). Apply
-- handlers are pure: no I/O (the store calls them from C during a fold).
--
-- decide[name](state, command) returns
--   an event { type = "T", data = {...} }, an array of events,
--   the shorthand "T", { data },
--   nil or {} (nothing to do: an idempotent no-op),
--   nil, "reason"  (a business rule refuses: err.kind "rejected"), or
--   nil, es.error(kind, message, fields)  (e.g. kind "invalid" with a field).
--
-- Upcasting: upcast[type][k] turns the data of schema version k into version
-- k + 1; the current schema version of a type is 1 + its highest k. Events
-- carry their schema version in metadata.schema_version (absent = 1); the
-- repository writes new events with the current version. Stored events are
-- never rewritten: old shapes are converted on every read, before apply.
--
-- The state must be JSON-encodable when snapshots are used (it is stored as
-- JSON and decoded on load; decoded arrays/objects keep their shape, so use
-- es.json.array({}) for an initially empty array). A repository's state
-- cache (opts.cache) keeps only states JSON gives back unchanged: the same
-- rule decides whether a stream's state can be cached at all.
local core = require "eventsourcing.core"

local M = {}

local Aggregate = {}
Aggregate.__index = Aggregate

local deep_copy = require("eventsourcing.util").deep_copy

local function rejected(message, fields)
  local f = { }
  for k, v in pairs(fields or {}) do f[k] = v end
  return core.error("rejected", message, f)
end

-- id check shared by stream(): non-empty string, no control characters.
function M.valid_id(id)
  if type(id) ~= "string" then
    return nil, ("id must be a string, got %s"):format(type(id))
  end
  if id == "" then return nil, "id must not be empty" end
  -- ASCII controls, and C1 controls and line/paragraph separators in UTF-8
  if id:find("%c") or id:find("\194[\128-\159]") or id:find("\226\128[\168\169]") then
    return nil, "id must not contain control characters"
  end
  return true
end

function M.new(def)
  if type(def) ~= "table" then
    error("es.aggregate: expected a definition table, got " .. type(def), 2)
  end
  local name = def.name
  if type(name) ~= "string" or not name:match("^[%a_][%w_]*$") then
    error("es.aggregate: name must be an identifier-like string (letters, digits, _; "
      .. "no '-', which separates the category from the id), got " .. tostring(name), 2)
  end
  local initial = def.initial
  if initial ~= nil and type(initial) ~= "function" and type(initial) ~= "table" then
    error(("es.aggregate %s: initial must be a function or a table"):format(name), 2)
  end
  local apply, decide, upcast = def.apply or {}, def.decide or {}, def.upcast or {}
  for what, t in pairs { apply = apply, decide = decide, upcast = upcast } do
    if type(t) ~= "table" then
      error(("es.aggregate %s: %s must be a table"):format(name, what), 2)
    end
  end
  for k, f in pairs(apply) do
    if type(k) ~= "string" or type(f) ~= "function" then
      error(("es.aggregate %s: apply.%s must be a function"):format(name, tostring(k)), 2)
    end
  end
  for k, f in pairs(decide) do
    if type(k) ~= "string" or type(f) ~= "function" then
      error(("es.aggregate %s: decide.%s must be a function"):format(name, tostring(k)), 2)
    end
  end
  local every = def.snapshot_every
  if every ~= nil and (type(every) ~= "number" or every < 1 or every % 1 ~= 0) then
    error(("es.aggregate %s: snapshot_every must be a positive integer"):format(name), 2)
  end
  local snapshot_version = def.snapshot_version or 1
  if type(snapshot_version) ~= "number" or snapshot_version % 1 ~= 0 then
    error(("es.aggregate %s: snapshot_version must be an integer"):format(name), 2)
  end

  -- schema versions and upcaster chains
  local schema = {}
  for t, steps in pairs(upcast) do
    if type(steps) ~= "table" then
      error(("es.aggregate %s: upcast.%s must be a table { [k] = function(data, event) }")
        :format(name, tostring(t)), 2)
    end
    if not apply[t] then
      error(("es.aggregate %s: upcast.%s has no apply handler for that type")
        :format(name, t), 2)
    end
    local top = 0
    for k, f in pairs(steps) do
      if type(k) ~= "number" or k < 1 or k % 1 ~= 0 or type(f) ~= "function" then
        error(("es.aggregate %s: upcast.%s keys are schema versions (1, 2, ...) and values functions")
          :format(name, t), 2)
      end
      if k > top then top = k end
    end
    for k = 1, top do
      if not steps[k] then
        error(("es.aggregate %s: upcast.%s lacks the step from version %d"):format(name, t, k), 2)
      end
    end
    schema[t] = top + 1
  end

  local self = setmetatable({
    name = name,
    prefix = name .. "-",
    snapshot_every = every,
    snapshot_version = snapshot_version,
    apply_handlers = apply,
    decide_handlers = decide,
    upcasters = upcast,
    schema_versions = schema,
    _initial = initial,
  }, Aggregate)

  -- Fold handlers for store:fold: upcast first where the type has
  -- upcasters; a type with no handler raises an error naming it.
  local handlers = {}
  for t, f in pairs(apply) do
    if schema[t] then
      handlers[t] = function(state, event)
        self:upcast_event(event)
        return f(state, event)
      end
    else
      handlers[t] = f
    end
  end
  setmetatable(handlers, {
    __index = function(_, t)
      error(("%s: no apply handler for event type '%s'"):format(name, tostring(t)), 2)
    end,
  })
  self.handlers = handlers
  return self
end

function Aggregate:__tostring()
  return "aggregate " .. self.name
end

-- The stream of an instance: "Order-<id>". Raises on a bad id.
function Aggregate:stream(id)
  local ok, why = M.valid_id(id)
  if not ok then error(("%s: %s"):format(self.name, why), 2) end
  return self.prefix .. id
end

-- A fresh initial state.
function Aggregate:initial()
  local init = self._initial
  if type(init) == "function" then
    local s = init()
    if s == nil then s = {} end
    return s
  elseif init == nil then
    return {}
  end
  return deep_copy(init)
end

-- The current schema version of an event type (nil: not versioned).
function Aggregate:schema_version(event_type)
  return self.schema_versions[event_type]
end

-- Brings event.data to the current schema version of its type, in place.
-- Returns the event. The original version stays in event.metadata.
-- An event with no metadata.schema_version is taken to be version
-- `default` (1 for stored events, which is what fold and history use).
function Aggregate:upcast_event(event, default)
  local current = self.schema_versions[event.type]
  if not current then return event end
  if event.schema_version == current then return event end   -- done already
  local meta = event.metadata
  local v = (type(meta) == "table" and meta.schema_version) or default or 1
  if type(v) ~= "number" or v % 1 ~= 0 or v < 1 then
    error(("%s: event %s has a bad metadata.schema_version (%s)")
      :format(self.name, event.type, tostring(v)), 2)
  end
  if v > current then
    error(("%s: event %s has schema version %d, newer than this code knows (%d)")
      :format(self.name, event.type, v, current), 2)
  end
  if v < current then
    local steps = self.upcasters[event.type]
    local data = event.data
    for k = v, current - 1 do
      data = steps[k](data, event)
      if data == nil then
        error(("%s: upcaster %s v%d -> v%d returned nil"):format(self.name, event.type, k, k + 1), 2)
      end
    end
    event.data = data
  end
  event.schema_version = current
  return event
end

-- Pure: applies events (array, or one event) to state; returns the state.
-- Apply handlers may change `state` in place. Events here are usually new
-- ones (from decide, or given in a test): one with no
-- metadata.schema_version is taken as current; give { schema_version = 1 }
-- to have an old shape upcast.
function Aggregate:evolve(state, events)
  if state == nil then state = self:initial() end
  if events == nil then return state end
  if type(events) ~= "table" then
    error(("%s:evolve: events must be a table, got %s"):format(self.name, type(events)), 2)
  end
  if events.type ~= nil then events = { events } end
  local apply, schema = self.apply_handlers, self.schema_versions
  for i = 1, #events do
    local e = events[i]
    if type(e) ~= "table" or type(e.type) ~= "string" then
      error(("%s:evolve: event %d must be a table with a string type"):format(self.name, i), 2)
    end
    local h = apply[e.type]
    if not h then
      error(("%s: no apply handler for event type '%s'"):format(self.name, e.type), 2)
    end
    if schema[e.type] then self:upcast_event(e, schema[e.type]) end
    local s = h(state, e)
    if s ~= nil then state = s end
  end
  return state
end

-- Normalizes what a decide handler returned into an array of events.
local function normalize(self, command_name, a, b)
  if a == nil then
    if b == nil then return {} end
    if core.is_error(b) then return nil, b end
    if type(b) == "string" then
      return nil, rejected(b, { command = command_name })
    end
    error(("%s.%s: decide returned nil and a %s; return nil, \"reason\" to reject")
      :format(self.name, command_name, type(b)), 3)
  end
  local list
  if type(a) == "string" then            -- shorthand: "Type", data
    list = { { type = a, data = b } }
  elseif type(a) ~= "table" then
    error(("%s.%s: decide must return events (a table), got %s")
      :format(self.name, command_name, type(a)), 3)
  elseif a.type ~= nil then
    list = { a }
  else
    list = {}
    for i = 1, #a do list[i] = a[i] end
    if next(a) ~= nil and #list == 0 then
      error(("%s.%s: decide returned a table that is neither an event nor an array of events")
        :format(self.name, command_name), 3)
    end
  end
  for i, e in ipairs(list) do
    if type(e) ~= "table" or type(e.type) ~= "string" then
      error(("%s.%s: event %d from decide must be a table with a string type")
        :format(self.name, command_name, i), 3)
    end
    if not self.apply_handlers[e.type] then
      error(("%s.%s: decide emitted event type '%s', which has no apply handler")
        :format(self.name, command_name, e.type), 3)
    end
    if e.data ~= nil and type(e.data) ~= "table" then
      error(("%s.%s: data of event %s must be a table"):format(self.name, command_name, e.type), 3)
    end
  end
  return list
end

-- Pure: the events a command produces from state, or nil, err (kind
-- "rejected", or the kind of an error table the handler returned).
-- An unknown command name raises.
function Aggregate:decide(state, command_name, command)
  local h = self.decide_handlers[command_name]
  if not h then
    error(("%s: unknown command '%s'"):format(self.name, tostring(command_name)), 2)
  end
  if state == nil then state = self:initial() end
  if command == nil then command = {} end
  return normalize(self, command_name, h(state, command))
end

-- Is this a command the aggregate knows?
function Aggregate:handles(command_name)
  return self.decide_handlers[command_name] ~= nil
end

M.Aggregate = Aggregate
return M
