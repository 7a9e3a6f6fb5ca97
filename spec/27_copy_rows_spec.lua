-- store:copy_rows (COPY FROM STDIN into a table of the store's schema):
-- values of every kind round-trip, bad input is refused with its row and
-- column named and copies nothing, and a rebuild that loads its new rows
-- this way (keys spanning batches, deletes, replaced rows) gives the same
-- table as the projector's catch-up. read_all({ checkpoints = false }) gives
-- the same events without a checkpoint string on each.
local helpers = require "helpers"
local es = require "eventsourcing"

local function open()
  local schema = helpers.fresh_schema()
  local store = assert(es.open(helpers.database_url(), { schema = schema }))
  assert(store:migrate())
  assert(store:query(('CREATE TABLE "%s".t (id text PRIMARY KEY, n bigint, f double precision, '
    .. 'b boolean, j jsonb, ts timestamptz, x text)'):format(schema)))
  return store, schema
end

local COLS = { "id", "n", "f", "b", "j", "ts", "x" }

local function all_rows(store, schema)
  return assert(store:query(('SELECT id, n, f, b, j::text AS j, ts::text AS ts, x FROM "%s".t ORDER BY id')
    :format(schema)))
end

describe("store:copy_rows", function()
  local store, schema
  before_each(function() store, schema = open() end)

  -- a transaction with one row copied, then a duplicate of "dup" sent
  -- without waiting (the caller has copied "dup" already)
  local function copy_dup_in_tx()
    assert(store:begin())
    assert(store:copy_rows("t", { "id" }, { { id = "in-tx" } }))
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "dup" } }, { wait = false }))
  end
  after_each(function()
    store:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
    store:close()
  end)

  it("copies values of every kind, escapes included", function()
    local n = assert(store:copy_rows("t", COLS, {
      { id = "a\tb\\c\nd\re", n = 5, f = 1.5, b = true, j = { k = "v\\\n", list = es.json.array { 1, 2 } },
        ts = "2026-01-15T10:00:00.123456Z", x = "\\N" },
      { id = "z", n = es.json.null, b = false, x = "" },
    }))
    assert.equal(2, n)
    local rows = all_rows(store, schema)
    assert.equal("a\tb\\c\nd\re", rows[1].id)
    assert.equal(5, rows[1].n)
    assert.equal(1.5, rows[1].f)
    assert.is_true(rows[1].b)
    assert.same({ k = "v\\\n", list = { 1, 2 } }, es.json.decode(rows[1].j))
    assert.equal("2026-01-15 10:00:00.123456+00", rows[1].ts)
    assert.equal("\\N", rows[1].x)       -- a string, not NULL
    assert.equal("z", rows[2].id)
    assert.is_nil(rows[2].n)
    assert.is_false(rows[2].b)
    assert.equal("", rows[2].x)          -- empty, not NULL
    assert.equal(0, assert(store:copy_rows("t", { "id" }, {})))
  end)

  it("stores what the JSON write path stores: strings in json columns stay strings, booleans in text", function()
    local rows = {
      { id = "s", j = "123", x = true },
      { id = "t", j = "hello\tworld", x = false },
      { id = "u", j = true, x = 2.5 },
      { id = "v", j = { a = 1 } },
    }
    -- the JSON path (json_populate_recordset, as the read models' upserts)
    assert(store:query(('INSERT INTO "%s".t SELECT * FROM json_populate_recordset(NULL::"%s".t, $1::json)')
      :format(schema, schema), es.json.encode(es.json.array(rows))))
    local want = all_rows(store, schema)
    assert(store:query(('TRUNCATE "%s".t'):format(schema)))
    assert.equal(4, assert(store:copy_rows("t", COLS, rows, { json = { "j" } })))
    assert.same(want, all_rows(store, schema))
    assert.equal('"123"', want[1].j)
    assert.equal("true", want[1].x)
    -- a bad json option is refused
    assert.has_error(function() store:copy_rows("t", COLS, rows, { json = "j" }) end)
  end)

  it("integers: an integral float in such a column goes as an integer, other values as without it", function()
    local rows = {
      { id = "a", n = 2500.0, f = 2500.0 },         -- f is not named: stays a float
      { id = "b", n = -3.0, j = 4.0 },
      { id = "c", n = 9007199254740992.0 },
      { id = "d", n = 7, f = 0.5 },
      { id = "e", n = es.json.null },
    }
    assert.equal(5, assert(store:copy_rows("t", COLS, rows, { json = { "j" }, integers = { "n", "j" } })))
    local got = assert(store:query(('SELECT id, n::text AS n, f::text AS f, j::text AS j FROM "%s".t ORDER BY id')
      :format(schema)))
    assert.same({ id = "a", n = "2500", f = "2500" }, got[1])
    assert.same({ id = "b", n = "-3", j = "4" }, got[2])
    assert.equal("9007199254740992", got[3].n)
    assert.same({ id = "d", n = "7", f = "0.5" }, got[4])
    assert.same({ id = "e" }, got[5])
    -- a fraction, or a float past int64, is still refused by the server,
    -- with the column named, and nothing is copied
    for _, bad in ipairs({ 2.5, 1e19, -1e300 }) do
      local ok, err = store:copy_rows("t", COLS, { { id = "z1" }, { id = "z2", n = bad } }, { integers = { "n" } })
      assert.is_nil(ok)
      assert.matches("bigint", err.message)
    end
    assert.equal(5, #assert(store:query(('SELECT 1 FROM "%s".t'):format(schema))))
    -- a bad integers option is refused
    local ok, err = pcall(store.copy_rows, store, "t", COLS, rows, { integers = "n" })
    assert.is_false(ok)
    assert.matches("integers must be an array of column names", tostring(err))
    ok, err = pcall(store.copy_rows, store, "t", COLS, rows, { integers = { 1 } })
    assert.is_false(ok)
    assert.matches("integers must be an array of column names", tostring(err))
  end)

  it("takes json columns past the 64th (whose flag is looked up per row)", function()
    local defs, cols, row = {}, {}, {}
    for c = 1, 70 do
      cols[c] = "c" .. c
      defs[c] = ("c%d %s"):format(c, (c == 3 or c == 66) and "jsonb" or "text")
      row["c" .. c] = "v" .. c
    end
    assert(store:query(('CREATE TABLE "%s".wide (%s)'):format(schema, table.concat(defs, ", "))))
    assert.equal(1, assert(store:copy_rows("wide", cols, { row }, { json = { "c3", "c66" } })))
    local got = assert(store:query(('SELECT c3::text AS a, c66::text AS b, c65, c70 FROM "%s".wide'):format(schema)))[1]
    assert.same({ a = '"v3"', b = '"v66"', c65 = "v65", c70 = "v70" }, got)
  end)

  it("refuses bad input with a clear error and copies nothing", function()
    assert(store:copy_rows("t", { "id" }, { { id = "kept" } }))
    local cases = {
      { { "id", "n" }, { { id = "a" }, { id = "b", n = function() end } },
        "row 2, column n: a function cannot be stored" },
      { { "id", "f" }, { { id = "a", f = 0 / 0 } }, "row 1, column f: cannot encode NaN" },
      { { "id" }, { { id = "a" }, 7 }, "row 2 is a number, not a table" },
      { { "id" }, { { id = "a\0b" } }, "row 1, column id: a string contains a NUL byte" },
      { {}, { { id = "a" } }, "no columns given" },
      { { "id", 3 }, { { id = "a" } }, "column 2 is a number, not a name" },
      { { "id", "" }, { { id = "a" } }, "column 2: a name must be non-empty" },
      -- refused by the server: the statement copies nothing
      { { "id", "n" }, { { id = "a" }, { id = "b", n = "x" } }, "invalid input syntax for type bigint" },
      { { "id" }, { { id = "new" }, { id = "kept" } }, "duplicate key value" },
      { { "id", "nope" }, { { id = "a" } }, "nope" },
    }
    for _, c in ipairs(cases) do
      local n, err = store:copy_rows("t", c[1], c[2])
      assert.is_nil(n)
      assert.truthy(tostring(err.message):find(c[3], 1, true), tostring(err.message))
    end
    local n, err = store:copy_rows("missing", { "id" }, { { id = "a" } })
    assert.is_nil(n)
    assert.truthy(err.message:find("does not exist", 1, true))
    assert.has_error(function() store:copy_rows(5, { "id" }, {}) end)
    assert.has_error(function() store:copy_rows("t", "id", {}) end)
    -- the store works on, and only the first row is there
    local rows = all_rows(store, schema)
    assert.equal(1, #rows)
    assert.equal("kept", rows[1].id)
  end)

  it("inside a transaction, a refused copy aborts it: the rollback undoes all", function()
    assert(store:begin())
    assert(store:copy_rows("t", { "id" }, { { id = "one" } }))
    assert.is_nil(store:copy_rows("t", { "id" }, { { id = "one" } }))
    assert(store:rollback())
    assert.equal(0, #all_rows(store, schema))
  end)

  it("wait = false: the rows go on being sent while the caller goes on; copy_wait reports them", function()
    local rows = {}
    for i = 1, 5000 do rows[i] = { id = ("k%05d"):format(i), n = i, j = { i = i } } end
    assert.is_true(store:copy_rows("t", { "id", "n", "j" }, rows, { wait = false }))
    assert.equal(5000, assert(store:copy_wait()))
    assert.equal(0, assert(store:copy_wait()))          -- nothing pending any more
    -- two in a row: the second waits for the first
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "x1" } }, { wait = false }))
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "x2" } }, { wait = false }))
    assert.equal(2, assert(store:copy_wait()))
    -- any other statement waits for it too
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "x3" } }, { wait = false }))
    assert.equal(5003, assert(store:query(('SELECT count(*) AS n FROM "%s".t'):format(schema)))[1].n)
    assert.equal(1, assert(store:copy_wait()))
    assert.has_error(function() store:copy_rows("t", { "id" }, {}, { wait = "no" }) end,
      "bad argument #4 to 'copy_rows' (wait must be a boolean)")
  end)

  it("wait = false: a copy the server refuses fails the next statement and copies nothing", function()
    assert(store:copy_rows("t", { "id" }, { { id = "dup" } }))
    -- refused by the server (a duplicate key), not by the text check
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "new" }, { id = "dup" } }, { wait = false }))
    local res, err = store:query("SELECT 1 AS one")
    assert.is_nil(res)
    assert.equal("database", err.kind)
    assert.matches("duplicate key", err.message)
    assert.equal(1, assert(store:query("SELECT 1 AS one"))[1].one)   -- reported once
    assert.equal(1, #all_rows(store, schema))
    -- copy_wait reports it the same way
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "dup" } }, { wait = false }))
    local n, werr = store:copy_wait()
    assert.is_nil(n)
    assert.matches("duplicate key", werr.message)
    -- inside a transaction: commit fails and nothing of it stays
    copy_dup_in_tx()
    local ok, cerr = store:commit()
    assert.is_nil(ok)
    assert.matches("duplicate key", cerr.message)
    assert.equal(1, #all_rows(store, schema))
    assert.is_false(store:status().in_transaction)
  end)

  it("wait = false: a failed copy reaches an unrelated call as its own plain error, never as a conflict", function()
    assert(store:copy_rows("t", { "id" }, { { id = "dup" } }))
    -- an append next: not taken for a concurrent append (23505), not run
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "dup" } }, { wait = false }))
    local r, err = store:append("S-1", { { type = "E", data = {} } })
    assert.is_nil(r)
    assert.equal("database", err.kind)
    assert.equal("", err.sqlstate or "")
    assert.matches("copy_rows %(sent without waiting%) failed: .*duplicate key", err.message)
    assert.equal(0, assert(store:version("S-1")))
    assert.equal(1, assert(store:append("S-1", { { type = "E", data = {} } })).version)
    -- status() leaves it to the next call (here copy_wait, with its SQLSTATE)
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "dup" } }, { wait = false }))
    assert.is_true(assert(store:status()).connected)
    local n, werr = store:copy_wait()
    assert.is_nil(n)
    assert.equal("23505", werr.sqlstate)
    -- commit_with in the copy's transaction: the copy's error, nothing committed
    copy_dup_in_tx()
    local ok, cerr = store:commit_with(('INSERT INTO "%s".t (id) VALUES ($1)'):format(schema), "late")
    assert.is_nil(ok)
    assert.matches("duplicate key", cerr.message)
    assert.equal(1, assert(store:query("SELECT 1 AS one"))[1].one)   -- the next call runs
    assert.equal(1, #all_rows(store, schema))
  end)

  it("wait = false: a session killed under the copy loses all of it or none, and says so", function()
    local rows = {}
    for i = 1, 200000 do rows[i] = { id = ("r%06d"):format(i), n = i, x = ("padding "):rep(4) } end
    local pid = assert(store:query("SELECT pg_backend_pid() AS p"))[1].p
    local other = assert(es.open(helpers.database_url(), { schema = schema }))
    assert.is_true(store:copy_rows("t", { "id", "n", "x" }, rows, { wait = false }))
    assert(other:query("SELECT pg_terminate_backend($1) AS ok", pid))
    local n, err = store:copy_wait()
    local count = assert(other:query(('SELECT count(*) AS n FROM "%s".t'):format(schema)))[1].n
    if n then
      assert.equal(200000, n)           -- it was done before the kill
      assert.equal(200000, count)
    else
      assert.matches("^copy", err.message)
      assert.equal(0, count)            -- one statement: nothing of it stays
    end
    -- the store goes on, on a new session
    assert.equal(1, assert(store:query("SELECT 1 AS one"))[1].one)
    other:close()
  end)

  it("is refused by memory stores", function()
    local m = assert(es.open("memory:"))
    local n, err = m:copy_rows("t", { "id" }, { { id = "a" } })
    assert.is_nil(n)
    assert.equal("invalid", err.kind)
  end)
end)

describe("store:close() after copy_rows({ wait = false })", function()
  local store, schema, other
  before_each(function()
    store, schema = open()
    other = assert(es.open(helpers.database_url(), { schema = schema }))
  end)
  after_each(function()
    store:close()
    other:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
    other:close()
  end)
  local function count()
    return assert(other:query(('SELECT count(*) AS n FROM "%s".t'):format(schema)))[1].n
  end

  it("returns the error of a failed copy nobody was told of, and closes the store anyway", function()
    assert(store:copy_rows("t", { "id" }, { { id = "dup" } }))
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "new" }, { id = "dup" } }, { wait = false }))
    local ok, err = store:close()
    assert.is_nil(ok)
    assert.equal("database", err.kind)
    assert.equal("23505", err.sqlstate)             -- the copy's own, as copy_wait gives it
    assert.matches("duplicate key", err.message)
    assert.is_true(store:is_closed())
    assert.is_true(store:close())                   -- told once; closed is closed
    assert.equal(1, count())
    -- status() does not take it: close() still reports it
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "dup" } }, { wait = false }))
    assert.is_true(assert(store:status()).connected)
    ok, err = store:close()
    assert.is_nil(ok)
    assert.matches("duplicate key", err.message)
    -- inside a transaction: reported too (the close ends it, so none of it stays)
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:begin())
    assert(store:copy_rows("t", { "id" }, { { id = "in-tx" } }))
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "dup" } }, { wait = false }))
    ok, err = store:close()
    assert.is_nil(ok)
    assert.matches("duplicate key", err.message)
    assert.equal(1, count())
  end)

  it("returns true when the copy went in or its failure was reported already", function()
    local rows = {}
    for i = 1, 20000 do rows[i] = { id = ("k%05d"):format(i), n = i } end
    assert.is_true(store:copy_rows("t", { "id", "n" }, rows, { wait = false }))
    assert.is_true(store:close())                   -- waited for it: all the rows are in
    assert.equal(20000, count())
    -- reported by the next call
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "k00001" } }, { wait = false }))
    assert.is_nil(store:query("SELECT 1 AS one"))
    assert.is_true(store:close())
    -- by copy_wait
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "k00001" } }, { wait = false }))
    assert.is_nil(store:copy_wait())
    assert.is_true(store:close())
    -- dropped with its transaction by a rollback
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:begin())
    assert.is_true(store:copy_rows("t", { "id" }, { { id = "k00001" } }, { wait = false }))
    assert(store:rollback())
    assert.is_true(store:close())
    assert.equal(20000, count())
  end)

  it("is not raised by the collector, which closes such a store without a word", function()
    local seen = setmetatable({}, { __mode = "k" })
    ;(function()
      local s = assert(es.open(helpers.database_url(), { schema = schema }))
      assert.is_true(s:copy_rows("t", { "id" }, { { id = "a" }, { id = "a" } }, { wait = false }))
      seen[s] = true
    end)()
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(seen))
    assert.equal(0, count())
  end)
end)

describe("a rebuild loading new rows by COPY", function()
  it("gives the table the projector's catch-up gives", function()
    local schema = helpers.fresh_schema()
    local store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate())
    local function model(name)
      return es.read_model { name = name,
        columns = { id = "text", n = "bigint", items = "jsonb", at = "timestamptz", note = "text" },
        on = {
          Add = function(row, e)
            row.n = (row.n or 0) + 1
            row.items = row.items or es.json.array {}
            row.items[#row.items + 1] = e.data.item
            row.at = e.recorded_at
          end,
          Note = function(_, e) return { n = -1, note = e.data.note } end,
          Gone = function() return es.read_model.DELETE end,
        } }
    end
    -- 40 streams, events interleaved so that keys span batches of 7
    for round = 1, 6 do
      for s = 1, 40 do
        local t = (round == 4 and s % 5 == 0) and "Gone" or (round == 5 and s % 7 == 0) and "Note" or "Add"
        assert(store:append("Thing-" .. s, { { type = t, data = { item = round * 100 + s, note = "n\t" .. s } } }))
      end
    end
    local live = es.projector(store, { model("rm_live") }, { batch_size = 13 })
    assert(live:catch_up())
    local rb = es.projector(store, { model("rm_rb") }, { batch_size = 7 })
    assert(rb:catch_up())
    assert.equal(240, assert(rb:rebuild("rm_rb", { batch_size = 7 })))
    local q = 'SELECT id, n, items::text AS items, at::text AS at, note FROM "%s".%s ORDER BY id'
    local a = assert(store:query(q:format(schema, "rm_live")))
    local b = assert(store:query(q:format(schema, "rm_rb")))
    assert.equal(40, #a)   -- the 8 deleted in round 4 come back in round 5
    assert.same(a, b)
    store:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
    store:close()
  end)

  it("fails, leaving the live table as it was, when the server refuses a batch copied without waiting", function()
    local schema = helpers.fresh_schema()
    local store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate())
    local bad = nil
    local rm = es.read_model { name = "rm_bad", columns = { id = "text", n = "bigint" },
      on = { Add = function(row, e)
        -- a text the client takes but PostgreSQL refuses for a bigint
        row.n = (e.data.k == bad) and "not a number" or e.data.k
      end } }
    for k = 1, 300 do assert(store:append("Thing-" .. k, { { type = "Add", data = { k = k } } })) end
    local p = es.projector(store, { rm }, { batch_size = 50 })
    assert(p:catch_up())
    for _, at in ipairs({ 150, 300 }) do   -- a batch in the middle, the last one
      bad = at
      local n, err = p:rebuild("rm_bad", { batch_size = 50 })
      assert.is_nil(n)
      assert.matches("invalid input syntax", err.message)
      local rows = assert(store:query(('SELECT count(*) AS c, sum(n)::bigint AS s FROM "%s".rm_bad'):format(schema)))
      assert.equal(300, rows[1].c)
      assert.equal(45150, rows[1].s)
    end
    -- no shadow table or marker left behind
    assert.equal(0, assert(store:query(("SELECT count(*) AS c FROM pg_tables WHERE schemaname = $1 "
      .. "AND tablename LIKE 'rm_bad__rebuild_%%'"), schema))[1].c)
    assert.equal(0, assert(store:query(('SELECT count(*) AS c FROM "%s".read_model_rebuilds'):format(schema)))[1].c)
    store:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
    store:close()
  end)
end)

describe("read_all({ checkpoints = false })", function()
  it("gives the same events and batch checkpoint, without a checkpoint per event", function()
    local schema = helpers.fresh_schema()
    local store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate())
    for i = 1, 12 do
      assert(store:append("S-" .. (i % 3), { { type = i % 2 == 0 and "A" or "B", data = { i = i } } }))
    end
    for _, types in ipairs({ false, { "A" } }) do
      local a, cpa = assert(store:read_all({ limit = 5, types = types or nil }))
      local b, cpb = assert(store:read_all({ limit = 5, types = types or nil, checkpoints = false }))
      assert.equal(cpa, cpb)
      assert.equal(#a, #b)
      assert.equal(a[#a].checkpoint, cpb)
      for i = 1, #a do
        assert.is_string(a[i].checkpoint)
        assert.is_nil(b[i].checkpoint)
        a[i].checkpoint = nil
        assert.same(a[i], b[i])
      end
    end
    store:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
    store:close()
  end)
end)

describe("a projector batch of many rows (staged: COPY into a temporary table, one merge)", function()
  it("gives the table a batch of one event at a time gives, failures included", function()
    local schema = helpers.fresh_schema()
    local store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate())
    local function model(name)
      return es.read_model { name = name, columns = { id = "text", n = "bigint", tags = "jsonb", note = "text" },
        on = {
          Add = function(row, e)
            row.n = (row.n or 0) + e.data.by
            row.tags = row.tags or es.json.array {}
            row.tags[#row.tags + 1] = "t\t" .. e.data.by
          end,
          Gone = function() return es.read_model.DELETE end,
          Boom = function() error("boom") end,
        } }
    end
    local function events(from, to, last)
      for s = from, to do
        assert(store:append("Thing-" .. s, { { type = "Add", data = { by = s } } }))
      end
      for s = from, to do
        local t = s % 9 == 0 and "Gone" or "Add"
        if s == last then t = "Boom" end
        assert(store:append("Thing-" .. s, { { type = t, data = { by = 1 } } }))
      end
    end
    events(1, 300)
    local big = es.projector(store, { model("rm_big") }, { batch_size = 1000 })
    local small = es.projector(store, { model("rm_small") }, { batch_size = 1 })
    assert(big:catch_up())
    assert(small:catch_up())
    -- the second catch-up updates rows that exist; a handler fails at the
    -- 550th stream's second event: everything before it stays
    events(301, 600, 550)
    big:catch_up()
    small:catch_up()
    local q = 'SELECT id, n, tags::text AS tags FROM "%s".%s ORDER BY id'
    local a = assert(store:query(q:format(schema, "rm_big")))
    local b = assert(store:query(q:format(schema, "rm_small")))
    -- 66 streams end with Gone, but the 5 after stream 550 are not applied
    assert.equal(600 - 66 + 5, #a)
    assert.same(b, a)
    store:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
    store:close()
  end)

  it("copies fresh rows as the handlers left them: integral floats as integers, undeclared fields ignored", function()
    local schema = helpers.fresh_schema()
    local store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate())
    local function model(name)
      return es.read_model { name = name, columns = { id = "text", n = "bigint", m = "integer", f = "float8" },
        on = {
          Add = function(row, e)
            row.n = (row.n or 0) + e.data.by * 1.0        -- a float on Lua 5.4
            row.m = e.data.by / 1                          -- a float too
            row.f = e.data.by * 1.0
            row.scratch = function() end                   -- not a column: never stored
            row.cache = { seen = true }
          end,
        } }
    end
    for s = 1, 300 do
      assert(store:append("Thing-" .. s, { { type = "Add", data = { by = s } } }))
    end
    -- 300 fresh rows in one batch (COPY), one at a time (the upsert), a rebuild (COPY)
    local big = es.projector(store, { model("rm_big") }, { batch_size = 1000 })
    local small = es.projector(store, { model("rm_small") }, { batch_size = 1 })
    assert(big:catch_up())
    assert(small:catch_up())
    assert.equal(300, assert(big:rebuild("rm_big", { batch_size = 1000 })))
    local q = 'SELECT id, n::text AS n, m::text AS m, f::text AS f FROM "%s".%s ORDER BY id'
    local a = assert(store:query(q:format(schema, "rm_big")))
    local b = assert(store:query(q:format(schema, "rm_small")))
    assert.equal(300, #a)
    assert.same(b, a)
    local r = assert(store:query(('SELECT n, m FROM "%s".rm_big WHERE id = $1'):format(schema), "7"))[1]
    assert.same({ n = 7, m = 7 }, r)
    store:query(('DROP SCHEMA "%s" CASCADE'):format(schema))
    store:close()
  end)
end)
