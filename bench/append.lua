-- bench/append.lua - one append client: appends for a while, prints its rate.
--
--   lua5.4 bench/append.lua URL SCHEMA CLIENT SIZE SECONDS [TARGET]
--
-- SIZE events per append (one transaction each), to streams of its own
-- (Bench<CLIENT>_<SIZE>-<k>, k = 1..10, round robin) with the exact expected
-- version checked. Prints `events <n> seconds <s> appends <m>` for
-- scripts/bench.sh, which runs several clients at once and sums their rates.
--
-- TARGET "message_db": the same loop against Message DB's write_message
-- (URL is its database, SCHEMA is ignored, SIZE must be 1: it writes one
-- message per call). The call is a server-side prepared statement run with
-- EXECUTE, the data encoded by es.json and the ids made by the same UUID v7
-- generator, so the two clients differ only in what the server does.
local es = require "eventsourcing"
local core = require "eventsourcing.core"

local url, schema = arg[1], arg[2]
local client, size, seconds = tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5])
local target = arg[6] or "es"
assert(url and schema and client and size and seconds,
  "usage: append.lua URL SCHEMA CLIENT SIZE SECONDS [es|message_db]")
assert(target == "es" or target == "message_db", "TARGET: es or message_db")
assert(target == "es" or size == 1, "message_db writes one message per call: SIZE 1")

local store = assert(es.open(url, target == "es" and { schema = schema } or nil))
-- a clock of this process: no round trip inside the timed part
local now = core.monotonic

local STREAMS = 10
local versions = {}
local names = {}

local batch = {}
for j = 1, size do
  batch[j] = { type = "Ticked", data = { n = j, note = "hello" } }
end
local event = size == 1 and batch[1] or batch

local appends, k = 0, 0
local one

if target == "es" then
  for i = 1, STREAMS do
    names[i] = ("Bench%d_%d-%d"):format(client, size, i)
    versions[i] = assert(store:version(names[i]))
  end
  one = function()
    k = k % STREAMS + 1
    local r, err = store:append(names[k], event, { expected_version = versions[k] })
    if not r then error("append: " .. tostring(err)) end
    versions[k] = r.version
    appends = appends + 1
  end
else
  -- Message DB's versions start at 0; an empty stream is at -1
  local function lit(s) return "'" .. s:gsub("'", "''") .. "'" end
  assert(store:query("SET search_path = message_store, public"))
  assert(store:query("PREPARE es_bench_write(varchar, varchar, varchar, jsonb, jsonb,"
    .. " bigint) AS SELECT write_message($1, $2, $3, $4, $5, $6)"))
  for i = 1, STREAMS do
    names[i] = ("bench%d_%d-%d"):format(client, size, i)
    local rows = assert(store:query("SELECT stream_version($1) AS v", names[i]))
    versions[i] = rows[1].v or -1
  end
  local data = lit(es.json.encode(event.data))
  local uuid = core.uuid
  one = function()
    k = k % STREAMS + 1
    local r, err = store:query(("EXECUTE es_bench_write(%s, %s, 'Ticked', %s, '{}', %d)")
      :format(lit(uuid()), lit(names[k]), data, versions[k]))
    if not r then error("write_message: " .. tostring(err)) end
    versions[k] = versions[k] + 1
    appends = appends + 1
  end
end

-- warm up: prepare statements, caches
for _ = 1, 20 do one() end
appends = 0
local t0 = now()
local deadline = t0 + seconds
local t = t0
while t < deadline do
  for _ = 1, (size == 1 and 100 or 5) do one() end
  t = now()
end
store:close()
io.write(("events %d seconds %.6f appends %d\n"):format(appends * size, t - t0, appends))
