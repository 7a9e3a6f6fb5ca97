-- The store contract (docs/architecture.md, "Guarantees"), run unchanged against
-- every store of helpers.stores(): the in-memory one and PostgreSQL.
-- ES_TEST_STORE=memory runs only the memory store (no database needed).
local es = require "eventsourcing"
local helpers = require "helpers"

local lua54 = math.type ~= nil

local function store_entries()
  local only = os.getenv("ES_TEST_STORE")
  if only == "memory" then return { { name = "memory", url = "memory:" } } end
  local list = {}
  for _, s in ipairs(helpers.stores()) do
    if not only or only == "" or only == s.name then list[#list + 1] = s end
  end
  return list
end


local UUID_V7 = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-7%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"
local RECORDED_AT = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%dZ$"

-- A random version 4 UUID (lower case).
local function uuid()
  local function w() return math.random(0, 0xffff) end
  return ("%04x%04x-%04x-4%03x-%04x-%04x%04x%04x"):format(
    w(), w(), w(), w() % 0x1000, 0x8000 + w() % 0x4000, w(), w(), w())
end

-- Waits until the wall clock has moved on (recorded_at has microseconds).
local function tick()
  local t = os.clock()
  while os.clock() - t < 0.002 do end
end

-- On Citus (make test-citus) positions come from per-node ranges and
-- read_all orders events only within a stream (docs/scale-out.md). There
-- these assertions see positions as ranks in append order and read_all
-- results in append order: the single-node contract seen through the
-- distributed one (per-stream order and exactly-once are checked as is).
local citus_store   -- the store under test, when it is distributed

local function ranks()
  local all, cp = {}, nil
  repeat
    local b
    b, cp = assert(citus_store:read_all({ after = cp, limit = 1000 }))
    for _, e in ipairs(b) do all[#all + 1] = e end
  until #b == 0
  table.sort(all, function(a, b)
    if a.recorded_at ~= b.recorded_at then return a.recorded_at < b.recorded_at end
    if a.stream ~= b.stream then return a.stream < b.stream end
    return a.version < b.version
  end)
  local r = {}
  for i, e in ipairs(all) do r[e.position] = i end
  return r
end

-- evs with positions as ranks (and sorted by them when reorder is set).
local function as_single(evs, reorder)
  if not citus_store then return evs end
  local r, out = ranks(), {}
  for i, e in ipairs(evs) do
    local c = {}
    for k, v in pairs(e) do c[k] = v end
    c.position = r[e.position] or e.position
    out[i] = c
  end
  if reorder then table.sort(out, function(a, b) return a.position < b.position end) end
  return out
end

-- version and position of an append's result (recorded_at checked apart)
local function vp(r)
  return r and { version = r.version,
                 position = citus_store and ranks()[r.position] or r.position }
end

local function collect(iter)
  local out = {}
  for e in iter do out[#out + 1] = e end
  return as_single(out)
end

local function field(events, name)
  local out = {}
  for i, e in ipairs(events) do out[i] = e[name] end
  return out
end

local function events_of(types)
  local out = {}
  for i, t in ipairs(types) do out[i] = { type = t, data = { i = i } } end
  return out
end

local function assert_err(kind, res, err)
  assert.is_nil(res)
  assert.is_table(err, "expected an error table")
  assert.equal(kind, err.kind, tostring(err))
  assert.is_string(err.message)
  assert.equal(err.kind .. ": " .. err.message, tostring(err))
  return err
end

-- fails(kind, text)(store:op(...)): nil, err of that kind whose message
-- mentions text.
local function fails(kind, text)
  return function(res, err)
    assert_err(kind, res, err)
    assert.truthy(err.message:find(text, 1, true),
      ("message %q does not mention %q"):format(err.message, text))
    return err
  end
end

-- Every event of the store, in position order, via read_all pages.
local function all_events(store)
  local out, cp = {}, nil
  repeat
    local batch
    batch, cp = assert(store:read_all({ after = cp, limit = 1000 }))
    for _, e in ipairs(batch) do out[#out + 1] = e end
  until #batch == 0
  return out
end

for _, entry in ipairs(store_entries()) do
  describe("store contract (" .. entry.name .. ")", function()
    local store, schema

    before_each(function()
      store, schema = helpers.open(entry)
      citus_store = helpers.migrate_opts(entry) and store or nil
    end)

    after_each(function()
      if store and not store:is_closed() then
        -- the test's schema goes with it (lock_timeout: a session a test
        -- left holding it must not hang the run; the schema then stays).
        -- SET LOCAL: behind a transaction pooler a session-wide setting
        -- would stay with the server session for other clients.
        if schema and not store:in_transaction() and store:begin() then
          local dropped = store:query("SET LOCAL lock_timeout = '5s'")
            and store:query('DROP SCHEMA "' .. schema .. '" CASCADE')
          if dropped then store:commit() else store:rollback() end
        end
        store:close()
      end
      store = nil
    end)

    describe("append", function()
      it("appends one event and reads it back", function()
        local res = assert(store:append("Order-1", { type = "OrderCreated", data = { customer_id = "c1" } }))
        assert.same({ version = 1, position = 1 }, vp(res))
        local evs = collect(assert(store:read("Order-1")))
        assert.equal(1, #evs)
        local e = evs[1]
        assert.equal(e.recorded_at, res.recorded_at)
        assert.equal("Order-1", e.stream)
        assert.equal("OrderCreated", e.type)
        assert.equal(1, e.version)
        assert.equal(1, e.position)
        assert.same({ customer_id = "c1" }, e.data)
        assert.equal(nil, next(e.metadata))
        assert.truthy(e.id:match(UUID_V7), e.id)
        assert.truthy(e.recorded_at:match(RECORDED_AT), e.recorded_at)
      end)

      it("appends many events at once with consecutive versions and positions", function()
        assert(store:append("Order-1", { type = "A" }))
        local res = assert(store:append("Order-2", events_of { "A", "B", "C" }))
        assert.same({ version = 3, position = 4 }, vp(res))
        local evs = collect(assert(store:read("Order-2")))
        assert.same({ "A", "B", "C" }, field(evs, "type"))
        assert.same({ 1, 2, 3 }, field(evs, "version"))
        assert.same({ 2, 3, 4 }, field(evs, "position"))
        assert.same({ i = 2 }, evs[2].data)
        -- one batch: one recorded_at
        assert.equal(evs[1].recorded_at, evs[3].recorded_at)
        assert.equal(4, #all_events(store))
      end)

      it("defaults data to an empty object", function()
        assert(store:append("S-1", { type = "A" }))
        local e = collect(assert(store:read("S-1")))[1]
        assert.same({}, e.data)
        assert.equal("{}", es.json.encode(e.data))
      end)

      it("makes distinct UUID v7 ids", function()
        assert(store:append("S-1", events_of { "A", "B", "C", "D" }))
        local seen = {}
        for e in assert(store:read("S-1")) do
          assert.truthy(e.id:match(UUID_V7), e.id)
          assert.is_nil(seen[e.id])
          seen[e.id] = true
        end
      end)

      it("is atomic: a batch with one bad event stores nothing", function()
        assert(store:append("S-1", { type = "A" }))
        local batch = events_of { "A", "B", "C" }
        batch[2].type = ""
        assert_err("invalid", store:append("S-1", batch))
        batch = events_of { "A", "B", "C" }
        batch[3].data = { f = function() end }
        assert_err("invalid", store:append("S-1", batch))
        batch = events_of { "A", "B" }
        batch[2].id = "not-a-uuid"
        assert_err("invalid", store:append("S-2", batch))
        assert.equal(1, store:version("S-1"))
        assert.equal(0, store:version("S-2"))
        assert.equal(1, #all_events(store))
        -- and the store still works
        local res = assert(store:append("S-1", { type = "B" }))
        assert.equal(2, res.version)
        assert.truthy(res.position > 1)
      end)

      it("rejects an empty batch", function()
        assert_err("invalid", store:append("S-1", {}))
      end)
    end)

    describe("expected_version", function()
      it("defaults to es.ANY", function()
        assert(store:append("S-1", { type = "A" }))
        assert(store:append("S-1", { type = "A" }))
        assert(store:append("S-1", { type = "A" }, { expected_version = es.ANY }))
        assert.equal(3, store:version("S-1"))
      end)

      it("es.NO_STREAM: only when the stream has no events", function()
        assert(store:append("S-1", { type = "A" }, { expected_version = es.NO_STREAM }))
        local err = fails("conflict", "S-1")(store:append("S-1", events_of { "B", "C" },
          { expected_version = es.NO_STREAM }))
        assert.equal(es.NO_STREAM, err.expected)
        assert.equal(1, err.actual)
        assert.equal(1, store:version("S-1"))
      end)

      it("es.STREAM_EXISTS: only when the stream has events", function()
        local err = fails("conflict", "S-1")(store:append("S-1", { type = "A" },
          { expected_version = es.STREAM_EXISTS }))
        assert.equal(es.STREAM_EXISTS, err.expected)
        assert.equal(0, err.actual)
        assert.equal(0, store:version("S-1"))
        assert(store:append("S-1", { type = "A" }))
        -- (PostgreSQL may leave gaps in positions after a failure)
        assert.equal(2, assert(store:append("S-1", { type = "B" },
          { expected_version = es.STREAM_EXISTS })).version)
      end)

      it("an exact version, 0 meaning no events", function()
        assert.same({ version = 1, position = 1 },
          vp(assert(store:append("S-1", { type = "A" }, { expected_version = 0 }))))
        assert.same({ version = 3, position = 3 },
          vp(assert(store:append("S-1", events_of { "B", "C" }, { expected_version = 1 }))))
        local err = fails("conflict", "S-1")(store:append("S-1", { type = "D" },
          { expected_version = 1 }))
        assert.equal(1, err.expected)
        assert.equal(3, err.actual)
        if lua54 then
          assert.equal("integer", math.type(err.expected))
          assert.equal("integer", math.type(err.actual))
        end
        err = fails("conflict", "S-2")(store:append("S-2", { type = "D" },
          { expected_version = 5 }))
        assert.equal(5, err.expected)
        assert.equal(0, err.actual)
        assert.equal(3, store:version("S-1"))
        assert.equal(0, store:version("S-2"))
        assert.equal(3, #all_events(store))
      end)

      it("rejects values that are not a version", function()
        assert_err("invalid", store:append("S-1", { type = "A" }, { expected_version = "sometimes" }))
        assert_err("invalid", store:append("S-1", { type = "A" }, { expected_version = -1 }))
        assert.has_error(function()
          store:append("S-1", { type = "A" }, { expected_version = 1.5 })
        end)
        assert.has_error(function()
          store:append("S-1", { type = "A" }, { expected_version = {} })
        end)
        assert.equal(0, store:version("S-1"))
      end)
    end)

    describe("idempotent appends by event id", function()
      it("the same batch again is a success that stores nothing", function()
        local a, b = uuid(), uuid()
        local batch = { { id = a, type = "A" }, { id = b, type = "B" } }
        assert(store:append("X-0", { type = "Z" }))
        local first = assert(store:append("S-1", batch, { expected_version = es.NO_STREAM }))
        assert.same({ version = 2, position = 3 }, vp(first))
        assert(store:append("S-1", { type = "C" }))
        -- a retry, even with an expectation that no longer holds: the same
        -- result, marked idempotent (nothing was added)
        for _, opts in ipairs({ { expected_version = es.NO_STREAM }, {} }) do
          local again = assert(store:append("S-1", batch, opts))
          assert.is_true(again.idempotent)
          again.idempotent = nil
          assert.same(first, again)
        end
        assert.is_nil(first.idempotent)
        assert.equal(3, store:version("S-1"))
        local evs = collect(assert(store:read("S-1")))
        assert.same({ a, b }, { evs[1].id, evs[2].id })
        assert.equal(4, #all_events(store))
      end)

      it("a single event retried is idempotent too", function()
        local id = uuid()
        local r1 = assert(store:append("S-1", { id = id, type = "A" }, { expected_version = 0 }))
        local r2 = assert(store:append("S-1", { id = id, type = "A" }, { expected_version = 0 }))
        assert.is_true(r2.idempotent)
        r2.idempotent = nil
        assert.same(r1, r2)
        assert.equal(1, store:version("S-1"))
      end)

      it("an id taken anywhere else is an error and nothing is stored", function()
        local a, b = uuid(), uuid()
        assert(store:append("S-1", { { id = a, type = "A" }, { id = b, type = "B" } }))
        -- in another stream (on Citus ids are unique within their stream)
        if citus_store then
          assert(store:append("S-2", { id = a, type = "A" }))
        else
          fails("invalid", a)(store:append("S-2", { id = a, type = "A" }))
        end
        -- mixed with a new event
        fails("invalid", b)(store:append("S-1", { { id = uuid(), type = "C" }, { id = b, type = "B" } }))
        assert_err("invalid", store:append("S-1", { { id = b, type = "B" }, { type = "C" } }))
        -- in another order
        assert_err("invalid", store:append("S-1", { { id = b, type = "B" }, { id = a, type = "A" } }))
        -- twice in one batch
        local c = uuid()
        assert_err("invalid", store:append("S-3", { { id = c, type = "A" }, { id = c, type = "A" } }))
        assert.equal(2, store:version("S-1"))
        assert.equal(citus_store and 1 or 0, store:version("S-2"))
        assert.equal(0, store:version("S-3"))
        assert.equal(citus_store and 3 or 2, #all_events(store))
      end)

      it("keeps the given ids (upper-case ones come back in lower case)", function()
        local id = uuid()
        assert(store:append("S-1", { id = id:upper(), type = "A" }))
        assert.equal(id, collect(assert(store:read("S-1")))[1].id)
        -- the same id in any case is the same event
        assert.same({ version = 1, position = 1 }, vp(assert(store:append("S-1", { id = id, type = "A" }))))
      end)

      it("reads back ids with every hex digit in every place, from read and read_all", function()
        local ids = { "00112233-4455-6677-8899-aabbccddeeff", "fedcba98-7654-3210-0f1e-2d3c4b5a6978",
          "a0b1c2d3-e4f5-0617-2839-4a5b6c7d8e9f" }
        for i, id in ipairs(ids) do assert(store:append("U-" .. i, { id = id:upper(), type = "A" })) end
        for i, id in ipairs(ids) do assert.equal(id, collect(assert(store:read("U-" .. i)))[1].id) end
        local got = {}
        for _, e in ipairs(all_events(store)) do got[e.id] = true end
        for _, id in ipairs(ids) do assert.is_true(got[id], id) end
      end)
    end)

    describe("metadata", function()
      it("per call, per event, merged with per-event keys winning", function()
        assert(store:append("S-1", {
          { type = "A" },
          { type = "B", metadata = { trace = "event", extra = 1 } },
        }, { metadata = { user = "u1", trace = "call" } }))
        assert(store:append("S-1", { type = "C", metadata = { only = true } }))
        assert(store:append("S-1", { type = "D" }))
        local evs = collect(assert(store:read("S-1")))
        assert.same({ user = "u1", trace = "call" }, evs[1].metadata)
        assert.same({ user = "u1", trace = "event", extra = 1 }, evs[2].metadata)
        assert.same({ only = true }, evs[3].metadata)
        assert.same({}, evs[4].metadata)
      end)
    end)

    describe("read", function()
      local function versions(opts)
        local it, err = store:read("S-1", opts)
        assert(it, tostring(err))
        return field(collect(it), "version")
      end

      before_each(function()
        assert(store:append("S-1", events_of { "A", "B", "C", "D", "E", "F", "G", "H", "I", "J" }))
        assert(store:append("Other", { type = "X" }))
      end)

      it("forward, with from, to and limit", function()
        assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, versions())
        assert.same({ 4, 5, 6, 7, 8, 9, 10 }, versions { from = 4 })
        assert.same({ 1, 2, 3, 4, 5, 6 }, versions { to = 6 })
        assert.same({ 3, 4, 5 }, versions { from = 3, to = 5 })
        assert.same({ 1, 2, 3 }, versions { limit = 3 })
        assert.same({ 5, 6 }, versions { from = 5, limit = 2 })
        assert.same({ 9, 10 }, versions { from = 9, to = 20 })
        assert.same({}, versions { from = 11 })
        assert.same({}, versions { from = 6, to = 5 })
      end)

      it("backward, from the end or from a version down to `to`", function()
        assert.same({ 10, 9, 8, 7, 6, 5, 4, 3, 2, 1 }, versions { backward = true })
        assert.same({ 10, 9 }, versions { backward = true, limit = 2 })
        assert.same({ 5, 4, 3, 2, 1 }, versions { backward = true, from = 5 })
        assert.same({ 8, 7, 6 }, versions { backward = true, from = 8, to = 6 })
        assert.same({ 10, 9, 8 }, versions { backward = true, to = 8 })
        assert.same({ 10 }, versions { backward = true, from = 50, limit = 1 })
      end)

      it("reads nothing from a stream that does not exist", function()
        assert.same({}, collect(assert(store:read("Nope-1"))))
        assert.equal(0, store:version("Nope-1"))
      end)

      it("carries every field", function()
        local evs = collect(assert(store:read("S-1", { from = 2, to = 2 })))
        local e = evs[1]
        assert.equal("S-1", e.stream)
        assert.equal("B", e.type)
        assert.equal(2, e.version)
        assert.equal(2, e.position)
        assert.same({ i = 2 }, e.data)
        if lua54 then
          assert.equal("integer", math.type(e.version))
          assert.equal("integer", math.type(e.position))
        end
      end)

      it("before: only events recorded strictly before the instant", function()
        for i = 1, 4 do
          tick()
          assert(store:append("T-1", { type = "T", data = { i = i } }))
        end
        local evs = collect(assert(store:read("T-1")))
        for i = 2, 4 do assert.truthy(evs[i].recorded_at > evs[i - 1].recorded_at) end
        local at3 = evs[3].recorded_at
        local function tv(opts)
          return field(collect(assert(store:read("T-1", opts))), "version")
        end
        assert.same({ 1, 2 }, tv { before = at3 })
        assert.same({ 2, 1 }, tv { before = at3, backward = true })
        assert.same({ 2 }, tv { before = at3, from = 2 })
        assert.same({ 1 }, tv { before = at3, limit = 1 })
        assert.same({ 1, 2, 3, 4 }, tv { before = "2999-01-01T00:00:00Z" })
        assert.same({}, tv { before = "2000-01-01" })
        -- the same instant with an offset and lower-case separators
        local y, mo, d, h, mi, s = at3:match("^(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+%.%d+)Z$")
        local shifted
        if tonumber(h) < 22 then
          shifted = ("%s-%s-%st%02d:%s:%s+02:00"):format(y, mo, d, tonumber(h) + 2, mi, s)
        else
          shifted = ("%s-%s-%s %s:%s:%sz"):format(y, mo, d, h, mi, s)
        end
        assert.same({ 1, 2 }, tv { before = shifted })
      end)

      it("rejects bad options", function()
        fails("invalid", "yesterday")(store:read("S-1", { before = "yesterday" }))
        fails("invalid", "2026-02-30")(store:read("S-1", { before = "2026-02-30T00:00:00Z" }))
        assert_err("invalid", store:read("S-1", { limit = -1 }))
        assert_err("invalid", store:read("S-1", { from = -3 }))
        assert_err("invalid", store:read("S-1", { to = -3 }))
        assert_err("invalid", store:read(""))
        assert.has_error(function() store:read("S-1", { limit = 1.5 }) end)
        assert.has_error(function() store:read("S-1", { before = 12 }) end)
        assert.has_error(function() store:read("S-1", 5) end)
      end)
    end)

    describe("version", function()
      it("is 0 without events and the last version after appends", function()
        assert.equal(0, store:version("S-1"))
        assert(store:append("S-1", events_of { "A", "B" }))
        assert(store:append("S-2", { type = "A" }))
        assert(store:append("S-1", { type = "C" }))
        assert.equal(3, store:version("S-1"))
        assert.equal(1, store:version("S-2"))
        if lua54 then assert.equal("integer", math.type(store:version("S-1"))) end
      end)

      it("validates the stream name", function()
        assert_err("invalid", store:version(""))
        assert_err("invalid", store:version("Order\n1"))
      end)
    end)

    describe("read_all", function()
      local function seed()
        assert(store:append("Order-1", events_of { "OrderCreated", "ItemAdded" }))
        assert(store:append("Customer-1", { type = "CustomerRegistered" }))
        assert(store:append("Order-2", events_of { "OrderCreated", "ItemAdded", "OrderPlaced" }))
        assert(store:append("Orders-9", { type = "OrderCreated" }))     -- category Orders
        assert(store:append("Order", { type = "ItemAdded" }))           -- category Order
        assert(store:append("Order-3-x", { type = "OrderPlaced" }))     -- category Order
        assert(store:append("Customer-2", { type = "CustomerRegistered" }))
      end

      local function page_all(opts, limit)
        local out, cp, pages = {}, nil, 0
        while true do
          local o = {}
          for k, v in pairs(opts or {}) do o[k] = v end
          o.after, o.limit = cp, limit
          local batch, next_cp = store:read_all(o)
          assert(batch, tostring(next_cp))
          assert.is_string(next_cp)
          assert.truthy(#batch <= limit)
          for _, e in ipairs(batch) do out[#out + 1] = e end
          pages = pages + 1
          assert.truthy(pages < 100, "read_all does not end")
          if #batch == 0 then
            -- unfiltered, an empty page keeps the checkpoint (filtered
          -- pages may move it past events they skipped)
          if cp and not opts then assert.equal(cp, next_cp) end
            return as_single(out, true), next_cp
          end
          cp = next_cp
        end
      end

      it("pages through everything exactly once, in position order", function()
        seed()
        local evs, cp = page_all(nil, 3)
        assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, field(evs, "position"))
        assert.same({ "Order-1", "Order-1", "Customer-1", "Order-2", "Order-2", "Order-2",
                      "Orders-9", "Order", "Order-3-x", "Customer-2" }, field(evs, "stream"))
        assert.truthy(evs[3].recorded_at:match(RECORDED_AT))
        -- then only what comes later
        assert(store:append("Order-1", { type = "OrderPlaced" }))
        local batch, cp2 = assert(store:read_all({ after = cp }))
        assert.same({ 11 }, field(as_single(batch), "position"))
        assert.are_not.equal(cp, cp2)
        batch = assert(store:read_all({ after = cp2 }))
        assert.same({}, batch)
      end)

      it("starts from the beginning without `after`, in batches of 1000 by default", function()
        local many = {}
        for i = 1, 1001 do many[i] = { type = "N", data = { i = i } } end
        assert(store:append("Big-1", many))
        local batch, cp = assert(store:read_all())
        assert.equal(1000, #batch)
        assert.equal(1000, batch[1000].version)
        batch = assert(store:read_all({ after = cp }))
        assert.equal(1, #batch)
        assert.same({ i = 1001 }, batch[1].data)
      end)

      it("makes id and metadata on first access with lazy = true, the same as without", function()
        seed()
        assert(store:append("Meta-1", { { type = "M", metadata = { who = "ann", n = 1 } } }))
        local eager = assert(store:read_all({ limit = 100 }))
        local lazy = assert(store:read_all({ limit = 100, lazy = true }))
        assert.equal(#eager, #lazy)
        assert.is_true(#lazy >= 11)
        for i, e in ipairs(lazy) do
          assert.is_nil(rawget(e, "id"))
          assert.is_nil(rawget(e, "metadata"))
          assert.is_nil(e.no_such_field)
          assert.equal(eager[i].stream, e.stream)
          assert.equal(eager[i].checkpoint, e.checkpoint)
          assert.same(eager[i].data, e.data)
          assert.equal(eager[i].id, e.id)
          assert.same(eager[i].metadata, e.metadata)
          -- made once, then a plain field (a handler may change it)
          assert.equal(e.id, rawget(e, "id"))
          assert.equal(e.metadata, e.metadata)
        end
        assert.same({ who = "ann", n = 1 }, lazy[#lazy].metadata)
        -- an event outlives its batch: its bytes stay with it
        local kept = select(1, assert(store:read_all({ limit = 100, lazy = true })))[#lazy]
        collectgarbage()
        collectgarbage()
        assert.equal(eager[#eager].id, kept.id)
        assert.same({ who = "ann", n = 1 }, kept.metadata)
        -- the metatable's __index is reachable: odd receivers get nil, no crash
        local index = getmetatable(lazy[1]).__index
        for _, bad in ipairs({ "not a table", 42, true, index }) do
          assert.is_nil(index(bad, "id"))
          assert.is_nil(index(bad, "metadata"))
        end
        -- without lazy, both are there at once
        local plain = assert(store:read_all({ limit = 1, lazy = false }))
        assert.is_string(rawget(plain[1], "id"))
        assert.is_table(rawget(plain[1], "metadata"))
      end)

      it("gives lazy events their metadata's plain positive integer schema_version as e.schema_version", function()
        if entry.name == "memory" then return end   -- its events are plain tables: no lazy fields
        local cases = {   -- metadata text -> e.schema_version
          { '{"schema_version":2}', 2 },
          { '{ "a" : [1, {"schema_version": 9}, "x,}"] ,\n "schema_version" :\t3 }', 3 },
          { '{"nested":{"schema_version":4},"b":"\\"schema_version\\":5"}', nil },
          { '{"schema_version":9007199254740992}', 9007199254740992 },
          { '{"schema_version":9007199254740993}', nil },
          { '{"schema_version":12345678901234567}', nil },
          { '{"schema_version":"2"}', nil },
          { '{"schema_version":2.5}', nil },
          { '{"schema_version":2e0}', nil },
          { '{"schema_version":0}', nil },
          { '{"schema_version":-1}', nil },
          { '{"schema_\\u0076ersion":2}', nil },       -- escaped: the decoded metadata says
          { '{"schema_version":2,"schema_version":3}', nil },
          { '{"schema_version":true}', nil },
          { '{"schema_version":null}', nil },
          { '[{"schema_version":2}]', nil },
          { '{}', nil },
          { '{"a":1}', nil },
        }
        local q = ('INSERT INTO "%s".events (id, stream, category, version, type, data, metadata) '
          .. "VALUES (gen_random_uuid(), 'Sv-1', 'Sv', $1::bigint, 'V', '{}', $2::json)"):format(store:schema())
        for i, c in ipairs(cases) do assert(store:query(q, i, c[1])) end
        local lazy = assert(store:read_all({ limit = 100, lazy = true, category = "Sv" }))
        local plain = assert(store:read_all({ limit = 100, category = "Sv" }))
        assert.equal(#cases, #lazy)
        for i, c in ipairs(cases) do
          assert.equal(c[2], rawget(lazy[i], "schema_version"), c[1])
          assert.is_nil(rawget(plain[i], "schema_version"))
          -- what it says agrees with the decoded metadata
          if c[2] then assert.equal(c[2], lazy[i].metadata.schema_version) end
          assert.same(plain[i].metadata, lazy[i].metadata)
        end
        -- an aggregate's upcast reads it first: the same data either way
        local Agg = es.aggregate { name = "Sv", initial = function() return {} end,
          upcast = { V = { [1] = function(d) d.one = true; return d end,
                           [2] = function(d) d.two = true; return d end } },
          apply = { V = function(s) return s end } }
        for i = 1, 2 do
          local a, b = lazy[i], plain[i]
          Agg:upcast_event(a)
          Agg:upcast_event(b)
          assert.same(b.data, a.data)
          assert.equal(3, a.schema_version)
          assert.equal(3, b.schema_version)
        end
        assert.same({ one = nil, two = true }, lazy[1].data)
        assert.same({}, lazy[2].data)
      end)

      it("gives each event its own recorded_at, type and stream when neighbours share them", function()
        -- read_all pushes a string again when the last event had the same bytes
        assert(store:append("R-1", events_of { "A", "A", "B" }))
        tick()
        assert(store:append("R-2", events_of { "B", "A" }))
        tick()
        assert(store:append("R-1", { type = "A" }))
        local batch = assert(store:read_all({ limit = 100 }))
        assert.same({ "A", "A", "B", "B", "A", "A" }, field(as_single(batch), "type"))
        assert.same({ "R-1", "R-1", "R-1", "R-2", "R-2", "R-1" }, field(as_single(batch), "stream"))
        local at = field(as_single(batch), "recorded_at")
        assert.equal(at[1], at[3])
        assert.equal(at[4], at[5])
        assert.are_not.equal(at[3], at[4])
        assert.are_not.equal(at[5], at[6])
        for _, t in ipairs(at) do assert.truthy(t:match(RECORDED_AT)) end
      end)

      it("gives a checkpoint even for an empty store", function()
        local batch, cp = store:read_all()
        assert.same({}, batch)
        assert.is_string(cp)
        assert(store:append("S-1", { type = "A" }))
        batch = assert(store:read_all({ after = cp }))
        assert.equal(1, #batch)
      end)

      it("filters by category (the stream name before its first '-')", function()
        seed()
        local evs = page_all({ category = "Order" }, 2)
        assert.same({ "Order-1", "Order-1", "Order-2", "Order-2", "Order-2", "Order", "Order-3-x" },
          field(evs, "stream"))
        evs = page_all({ category = "Orders" }, 1000)
        assert.same({ "Orders-9" }, field(evs, "stream"))
        evs = page_all({ category = "Nothing" }, 1000)
        assert.same({}, evs)
      end)

      it("filters by types, also combined with a category", function()
        seed()
        local evs = page_all({ types = { "OrderCreated", "OrderPlaced" } }, 2)
        assert.same({ 1, 4, 6, 7, 9 }, field(evs, "position"))
        evs = page_all({ types = { "ItemAdded" }, category = "Order" }, 1)
        assert.same({ 2, 5, 8 }, field(evs, "position"))
        evs = page_all({ types = { "NoSuchType" } }, 5)
        assert.same({}, evs)
        -- a filtered page's checkpoint never goes back and never skips
        -- a later match
        local batch, cp = store:read_all({ types = { "NoSuchType" } })
        assert.same({}, batch)
        assert(store:append("Order-1", { type = "NoSuchType" }))
        batch = assert(store:read_all({ after = cp, types = { "NoSuchType" } }))
        assert.same({ 11 }, field(as_single(batch), "position"))
      end)

      it("rejects bad options", function()
        fails("invalid", "garbage")(store:read_all({ after = "garbage" }))
        assert_err("invalid", store:read_all({ after = "1:2:3" }))
        assert_err("invalid", store:read_all({ after = "" }))
        assert_err("invalid", store:read_all({ limit = -1 }))
        assert.has_error(function() store:read_all({ types = "A" }) end)
        assert.has_error(function() store:read_all({ types = { 1 } }) end)
        assert.has_error(function() store:read_all({ after = 5 }) end)
        assert.has_error(function() store:read_all("x") end)
      end)
    end)

    describe("fold", function()
      local handlers = {
        N = function(state, e) return state + e.data.n end,
        Keep = function() return nil end,
      }

      it("folds events into a state and returns the version", function()
        local evs = {}
        for i = 1, 10 do evs[i] = { type = "N", data = { n = i } } end
        assert(store:append("S-1", evs))
        local state, version = store:fold("S-1", handlers, 0)
        assert.equal(55, state)
        assert.equal(10, version)
        if lua54 then assert.equal("integer", math.type(state)) end
        state, version = store:fold("S-1", handlers, 0, { from = 3, to = 5 })
        assert.equal(12, state)
        assert.equal(5, version)
        state, version = store:fold("S-1", handlers, 100, { to = 2 })
        assert.equal(103, state)
        assert.equal(2, version)
      end)

      it("skips events without a handler and keeps the state on nil", function()
        assert(store:append("S-1", {
          { type = "N", data = { n = 5 } },
          { type = "Unknown", data = { n = 100 } },
          { type = "Keep" },
          { type = "N", data = { n = 7 } },
          { type = "Unknown" },
        }))
        local state, version = store:fold("S-1", handlers, 0)
        assert.equal(12, state)
        assert.equal(5, version)
      end)

      it("passes the whole event and can build a table state", function()
        assert(store:append("S-1", events_of { "A", "B" }, { metadata = { user = "u" } }))
        local state = store:fold("S-1", {
          A = function(s, e)
            s.seen[#s.seen + 1] = e.type .. e.version .. e.metadata.user
            return s
          end,
          B = function(s, e)
            s.seen[#s.seen + 1] = e.type .. e.data.i .. e.stream
            return s
          end,
        }, { seen = {} })
        assert.same({ "A1u", "B2S-1" }, state.seen)
      end)

      it("folds nothing for a missing stream", function()
        local state, version = store:fold("Nope-1", handlers, 42)
        assert.equal(42, state)
        assert.equal(0, version)
      end)

      it("honours before", function()
        for i = 1, 3 do
          tick()
          assert(store:append("S-1", { type = "N", data = { n = i } }))
        end
        local evs = collect(assert(store:read("S-1")))
        local state, version = store:fold("S-1", handlers, 0, { before = evs[3].recorded_at })
        assert.equal(3, state)
        assert.equal(2, version)
        fails("invalid", "soon")(store:fold("S-1", handlers, 0, { before = "soon" }))
      end)

      it("raises when a handler raises, and the store stays usable", function()
        assert(store:append("S-1", { type = "N", data = { n = 1 } }))
        assert.has_error(function()
          store:fold("S-1", { N = function() error("boom") end }, 0)
        end, nil)
        assert.equal(1, (store:fold("S-1", handlers, 0)))
      end)
    end)

    describe("bad input", function()
      it("returns invalid errors with clear messages", function()
        fails("invalid", "nope")(store:append("S-1", { id = "nope", type = "A" }))
        fails("invalid", "stream")(store:append("", { type = "A" }))
        fails("invalid", "control")(store:append("Order\0011", { type = "A" }))
        fails("invalid", "control")(store:append("Order\n1", { type = "A" }))
        fails("invalid", "type")(store:append("S-1", { type = "" }))
        fails("invalid", "type")(store:append("S-1", { type = "A\tB" }))
        assert.equal(0, #all_events(store))
      end)

      it("raises on wrong argument types", function()
        assert.has_error(function() store:append(42, { type = "A" }) end,
          "bad argument #1 to 'append' (string expected, got number)")
        assert.has_error(function() store:append({}, { type = "A" }) end)
        assert.has_error(function() store:append("S-1", "A") end)
        assert.has_error(function() store:append("S-1", { type = "A" }, "opts") end)
        assert.has_error(function() store:append("S-1", { type = "A" }, { metadata = "m" }) end)
        assert.has_error(function() store:read(nil) end)
        assert.has_error(function() store:version(false) end)
        assert.has_error(function() store:fold("S-1", nil, 0) end)
        assert.has_error(function() store.append(nil, "S-1", { type = "A" }) end)
        assert.equal(0, #all_events(store))
      end)

      it("wrong field types inside events are invalid input", function()
        assert_err("invalid", store:append("S-1", { type = 5 }))
        assert_err("invalid", store:append("S-1", { { type = "A" }, "B" }))
        assert_err("invalid", store:append("S-1", { type = "A", id = 12 }))
        assert_err("invalid", store:append("S-1", { type = "A", metadata = "m" }))
      end)
    end)

    describe("a closed store", function()
      it("refuses to work", function()
        assert(store:append("S-1", events_of { "A", "B", "C" }))
        local iter = assert(store:read("S-1"))
        assert.is_table(iter())
        assert.is_true(store:close())
        assert.is_true(store:is_closed())
        assert.has_error(function() store:append("S-1", { type = "A" }) end)
        assert.has_error(function() store:version("S-1") end)
        assert.has_error(function() store:read("S-1") end)
        assert.has_error(function() store:read_all() end)
        assert.has_error(function() iter() end)
        -- closing twice is harmless
        assert.is_true(store:close())
      end)
    end)

    describe("payloads", function()
      it("round-trip nested arrays and objects, null, integers, floats, strings", function()
        local data = {
          n = 5, neg = -42, big = 9007199254740991, f = 1.5, zero = 0,
          s = "héllo \"quoted\" \n\t\\ ✓", t = true, no = false,
          nested = { 1, 2, { a = { "x", "y" }, b = es.json.null }, { 3, { 4, { 5 } } } },
          null = es.json.null,
          empty_array = es.json.array {}, empty_object = es.json.object {},
        }
        assert(store:append("S-1", { type = "A", data = data, metadata = { m = { 1, es.json.null } } }))
        local e = collect(assert(store:read("S-1")))[1]
        assert.equal(5, e.data.n)
        assert.equal(-42, e.data.neg)
        assert.equal(9007199254740991, e.data.big)
        assert.equal(1.5, e.data.f)
        assert.equal(0, e.data.zero)
        if lua54 then
          assert.equal("integer", math.type(e.data.n))
          assert.equal("integer", math.type(e.data.big))
          assert.equal("integer", math.type(e.data.nested[4][2][2][1]))
          assert.equal("float", math.type(e.data.f))
        end
        assert.equal(data.s, e.data.s)
        assert.is_true(e.data.t)
        assert.is_false(e.data.no)
        assert.equal(es.json.null, e.data.null)
        assert.equal(es.json.null, e.data.nested[3].b)
        assert.same({ "x", "y" }, e.data.nested[3].a)
        assert.equal(5, e.data.nested[4][2][2][1])
        assert.equal("[]", es.json.encode(e.data.empty_array))
        assert.equal("{}", es.json.encode(e.data.empty_object))
        assert.equal(es.json.null, e.metadata.m[2])
        assert.equal(1, e.metadata.m[1])
      end)

      it("keep a long stream readable from both ends", function()
        local n, batch = 5000, {}
        for i = 1, 1000 do batch[i] = { type = "N", data = { n = 1 } } end
        for _ = 1, n / 1000 do assert(store:append("Long-1", batch)) end
        assert.equal(n, store:version("Long-1"))
        local last = collect(assert(store:read("Long-1", { backward = true, limit = 1 })))
        assert.equal(n, last[1].version)
        assert.equal(n, (store:fold("Long-1", { N = function(s, e) return s + e.data.n end }, 0)))
        assert.same({ 2500, 2501 }, field(collect(assert(store:read("Long-1", { from = 2500, limit = 2 }))), "version"))
      end)
    end)

    -- A version names a place in a stream, expected_last_id what is there:
    -- after a restore from a backup a stream can reach the same version
    -- again with other events, and a state kept from before is not its.
    describe("expected_last_id", function()
      local function last_id(stream)
        return collect(assert(store:read(stream, { backward = true, limit = 1 })))[1].id
      end

      it("appends one event or a batch after the stream's last event", function()
        assert(store:append("L-1", events_of { "A", "B" }))
        local head = last_id("L-1")
        local res = assert(store:append("L-1", { type = "C" }, { expected_version = 2,
          expected_last_id = head:upper() }))
        assert.equal(3, res.version)
        res = assert(store:append("L-1", events_of { "D", "E" }, { expected_last_id = last_id("L-1") }))
        assert.equal(5, res.version)
        -- with the repository's new ids, as a command from a cached state sends them
        local ev = { type = "F", id = uuid() }
        res = assert(store:append("L-1", ev, { expected_version = 5, new_ids = true,
          expected_last_id = last_id("L-1") }))
        assert.equal(6, res.version)
        assert.same({ "A", "B", "C", "D", "E", "F" }, field(collect(assert(store:read("L-1"))), "type"))
      end)

      it("refuses an append after another last event, at the version expected too", function()
        assert(store:append("L-2", events_of { "A", "B" }))
        local first = collect(assert(store:read("L-2")))[1].id
        local cases = {
          { { type = "X" }, { expected_version = 2, expected_last_id = first } },
          { { type = "X" }, { expected_last_id = first } },
          { { type = "X", id = uuid() }, { expected_version = 2, new_ids = true, expected_last_id = first } },
          { events_of { "X", "Y" }, { expected_version = 2, expected_last_id = first } },
          { { type = "X" }, { expected_version = 2, expected_last_id = uuid() } },
        }
        for i, c in ipairs(cases) do
          local err = assert_err("conflict", store:append("L-2", c[1], c[2]))
          assert.equal("last_id", err.reason, "case " .. i)
          assert.equal(2, err.actual, "case " .. i)
          assert.truthy(err.message:find("is not the one expected", 1, true), err.message)
        end
        assert.equal(2, store:version("L-2"))
        assert.equal(2, #collect(assert(store:read("L-2"))))
      end)

      it("names no event of an empty stream, and a version conflict stays one", function()
        local err = assert_err("conflict", store:append("L-3", { type = "A" },
          { expected_last_id = uuid() }))
        assert.equal("last_id", err.reason)
        assert.equal(0, err.actual)
        assert.equal(0, store:version("L-3"))
        assert(store:append("L-3", events_of { "A", "B" }))
        err = assert_err("conflict", store:append("L-3", { type = "C" },
          { expected_version = 1, expected_last_id = last_id("L-3") }))
        assert.equal("version", err.reason)
        assert.equal(2, err.actual)
        assert.equal(2, store:version("L-3"))
      end)

      it("takes a retry of a batch that went through as done", function()
        assert(store:append("L-4", { type = "A" }))
        local head = last_id("L-4")
        local batch = events_of { "B", "C" }
        batch[1].id, batch[2].id = uuid(), uuid()
        local first = assert(store:append("L-4", batch, { expected_version = 1, expected_last_id = head }))
        local again = assert(store:append("L-4", batch, { expected_version = 1, expected_last_id = head }))
        assert.is_true(again.idempotent)
        assert.equal(first.version, again.version)
        assert.equal(3, store:version("L-4"))
      end)

      it("is what fold gives last: the id of the last event it read", function()
        local h = { A = function(n) return n + 1 end }
        local n, v, id = store:fold("L-6", h, 0)
        assert.same({ 0, 0 }, { n, v })
        assert.is_nil(id)
        assert(store:append("L-6", events_of { "A", "B", "A" }))
        n, v, id = store:fold("L-6", h, 0)
        assert.same({ 2, 3 }, { n, v })   -- B has no handler: read all the same
        assert.equal(last_id("L-6"), id)
        n, v, id = store:fold("L-6", h, 0, { to = 1 })
        assert.same({ 1, 1 }, { n, v })
        assert.equal(collect(assert(store:read("L-6")))[1].id, id)
        assert.is_nil(select(3, store:fold("L-6", h, 0, { from = 4 })))
      end)

      it("refuses what is not a UUID", function()
        assert(store:append("L-5", { type = "A" }))
        fails("invalid", "expected last id 'nope' is not a UUID")(
          store:append("L-5", { type = "B" }, { expected_last_id = "nope" }))
        fails("invalid", "option 'expected_last_id' must be a string (a UUID), got number")(
          store:append("L-5", { type = "B" }, { expected_last_id = 7 }))
        fails("invalid", "expected last id contains a NUL byte")(
          store:append("L-5", { type = "B" }, { expected_last_id = last_id("L-5") .. "\0x" }))
        assert.equal(1, store:version("L-5"))
      end)
    end)
  end)
end

describe("memory store specifics", function()
  it("memory:NAME opens a new private store each time", function()
    local a = assert(es.open("memory:shared"))
    local b = assert(es.open("memory:shared"))
    assert(a:append("S-1", { type = "A" }))
    assert.equal(1, a:version("S-1"))
    assert.equal(0, b:version("S-1"))
    a:close()
    b:close()
  end)

  it("uses checkpoints of the form 0:<position>", function()
    local s = assert(es.open("memory:"))
    local _, cp = s:read_all()
    assert.equal("0:0", cp)
    assert(s:append("S-1", events_of { "A", "B", "C" }))
    local batch
    batch, cp = s:read_all({ limit = 2 })
    assert.equal(2, #batch)
    assert.equal("0:2", cp)
    -- a filtered page moves the checkpoint past what it scanned
    _, cp = s:read_all({ after = cp, types = { "Z" } })
    assert.equal("0:3", cp)
    assert(s:append("S-2", { type = "Late" }))
    batch = assert(s:read_all({ after = cp }))
    assert.same({ "Late" }, field(batch, "type"))
    fails("invalid", "12:3")(s:read_all({ after = "12:3" }))
    s:close()
  end)

  it("has no SQL and no transactions", function()
    local s = assert(es.open("memory:"))
    assert_err("invalid", s:query("select 1"))
    assert_err("invalid", s:begin())
    s:close()
  end)
end)
