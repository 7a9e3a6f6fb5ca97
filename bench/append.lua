-- bench/append.lua - one append client: appends for a while, prints its rate.
--
--   lua5.4 bench/append.lua URL SCHEMA CLIENT SIZE SECONDS
--
-- SIZE events per append (one transaction each), to streams of its own
-- (Bench<CLIENT>-<k>, k = 1..10, round robin) with the exact expected version
-- checked. Prints `events <n> seconds <s> appends <m>` for scripts/bench.sh,
-- which runs two clients at once and sums their rates.
local es = require "eventsourcing"

local url, schema = arg[1], arg[2]
local client, size, seconds = tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5])
assert(url and schema and client and size and seconds,
  "usage: append.lua URL SCHEMA CLIENT SIZE SECONDS")

local store = assert(es.open(url, { schema = schema }))
-- a clock of this process: no round trip inside the timed part
local now = require("eventsourcing.core").monotonic

local STREAMS = 10
local versions = {}
local names = {}
for k = 1, STREAMS do
  names[k] = ("Bench%d_%d-%d"):format(client, size, k)
  versions[k] = assert(store:version(names[k]))
end

local batch = {}
for j = 1, size do
  batch[j] = { type = "Ticked", data = { n = j, note = "hello" } }
end
local event = size == 1 and batch[1] or batch

local appends, k = 0, 0
local function one()
  k = k % STREAMS + 1
  local r, err = store:append(names[k], event, { expected_version = versions[k] })
  if not r then error("append: " .. tostring(err)) end
  versions[k] = r.version
  appends = appends + 1
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
