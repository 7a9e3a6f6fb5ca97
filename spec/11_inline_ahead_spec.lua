-- A command with an inline read model on PostgreSQL: the read model's rows
-- are loaded in front of the append, in its round trip (store:query_ahead),
-- when its keys follow from the stream. The rows must still be exactly what
-- a load after the append would have given: a command that commits in
-- between makes the append conflict, and the retry starts again.
local es = require "eventsourcing"
local helpers = require "helpers"

local Counter = es.aggregate {
  name = "Counter",
  initial = function() return { total = 0 } end,
  apply = { Added = function(s, e) s.total = s.total + e.data.n end },
  decide = { Add = function(_, cmd)
    if cmd.hook then cmd.hook() end
    return { type = "Added", data = { n = cmd.n, group = cmd.group } }
  end },
}

-- commands that went in one round trip: none on Citus, where an append
-- and the statement behind it take two
local function trips(n) return helpers.distributed() and 0 or n end

local function counters(name, key_of, by_stream)
  return es.read_model {
    name = name,
    key = "id",
    key_of = key_of,
    keys_by_stream = by_stream,
    one_trip = by_stream,
    columns = { id = "text", total = "bigint", count = "integer", version = "bigint" },
    on = { Added = function(row, e)
      row.total = (row.total or 0) + e.data.n
      row.count = (row.count or 0) + 1
      row.version = e.version
    end },
  }
end

describe("inline read model rows loaded ahead of the append (postgresql)", function()
  local store, other, schema

  before_each(function() store, other, schema = helpers.open_pair() end)
  after_each(function()
    store:close()
    other:close()
  end)

  -- A writer in the act: a child process appends { n = 100 } to stream at
  -- expected + 1 and holds its transaction open for a second; returns
  -- once that transaction sleeps, with the child's pid.
  local function hold_append(stream, expected)
    local core = require "eventsourcing.core"
    local pid = assert(core.fork())
    if pid == 0 then
      local ok = pcall(function()
        local s = assert(es.open(helpers.database_url(), { schema = schema }))
        assert(s:begin())
        assert(s:append(stream, { { type = "Added", data = { n = 100 } } }, { expected_version = expected }))
        assert(s:query("SELECT pg_sleep(1.0) AS slept"))
        assert(s:commit())
      end)
      core.exit(ok and 0 or 1)
    end
    local deadline = os.time() + 10
    repeat
      local n = assert(other:query("SELECT count(*)::int AS n FROM pg_stat_activity "
        .. "WHERE query LIKE 'SELECT pg_sleep(1.0)%' AND state = 'active'"))[1].n
    until n > 0 or os.time() > deadline
    return pid
  end

  local function row(rm, id)
    return assert(store:query(("SELECT total, count, version FROM %q.%s WHERE id = $1")
      :format(schema, rm.name), id))[1]
  end

  it("keeps the row equal to the fold, command after command", function()
    local rm = counters("rm_counters")
    assert(rm:migrate(store))
    local repo = es.repository(store, { read_models = { rm } })
    for i = 1, 12 do
      assert(repo:execute(Counter, "c1", "Add", { n = i }))
    end
    local state, version = assert(repo:load(Counter, "c1"))
    assert.same({ total = state.total, count = 12, version = version }, row(rm, "c1"))
    assert.equal(78, state.total)
  end)

  it("retries when another command commits between the fold and the append", function()
    local rm = counters("rm_counters")
    assert(rm:migrate(store))
    local repo = es.repository(store, { read_models = { rm } })
    local repo2 = es.repository(other, { read_models = { rm } })
    assert(repo:execute(Counter, "c2", "Add", { n = 1 }))
    local raced = false
    local r = assert(repo:execute(Counter, "c2", "Add", { n = 10, hook = function()
      if raced then return end
      raced = true
      assert(repo2:execute(Counter, "c2", "Add", { n = 100 }))
    end }))
    assert.equal(3, r.version)
    assert.equal(1, repo.stats.retries)
    -- each command applied once: 1 + 100 + 10
    assert.same({ total = 111, count = 3, version = 3 }, row(rm, "c2"))
  end)

  it("retries when another writer takes the same version at once (the append waits, then aborts)", function()
    local core = require "eventsourcing.core"
    local rm = counters("rm_counters")
    assert(rm:migrate(store))
    local repo = es.repository(store, { read_models = { rm } })
    assert(repo:execute(Counter, "c5", "Add", { n = 1 }))
    local pid
    local r = assert(repo:execute(Counter, "c5", "Add", { n = 10, hook = function()
      -- after this command's fold: version 2 held by a writer in the act,
      -- so this command's append of version 2 waits on the unique index,
      -- then fails (23505) in its transaction, which aborts
      pid = pid or hold_append("Counter-c5", 1)
    end }))
    local how, code = core.wait(pid)
    assert.same({ "exited", 0 }, { how, code })
    assert.equal(3, r.version)
    assert.equal(1, repo.stats.retries)
    local state = assert(repo:load(Counter, "c5"))
    assert.equal(111, state.total)
  end)

  it("with the row kept in the state cache (one round trip): a writer met in the act is a "
    .. "conflict, nothing of the command is committed, and the retry reads the stream", function()
    local core = require "eventsourcing.core"
    local rm = counters("rm_counters", nil, true)
    assert(rm:migrate(store))
    local repo = es.repository(store, { read_models = { rm }, cache = es.state_cache() })
    assert(repo:execute(Counter, "c6", "Add", { n = 1 }))
    assert(repo:execute(Counter, "c6", "Add", { n = 2 }))
    assert.equal(trips(1), repo.stats.one_trips)
    local pid
    local r = assert(repo:execute(Counter, "c6", "Add", { n = 10, hook = function()
      -- decided from the cache (version 2): version 3 held by a writer in
      -- the act, so this command's append of version 3 waits on the unique
      -- index, then fails in its pipeline, with the row's write and COMMIT
      -- behind it
      pid = pid or hold_append("Counter-c6", 2)
    end }))
    local how, code = core.wait(pid)
    assert.same({ "exited", 0 }, { how, code })
    assert.equal(4, r.version)
    assert.equal(1, repo.stats.retries)
    assert.equal(trips(1), repo.stats.one_trips, "the retry met a row kept at another version")
    -- the child's event never reached the row (it wrote no row): 1 + 2 + 10
    assert.same({ total = 13, count = 3, version = 4 }, row(rm, "c6"))
    assert(repo:execute(Counter, "c6", "Add", { n = 1000 }))
    assert.equal(trips(2), repo.stats.one_trips)
    assert.same({ total = 1013, count = 4, version = 5 }, row(rm, "c6"))
  end)

  describe("with the row kept in the state cache", function()
    -- Tally: a command may carry its events' ids, and several events
    local Tally = es.aggregate {
      name = "Tally",
      initial = function() return { total = 0 } end,
      apply = { Added = function(st, e) st.total = st.total + e.data.n end },
      decide = { Add = function(_, cmd)
        local out = {}
        for i, n in ipairs(cmd.ns) do
          out[i] = { type = "Added", id = cmd.ids and cmd.ids[i], data = { n = n } }
        end
        return out
      end },
    }
    local function add_n(repo, id, ns, ids)
      return repo:execute(Tally, id, "Add", { ns = ns, ids = ids })
    end

    it("answers a command decided again from a state that is behind, with its first ids, "
      .. "from the stream: no row written twice or from the wrong row", function()
      local rm = counters("rm_counters", nil, true)
      assert(rm:migrate(store))
      local p1 = es.repository(store, { read_models = { rm }, cache = es.state_cache() })
      local p2 = es.repository(other, { read_models = { rm }, cache = es.state_cache() })
      assert(add_n(p1, "t1", { 1 }))
      assert(add_n(p1, "t1", { 2 }))          -- p1 keeps version 2
      local k = require("eventsourcing.core").uuid()
      assert(add_n(p2, "t1", { 10 }, { k }))  -- version 3, id k
      assert(add_n(p2, "t1", { 100 }))        -- version 4
      -- p1 runs the first command again: its state (2) makes the append a
      -- retry of version 3, which the stream holds already
      local ok, err = add_n(p1, "t1", { 10 }, { k })
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)       -- as without a cache: the id is used
      assert.matches("already used", err.message)
      assert.same({ total = 113, count = 4, version = 4 }, row(rm, "t1"))
      assert.equal(4, store:version("Tally-t1"))
    end)

    it("gives the handlers copies: what they do to an event is not what is stored", function()
      local rm = es.read_model {
        name = "rm_mutating", key = "id", keys_by_stream = true, one_trip = true,
        columns = { id = "text", total = "bigint" },
        on = { Added = function(r, e)
          e.data.n = e.data.n * 100
          r.total = (r.total or 0) + e.data.n
        end },
      }
      assert(rm:migrate(store))
      local repo = es.repository(store, { read_models = { rm }, cache = es.state_cache() })
      for _, n in ipairs({ 1, 2, 3 }) do assert(add_n(repo, "t2", { n })) end
      assert.equal(trips(2), repo.stats.one_trips)
      local stored = {}
      for e in assert(store:read("Tally-t2")) do stored[#stored + 1] = e.data.n end
      assert.same({ 1, 2, 3 }, stored)
      assert.equal(6, assert(repo:load(Tally, "t2")).total)
    end)

    it("never gives a row kept for other columns to a read model of the same name", function()
      local cache = es.state_cache()
      local v1 = counters("rm_counters", nil, true)
      assert(v1:migrate(store))
      local r1 = es.repository(store, { read_models = { v1 }, cache = cache })
      assert(add_n(r1, "t3", { 1 }))
      assert(add_n(r1, "t3", { 2 }))
      assert.equal(trips(1), r1.stats.one_trips)
      assert(store:query(("ALTER TABLE %q.rm_counters ADD COLUMN extra text"):format(schema)))
      local v2 = es.read_model {
        name = "rm_counters", key = "id", keys_by_stream = true, one_trip = true,
        columns = { id = "text", total = "bigint", count = "integer", version = "bigint", extra = "text" },
        on = { Added = function(r, e)
          r.total = (r.total or 0) + e.data.n
          r.count = (r.count or 0) + 1
          r.version = e.version
          r.extra = "v2"
        end },
      }
      local r2 = es.repository(store, { read_models = { v2 }, cache = cache })
      assert(add_n(r2, "t3", { 4 }))
      assert.equal(trips(0), r2.stats.one_trips, "the row v1 kept was not used")
      assert(add_n(r2, "t3", { 8 }))
      assert.equal(trips(1), r2.stats.one_trips, "its own is")
      assert.same({ total = 15, count = 4, version = 4 }, row(v1, "t3"))
    end)

    it("counts one round trip only where it was one: several events go in two", function()
      local rm = counters("rm_counters", nil, true)
      assert(rm:migrate(store))
      local repo = es.repository(store, { read_models = { rm }, cache = es.state_cache() })
      assert(add_n(repo, "t4", { 1 }))
      assert(add_n(repo, "t4", { 2, 3 }))
      assert.equal(trips(0), repo.stats.one_trips)
      assert(add_n(repo, "t4", { 4 }))
      assert.equal(trips(1), repo.stats.one_trips)
      assert.same({ total = 10, count = 4, version = 4 }, row(rm, "t4"))
    end)
  end)

  it("inside the caller's transaction: writes the rows in it and leaves it open", function()
    local rm = counters("rm_counters", nil, true)
    assert(rm:migrate(store))
    local repo = es.repository(store, { read_models = { rm }, cache = es.state_cache() })
    assert(repo:execute(Counter, "c7", "Add", { n = 1 }))
    assert(store:begin())
    assert(repo:execute(Counter, "c7", "Add", { n = 2 }))
    assert.is_true(store:in_transaction())
    assert(store:rollback())
    assert.same({ total = 1, count = 1, version = 1 }, row(rm, "c7"))
    assert.equal(1, store:version("Counter-c7"))
    assert(store:begin())
    assert(repo:execute(Counter, "c7", "Add", { n = 5 }))
    assert(store:commit())
    assert.same({ total = 6, count = 2, version = 2 }, row(rm, "c7"))
    assert.equal(trips(0), repo.stats.one_trips)
    -- a handler that fails after the append leaves nothing of the command
    -- there, and the transaction goes on
    local picky = es.read_model {
      name = "rm_picky", key = "id", columns = { id = "text", total = "bigint" },
      on = { Added = function(r, e)
        if e.data.n > 1000 then error("too much") end
        r.total = (r.total or 0) + e.data.n
      end },
    }
    assert(picky:migrate(store))
    local careful = es.repository(store, { read_models = { picky } })
    assert(store:begin())
    assert(careful:execute(Counter, "c8", "Add", { n = 1 }))
    local failed, ferr = careful:execute(Counter, "c8", "Add", { n = 5000 })
    assert.is_nil(failed)
    assert.equal("invalid", ferr.kind)
    assert.matches("too much", ferr.message)
    assert.is_true(store:in_transaction())
    assert(careful:execute(Counter, "c8", "Add", { n = 2 }))
    assert(store:commit())
    assert.equal(2, store:version("Counter-c8"))
    assert.equal(3, assert(store:query(("SELECT total FROM %q.rm_picky WHERE id = 'c8'")
      :format(schema)))[1].total)
    -- a conflict there (the stream moved on since) is answered, and the
    -- transaction stays the caller's
    assert(store:begin())
    assert(store:query("SELECT 1 AS one"))
    local ok, err = repo:execute(Counter, "c7", "Add", { n = 7, hook = function()
      assert(other:append("Counter-c7", { { type = "Added", data = { n = 100 } } }))
    end }, { expected_version = 2 })
    assert.is_nil(ok)
    assert.equal("conflict", err.kind)
    assert.is_true(store:in_transaction())
    assert(store:rollback())
  end)

  it("loads after the append when the keys do not follow from the stream", function()
    local rm = counters("rm_groups", function(e) return e.data.group end)
    assert(rm:migrate(store))
    local repo = es.repository(store, { read_models = { rm } })
    assert(repo:execute(Counter, "a", "Add", { n = 2, group = "g" }))
    assert(repo:execute(Counter, "b", "Add", { n = 3, group = "g" }))
    assert.same({ total = 5, count = 2, version = 1 }, row(rm, "g"))
  end)

  it("reports the load's own error and stores nothing when the load fails", function()
    local rm = counters("rm_counters")
    assert(rm:migrate(store))
    local repo = es.repository(store, { read_models = { rm } })
    assert(repo:execute(Counter, "c3", "Add", { n = 1 }))
    assert(other:query(("DROP TABLE %q.rm_counters"):format(schema)))
    local ok, err = repo:execute(Counter, "c3", "Add", { n = 1 })
    assert.is_nil(ok)
    assert.equal("42P01", err.sqlstate)        -- undefined table: the load's
    assert.matches("rm_counters", err.message)
    assert.equal(1, select(2, assert(repo:load(Counter, "c3"))))
    assert.is_false(assert(store:status()).in_transaction)
  end)
end)
