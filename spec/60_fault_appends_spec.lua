-- Fault matrix, appends: writer processes (single events and 100-event
-- transactions) while PostgreSQL crashes and restarts, while their
-- backends are terminated, and while statement and lock timeouts fire.
-- Each fault lands while the writers write, and they must go on by
-- themselves afterwards. Then every acknowledged event is stored exactly
-- once, nothing rolled back is stored and no transaction in part.
local helpers = require "helpers"
local fm = require "fault_matrix"

describe("fault matrix: appends (processes, PostgreSQL)", function()
  local store, schema, w
  before_each(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    w = fm.workdir()
  end)
  after_each(function()
    fm.stop_writers(w)
    if store then store:close() end
    w:remove()
  end)

  -- batches: one writer per entry, its events per transaction; env: extra
  -- environment. fault() runs once they all write; they must go on after.
  local function run(batches, fault, env)
    local logs = fm.during_writes(w, schema, batches, fault, env)
    store:close()
    store = fm.reopen(schema)
    fm.assert_acked_once(store, schema, w)
    return logs
  end

  it("a crash and restart (immediate) during single appends from 4 processes", function()
    if not fm.datadir() then pending("the cluster was not started by scripts/pg.sh"); return end
    local logs = run({ 1, 1, 1, 1 }, fm.crash_restart)
    assert.is_true(fm.retries(logs, "connection") > 0, "no writer saw the crash")
  end)

  it("a crash and restart (immediate) during 100-event appends from 2 processes", function()
    if not fm.datadir() then pending("the cluster was not started by scripts/pg.sh"); return end
    local logs = run({ 100, 100 }, fm.crash_restart)
    assert.is_true(fm.retries(logs, "connection") > 0, "no writer saw the crash")
  end)

  it("backends terminated again and again during single and 100-event appends", function()
    local logs = run({ 1, 1, 100, 100 }, function()
      local admin = fm.reopen(schema)
      for _ = 1, 5 do
        fm.terminate_backends(admin)
        fm.wait_writing(w, 4, 1)
      end
      admin:close()
    end)
    assert.is_true(fm.retries(logs, "connection") > 0, "no writer saw its connection go")
  end)

  it("statement and lock timeouts firing during appends (the events table locked now and then)", function()
    local logs = run({ 1, 1, 100 }, function()
      fm.lock_now_and_then(w, schema, "events", "EXCLUSIVE", 4, 0.2, 3)
    end, "ES_FAULT_STATEMENT_TIMEOUT=50")
    assert.is_true(fm.retries(logs, "57014") + fm.retries(logs, "55P03") > 0, "no timeout fired")
  end)
end)
