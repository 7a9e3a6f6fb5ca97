-- examples/orders/http/sse_latency.lua: SSE delivery latency of a running
-- service (make serve): from the start of an append to the moment a client
-- of GET /orders/{id}/events has read the event. Appends come at random
-- moments of the poller's period; prints the median and the 99th
-- percentile. The client is curl -N; appends go straight to the store.
--
--   ES_DATABASE_URL=... [ES_SCHEMA=...] lua5.4 examples/orders/http/sse_latency.lua \
--       http://127.0.0.1:8080 [samples=300]
local es = require "eventsourcing"
local core = require "eventsourcing.core"

local base = assert(arg[1], "usage: sse_latency.lua BASE_URL [SAMPLES]")
local n = tonumber(arg[2] or "") or 300
local url = assert(os.getenv("ES_DATABASE_URL"), "ES_DATABASE_URL is not set")
local schema = os.getenv("ES_SCHEMA")
if schema == "" then schema = nil end
local token = os.getenv("ES_TOKEN") or "alice-token-0123456789"
local poll = tonumber(os.getenv("ES_HTTP_SSE_POLL") or "") or 0.05

local store = assert(es.open(url, schema and { schema = schema } or nil))

local function sh_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
local p = assert(io.popen(("curl -sS -X POST -H %s -d '{}' %s"):format(
  sh_quote("Authorization: Bearer " .. token), sh_quote(base .. "/orders"))))
local created = es.json.decode(p:read("*a"))
p:close()
local id = assert(type(created) == "table" and created.id, "could not create an order")

local stream = assert(io.popen(("curl -sN -H 'Accept: text/event-stream' -H %s %s"):format(
  sh_quote("Authorization: Bearer " .. token), sh_quote(base .. "/orders/" .. id .. "/events"))))
-- read until the event with this id has been received
local function until_id(want)
  for line in stream:lines() do
    if line == "id: " .. want then
      stream:read("*l"); stream:read("*l")   -- event:, data:
      return core.now()
    end
  end
  error("the stream ended")
end
until_id("1")   -- the history

local samples = {}
math.randomseed(os.time())
for v = 2, n + 1 do
  core.sleep(math.random() * poll)
  local t0 = core.now()
  assert(store:append("Order-" .. id, { { type = "ItemAdded",
    data = { product_id = "lat" .. v, quantity = 1, unit_price = 1 },
    metadata = { schema_version = 2 } } }, { expected_version = v - 1 }))
  samples[#samples + 1] = until_id(tostring(v)) - t0
end
stream:close()
table.sort(samples)
local function pct(q) return samples[math.max(1, math.ceil(q * #samples))] * 1000 end
print(("sse_latency_median %.1f ms"):format(pct(0.5)))
print(("sse_latency_p99 %.1f ms"):format(pct(0.99)))
print(("sse_latency_samples %d n"):format(#samples))
