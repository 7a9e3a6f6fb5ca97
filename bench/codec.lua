-- bench/codec.lua - es.json against lua-cjson on the same event payloads.
--
--   LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/lua5.4/?.so;;" lua5.4 bench/codec.lua
--   LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/luajit/?.so;;" luajit bench/codec.lua
--
-- Prints one `name value unit` line per figure (MB/s of JSON text, and the
-- ratio eventsourcing / cjson). The payload mix is built deterministically:
-- OrderCreated / ItemAdded / ItemRemoved / OrderPlaced / OrderCancelled
-- events with metadata (uuids, ISO timestamps), some non-ASCII strings,
-- integers, some floats and nested arrays of items.
local es = require "eventsourcing"
local json = es.json

local flavour = rawget(_G, "jit") and "luajit" or _VERSION:gsub("Lua ", "lua")
local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS")) or 7
local MIN_TIME = tonumber(os.getenv("BENCH_MIN_TIME")) or 0.2 -- seconds per round

local ok_cjson, cjson = pcall(require, "cjson")
if not ok_cjson then cjson = nil end

-- deterministic generator (Park-Miller; exact in doubles, so both flavours
-- build the same corpus; no math.random)
local seed = 12345
local function rnd(n)
  seed = (seed * 16807) % 2147483647
  return seed % n
end
local HEX = "0123456789abcdef"
local function uuid()
  local t = {}
  for i = 1, 32 do
    local k = rnd(16) + 1
    t[#t + 1] = HEX:sub(k, k)
    if i == 8 or i == 12 or i == 16 or i == 20 then t[#t + 1] = "-" end
  end
  return table.concat(t)
end
local function timestamp()
  return string.format("2026-%02d-%02dT%02d:%02d:%02d.%06dZ", rnd(12) + 1,
    rnd(28) + 1, rnd(24), rnd(60), rnd(60), rnd(1000000))
end
local NAMES = { "Ada Lovelace", "Grace Hopper", "José Martínez", "Zoë Müller",
  "Søren Kierkegaard", "李小龙", "Ольга Петрова", "Chloé Dubois", "Alan Turing" }
local PRODUCTS = { "Espresso beans 1kg", "Café crème mug", "Grinder (burr)",
  "Milk frother", "Thé vert – sencha", "Kettle 1.7 L", "Filter papers ×100",
  "Tamper 58mm", "Scale \"precision\"", "Gift card" }
local CITIES = { "Paris", "Zürich", "München", "São Paulo", "Kraków", "Oslo", "Lyon" }

local function pick(t) return t[rnd(#t) + 1] end
local function metadata()
  return {
    user = uuid(), correlation_id = uuid(), causation_id = uuid(),
    at = timestamp(), source = "web", ip = ("10.%d.%d.%d"):format(rnd(256), rnd(256), rnd(256)),
  }
end
local function item()
  return { sku = ("SKU-%06d"):format(rnd(1000000)), name = pick(PRODUCTS),
    quantity = rnd(5) + 1, unit_price = rnd(10000) + 99,
    weight_kg = (rnd(5000) + 1) / 100, tags = json.array { "coffee", pick({ "new", "sale", "gift" }) } }
end

local function event(i)
  local k = i % 10
  local data
  if k == 0 then
    data = { order_id = uuid(), customer_id = uuid(), customer_name = pick(NAMES),
      currency = "EUR", shipping = { street = rnd(200) + 1 .. " Rue de la Paix",
        city = pick(CITIES), zip = ("%05d"):format(rnd(100000)), country = "FR" },
      created_at = timestamp() }
  elseif k <= 5 then
    data = { order_id = uuid(), item = item(), line = rnd(20) + 1 }
  elseif k <= 6 then
    data = { order_id = uuid(), sku = ("SKU-%06d"):format(rnd(1000000)), reason = "customer changed mind" }
  elseif k <= 8 then
    local items = {}
    for j = 1, rnd(8) + 1 do items[j] = item() end
    data = { order_id = uuid(), items = items, total = rnd(100000), discount = rnd(100) / 4,
      tax_rate = 0.2, placed_at = timestamp(), gift = rnd(2) == 1, note = json.null }
  else
    data = { order_id = uuid(), reason = "Paiement refusé: carte expirée", cancelled_at = timestamp() }
  end
  return { id = uuid(), type = ({ "OrderCreated", "ItemAdded", "ItemAdded", "ItemAdded", "ItemAdded",
    "ItemAdded", "ItemRemoved", "OrderPlaced", "OrderPlaced", "OrderCancelled" })[k + 1],
    version = i, data = data, metadata = metadata() }
end

-- cjson needs plain tables (json.null -> cjson.null; no shape metatables).
local function to_cjson(v)
  if v == json.null then return cjson.null end
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = to_cjson(x) end
  return t
end

local N = tonumber(os.getenv("BENCH_EVENTS")) or 200
local events, texts, bytes = {}, {}, 0
for i = 1, N do
  events[i] = event(i)
  texts[i] = assert(json.encode(events[i]))
  bytes = bytes + #texts[i]
end
local cevents = {}
if cjson then
  for i = 1, N do cevents[i] = to_cjson(events[i]) end
end

local clock = os.clock
-- best MB/s over ROUNDS rounds, each running fn over the corpus repeatedly
-- for at least MIN_TIME seconds
local function measure(fn, arg)
  local best = 0
  for _ = 1, ROUNDS do
    local reps, t0 = 0, clock()
    local t
    repeat
      fn(arg)
      reps = reps + 1
      t = clock() - t0
    until t >= MIN_TIME
    local mbs = bytes * reps / t / 1e6
    if mbs > best then best = mbs end
  end
  return best
end

local es_encode, es_decode = json.encode, json.decode
local function enc_es(list) for i = 1, #list do es_encode(list[i]) end end
local function dec_es(list) for i = 1, #list do es_decode(list[i]) end end
local enc_cj, dec_cj
if cjson then
  local ce, cd = cjson.encode, cjson.decode
  enc_cj = function(list) for i = 1, #list do ce(list[i]) end end
  dec_cj = function(list) for i = 1, #list do cd(list[i]) end end
end

-- sanity: both decoders agree on the shape of the corpus
if cjson then
  -- key order is unspecified: compare lengths of the re-encoded text
  local a = es_encode(es_decode(texts[N]))
  assert(#a == #texts[N], "es.json does not round-trip its own output")
  assert(type(cjson.decode(texts[N])) == "table")
end

local prefix = "codec." .. flavour .. "."
print(("# %s, %d events, %d bytes of JSON per pass, best of %d rounds"):format(
  flavour, N, bytes, ROUNDS))
for _, op in ipairs({ "encode", "decode" }) do
  collectgarbage()
  local es_fn = op == "encode" and enc_es or dec_es
  local es_mbs = measure(es_fn, op == "encode" and events or texts)
  print(("%s%s.eventsourcing %.1f MB/s"):format(prefix, op, es_mbs))
  if cjson then
    collectgarbage()
    local cj_fn = op == "encode" and enc_cj or dec_cj
    local cj_mbs = measure(cj_fn, op == "encode" and cevents or texts)
    print(("%s%s.cjson %.1f MB/s"):format(prefix, op, cj_mbs))
    print(("%s%s.ratio %.2f x"):format(prefix, op, es_mbs / cj_mbs))
  else
    print(("# %s%s.cjson not available (require \"cjson\" failed)"):format(prefix, op))
  end
end
