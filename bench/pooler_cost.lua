-- bench/pooler_cost.lua - what one call costs with named prepared statements
-- against unnamed ones, in one process, the two (and PgBouncer) taking turns
-- round by round so a busy machine weighs on each alike. Median of ROUNDS.
--
--   lua5.4 bench/pooler_cost.lua DIRECT_URL PGBOUNCER_URL SCHEMA [ROUNDS]
--
-- SCHEMA must hold Fold-1 (bench/pooler_client.lua setup). Prints
-- `pooler_call_<op>_<way> <median> us` for op append / version / fold and
-- way prepared (direct), unnamed (direct, pooler = "transaction"),
-- pgbouncer (unnamed through PgBouncer).
local es = require "eventsourcing"
local now = require("eventsourcing.core").monotonic

local direct, pooled, schema = arg[1], arg[2], arg[3]
local rounds = tonumber(arg[4] or "9")
assert(direct and pooled and schema, "usage: pooler_cost.lua DIRECT_URL PGBOUNCER_URL SCHEMA [ROUNDS]")
local CALLS = 300

local ways = {
  { name = "prepared", store = assert(es.open(direct, { schema = schema })) },
  { name = "unnamed", store = assert(es.open(direct, { schema = schema, pooler = "transaction" })) },
  { name = "pgbouncer", store = assert(es.open(pooled, { schema = schema, pooler = "transaction" })) },
}
local handlers = { Ticked = function(s, e) return s + e.data.n end }
local event = { type = "Ticked", data = { n = 1, note = "hello" } }
local ops = {
  append = function(s, w) assert(s:append("Cost-" .. w, event)) end,
  version = function(s) assert(s:version("Fold-1")) end,
  fold = function(s) assert(s:fold("Fold-1", handlers, 0)) end,
}

local function median(t)
  table.sort(t)
  return t[math.floor((#t + 1) / 2)]
end

for _, op in ipairs { "append", "version", "fold" } do
  local f, samples = ops[op], {}
  for _, w in ipairs(ways) do samples[w.name] = {}; f(w.store, w.name) end   -- warm up
  for _ = 1, rounds do
    for _, w in ipairs(ways) do
      local t0 = now()
      for _ = 1, CALLS do f(w.store, w.name) end
      local t = samples[w.name]
      t[#t + 1] = (now() - t0) / CALLS * 1e6
    end
  end
  for _, w in ipairs(ways) do
    io.write(("pooler_call_%s_%s %.0f us\n"):format(op, w.name, median(samples[w.name])))
  end
end
for _, w in ipairs(ways) do w.store:close() end
