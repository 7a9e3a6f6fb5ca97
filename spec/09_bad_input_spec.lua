-- Bad input, everywhere in the Lua API: wrong types, huge values, invalid
-- UTF-8, NUL bytes, numbers JSON cannot carry, SQL text in every string.
-- Each case must end in a clear error (a raise for a programming mistake,
-- nil + err for bad data) and leave every stored byte as it was: a digest
-- of every table in the store's schema is taken before and after.
local es = require "eventsourcing"
local helpers = require "helpers"

local HUGE = ("x"):rep(1024 * 1024)
local SQL = "x'); DROP TABLE events; --"

local function nested(depth)
  local t = {}
  local cur = t
  for _ = 2, depth do cur.a = {}; cur = cur.a end
  return t
end

local function long_array(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

local digest = helpers.schema_digest

-- Runs f; it must raise or return nil, err. Returns the message.
local function refused(f)
  local ok, a, b = pcall(f)
  if ok then
    assert.is_nil(a, "expected a refusal, got a result")
    assert.is_table(b, "a refusal without an error table")
    assert.is_string(b.kind)
    assert.is_string(b.message)
    assert.truthy(#b.message > 0)
    return tostring(b), b
  end
  local msg = type(a) == "table" and tostring(a.message or a) or tostring(a)
  assert.truthy(#msg > 0, "an empty error")
  assert.falsy(msg:find("attempt to index", 1, true), "a crash, not a clear error: " .. msg)
  assert.falsy(msg:find("attempt to call", 1, true), "a crash, not a clear error: " .. msg)
  assert.falsy(msg:find("stack overflow", 1, true), "a crash, not a clear error: " .. msg)
  return msg, a
end

describe("bad input (postgresql): a clear error and no stored byte changed", function()
  local store, schema, before

  setup(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate())
    -- something to protect
    assert(store:append("Order-1", {
      { type = "OrderCreated", data = { customer_id = "c1" } },
      { type = "ItemAdded", data = { product_id = "p", quantity = 1 } },
    }))
    assert(store:save_snapshot("Order-1", { version = 2, state = { n = 1 } }))
    before = digest(store, schema)
  end)
  teardown(function()
    if store then
      assert.equal(before, digest(store, schema))
      store:close()
    end
  end)
  after_each(function()
    assert.equal(before, digest(store, schema), "stored data changed")
  end)

  local ev = function(t) return { type = "ItemAdded", data = t } end

  local append_cases = {
    { "a stream name that is not a string", function() return store:append(42, { ev {} }) end },
    { "an empty stream name", function() return store:append("", { ev {} }) end },
    { "a stream name with a NUL byte", function() return store:append("Order-\0x", { ev {} }) end },
    { "a stream name of invalid UTF-8", function() return store:append("Order-\xff\xfe", { ev {} }) end },
    { "a 1 MB stream name", function() return store:append("Order-" .. HUGE, { ev {} }) end },
    { "an event type with a NUL byte", function()
      return store:append("Order-2", { { type = "A\0B", data = {} } })
    end },
    { "an event type of invalid UTF-8", function()
      return store:append("Order-2", { { type = "\xc3\x28", data = {} } })
    end },
    { "an event without a type", function() return store:append("Order-2", { { data = {} } }) end },
    { "an event type that is a table", function() return store:append("Order-2", { { type = {}, data = {} } }) end },
    { "data that is a string", function() return store:append("Order-2", { { type = "A", data = "x" } }) end },
    { "data nested 1,001 deep", function() return store:append("Order-2", { ev(nested(1001)) }) end },
    { "data with invalid UTF-8", function() return store:append("Order-2", { ev { s = "\xff" } }) end },
    { "data with a NUL byte", function() return store:append("Order-2", { ev { s = "a\0b" } }) end },
    { "data with a key of invalid UTF-8", function() return store:append("Order-2", { ev { ["\xff"] = 1 } }) end },
    { "data with NaN", function() return store:append("Order-2", { ev { n = 0 / 0 } }) end },
    { "data with +inf", function() return store:append("Order-2", { ev { n = math.huge } }) end },
    { "data with -inf", function() return store:append("Order-2", { ev { n = -math.huge } }) end },
    { "data with a function", function() return store:append("Order-2", { ev { f = print } }) end },
    { "metadata that is a number", function()
      return store:append("Order-2", { { type = "A", data = {}, metadata = 5 } })
    end },
    { "an id that is not a UUID", function()
      return store:append("Order-2", { { id = SQL, type = "A", data = {} } })
    end },
    { "an expected_version that is a float", function()
      return store:append("Order-2", { ev {} }, { expected_version = 1.5 }) end },
    { "an expected_version beyond 2^53", function()
      return store:append("Order-2", { ev {} }, { expected_version = 2 ^ 60 }) end },
    { "an expected_version that is SQL", function()
      return store:append("Order-2", { ev {} }, { expected_version = SQL }) end },
    { "a stale expected_version", function()
      return store:append("Order-1", { ev {} }, { expected_version = 1 }) end },
    { "no events", function() return store:append("Order-2", {}) end },
    { "events that are not a table", function() return store:append("Order-2", "events") end },
    { "options that are not a table", function() return store:append("Order-2", { ev {} }, "x") end },
  }

  local read_cases = {
    { "read: a stream name with a NUL byte", function() return store:read("Order-1\0", {}) end },
    { "read: a negative from", function() return store:read("Order-1", { from = -1 }) end },
    { "read: from that is not an integer", function() return store:read("Order-1", { from = 1.5 }) end },
    { "read: before that is not an instant", function() return store:read("Order-1", { before = SQL }) end },
    { "read: limit that is a string", function() return store:read("Order-1", { limit = "ten" }) end },
    { "read_all: a checkpoint that is SQL", function() return store:read_all({ after = SQL }) end },
    { "read_all: a checkpoint of invalid UTF-8", function() return store:read_all({ after = "\xff:1" }) end },
    { "read_all: a checkpoint beyond int64", function()
      return store:read_all({ after = "99999999999999999999999:1" }) end },
    { "read_all: types that are not a table", function() return store:read_all({ types = "A" }) end },
    { "read_all: a type with a NUL byte", function() return store:read_all({ types = { "A\0" } }) end },
    { "read_all: a negative limit", function() return store:read_all({ limit = -5 }) end },
    { "fold: handlers that are not a table", function() return store:fold("Order-1", "h", {}) end },
    { "fold: to that is a string", function() return store:fold("Order-1", {}, {}, { to = "x" }) end },
    { "version: a table", function() return store:version({}) end },
    { "snapshot: a state with a NUL byte", function()
      return store:save_snapshot("Order-1", { version = 2, state = { s = "\0" } }) end },
    { "snapshot: a version that is not an integer", function()
      return store:save_snapshot("Order-1", { version = 2.5, state = {} }) end },
    { "query: a parameter with a NUL byte", function()
      return store:query("SELECT $1::text AS t", "a\0b") end },
    { "query: a parameter of invalid UTF-8", function()
      return store:query("SELECT $1::text AS t", "\xff") end },
  }

  for _, c in ipairs(append_cases) do
    it("append refuses " .. c[1], function() refused(c[2]) end)
  end
  for _, c in ipairs(read_cases) do
    it(c[1], function()
      local ok, it_or_err, err = pcall(c[2])
      if ok and type(it_or_err) == "function" then
        -- a lazy iterator: the refusal may come with the first step
        refused(function() local e = it_or_err(); if e then return e end return nil, err end)
      else
        refused(c[2])
      end
    end)
  end

  it("takes SQL text in a query parameter as a value only", function()
    local sql = ("SELECT count(*) AS n FROM %q.events WHERE stream = $1"):format(schema)
    local r = assert(store:query(sql, SQL))
    assert.equal(0, r[1].n)
  end)

  it("a 100,000-element array and a 1 MB string are stored whole, then the stream is put back", function()
    -- not bad input, but big: it must work, and rolling it back leaves nothing
    assert(store:begin())
    local r = assert(store:append("Big-1", { ev { a = long_array(100000), s = HUGE } }))
    assert.equal(1, r.version)
    local got
    for e in assert(store:read("Big-1")) do got = e end
    assert.equal(100000, #got.data.a)
    assert.equal(#HUGE, #got.data.s)
    assert(store:rollback())
  end)

  describe("JSON codec", function()
    local cases = {
      { "truncated text", "{\"a\":" },
      { "invalid UTF-8", "\"\xff\"" },
      { "a lone surrogate", "\"\\ud800\"" },
      { "nesting 1,001 deep", ("["):rep(1001) .. ("]"):rep(1001) },
      { "a NUL byte in text", "\"a\0b\"" },
      { "trailing garbage", "{} x" },
      { "NaN", "NaN" },
      { "a number beyond double", "1e400" },
    }
    for _, c in ipairs(cases) do
      it("decode refuses " .. c[1], function()
        local v, err = es.json.decode(c[2])
        assert.is_nil(v)
        assert.equal("invalid", err.kind)
        assert.truthy(#err.message > 0)
      end)
    end
    it("encode refuses inf, nan, functions and invalid UTF-8 with a clear error", function()
      for _, v in ipairs { { math.huge }, { 0 / 0 }, { print }, { "\xff" }, nested(1001) } do
        refused(function() return es.json.encode(v) end)
      end
    end)
  end)

  describe("read models", function()
    it("refuse SQL in names, columns and index names at definition", function()
      local bad = {
        { name = SQL, key = "id", columns = { id = "text" }, on = {} },
        { name = "rm_x", key = "id", columns = { id = "text", [SQL] = "text" }, on = {} },
        { name = "rm_x", key = "id", columns = { id = "text; DROP TABLE events" }, on = {} },
        { name = "rm_x", key = SQL, columns = { id = "text" }, on = {} },
        { name = "rm_x", key = "id", columns = { id = "text" }, indexes = { SQL }, on = {} },
        { name = "rm_\0x", key = "id", columns = { id = "text" }, on = {} },
      }
      for _, def in ipairs(bad) do
        local ok, err = pcall(es.read_model, def)
        assert.is_false(ok)
        assert.truthy(#tostring(err) > 0)
      end
    end)

    it("treat SQL in keys, filters and cursors as values", function()
      local Rm = es.read_model {
        name = "rm_bad_input", key = "id",
        columns = { id = "text", customer_id = "text" },
        on = { OrderCreated = function(row, e) row.customer_id = e.data.customer_id end },
      }
      local projector = es.projector(store, { Rm })
      assert(projector:migrate())
      -- migrate made tables: that is the only change, so take a new digest
      before = digest(store, schema)
      assert.is_nil(Rm:get(store, SQL))
      local rows = assert(Rm:find(store, { customer_id = SQL }))
      assert.equal(0, #rows)
      refused(function() return Rm:find(store, { customer_id = "c1" }, { after = SQL }) end)
      refused(function() return Rm:find(store, { [SQL] = "x" }) end)
      refused(function() return Rm:find(store, {}, { order_by = SQL }) end)
      refused(function() return Rm:find(store, {}, { limit = -1 }) end)
      refused(function() return Rm:get(store, "a\0b") end)
    end)
  end)
end)
