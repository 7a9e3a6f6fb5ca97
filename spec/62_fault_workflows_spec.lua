-- Fault matrix, workflows: a runner with timers while PostgreSQL crashes
-- and restarts, while its backends are terminated, and killed with kill -9
-- 20 times at random moments. Afterwards every effect (a command run at
-- once and one run by a timer) happened exactly once.
local helpers = require "helpers"
local fm = require "fault_matrix"

describe("fault matrix: workflows (processes, PostgreSQL)", function()
  local store, schema, w
  before_each(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    assert(fm.runner(store):migrate())
    w = fm.workdir()
  end)
  after_each(function()
    fm.stop_writers(w)
    fm.stop_followers(w)
    if store then store:close() end
    w:remove()
  end)

  -- paced writers: every event costs the runner two commands
  local function during_writes(n, fault)
    local batches = {}
    for i = 1, n do batches[i] = 1 end
    return fm.during_writes(w, schema, batches, fault, "ES_FAULT_PACE=0.02")
  end

  local function finish(rpid, rlog)
    store:close()
    store = fm.reopen(schema)
    fm.assert_effects_once(store, schema, 90)
    assert.is_true(helpers.alive(rpid), "the runner died: " .. (helpers.read_file(rlog) or ""))
    fm.stop_followers(w)
    fm.wait_all({ rpid }, { rlog }, 30)
    fm.assert_acked_once(store, schema, w)
  end

  it("a runner with timers through a crash and restart (immediate)", function()
    if not fm.datadir() then pending("the cluster was not started by scripts/pg.sh"); return end
    local rpid, rlog = fm.spawn_runner(w, schema)
    during_writes(2, fm.crash_restart)
    finish(rpid, rlog)
    assert.matches("error connection", helpers.read_file(rlog), 1, true)
  end)

  it("a runner with timers while its backends are terminated again and again", function()
    local rpid, rlog = fm.spawn_runner(w, schema)
    during_writes(2, function()
      local admin = fm.reopen(schema)
      for _ = 1, 5 do
        fm.terminate_backends(admin)
        fm.wait_writing(w, 2, 2)
      end
      admin:close()
    end)
    finish(rpid, rlog)
  end)

  it("statement and lock timeouts firing in a runner with timers delay it, never stop it", function()
    local rpid, rlog = fm.spawn_runner(w, schema, "runner", "ES_FAULT_STATEMENT_TIMEOUT=50")
    during_writes(2, function()
      fm.lock_now_and_then(w, schema, "timers", "EXCLUSIVE", 4, 0.3, 2)
    end)
    finish(rpid, rlog)
    -- the timeouts fired (the runner logged its retries), and nothing gave up
    local text = helpers.read_file(rlog) or ""
    assert.is_truthy(text:find("lock timeout", 1, true) or text:find("statement timeout", 1, true),
      "no timeout fired: " .. text:sub(1, 500))
    local dl = assert(store:query(('SELECT count(*) AS n FROM "%s".dead_letters'):format(schema)))
    assert.equal(0, dl[1].n)
  end)

  it("kill -9 of the runner 20 times at random moments, timers pending", function()
    during_writes(2, function()
      for i = 1, 20 do
        local rpid = fm.spawn_runner(w, schema, "runner-" .. i)
        fm.random_sleep(0.05, 0.4)
        helpers.sh("kill -9 " .. rpid)
        assert.is_true(helpers.wait_exit(rpid, 10))
      end
    end)
    local rpid, rlog = fm.spawn_runner(w, schema, "runner-last")
    finish(rpid, rlog)
  end)
end)
