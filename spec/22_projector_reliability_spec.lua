-- Reliability of projections: concurrent writer processes, kill -9, a
-- PostgreSQL restart, two projector processes. Afterwards every event was
-- applied exactly once and the read model equals a fresh rebuild.
local helpers = require "helpers"
local es = require "eventsourcing"


local q = helpers.shell_quote

-- The read model, as source text shared with the child processes: n counts
-- the events of each stream, so a doubled or lost event shows.
local MODEL = [[
local es = require "eventsourcing"
local slow = tonumber(os.getenv("ES_SPEC_SLOW") or "0")
local function model(name)
  return es.read_model { name = name, columns = { id = "text", n = "bigint", last = "bigint" },
    key_of = function(e) return e.stream end,
    on = { Inc = function(row, e)
      if slow > 0 then local t = os.clock() + slow; while os.clock() < t do end end
      row.n = (row.n or 0) + 1
      row.last = e.version
    end } }
end
]]

local sh, sleep = helpers.sh, helpers.sleep

local work      -- helpers.workdir of the running test
local function spawn(code, name, env) return work:spawn(code, name, env) end
local wait_exit = helpers.wait_exit
local function read_file(path) return helpers.read_file(path) or "" end

local function projector_code(schema, mode, batch)
  return MODEL .. ([[
local store = assert(es.open(os.getenv("ES_TEST_DATABASE_URL"), { schema = %q }))
local p = es.projector(store, { model("rm_rel") }, { batch_size = %d,
  listen = os.getenv("ES_TEST_DATABASE_URL") })
if %q == "catch_up" then
  assert(p:catch_up())
else
  local stop_file = %q
  p:run { poll = 0.2, retry = 0.1, on_error = function() end, stop = function()
    local f = io.open(stop_file); if f then f:close(); return true end; return false end }
end
print("done")
]]):format(schema, batch or 50, mode, work.dir .. "/stop")
end

local function writer_code(schema, w, txs)
  return ([[
local es = require "eventsourcing"
local store = assert(es.open(os.getenv("ES_TEST_DATABASE_URL"), { schema = %q }))
for i = 1, %d do
  local stream = ("W%d-%%d"):format(i %% 7)
  local evs = {}
  for k = 1, 1 + i %% 3 do evs[k] = { type = "Inc", data = { w = %d, i = i, k = k } } end
  local ok = store:begin()
  while not ok do os.execute("sleep 0.05"); ok = store:begin() end
  local res = store:append(stream, evs)
  if res and i %% 5 ~= 0 then store:commit() else store:rollback() end
end
print("done")
]]):format(schema, txs, w, w)
end

-- Every stream's row: n == number of its events, last == its version;
-- and the table equals a fresh rebuild (a second model caught up from zero).
local function assert_exactly_once(store, schema)
  local counts = {}
  for _, r in ipairs(assert(store:query(('SELECT stream, count(*) AS n, max(version) AS v FROM "%s".events '
      .. "WHERE type = 'Inc' GROUP BY stream"):format(schema)))) do
    counts[r.stream] = r
  end
  local model = assert(load(MODEL .. " return model"))()
  local check = model("rm_check")
  local cp = es.projector(store, { check }, { batch_size = 1000 })
  assert(cp:catch_up())
  local live, rebuilt = {}, {}
  for _, r in ipairs(assert(store:query(('SELECT id, n, last FROM "%s".rm_rel'):format(schema)))) do live[r.id] = r end
  for _, r in ipairs(assert(store:query(('SELECT id, n, last FROM "%s".rm_check'):format(schema)))) do
    rebuilt[r.id] = r
  end
  assert.same(rebuilt, live)
  local streams = 0
  for stream, c in pairs(counts) do
    streams = streams + 1
    assert.is_table(live[stream], "no row for " .. stream)
    assert.equal(c.n, live[stream].n, "events applied for " .. stream)
    assert.equal(c.v, live[stream].last)
  end
  local rows = 0
  for _ in pairs(live) do rows = rows + 1 end
  assert.equal(streams, rows)
  return streams
end

local function wait_caught_up(store, seconds)
  local model = assert(load(MODEL .. " return model"))()
  local p = es.projector(store, { model("rm_rel") })
  for _ = 1, (seconds or 60) * 10 do
    local st = p:status()
    if st and st[1].lag_events == 0 then return true end
    sleep(0.1)
  end
  return false
end

describe("projector reliability (processes, PostgreSQL)", function()
  local store, schema
  before_each(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    work = helpers.workdir("es-rel")
    local model = assert(load(MODEL .. " return model"))()
    assert(es.projector(store, { model("rm_rel") }):migrate())
  end)
  after_each(function()
    store:close()
    work:remove()
  end)

  it("applies every event once while writer processes append concurrently (some rolled back)", function()
    local ppid, plog = spawn(projector_code(schema, "run", 20), "projector")
    local writers = {}
    for w = 1, 4 do writers[w] = spawn(writer_code(schema, w, 60), "writer" .. w) end
    for _, pid in ipairs(writers) do assert.is_true(wait_exit(pid, 120)) end
    assert.is_true(wait_caught_up(store, 60))
    sh("touch " .. q(work.dir .. "/stop"))
    assert.is_true(wait_exit(ppid, 30), read_file(plog))
    assert.matches("done", read_file(plog))
    assert.equal(28, assert_exactly_once(store, schema))  -- 4 writers x 7 streams
  end)

  it("survives kill -9 in the middle of a catch-up, and two projector processes at once", function()
    for s = 1, 10 do
      local evs = {}
      for k = 1, 200 do evs[k] = { type = "Inc", data = { k = k } } end
      assert(store:append("Big-" .. s, evs))
    end
    local pid, log = spawn(projector_code(schema, "catch_up", 50), "victim", "ES_SPEC_SLOW=0.0005")
    local model = assert(load(MODEL .. " return model"))()
    local p = es.projector(store, { model("rm_rel") })
    local progressed = false
    for _ = 1, 100 do
      local st = p:status()
      if st[1].position > 0 then progressed = true; break end
      sleep(0.05)
    end
    assert.is_true(progressed, read_file(log))
    sh("kill -9 " .. pid)
    assert.is_true(wait_exit(pid, 10), "the killed projector is still there")
    local mid = p:status()[1]
    assert.is_true(mid.lag_events > 0, "the backlog was done before the kill")
    -- two projectors resume together: the lease lets only one apply each batch
    local a = spawn(projector_code(schema, "catch_up", 25), "resume_a", "ES_SPEC_SLOW=0.0002")
    local b, blog = spawn(projector_code(schema, "catch_up", 25), "resume_b", "ES_SPEC_SLOW=0.0002")
    assert.is_true(wait_exit(a, 120))
    assert.is_true(wait_exit(b, 120), read_file(blog))
    assert.is_true(wait_caught_up(store, 30))
    assert.equal(10, assert_exactly_once(store, schema))
  end)

  it("reconnects and continues after a PostgreSQL restart", function()
    local host = helpers.database_url():match("host=(%S+)")
    local datadir = host and (host .. "/data")
    if not datadir or not sh("test -f " .. q(datadir .. "/postmaster.pid")) then
      pending("the cluster's data folder is unknown (not started by scripts/pg.sh)")
      return
    end
    local as = sh("[ \"$(id -u)\" = 0 ]") and "runuser -u postgres -- " or ""
    local ppid, plog = spawn(projector_code(schema, "run", 20), "projector")
    local writer = spawn(writer_code(schema, 1, 40), "writer_before")
    assert.is_true(wait_exit(writer, 60))
    assert(sh(as .. "/usr/lib/postgresql/15/bin/pg_ctl -D " .. q(datadir)
      .. " restart -m fast -w -t 60 >/dev/null 2>&1"))
    store:version("x")             -- our own session reconnects on the next call
    writer = spawn(writer_code(schema, 2, 40), "writer_after")
    assert.is_true(wait_exit(writer, 60))
    assert.is_true(wait_caught_up(store, 60), read_file(plog))
    sh("touch " .. q(work.dir .. "/stop"))
    assert.is_true(wait_exit(ppid, 30), read_file(plog))
    assert.matches("done", read_file(plog))
    assert.equal(14, assert_exactly_once(store, schema))
  end)
end)
