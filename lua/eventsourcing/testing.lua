-- eventsourcing.testing: given / when / then for aggregates, no store needed.
--
--   local given = require("eventsourcing.testing").given
--   given(Order, { { type = "OrderCreated", data = { customer_id = "c1" } } })
--     :when("AddItem", { product_id = "p1", quantity = 2, unit_price = 500 })
--     :expect { { type = "ItemAdded", data = { product_id = "p1", quantity = 2, unit_price = 500 } } }
--
--   given(Order):when("PlaceOrder"):expect_rejection("does not exist")
--   given(Order, events):when("PlaceOrder"):expect_nothing()        -- idempotent no-op
--   given(Order):when("CreateOrder", {}):expect_error("invalid", "customer_id")
--   ...:expect(events):expect_state { status = "placed" }            -- partial match
--   ...:expect_state(function(state) return state.total == 1000 end)
--
-- Events may be written { type = "T", data = {...} } or { "T", {...} }.
-- Expected events compare type and data exactly, and metadata as a subset
-- when given. A failed expectation is a busted failure (busted.fail) when
-- running under busted, else an error; check(...) variants return
-- ok, message instead.
local aggregate_mod = require "eventsourcing.aggregate"
local core = require "eventsourcing.core"
local util = require "eventsourcing.util"

local M = {}

-- ---- printing -----------------------------------------------------------

local function is_array(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  for i = 1, n do if t[i] == nil then return false end end
  return true, n
end

local function show(v, seen)
  local tv = type(v)
  if tv == "string" then return ("%q"):format(v):gsub("\\\n", "\\n") end
  if tv ~= "table" then
    if v == core.json.null then return "null" end
    return tostring(v)
  end
  seen = seen or {}
  if seen[v] then return "<cycle>" end
  seen[v] = true
  local arr, n = is_array(v)
  local parts = {}
  if arr and n > 0 then
    for i = 1, n do parts[i] = show(v[i], seen) end
  else
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b)
      if type(a) == type(b) and (type(a) == "string" or type(a) == "number") then return a < b end
      return type(a) < type(b)
    end)
    for _, k in ipairs(keys) do
      local ks = (type(k) == "string" and k:match("^[%a_][%w_]*$")) and k or ("[" .. show(k) .. "]")
      parts[#parts + 1] = ks .. " = " .. show(v[k], seen)
    end
  end
  seen[v] = nil
  return "{ " .. table.concat(parts, ", ") .. (#parts > 0 and " }" or "}")
end
M.show = show

local function show_events(events)
  if #events == 0 then return "  (no events)" end
  local lines = {}
  for i, e in ipairs(events) do
    local s = ("  %d. %s %s"):format(i, tostring(e.type), show(e.data or {}))
    if e.metadata and next(e.metadata) then s = s .. " metadata " .. show(e.metadata) end
    lines[i] = s
  end
  return table.concat(lines, "\n")
end

-- ---- comparison ---------------------------------------------------------

local function deep_equal(a, b)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then
    -- 2 and 2.0 are equal; nothing else of different types is
    return type(a) == "number" and type(b) == "number" and a == b
  end
  for k, v in pairs(a) do
    if not deep_equal(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end
M.deep_equal = deep_equal

-- every key of `want` is in `got` with an equal value (recursively for tables)
local function subset(want, got)
  if type(want) ~= "table" then return deep_equal(want, got) end
  if type(got) ~= "table" then return false end
  for k, v in pairs(want) do
    if not subset(v, got[k]) then return false end
  end
  return true
end
M.subset = subset

local function fail(msg, level)
  local busted = package.loaded["busted"]
  if type(busted) == "table" and type(busted.fail) == "function" then
    busted.fail(msg, level + 1)
  end
  error(msg, level + 1)
end

-- ---- scenarios ----------------------------------------------------------

local function event_of(e, i)
  if type(e) ~= "table" then
    error(("testing: given event %d must be a table"):format(i), 4)
  end
  if type(e[1]) == "string" then
    return { type = e[1], data = e[2] or {}, metadata = e[3] }
  end
  if type(e.type) ~= "string" then
    error(("testing: given event %d needs a string type"):format(i), 4)
  end
  return { type = e.type, data = e.data or {}, metadata = e.metadata,
           version = e.version or i, recorded_at = e.recorded_at }
end

local Scenario = {}
Scenario.__index = Scenario

-- given(Aggregate, events?) -> scenario. The events are applied with
-- Aggregate:evolve (each gets version = its index unless set).
function M.given(A, events)
  if getmetatable(A) ~= aggregate_mod.Aggregate then
    error("testing.given: expected an aggregate (es.aggregate{...})", 2)
  end
  local list = {}
  if events ~= nil then
    if type(events) ~= "table" then error("testing.given: events must be an array", 2) end
    if events.type ~= nil or type(events[1]) == "string" then events = { events } end
    for i, e in ipairs(events) do list[i] = event_of(e, i) end
  end
  local state = A:evolve(A:initial(), list)
  return setmetatable({ aggregate = A, history = list, state = state }, Scenario)
end

-- when(command_name, command) -> scenario with the outcome
function Scenario:when(command_name, command)
  local A = self.aggregate
  local events, err = A:decide(self.state, command_name, command or {})
  local s = setmetatable({ aggregate = A, history = self.history, state = self.state,
                           command_name = command_name, command = command,
                           events = events, err = err, decided = true }, Scenario)
  return s
end

function Scenario:_label()
  return ("%s %s %s"):format(self.aggregate.name, tostring(self.command_name),
    show(self.command or {}))
end

local function need_when(self, what)
  if not self.decided then error(("testing: %s needs :when(...) first"):format(what), 3) end
end

-- check(expected_events) -> ok, message
function Scenario:check(expected)
  need_when(self, "check")
  if expected.type ~= nil or type(expected[1]) == "string" then expected = { expected } end
  local want = {}
  for i, e in ipairs(expected) do
    if type(e[1]) == "string" then want[i] = { type = e[1], data = e[2] or {}, metadata = e[3] }
    else want[i] = e end
  end
  if not self.events then
    return false, ("%s\nexpected events:\n%s\nbut it failed with %s"):format(
      self:_label(), show_events(want), tostring(self.err))
  end
  local ok = #want == #self.events
  for i = 1, #want do
    if not ok then break end
    local w, g = want[i], self.events[i]
    ok = w.type == g.type and deep_equal(w.data or {}, g.data or {})
      and (w.metadata == nil or subset(w.metadata, g.metadata or {}))
  end
  if ok then return true end
  return false, ("%s\nexpected events:\n%s\ngot:\n%s"):format(
    self:_label(), show_events(want), show_events(self.events))
end

function Scenario:expect(expected)
  local ok, msg = self:check(expected)
  if not ok then fail(msg, 2) end
  return self
end

function Scenario:expect_nothing()
  return self:expect({})
end

-- check_error(kind|nil, substring|nil) -> ok, message
function Scenario:check_error(kind, substring)
  need_when(self, "check_error")
  local label = self:_label()
  if self.events then
    return false, ("%s\nexpected %s%s\nbut it decided:\n%s"):format(label,
      kind and ("a '" .. kind .. "' error") or "an error",
      substring and (" mentioning %q"):format(substring) or "", show_events(self.events))
  end
  local err = self.err
  if kind and err.kind ~= kind then
    return false, ("%s\nexpected a '%s' error, got %s"):format(label, kind, tostring(err))
  end
  if substring and not tostring(err.message):lower():find(substring:lower(), 1, true) then
    return false, ("%s\nexpected the %s message to mention %q, got %q"):format(
      label, tostring(err.kind), substring, tostring(err.message))
  end
  return true
end

function Scenario:check_rejection(substring)
  return self:check_error("rejected", substring)
end

function Scenario:expect_error(kind, substring)
  local ok, msg = self:check_error(kind, substring)
  if not ok then fail(msg, 2) end
  return self
end

function Scenario:expect_rejection(substring)
  local ok, msg = self:check_error("rejected", substring)
  if not ok then fail(msg, 2) end
  return self
end

-- The state after the given events and the decided ones.
function Scenario:result_state()
  local A = self.aggregate
  local state = A:evolve(A:initial(), self.history)
  if self.events then state = A:evolve(state, util.deep_copy(self.events)) end
  return state
end

-- expect_state(table): partial match; expect_state(fn): fn(state) must not
-- return false (it may use assertions itself).
function Scenario:expect_state(want)
  local state = self:result_state()
  if type(want) == "function" then
    if want(state) == false then
      fail(("%s\nthe state did not satisfy the check:\n  %s"):format(
        self.decided and self:_label() or self.aggregate.name, show(state)), 2)
    end
  elseif not subset(want, state) then
    fail(("%s\nexpected the state to include:\n  %s\ngot:\n  %s"):format(
      self.decided and self:_label() or self.aggregate.name, show(want), show(state)), 2)
  end
  return self
end

M.Scenario = Scenario
return M
