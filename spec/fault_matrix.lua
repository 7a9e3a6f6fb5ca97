-- spec/fault_matrix.lua: what the fault-matrix specs (spec/6x_fault_*)
-- share: crashing and restarting the test cluster, terminating backends,
-- writer processes that log what was acknowledged, and the check that
-- every acknowledged event is stored exactly once and nothing else is.
--
--   local fm = require "fault_matrix"
--   local w = fm.workdir()                       -- logs, acks, stop file
--   local pid = fm.spawn_writer(w, schema, { n = 1, count = 200, batch = 1 })
--   fm.crash_restart()                            -- pg_ctl restart -m immediate
--   fm.terminate_backends(admin)                  -- every other client backend
--   fm.assert_acked_once(store, schema, w)        -- lost 0, doubled 0, ...
local helpers = require "helpers"
local es = require "eventsourcing"
local assert = require "luassert"

local M = {}
local q = helpers.shell_quote

-- The data folder of the cluster scripts/pg.sh started, or nil.
function M.datadir()
  local host = helpers.database_url():match("host=(%S+)")
  local dir = host and (host .. "/data")
  if dir and helpers.sh("test -f " .. q(dir .. "/postmaster.pid")) then return dir end
  return nil
end

-- A crash: every backend killed at once, WAL replayed at start. Acknowledged
-- commits survive only with synchronous_commit on, which writers ask for
-- in their conninfo (M.url), so every reconnection has it too.
function M.crash_restart()
  local dir = M.datadir()
  assert(dir, "the cluster's data folder is unknown (not started by scripts/pg.sh)")
  local as = helpers.sh("[ \"$(id -u)\" = 0 ]") and "runuser -u postgres -- " or ""
  assert(helpers.sh(as .. "/usr/lib/postgresql/15/bin/pg_ctl -D " .. q(dir)
    .. " restart -m immediate -w -t 60 >/dev/null 2>&1"), "pg_ctl restart failed")
end

-- The throwaway cluster runs with synchronous_commit off (speed): a
-- crash may lose the last commits it acknowledged. Writers whose
-- acknowledgements are checked connect with it on.
function M.url()
  return helpers.database_url() .. " options='-c synchronous_commit=on'"
end

-- Terminates every client backend of this database except admin's own.
function M.terminate_backends(admin)
  local r = assert(admin:query("SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
    .. "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"))
  return r[1].n
end

function M.workdir()
  return helpers.workdir("es-fault")
end

-- A writer process: up to `count` transactions of `batch` events each,
-- until M.stop_writers is called (ids chosen by the writer), to streams of its own with the expected version
-- checked; every 7th is rolled back on purpose. An append whose outcome is
-- unknown (connection lost, timeout) is retried with the same ids at the
-- same expected version until acknowledged: the store takes the same ids
-- at the same versions as a success, so nothing can be doubled. Logs
-- "ok <id> <batch> <size>" / "rb <id>" lines to <dir>/acks-<n>.
local WRITER = [[
local es = require "eventsourcing"
local assert = require "luassert"
local core = require "eventsourcing.core"
local util = require "eventsourcing.util"
local n, count, batch, schema, dir = %d, %d, %d, %q, %q
local opts = { schema = schema }
local timeout = tonumber(os.getenv("ES_FAULT_STATEMENT_TIMEOUT") or "")
if timeout then opts.statement_timeout = timeout; opts.lock_timeout = timeout end
local store
for _ = 1, 600 do
  store = es.open(%q, opts)
  if store then break end
  util.sleep(0.1)
end
assert(store, "no database for a minute")
local out = assert(io.open(dir .. "/acks-" .. n, "w"))
out:setvbuf("line")
local versions = {}
local function retry(f)
  for _ = 1, 1200 do
    local r, err = f()
    if r then return r end
    if err.kind == "conflict" or err.kind == "invalid" then error(tostring(err)) end
    print(("retry %%s %%s"):format(err.kind, tostring(err.sqlstate)))
    util.sleep(0.05)
  end
  error("no answer for a minute")
end
local stop_file = dir .. "/stop-writers"
local pace = tonumber(os.getenv("ES_FAULT_PACE") or "")
for i = 1, count do
  if pace then util.sleep(pace) end
  -- run until told to stop, so that a fault always lands mid-run
  local f = io.open(stop_file)
  if f then f:close(); break end
  local evs = {}
  local tag = ("w%%d-%%d"):format(n, i)
  for k = 1, batch do
    local id = core.uuid()
    evs[k] = { id = id, type = "Fault", data = { tok = id, k = k }, metadata = { b = tag, size = batch } }
  end
  if i %% 7 == 0 then
    if store:begin() then
      if store:append(("FaultRb-%%d-%%d"):format(n, i), evs) then
        for _, e in ipairs(evs) do out:write("rb ", e.id, "\n") end
      end
      store:rollback()
    end
  else
    local stream = ("Fault-%%d-%%d"):format(n, i %% 5)
    local expected = versions[stream] or es.NO_STREAM
    local r = retry(function() return store:append(stream, evs, { expected_version = expected }) end)
    versions[stream] = r.version
    for _, e in ipairs(evs) do out:write("ok ", e.id, "\n") end
  end
end
out:close()
print("done")
]]

-- Starts a writer; opts: n, count, batch, env (ES_FAULT_PACE=seconds
-- between transactions slows it down). Returns pid, log.
function M.spawn_writer(w, schema, opts)
  local code = WRITER:format(opts.n, opts.count, opts.batch or 1, schema, w.dir, M.url())
  return w:spawn(code, "writer-" .. opts.n, opts.env)
end

local function ack_lines(w, n)
  local _, lines = (helpers.read_file(w.dir .. "/acks-" .. n) or ""):gsub("\n", "")
  return lines
end

-- Waits until each of the writers has logged `more` lines beyond what it
-- had logged when called: before a fault, so that it lands while they
-- write; after one, so that they are seen to go on by themselves.
function M.wait_writing(w, writers, more)
  local base = {}
  for n = 1, writers do base[n] = ack_lines(w, n) end
  for _ = 1, 1200 do
    local ready = 0
    for n = 1, writers do
      if ack_lines(w, n) >= base[n] + more then ready = ready + 1 end
    end
    if ready == writers then return end
    helpers.sleep(0.05)
  end
  error("the writers did not go on writing within 60 s")
end

-- Writers until stopped, one per entry of `batches` (events per
-- transaction); fault() runs once they all write, and they must go on by
-- themselves after it. env: extra environment of the writers. Returns
-- their log files once they are done.
function M.during_writes(w, schema, batches, fault, env)
  local pids, logs = {}, {}
  for i, batch in ipairs(batches) do
    pids[i], logs[i] = M.spawn_writer(w, schema, { n = i, count = 1000000, batch = batch, env = env })
  end
  M.wait_writing(w, #batches, 3)
  fault()
  M.wait_writing(w, #batches, 3)
  M.stop_writers(w)
  M.wait_all(pids, logs, 120)
  return logs
end

-- Holds `tbl` of the schema locked (mode) for `hold` seconds, `times`
-- times, letting the writers go on between: timeouts fire in whatever
-- waits on it.
function M.lock_now_and_then(w, schema, tbl, mode, times, hold, writers)
  local admin = M.reopen(schema)
  for _ = 1, times do
    assert(admin:begin())
    assert(admin:query(('LOCK TABLE "%s".%s IN %s MODE'):format(schema, tbl, mode)))
    helpers.sleep(hold)
    assert(admin:rollback())
    M.wait_writing(w, writers, 1)
  end
  admin:close()
end

function M.stop_writers(w)
  helpers.sh("touch " .. q(w.dir .. "/stop-writers"))
end

local function read_acks(dir)
  local acked, rolled, n = {}, {}, 0
  local p = io.popen("cat " .. q(dir) .. "/acks-* 2>/dev/null")
  for line in p:lines() do
    local kind, id = line:match("^(%a+) (%S+)")
    if kind == "ok" then acked[id] = true; n = n + 1
    elseif kind == "rb" then rolled[#rolled + 1] = id end
  end
  p:close()
  return acked, n, rolled
end

-- Every acknowledged event stored once, no rolled-back event stored, each
-- transaction's events all there or none. Returns the acknowledged count.
function M.assert_acked_once(store, schema, w)
  local acked, n, rolled = read_acks(w.dir)
  assert.is_true(n > 0, "the writers acknowledged nothing")
  local rows = assert(store:query(('SELECT data->>\'tok\' AS tok, count(*) AS n FROM "%s".events '
    .. "WHERE type = 'Fault' GROUP BY 1"):format(schema)))
  local found, doubled = {}, 0
  for _, r in ipairs(rows) do
    found[r.tok] = true
    if r.n > 1 then doubled = doubled + 1 end
  end
  local lost = 0
  for id in pairs(acked) do if not found[id] then lost = lost + 1 end end
  local leaked = 0
  for _, id in ipairs(rolled) do if found[id] then leaked = leaked + 1 end end
  local partial = assert(store:query(('SELECT metadata->>\'b\' AS b FROM "%s".events WHERE type = \'Fault\' '
    .. "GROUP BY 1 HAVING count(*) <> max((metadata->>'size')::int)"):format(schema)))
  assert.same({ lost = 0, doubled = 0, rolled_back_stored = 0, partial = 0 },
    { lost = lost, doubled = doubled, rolled_back_stored = leaked, partial = #partial })
  return n
end

-- Waits for the pids to exit (seconds each); asserts they did, showing
-- the log of one that did not.
function M.wait_all(pids, logs, seconds)
  for i, pid in ipairs(pids) do
    assert.is_true(helpers.wait_exit(pid, seconds or 120), helpers.read_file(logs[i]) or "")
    assert.matches("done", helpers.read_file(logs[i]) or "", 1, true)
  end
end

-- A store for checks, reopened until the cluster answers again.
function M.reopen(schema)
  for _ = 1, 600 do
    local s = es.open(helpers.database_url(), { schema = schema })
    if s and s:version("x") then return s end
    if s then s:close() end
    helpers.sleep(0.1)
  end
  error("the cluster did not come back in a minute")
end

-- The read model the follower specs keep: per stream, how many events
-- were applied and the last version, so a lost or doubled event shows.
M.MODEL = [[
local es = require "eventsourcing"
local function model(name)
  return es.read_model { name = name, columns = { id = "text", n = "bigint", last = "bigint" },
    key_of = function(e) return e.stream end,
    on = { Fault = function(row, e)
      row.n = (row.n or 0) + 1
      row.last = e.version
    end } }
end
]]

function M.model(name)
  return assert(load(M.MODEL .. " return model"))()(name)
end

-- A projector process following live (mode "run") until the stop file
-- appears, or once through (mode "catch_up" / "rebuild"); opts:
-- statement_timeout (ms). Prints "error <kind> <sqlstate>" per error.
local PROJECTOR = M.MODEL .. [[
local util = require "eventsourcing.util"
local mode, schema, stop_file, timeout = %q, %q, %q, %d
local opts = { schema = schema }
if timeout > 0 then opts.statement_timeout = timeout; opts.lock_timeout = timeout end
local store
for _ = 1, 600 do
  store = es.open(os.getenv("ES_TEST_DATABASE_URL"), opts)
  if store then break end
  util.sleep(0.1)
end
local p = es.projector(store, { model("rm_fault") }, { batch_size = 50 })
local function on_error(err)
  print(("error %%s %%s"):format(type(err) == "table" and err.kind or "?",
    type(err) == "table" and tostring(err.sqlstate) or tostring(err)))
end
if mode == "rebuild" then
  local n, err = p:rebuild("rm_fault")
  if not n then on_error(err); os.exit(3) end
elseif mode == "catch_up" then
  assert(p:catch_up())
else
  p:run { poll = 0.1, retry = 0.1, on_error = on_error, stop = function()
    local f = io.open(stop_file); if f then f:close(); return true end; return false end }
end
print("done")
]]

function M.spawn_projector(w, schema, mode, opts)
  opts = opts or {}
  local code = PROJECTOR:format(mode, schema, w.dir .. "/stop", opts.statement_timeout or 0)
  return w:spawn(code, opts.name or ("projector-" .. mode))
end

function M.stop_followers(w)
  helpers.sh("touch " .. q(w.dir .. "/stop"))
end

-- Waits until rm_fault's checkpoint is at the end of the log.
function M.wait_caught_up(store, seconds)
  local p = es.projector(store, { M.model("rm_fault") })
  for _ = 1, (seconds or 60) * 10 do
    local st = p:status()
    if st and st[1].lag_events == 0 then return true end
    helpers.sleep(0.1)
  end
  return false
end

-- rm_fault counts every stored Fault event of its stream exactly once,
-- and equals a fresh replay into another table.
function M.assert_model_exact(store, schema)
  local want = {}
  for _, r in ipairs(assert(store:query(('SELECT stream, count(*) AS n, max(version) AS v FROM "%s".events '
      .. "WHERE type = 'Fault' GROUP BY stream"):format(schema)))) do
    want[r.stream] = { id = r.stream, n = r.n, last = r.v }
  end
  local function rows(tbl)
    local t = {}
    for _, r in ipairs(assert(store:query(('SELECT id, n, last FROM "%s".%s'):format(schema, tbl)))) do
      t[r.id] = { id = r.id, n = r.n, last = r.last }
    end
    return t
  end
  assert.same(want, rows("rm_fault"))
  local check = M.model("rm_fault_check")
  assert(es.projector(store, { check }, { batch_size = 1000 }):catch_up())
  assert.same(rows("rm_fault_check"), rows("rm_fault"))
end

-- The workflow the workflow specs run: for each Fault event one effect
-- at once (Recorded) and one by a timer 0.2 s later (Fired), both in an
-- Effect stream of the event's own. Doubled or missing effects show.
M.WORKFLOW = [[
local es = require "eventsourcing"
local Effect = es.aggregate {
  name = "Effect",
  initial = function() return {} end,
  apply = { Recorded = function() end, Fired = function() end },
  decide = {
    Record = function(_, c) return { type = "Recorded", data = { source = c.source } } end,
    Fire = function(_, c) return { type = "Fired", data = { source = c.source } } end,
  },
}
local wf = es.workflow { name = "fault-effects", on = {
  Fault = function(e, ctx)
    ctx:execute(Effect, e.data.tok, "Record", { source = e.id })
    ctx:schedule(0.2, Effect, e.data.tok, "Fire", { source = e.id }, "fire:" .. e.id)
  end } }
local function runner(store, opts)
  opts = opts or {}
  opts.aggregates = { Effect = Effect }
  return es.workflow.runner(store, { wf }, opts)
end
]]

function M.runner(store, opts)
  return assert(load(M.WORKFLOW .. " return runner"))()(store, opts)
end

local RUNNER = M.WORKFLOW .. [[
local util = require "eventsourcing.util"
local schema, stop_file = %q, %q
local opts = { schema = schema }
local timeout = tonumber(os.getenv("ES_FAULT_STATEMENT_TIMEOUT") or "")
if timeout then opts.statement_timeout = timeout; opts.lock_timeout = timeout end
local store
for _ = 1, 600 do
  store = es.open(os.getenv("ES_TEST_DATABASE_URL"), opts)
  if store then break end
  util.sleep(0.1)
end
local r = runner(store, { batch_size = 20, backoff = 0.01, max_attempts = 1000,
  log = function(line) print(line) end })
r:run { poll = 0.1, retry = 0.1, stop = function()
    local f = io.open(stop_file); if f then f:close(); return true end; return false end,
  on_error = function(err)
    print(("error %%s %%s"):format(type(err) == "table" and err.kind or "?",
      type(err) == "table" and tostring(err.sqlstate) or tostring(err)))
  end }
print("done")
]]

function M.spawn_runner(w, schema, name, env)
  return w:spawn(RUNNER:format(schema, w.dir .. "/stop"), name or "runner", env)
end

-- Waits until every Fault event has its two effects; then asserts none is
-- doubled or missing.
function M.assert_effects_once(store, schema, seconds)
  local sql = ('SELECT (SELECT count(*) FROM "%s".events WHERE type = \'Fault\') AS events, '
    .. '(SELECT count(*) FROM "%s".events WHERE type = \'Recorded\') AS recorded, '
    .. '(SELECT count(*) FROM "%s".events WHERE type = \'Fired\') AS fired'):format(schema, schema, schema)
  local r
  for _ = 1, (seconds or 60) * 10 do
    r = assert(store:query(sql))[1]
    if r.recorded >= r.events and r.fired >= r.events then break end
    helpers.sleep(0.1)
  end
  local doubled = assert(store:query(('SELECT data->>\'source\' AS s, type FROM "%s".events '
    .. "WHERE type IN ('Recorded', 'Fired') GROUP BY 1, 2 HAVING count(*) > 1"):format(schema)))
  assert.same({ events = r.events, recorded = r.events, fired = r.events, doubled = 0 },
    { events = r.events, recorded = r.recorded, fired = r.fired, doubled = #doubled })
  assert.is_true(r.events > 0)
end

-- How many retries the writers' logs show whose line matches pattern.
function M.retries(logs, pattern)
  local n = 0
  for _, log in ipairs(logs) do
    for line in (helpers.read_file(log) or ""):gmatch("[^\n]+") do
      if line:match("^retry ") and line:match(pattern) then n = n + 1 end
    end
  end
  return n
end

-- Sleeps a random moment between a and b seconds.
function M.random_sleep(a, b)
  helpers.sleep(a + math.random() * (b - a))
end

return M
