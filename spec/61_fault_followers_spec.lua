-- Fault matrix, followers: a live projector, a catch-up and a rebuild
-- while PostgreSQL crashes and restarts, while backends are terminated,
-- while timeouts fire, with kill -9 at random moments, and behind a
-- long-running transaction. Afterwards the read model holds every event
-- exactly once and equals a fresh replay, and the processes recovered by
-- themselves.
local helpers = require "helpers"
local es = require "eventsourcing"
local fm = require "fault_matrix"

describe("fault matrix: followers (processes, PostgreSQL)", function()
  local store, schema, w
  before_each(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    assert(es.projector(store, { fm.model("rm_fault") }):migrate())
    w = fm.workdir()
  end)
  after_each(function()
    fm.stop_writers(w)
    fm.stop_followers(w)
    if store then store:close() end
    w:remove()
  end)

  local function writers(n, count, batch)
    local pids, logs = {}, {}
    for i = 1, n do
      pids[i], logs[i] = fm.spawn_writer(w, schema, { n = i, count = count, batch = batch })
    end
    return pids, logs
  end

  -- single-event writers until stopped; fault() runs while they write and
  -- while the projector follows
  local function during_writes(n, fault)
    local batches = {}
    for i = 1, n do batches[i] = 1 end
    return fm.during_writes(w, schema, batches, fault)
  end

  -- the projector must catch up by itself, then stop when asked
  local function finish(ppid, plog)
    store:close()
    store = fm.reopen(schema)
    assert.is_true(fm.wait_caught_up(store, 90), helpers.read_file(plog))
    assert.is_true(helpers.alive(ppid), "the projector died: " .. (helpers.read_file(plog) or ""))
    fm.stop_followers(w)
    fm.wait_all({ ppid }, { plog }, 30)
    fm.assert_acked_once(store, schema, w)
    fm.assert_model_exact(store, schema)
  end

  it("a live projector through a crash and restart (immediate) while writers append", function()
    if not fm.datadir() then pending("the cluster was not started by scripts/pg.sh"); return end
    local ppid, plog = fm.spawn_projector(w, schema, "run")
    during_writes(3, fm.crash_restart)
    finish(ppid, plog)
    assert.matches("error connection", helpers.read_file(plog), 1, true)
  end)

  it("a catch-up of a backlog through a crash and restart (immediate)", function()
    if not fm.datadir() then pending("the cluster was not started by scripts/pg.sh"); return end
    local pids, logs = writers(2, 30, 100)
    fm.wait_all(pids, logs, 120)
    local ppid, plog = fm.spawn_projector(w, schema, "run")
    -- batches of 50 from 6,000 events: crash once it has started
    for _ = 1, 600 do
      local r = store:query(('SELECT handled FROM "%s".projections WHERE name = $1'):format(schema), "rm_fault")
      if r and r[1] and r[1].handled > 0 then break end
      helpers.sleep(0.02)
    end
    fm.crash_restart()
    finish(ppid, plog)
  end)

  it("a live projector while its backends are terminated again and again", function()
    local ppid, plog = fm.spawn_projector(w, schema, "run")
    during_writes(3, function()
      local admin = fm.reopen(schema)
      -- at least 5 rounds, and on until one has hit the projector inside
      -- a statement (a session ended while it was idle is replaced
      -- unseen; the faster its batches, the rarer a hit)
      for i = 1, 40 do
        fm.terminate_backends(admin)
        fm.wait_writing(w, 3, 2)
        if i >= 5 and helpers.read_file(plog):find("error connection", 1, true) then break end
      end
      admin:close()
    end)
    finish(ppid, plog)
    assert.matches("error connection", helpers.read_file(plog), 1, true)
  end)

  it("kill -9 of the projector 20 times at random moments while writers append", function()
    during_writes(3, function()
      for i = 1, 20 do
        local ppid = fm.spawn_projector(w, schema, "run", { name = "projector-" .. i })
        fm.random_sleep(0.05, 0.3)
        helpers.sh("kill -9 " .. ppid)
        assert.is_true(helpers.wait_exit(ppid, 10))
      end
    end)
    local ppid, plog = fm.spawn_projector(w, schema, "run", { name = "projector-last" })
    finish(ppid, plog)
  end)

  it("statement and lock timeouts firing in a live projector delay it, never stop it", function()
    local ppid, plog = fm.spawn_projector(w, schema, "run", { statement_timeout = 50 })
    during_writes(2, function()
      fm.lock_now_and_then(w, schema, "rm_fault", "EXCLUSIVE", 4, 0.3, 2)
    end)
    finish(ppid, plog)
    local text = helpers.read_file(plog)
    assert.is_truthy(text:find("55P03", 1, true) or text:find("57014", 1, true), "no timeout fired: " .. text)
  end)

  it("a rebuild killed by a crash leaves the live table as it was; the next one completes", function()
    if not fm.datadir() then pending("the cluster was not started by scripts/pg.sh"); return end
    local pids, logs = writers(2, 30, 100)
    fm.wait_all(pids, logs, 120)
    -- the live table as it stands must outlive the crash: the throwaway
    -- cluster runs with synchronous_commit off, which may lose the last
    -- commits (this catch-up's) it acknowledged
    local durable = assert(es.open(fm.url(), { schema = schema }))
    assert(es.projector(durable, { fm.model("rm_fault") }):catch_up())
    durable:close()
    local before = assert(store:query(('SELECT id, n, last FROM "%s".rm_fault ORDER BY id'):format(schema)))
    local rpid, rlog = fm.spawn_projector(w, schema, "rebuild", { name = "rebuild-1" })
    fm.random_sleep(0.05, 0.3)
    fm.crash_restart()
    assert.is_true(helpers.wait_exit(rpid, 60), helpers.read_file(rlog))
    store:close()
    store = fm.reopen(schema)
    local after = assert(store:query(('SELECT id, n, last FROM "%s".rm_fault ORDER BY id'):format(schema)))
    assert.same(before, after)
    local r2, r2log = fm.spawn_projector(w, schema, "rebuild", { name = "rebuild-2" })
    fm.wait_all({ r2 }, { r2log }, 120)
    fm.assert_acked_once(store, schema, w)
    fm.assert_model_exact(store, schema)
  end)

  it("a rebuild whose swap times out leaves the live table and nothing else; the next one completes", function()
    local pids, logs = writers(2, 20, 100)
    fm.wait_all(pids, logs, 120)
    assert(es.projector(store, { fm.model("rm_fault") }):catch_up())
    local before = assert(store:query(('SELECT id, n, last FROM "%s".rm_fault ORDER BY id'):format(schema)))
    -- a reader holding the live table: the swap's exclusive lock waits, then times out
    local reader = fm.reopen(schema)
    assert(reader:begin())
    assert(reader:query(('SELECT count(*) FROM "%s".rm_fault'):format(schema)))
    local rpid, rlog = fm.spawn_projector(w, schema, "rebuild", { name = "rebuild-1", statement_timeout = 200 })
    assert.is_true(helpers.wait_exit(rpid, 60), helpers.read_file(rlog))
    assert(reader:rollback())
    reader:close()
    local text = helpers.read_file(rlog) or ""
    assert.is_truthy(text:find("55P03", 1, true) or text:find("57014", 1, true), "no timeout fired: " .. text)
    local after = assert(store:query(('SELECT id, n, last FROM "%s".rm_fault ORDER BY id'):format(schema)))
    assert.same(before, after)
    local left = assert(store:query("SELECT count(*) AS n FROM pg_tables WHERE schemaname = $1 "
      .. "AND tablename LIKE '%rebuild%' AND tablename NOT LIKE 'read_model_rebuild%'", schema))
    assert.equal(0, left[1].n, "a shadow table was left behind")
    local markers = assert(store:query(('SELECT count(*) AS n FROM "%s".read_model_rebuilds'):format(schema)))
    assert.equal(0, markers[1].n, "the rebuild's marker was left behind")
    local r2, r2log = fm.spawn_projector(w, schema, "rebuild", { name = "rebuild-2" })
    fm.wait_all({ r2 }, { r2log }, 120)
    fm.assert_model_exact(store, schema)
  end)

  it("behind a long-running transaction readers wait, and skip nothing", function()
    local ppid, plog = fm.spawn_projector(w, schema, "run")
    local long = fm.reopen(schema)
    assert(long:begin())
    -- an id taken now: every later transaction stays beyond the watermark
    assert(long:query("SELECT pg_current_xact_id()"))
    local pids, logs = writers(2, 100, 1)
    fm.wait_all(pids, logs, 120)
    helpers.sleep(0.5)
    local st = assert(es.projector(store, { fm.model("rm_fault") }):status())
    assert.is_true(st[1].lag_events > 0, "the projector read past a running transaction")
    -- and status says who holds it back
    local pid = assert(long:query("SELECT pg_backend_pid() AS pid"))[1].pid
    assert.is_table(st[1].held_by, "status() does not say what holds the readers")
    assert.equal(pid, st[1].held_by.pid)
    assert.is_true(st[1].held_by.seconds >= 0.5)
    local rows = assert(store:query(('SELECT count(*) AS n FROM "%s".rm_fault'):format(schema)))
    assert.equal(0, rows[1].n)
    assert(long:rollback())
    long:close()
    finish(ppid, plog)
  end)
end)
