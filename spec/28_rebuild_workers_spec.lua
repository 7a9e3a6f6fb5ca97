-- Rebuilds spread over worker processes by stream-hash partition, and the
-- read_all options they stand on (partitions, partition, upto): the
-- partitions of a read cover each event once and never split a stream;
-- a 2- or 3-worker rebuild gives exactly the table a 1-worker one gives;
-- a worker that fails or dies fails the rebuild cleanly (no shadow table,
-- no marker, the live table as it was). A store a forked child inherited
-- and its collector finalizes says nothing on the parent's session.
local helpers = require "helpers"
local es = require "eventsourcing"

local function model(name, opts)
  opts = opts or {}
  return es.read_model { name = name, key = "id", keys_by_stream = opts.by_stream ~= false,
    columns = { id = "text", n = "bigint", sum = "bigint", last = "bigint", kind = "text" },
    indexes = { "n" },
    key_of = function(e) return e.stream end,
    on = {
      Added = function(row, e)
        if opts.on_added then opts.on_added(e) end
        row.n = (row.n or 0) + 1
        row.sum = (row.sum or 0) + e.data.by
        row.last = e.version
        row.kind = e.data.kind
      end,
      Removed = function() return es.read_model.DELETE end,
    } }
end

local function rows_of(store, schema, name)
  local out = {}
  for _, r in ipairs(assert(store:query(('SELECT id, n, sum, last, kind FROM "%s".%s'):format(schema, name)))) do
    out[r.id] = r
  end
  return out
end

local function leftovers(store, schema)
  local t = assert(store:query("SELECT count(*) AS n FROM pg_tables WHERE schemaname = $1 "
    .. "AND tablename LIKE '%!_!_rebuild!_%' ESCAPE '!'", schema))
  local m = assert(store:query(('SELECT count(*) AS n FROM "%s".read_model_rebuilds'):format(schema)))
  return t[1].n, m[1].n
end

describe("read_all partitions and upper bound (PostgreSQL)", function()
  local store
  before_each(function()
    store = helpers.open({ name = "postgresql", url = helpers.database_url() })
    for i = 1, 40 do
      assert(store:append("S-" .. i, { { type = "Added", data = { by = i } }, { type = "Other", data = {} } }))
    end
  end)
  after_each(function() store:close() end)

  it("covers every event once over the partitions, a stream in one of them", function()
    local all = assert(store:read_all({ limit = 1000 }))
    local part_of, n = {}, 0
    for k = 0, 2 do
      local b = assert(store:read_all({ limit = 1000, partitions = 3, partition = k }))
      for _, e in ipairs(b) do
        assert.equal(k, e.part)
        assert.is_true(part_of[e.stream] == nil or part_of[e.stream] == k)
        part_of[e.stream] = k
        n = n + 1
      end
    end
    assert.equal(#all, n)
    local two = assert(store:read_all({ limit = 1000, partitions = 3, partition = { 0, 2 } }))
    local one = assert(store:read_all({ limit = 1000, partitions = 3, partition = 1 }))
    assert.equal(#all, #two + #one)
  end)

  it("stops at upto, and a short filtered batch's checkpoint never passes it", function()
    local all = assert(store:read_all({ limit = 1000 }))
    local w = all[50].checkpoint
    local b, cp = assert(store:read_all({ limit = 1000, upto = w, types = { "Added" } }))
    assert.equal(25, #b)
    assert.equal(w, cp)
    local seen = 0
    for k = 0, 1 do
      local after
      repeat
        local batch, c = assert(store:read_all({ limit = 7, after = after, partitions = 2, partition = k,
          upto = w }))
        seen, after = seen + #batch, c
      until #batch < 7
      assert.equal(w, after)
    end
    assert.equal(50, seen)
  end)

  it("refuses bad partitions and bounds with a clear error", function()
    local b, err = store:read_all({ partitions = 2, partition = 2 })
    assert.is_nil(b)
    assert.matches("partition 2 is not one of 0..1", tostring(err))
    b, err = store:read_all({ partitions = 5000, partition = 0 })
    assert.is_nil(b)
    assert.matches("partitions must be 1..4096", tostring(err))
    b, err = store:read_all({ upto = "nope" })
    assert.is_nil(b)
    assert.matches("not one this store made", tostring(err))
    assert.has_error(function() store:read_all({ partition = 1 }) end,
      "option 'partition' needs option 'partitions' (a count)")
    assert.has_error(function() store:read_all({ partitions = 2, partition = "x" }) end)
    local mem = assert(es.open("memory:"))
    b, err = mem:read_all({ partitions = 2, partition = 0 })
    assert.is_nil(b)
    assert.matches("need a PostgreSQL store", tostring(err))
  end)
end)

describe("rebuild with workers (processes, PostgreSQL)", function()
  local store, schema
  before_each(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    for i = 1, 300 do
      local s = "c-" .. (i % 37)
      assert(store:append(s, { { type = "Added", data = { by = i, kind = (i % 3 == 0) and "x" or "y" } } }))
      if i % 50 == 0 then assert(store:append("c-" .. (i % 11), { { type = "Removed", data = {} } })) end
    end
  end)
  after_each(function() store:close() end)

  it("gives exactly the table a 1-worker rebuild gives, with 2 and 3 workers", function()
    local p = es.projector(store, { model("rm_w") })
    assert(p:migrate())
    local total = 300 + 6
    assert.equal(total, assert(p:rebuild("rm_w", { batch_size = 20 })))
    local one = rows_of(store, schema, "rm_w")
    for _, w in ipairs { 2, 3 } do
      local seen = {}
      assert.equal(total, assert(p:rebuild("rm_w", { batch_size = 20, workers = w,
        progress = function(done) seen[#seen + 1] = done end })))
      assert.equal(total, seen[#seen])
      assert.same(one, rows_of(store, schema, "rm_w"))
      assert.same({ 0, 0 }, { leftovers(store, schema) })
    end
    -- events after the rebuild: its checkpoint stands at the end
    assert(store:append("c-1", { { type = "Added", data = { by = 1000, kind = "z" } } }))
    assert.equal(1, (assert(p:catch_up())))
    assert.equal("z", rows_of(store, schema, "rm_w")["c-1"].kind)
  end)

  it("fails cleanly when a worker's handler fails, or a worker dies", function()
    local p = es.projector(store, { model("rm_w") })
    assert(p:migrate())
    assert(p:rebuild("rm_w"))
    local before = rows_of(store, schema, "rm_w")
    local part1 = assert(store:read_all({ limit = 1, partitions = 2, partition = 1 }))[1].stream
    for _, how in ipairs { "raise", "die", "parent" } do
      local bad = es.projector(store, { model("rm_w", { on_added = function(e)
        if how == "parent" and e.stream ~= part1 then error("parent broke") end
        if e.stream ~= part1 then return end
        if how == "raise" then error("worker broke") end
        if how == "die" then os.exit(9, false) end
      end }) })
      local n, err
      local ok, raised = pcall(function() n, err = bad:rebuild("rm_w", { workers = 2 }) end)
      if how == "parent" then
        assert.is_nil(n)
        assert.matches("parent broke", tostring(err))
      else
        assert.is_true(ok, tostring(raised))
        assert.is_nil(n)
        assert.matches("worker 1 of 2", tostring(err))
        assert.matches(how == "raise" and "worker broke" or "status 9", tostring(err))
      end
      assert.same({ 0, 0 }, { leftovers(store, schema) })
      assert.same(before, rows_of(store, schema, "rm_w"))
      assert.is_false(store:status().in_transaction)
    end
  end)

  it("stops its workers and cleans up when the parent's progress callback raises", function()
    local p = es.projector(store, { model("rm_w") })
    assert(p:migrate())
    assert(p:rebuild("rm_w"))
    local before = rows_of(store, schema, "rm_w")
    assert.has_error(function()
      p:rebuild("rm_w", { batch_size = 10, workers = 2, progress = function(done, _, _, _, final)
        if not final and done >= 20 then error("progress broke") end
      end })
    end, "progress broke")
    assert.same({ 0, 0 }, { leftovers(store, schema) })
    assert.same(before, rows_of(store, schema, "rm_w"))
    assert.is_false(store:status().in_transaction)
    assert.equal(306, assert(p:rebuild("rm_w", { workers = 2 })))
    assert.same(before, rows_of(store, schema, "rm_w"))
  end)

  it("refuses workers it cannot use", function()
    local p = es.projector(store, { model("rm_w", { by_stream = false }) })
    assert.has_error(function() p:rebuild("rm_w", { workers = 2 }) end,
      "projector:rebuild: rm_w cannot be rebuilt by 2 workers: its rows must each follow one stream "
      .. "(the default key_of with a category, or keys_by_stream = true)")
    local q = es.projector(store, { model("rm_w") })
    for _, w in ipairs { 0, 1.5, "2", 65 } do
      assert.has_error(function() q:rebuild("rm_w", { workers = w }) end,
        "projector:rebuild: workers must be an integer from 1 to 64")
    end
    local raw = assert(require("eventsourcing.core").open(helpers.database_url(), { schema = schema }))
    local r = es.projector(raw, { model("rm_w") })
    local n, err = r:rebuild("rm_w", { workers = 2 })
    assert.is_nil(n)
    assert.matches("needs a store opened with es.open", tostring(err))
    raw:close()
  end)
end)

describe("a store a forked child inherited", function()
  local core = require "eventsourcing.core"

  -- Forks; the child drops held.store, collects it (exit 3 if it stayed
  -- reachable: then nothing was tried) and leaves. -> the child's exit code
  local function child_collects(held)
    local seen = setmetatable({ [held.store] = true }, { __mode = "k" })
    local pid = assert(core.fork())
    if pid == 0 then
      held.store = nil
      collectgarbage()
      collectgarbage()
      core.exit(next(seen) == nil and 0 or 3)
    end
    local how, code = core.wait(pid)
    assert.equal("exited", how)
    return code
  end

  -- (each step in a function of its own: no register of the test's
  -- function keeps the store reachable in the child)
  local function open_store(held)
    held.schema = helpers.fresh_schema()
    held.store = assert(es.open(helpers.database_url(), { schema = held.schema }))
    assert(held.store:migrate())
    return assert(held.store:query("SELECT pg_backend_pid() AS p"))[1].p
  end

  it("is let go of by the child's collector, not a word on the parent's session, a copy under way included", function()
    local held = {}
    local session = open_store(held)
    ;(function()
      assert(held.store:query(('CREATE TABLE "%s".t (id text PRIMARY KEY, n bigint, x text)'):format(held.schema)))
      local rows = {}
      for i = 1, 200000 do rows[i] = { id = ("r%06d"):format(i), n = i, x = ("padding "):rep(4) } end
      assert.is_true(held.store:copy_rows("t", { "id", "n", "x" }, rows, { wait = false }))
    end)()
    assert.equal(0, child_collects(held))
    assert.equal(200000, assert(held.store:copy_wait()))
    -- the same session goes on (a Terminate from the child would have ended it)
    assert.equal(session, assert(held.store:query("SELECT pg_backend_pid() AS p"))[1].p)
    assert.is_true(held.store:close())
  end)

  it("keeps the parent's prefetched read_all batch", function()
    local held = {}
    local session = open_store(held)
    local cp = (function()
      for b = 0, 2 do
        local evs = {}
        for i = 1, 1000 do evs[i] = { type = "E", data = { i = b * 1000 + i } } end
        assert(held.store:append("S-" .. b, evs))
      end
      local batch, after = held.store:read_all({ limit = 1000, prefetch = true })
      assert.equal(1000, #batch)            -- the next batch is on its way
      return after
    end)()
    assert.equal(0, child_collects(held))
    local batch = assert(held.store:read_all({ after = cp, limit = 1000, prefetch = true }))
    assert.equal(1000, #batch)
    assert.equal(1001, batch[1].data.i)
    assert.equal(session, assert(held.store:query("SELECT pg_backend_pid() AS p"))[1].p)
    assert.is_true(held.store:close())
  end)
end)
