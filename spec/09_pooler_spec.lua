-- The store behind PgBouncer in transaction pooling (scripts/pgbouncer.sh:
-- 4 server sessions, fewer than the stores here), as the issue tried it:
-- several store handles, each statement on whichever server session is free.
-- scripts/test.sh provides ES_TEST_POOLER_URL (the pooler, without the
-- option) next to the server itself.
local es = require "eventsourcing"
local helpers = require "helpers"

local POOLER = os.getenv("ES_TEST_POOLER_URL")
if POOLER == "" then POOLER = nil end

local STORES = 6

local function counter_handlers()
  return { T = function(n) return n + 1 end }
end

if not POOLER then
  -- busted allows no pending() in a before_each: say it once, here
  describe("a store behind a transaction pooler", function()
    pending("ES_TEST_POOLER_URL is not set (scripts/test.sh starts a PgBouncer beside its own PostgreSQL)")
  end)
  return
end

describe("a store behind a transaction pooler", function()
  local schema, admin   -- admin: straight to the server

  before_each(function()
    schema = helpers.fresh_schema()
    admin = assert(es.open(helpers.listen_url(), { schema = schema }))
    assert(admin:migrate())
  end)

  after_each(function()
    if admin then admin:close() end
    admin = nil
  end)

  local function open_many(opts)
    local list = {}
    for i = 1, STORES do
      local o = { schema = schema }
      for k, v in pairs(opts or {}) do o[k] = v end
      list[i] = assert(es.open(POOLER, o))
    end
    return list
  end

  local function close_all(list)
    for _, s in ipairs(list) do s:close() end
  end

  it("is what the pooler pass runs through (ES_TEST_POOLER)", function()
    if not POOLER then return end
    local s = assert(es.open(helpers.database_url(), { schema = schema }))
    local st = assert(s:status())
    if helpers.pooler() then
      -- the pass's URL carries the option and reaches a proxy
      assert.equal("transaction", s:pooler())
      assert.is_true(st.proxied)
    else
      assert.is_false(st.proxied)
    end
    s:close()
  end)

  it("without the option fails with an error that names it", function()
    if not POOLER then return end
    local stores = open_many()
    local failures, named = 0, 0
    for r = 1, 10 do
      for i, s in ipairs(stores) do
        local res, err = s:append("P-" .. i, { { type = "T", data = { r = r } } })
        if not res then
          failures = failures + 1
          assert.equal("database", err.kind)
          assert.is_truthy(err.sqlstate == "42P05" or err.sqlstate == "26000", err.sqlstate)
          if err.message:find('pooler = "transaction"', 1, true) then named = named + 1 end
        end
      end
    end
    -- six sessions' worth of prepared statements on four server sessions
    assert.is_true(failures > 0, "the pooler never handed over another session")
    assert.equal(failures, named)
    close_all(stores)
  end)

  it("without the option never runs another schema's statement", function()
    if not POOLER then return end
    -- two schemas through one pool: a statement name prepared on a pooled
    -- session by one store must not run for the other. PgBouncer hands out
    -- the session used last, so: s1 prepares on session A; a transaction
    -- holds A while s2 prepares on B; then s2's next append lands on A.
    local other = helpers.fresh_schema()
    local admin2 = assert(es.open(helpers.listen_url(), { schema = other }))
    assert(admin2:migrate())
    local s1 = assert(es.open(POOLER, { schema = other }))
    local s2 = assert(es.open(POOLER, { schema = schema }))
    local holder = assert(es.open(POOLER, { schema = schema, pooler = "transaction" }))
    local ok = { [s1] = 0, [s2] = 0 }
    local function append(s)
      if s:append("X-1", { { type = "T", data = {} } }) then ok[s] = ok[s] + 1 end
    end
    for _ = 1, 3 do
      append(s1)
      assert(holder:begin())
      assert(holder:query("SELECT 1 AS one"))
      append(s2)
      assert(holder:commit())
      append(s2)
      append(s1)
    end
    assert.is_true(ok[s2] > 0, "s2 never got a session of its own")
    assert.equal(ok[s1], admin2:version("X-1"))
    assert.equal(ok[s2], admin:version("X-1"))
    for _, s in ipairs { s1, s2, holder, admin2 } do s:close() end
  end)

  it("with pooler = \"transaction\" appends, folds and reads with no error", function()
    if not POOLER then return end
    local stores = open_many { pooler = "transaction" }
    for r = 1, 30 do
      for i, s in ipairs(stores) do
        local res = assert(s:append("P-" .. i, { { type = "T", data = { r = r } } }))
        assert.equal(r, res.version)
        local n, v = assert(s:fold("P-" .. i, counter_handlers(), 0))
        assert.equal(r, n)
        assert.equal(r, v)
        assert(s:read_all { limit = 10 })
      end
    end
    local seen, cp = 0, nil
    repeat
      local batch, next_cp = assert(stores[1]:read_all { after = cp, limit = 50 })
      seen, cp = seen + #batch, next_cp
    until #batch == 0
    assert.equal(30 * STORES, seen)
    -- a batch goes through append() with its arrays in binary, unnamed
    for i, s in ipairs(stores) do
      local res = assert(s:append("P-" .. i, { { type = "T", data = { r = 31 } },
        { type = "T", data = { r = 32 } } }, { expected_version = 30 }))
      assert.equal(32, res.version)
      assert.equal(32, (assert(s:fold("P-" .. i, counter_handlers(), 0))))
    end
    local st = assert(stores[1]:status())
    assert.equal("transaction", st.pooler)
    assert.equal(0, st.prepared)
    close_all(stores)
  end)

  it("takes the option from the target, keyword or URL parameter, and hides it from libpq", function()
    if not POOLER then return end
    local dir, port, db = POOLER:match("host=(%S+)"), POOLER:match("port=(%d+)"),
      POOLER:match("dbname=(%S+)")
    local targets = {
      POOLER .. " pooler=transaction",
      POOLER .. " pooler = 'transaction'",
      ("postgresql:///%s?host=%s&port=%s&pooler=transaction"):format(db, dir, port),
      ("postgresql:///%s?pooler=transaction&host=%s&port=%s"):format(db, dir, port),
    }
    for _, t in ipairs(targets) do
      local s = assert(es.open(t, { schema = schema }))
      assert.equal("transaction", s:pooler(), t)
      for r = 1, 6 do assert(s:append("U-1", { { type = "T", data = { r = r } } })) end
      s:close()
    end
    assert.equal(6 * #targets, admin:version("U-1"))
    -- only the keyword itself is taken: not a quoted value that looks like it
    local q = assert(es.open(POOLER .. " application_name='pooler=transaction x'", { schema = schema }))
    assert.equal("none", q:pooler())
    assert.equal("pooler=transaction x",
      q:query("SELECT current_setting('application_name') AS a")[1].a)
    q:close()
    -- the option given to es.open wins over the target
    local s = assert(es.open(POOLER .. " pooler=transaction", { schema = schema, pooler = "none" }))
    assert.equal("none", s:pooler())
    s:close()
  end)

  it("refuses an unknown pooler mode and opens nothing", function()
    if not POOLER then return end
    for _, call in ipairs {
      function() return es.open(POOLER, { schema = schema, pooler = "statement" }) end,
      function() return es.open(POOLER .. " pooler=bogus", { schema = schema }) end,
      function() return es.open(POOLER .. " pooler=", { schema = schema }) end,
      function() return es.open("memory:", { pooler = "yes" }) end,
    } do
      local s, err = call()
      assert.is_nil(s)
      assert.equal("invalid", err.kind)
      assert.matches("pooler must be", err.message)
    end
    assert.equal(0, admin:version("U-1"))
  end)

  it("status() tells a proxy from the server itself", function()
    if not POOLER then return end
    local via = assert(es.open(POOLER, { schema = schema, pooler = "transaction" }))
    local st = assert(via:status())
    assert.is_true(st.proxied)
    assert.equal("transaction", st.pooler)
    local direct = assert(admin:status())
    assert.is_false(direct.proxied)
    assert.equal("none", direct.pooler)
    assert.is_nil(assert(es.open("memory:")):status().proxied)
    via:close()
    -- a session that is gone: status says so and does not fail
    local victim = assert(es.open(helpers.listen_url(), { schema = schema }))
    local pid = victim:query("SELECT pg_backend_pid() AS pid")[1].pid
    assert(admin:query("SELECT pg_terminate_backend($1::int)", pid))
    local gone
    for _ = 1, 50 do
      gone = assert(victim:status())
      if not gone.connected then break end
      helpers.sleep(0.05)
    end
    assert.is_false(gone.connected)
    assert.is_nil(gone.proxied)
    assert.is_true(assert(victim:status()).connected)   -- and the next call reconnects
    victim:close()
  end)

  it("keeps a transaction on one server session; rollback and commit work", function()
    if not POOLER then return end
    local stores = open_many { pooler = "transaction" }
    local s = stores[1]
    assert(s:begin())
    local pid = s:query("SELECT pg_backend_pid() AS pid")[1].pid
    assert(s:append("TX-1", { { type = "T", data = {} } }))
    -- the others keep the remaining server sessions busy meanwhile
    for i = 2, STORES do assert(stores[i]:append("O-" .. i, { { type = "T", data = {} } })) end
    assert(s:append("TX-1", { { type = "T", data = {} } }))
    assert.equal(pid, s:query("SELECT pg_backend_pid() AS pid")[1].pid)
    assert(s:rollback())
    assert.equal(0, admin:version("TX-1"))
    assert(s:begin())
    assert(s:append("TX-1", { { type = "T", data = {} } }))
    assert(s:append("TX-1", { { type = "T", data = {} } }))
    assert(s:commit())
    assert.equal(2, admin:version("TX-1"))
    close_all(stores)
  end)

  it("applies timeouts with SET LOCAL, in and out of transactions, and leaks none", function()
    if not POOLER then return end
    local s = assert(es.open(POOLER, { schema = schema, pooler = "transaction",
                                       statement_timeout = 200, lock_timeout = 100 }))
    local rows, err = s:query("SELECT pg_sleep(3)")
    assert.is_nil(rows)
    assert.equal("57014", err.sqlstate)
    assert(s:begin())
    assert.equal("200ms", s:query("SHOW statement_timeout")[1].statement_timeout)
    assert.equal("100ms", s:query("SHOW lock_timeout")[1].lock_timeout)
    assert(s:commit())
    -- a stream whose next version another transaction holds: the append
    -- gives up after lock_timeout (it waits on the unique index)
    assert(admin:append("L-1", { { type = "T", data = {} } }))
    assert(admin:begin())
    assert(admin:append("L-1", { { type = "T", data = {} } }, { expected_version = 1 }))
    local res, lerr = s:append("L-1", { { type = "T", data = {} } })
    assert.is_nil(res)
    assert.equal("55P03", lerr.sqlstate)
    assert(admin:rollback())
    -- a long stream read ahead page by page, under the timeouts
    local evs = {}
    for i = 1, 1200 do evs[i] = { type = "T", data = { i = i } } end
    assert(s:append("F-1", evs))
    assert.equal(1200, (assert(s:fold("F-1", counter_handlers(), 0))))
    assert.is_false(assert(s:status()).in_transaction)
    -- no server session was left with our settings or in a transaction
    local plain = open_many { pooler = "transaction" }
    for _, p in ipairs(plain) do
      assert.equal("0", p:query("SHOW statement_timeout")[1].statement_timeout)
      assert.equal("0", p:query("SHOW lock_timeout")[1].lock_timeout)
    end
    local stuck = admin:query("SELECT count(*) AS n FROM pg_stat_activity " ..
      "WHERE state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()")
    assert.equal(0, tonumber(stuck[1].n))
    close_all(plain)
    s:close()
  end)

  it("reads ahead under timeouts: batches between other calls, a fold that fails half way", function()
    if not POOLER then return end
    local s = assert(es.open(POOLER, { schema = schema, pooler = "transaction",
                                       statement_timeout = 5000, lock_timeout = 1000 }))
    local evs = {}
    for i = 1, 2500 do evs[i] = { type = "T", data = { i = i } } end
    assert(s:append("Long-1", evs))
    -- read_all with a batch on its way while other calls (each in a
    -- pipeline of its own) and a transaction run
    local seen, cp = 0, nil
    repeat
      local batch, next_cp = assert(s:read_all { after = cp, limit = 400, prefetch = true })
      seen, cp = seen + #batch, next_cp
      assert.equal(2500, assert(s:version("Long-1")))
      assert(s:begin()); assert(s:query("SELECT 1 AS one")); assert(s:commit())
    until #batch == 0
    assert.equal(2500, seen)
    -- a fold whose handler raises with the next page on the wire
    local ok = pcall(s.fold, s, "Long-1", {
      T = function(n, e) if e.data.i == 1500 then error("boom") end return n + 1 end }, 0)
    assert.is_false(ok)
    collectgarbage(); collectgarbage()
    assert.equal(2500, (assert(s:fold("Long-1", counter_handlers(), 0))))
    -- a stream read left half way, then something else
    for e in s:read("Long-1") do if e.version == 10 then break end end
    assert(s:append("Long-1", { type = "T", data = { i = 2501 } }))
    assert.equal(2501, assert(s:version("Long-1")))
    local stuck = admin:query("SELECT count(*) AS n FROM pg_stat_activity " ..
      "WHERE state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()")
    assert.equal(0, tonumber(stuck[1].n))
    s:close()
  end)

  it("refuses LISTEN, naming the option; a projector polls instead", function()
    if not POOLER then return end
    local s = assert(es.open(POOLER, { schema = schema, pooler = "transaction" }))
    local ok, err = s:listen()
    assert.is_nil(ok)
    assert.equal("invalid", err.kind)
    assert.matches('pooler = "transaction"', err.message, 1, true)
    local rm = es.read_model { name = "rm_pooled", columns = { id = "text", n = "bigint" },
      on = { T = function(row) row.n = (row.n or 0) + 1 end } }
    local p = es.projector(s, { rm })
    assert(p:migrate())
    local errors, rounds = {}, 0
    assert(p:run { poll = 0.05, on_error = function(e) errors[#errors + 1] = tostring(e) end,
      idle = function()
        rounds = rounds + 1
        if rounds == 1 then assert(admin:append("R-1", { { type = "T", data = {} } })) end
      end,
      stop = function() local row = rm:get(s, "1"); return row and row.n == 1 or rounds > 100 end })
    assert.same({}, errors)
    assert.equal(1, assert(rm:get(s, "1")).n)
    s:close()
  end)
end)
