-- examples/orders/demo.lua: a narrated walk-through of the order service.
--
--   make demo                                  (starts a throwaway PostgreSQL)
--   LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/lua5.4/?.so;;" \
--     lua5.4 examples/orders/demo.lua [URL|memory:]
--
-- With a PostgreSQL URL the demo works in its own schema (ES_DEMO_SCHEMA,
-- default "es_demo"), emptied first.
local es = require "eventsourcing"
local service = require "orders.service"

local url = arg[1] or os.getenv("ES_DATABASE_URL") or "memory:"
local schema = os.getenv("ES_DEMO_SCHEMA") or "es_demo"

-- ---- presentation helpers ------------------------------------------------

local function say(fmt, ...) io.write((fmt):format(...), "\n") end
local step_no = 0
local function step(title)
  step_no = step_no + 1
  local line = ("%d. %s"):format(step_no, title)
  io.write("\n", line, "\n", ("-"):rep(#line:gsub("[\128-\191]", "")), "\n")
end

local function money(cents)
  local neg = cents < 0 and "-" or ""
  cents = math.abs(cents)
  return ("%s$%d.%02d"):format(neg, math.floor(cents / 100), cents % 100)
end

local function short(id) return id:sub(-6) end

local function time_of(iso) return iso and iso:match("T(%d%d:%d%d:%d%d%.?%d*)") or "-" end

local function show_order(o, indent)
  indent = indent or "   "
  say("%sorder …%s for %s: %s, %d item line(s), total %s (version %d)", indent,
    short(o.id), o.customer_id, o.status:upper(), #o.items, money(o.total), o.version)
  for _, it in ipairs(o.items) do
    say("%s  - %-12s %3d x %8s = %9s", indent, it.product_id, it.quantity,
      money(it.unit_price), money(it.quantity * it.unit_price))
  end
end

local function must(r, err)
  if r == nil then
    io.stderr:write("demo: unexpected failure: ", tostring(err), "\n")
    os.exit(1)
  end
  return r
end

local function try(label, r, err)
  if r then
    say("   %s: ok", label)
  else
    say("   %s: REFUSED (%s) - %s", label, err.kind, err.message)
  end
  return r, err
end

-- ---- the store -----------------------------------------------------------

local store
if url == "memory:" then
  store = must(es.open("memory:"))
else
  store = must(es.open(url, { schema = schema }))
  if store.query then
    -- start from an empty demo schema (the demo's own, never anything else)
    store:query(('DROP SCHEMA IF EXISTS "%s" CASCADE'):format(schema:gsub('"', '')))
    store:close()
    store = must(es.open(url, { schema = schema }))
  end
end
must(service.migrate(store))

local svc = service.new(store, { metadata = { app = "demo" } })
local as = function(user) return { user = user } end

say("Event sourcing demo: an order service on %s", url == "memory:" and "the in-memory store"
  or ("PostgreSQL (schema %s)"):format(schema))
say("Every change is an event appended to the order's stream; the current state,")
say("the audit trail and the past states are all computed from those events.")

-- ---- 1. two customers open orders ---------------------------------------------

step("Two customers open orders")
local alice1 = must(svc:create_order({ customer_id = "alice" }, as("alice")))
say("   Alice opens order …%s", short(alice1))
local bob1 = must(svc:create_order({ customer_id = "bob" }, as("bob")))
say("   Bob opens order …%s", short(bob1))

step("They fill their baskets")
must(svc:add_item({ order_id = alice1, product_id = "teapot", quantity = 1, unit_price = 3450 }, as("alice")))
say("   Alice adds 1 teapot at %s", money(3450))
must(svc:add_item({ order_id = alice1, product_id = "green-tea", quantity = 3, unit_price = 899 }, as("alice")))
say("   Alice adds 3 packs of green tea at %s", money(899))
must(svc:add_item({ order_id = bob1, product_id = "mug", quantity = 2, unit_price = 1250 }, as("bob")))
say("   Bob adds 2 mugs at %s", money(1250))
must(svc:add_item({ order_id = bob1, product_id = "coffee", quantity = 1, unit_price = 1599 }, as("bob")))
say("   Bob adds 1 bag of coffee at %s", money(1599))
must(svc:add_item({ order_id = alice1, product_id = "green-tea", quantity = 2, unit_price = 899 }, as("alice")))
say("   Alice adds 2 more packs of green tea (same product: the quantity grows)")
show_order(must(svc:get_order(alice1)))
show_order(must(svc:get_order(bob1)))

step("Bob changes his mind about the mugs")
must(svc:remove_item({ order_id = bob1, product_id = "mug" }, as("bob")))
say("   Bob removes the mugs")
show_order(must(svc:get_order(bob1)))

step("The rules refuse what the business does not allow")
try("Bob adds coffee again at a different price",
  svc:add_item({ order_id = bob1, product_id = "coffee", quantity = 1, unit_price = 1399 }, as("bob")))
try("Bob removes a product that is not in his order",
  svc:remove_item({ order_id = bob1, product_id = "mug" }, as("bob")))
try("Bob asks for 20,000 bags of coffee",
  svc:add_item({ order_id = bob1, product_id = "coffee", quantity = 20000, unit_price = 1599 }, as("bob")))
local empty = must(svc:create_order({ customer_id = "bob" }, as("bob")))
try(("Bob places an empty order …%s"):format(short(empty)), svc:place_order({ order_id = empty }, as("bob")))
say("   (refused commands append nothing: the orders are unchanged)")

step("Orders are placed and cancelled")
local placed = must(svc:place_order({ order_id = alice1 }, as("alice")))
say("   Alice places her order: total %s recorded in the OrderPlaced event", money(placed.total))
local again = must(svc:place_order({ order_id = alice1 }, as("alice")))
say("   Alice clicks 'place' twice: a no-op (%d new events, still version %d)", again.events, again.version)
try("Alice tries to add a teacup to her placed order",
  svc:add_item({ order_id = alice1, product_id = "teacup", quantity = 1, unit_price = 700 }, as("alice")))
must(svc:cancel_order({ order_id = empty, reason = "opened by mistake" }, as("bob")))
say("   Bob cancels his empty order …%s (\"opened by mistake\")", short(empty))
must(svc:place_order({ order_id = bob1 }, as("bob")))
say("   Bob places order …%s", short(bob1))
must(svc:cancel_order({ order_id = bob1, reason = "found it cheaper" }, as("support-desk")))
say("   The support desk cancels Bob's placed order …%s on his request", short(bob1))
show_order(must(svc:get_order(bob1)))

step(("The audit trail of Bob's order …%s"):format(short(bob1)))
local trail = must(svc:history(bob1))
local function describe_event(e)
  local d = e.data
  if e.type == "OrderCreated" then return "order opened for " .. d.customer_id
  elseif e.type == "ItemAdded" then
    return ("added %d x %s at %s"):format(d.quantity, d.product_id, money(d.unit_price))
  elseif e.type == "ItemRemoved" then return ("removed %s (%d)"):format(d.product_id, d.quantity)
  elseif e.type == "OrderPlaced" then return "placed, total " .. money(d.total)
  elseif e.type == "OrderCancelled" then
    return ("cancelled (was %s): %s"):format(d.previous_status, d.reason or "no reason given")
  end
  return e.type
end
say("   %-3s %-15s %-13s %-14s %s", "v", "recorded at", "by", "event", "what")
for _, e in ipairs(trail) do
  say("   %-3d %-15s %-13s %-14s %s", e.version, time_of(e.recorded_at), e.metadata.user or "?",
    e.type, describe_event(e))
end

step("Time travel: Bob's order as it was earlier")
local removal
for _, e in ipairs(trail) do if e.type == "ItemRemoved" then removal = e end end
local earlier = must(svc:order_at(bob1, removal.recorded_at))
say("   Just before %s (when Bob removed the mugs) the order was:", time_of(removal.recorded_at))
show_order(earlier)
local v = must(svc:order_at(bob1, 4))
say("   And at version 4 (by version number rather than by instant):")
show_order(v)

step("Each customer's orders, newest first")
for _, customer in ipairs { "alice", "bob" } do
  local list = must(svc:list_orders(customer))
  say("   %s has %d order(s):", customer, #list)
  for _, o in ipairs(list) do
    say("     …%s  %-9s %9s  opened %s", short(o.id), o.status, money(o.total), time_of(o.created_at))
  end
end

local events_in_orders = #must(svc:history(alice1)) + #trail + #must(svc:history(empty))

step("Replay: the read model rebuilt from the events alone")
do
  local orders_rm = require "orders.read_model"
  local projector = es.projector(store, { orders_rm.Orders })
  must(projector:migrate())
  local before = must(svc:list_orders("alice"))
  local replayed = must(projector:rebuild("rm_orders", { bar = false }))
  local after = must(svc:list_orders("alice"))
  say("   Replayed %d events into a fresh rm_orders table and swapped it in.", replayed)
  say("   Alice's list before: %d order(s), after: %d order(s), totals %s and %s.",
    #before, #after, money(before[1] and before[1].total or 0), money(after[1] and after[1].total or 0))
end

step("Workflows: stock reservations, an out-of-stock compensation, the trace, expiry")
require("orders.workflows").demo(store, function(line) say("   %s", line) end)

say("\nDone: %d events in the first three orders; nothing was ever updated in place.",
  events_in_orders)
store:close()
