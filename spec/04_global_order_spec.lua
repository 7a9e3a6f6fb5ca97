-- Global order: read_all never skips an event that a concurrent writer
-- commits late with a lower position, delivers every committed event exactly
-- once, never a rolled-back one, and needs no timeouts to be right.
--
-- Part 1 is deterministic (three connections in this process); part 2 runs
-- four writer processes against a reader in this process.
local es = require "eventsourcing"
local helpers = require "helpers"

local URL = helpers.database_url()   -- fails loudly when not configured

local fresh_schema = helpers.fresh_schema

local function open(schema)
  return assert(es.open(URL, { schema = schema }))
end

local function qident(schema) return '"' .. schema .. '"' end

-- Reads everything read_all has to give from checkpoint `cp` on, in batches
-- of `limit`; returns the events and the new checkpoint.
local function drain(store, cp, limit)
  local out = {}
  while true do
    local batch, next_cp = store:read_all({ after = cp, limit = limit or 1000 })
    assert(batch, tostring(next_cp))
    for _, e in ipairs(batch) do out[#out + 1] = e end
    cp = next_cp
    if #batch == 0 then return out, cp end
  end
end

local function ids_of(events)
  local t = {}
  for _, e in ipairs(events) do t[#t + 1] = e.id end
  return t
end

describe("read_all global order (postgresql)", function()
  local schema, A, B, R

  before_each(function()
    schema = fresh_schema()
    R = open(schema)
    assert(R:migrate(helpers.migrate_opts()))
    A, B = open(schema), open(schema)
  end)

  -- On Citus an open transaction holds back only the events of its own
  -- worker (each worker has its own transaction ids; read_all keeps a
  -- cursor per shard): the streams of one scenario are on one shard.
  local function on_one_shard(...) return helpers.on_one_shard(R, ...) end

  after_each(function()
    for _, s in ipairs { A, B, R } do
      if s and not s:is_closed() then pcall(s.rollback, s); s:close() end
    end
  end)

  it("the scenario is real: a naive reader by position skips a late commit", function()
    local late_a, late_b = on_one_shard("Late-a", "Late-b")
    A:begin()
    local ra = assert(A:append(late_a, { type = "A" }))
    local rb = assert(B:append(late_b, { type = "B" }))
    assert.is_true(ra.position < rb.position, "A holds the lower position")
    local naive_sql = "SELECT id::text AS id, position FROM " .. qident(schema)
      .. ".events WHERE position > $1 ORDER BY position"
    local last, seen = 0, {}
    for _, row in ipairs(assert(R:query(naive_sql, last))) do
      seen[#seen + 1] = row.id; last = row.position
    end
    assert.equal(rb.position, last, "the naive reader has moved past A's position")
    assert(A:commit())
    for _, row in ipairs(assert(R:query(naive_sql, last))) do seen[#seen + 1] = row.id end
    -- A's event is in the table but the naive reader will never see it
    local all = assert(R:query("SELECT count(*) AS n FROM " .. qident(schema) .. ".events"))
    assert.equal(2, all[1].n)
    assert.equal(1, #seen, "naive reader by position skipped A's late commit")
  end)

  it("does not return a later commit while an older transaction is open, then returns both once", function()
    local late_a, late_b = on_one_shard("Late-a", "Late-b")
    local _, cp0 = R:read_all({})
    A:begin()
    local ra = assert(A:append(late_a, { type = "A", data = { who = "a" } }))
    local rb = assert(B:append(late_b, { type = "B", data = { who = "b" } }))
    assert.is_true(ra.position < rb.position)

    -- B committed, A is still open: B's event must be held back
    local held, cp1 = R:read_all({ after = cp0 })
    assert(held, tostring(cp1))
    assert.same({}, ids_of(held), "read_all returned B's event while A's older transaction is open")
    local held2 = drain(R, cp1)
    assert.same({}, ids_of(held2))

    assert(A:commit())
    local got, cp2 = drain(R, cp1)
    assert.equal(2, #got)
    assert.equal(late_a, got[1].stream)   -- older transaction first
    assert.equal(late_b, got[2].stream)
    assert.equal(ra.position, got[1].position)
    assert.equal(rb.position, got[2].position)
    -- nothing more, and the checkpoint does not go back
    assert.same({}, ids_of((drain(R, cp2))))
    -- from the start: exactly these two, exactly once
    local everything = drain(R, nil, 1)
    assert.equal(2, #everything)
    assert.are_not.equal(everything[1].id, everything[2].id)
  end)

  it("after a rollback delivers the later commit and never the rolled-back event", function()
    local gone_a, kept_b = on_one_shard("Gone-a", "Kept-b")
    local _, cp0 = R:read_all({})
    A:begin()
    assert(A:append(gone_a, { type = "A" }))
    assert(B:append(kept_b, { type = "B" }))
    local held, cp1 = R:read_all({ after = cp0 })
    assert.equal(0, #held)
    assert(A:rollback())
    local got = drain(R, cp1)
    assert.equal(1, #got)
    assert.equal(kept_b, got[1].stream)
  end)

  it("holds back the whole batch behind the oldest open transaction, whatever the batch size", function()
    local slow_a, fast_b = on_one_shard("Slow-a", "Fast-b")
    local _, cp = R:read_all({})
    A:begin()
    assert(A:append(slow_a, { { type = "A" }, { type = "A" }, { type = "A" } }))
    for i = 1, 5 do assert(B:append(fast_b, { type = "B", data = { i = i } })) end
    for _, limit in ipairs { 1, 2, 1000 } do
      local batch = assert(R:read_all({ after = cp, limit = limit }))
      assert.equal(0, #batch)
    end
    assert(A:commit())
    local got = drain(R, cp, 2)
    assert.equal(8, #got)
    for i = 1, 3 do assert.equal(slow_a, got[i].stream); assert.equal(i, got[i].version) end
    for i = 4, 8 do assert.equal(fast_b, got[i].stream); assert.equal(i - 3, got[i].version) end
  end)

  -- A transaction that took its txid early (by writing elsewhere) and then
  -- appends to a stream after a newer transaction appended to it: ordering by
  -- (txid, position) would hand out version 2 before version 1.
  it("delivers a stream's events in version order when an older transaction appends last", function()
    local other, order = on_one_shard("Other-1", "Order-1")
    A:begin()
    assert(A:append(other, { type = "Elsewhere" }))            -- A's txid is older
    assert(B:append(order, { type = "OrderCreated" }, { expected_version = es.NO_STREAM }))
    local ok, err = A:append(order, { type = "ItemAdded" }, { expected_version = 1 })
    if ok then
      assert(A:commit())
    else
      -- refusing the append (a conflict to retry in a new transaction) keeps
      -- the order too
      A:rollback()
      assert.equal("conflict", err.kind)
    end
    local got = drain(R, nil)
    -- every committed event comes back: B's, and A's two if it committed
    assert.equal(ok and 3 or 1, #got)
    local last = {}
    for _, e in ipairs(got) do
      assert.equal((last[e.stream] or 0) + 1, e.version,
        ("read_all gave %s version %d after version %d"):format(e.stream, e.version, last[e.stream] or 0))
      last[e.stream] = e.version
    end
  end)
end)

-- ---------------------------------------------------------------------------
-- Concurrent writers in child processes; the reader follows in this process.

local WRITERS = 4
local ITERATIONS = 40

-- The writer: appends to its own streams (Gw<N>-<k>) with exact expected
-- versions; a deterministic mix of plain appends, transactions that sleep
-- before commit, transactions over two streams, and rolled-back ones.
local WRITER = [==[
local es = require "eventsourcing"
local url, schema, w, iterations = arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4])
local store = assert(es.open(url, { schema = schema }))
local sizes = { 1, 3, 1, 10, 2, 50, 1, 5 }
local versions = { 0, 0, 0 }
local committed, rolled = 0, 0
local seed = w * 7919
local function rnd(n) seed = (seed * 16807) % 2147483647; return seed % n end
local function batch(k, i, rb, n)
  local evs = {}
  for j = 1, n do
    evs[j] = { type = rb and "Rolled" or "Written",
               data = { w = w, i = i, j = j, rb = rb, k = k } }
  end
  return evs
end
local function put(k, i, rb, n)
  local stream = ("Gw%d-%d"):format(w, k)
  local r, err = store:append(stream, batch(k, i, rb, n),
                              { expected_version = versions[k] })
  if not r then error(("writer %d: append %s: %s"):format(w, stream, tostring(err))) end
  if r.version ~= versions[k] + n then error("unexpected version " .. r.version) end
  return n
end
for i = 1, iterations do
  local mode = rnd(7)
  local k = rnd(3) + 1
  local n = sizes[rnd(#sizes) + 1]
  if mode <= 2 then                                   -- plain append
    committed = committed + put(k, i, false, n)
    versions[k] = versions[k] + n
  elseif mode <= 4 then                               -- slow transaction, commit
    assert(store:begin())
    local n1 = put(k, i, false, n)
    local k2 = k % 3 + 1
    local n2 = 0
    if mode == 4 then n2 = put(k2, i, false, 2) end   -- and a second stream
    assert(store:query("SELECT pg_sleep($1)", (rnd(40) + 10) / 1000))
    assert(store:commit())
    versions[k] = versions[k] + n1
    if n2 > 0 then versions[k2] = versions[k2] + n2 end
    committed = committed + n1 + n2
  else                                                -- slow transaction, rollback
    assert(store:begin())
    rolled = rolled + put(k, i, true, n)
    assert(store:query("SELECT pg_sleep($1)", (rnd(30) + 5) / 1000))
    assert(store:rollback())
  end
end
store:close()
io.write(("ok %d %d\n"):format(committed, rolled))
]==]

local function tmpname()
  local name = os.tmpname()
  return name
end

local read_file = helpers.read_file

describe("read_all with concurrent writers (postgresql)", function()
  it("sees every committed event exactly once, no rolled-back one, each stream in version order", function()
    local schema = fresh_schema()
    local R = open(schema)
    assert(R:migrate(helpers.migrate_opts()))
    local clock = open(schema)   -- for sleeping and for the naive reader
    local script = tmpname()
    local f = assert(io.open(script, "w")); f:write(WRITER); f:close()

    local outs, rcs = {}, {}
    for w = 1, WRITERS do
      outs[w], rcs[w] = tmpname(), tmpname()
      os.remove(rcs[w])
      local cmd = ("(%s %s %s %s %d %d >%s 2>&1; echo $? >%s.tmp; mv %s.tmp %s) &"):format(
        helpers.lua_cmd(), helpers.shell_quote(script), helpers.shell_quote(URL),
        schema, w, ITERATIONS, outs[w], rcs[w], rcs[w], rcs[w])
      os.execute(cmd)
    end

    local seen, order = {}, {}       -- id -> true; stream -> last version
    local delivered, cp = 0, nil
    local naive_last, naive_seen = 0, {}
    local naive_sql = "SELECT id::text AS id, position FROM " .. qident(schema)
      .. ".events WHERE position > $1 ORDER BY position"
    local limits = { 7, 50, 1000, 1 }
    local rounds = 0
    local function follow()
      rounds = rounds + 1
      local batch, next_cp = R:read_all({ after = cp, limit = limits[rounds % #limits + 1] })
      assert(batch, tostring(next_cp))
      for _, e in ipairs(batch) do
        assert.is_nil(seen[e.id], "event delivered twice: " .. e.id)
        seen[e.id] = true
        delivered = delivered + 1
        assert.are_not.equal("Rolled", e.type, "a rolled-back event was delivered")
        assert.is_not_true(e.data.rb)
        local last = order[e.stream] or 0
        assert.equal(last + 1, e.version,
          ("stream %s: version %d after %d"):format(e.stream, e.version, last))
        order[e.stream] = e.version
      end
      cp = next_cp
      -- a reader by position alone, on the same interleaving, for contrast
      for _, row in ipairs(assert(clock:query(naive_sql, naive_last))) do
        naive_seen[row.id] = true
        naive_last = row.position
      end
      return #batch
    end

    local function writers_done()
      for w = 1, WRITERS do
        if not read_file(rcs[w]) then return false end
      end
      return true
    end

    -- One late commit for certain, whatever the timing of this machine: a
    -- transaction takes a position now and commits only once a reader by
    -- position has moved past it (the writers' own slow commits may or may
    -- not interleave that way under a slow build).
    local held = open(schema)
    assert(held:begin())
    local held_pos = assert(held:append("Held-1", { type = "Held" })).position
    local held_open = true

    -- follow while the writers run; a deadline only guards against a hung
    -- writer, correctness never depends on it
    local deadline = os.time() + 120
    while not writers_done() do
      if follow() == 0 then assert(clock:query("SELECT pg_sleep(0.002)")) end
      if held_open and naive_last > held_pos then
        assert(held:commit())
        held_open = false
      end
      assert(os.time() < deadline, "writers did not finish in 120 s")
    end
    if held_open then assert(held:commit()) end
    held:close()

    local committed, rolled = 0, 0
    for w = 1, WRITERS do
      local rc, out = read_file(rcs[w]), read_file(outs[w]) or ""
      assert.equal("0", rc:match("%d+"), ("writer %d failed: %s"):format(w, out))
      local c, r = out:match("ok (%d+) (%d+)")
      assert(c, ("writer %d said: %s"):format(w, out))
      committed, rolled = committed + tonumber(c), rolled + tonumber(r)
      os.remove(rcs[w]); os.remove(outs[w])
    end
    os.remove(script)
    assert.is_true(rolled > 0, "the mix includes rolled-back appends")
    committed = committed + 1      -- the held one

    -- catch up: all writers are gone, so this ends as soon as no
    -- transaction older than theirs is open anywhere on the server
    local rows = assert(R:query("SELECT id::text AS id, stream, version, type FROM "
      .. qident(schema) .. ".events ORDER BY stream, version"))
    while delivered < #rows do
      if follow() == 0 then assert(clock:query("SELECT pg_sleep(0.01)")) end
      assert(os.time() < deadline, "reader did not catch up")
    end
    assert.equal(0, follow(), "nothing more after catching up")

    -- the table is the truth
    assert.equal(committed, #rows, "writers' committed count matches the table")
    assert.equal(#rows, delivered)
    local last = {}
    for _, row in ipairs(rows) do
      assert.is_true(seen[row.id], "read_all missed " .. row.id .. " " .. row.stream)
      assert.are_not.equal("Rolled", row.type)
      assert.equal((last[row.stream] or 0) + 1, row.version)
      last[row.stream] = row.version
    end
    for stream, v in pairs(last) do assert.equal(v, order[stream], stream) end

    -- how many events a reader by position alone skipped in this same run
    local naive_missed = 0
    for _, row in ipairs(rows) do if not naive_seen[row.id] then naive_missed = naive_missed + 1 end end
    io.stderr:write(("\n  global order: %d writers, %d committed, %d rolled back, %d read_all rounds,"
      .. " naive position reader skipped %d\n"):format(WRITERS, committed, rolled, rounds, naive_missed))
    assert.is_true(naive_missed > 0,
      "the interleaving never made a reader by position skip: the test did not exercise late commits")
    R:close(); clock:close()
  end)
end)

-- ---------------------------------------------------------------------------
-- Writers in child processes appending to the SAME streams: versions stay
-- dense and unique without any lock of a stream (the unique (stream,
-- version) index decides), expected versions are honoured, a stream is
-- created once, and read_all hands each stream out in version order.

local SHARED_WRITER = [==[
local es = require "eventsourcing"
local schema, w = os.getenv("SPEC_SCHEMA"), tonumber(os.getenv("SPEC_WRITER"))
local iterations = tonumber(os.getenv("SPEC_ITERATIONS"))
local store = assert(es.open(os.getenv("ES_TEST_DATABASE_URL"), { schema = schema }))
local committed, conflicts, created = 0, 0, 0
local seed = w * 4231
local function rnd(n) seed = (seed * 16807) % 2147483647; return seed % n end
local sizes = { 1, 1, 2, 5 }
local function events(n, i)
  local t = {}
  for j = 1, n do t[j] = { type = "Shared", data = { w = w, i = i, j = j } } end
  return t
end
local function conflict_or_raise(err, what)
  if err.kind ~= "conflict" then error(what .. ": " .. tostring(err)) end
  conflicts = conflicts + 1
end
for i = 1, iterations do
  local stream = "Shared-" .. (rnd(3) + 1)
  local n = sizes[rnd(#sizes) + 1]
  local mode = rnd(4)
  if mode == 0 then                               -- es.ANY: always lands
    local r, err = store:append(stream, events(n, i))
    if not r then error("any: " .. tostring(err)) end
    committed = committed + n
  elseif mode == 1 then                           -- exact expected version
    local v = assert(store:version(stream))
    local r, err = store:append(stream, events(n, i), { expected_version = v })
    if r then
      if r.version ~= v + n then error(("version %d after %d + %d"):format(r.version, v, n)) end
      committed = committed + n
    else
      conflict_or_raise(err, "exact")
    end
  elseif mode == 2 then                           -- everyone creates Race-<i>
    local r, err = store:append("Race-" .. i, events(n, i), { expected_version = es.NO_STREAM })
    if r then
      committed, created = committed + n, created + 1
    else
      conflict_or_raise(err, "create")
    end
  else                                            -- older transaction, then shared
    assert(store:begin())
    assert(store:append("Own-" .. w, events(1, i)))
    assert(store:query("SELECT pg_sleep($1)", rnd(5) / 1000))
    local r, err = store:append(stream, events(n, i))
    if r then
      assert(store:commit())
      committed = committed + 1 + n
    else
      conflict_or_raise(err, "in transaction")
      assert(store:rollback())
    end
  end
end
store:close()
io.write(("ok %d %d %d\n"):format(committed, conflicts, created))
]==]

describe("concurrent appends to the same streams (postgresql)", function()
  it("keep versions dense and unique, honour expected versions, create a stream once", function()
    local schema = fresh_schema()
    local R = open(schema)
    assert(R:migrate(helpers.migrate_opts()))
    local iterations = 60
    local work = helpers.workdir("es-shared")
    local kids = {}
    for w = 1, WRITERS do
      kids[w] = { work:spawn(SHARED_WRITER, "w" .. w, ("SPEC_SCHEMA=%s SPEC_WRITER=%d SPEC_ITERATIONS=%d")
        :format(schema, w, iterations)) }
    end
    local committed, conflicts, created = 0, 0, 0
    for w = 1, WRITERS do
      assert.is_true(helpers.wait_exit(kids[w][1], 120), "writer " .. w .. " did not finish")
      local out = read_file(kids[w][2]) or ""
      local c, k, m = out:match("ok (%d+) (%d+) (%d+)")
      assert(c, ("writer %d said: %s"):format(w, out))
      committed, conflicts = committed + tonumber(c), conflicts + tonumber(k)
      created = created + tonumber(m)
    end
    work:remove()

    local rows = assert(R:query("SELECT id::text AS id, stream, version, data->>'w' AS w FROM "
      .. qident(schema) .. ".events ORDER BY stream, version"))
    assert.equal(committed, #rows, "the writers' committed count matches the table")
    local last, race_writer, races = {}, {}, 0
    for _, row in ipairs(rows) do
      assert.equal((last[row.stream] or 0) + 1, row.version,
        ("%s: version %d after %d"):format(row.stream, row.version, last[row.stream] or 0))
      last[row.stream] = row.version
      if row.stream:match("^Race%-") then
        if row.version == 1 then races = races + 1; race_writer[row.stream] = row.w end
        assert.equal(race_writer[row.stream], row.w, row.stream .. " holds events of two writers")
      end
    end
    assert.equal(created, races, "each Race stream was created by exactly one writer")
    assert.is_true(conflicts > 0, "the writers never conflicted: the test did not exercise contention")
    for stream, v in pairs(last) do
      assert.equal(v, assert(R:version(stream)), stream)
    end

    local got = drain(R, nil)
    assert.equal(#rows, #got)
    local order = {}
    for _, e in ipairs(got) do
      assert.equal((order[e.stream] or 0) + 1, e.version,
        ("read_all gave %s version %d after %d"):format(e.stream, e.version, order[e.stream] or 0))
      order[e.stream] = e.version
    end
    io.stderr:write(("\n  same streams: %d writers, %d events, %d conflicts\n")
      :format(WRITERS, #rows, conflicts))
    R:close()
  end)
end)
