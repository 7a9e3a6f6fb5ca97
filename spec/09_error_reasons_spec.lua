-- err.reason: what code may decide from (never from message text), on
-- both stores; and the session checks a caller's transaction gets from
-- every call (query parameters, migrate, commit).
local es = require "eventsourcing"
local helpers = require "helpers"

local function failed(kind, reason, ok, err)
  assert.is_nil(ok)
  assert.is_table(err)
  assert.equal(kind, err.kind)
  assert.equal(reason, err.reason, "reason of: " .. tostring(err))
  return err
end

describe("err.reason", function()
  for _, entry in ipairs(helpers.stores()) do
    describe(entry.name, function()
      local store
      before_each(function() store = helpers.open(entry) end)
      after_each(function() store:close() end)

      it("is 'version' for an expected version that does not match", function()
        assert(store:append("R-1", { type = "A" }))
        failed("conflict", "version", store:append("R-1", { type = "B" }, { expected_version = 5 }))
        failed("conflict", "version", store:append("R-1", { type = "B" }, { expected_version = es.NO_STREAM }))
        failed("conflict", "version", store:append("R-2", { type = "B" }, { expected_version = es.STREAM_EXISTS }))
      end)

      it("is 'id_taken' for an event id used elsewhere", function()
        local id = require("eventsourcing.core").uuid()
        assert(store:append("R-3", { id = id, type = "A" }))
        failed("invalid", "id_taken", store:append("R-4", { id = id, type = "A" }))
        failed("invalid", "id_taken", store:append("R-3", { id = id, type = "A" }, { expected_version = 9 }))
      end)

      it("is absent where nothing finer than the kind applies", function()
        local ok, err = store:append("", { type = "A" })
        if ok == nil then assert.is_nil(err.reason) end
        ok, err = es.json.decode("[")
        assert.is_nil(ok)
        assert.is_nil(err.reason)
      end)
    end)
  end

  describe("postgresql", function()
    local store, admin, schema
    before_each(function()
      store, admin, schema = helpers.open_pair()
    end)
    after_each(function()
      store:close()
      admin:close()
    end)

    local function raise(code)
      return store:query(("DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '%s'; END $$")
        :format(code))
    end

    it("maps serialization failures, deadlocks and timeouts", function()
      failed("conflict", "serialization", raise("40001"))
      failed("database", "serialization", raise("40P01"))
      failed("database", "timeout", raise("57014"))
      failed("database", "timeout", raise("55P03"))
      local err = failed("database", nil, raise("42601"))
      assert.equal("42601", err.sqlstate)
    end)

    it("says 'timeout' for a real statement timeout", function()
      local s = assert(es.open(helpers.database_url(), { schema = schema, statement_timeout = 50 }))
      failed("database", "timeout", s:query("SELECT pg_sleep(2)"))
      s:close()
    end)

    it("says 'tx_aborted' for any failure inside the caller's transaction, then on", function()
      assert(store:begin())
      failed("database", "tx_aborted", raise("57014"))
      local err = failed("database", "tx_aborted", store:append("T-1", { type = "A" }))
      assert.equal("25P02", err.sqlstate)
      assert(store:rollback())
      assert(store:append("T-1", { type = "A" }))     -- the session goes on
    end)

    it("keeps the transaction usable after a version conflict or a taken id", function()
      local id = require("eventsourcing.core").uuid()
      assert(store:append("U-1", { id = id, type = "A" }))
      assert(store:begin())
      failed("conflict", "version", store:append("U-1", { type = "B" }, { expected_version = 7 }))
      failed("invalid", "id_taken", store:append("U-2", { id = id, type = "B" }))
      assert(store:append("U-3", { type = "C" }))
      assert(store:commit())
      assert.equal(1, store:version("U-3"))
    end)

    it("says 'order' when the stream-order rule refuses an append in a transaction", function()
      assert(store:begin())
      -- this transaction gets its id first ...
      assert(store:query(('INSERT INTO "%s".probe VALUES (1)'):format(schema)))
      -- ... a younger one appends to the stream and commits ...
      assert(admin:append("O-1", { type = "A" }))
      -- ... so appending to it now would put events out of order
      local err = failed("conflict", "order", store:append("O-1", { type = "B" }))
      assert.equal("40001", err.sqlstate)
      assert.matches("aborted", err.message)
      assert(store:rollback())
      assert(store:append("O-1", { type = "B" }, { expected_version = 1 }))
    end)

    it("the repository does not retry a conflict in an aborted transaction", function()
      local Counter = es.aggregate {
        name = "Counter",
        initial = function() return { n = 0 } end,
        apply = { Added = function(st) st.n = st.n + 1 end },
        decide = { Add = function() return { type = "Added", data = {} } end },
      }
      local repo = es.repository(store, { max_retries = 3 })
      assert(repo:execute(Counter, "r", "Add", {}))
      -- a caller's expected version that does not hold: reason "version"
      failed("conflict", "version", repo:execute(Counter, "r", "Add", {}, { expected_version = 5 }))
      assert(store:begin())
      assert(store:query(('INSERT INTO "%s".probe VALUES (1)'):format(schema)))
      assert(admin:append("Counter-r", { type = "Added", data = {} }))
      failed("conflict", "order", repo:execute(Counter, "r", "Add", {}))
      assert.equal(0, repo.stats.retries)
      assert(store:rollback())
      assert.equal(3, assert(repo:execute(Counter, "r", "Add", {})).version)
    end)

    it("refuses to report an aborted transaction as committed", function()
      assert(store:begin())
      assert(store:query(('INSERT INTO "%s".probe VALUES (1)'):format(schema)))
      assert.is_nil(raise("22012"))
      local err = failed("database", "tx_aborted", store:commit())
      assert.matches("rolled back", err.message)
      assert.same({}, assert(admin:query(('SELECT x FROM "%s".probe'):format(schema))))
      assert(store:append("C-1", { type = "A" }))     -- no transaction open now
      assert.equal(1, store:version("C-1"))
    end)
  end)
end)

describe("session checks", function()
  local store, admin, schema
  before_each(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    admin = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:query(('CREATE TABLE "%s".probe (x text)'):format(schema)))
  end)
  after_each(function()
    store:close()
    admin:close()
  end)

  it("refuses a query parameter with a NUL byte instead of cutting it short", function()
    local ok, err = store:query(('INSERT INTO "%s".probe VALUES ($1)'):format(schema), "ab\0cd")
    assert.is_nil(ok)
    assert.equal("invalid", err.kind)
    assert.matches("parameter 1", err.message)
    assert.matches("NUL", err.message)
    assert.same({}, assert(admin:query(('SELECT x FROM "%s".probe'):format(schema))))
  end)

  it("refuses a NUL byte in string options", function()
    assert(store:append("N-1", { type = "A" }))
    assert.has_error(function() store:read("N-1", { before = "2030-01-01T00:00:00Z\0x" }) end)
  end)

  it("migrates inside a transaction with a read-ahead batch on the wire", function()
    for i = 1, 30 do assert(store:append("M-" .. i, { type = "A" })) end
    assert(store:begin())
    local _, cp = assert(store:read_all({ limit = 10, prefetch = true }))
    assert(store:migrate())
    -- the batch asked for ahead is still there to be had
    local batch = assert(store:read_all({ after = cp, limit = 10 }))
    assert.equal(10, #batch)
    assert.equal("M-11", batch[1].stream)
    assert(store:append("M-1", { type = "B" }))
    assert(store:commit())
    assert.equal(2, store:version("M-1"))
  end)

  it("a fold whose handler migrates inside a transaction fails instead of folding wrong data", function()
    local evs = {}
    for i = 1, 2500 do evs[i] = { type = "T", data = { i = i } } end
    assert(store:append("F-1", evs))
    assert(store:begin())
    local state, err = store:fold("F-1", { T = function(acc, e)
      if e.version == 10 then assert(store:migrate()) end
      return acc + 1
    end }, 0)
    assert.is_nil(state)
    assert.equal("invalid", err.kind)
    assert.matches("must not use the store", err.message)
    assert(store:rollback())
  end)

  it("migrate inside a transaction whose session was lost says so", function()
    assert(store:begin())
    local pid = assert(store:query("SELECT pg_backend_pid() AS pid"))[1].pid
    assert(admin:query("SELECT pg_terminate_backend($1)", pid))
    for _ = 1, 100 do
      local r = assert(admin:query("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid))
      if r[1].n == 0 then break end
      helpers.sleep(0.02)
    end
    local ok, err = store:migrate()
    assert.is_nil(ok)
    assert.equal("connection", err.kind)
    assert(store:rollback())
    assert(store:migrate())
  end)
end)
