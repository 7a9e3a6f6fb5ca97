-- The session under stress (PostgreSQL): a connection lost inside a
-- transaction, pages read ahead that something else disturbs, and inputs
-- that C would otherwise misread. Each case was once a real defect.
local es = require "eventsourcing"
local helpers = require "helpers"

local function terminate(admin, store)
  local pid = assert(store:query("SELECT pg_backend_pid() AS pid"))[1].pid
  assert(admin:query("SELECT pg_terminate_backend($1)", pid))
  -- wait until the backend is really gone
  for _ = 1, 100 do
    local r = assert(admin:query("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid))
    if r[1].n == 0 then return end
    helpers.sleep(0.02)
  end
end

describe("session (postgresql)", function()
  local store, admin, schema

  before_each(function()
    store, admin, schema = helpers.open_pair()
  end)
  after_each(function()
    store:close()
    admin:close()
  end)

  local function probe_rows()
    local out = {}
    for i, r in ipairs(assert(admin:query(('SELECT x FROM "%s".probe ORDER BY x'):format(schema)))) do
      out[i] = r.x
    end
    return out
  end

  it("never carries on in autocommit after losing the session inside a transaction", function()
    for i = 1, 30 do assert(store:append("Probe-" .. i, { type = "Probe" })) end
    assert(store:begin())
    assert(store:query(('INSERT INTO "%s".probe VALUES (1)'):format(schema)))
    -- a batch fetched ahead is on the wire when the session dies
    assert(store:read_all({ limit = 10, prefetch = true }))
    terminate(admin, store)
    local ok, err = store:query(('INSERT INTO "%s".probe VALUES (2)'):format(schema))
    assert.is_nil(ok)
    assert.equal("connection", err.kind)
    ok, err = store:append("Probe-1", { type = "Late" })
    assert.is_nil(ok)
    assert.equal("connection", err.kind)
    assert.matches("rollback", err.message)
    ok, err = store:commit()
    assert.is_nil(ok)
    assert.equal("connection", err.kind)
    assert.same({}, probe_rows())                  -- nothing of it committed
    assert.equal(1, store:version("Probe-1"))      -- and the store works again
  end)

  it("rollback after a lost session succeeds and the store goes on", function()
    assert(store:begin())
    assert(store:append("Lost-1", { type = "A" }))
    terminate(admin, store)
    local ok, err = store:append("Lost-1", { type = "B" })
    assert.is_nil(ok)
    assert.equal("connection", err.kind)
    assert(store:rollback())
    assert.equal(0, store:version("Lost-1"))
    assert(store:append("Lost-1", { type = "C" }, { expected_version = es.NO_STREAM }))
  end)

  local function long_stream(name)
    local evs = {}
    for i = 1, 2500 do evs[i] = { type = "T", data = { i = i } } end
    assert(store:append(name, evs))
  end

  it("a fold that failed half way leaves nothing on the wire for the next one", function()
    long_stream("A-1"); long_stream("B-1")
    assert.is_false((pcall(store.fold, store, "A-1", { T = function() error("boom") end }, 0)))
    local n = 0
    local total, version = store:fold("B-1", { T = function(acc)
      n = n + 1
      if n == 1500 then collectgarbage(); collectgarbage() end   -- the first cursor goes
      return acc + 1
    end }, 0)
    assert.equal(2500, total)
    assert.equal(2500, version)
  end)

  it("a fold whose handler uses the store fails instead of folding wrong data", function()
    long_stream("M-1")
    local state, err = store:fold("M-1", { T = function(acc, e)
      if e.version == 10 then assert(store:read_all({ limit = 5, prefetch = true })) end
      return acc + 1
    end }, 0)
    assert.is_nil(state)
    assert.equal("invalid", err.kind)
    assert.matches("must not use the store", err.message)
    assert.equal(2500, (store:fold("M-1", { T = function(acc) return acc + 1 end }, 0)))
  end)

  it("a failing query row does not lose the result (and the store goes on)", function()
    local ok = pcall(store.query, store, "SELECT repeat('x', 1000) AS big, '1e400'::json AS j")
    assert.is_false(ok)
    assert.equal(1, assert(store:query("SELECT 1 AS one"))[1].one)
  end)
end)

describe("inputs C could misread", function()
  for _, entry in ipairs(helpers.stores()) do
    describe(entry.name, function()
      local store
      before_each(function() store = helpers.open(entry) end)
      after_each(function() store:close() end)

      it("keeps an event type computed by __index alive through the append", function()
        local mt = { __index = function(_, k)
          if k == "type" then return ("Computed" .. "Type"):rep(1) end
          if k == "data" then collectgarbage(); collectgarbage(); return { x = 1 } end
        end }
        local r = assert(store:append("Idx-1", setmetatable({ id = nil }, mt) and
          { setmetatable({}, mt) }))
        assert.equal(1, r.version)
        for e in assert(store:read("Idx-1")) do assert.equal("ComputedType", e.type) end
      end)

      it("refuses names and types with NUL bytes instead of cutting them short", function()
        assert.has_error(function() store:append("Nul-1\0junk", { type = "A" }) end)
        local ok, err = store:append("Nul-2", { type = "A\0B" })
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.matches("NUL", err.message)
        assert.equal(0, store:version("Nul-2"))
      end)

      it("refuses stream names and event types that are not UTF-8, like PostgreSQL's text", function()
        -- found by the names fuzz target: the memory store took them
        local ok, err = store:append("Bad-\192\175", { type = "A" })
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.matches("UTF%-8", err.message)
        ok, err = store:append("Bad-1", { type = "\237\160\128" })
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.matches("UTF%-8", err.message)
        assert.equal(0, store:version("Bad-1"))
        assert(store:append("Caf\195\169-\240\159\152\128", { type = "\228\184\173" }))
      end)

      it("refuses a NUL character in snapshot state the way it does in payloads", function()
        local ok, err = store:save_snapshot("Snap-1", { version = 1, state = { s = "a\0b" } })
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.matches("u0000", err.message)
        assert.is_nil(store:load_snapshot("Snap-1"))
      end)

      it("takes numbers, not numeric strings, for integer options", function()
        assert(store:append("Num-1", { { type = "A" }, { type = "B" } }))
        assert.has_error(function() store:read("Num-1", { limit = "1" }) end)
        assert.has_error(function() store:fold("Num-1", {}, 0, { to = "1" }) end)
      end)

      it("treats the same ids again at another expected version as taken ids", function()
        local id = require("eventsourcing.core").uuid()
        assert(store:append("Idem-1", { id = id, type = "A" }, { expected_version = es.NO_STREAM }))
        -- a retry where the batch belongs: idempotent
        assert.equal(1, assert(store:append("Idem-1", { id = id, type = "A" },
          { expected_version = es.NO_STREAM })).version)
        assert.equal(1, assert(store:append("Idem-1", { id = id, type = "A" },
          { expected_version = 0 })).version)
        -- the same ids where they do not belong: an error, nothing stored
        local ok, err = store:append("Idem-1", { id = id, type = "A" }, { expected_version = 7 })
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.matches("already used", err.message)
        ok, err = store:append("Idem-1", { id = id, type = "A" }, { expected_version = es.STREAM_EXISTS })
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.equal(1, store:version("Idem-1"))
      end)
    end)
  end
end)
