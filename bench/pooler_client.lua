-- bench/pooler_client.lua - one client of bench/pooler.sh: appends or folds
-- for a while through whatever URL it is given, prints its rate.
--
--   lua5.4 bench/pooler_client.lua URL SCHEMA POOLER OP CLIENT SECONDS
--
-- POOLER: es.open's option ("none": named prepared statements, one per
-- session; "transaction": unnamed statements, as behind PgBouncer).
-- OP append: one event per append (its own transaction) to the client's 10
-- streams, the expected version checked. OP fold: store:fold of one of the
-- 10 streams Fold-1..10 of FOLD_EVENTS events each, made by OP setup.
-- Prints `ops <n> seconds <s>`.
local es = require "eventsourcing"

local url, schema, pooler, op = arg[1], arg[2], arg[3], arg[4]
local client, seconds = tonumber(arg[5]), tonumber(arg[6])
assert(url and schema and pooler and op and client and seconds,
  "usage: pooler_client.lua URL SCHEMA POOLER OP CLIENT SECONDS")
local FOLD_EVENTS = 20

local store = assert(es.open(url, { schema = schema, pooler = pooler }))
local now = require("eventsourcing.core").monotonic

if op == "setup" then
  assert(store:migrate())
  for k = 1, 10 do
    local evs = {}
    for i = 1, FOLD_EVENTS do evs[i] = { type = "Ticked", data = { n = i, note = "hello" } } end
    assert(store:append("Fold-" .. k, evs, { expected_version = es.NO_STREAM }))
  end
  store:close()
  return
end

local STREAMS, k = 10, 0
local one
if op == "append" then
  local names, versions = {}, {}
  for i = 1, STREAMS do
    names[i] = ("Pool%s%d-%d"):format(pooler, client, i)
    versions[i] = assert(store:version(names[i]))
  end
  local event = { type = "Ticked", data = { n = 1, note = "hello" } }
  one = function()
    k = k % STREAMS + 1
    local r, err = store:append(names[k], event, { expected_version = versions[k] })
    if not r then error("append: " .. tostring(err)) end
    versions[k] = r.version
  end
elseif op == "fold" then
  local handlers = { Ticked = function(s, e) return s + e.data.n end }
  one = function()
    k = k % STREAMS + 1
    local s, v = store:fold("Fold-" .. k, handlers, 0)
    if not s then error("fold: " .. tostring(v)) end
    assert(v == FOLD_EVENTS)
  end
else
  error("unknown OP " .. op)
end

for _ = 1, 20 do one() end      -- warm up: sessions, statements, caches
local n, t0 = 0, now()
local deadline, t = t0 + seconds, t0
while t < deadline do
  for _ = 1, 20 do one() end
  n = n + 20
  t = now()
end
store:close()
io.write(("ops %d seconds %.6f\n"):format(n, t - t0))
