-- Faults: dropped connections, an append killed half way, bad connection
-- strings and schema names, unencodable payloads, concurrent migrations, and
-- use before migrate. All against PostgreSQL.
local es = require "eventsourcing"
local helpers = require "helpers"

local URL = helpers.database_url()   -- fails loudly when not configured

local fresh_schema = helpers.fresh_schema

local function qident(schema) return '"' .. schema .. '"' end

local read_file = helpers.read_file

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- Starts `code` in a child Lua of this flavour, in the background; returns a
-- handle whose :wait() gives exit status and output.
local function spawn(code, ...)
  local script, out, rc = os.tmpname(), os.tmpname(), os.tmpname()
  os.remove(rc)
  write_file(script, code)
  local args = {}
  for i, a in ipairs { ... } do args[i] = helpers.shell_quote(a) end
  os.execute(("(%s %s %s >%s 2>&1; echo $? >%s.tmp; mv %s.tmp %s) &"):format(
    helpers.lua_cmd(), helpers.shell_quote(script), table.concat(args, " "),
    out, rc, rc, rc))
  local h = {}
  function h.done() return read_file(rc) ~= nil end
  function h.wait(sleeper, timeout)
    local deadline = os.time() + (timeout or 60)
    while not h.done() do
      assert(os.time() < deadline, "child did not finish: " .. (read_file(out) or ""))
      assert(sleeper:query("SELECT pg_sleep(0.01)"))
    end
    local status, output = tonumber(read_file(rc):match("%d+")), read_file(out) or ""
    os.remove(script); os.remove(out); os.remove(rc)
    return status, output
  end
  return h
end

local function count(store, schema, stream)
  local rows = assert(store:query("SELECT count(*) AS n FROM " .. qident(schema)
    .. ".events WHERE stream = $1", stream))
  return rows[1].n
end

describe("faults (postgresql)", function()
  local schema, store, admin

  before_each(function()
    schema = fresh_schema()
    store = assert(es.open(URL, { schema = schema }))
    assert(store:migrate())
    admin = assert(es.open(URL, { schema = schema }))
  end)

  after_each(function()
    if store and not store:is_closed() then store:close() end
    if admin and not admin:is_closed() then admin:close() end
  end)

  local function backend_pid(s)
    return assert(s:query("SELECT pg_backend_pid() AS pid"))[1].pid
  end

  local function kill(s)
    local pid = backend_pid(s)
    -- waits (up to 5 s) until the backend is gone
    local r = assert(admin:query("SELECT pg_terminate_backend($1, 5000) AS ok", pid))
    assert.is_true(r[1].ok)
    return pid
  end

  describe("a dropped connection", function()
    it("gives kind 'connection', and the next call reconnects", function()
      assert(store:append("Drop-1", { type = "A" }))
      local old = kill(store)
      local v, err = store:version("Drop-1")
      assert.is_nil(v)
      assert.equal("connection", err.kind)
      assert.is_string(err.message)
      assert.matches("^connection: ", tostring(err))
      -- next call: a new session, statements prepared again
      assert.equal(1, store:version("Drop-1"))
      assert.are_not.equal(old, backend_pid(store))
      local again = assert(store:append("Drop-1", { type = "B" }))
      assert.same({ version = 2, position = again.position },
        { version = again.version, position = assert(store:query("SELECT max(position) AS p FROM "
          .. qident(schema) .. ".events"))[1].p })
      local n = 0
      for e in store:read("Drop-1") do n = n + 1; assert.equal(n, e.version) end
      assert.equal(2, n)
    end)

    it("works for every kind of call that meets it", function()
      local calls = {
        append = function() return store:append("Drop-2", { type = "A" }) end,
        read = function() return store:read("Drop-2") end,
        read_all = function() return store:read_all({}) end,
        fold = function() return store:fold("Drop-2", {}, {}) end,
        query = function() return store:query("SELECT 1 AS one") end,
        -- begin() sends nothing: BEGIN goes with the transaction's first
        -- statement, which meets the dead connection
        begin = function()
          assert(store:begin())
          local r, err = store:query("SELECT 1 AS one")
          if not r then assert(store:rollback()) end
          return r, err
        end,
      }
      for _, name in ipairs { "append", "read", "read_all", "fold", "query", "begin" } do
        kill(store)
        local ok, err = calls[name]()
        assert.is_nil(ok, name .. " succeeded on a dead connection")
        assert.equal("connection", err.kind, name .. ": " .. tostring(err))
        assert.truthy(calls[name](), name .. " after reconnecting")
        if name == "begin" then assert(store:rollback()) end
      end
    end)

    it("inside a transaction: the commit fails, nothing is stored, the store works again", function()
      assert(store:begin())
      assert(store:append("Drop-3", { { type = "A" }, { type = "B" } }))
      kill(store)
      local ok, err = store:commit()
      assert.is_nil(ok)
      assert.equal("connection", err.kind)
      assert.equal(0, count(admin, schema, "Drop-3"))
      assert.equal(0, store:version("Drop-3"))
      -- no transaction is believed open any more
      assert(store:begin())
      assert(store:append("Drop-3", { type = "C" }, { expected_version = es.NO_STREAM }))
      assert(store:commit())
      assert.equal(1, store:version("Drop-3"))
    end)
  end)

  -- The killer polls pg_stat_activity for the running append of this schema
  -- and terminates it once it has been running a little while.
  local KILLER = [==[
local es = require "eventsourcing"
local url, schema, ready = arg[1], arg[2], arg[3]
local s = assert(es.open(url, { schema = schema }))
local f = assert(io.open(ready, "w")); f:write("ready"); f:close()
local pattern = '%"' .. schema .. '".append(%'
local t0 = os.time()
while os.time() - t0 < 60 do
  local rows = assert(s:query([[
    SELECT pid, pg_terminate_backend(pid) AS killed FROM pg_stat_activity
     WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE $1
       AND clock_timestamp() - query_start > interval '20 milliseconds']], pattern))
  if #rows > 0 then
    io.write("killed ", rows[1].pid, "\n")
    os.exit(0)
  end
end
io.write("no append seen\n")
os.exit(1)
]==]

  it("append is all or nothing: a 50,000-event append killed half way stores nothing", function()
    local ready = os.tmpname()
    os.remove(ready)
    local killer = spawn(KILLER, URL, schema, ready)
    local deadline = os.time() + 30
    while not read_file(ready) do
      assert(os.time() < deadline, "killer did not start")
      assert(admin:query("SELECT pg_sleep(0.01)"))
    end
    os.remove(ready)

    local events = {}
    for i = 1, 50000 do
      events[i] = { type = "Bulk", data = { i = i, pad = ("x"):rep(200) } }
    end
    local pid = backend_pid(store)
    local res, err = store:append("Bulk-1", events, { expected_version = es.NO_STREAM })
    local status, out = killer.wait(admin)
    assert.equal(0, status, "killer: " .. out)
    assert.equal("killed " .. pid, out:match("killed %d+"), out)
    assert.is_nil(res, "the append finished before it could be killed")
    assert.equal("connection", err.kind, tostring(err))

    assert.equal(0, count(admin, schema, "Bulk-1"))
    assert.equal(0, store:version("Bulk-1"))     -- reconnects
    assert.same({}, (assert(store:read_all({}))))
    -- and the store works again, from version 0
    local r = assert(store:append("Bulk-1", { events[1], events[2] }, { expected_version = es.NO_STREAM }))
    assert.equal(2, r.version)
    assert.equal(2, count(admin, schema, "Bulk-1"))
  end)

  describe("opening", function()
    local function assert_connection_error(target)
      local s, err = es.open(target)
      assert.is_nil(s, "opened " .. target)
      assert.equal("connection", err.kind, target .. ": " .. tostring(err))
      assert.is_string(err.message)
      assert.is_true(#err.message > 15, "message says something: " .. err.message)
      assert.is_nil(err.message:find("\n"), "message is one line: " .. err.message)
      assert.equal("connection: " .. err.message, tostring(err))
      return err
    end

    it("bad connection strings give kind 'connection' with a readable message", function()
      local e1 = assert_connection_error("host=/nonexistent/es-socket-dir port=5432 dbname=x user=postgres")
      assert.matches("nonexistent", e1.message)
      assert_connection_error("postgresql://127.0.0.1:1/nodb?connect_timeout=5")
      local e3 = assert_connection_error("this is not a conninfo")
      assert.matches("=", e3.message)
      assert_connection_error("postgresql://[bad")
      -- a real server, a database that does not exist
      local host = URL:match("host=(%S+)")
      if host then
        local e4 = assert_connection_error(("host=%s dbname=es_no_such_db user=postgres"):format(host))
        assert.matches("es_no_such_db", e4.message)
      end
    end)

    it("a bad schema name gives kind 'invalid'", function()
      for _, name in ipairs { "Bad-Name", "x; DROP TABLE y", "", "1abc", ("a"):rep(64), 'q"uote' } do
        local s, err = es.open(URL, { schema = name })
        assert.is_nil(s, "accepted schema " .. name)
        assert.equal("invalid", err.kind)
        assert.is_string(err.message)
      end
      local ok = assert(es.open(URL, { schema = ("a"):rep(63) }))
      ok:close()
    end)
  end)

  describe("unencodable data", function()
    it("a batch whose event 3 of 5 holds a function returns 'invalid' and stores nothing", function()
      local batch = {
        { type = "A", data = { n = 1 } }, { type = "A", data = { n = 2 } },
        { type = "A", data = { n = 3, f = print } },
        { type = "A", data = { n = 4 } }, { type = "A", data = { n = 5 } },
      }
      local r, err = store:append("Bad-1", batch)
      assert.is_nil(r)
      assert.equal("invalid", err.kind)
      assert.matches("event 3", err.message)
      assert.equal(0, store:version("Bad-1"))
      assert.equal(0, count(admin, schema, "Bad-1"))
      -- the same store appends fine afterwards
      batch[3].data.f = nil
      assert.equal(5, assert(store:append("Bad-1", batch)).version)
    end)

    it("cycles, NaN, infinity, userdata and bad metadata are 'invalid' too", function()
      local cyc = {}
      cyc.self = cyc
      local cases = {
        { type = "A", data = cyc },
        { type = "A", data = { x = 0 / 0 } },
        { type = "A", data = { x = math.huge } },
        { type = "A", data = { x = io.stdout } },
        { type = "A", data = { co = coroutine.create(print) } },
        { type = "A", metadata = { f = print } },
      }
      for i, ev in ipairs(cases) do
        local r, err = store:append("Bad-2", { { type = "ok" }, ev })
        assert.is_nil(r, "case " .. i)
        assert.equal("invalid", err.kind, "case " .. i)
      end
      local r, err = store:append("Bad-2", { type = "ok" }, { metadata = { f = print } })
      assert.is_nil(r)
      assert.equal("invalid", err.kind)
      assert.equal(0, count(admin, schema, "Bad-2"))
    end)
  end)

  describe("migrate", function()
    it("is idempotent", function()
      local before = assert(store:query("SELECT version FROM " .. qident(schema)
        .. ".schema_version ORDER BY version"))
      assert(store:migrate())
      assert(store:migrate())
      local after = assert(store:query("SELECT version FROM " .. qident(schema)
        .. ".schema_version ORDER BY version"))
      assert.same(before, after)
      assert.is_true(#after >= 1)
    end)

    local MIGRATOR = [==[
local es = require "eventsourcing"
local url, schema, go = arg[1], arg[2], arg[3]
local s = assert(es.open(url, { schema = schema }))
while not io.open(go) do assert(s:query("SELECT pg_sleep(0.005)")) end
local ok, err = s:migrate()
if not ok then io.write("failed ", tostring(err), "\n"); os.exit(1) end
assert(s:append("Mig-" .. arg[4], { type = "Migrated" }))
io.write("ok\n")
]==]

    it("is safe from four processes at once on a fresh schema", function()
      local fresh = fresh_schema()
      local go = os.tmpname()
      os.remove(go)
      local kids = {}
      for i = 1, 4 do kids[i] = spawn(MIGRATOR, URL, fresh, go, tostring(i)) end
      -- let them all connect, then release them together
      assert(admin:query("SELECT pg_sleep(0.3)"))
      write_file(go, "go")
      for i = 1, 4 do
        local status, out = kids[i].wait(admin)
        assert.equal(0, status, "migrator " .. i .. ": " .. out)
        assert.equal("ok\n", out)
      end
      os.remove(go)
      local rows = assert(admin:query("SELECT version, count(*) AS n FROM "
        .. qident(fresh) .. ".schema_version GROUP BY version ORDER BY version"))
      assert.is_true(#rows >= 1)
      for i, row in ipairs(rows) do
        assert.equal(i, row.version)
        assert.equal(1, row.n)
      end
      local n = assert(admin:query("SELECT count(*) AS n FROM " .. qident(fresh) .. ".events"))
      assert.equal(4, n[1].n)
    end)
  end)

  describe("before migrate", function()
    local fresh, s

    before_each(function()
      fresh = fresh_schema()
      s = assert(es.open(URL, { schema = fresh }))
    end)
    after_each(function() s:close() end)

    local function says_migrate(what, ok, err)
      assert.is_nil(ok, what .. " worked before migrate")
      assert.equal("database", err.kind, what .. ": " .. tostring(err))
      assert.matches("migrate", err.message, 1, true)
    end

    it("reading, appending and folding give a 'database' error that says to run migrate", function()
      says_migrate("append", s:append("Pre-1", { type = "A" }))
      says_migrate("version", s:version("Pre-1"))
      says_migrate("read", s:read("Pre-1"))
      says_migrate("read_all", s:read_all({}))
      says_migrate("fold", s:fold("Pre-1", {}, {}))
      -- and migrate then makes them work
      assert(s:migrate())
      assert.equal(1, assert(s:append("Pre-1", { type = "A" })).version)
    end)

    it("says so too when the schema exists but holds no event store", function()
      assert(admin:query("CREATE SCHEMA " .. qident(fresh)))
      says_migrate("append", s:append("Pre-2", { type = "A" }))
      says_migrate("version", s:version("Pre-2"))
      says_migrate("read_all", s:read_all({}))
    end)
  end)
end)
