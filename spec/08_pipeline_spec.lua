-- Fewer round trips per transaction (issue 12): store:begin() sends nothing
-- and BEGIN goes in one pipeline with the transaction's first statement;
-- store:commit_with(sql, ...) sends the last statement and COMMIT together.
-- What callers see must not change: errors, aborted transactions, dropped
-- sessions, and the same behind PgBouncer in transaction pooling.
local es = require "eventsourcing"
local helpers = require "helpers"

local POOLER = os.getenv("ES_TEST_POOLER_URL")
if POOLER == "" then POOLER = nil end

local function qident(s) return '"' .. s .. '"' end

-- Each block runs against a direct store and, when scripts/test.sh gives
-- one, a store behind its PgBouncer (transaction pooling).
local targets = { { name = "direct", url = function() return helpers.database_url() end } }
if POOLER then
  targets[#targets + 1] = { name = "behind PgBouncer", url = function() return POOLER end,
                            opts = { pooler = "transaction" } }
end

for _, target in ipairs(targets) do
describe("transactions in fewer round trips (" .. target.name .. ")", function()
  local schema, store, admin, tbl

  local function open(extra)
    local o = { schema = schema }
    for k, v in pairs(target.opts or {}) do o[k] = v end
    for k, v in pairs(extra or {}) do o[k] = v end
    return assert(es.open(target.url(), o))
  end

  before_each(function()
    schema = helpers.fresh_schema()
    admin = assert(es.open(helpers.listen_url(), { schema = schema }))
    assert(admin:migrate())
    tbl = qident(schema) .. ".notes"
    assert(admin:query("CREATE TABLE " .. tbl .. " (id int PRIMARY KEY, note text NOT NULL)"))
    store = open()
  end)

  after_each(function()
    if store and not store:is_closed() then store:close() end
    if admin and not admin:is_closed() then admin:close() end
  end)

  local function notes()
    return #assert(admin:query("SELECT id FROM " .. tbl))
  end

  local function events(stream)
    return assert(admin:query("SELECT count(*) AS n FROM " .. qident(schema)
      .. ".events WHERE stream = $1", stream))[1].n
  end

  -- ends every client session but admin's (and PgBouncer's own)
  local function kill_others()
    assert(admin:query("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
      .. "WHERE datname = current_database() AND pid <> pg_backend_pid() "
      .. "AND backend_type = 'client backend' AND application_name NOT LIKE 'pgbouncer%'"))
  end

  describe("a deferred BEGIN", function()
    it("makes the first statement and the rest one transaction", function()
      assert(store:begin())
      assert.is_true(assert(store:status()).in_transaction)
      assert(store:append("D-1", { type = "A" }))
      assert(store:query("INSERT INTO " .. tbl .. " VALUES (1, 'x')"))
      -- the first statement ran in the transaction: one txid for both
      local t = assert(store:query("SELECT pg_current_xact_id_if_assigned()::text AS now, "
        .. "(SELECT max(txid)::text FROM " .. qident(schema) .. ".events) AS ev"))[1]
      assert.equal(t.ev, t.now)
      assert(store:rollback())
      assert.equal(0, events("D-1"))
      assert.equal(0, notes())
      assert.is_false(assert(store:status()).in_transaction)
    end)

    if not target.opts then
      it("begin() sends nothing: the server session stays idle until the first statement", function()
        local pid = assert(store:query("SELECT pg_backend_pid() AS pid"))[1].pid
        local function state()
          return assert(admin:query("SELECT state FROM pg_stat_activity WHERE pid = $1", pid))[1].state
        end
        assert(store:begin())
        assert.equal("idle", state())
        assert(store:query("SELECT 1 AS one"))
        assert.equal("idle in transaction", state())
        assert(store:commit())
        assert.equal("idle", state())
      end)
    end

    it("begin() then commit() or rollback() with nothing between works", function()
      assert(store:begin())
      assert(store:commit())
      assert(store:begin())
      assert(store:rollback())
      local ok, err = store:commit()
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.matches("no transaction is open", err.message)
      assert(store:begin())
      local again, aerr = store:begin()
      assert.is_nil(again)
      assert.matches("already open", aerr.message)
      assert(store:commit())
    end)

    it("lets SET TRANSACTION ISOLATION LEVEL be the first statement", function()
      assert(store:begin())
      assert(store:query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
      assert.equal("serializable",
        assert(store:query("SHOW transaction_isolation"))[1].transaction_isolation)
      assert(store:append("D-2", { type = "A" }))
      assert(store:commit())
      assert.equal(1, events("D-2"))
    end)

    it("a failing first statement aborts the transaction, as it did after BEGIN", function()
      assert(store:begin())
      local ok, err = store:query("SELECT 1 / 0 AS x")
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.equal("tx_aborted", err.reason)
      assert.equal("22012", err.sqlstate)
      ok, err = store:append("D-3", { type = "A" })
      assert.is_nil(ok)
      assert.equal("25P02", err.sqlstate)
      ok, err = store:commit()
      assert.is_nil(ok)
      assert.equal("tx_aborted", err.reason)
      assert.equal(0, events("D-3"))
      assert(store:append("D-3", { type = "A" }))    -- the session goes on
    end)

    it("a conflict as the first statement reports as before and leaves nothing", function()
      assert(store:append("D-4", { type = "A" }))
      assert(store:begin())
      local ok, err = store:append("D-4", { type = "B" }, { expected_version = es.NO_STREAM })
      assert.is_nil(ok)
      assert.equal("conflict", err.kind)
      assert.equal("version", err.reason)
      assert(store:rollback())
      assert.equal(1, events("D-4"))
    end)

    it("the fold (a read cursor) can be the first statement", function()
      assert(store:append("D-5", { { type = "A" }, { type = "A" } }))
      assert(store:begin())
      local st = assert(store:fold("D-5", { A = function(n) return n + 1 end }, 0))
      assert.equal(2, st)
      assert(store:append("D-5", { type = "A" }, { expected_version = 2 }))
      assert(store:commit())
      assert.equal(3, events("D-5"))
    end)

    it("statements that do not pipeline (COPY, migrate) send BEGIN first", function()
      assert(store:begin())
      assert(store:copy_rows("notes", { "id", "note" }, { { id = 7, note = "c" } }))
      assert(store:migrate())
      assert(store:rollback())
      assert.equal(0, notes())
    end)

    if target.opts then
      -- PgBouncer holds no server session for a transaction that has sent
      -- nothing: the first statement gets a live one
      it("a server session dropped before the first statement is not this transaction's", function()
        assert(store:append("D-6", { type = "A" }))
        assert(store:begin())
        kill_others()
        assert(store:append("D-6", { type = "B" }, { expected_version = 1 }))
        assert(store:commit())
        assert.equal(2, events("D-6"))
      end)
    else
      it("a session dropped before the first statement: that statement reports it, "
        .. "rollback() clears it, the next transaction reconnects", function()
        assert(store:append("D-6", { type = "A" }))
        assert(store:begin())
        kill_others()
        local ok, err = store:append("D-6", { type = "B" })
        assert.is_nil(ok)
        assert.equal("connection", err.kind)
        -- the transaction is gone: calls refuse until rollback()
        ok, err = store:version("D-6")
        assert.is_nil(ok)
        assert.equal("connection", err.kind)
        assert(store:rollback())
        assert(store:begin())
        assert(store:append("D-6", { type = "B" }, { expected_version = 1 }))
        assert(store:commit())
        assert.equal(2, events("D-6"))
      end)
    end
  end)

  describe("commit_with", function()
    it("runs the last statement and commits the transaction", function()
      assert(store:begin())
      assert(store:append("C-1", { type = "A" }))
      assert.is_true(store:commit_with("INSERT INTO " .. tbl .. " VALUES ($1, $2)", 1, "one"))
      assert.is_false(assert(store:status()).in_transaction)
      assert.equal(1, events("C-1"))
      assert.equal(1, notes())
      -- parameters as store:query takes them (a table goes as JSON)
      assert(store:begin())
      assert(store:commit_with("INSERT INTO " .. tbl .. " SELECT $1, ($2::jsonb)->>'n'", 2, { n = "two" }))
      assert.equal("two", assert(admin:query("SELECT note FROM " .. tbl .. " WHERE id = 2"))[1].note)
    end)

    it("can be the transaction's only statement (BEGIN, it, COMMIT in one trip)", function()
      assert(store:begin())
      assert(store:commit_with("INSERT INTO " .. tbl .. " VALUES (3, 'three')"))
      assert.equal(1, notes())
      -- again, so a statement prepared on the session is used too
      for i = 4, 6 do
        assert(store:begin())
        assert(store:commit_with("INSERT INTO " .. tbl .. " VALUES ($1, 'n')", i))
      end
      assert.equal(4, notes())
    end)

    it("a failing statement rolls everything back and reports as a query would", function()
      assert(admin:query("INSERT INTO " .. tbl .. " VALUES (1, 'taken')"))
      local sql = "INSERT INTO " .. tbl .. " VALUES ($1, $2)"
      -- what store:query reports inside a transaction ...
      assert(store:begin())
      local _, qerr = store:query(sql, 1, "again")
      assert(store:rollback())
      -- ... is what commit_with reports
      for _ = 1, 2 do
        assert(store:begin())
        assert(store:append("C-2", { type = "A" }))
        local ok, err = store:commit_with(sql, 1, "again")
        assert.is_nil(ok)
        assert.equal(qerr.kind, err.kind)
        assert.equal(qerr.reason, err.reason)
        assert.equal("23505", err.sqlstate)
        assert.equal(qerr.message, err.message)
        -- the transaction has ended, rolled back
        assert.is_false(assert(store:status()).in_transaction)
        assert.equal(0, events("C-2"))
        assert.equal(1, notes())
      end
      local ok, err = store:rollback()
      assert.is_nil(ok)
      assert.matches("no transaction is open", err.message)
      -- a bad parameter is refused before anything is sent
      assert(store:begin())
      ok, err = store:commit_with(sql, 9, "a\0b")
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.is_true(assert(store:status()).in_transaction)
      assert(store:rollback())
      -- the session goes on
      assert(store:begin())
      assert(store:append("C-2", { type = "A" }))
      assert(store:commit_with(sql, 2, "fine"))
      assert.equal(1, events("C-2"))
    end)

    it("in a transaction an earlier error aborted: nothing is committed", function()
      assert(store:begin())
      assert(store:append("C-3", { type = "A" }))
      assert.is_nil(store:query("SELECT 1 / 0 AS x"))
      local ok, err = store:commit_with("INSERT INTO " .. tbl .. " VALUES (5, 'x')")
      assert.is_nil(ok)
      assert.equal("tx_aborted", err.reason)
      assert.equal("25P02", err.sqlstate)
      assert.is_false(assert(store:status()).in_transaction)
      assert.equal(0, events("C-3"))
      assert.equal(0, notes())
      assert(store:append("C-3", { type = "A" }))
    end)

    it("a failing COMMIT (serialization) reports as commit() does", function()
      assert(store:begin())
      assert(store:query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
      assert.equal(0, #assert(store:query("SELECT id FROM " .. tbl .. " WHERE id = 1")))
      local other = open()
      assert(other:begin())
      assert(other:query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
      assert.equal(0, #assert(other:query("SELECT id FROM " .. tbl .. " WHERE id = 2")))
      assert(other:query("INSERT INTO " .. tbl .. " VALUES (1, 'other')"))
      assert(other:commit())
      other:close()
      local ok, err = store:commit_with("INSERT INTO " .. tbl .. " VALUES (2, 'mine')")
      assert.is_nil(ok)
      assert.equal("conflict", err.kind)
      assert.equal("40001", err.sqlstate)
      assert.is_false(assert(store:status()).in_transaction)
      assert.equal(1, notes())
    end)

    it("without a transaction: refused, nothing runs", function()
      local ok, err = store:commit_with("INSERT INTO " .. tbl .. " VALUES (1, 'x')")
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.matches("no transaction is open", err.message)
      assert.equal(0, notes())
      local mem = assert(es.open("memory:"))
      ok, err = mem:commit_with("SELECT 1")
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
    end)

    it("after the session dropped inside the transaction: connection, nothing stored", function()
      assert(store:begin())
      assert(store:append("C-4", { type = "A" }))
      kill_others()
      local ok, err = store:commit_with("INSERT INTO " .. tbl .. " VALUES (1, 'x')")
      assert.is_nil(ok)
      assert.equal("connection", err.kind)
      assert.is_false(assert(store:status()).in_transaction)
      assert.equal(0, events("C-4"))
      assert.equal(0, notes())
      -- the next transaction reconnects
      assert(store:begin())
      assert(store:append("C-4", { type = "A" }))
      assert(store:commit_with("INSERT INTO " .. tbl .. " VALUES (1, 'x')"))
      assert.equal(1, events("C-4"))
    end)
  end)

  describe("append with commit_with (the append, a statement and COMMIT in one round trip)", function()
    local function with(sql, ...)
      return { sql = sql, n = select("#", ...), ... }
    end
    local insert
    before_each(function() insert = "INSERT INTO " .. tbl .. " VALUES ($1, $2) RETURNING id, note" end)

    it("appends, runs the statement, commits, and gives the statement's rows", function()
      for i = 1, 3 do   -- the second and third on statements prepared already
        assert(store:begin())
        local res = assert(store:append("W-1", { type = "A", data = { i = i } },
          { expected_version = i - 1, commit_with = with(insert, i, "n" .. i) }))
        assert.equal(i, res.version)
        assert.is_number(res.position)
        assert.matches("^%d+%-%d+%-%d+T", res.recorded_at)
        assert.same({ { id = i, note = "n" .. i } }, res.rows)
        assert.is_true(res.one_trip)
        assert.is_nil(res.idempotent)
        assert.is_false(store:in_transaction())
      end
      assert.equal(3, events("W-1"))
      assert.equal(3, notes())
      -- the events' instant is the transaction's, as a plain append's
      local e = assert(store:read("W-1", { backward = true, limit = 1 }))()
      assert.equal(e.recorded_at, assert(store:read("W-1", { from = 3 }))().recorded_at)
    end)

    it("a refused append (stale expected version) is a conflict with the version found, "
      .. "and the statement behind it never runs", function()
      assert(store:append("W-2", { { type = "A" }, { type = "A" } }))
      for _, expected in ipairs({ 1, 0, "no_stream" }) do
        assert(store:begin())
        local ok, err = store:append("W-2", { type = "A" },
          { expected_version = expected, commit_with = with(insert, 1, "never") })
        assert.is_nil(ok)
        assert.equal("conflict", err.kind)
        assert.equal("version", err.reason)
        assert.equal(2, err.actual)
        assert.matches("found version 2", err.message)
        assert.is_false(store:in_transaction())
        assert.equal(2, events("W-2"))
        assert.equal(0, notes())
      end
      -- the session goes on, and so does the stream
      assert(store:begin())
      assert(store:append("W-2", { type = "A" },
        { expected_version = 2, commit_with = with(insert, 1, "at last") }))
      assert.equal(3, events("W-2"))
      assert.equal(1, notes())
    end)

    it("an append after another last event than expected_last_id is a conflict, "
      .. "and the statement behind it never runs", function()
      assert(store:append("W-2L", { { type = "A" }, { type = "A" } }))
      local evs = {}
      for e in assert(store:read("W-2L")) do evs[#evs + 1] = e end
      for _, batch in ipairs({ { type = "B" }, { { type = "B" }, { type = "C" } } }) do
        assert(store:begin())
        local ok, err = store:append("W-2L", batch, { expected_version = 2,
          expected_last_id = evs[1].id, commit_with = with(insert, 1, "never") })
        assert.is_nil(ok)
        assert.equal("conflict", err.kind)
        assert.equal("last_id", err.reason)
        assert.equal(2, err.actual)
        assert.matches("nothing of the transaction was committed", err.message)
        assert.is_false(store:in_transaction())
        assert.equal(2, events("W-2L"))
        assert.equal(0, notes())
      end
      assert(store:begin())
      local res = assert(store:append("W-2L", { type = "B" }, { expected_version = 2,
        expected_last_id = evs[2].id, commit_with = with(insert, 1, "after the right one") }))
      assert.is_true(res.one_trip)
      assert.equal(3, events("W-2L"))
      assert.equal(1, notes())
    end)

    it("an event id already stored (new_ids, not looked up) fails as invalid, nothing committed", function()
      local id = require("eventsourcing.core").uuid()
      assert(store:append("W-3", { id = id, type = "A" }))
      assert(store:begin())
      local ok, err = store:append("W-3b", { id = id, type = "A" },
        { new_ids = true, commit_with = with(insert, 1, "never") })
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.matches("already stored", err.message)
      assert.matches("nothing of the transaction was committed", err.message)
      assert.is_false(store:in_transaction())
      assert.equal(0, events("W-3b"))
      assert.equal(0, notes())
    end)

    it("a failing statement rolls the append back and reports as a query would", function()
      assert(admin:query("INSERT INTO " .. tbl .. " VALUES (1, 'taken')"))
      assert(store:begin())
      local _, qerr = store:query(insert, 1, "again")
      assert(store:rollback())
      for _, evs in ipairs({ { type = "A" }, { { type = "A" }, { type = "B" } } }) do
        assert(store:begin())
        local ok, err = store:append("W-4", evs, { commit_with = with(insert, 1, "again") })
        assert.is_nil(ok)
        assert.equal(qerr.kind, err.kind)
        assert.equal("23505", err.sqlstate)
        assert.equal(qerr.message, err.message)
        assert.is_false(store:in_transaction())
        assert.equal(0, events("W-4"))
      end
      assert.equal(1, notes())
    end)

    it("many events, or caller ids to look up, take two round trips with the same outcome", function()
      assert(store:begin())
      local res = assert(store:append("W-5", { { type = "A" }, { type = "B" } },
        { commit_with = with(insert, 5, "five") }))
      assert.equal(2, res.version)
      assert.same({ { id = 5, note = "five" } }, res.rows)
      assert.is_nil(res.one_trip)
      assert.is_false(store:in_transaction())
      local id = require("eventsourcing.core").uuid()
      assert(store:begin())
      res = assert(store:append("W-6", { id = id, type = "A" },
        { expected_version = "no_stream", commit_with = with(insert, 60, "first") }))
      assert.equal(1, res.version)
      assert.is_nil(res.idempotent)
      -- the same event again (a retry): an idempotent success, and the
      -- statement, meant to go with appending it, does not run
      assert(store:begin())
      res = assert(store:append("W-6", { id = id, type = "A" },
        { expected_version = "no_stream", commit_with = with(insert, 61, "again") }))
      assert.equal(1, res.version)
      assert.is_true(res.idempotent)
      assert.is_nil(res.rows)
      assert.is_false(store:in_transaction())
      assert.equal(1, events("W-6"))
      assert.equal(2, notes())   -- 5 and 60
      -- a conflict there ends the transaction too
      assert(store:begin())
      local ok, err = store:append("W-5", { { type = "A" }, { type = "B" } },
        { expected_version = 0, commit_with = with(insert, 6, "never") })
      assert.is_nil(ok)
      assert.equal("conflict", err.kind)
      assert.equal(2, err.actual)
      assert.matches("nothing of the transaction was committed", err.message)
      assert.is_false(store:in_transaction())
      assert.equal(2, notes())
    end)

    it("refuses without a transaction, on memory stores, and ends the transaction on bad input", function()
      local ok, err = store:append("W-7", { type = "A" }, { commit_with = with(insert, 1, "x") })
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.matches("store:begin%(%) first", err.message)
      assert.equal(0, events("W-7"))
      local mem = assert(es.open("memory:"))
      ok, err = mem:append("W-7", { type = "A" }, { commit_with = with("SELECT 1") })
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.equal(0, assert(mem:version("W-7")))
      for _, bad in ipairs({
        { { type = "A", data = "text" }, with(insert, 1, "x") },      -- a bad event
        { { type = "A" }, with(insert, 1, "a\0b") },                  -- a bad parameter
        { { type = "A" }, { n = 1 } },                                 -- no statement
        { { type = "A" }, with(insert, 1, "x"), "bogus" },             -- a bad expected version
        { { type = "A" }, with(insert, 1, print) },                    -- a parameter JSON cannot hold
      }) do
        assert(store:begin())
        assert(store:append("W-8", { type = "before" }))
        ok, err = store:append("W-8", bad[1], { commit_with = bad[2], expected_version = bad[3] })
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.is_false(store:in_transaction())
        assert.equal(0, events("W-8"))
      end
      assert.has_error(function() store:append("W-8", { type = "A" }, { commit_with = "SELECT 1" }) end,
        "option 'commit_with' must be a table, got string")
      assert.equal(0, notes())
    end)

    it("json_rows: each row as the JSON text of the row it gives otherwise, json cells as written", function()
      local sql = insert .. [[, NULL::text AS gone, '{"b": 1,  "a": [1, 2]}'::json AS j,
        '{"b": 1, "a": 2}'::jsonb AS jb, true AS t, 2.5::float8 AS f, 'x"y\z' || chr(10) AS s,
        9007199254740993::bigint AS big]]
      assert(store:begin())
      local plain = assert(store:append("W-11", { type = "A" },
        { commit_with = with(sql, 1, "one") }))
      assert(store:begin())
      local w = with(sql, 2, "one")
      w.json_rows = true
      local res = assert(store:append("W-11", { type = "A" }, { expected_version = 1, commit_with = w }))
      assert.is_true(res.one_trip)
      assert.equal(1, #res.rows)
      local text = res.rows[1]
      assert.is_string(text)
      -- the json cell goes as the server wrote it, spaces and key order
      -- kept; a NULL cell is left out, as it is nil among the rows' tables
      assert.truthy(text:find('"j":{"b": 1,  "a": [1, 2]}', 1, true))
      assert.is_nil(text:find('"gone"', 1, true))
      local row = es.json.decode(text)
      plain.rows[1].id = 2
      assert.same(plain.rows[1], row)
      assert.equal('x"y\\z\n', row.s)
      assert.is_true(row.t)
      -- two rows, and a row JSON cannot hold (a float that is not finite)
      assert(store:begin())
      w = with("INSERT INTO " .. tbl .. " VALUES ($1, 'a'), ($1 + 1, 'b')"
        .. " RETURNING id, note, CASE WHEN id = $1 THEN 'NaN'::float8 ELSE 1.5 END AS f", 3)
      w.json_rows = true
      res = assert(store:append("W-11", { type = "A" }, { expected_version = 2, commit_with = w }))
      assert.is_false(res.rows[1])
      assert.same({ id = 4, note = "b", f = 1.5 }, es.json.decode(res.rows[2]))
      -- a json_rows that is not a boolean: refused, the transaction ended
      assert(store:begin())
      w = with(insert, 9, "never")
      w.json_rows = "yes"
      local ok, err = store:append("W-11", { type = "A" }, { expected_version = 3, commit_with = w })
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.matches("json_rows must be a boolean, got string", err.message)
      assert.is_false(store:in_transaction())
      assert.equal(3, events("W-11"))
      assert.equal(4, notes())
    end)

    it("a transaction that wrote before the stream's last appender: the stream-order rule", function()
      assert(store:append("W-10", { type = "A" }))
      assert(store:begin())
      assert(store:query("INSERT INTO " .. tbl .. " VALUES (1, 'takes an id')"))
      assert(admin:append("W-10", { type = "A" }))   -- a younger transaction, committed
      local ok, err = store:append("W-10", { type = "A" },
        { expected_version = 2, commit_with = with(insert, 2, "never") })
      assert.is_nil(ok)
      assert.equal("conflict", err.kind)
      assert.equal("order", err.reason)
      assert.equal("40001", err.sqlstate)
      assert.matches("younger transaction", err.message)
      assert.is_false(store:in_transaction())
      assert.equal(2, events("W-10"))
      assert.equal(0, notes())
      -- two events go in two round trips: the same answer
      assert(store:begin())
      assert(store:query("INSERT INTO " .. tbl .. " VALUES (1, 'takes an id')"))
      assert(admin:append("W-10", { type = "A" }))
      ok, err = store:append("W-10", { { type = "A" }, { type = "B" } },
        { expected_version = 3, commit_with = with(insert, 2, "never") })
      assert.is_nil(ok)
      assert.equal("conflict", err.kind)
      assert.equal("order", err.reason)
      assert.equal(3, err.actual)
      assert.matches("nothing of the transaction was committed", err.message)
      assert.not_matches("roll it back", err.message)
      assert.is_false(store:in_transaction())
      assert.equal(3, events("W-10"))
      assert.equal(0, notes())
    end)

    it("after the session dropped inside the transaction: connection, nothing stored", function()
      assert(store:begin())
      assert(store:append("W-9", { type = "A" }))
      kill_others()
      local ok, err = store:append("W-9", { type = "A" }, { commit_with = with(insert, 1, "x") })
      assert.is_nil(ok)
      assert.equal("connection", err.kind)
      assert.is_false(store:in_transaction())
      assert.equal(0, events("W-9"))
      assert.equal(0, notes())
      assert(store:begin())
      assert(store:append("W-9", { type = "A" }, { commit_with = with(insert, 1, "x") }))
      assert.equal(1, events("W-9"))
    end)
  end)

  if target.opts then
    it("behind the pooler, the timeouts still hold inside the transaction only", function()
      local s = open({ statement_timeout = 300, lock_timeout = 100 })
      assert(s:begin())
      assert.equal("300ms", assert(s:query("SHOW statement_timeout"))[1].statement_timeout)
      assert.equal("100ms", assert(s:query("SHOW lock_timeout"))[1].lock_timeout)
      local ok, err = s:query("SELECT pg_sleep(2)")
      assert.is_nil(ok)
      assert.equal("tx_aborted", err.reason)
      assert(s:rollback())
      assert(s:begin())
      ok, err = s:commit_with("SELECT pg_sleep(2)")
      assert.is_nil(ok)
      assert.equal("57014", err.sqlstate)
      s:close()
    end)
  end

  describe("query_ahead", function()
    local function count_sql()
      return "SELECT count(*)::int AS n FROM " .. qident(schema) .. ".events WHERE stream = $1"
    end

    it("is refused outside a transaction, and twice before its rows are taken", function()
      local ok, err = store:query_ahead("SELECT $1::int AS x", 1)
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert(store:begin())
      assert(store:query_ahead("SELECT $1::int AS x", 1))
      ok, err = store:query_ahead("SELECT $1::int AS x", 2)
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.same({ { x = 1 } }, assert(store:ahead_rows()))
      -- its rows are given once
      ok, err = store:ahead_rows()
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert(store:rollback())
    end)

    it("goes in front of the transaction's next statement, in the transaction", function()
      for round = 1, 3 do   -- the first prepares it; later ones go by name
        local stream = "Q-" .. round
        assert(store:begin())
        assert(store:query_ahead(count_sql(), stream))
        assert(store:append(stream, { type = "A" }))
        -- it ran before the append: it saw no event
        assert.same({ { n = 0 } }, assert(store:ahead_rows()))
        assert(store:query_ahead("INSERT INTO " .. tbl .. " VALUES ($1::int, 'ahead') RETURNING id", round))
        assert(store:query("SELECT 1 AS one"))
        assert.same({ { id = round } }, assert(store:ahead_rows()))
        assert(store:rollback())
        assert.equal(0, events(stream))
        assert.equal(0, notes())
      end
    end)

    it("runs on its own when no statement takes it, and with COMMIT", function()
      assert(store:begin())
      assert(store:query_ahead(count_sql(), "Q-9"))
      assert.same({ { n = 0 } }, assert(store:ahead_rows()))
      assert(store:query_ahead("INSERT INTO " .. tbl .. " VALUES ($1::int, 'at commit')", 9))
      assert(store:commit())
      assert.equal(1, notes())
      -- a rollback drops one still waiting
      assert(store:begin())
      assert(store:query_ahead("INSERT INTO " .. tbl .. " VALUES ($1::int, 'dropped')", 10))
      assert(store:rollback())
      assert.equal(1, notes())
      assert(store:begin())
      assert(store:query("SELECT 1 AS one"))
      local ok, err = store:ahead_rows()
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert(store:rollback())
    end)

    it("fails the statement it went with, with its own error, and nothing is stored", function()
      assert(store:begin())
      assert(store:query_ahead("SELECT 1 / $1::int AS x", 0))
      local ok, err = store:append("Q-F", { type = "A" })
      assert.is_nil(ok)
      assert.equal("22012", err.sqlstate)        -- division by zero: the query ahead's
      local rows, rerr = store:ahead_rows()
      assert.is_nil(rows)
      assert.matches("did not run", rerr.message)
      assert(store:rollback())
      assert.equal(0, events("Q-F"))
      -- the session goes on
      assert(store:append("Q-F", { type = "A" }))
      assert.equal(1, events("Q-F"))
    end)

    it("keeps its rows when the statement after it fails", function()
      assert(store:append("Q-C", { type = "A" }))
      assert(store:begin())
      assert(store:query_ahead(count_sql(), "Q-C"))
      local ok, err = store:append("Q-C", { type = "A" }, { expected_version = 0 })
      assert.is_nil(ok)
      assert.equal("conflict", err.kind)
      assert.same({ { n = 1 } }, assert(store:ahead_rows()))
      assert(store:rollback())
      assert.equal(1, events("Q-C"))
    end)

    it("says its own error is its own, and a plan made stale by a changed column fails once only", function()
      local sql = "SELECT note FROM " .. tbl .. " WHERE id = $1::int"
      assert(admin:query("INSERT INTO " .. tbl .. " VALUES (1, 'one')"))
      for round = 1, 2 do       -- the second goes by name when prepared
        assert(store:begin())
        assert(store:query_ahead(sql, 1))
        assert(store:append("Q-S", { type = "A" }))
        assert.same({ { note = "one" } }, assert(store:ahead_rows()))
        assert(store:commit())
        assert.equal(round, events("Q-S"))
      end
      assert(admin:query("ALTER TABLE " .. tbl .. " ALTER COLUMN note TYPE varchar(20)"))
      local failed = 0
      for _ = 1, 3 do
        assert(store:begin())
        assert(store:query_ahead(sql, 1))
        local ok, err = store:append("Q-S", { type = "A" })
        if ok then
          assert.same({ { note = "one" } }, assert(store:ahead_rows()))
          assert(store:commit())
        else
          -- a prepared plan the server refuses (0A000), as the query
          -- ahead's error, not the append's
          failed = failed + 1
          assert.equal("0A000", err.sqlstate)
          assert.matches("^query ahead %(sent with ", err.message)
          assert(store:rollback())
        end
      end
      -- behind the pooler nothing is prepared, so nothing goes stale
      assert.equal(target.opts and 0 or 1, failed)
      assert.equal(2 + 3 - failed, events("Q-S"))
    end)

    it("never outlives its transaction, whatever ends it (a commit refused by a failed copy)", function()
      for _, wait in ipairs({ "commit", "commit_with" }) do
        assert(store:begin())
        assert(store:query_ahead("INSERT INTO " .. tbl .. " VALUES ($1::int, 'stale') RETURNING id", 7))
        assert.is_true(store:copy_rows("notes", { "id", "note" }, { { id = 1, note = "a" }, { id = 1, note = "b" } },
          { wait = false }))
        local ok
        if wait == "commit" then ok = store:commit() else ok = store:commit_with("SELECT 1 AS one") end
        assert.is_nil(ok)
        -- the next transaction does not carry it
        assert(store:begin())
        assert(store:query("SELECT 1 AS one"))
        assert(store:commit())
        assert.equal(0, notes())
      end
    end)

    it("gives its rows when it went in front of a batch read ahead (the prefetch thread took them)", function()
      for i = 1, 10 do assert(store:append("Q-T-" .. i, { type = "A" })) end
      for round = 1, 10 do
        assert(store:begin())
        local _, last = assert(store:read_all({ limit = 2, prefetch = true }))
        assert(store:query_ahead("INSERT INTO " .. tbl .. " VALUES ($1::int, 'ahead') RETURNING id", round))
        assert(store:read_all({ after = last, limit = 2, prefetch = true }))
        assert.same({ { id = round } }, assert(store:ahead_rows()))
        assert(store:commit())
      end
      assert.equal(10, notes())
    end)

    it("refuses a query the server cannot prepare, in the transaction", function()
      assert(store:begin())
      local ok, err = store:query_ahead("SELECT no_such_column FROM " .. tbl .. " WHERE id = $1::int", 1)
      if target.opts then
        -- behind the pooler nothing is prepared: the statement it goes
        -- with says so
        assert.is_true(ok)
        ok, err = store:append("Q-P", { type = "A" })
      end
      assert.is_nil(ok)
      assert.equal("42703", err.sqlstate)
      assert(store:rollback())
      assert(store:append("Q-P", { type = "A" }))
    end)
  end)

  describe("a first statement that fails before it runs", function()
    it("(at prepare, in commit_with) ends the transaction: nothing stays open on the server", function()
      assert(store:begin())
      local ok, err = store:commit_with("INSERT INTO " .. qident(schema) .. ".nope VALUES ($1)", 1)
      assert.is_nil(ok)
      assert.is_truthy(err)
      assert.is_false(assert(store:status()).in_transaction)
      -- the next statement runs on its own and is committed at once
      assert(store:query("INSERT INTO " .. tbl .. " VALUES ($1, 'after')", 1))
      assert.equal(1, notes())
      assert.equal(0, #assert(admin:query("SELECT pid FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' "
        .. "AND query LIKE '%' || $1 || '%'", schema)))
    end)

    it("(at prepare, in query) aborts the caller's transaction: commit() fails, nothing is stored", function()
      assert(store:begin())
      local ok, err = store:query("SELECT nope FROM " .. tbl .. " WHERE id = $1", 1)
      assert.is_nil(ok)
      assert.equal("tx_aborted", err.reason)
      assert.is_nil((store:append("P-1", { type = "A" })))
      assert.is_nil((store:commit()))
      assert.equal(0, events("P-1"))
      assert.is_false(assert(store:status()).in_transaction)
      assert(store:append("P-1", { type = "A" }))
      assert.equal(1, events("P-1"))
    end)

    -- LuaJIT cannot pass 70,000 arguments to a call at all (unpack's
    -- limit), so the case is reachable from Lua 5.4 only
    local can = pcall(function() return (table.unpack or unpack)({}, 1, 70000) end)
    local it_can = can and it or pending
    it_can("(more parameters than the protocol counts) is refused at once, the session goes on", function()
      local params, marks = {}, {}
      for i = 1, 70000 do params[i] = i; marks[i] = "$" .. i end
      local sql = "SELECT " .. table.concat(marks, ",", 1, 3)
      assert(store:begin())
      local ok, err = store:query(sql, (table.unpack or unpack)(params))
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.matches("65535", err.message, 1, true)
      assert(store:query("INSERT INTO " .. tbl .. " VALUES ($1, 'in')", 2))
      assert(store:commit())
      assert.equal(1, notes())
    end)
  end)
end)
end

describe("the repository's inline read model write goes with COMMIT", function()
  local schema, store

  local Counter = es.aggregate {
    name = "Counter",
    initial = function() return { n = 0 } end,
    apply = { Added = function(st) st.n = st.n + 1 end },
    decide = { Add = function(_, c) return { type = "Added", data = { by = c.by } } end },
  }

  local function model()
    return es.read_model {
      name = "counters",
      columns = { id = "text", n = "integer", last = "integer" },
      on = { Added = function(row, e)
        row.n = (row.n or 0) + 1
        row.last = e.data.by
        return row
      end },
    }
  end

  before_each(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate())
  end)

  after_each(function() store:close() end)

  it("commits the events and the row together; a failing write stores neither", function()
    local rm = model()
    assert(rm:migrate(store))
    local repo = es.repository(store, { read_models = { rm } })
    assert(repo:execute(Counter, "a", "Add", { by = 1 }))
    assert(repo:execute(Counter, "a", "Add", { by = 2 }))
    local row = assert(rm:get(store, "a"))
    assert.same({ 2, 2 }, { row.n, row.last })
    -- a value the column cannot take fails the write in PostgreSQL
    local res, err = repo:execute(Counter, "a", "Add", { by = "not a number" })
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.equal("tx_aborted", err.reason)
    assert.is_false(assert(store:status()).in_transaction)
    assert.equal(2, store:version("Counter-a"))
    assert.equal(2, assert(rm:get(store, "a")).n)
    assert(repo:execute(Counter, "a", "Add", { by = 3 }))
    assert.equal(3, assert(rm:get(store, "a")).last)
  end)
end)
