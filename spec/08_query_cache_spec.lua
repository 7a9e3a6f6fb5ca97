-- store:query's statements with parameters are prepared once per session
-- (src/core/pg_qcache.c): same answers as unnamed queries, a bounded
-- number of statements on the session, tables replaced under a statement
-- are read afresh, errors are the query's own, a new session prepares
-- again.
local es = require "eventsourcing"
local helpers = require "helpers"

describe("store:query prepared per session", function()
  local store, schema

  before_each(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate())
    assert(store:query(('CREATE TABLE "%s".t (k int PRIMARY KEY, v text)'):format(schema)))
    assert(store:query(('INSERT INTO "%s".t SELECT g, \'v\' || g FROM generate_series(1, 50) g')
      :format(schema)))
  end)
  after_each(function() if store then store:close() end end)

  local function prepared()
    local rows = assert(store:query("SELECT name FROM pg_prepared_statements WHERE name LIKE 'es_q%' ORDER BY name"))
    return #rows
  end

  it("answers as before and prepares the statement once", function()
    local sql = ('SELECT v FROM "%s".t WHERE k = $1'):format(schema)
    for k = 1, 20 do
      local rows = assert(store:query(sql, k))
      assert.are.equal("v" .. k, rows[1].v)
    end
    assert.are.equal(1, prepared())
    -- no parameters: not prepared
    assert(store:query(('SELECT count(*) AS n FROM "%s".t'):format(schema)))
    assert.are.equal(1, prepared())
  end)

  it("keeps at most 32 statements, evicting the least recently used", function()
    for i = 1, 80 do
      local rows = assert(store:query(('SELECT v, %d AS i FROM "%s".t WHERE k = $1'):format(i, schema), i % 50 + 1))
      assert.are.equal(i, rows[1].i)
      assert.are.equal("v" .. (i % 50 + 1), rows[1].v)
    end
    assert.are.equal(32, prepared())
    -- a hot statement survives the churn
    local hot = ('SELECT v FROM "%s".t WHERE k = $1 AND true'):format(schema)
    for i = 1, 100 do
      assert(store:query(hot, 1))
      assert(store:query(('SELECT %d AS i FROM "%s".t WHERE k = $1'):format(i, schema), 2))
    end
    local rows = assert(store:query("SELECT statement FROM pg_prepared_statements WHERE statement = $1", hot))
    assert.are.equal(1, #rows)
  end)

  it("reads a table that replaced the one it was prepared on (a rebuild's swap)", function()
    local sql = ('SELECT v FROM "%s".t WHERE k = $1'):format(schema)
    for _ = 1, 6 do assert.are.equal("v1", assert(store:query(sql, 1))[1].v) end
    assert(store:begin())
    assert(store:query(('CREATE TABLE "%s".t2 (k int PRIMARY KEY, v text)'):format(schema)))
    assert(store:query(('INSERT INTO "%s".t2 VALUES (1, \'new\')'):format(schema)))
    assert(store:query(('ALTER TABLE "%s".t RENAME TO t_old'):format(schema)))
    assert(store:query(('ALTER TABLE "%s".t2 RENAME TO t'):format(schema)))
    assert(store:commit())
    assert.are.equal("new", assert(store:query(sql, 1))[1].v)
    -- result columns changed: outside a transaction, prepared again at once
    assert(store:query(('ALTER TABLE "%s".t ALTER COLUMN v TYPE int USING 7'):format(schema)))
    assert.are.equal(7, assert(store:query(sql, 1))[1].v)
    -- inside one, the error stands (the transaction is aborted), the next
    -- transaction reads the new shape
    assert(store:query(('ALTER TABLE "%s".t ALTER COLUMN v TYPE text USING \'eight\''):format(schema)))
    assert(store:begin())
    local rows, err = store:query(sql, 1)
    assert.is_nil(rows)
    assert.are.equal("0A000", err.sqlstate)
    store:rollback()
    assert(store:begin())
    assert.are.equal("eight", assert(store:query(sql, 1))[1].v)
    assert(store:commit())
  end)

  it("returns the query's own error, and a transaction rolls back as before", function()
    local rows, err = store:query(('SELECT nope FROM "%s".t WHERE k = $1'):format(schema), 1)
    assert.is_nil(rows)
    assert.is_truthy(tostring(err.message):find("nope", 1, true), tostring(err))
    assert(store:begin())
    assert(store:query(('UPDATE "%s".t SET v = $1 WHERE k = 1'):format(schema), "changed"))
    rows, err = store:query(('SELECT 1 / $1::int AS x FROM "%s".t'):format(schema), 0)
    assert.is_nil(rows)
    assert.is_truthy(err.message)
    -- in the aborted transaction: still refused, then rolled back
    assert.is_nil((store:query(('SELECT v FROM "%s".t WHERE k = $1'):format(schema), 1)))
    store:rollback()
    assert.are.equal("v1", assert(store:query(('SELECT v FROM "%s".t WHERE k = $1'):format(schema), 1))[1].v)
  end)

  it("goes on after a statement error of the caller's own about prepared statements", function()
    local sql = ('SELECT v FROM "%s".t WHERE k = $1'):format(schema)
    assert.are.equal("v1", assert(store:query(sql, 1))[1].v)
    local ok, err = store:query("DEALLOCATE no_such_statement")
    assert.is_nil(ok)
    assert.are.equal("26000", err.sqlstate)
    for k = 1, 3 do assert.are.equal("v" .. k, assert(store:query(sql, k))[1].v) end
    assert(store:begin())
    assert.are.equal("v4", assert(store:query(sql, 4))[1].v)
    assert(store:commit())
  end)

  it("prepares again on a new session", function()
    local sql = ('SELECT v FROM "%s".t WHERE k = $1'):format(schema)
    assert(store:query(sql, 3))
    local pid = assert(store:query("SELECT pg_backend_pid() AS pid"))[1].pid
    local other = assert(es.open(helpers.database_url()))
    assert(other:query("SELECT pg_terminate_backend($1::int)", pid))
    other:close()
    -- the first call may meet the dead session; the next one runs
    local rows = store:query(sql, 3) or assert(store:query(sql, 3))
    assert.are.equal("v3", rows[1].v)
    assert.are.equal(1, prepared())
  end)
end)
