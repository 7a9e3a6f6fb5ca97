-- A consumer group on Citus whose partitions are the shards of the events
-- table (docs/scale-out.md): member processes follow while writers append
-- on both workers and a transaction stays open on one of them; one member
-- is killed with kill -9 and another joins. Every event is handled once,
-- each stream in version order. Runs under `make test-citus`.
local helpers = require "helpers"
local es = require "eventsourcing"

local q = helpers.shell_quote

if not helpers.distributed() then
  describe("consumer groups on Citus", function()
    pending("needs a Citus cluster: make test-citus")
  end)
  return
end

local gh = require "group_helpers"
local PROJECTION = gh.PROJECTION

local function member_code(url, schema, stop_file)
  return gh.member_code(url, schema, stop_file, "shards")
end

-- A writer connected to one worker (url): appends go to the stream's
-- worker from there.
local writer_code = gh.writer_code

describe("consumer groups on Citus (partitions are shards)", function()
  local store, schema, work, procs, slow

  before_each(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate(helpers.migrate_opts()))
    work = helpers.workdir("es-cgroup")
    procs = gh.processes(work)
  end)

  after_each(function()
    procs.stop()
    if slow and not slow:is_closed() then pcall(slow.rollback, slow); slow:close() end
    store:close()
    work:remove()
  end)

  local function spawn(...) return procs.spawn(...) end

  local function sql(s, ...) return assert(store:query((s:gsub("<s>", '"' .. schema .. '"')), ...)) end

  local function wait_for(what, fn, seconds)
    gh.wait_for(sql, what, fn, seconds)
  end

  -- The workers' conninfos: the test's own with their ports.
  local function worker_urls()
    local out = {}
    for _, r in ipairs(sql("SELECT nodeport FROM pg_dist_node WHERE groupid <> 0 AND noderole = 'primary' "
        .. "ORDER BY groupid")) do
      out[#out + 1] = (helpers.database_url():gsub("port=%d+", "port=" .. r.nodeport))
    end
    return out
  end

  local function shard_count()
    return sql("SELECT count(*) AS n FROM pg_dist_shard WHERE logicalrelid = '<s>.events'::regclass")[1].n
  end

  it("members, writers on both workers, a slow transaction on one, kill -9 and a join: each event once",
    function()
    local url, stop = helpers.database_url(), work.dir .. "/stop"
    local P = assert(load(PROJECTION:format(schema) .. " return P"))()
    local setup = es.projector(store, { P }, { group = { member = "setup" } })
    assert(setup:migrate())
    local nshards = shard_count()
    assert.equal(nshards, setup.engine.group.partitions)
    local members = {}
    for _, m in ipairs { "m1", "m2" } do
      members[m] = spawn(member_code(url, schema, stop), m, "ES_MEMBER=" .. m)
    end
    wait_for("two owners", function()
      local r = sql("SELECT count(DISTINCT owner) AS n, count(owner) AS o FROM <s>.follower_partitions")
      return r[1].n == 2 and r[1].o == nshards
    end)
    -- a transaction open on one worker: its worker's shards wait for it,
    -- the other worker's go on
    slow = assert(es.open(url, { schema = schema }))
    assert(slow:begin())
    assert(slow:append("G1-slow", { type = "Tick" }))
    local writers, wurls = {}, worker_urls()
    assert.equal(2, #wurls)
    for w = 1, 2 do writers[w] = spawn(writer_code(wurls[w], schema, w, 300), "w" .. w) end
    wait_for("progress beside the slow transaction", function()
      return sql("SELECT count(*) AS n FROM <s>.grp_handled")[1].n > 100
    end)
    assert.equal(0, sql("SELECT count(*) AS n FROM <s>.grp_handled WHERE stream = 'G1-slow'")[1].n)
    assert(helpers.sh("kill -9 " .. members.m2))
    helpers.wait_exit(members.m2, 10)
    members.m3 = spawn(member_code(url, schema, stop), "m3", "ES_MEMBER=m3")
    wait_for("m3 owning partitions", function()
      return sql("SELECT count(*) AS n FROM <s>.follower_partitions WHERE owner = 'm3'")[1].n > 0
    end, 15)
    assert(slow:commit())
    for _, pid in ipairs(writers) do assert.is_true(helpers.wait_exit(pid, 120)) end
    for _, name in ipairs { "w1", "w2" } do
      assert.matches("done", helpers.read_file(work.dir .. "/" .. name .. ".log"))
    end
    local total = sql("SELECT count(*) AS n FROM <s>.events WHERE type = 'Tick'")[1].n
    assert.equal(601, total)
    wait_for("every event handled", function()
      return sql("SELECT count(*) AS n FROM <s>.grp_handled")[1].n >= total
    end, 60)
    helpers.sh("touch " .. q(stop))
    for _, m in ipairs { "m1", "m3" } do assert.is_true(helpers.wait_exit(members[m], 30)) end
    -- exactly once, and in stream order (the projection refuses gaps: no error)
    local r = sql("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM <s>.grp_handled")[1]
    assert.equal(total, r.n)
    assert.equal(total, r.d)
    local handled = {}    -- (a join of distributed and local tables is refused on Citus)
    for _, h in ipairs(sql("SELECT event_id::text AS id FROM <s>.grp_handled")) do handled[h.id] = true end
    for _, e in ipairs(sql("SELECT id::text AS id FROM <s>.events WHERE type = 'Tick'")) do
      assert.is_true(handled[e.id], e.id)
    end
    local checker = es.projector(store, { P }, { group = { member = "checker", ttl = 1.5, heartbeat = 0.2 } })
    local st
    wait_for("the checker caught up alone", function()
      assert.equal(0, (checker:catch_up()))
      st = assert(checker:status())[1]
      return st.lag_events == 0
    end, 15)
    assert.is_nil(st.error, st.error and st.error.message)
    assert.equal(nshards, #st.partitions)
    assert.equal(total, st.handled)
    checker.engine.group:leave()
    local by = {}
    for _, row in ipairs(sql("SELECT member, count(*) AS n FROM <s>.grp_handled GROUP BY member")) do
      by[row.member] = row.n
    end
    assert.is_true((by.m1 or 0) > 0 and (by.m3 or 0) > 0, es.json.encode(by))
  end)

  it("reports lag per shard, stops only the failing partition and refuses hash partitions", function()
    local broken = true
    local P = es.projection { name = "grp_fail",
      migrate = function(tx)
        tx:execute(('CREATE TABLE IF NOT EXISTS "%s".grp_seen (event_id uuid)'):format(schema))
      end,
      on = { Tick = function(e, tx)
        if broken and e.stream == "Bad-1" then error("handler exploded") end
        tx:execute(('INSERT INTO "%s".grp_seen VALUES ($1)'):format(schema), e.id)
      end } }
    local p = es.projector(store, { P }, { group = { member = "solo", heartbeat = 0.05 } })
    for i = 1, 20 do assert(store:append("S-" .. i, { { type = "Tick" }, { type = "Tick" } })) end
    assert(store:append("Bad-1", { type = "Tick" }))
    local st = assert(p:status())[1]
    assert.equal(41, st.lag_events)
    assert(p:catch_up())
    st = assert(p:status())[1]
    assert.equal("failed", st.status)
    assert.equal(1, st.lag_events)            -- only Bad-1's shard waits
    assert.equal(40, st.handled)
    local failed = 0
    for _, part in ipairs(st.partitions) do if part.error then failed = failed + 1 end end
    assert.equal(1, failed)
    broken = false
    assert(p:retry("grp_fail"))
    assert(p:catch_up())
    st = assert(p:status())[1]
    assert.equal(0, st.lag_events)
    local r = sql("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM <s>.grp_seen")[1]
    assert.equal(41, r.n)
    assert.equal(41, r.d)
    local ok, err = pcall(es.projector, store, { P }, { group = { partitions = 8 } })
    assert.is_false(ok)
    assert.matches("shards", tostring(err))
  end)

  it("runs workflow runners as a group too, and resets every partition to the end of the log", function()
    local seen = {}
    local wf = es.workflow { name = "wf-cgroup", category = "T", on = { Tick = function(e)
      seen[e.id] = (seen[e.id] or 0) + 1
    end } }
    local other = assert(es.open(helpers.database_url(), { schema = schema }))
    local r1 = es.workflow.runner(store, { wf }, { group = { member = "a", heartbeat = 0.05 } })
    local r2 = es.workflow.runner(other, { wf }, { group = { member = "b", heartbeat = 0.05 } })
    for i = 1, 40 do assert(store:append("T-" .. i, { { type = "Tick" }, { type = "Tick" } })) end
    for i = 1, 10 do assert(store:append("U-" .. i, { type = "Tick" })) end   -- another category
    assert(r1:catch_up())
    assert(r2:catch_up())
    helpers.sleep(0.1)
    assert(r1:catch_up())      -- r1 hands b's share over, r2 takes it
    helpers.sleep(0.1)
    assert(r2:catch_up())
    assert(r1:catch_up())
    local count = 0
    for _, c in pairs(seen) do assert.equal(1, c); count = count + 1 end
    assert.equal(80, count)
    local st = assert(r1:status())[1]
    assert.equal(0, st.lag_events)
    -- a checkpoint of all shards given to every partition: each keeps its own
    assert(r1:reset("wf-cgroup", { checkpoint = assert(es.workflow.end_checkpoint(store)) }))
    for i = 41, 50 do assert(store:append("T-" .. i, { type = "Tick" })) end
    seen = {}
    local n1 = assert(r1:catch_up())
    local n2 = assert(r2:catch_up())
    helpers.sleep(0.1)
    n1 = n1 + assert(r1:catch_up())
    n2 = n2 + assert(r2:catch_up())
    assert.equal(10, n1 + n2)
    count = 0
    for _, c in pairs(seen) do assert.equal(1, c); count = count + 1 end
    assert.equal(10, count)
    assert.equal(0, assert(r2:status())[1].lag_events)
    other:close()
  end)
end)
