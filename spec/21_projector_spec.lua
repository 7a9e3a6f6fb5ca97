-- The projector: catch-up, checkpoints, failures, status, run, rebuild, custom projections.
local helpers = require "helpers"
local es = require "eventsourcing"


local function counter(name, on_extra)
  local on = {
    Inc = function(row) row.n = (row.n or 0) + 1 end,
  }
  for k, f in pairs(on_extra or {}) do on[k] = f end
  return es.read_model { name = name or "rm_count", columns = { id = "text", n = "bigint" },
    indexes = { "n" }, on = on }
end

local function append_n(store, stream, n, typ)
  local evs = {}
  for i = 1, n do evs[i] = { type = typ or "Inc" } end
  return assert(store:append(stream, evs))
end

for _, entry in ipairs(helpers.stores()) do
  describe("the projector on the " .. entry.name .. " store", function()
    local store
    before_each(function() store = helpers.open(entry) end)
    after_each(function() store:close() end)

    it("catches up in batches, returns how many events it handled, and resumes from its checkpoint", function()
      local rm = counter()
      local p = es.projector(store, { rm }, { batch_size = 3 })
      append_n(store, "C-a", 7)
      append_n(store, "C-b", 3)
      assert.equal(10, p:catch_up())
      assert.equal(0, p:catch_up())
      append_n(store, "C-a", 2)
      local n, per = p:catch_up()
      assert.equal(2, n)
      assert.equal(2, per.rm_count)
      assert.equal(9, rm:get(store, "a").n)
      -- a second projector over the same store continues from the stored checkpoint
      local p2 = es.projector(store, { counter() })
      assert.equal(0, p2:catch_up())
    end)

    it("keeps a checkpoint per projection", function()
      local a, b = counter("rm_a"), counter("rm_b")
      append_n(store, "C-x", 4)
      assert.equal(4, es.projector(store, { a }):catch_up())
      append_n(store, "C-x", 1)
      local n, per = es.projector(store, { a, b }):catch_up()
      assert.equal(6, n)
      assert.same({ rm_a = 1, rm_b = 5 }, per)
      assert.equal(5, a:get(store, "x").n)
      assert.equal(5, b:get(store, "x").n)
    end)

    it("stops only the failing projection, before the failing event, and reports it", function()
      local broken = true
      local bad = counter("rm_bad", { Boom = function() if broken then error("handler exploded") end end })
      local good = counter("rm_good")
      local p = es.projector(store, { bad, good }, { batch_size = 10 })
      -- "before" in the order of one shard on Citus
      local _, cb = helpers.on_one_shard(store, "C-a", "C-b")
      append_n(store, "C-a", 3)
      local boom = assert(store:append(cb, { type = "Boom" }))
      append_n(store, "C-a", 2)
      local n, per = p:catch_up()
      -- rm_good has no Boom handler: that event is skipped in SQL, not counted
      assert.equal(3 + 5, n)
      assert.same({ rm_bad = 3, rm_good = 5 }, per)
      assert.equal(3, bad:get(store, "a").n)       -- events before the failing one applied
      assert.equal(5, good:get(store, "a").n)
      local st = {}
      for _, s in ipairs(p:status()) do st[s.name] = s end
      assert.equal("failed", st.rm_bad.status)
      assert.equal(boom.position, st.rm_bad.error.position)
      assert.equal("Boom", st.rm_bad.error.type)
      assert.equal(cb, st.rm_bad.error.stream)
      assert.matches("handler exploded", st.rm_bad.error.message)
      assert.equal(3, st.rm_bad.lag_events)
      assert.equal(boom.position - 1, st.rm_bad.position)
      assert.equal("running", st.rm_good.status)
      assert.equal(0, st.rm_good.lag_events)
      assert.equal(0, p:catch_up())                 -- still stopped
      broken = false
      assert(p:retry("rm_bad"))
      assert.equal(3, p:catch_up())
      assert.equal(5, bad:get(store, "a").n)
      assert.is_nil(p:status()[1].error)
    end)

    it("reports lag in events and seconds", function()
      local p = es.projector(store, { counter() })
      append_n(store, "C-a", 5)
      local s = p:status()[1]
      assert.equal("rm_count", s.name)
      assert.equal(5, s.lag_events)
      assert.is_true(s.lag_seconds >= 0)
      p:catch_up()
      s = p:status()[1]
      assert.equal(0, s.lag_events)
      assert.equal(0, s.lag_seconds)
      assert.is_string(s.checkpoint)
      assert.equal(5, s.handled)
    end)

    it("follows live with run() and stops when asked", function()
      local rm = counter()
      local p = es.projector(store, { rm })
      local rounds = 0
      assert(p:run { poll = 0.05, idle = function()
        rounds = rounds + 1
        if rounds == 1 then append_n(store, "C-live", 3) end
      end, stop = function()
        local row = rm:get(store, "live")
        return (row and row.n == 3) or rounds > 200
      end })
      assert.equal(3, rm:get(store, "live").n)
      -- projector:stop() from a handler
      local stopper
      local rm2 = counter("rm_stop", { Stop = function() stopper:stop() end })
      stopper = es.projector(store, { rm2 })
      assert(store:append("C-s", { type = "Stop" }))
      assert(stopper:run { poll = 0.05 })
    end)

    it("rebuilds into a fresh table while the old one keeps answering, then swaps", function()
      local version = 1
      local rm = counter("rm_rb", { Inc = function(row) row.n = (row.n or 0) + version end })
      local p = es.projector(store, { rm }, { batch_size = 4 })
      for i = 1, 5 do append_n(store, "C-" .. i, i) end
      append_n(store, "C-0", 1, "Other")
      p:catch_up()
      assert.equal(5, rm:get(store, "5").n)
      version = 10
      local calls, seen_old, mid_way = 0, true, false
      local replayed = assert(p:rebuild("rm_rb", { batch_size = 4, bar = false,
        progress = function(done, total, rate, eta)
          calls = calls + 1
          assert.is_true(done <= total)
          assert.is_number(rate)
          assert.is_number(eta)
          if done < total then
            mid_way = true
            if rm:get(store, "5").n ~= 5 then seen_old = false end
          end
        end }))
      assert.equal(15, replayed)             -- the Other event is not read
      assert.is_true(calls >= 4)
      assert.is_true(mid_way, "no progress was reported before the end")
      assert.is_true(seen_old)
      assert.equal(50, rm:get(store, "5").n)
      assert.equal(0, p:catch_up())          -- checkpoint moved with the swap
      append_n(store, "C-1", 1)
      assert.equal(1, p:catch_up())
      assert.equal(20, rm:get(store, "1").n)
      assert(p:rebuild("rm_rb", { bar = false }))     -- twice: names stay canonical
      assert.equal(20, rm:get(store, "1").n)
      if entry.name == "postgresql" then
        local idx = store:query([[SELECT indexname FROM pg_indexes WHERE schemaname = $1
          AND tablename LIKE 'rm_rb%' ORDER BY indexname]], store:schema())
        local names = {}
        for _, r in ipairs(idx) do names[#names + 1] = r.indexname end
        assert.same({ "rm_rb_n_idx", "rm_rb_pkey" }, names)
        assert.equal(1, #store:query([[SELECT 1 FROM pg_tables WHERE schemaname = $1
          AND tablename LIKE 'rm_rb%']], store:schema()))
      end
    end)

    it("gives rebuild handlers each event's id and metadata, as a catch-up does", function()
      -- the rebuild reads with lazy = true: both are made when a handler asks
      local rm = es.read_model { name = "rm_meta", columns = { id = "text", ev = "text", who = "text",
        n = "bigint" }, on = {
          Inc = function(row, e)
            row.ev, row.who = e.id, e.metadata.who
            row.n = (row.n or 0) + 1
          end,
        } }
      local p = es.projector(store, { rm }, { batch_size = 2 })
      for i = 1, 5 do
        assert(store:append("C-" .. i, { { type = "Inc", metadata = { who = "u" .. i } } }))
      end
      local ids = {}
      for _, e in ipairs(assert(store:read_all({ limit = 10 }))) do ids[tonumber(e.stream:sub(3))] = e.id end
      assert.equal(5, p:catch_up())
      local caught = {}
      for i = 1, 5 do caught[i] = rm:get(store, tostring(i)) end
      assert.equal(5, p:rebuild("rm_meta", { batch_size = 2, bar = false }))
      for i = 1, 5 do
        local row = rm:get(store, tostring(i))
        assert.equal(ids[i], row.ev)
        assert.equal(caught[i].ev, row.ev)
        assert.equal("u" .. i, caught[i].who)   -- a catch-up reads lazily too
        assert.equal("u" .. i, row.who)
        assert.equal(1, row.n)
      end
    end)

    it("leaves the live table alone when a rebuild fails", function()
      local fail_now = false
      local rm = counter("rm_rf", { Inc = function(row)
        if fail_now then error("nope") end
        row.n = (row.n or 0) + 1
      end })
      local p = es.projector(store, { rm })
      append_n(store, "C-a", 3)
      p:catch_up()
      fail_now = true
      local ok, err = p:rebuild("rm_rf", { bar = false })
      assert.is_nil(ok)
      assert.matches("nope", err.message)
      assert.equal(3, rm:get(store, "a").n)
    end)
  end)
end

describe("the projector on PostgreSQL", function()
  local store, schema
  before_each(function() store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() }) end)
  after_each(function() store:close() end)

  it("runs custom projections with tx:execute in the batch transaction", function()
    local totals = es.projection {
      name = "totals",
      migrate = function(tx)
        tx:execute(('CREATE TABLE IF NOT EXISTS "%s".totals (stream text PRIMARY KEY, n int NOT NULL)')
          :format(tx.schema))
      end,
      reset = function(tx) tx:execute(('TRUNCATE "%s".totals'):format(tx.schema)) end,
      on = { Inc = function(e, tx)
        tx:execute(('INSERT INTO "%s".totals VALUES ($1, 1) ON CONFLICT (stream) DO UPDATE SET n = totals.n + 1')
          :format(tx.schema), e.stream)
      end,
      Bad = function(_, tx) tx:execute("SELECT * FROM no_such_table") end },
    }
    local p = es.projector(store, { totals }, { batch_size = 2 })
    append_n(store, "C-a", 5)
    assert.equal(5, p:catch_up())
    local function n_of(stream)
      local r = store:query(('SELECT n FROM "%s".totals WHERE stream = $1'):format(schema), stream)
      return r[1] and r[1].n
    end
    assert.equal(5, n_of("C-a"))
    assert.equal(5, p:rebuild("totals", { bar = false }))
    assert.equal(5, n_of("C-a"))
    -- a failing SQL statement stops the projection at that event; earlier ones in the batch stay applied
    append_n(store, "C-a", 1)
    local bad = assert(store:append("C-b", { type = "Bad" }))
    append_n(store, "C-a", 1)
    assert.equal(1, p:catch_up())
    assert.equal(6, n_of("C-a"))
    local s = p:status()[1]
    assert.equal(bad.position, s.error.position)
    assert.matches("no_such_table", s.error.message)
  end)

  it("finds the event whose row the database refuses", function()
    local rm = counter("rm_refuse", { Weird = function(row) row.n = "not a number" end })
    local p = es.projector(store, { rm }, { batch_size = 100 })
    append_n(store, "C-a", 3)
    local weird = assert(store:append("C-a", { type = "Weird" }))
    append_n(store, "C-a", 3)
    assert.equal(3, p:catch_up())
    local s = p:status()[1]
    assert.equal(weird.position, s.error.position)
    assert.equal("Weird", s.error.type)
    assert.equal(3, rm:get(store, "a").n)
  end)

  it("skips a projection whose checkpoint row another session has locked (the lease)", function()
    local rm = counter()
    local p = es.projector(store, { rm })
    assert(p:migrate())
    append_n(store, "C-a", 2)
    local other = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(other:begin())
    assert.equal(1, #other:query(('SELECT 1 FROM "%s".projections WHERE name = $1 FOR UPDATE')
      :format(schema), "rm_count"))
    assert.equal(0, p:catch_up())
    assert.is_nil(rm:get(store, "a"))
    assert(other:rollback())
    assert.equal(2, p:catch_up())
    other:close()
  end)

  it("wakes up on an append from another session without NOTIFY, long before its poll", function()
    local rm = counter()
    local p = es.projector(store, { rm })
    local writer = assert(es.open(helpers.database_url(), { schema = schema }))
    local rounds, t_append = 0, nil
    assert(p:run { poll = 30, idle = function()
      rounds = rounds + 1
      if rounds == 1 then append_n(writer, "C-n", 2); t_append = es.workflow.now() end
    end, stop = function() return rounds >= 2 end })
    assert.equal(2, rm:get(store, "n").n)
    -- woken by the head poll (every 5 ms), not by the 30 s poll
    assert.is_true(es.workflow.now() - t_append < 1, "the projector waited for its poll")
    -- nothing LISTENs: the store's session never subscribed
    local l = assert(store:query("SELECT count(*) AS n FROM pg_listening_channels()"))
    assert.equal(0, l[1].n)
    writer:close()
  end)

  it("copies a batch's fresh rows, and takes the upsert when a row appears before the copy", function()
    local side = assert(es.open(helpers.database_url(), { schema = schema }))
    local racing = false
    -- the handler commits a row for its key on another session: the
    -- batch's load did not find it, its COPY of fresh rows will
    local rm = counter("rm_race", { Race = function(row)
      row.n = (row.n or 0) + 1
      if racing then
        assert(side:query(('INSERT INTO "%s".rm_race (id, n) VALUES ($1, 1000) ON CONFLICT DO NOTHING')
          :format(schema), row.id))
      end
    end })
    local p = es.projector(store, { rm }, { batch_size = 1000 })
    assert(p:migrate())
    -- 300 fresh keys in one batch: more than the staging threshold
    for i = 1, 300 do append_n(store, "C-f" .. i, 2) end
    assert.equal(600, p:catch_up())
    assert.equal(2, rm:get(store, "f1").n)
    assert.equal(2, rm:get(store, "f300").n)
    racing = true
    for i = 1, 300 do assert(store:append("C-r" .. i, { { type = "Race" } })) end
    assert.equal(300, p:catch_up())
    local s = p:status()[1]
    assert.is_nil(s.error, "the projection stopped on a row that appeared before its copy")
    -- the copy was refused on the key, and the batch applied again event
    -- by event: each event once, on top of the row that had appeared
    for _, k in ipairs({ "r1", "r150", "r300" }) do
      assert.equal(1001, rm:get(store, k).n, "row " .. k)
    end
    local c = store:query(('SELECT count(*) AS n, sum(n)::bigint AS t FROM "%s".rm_race'):format(schema))[1]
    assert.same({ 600, 600 + 300 * 1001 }, { c.n, c.t })
    assert.equal(0, p:catch_up())
    side:close()
  end)

  it("commits a batch's rows only together with its checkpoint", function()
    local rm = counter()
    local p = es.projector(store, { rm })
    assert(p:migrate())
    append_n(store, "C-a", 2)
    -- the checkpoint cannot be written: the batch must leave no row behind
    assert(store:query(('CREATE FUNCTION "%s".no_cp() RETURNS trigger LANGUAGE plpgsql '
      .. [[AS $$BEGIN RAISE EXCEPTION 'no checkpoint'; END$$]]):format(schema)))
    assert(store:query(('CREATE TRIGGER no_cp BEFORE UPDATE ON "%s".projections '
      .. 'FOR EACH ROW EXECUTE FUNCTION "%s".no_cp()'):format(schema, schema)))
    assert.is_nil((p:catch_up()))
    assert(store:query(('DROP TRIGGER no_cp ON "%s".projections'):format(schema)))
    assert.is_nil(rm:get(store, "a"), "rows committed without their checkpoint")
    assert.equal(2, p:catch_up())
    assert.equal(2, rm:get(store, "a").n)
  end)
end)
