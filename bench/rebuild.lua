-- bench/rebuild.lua: rebuild of rm_orders (examples/orders/read_model.lua)
-- from ES_BENCH_EVENTS events (default 1,000,000 = 200,000 orders of 5
-- events), against a naive loop that runs one SQL statement (INSERT or
-- UPDATE) per event, in the same run; then a projector catching up over
-- the same events from its first checkpoint. Prints `name value unit`
-- lines, where the rebuild's time went per phase, and the rate of the bare
-- read loop (no handler) over the same events.
--
--   ES_BENCH_DATABASE_URL (or ES_TEST_DATABASE_URL)  the database
--   ES_BENCH_EVENTS   events to generate (multiple of 10,000)
--   ES_BENCH_NAIVE    events the naive loop applies (default 100,000)
--   ES_BENCH_BATCH    rebuild batch size (default 10,000)
--   ES_BENCH_WORKERS  worker counts of the rebuilds after the first
--                     (default "2"; projector:rebuild's workers option)
--
-- Event layout: see bench/rebuild_events.lua.
local es = require "eventsourcing"
local orders_rm = require "orders.read_model"

local url = os.getenv("ES_BENCH_DATABASE_URL") or os.getenv("ES_TEST_DATABASE_URL")
if not url or url == "" then
  io.stderr:write("bench/rebuild.lua: set ES_BENCH_DATABASE_URL or ES_TEST_DATABASE_URL\n")
  os.exit(2)
end
local N = tonumber(os.getenv("ES_BENCH_EVENTS") or "1000000")
N = math.max(10000, math.floor(N / 10000) * 10000)
local NAIVE = math.min(N, tonumber(os.getenv("ES_BENCH_NAIVE") or "100000"))
local BATCH = tonumber(os.getenv("ES_BENCH_BATCH") or "10000")
local schema = ("bench_rebuild_%d"):format(os.time() % 1000000)

local store = assert(es.open(url, { schema = schema }))
assert(store:migrate())
local q = '"' .. schema .. '"'

-- the rebuild's phases (projector:rebuild's timings option), in order
local PHASES = { "read", "keys", "load", "handlers", "build", "encode", "write", "indexes", "wait",
  "swap" }

-- a clock of this process: no round trip inside the timed part
local now = require("eventsourcing.core").monotonic

-- 1. events, generated in the database (bench/rebuild_events.lua)
local t0 = now()
dofile("bench/rebuild_events.lua")(store, q, N)
io.stderr:write(("generated %d events in %.1f s\n"):format(N, now() - t0))

-- 1b. the bare read a rebuild does (types filtered in SQL, prefetch, no
-- checkpoint string per event, ids and metadata made only when read), no
-- handler: the ceiling for one worker
local function bare_read()
  local types = { "OrderCreated", "ItemAdded", "ItemRemoved", "OrderPlaced", "OrderCancelled" }
  local t, c, n, after = now(), os.clock(), 0, nil
  repeat
    local b, cp = assert(store:read_all({ after = after, limit = BATCH, prefetch = true, types = types,
      checkpoints = false, lazy = true }))
    n, after = n + #b, cp
  until #b < BATCH
  assert(n == N, ("bare read got %d of %d events"):format(n, N))
  return N / (now() - t), (os.clock() - c) * 1e6 / N
end
local bare_rate, bare_cpu = bare_read()

-- 2. the projector's rebuild
local projector = es.projector(store, { orders_rm.Orders }, { batch_size = BATCH })
assert(projector:migrate())
t0 = now()
local c0 = os.clock()
local timings = {}
local done = assert(projector:rebuild("rm_orders", { batch_size = BATCH, bar = false, timings = timings }))
local rebuild_s = now() - t0
local rebuild_cpu = os.clock() - c0
assert(done == N, ("rebuild replayed %d of %d events"):format(done, N))
local rows = store:query(("SELECT count(*) AS n, sum(total) AS t FROM %s.rm_orders"):format(q))[1]
assert(rows.n == N / 5, ("rm_orders has %d rows, expected %d"):format(rows.n, N / 5))
local sample = assert(orders_rm.get_order(store, "1"))
assert(sample.total == 2500 and sample.status == "placed" and sample.item_count == 1, "wrong row for order 1")

-- 2a. the same rebuild spread over worker processes (stream partitions):
-- the same table (row count and totals), its rate beside one worker's
local by_workers = {}
local function table_sum()
  local r = store:query(("SELECT count(*) AS n, sum(total) AS t, sum(version) AS v FROM %s.rm_orders"):format(q))[1]
  return ("%s/%s/%s"):format(tostring(r.n), tostring(r.t), tostring(r.v))
end
local one_worker_sum = table_sum()
for w in (os.getenv("ES_BENCH_WORKERS") or "2"):gmatch("%d+") do
  w = tonumber(w)
  local tw, cw = now(), os.clock()
  local tm = {}
  local dw = assert(projector:rebuild("rm_orders", { batch_size = BATCH, workers = w, timings = tm }))
  local secs = now() - tw
  assert(dw == N, ("rebuild with %d workers replayed %d of %d events"):format(w, dw, N))
  assert(table_sum() == one_worker_sum, ("rebuild with %d workers: table differs"):format(w))
  by_workers[#by_workers + 1] = { w = w, secs = secs, cpu = os.clock() - cw, timings = tm }
end

-- 2b. a projector catching up over the same events from its first checkpoint
assert(projector:reset("rm_orders"))
t0, c0 = now(), os.clock()
local caught = assert(projector:catch_up())
local catchup_s, catchup_cpu = now() - t0, os.clock() - c0
assert(caught == N, ("catch_up handled %d of %d events"):format(caught, N))

-- 3. the naive alternative: one statement per event, a transaction per batch
assert(store:query(([[CREATE TABLE %s.rm_naive (id text PRIMARY KEY, customer_id text,
  status text, items jsonb, item_count integer, total bigint, created_at timestamptz,
  placed_at timestamptz, cancelled_at timestamptz, cancel_reason text, version bigint)]]):format(q)))
local SQL = {
  OrderCreated = ("INSERT INTO %s.rm_naive (id, customer_id, status, items, item_count, total, created_at, "
    .. "version) VALUES ($1, $2, 'draft', '[]', 0, 0, $3::timestamptz, $4)"):format(q),
  ItemAdded = ("UPDATE %s.rm_naive SET items = items || jsonb_build_array(jsonb_build_object("
    .. "'product_id', $2::text, 'quantity', $3::int, 'unit_price', $4::bigint)), item_count = item_count + 1, "
    .. "total = total + $3::bigint * $4::bigint, version = $5 WHERE id = $1"):format(q),
  ItemRemoved = ("UPDATE %s.rm_naive SET items = (SELECT coalesce(jsonb_agg(i), '[]') FROM "
    .. "jsonb_array_elements(items) i WHERE i->>'product_id' <> $2), item_count = item_count - 1, "
    .. "total = total - $3::bigint * $4::bigint, version = $5 WHERE id = $1"):format(q),
  OrderPlaced = ("UPDATE %s.rm_naive SET status = 'placed', total = $2, placed_at = $3::timestamptz, "
    .. "version = $4 WHERE id = $1"):format(q),
  OrderCancelled = ("UPDATE %s.rm_naive SET status = 'cancelled', cancel_reason = $2, "
    .. "cancelled_at = $3::timestamptz, version = $4 WHERE id = $1"):format(q),
}
local function naive_apply(e)
  local id, d = e.stream:sub(7), e.data
  if e.type == "OrderCreated" then
    return store:query(SQL.OrderCreated, id, d.customer_id, e.recorded_at, e.version)
  elseif e.type == "ItemAdded" or e.type == "ItemRemoved" then
    return store:query(SQL[e.type], id, d.product_id, d.quantity, d.unit_price, e.version)
  elseif e.type == "OrderPlaced" then
    return store:query(SQL.OrderPlaced, id, d.total, e.recorded_at, e.version)
  else
    return store:query(SQL.OrderCancelled, id, d.reason, e.recorded_at, e.version)
  end
end
t0 = now()
local after, applied = nil, 0
while applied < NAIVE do
  local batch, cp = assert(store:read_all({ after = after, limit = math.min(BATCH, NAIVE - applied) }))
  if #batch == 0 then break end
  assert(store:begin())
  for _, e in ipairs(batch) do assert(naive_apply(e)) end
  assert(store:commit())
  applied, after = applied + #batch, cp
end
local naive_s = now() - t0

store:query(("DROP SCHEMA %s CASCADE"):format(q))
store:close()

local rate, naive_rate = N / rebuild_s, applied / naive_s
-- where the rebuild's time went, per phase (seconds and microseconds per event)
local accounted = 0
for _, phase in ipairs(PHASES) do
  local t = timings[phase] or 0
  accounted = accounted + t
  print(("rebuild_phase_%s %.3f s %.2f us/event"):format(phase, t, t * 1e6 / N))
end
print(("rebuild_phase_other %.3f s %.2f us/event"):format(rebuild_s - accounted,
  (rebuild_s - accounted) * 1e6 / N))
print(("rebuild_rm_orders_events %d events"):format(N))
print(("rebuild_rm_orders_seconds %.2f s"):format(rebuild_s))
print(("rebuild_rm_orders_rate %.0f events/s"):format(rate))
for _, r in ipairs(by_workers) do
  print(("rebuild_rm_orders_%d_workers_seconds %.2f s"):format(r.w, r.secs))
  print(("rebuild_rm_orders_%d_workers_rate %.0f events/s"):format(r.w, N / r.secs))
  print(("rebuild_%d_workers_speedup %.2f x"):format(r.w, rebuild_s / r.secs))
  -- the parent's CPU only (its partition, the tail, the swap)
  print(("rebuild_%d_workers_parent_cpu %.2f us/event"):format(r.w, r.cpu * 1e6 / N))
  -- the parent's phases: its partition's replay, then indexes, wait, swap
  -- (waiting for the other workers falls in "other")
  local acc = 0
  for _, phase in ipairs(PHASES) do
    local t = r.timings[phase] or 0
    acc = acc + t
    print(("rebuild_%d_workers_phase_%s %.3f s"):format(r.w, phase, t))
  end
  print(("rebuild_%d_workers_phase_other %.3f s"):format(r.w, r.secs - acc))
end
print(("catch_up_rm_orders_rate %.0f events/s"):format(N / catchup_s))
print(("read_all_bare_rate %.0f events/s"):format(bare_rate))
-- this process's CPU per event: what the client costs, much less swayed
-- by other work on the machine than the rates (wall clock) are
print(("rebuild_client_cpu %.2f us/event"):format(rebuild_cpu * 1e6 / N))
print(("catch_up_client_cpu %.2f us/event"):format(catchup_cpu * 1e6 / N))
print(("read_all_bare_client_cpu %.2f us/event"):format(bare_cpu))
print(("naive_update_per_event_rate %.0f events/s"):format(naive_rate))
print(("rebuild_speedup_vs_naive %.1f x"):format(rate / naive_rate))
