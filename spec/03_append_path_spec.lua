-- The append path on PostgreSQL (src/core/pg_events.c): one event whose id
-- the library makes goes as one prepared INSERT carrying append()'s checks
-- (PG_APPEND_ONE); everything else, and every refusal of that INSERT, goes
-- through the schema's append() function. The session's prepared
-- statements show which path ran. Not on Citus (append() is delegated there)
-- nor through a transaction pooler (unnamed statements).
local es = require "eventsourcing"
local helpers = require "helpers"

local skip = helpers.distributed() or helpers.pooler()

-- The kinds of append statement this session has prepared: "one" for the
-- single INSERT, "fn" for append().
local function paths(store)
  local rows = assert(store:query("SELECT name FROM pg_prepared_statements"
    .. " WHERE name LIKE 'es\\_append%' ORDER BY name"))
  local seen = {}
  for _, r in ipairs(rows) do
    seen[#seen + 1] = r.name:match("^es_append_one_") and "one" or "fn"
  end
  return table.concat(seen, ",")
end

local function count(store, schema, stream)
  return assert(store:query(('SELECT count(*)::int AS n FROM "%s".events WHERE stream = $1')
    :format(schema), stream))[1].n
end

describe("append path (postgresql)", function()
  if skip then
    pending("not on Citus or through a transaction pooler")
    return
  end

  local store, schema
  before_each(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
  end)
  after_each(function()
    store:close()
  end)

  it("appends one event without an id in one INSERT, never calling append()", function()
    local r1 = assert(store:append("One-1", { type = "A", data = { n = 1 } }))
    local r2 = assert(store:append("One-1", { type = "B" }, { expected_version = 1 }))
    assert(store:append("One-2", { type = "A" }, { expected_version = es.NO_STREAM }))
    assert(store:append("One-2", { type = "B" }, { expected_version = es.STREAM_EXISTS }))
    assert.equal("one", paths(store))
    assert.same({ 1, 2 }, { r1.version, r2.version })
    assert.is_true(r2.position > r1.position)
    local evs = {}
    for e in assert(store:read("One-1")) do evs[#evs + 1] = e end
    assert.equal(2, #evs)
    assert.same({ n = 1 }, evs[1].data)
    assert.equal(r1.position, evs[1].position)
    assert.equal(r1.recorded_at, evs[1].recorded_at)
    local row = assert(store:query(('SELECT category, txid::text AS txid FROM "%s".events'
      .. ' WHERE stream = $1 AND version = 1'):format(schema), "One-1"))[1]
    assert.equal("One", row.category)
    assert.truthy(row.txid:match("^%d+$"))
  end)

  it("hands a refused append to append(), which says why; nothing is stored", function()
    assert(store:append("Ref-1", { type = "A" }))
    assert(store:append("Ref-1", { type = "B" }))
    local ok, err = store:append("Ref-1", { type = "C" }, { expected_version = 0 })
    assert.is_nil(ok)
    assert.equal("conflict", err.kind)
    assert.equal("version", err.reason)
    assert.equal(2, err.actual)
    ok, err = store:append("Ref-1", { type = "C" }, { expected_version = es.NO_STREAM })
    assert.is_nil(ok)
    assert.equal(2, err.actual)
    ok, err = store:append("Ref-2", { type = "C" }, { expected_version = es.STREAM_EXISTS })
    assert.is_nil(ok)
    assert.equal(0, err.actual)
    assert.equal(2, count(store, schema, "Ref-1"))
    assert.equal(0, count(store, schema, "Ref-2"))
    assert.equal("fn,one", paths(store))
  end)

  it("sends caller-chosen ids and many events to append() (idempotent retries)", function()
    local id = require("eventsourcing.core").uuid()
    local r1 = assert(store:append("Id-1", { id = id, type = "A" }, { expected_version = es.NO_STREAM }))
    local r2 = assert(store:append("Id-1", { id = id, type = "A" }, { expected_version = es.NO_STREAM }))
    assert.same({ r1.version, r1.position }, { r2.version, r2.position })
    assert(store:append("Id-2", { { type = "A" }, { type = "B" } }))
    assert.equal("fn", paths(store))
    assert.equal(1, count(store, schema, "Id-1"))
    assert.equal(2, count(store, schema, "Id-2"))
  end)

  -- Index scans of the events' id index in this transaction: how often
  -- append() looked ids up (with sequential scans off, as on a big table).
  local function id_lookups()
    return assert(store:query("SELECT pg_stat_get_xact_numscans(($1 || '.events_id_key')::regclass)::int AS n",
      ('"%s"'):format(schema)))[1].n
  end

  it("new_ids: ids the caller made for this append go in one INSERT, never looked up", function()
    local core = require "eventsourcing.core"
    local a, b = core.uuid(), core.uuid()
    local r = assert(store:append("New-1", { id = a, type = "A" },
      { expected_version = es.NO_STREAM, new_ids = true }))
    assert.equal(1, r.version)
    assert.equal("one", paths(store))
    local batch = { { id = b, type = "B" }, { id = core.uuid(), type = "C" }, { type = "D" } }
    assert(store:begin())
    assert(store:query("SET LOCAL enable_seqscan = off"))
    local before = id_lookups()
    assert(store:append("New-1", batch, { expected_version = 1, new_ids = true }))
    local fresh = id_lookups()
    assert(store:append("New-2", { { id = core.uuid(), type = "A" }, { id = core.uuid(), type = "B" } }))
    local checked = id_lookups()
    assert(store:commit())
    assert.equal(0, fresh - before, "new ids are not looked up")
    assert.is_true(checked - fresh >= 1, "ids that may have been sent before are")
    local ids = {}
    for e in assert(store:read("New-1")) do ids[e.version] = e.id end
    assert.equal(a, ids[1])
    assert.equal(b, ids[2])
    assert.equal(batch[2].id, ids[3])
    assert.truthy(ids[4]:match("^%x+%-"))
  end)

  it("new_ids: an id sent again is still recognized (a retry succeeds, elsewhere it is taken)", function()
    local core = require "eventsourcing.core"
    local a, b, c = core.uuid(), core.uuid(), core.uuid()
    local r1 = assert(store:append("Again-1", { id = a, type = "A" },
      { expected_version = es.NO_STREAM, new_ids = true }))
    -- the same append again: the unique index refuses the id, append() finds it
    local r2 = assert(store:append("Again-1", { id = a, type = "A" },
      { expected_version = es.NO_STREAM, new_ids = true }))
    assert.same({ r1.version, r1.position }, { r2.version, r2.position })
    local ok, err = store:append("Again-2", { id = a, type = "A" }, { new_ids = true })
    assert.is_nil(ok)
    assert.equal("id_taken", err.reason)
    -- a batch, retried where its expected version put it, then elsewhere
    local batch = { { id = b, type = "B" }, { id = c, type = "C" } }
    local r3 = assert(store:append("Again-1", batch, { expected_version = 1, new_ids = true }))
    local r4 = assert(store:append("Again-1", batch, { expected_version = 1, new_ids = true }))
    assert.same({ 3, r3.position }, { r4.version, r4.position })
    ok, err = store:append("Again-3", { { id = core.uuid(), type = "X" }, { id = c, type = "Y" } },
      { new_ids = true })
    assert.is_nil(ok)
    assert.equal("id_taken", err.reason)
    -- a version taken meanwhile is a conflict, as without new_ids
    ok, err = store:append("Again-1", { id = core.uuid(), type = "Z" },
      { expected_version = 1, new_ids = true })
    assert.is_nil(ok)
    assert.equal("version", err.reason)
    assert.equal(3, err.actual)
    assert.equal(3, count(store, schema, "Again-1"))
    assert.equal(0, count(store, schema, "Again-2"))
    assert.equal(0, count(store, schema, "Again-3"))
  end)

  it("new_ids: an id sent again inside a transaction is refused and nothing stays", function()
    local core = require "eventsourcing.core"
    local a = core.uuid()
    assert(store:append("TxAgain-1", { id = a, type = "A" }, { new_ids = true }))
    for _, events in ipairs({ { id = a, type = "A" }, { { id = core.uuid(), type = "B" }, { id = a, type = "C" } } }) do
      assert(store:begin())
      assert(store:append("TxAgain-2", { type = "X" }))
      local ok, err = store:append("TxAgain-3", events, { new_ids = true })
      assert.is_nil(ok)
      -- not a version conflict (a retry would not help): the id is taken,
      -- and the transaction is aborted
      assert.equal("invalid", err.kind)
      assert.equal("tx_aborted", err.reason)
      assert.matches("an event id of this append is already stored", err.message, 1, true)
      assert.matches("roll it back", err.message, 1, true)
      assert.is_nil(store:commit())
      assert.equal(1, count(store, schema, "TxAgain-1"))
      assert.equal(0, count(store, schema, "TxAgain-2"))
      assert.equal(0, count(store, schema, "TxAgain-3"))
    end
  end)

  it("new_ids must be a boolean", function()
    assert.has_error(function() store:append("Bad-1", { type = "A" }, { new_ids = "yes" }) end,
      "option 'new_ids' must be a boolean, got string")
    assert.equal(0, count(store, schema, "Bad-1"))
  end)

  it("a repository appends the ids it made as new_ids, the ids a decide gave as they are", function()
    local core = require "eventsourcing.core"
    local given = core.uuid()
    local A = es.aggregate {
      name = "Ctr",
      initial = { n = 0 },
      apply = { Added = function(s) s.n = s.n + 1 end },
      decide = {
        Add = function() return { type = "Added" } end,
        AddTwo = function() return { { type = "Added" }, { type = "Added" } } end,
        AddGiven = function() return { id = given, type = "Added" } end,
      },
    }
    local repo = es.repository(store)
    assert(repo:execute(A, "c1", "Add", {}))
    assert.equal("one", paths(store))
    assert(store:begin())
    assert(store:query("SET LOCAL enable_seqscan = off"))
    local before = id_lookups()
    assert(repo:execute(A, "c1", "AddTwo", {}))
    local made = id_lookups()
    assert(repo:execute(A, "c1", "AddGiven", {}))
    local gave = id_lookups()
    assert(store:commit())
    assert.equal(0, made - before)
    assert.is_true(gave - made >= 1)
    assert.equal("fn,one", paths(store))
    -- the given id again: the repository's retry of it is recognized as taken
    local ok, err = repo:execute(A, "c2", "AddGiven", {})
    assert.is_nil(ok)
    assert.equal("id_taken", err.reason)
    assert.equal(4, store:version("Ctr-c1"))
  end)

  it("sends a batch's arrays in binary: every field comes back as given, in version order", function()
    local core = require "eventsourcing.core"
    local given = core.uuid()
    local batch = {}
    for i = 1, 120 do
      batch[i] = { type = ('T"\\%d é'):format(i % 7),
        data = { n = i, s = 'quote " backslash \\ {brace} ,comma', u = "日本" },
        metadata = i % 3 == 0 and { m = i } or nil }
    end
    batch[50].id = given
    local r = assert(store:append("Bin-1", batch, { expected_version = es.NO_STREAM,
      metadata = { who = "spec" } }))
    assert.equal(120, r.version)
    local evs, ids = {}, {}
    for e in assert(store:read("Bin-1")) do evs[#evs + 1] = e end
    assert.equal(120, #evs)
    for i, e in ipairs(evs) do
      assert.equal(i, e.version)
      assert.equal(batch[i].type, e.type)
      assert.same(batch[i].data, e.data)
      assert.equal("spec", e.metadata.who)
      assert.equal(i % 3 == 0 and i or nil, e.metadata.m)
      assert.truthy(e.id:match("^%x+%-%x+%-%x+%-%x+%-%x+$"))
      assert.is_nil(ids[e.id], "ids are distinct")
      ids[e.id] = true
      -- positions follow versions within the batch (one transaction)
      if i > 1 then assert.is_true(e.position > evs[i - 1].position) end
    end
    assert.equal(given, evs[50].id)
    assert.equal(r.position, evs[120].position)
    -- a retry of nothing new: the caller's id is taken, nothing is added
    local ok, err = store:append("Bin-2", { { id = given, type = "X" }, { type = "Y" } })
    assert.is_nil(ok)
    assert.equal("id_taken", err.reason)
    assert.equal(0, count(store, schema, "Bin-2"))
  end)

  it("migration step 4 upgrades a store at step 3: append() stops sorting a batch", function()
    local q = ('"%s"'):format(schema)
    local function body()
      return assert(store:query("SELECT pg_get_functiondef(($1 || '.append')::regproc) AS d",
        q))[1].d
    end
    local function sorts(d) return d:find("ORDER BY u.ord;", 1, true) ~= nil end
    assert.is_false(sorts(body()))
    -- back to step 3: its append() (with the sort) and no record of step 4
    local old = body():gsub("WITH ORDINALITY AS u%(id, type, data, meta, ord%)%s*;",
      "WITH ORDINALITY AS u(id, type, data, meta, ord) ORDER BY u.ord;")
    assert(store:query(old))
    assert(store:query("DELETE FROM " .. q .. ".schema_version WHERE version >= 4"))
    assert.is_true(sorts(body()))
    local top = assert(store:query("SELECT max(version) AS v FROM " .. q .. ".schema_version"))
    assert.equal(3, top[1].v)
    assert(store:append("Up-1", { { type = "A" }, { type = "B" } }))
    assert(store:migrate())
    assert.is_false(sorts(body()))
    top = assert(store:query("SELECT max(version) AS v FROM " .. q .. ".schema_version"))
    assert.is_true(top[1].v >= 4)
    local r = assert(store:append("Up-1", { { type = "C" }, { type = "D" }, { type = "E" } },
      { expected_version = 2 }))
    assert.equal(5, r.version)
    local types = {}
    for e in assert(store:read("Up-1")) do types[#types + 1] = e.type .. e.version end
    assert.equal("A1,B2,C3,D4,E5", table.concat(types, ","))
  end)

  it("a batch naming the stream's last event is checked by append() itself, with no read before it", function()
    assert(store:append("Last-1", { type = "A" }))
    local first
    for e in assert(store:read("Last-1")) do first = e.id end
    local r = assert(store:append("Last-1", { { type = "B" }, { type = "C" } },
      { expected_version = 1, expected_last_id = first }))
    assert.equal(3, r.version)
    -- the same event named again: no longer the last
    local ok, err = store:append("Last-1", { { type = "D" }, { type = "E" } },
      { expected_last_id = first })
    assert.is_nil(ok)
    assert.equal("conflict", err.kind)
    assert.equal("last_id", err.reason)
    assert.equal(3, err.actual)
    -- an empty stream has no last event
    ok, err = store:append("Last-2", { { type = "A" }, { type = "B" } },
      { expected_last_id = first })
    assert.is_nil(ok)
    assert.equal("last_id", err.reason)
    assert.equal(0, err.actual)
    assert.equal(0, count(store, schema, "Last-2"))
    assert.equal(3, count(store, schema, "Last-1"))
    -- the stream's last event was never read on its own (es_last)
    assert.equal(0, #assert(store:query("SELECT name FROM pg_prepared_statements"
      .. " WHERE name LIKE 'es\\_last%'")))
  end)

  it("migration step 5 upgrades a store at step 4: append() takes the last event named", function()
    local q = ('"%s"'):format(schema)
    local function nargs()
      local rows = assert(store:query("SELECT p.pronargs AS n FROM pg_proc p JOIN pg_namespace s"
        .. " ON s.oid = p.pronamespace WHERE s.nspname = $1 AND p.proname = 'append'", schema))
      local out = {}
      for _, r in ipairs(rows) do out[#out + 1] = r.n end
      return table.concat(out, ",")
    end
    assert.equal("8", nargs())
    -- back to step 4: append() without p_last_id, and no record of step 5
    local def = assert(store:query("SELECT pg_get_functiondef(($1 || '.append')::regproc) AS d",
      q))[1].d
    local old = def:gsub(",%s*p_last_id uuid DEFAULT NULL::uuid", ""):gsub("p_last_id", "NULL::uuid")
    assert.is_nil(old:find("p_last_id", 1, true))
    assert(store:query("DROP FUNCTION " .. q .. ".append(text, bigint, boolean, uuid[], text[],"
      .. " json[], json[], uuid)"))
    assert(store:query(old))
    assert(store:query("DELETE FROM " .. q .. ".schema_version WHERE version >= 5"))
    assert.equal("7", nargs())
    local call = "SELECT o_status AS s, o_version AS v FROM " .. q .. ".append('Up-5', $1::bigint,"
      .. " false, ARRAY[gen_random_uuid()], ARRAY['A'], ARRAY['{}'::json], ARRAY['{}'::json])"
    assert.same({ s = 0, v = 1 }, assert(store:query(call, 0))[1])
    assert(store:migrate())
    assert.equal("8", nargs())
    local top = assert(store:query("SELECT max(version) AS v FROM " .. q .. ".schema_version"))
    assert.is_true(top[1].v >= 5)
    -- a call with the seven arguments of before still works (the default)
    assert.same({ s = 0, v = 2 }, assert(store:query(call, 1))[1])
    local last
    for e in assert(store:read("Up-5")) do last = e.id end
    local r = assert(store:append("Up-5", { { type = "B" }, { type = "C" } },
      { expected_version = 2, expected_last_id = last }))
    assert.equal(4, r.version)
    local ok, err = store:append("Up-5", { { type = "D" }, { type = "E" } },
      { expected_last_id = last })
    assert.is_nil(ok)
    assert.equal("last_id", err.reason)
    assert.equal(4, err.actual)
  end)

  it("keeps the caller's transaction: appends inside it roll back with it", function()
    assert(store:begin())
    assert(store:append("Tx-1", { type = "A" }))
    assert(store:append("Tx-1", { type = "B" }, { expected_version = 1 }))
    assert(store:rollback())
    assert.equal(0, count(store, schema, "Tx-1"))
    assert(store:begin())
    assert(store:append("Tx-1", { type = "A" }))
    assert(store:commit())
    assert.equal(1, store:version("Tx-1"))
  end)
end)
