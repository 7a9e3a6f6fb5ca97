-- bench/fold.lua - store:fold against the same loop in plain Lua over
-- lua-sql-postgres + lua-cjson, on one 100,000-event stream.
--
--   lua5.4 bench/fold.lua URL SCHEMA      (luajit too, if luasql loads there)
--
-- The alternative SELECTs the same columns of the stream, decodes data and
-- metadata with cjson, builds the same event table and calls the same
-- handler. Prints `name value unit` lines; best of BENCH_ROUNDS (default 5).
local es = require "eventsourcing"

local url, schema = arg[1], arg[2]
assert(url and schema, "usage: fold.lua URL SCHEMA")
local N = tonumber(os.getenv("BENCH_FOLD_EVENTS")) or 100000
local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 5
local flavour = rawget(_G, "jit") and "luajit" or _VERSION:gsub("Lua ", "lua")

local store = assert(es.open(url, { schema = schema }))
assert(store:migrate())
-- a clock of this process: no round trip inside the timed part
local now = require("eventsourcing.core").monotonic

local STREAM = "Fold-1"
local have = assert(store:version(STREAM))
if have ~= N then
  assert(have == 0, "stream " .. STREAM .. " has " .. have .. " events, want 0 or " .. N)
  local batch = {}
  for b = 0, N / 1000 - 1 do
    for j = 1, 1000 do
      batch[j] = { type = "Ticked",
                   data = { n = b * 1000 + j, note = "hello", items = { 1, 2, 3 } },
                   metadata = { user = "u1" } }
    end
    assert(store:append(STREAM, batch, { expected_version = b * 1000 }))
  end
  assert(store:query("ANALYZE \"" .. schema .. "\".events"))
end

-- the handler both loops call
local function count(state, _event)
  state.n = state.n + 1
  return state
end
local handlers = { Ticked = count }

local function best(f)
  local b = math.huge
  for _ = 1, ROUNDS do
    collectgarbage()
    local t0 = now()
    local n = f()
    local dt = now() - t0
    assert(n == N, "folded " .. tostring(n) .. " events, want " .. N)
    if dt < b then b = dt end
  end
  return N / b
end

local es_rate = best(function()
  local state = store:fold(STREAM, handlers, { n = 0 })
  return state.n
end)
print(("fold_es_%s %.0f events/s"):format(flavour, es_rate))

local ok_sql, luasql = pcall(require, "luasql.postgres")
local ok_cjson, cjson = pcall(require, "cjson")
if not (ok_sql and ok_cjson) then
  io.stderr:write(("fold: no %s under %s: no comparison\n"):format(
    ok_sql and "lua-cjson" or "lua-sql-postgres", flavour))
  os.exit(0)
end
local env = assert(luasql.postgres())
local con = assert(env:connect(url))   -- libpq takes a conninfo as dbname
local decode = cjson.decode
local sql = ("SELECT position, id, version, type, data, metadata, recorded_at, stream"
  .. " FROM \"%s\".events WHERE stream = '%s' ORDER BY version"):format(schema, STREAM)

local alt_rate = best(function()
  local cur = assert(con:execute(sql))
  local state = { n = 0 }
  local row = {}
  while cur:fetch(row, "a") do
    local event = {
      id = row.id, stream = row.stream, type = row.type,
      version = tonumber(row.version), position = tonumber(row.position),
      data = decode(row.data), metadata = decode(row.metadata),
      recorded_at = row.recorded_at,
    }
    local h = handlers[event.type]
    if h then
      local s = h(state, event)
      if s ~= nil then state = s end
    end
  end
  cur:close()
  return state.n
end)
con:close()
env:close()
print(("fold_luasql_cjson_%s %.0f events/s"):format(flavour, alt_rate))
print(("fold_ratio_%s %.2f x"):format(flavour, es_rate / alt_rate))
store:close()
