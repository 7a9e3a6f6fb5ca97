-- Consumer groups: a projector run as N member processes, each taking its
-- share of the partitions. Three members follow while writers append; one
-- is killed with kill -9, another joins: every event is handled exactly
-- once and in stream order, and the dead member's partitions move on.
local helpers = require "helpers"
local es = require "eventsourcing"

local q = helpers.shell_quote

local gh = require "group_helpers"
local PROJECTION = gh.PROJECTION

local function member_code(schema, stop_file)
  return gh.member_code(helpers.database_url(), schema, stop_file, 8)
end

local function writer_code(schema, w, n)
  return gh.writer_code(helpers.database_url(), schema, w, n)
end

describe("consumer groups (processes, PostgreSQL)", function()
  local store, schema, work, procs
  before_each(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    assert(store:migrate())
    work = helpers.workdir("es-group")
    procs = gh.processes(work)
  end)
  after_each(function()
    procs.stop()
    store:close()
    work:remove()
  end)
  local function spawn(...) return procs.spawn(...) end

  local function sql(s) return assert(store:query((s:gsub("<s>", '"' .. schema .. '"')))) end

  local function owners()
    local out = {}
    for _, r in ipairs(sql("SELECT part, owner FROM <s>.follower_partitions ORDER BY part")) do
      out[#out + 1] = r.owner or "-"
    end
    return table.concat(out, " ")
  end

  local function wait_for(what, fn, seconds)
    gh.wait_for(sql, what, fn, seconds, function() return "owners: " .. owners() end)
  end

  it("3 members with writers, one killed -9 and one joining: each event once, in stream order", function()
    local stop = work.dir .. "/stop"
    local P = assert(load(PROJECTION:format(schema) .. " return P"))()
    assert(es.projector(store, { P }, { group = { partitions = 8, member = "setup" } }):migrate())
    local members = {}
    for _, m in ipairs { "m1", "m2", "m3" } do
      members[m] = spawn(member_code(schema, stop), m, "ES_MEMBER=" .. m)
    end
    -- every member holds a share before the writers start
    wait_for("three owners", function()
      local r = sql("SELECT count(DISTINCT owner) AS n, count(owner) AS o FROM <s>.follower_partitions")
      return #r > 0 and r[1].n == 3 and r[1].o == 8
    end)
    local writers = {}
    for w = 1, 2 do writers[w] = spawn(writer_code(schema, w, 300), "w" .. w) end
    wait_for("some progress", function()
      return sql("SELECT count(*) AS n FROM <s>.grp_handled")[1].n > 100
    end)
    -- kill -9 one member mid-stream: its partitions go to the others
    assert(helpers.sh("kill -9 " .. members.m2))
    helpers.wait_exit(members.m2, 10)
    wait_for("m2's partitions taken over", function()
      local r = sql("SELECT count(*) AS n FROM <s>.follower_partitions WHERE owner IS NULL OR owner = 'm2'")
      return r[1].n == 0
    end, 15)
    -- a new member joins: it gets a share
    members.m4 = spawn(member_code(schema, stop), "m4", "ES_MEMBER=m4")
    wait_for("m4 owning partitions", function()
      return sql("SELECT count(*) AS n FROM <s>.follower_partitions WHERE owner = 'm4'")[1].n > 0
    end, 15)
    for _, pid in ipairs(writers) do assert.is_true(helpers.wait_exit(pid, 120)) end
    -- a second wave, with m4 in the group
    for w = 1, 2 do writers[w] = spawn(writer_code(schema, w, 200), "v" .. w) end
    for _, pid in ipairs(writers) do assert.is_true(helpers.wait_exit(pid, 120)) end
    for _, name in ipairs { "w1", "w2", "v1", "v2" } do
      assert.matches("done", helpers.read_file(work.dir .. "/" .. name .. ".log"))
    end
    local total = sql("SELECT count(*) AS n FROM <s>.events WHERE type = 'Tick'")[1].n
    assert.equal(1000, total)
    wait_for("every event handled", function()
      return sql("SELECT count(*) AS n FROM <s>.grp_handled")[1].n >= total
    end, 60)
    helpers.sh("touch " .. q(stop))
    for _, m in ipairs { "m1", "m3", "m4" } do assert.is_true(helpers.wait_exit(members[m], 30)) end
    -- exactly once
    local r = sql("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM <s>.grp_handled")[1]
    assert.equal(total, r.n)
    assert.equal(total, r.d)
    local missing = sql("SELECT count(*) AS n FROM <s>.events e WHERE e.type = 'Tick' AND NOT EXISTS "
      .. "(SELECT 1 FROM <s>.grp_handled h WHERE h.event_id = e.id)")[1].n
    assert.equal(0, missing)
    -- in stream order: the projection refused any gap, so no error is recorded
    -- a member alone takes every partition the others released, and steps
    -- its checkpoints over the rest of the log (other types only)
    local checker = es.projector(store, { P },
      { group = { partitions = 8, member = "checker", ttl = 1.5, heartbeat = 0.2 } })
    local st
    wait_for("the checker caught up alone", function()
      assert.equal(0, (checker:catch_up()))
      st = assert(checker:status())[1]
      return st.lag_events == 0
    end, 15)
    assert.is_nil(st.error, st.error and st.error.message)
    assert.equal(0, st.lag_events)
    assert.equal(8, #st.partitions)
    assert.equal(total, st.handled)
    checker.engine.group:leave()
    -- the work was shared: the survivors and the newcomer all handled events
    local by = {}
    for _, row in ipairs(sql("SELECT member, count(*) AS n FROM <s>.grp_handled GROUP BY member")) do
      by[row.member] = row.n
    end
    assert.is_true((by.m1 or 0) > 0 and (by.m3 or 0) > 0 and (by.m4 or 0) > 0,
      "members: " .. require("eventsourcing").json.encode(by))
    -- members that stopped left the group and released their partitions
    assert.equal(0, sql("SELECT count(*) AS n FROM <s>.follower_partitions WHERE owner IS NOT NULL")[1].n)
  end)

  it("runs workflow runners as a group too: each event handled once across members", function()
    local seen = {}
    local wf = es.workflow { name = "wf-group", category = "T", on = { Tick = function(e)
      seen[e.id] = (seen[e.id] or 0) + 1
    end } }
    local other = assert(es.open(helpers.database_url(), { schema = schema }))
    local r1 = es.workflow.runner(store, { wf }, { group = { partitions = 4, member = "a", heartbeat = 0.05 } })
    local r2 = es.workflow.runner(other, { wf }, { group = { partitions = 4, member = "b", heartbeat = 0.05 } })
    for i = 1, 40 do assert(store:append("T-" .. i, { { type = "Tick" }, { type = "Tick" } })) end
    assert(r1:catch_up())
    assert(r2:catch_up())
    helpers.sleep(0.1)
    assert(r1:catch_up())      -- r1 hands b's share over, r2 takes it
    helpers.sleep(0.1)
    assert(r2:catch_up())
    for i = 41, 60 do assert(store:append("T-" .. i, { type = "Tick" })) end
    for i = 1, 10 do assert(store:append("U-" .. i, { type = "Tick" })) end   -- another category
    helpers.sleep(0.1)
    local n1 = assert(r1:catch_up())
    local n2 = assert(r2:catch_up())
    assert.is_true(n1 > 0 and n2 > 0, ("shared: %d and %d"):format(n1, n2))
    local count = 0
    for _, c in pairs(seen) do
      assert.equal(1, c)
      count = count + 1
    end
    assert.equal(100, count)
    local st = assert(r1:status())[1]
    assert.equal(0, st.lag_events)
    assert.equal(100, st.handled)
    other:close()
  end)

  it("keeps projectors of different read models in different groups by default", function()
    local function counter(name)
      return es.read_model { name = name, columns = { id = "text", n = "bigint" },
        on = { Tick = function(row) row.n = (row.n or 0) + 1 end } }
    end
    local a, b = counter("rm_ga"), counter("rm_gb")
    local other = assert(es.open(helpers.database_url(), { schema = schema }))
    local pa = es.projector(store, { a }, { group = { partitions = 4, member = "x" } })
    local pb = es.projector(other, { b }, { group = { partitions = 4, member = "y" } })
    for i = 1, 12 do assert(store:append("S-" .. i, { type = "Tick" })) end
    -- one group would rank x and y together and leave half of each unread
    assert.equal(12, (pa:catch_up()))
    assert.equal(12, (pb:catch_up()))
    assert.not_equal(pa.engine.group.name, pb.engine.group.name)
    other:close()
  end)

  it("stops a read model's partition at a failing event in mid-batch; the others go on", function()
    local bad = "S-7"
    local rm = es.read_model { name = "rm_gfail", columns = { id = "text", n = "bigint" },
      on = { Tick = function(row, e)
        if e.stream == bad and e.version == 2 then error("tick refused") end
        row.n = (row.n or 0) + 1
      end } }
    for _ = 1, 3 do
      for i = 1, 12 do assert(store:append("S-" .. i, { type = "Tick" })) end
    end
    local all = assert(store:read_all({ limit = 100, partitions = 4, partition = { 0, 1, 2, 3 } }))
    local part_of = {}
    for _, e in ipairs(all) do part_of[e.stream] = e.part end
    local p = es.projector(store, { rm }, { batch_size = 1000, group = { partitions = 4, member = "m" } })
    assert(p:catch_up())
    local n = {}
    for _, r in ipairs(assert(store:query(('SELECT id, n FROM "%s".rm_gfail'):format(schema)))) do
      n[r.id] = r.n
    end
    assert.equal(1, n["7"])
    for i = 1, 12 do
      -- streams of the failed partition stop where the failing event stood
      if part_of["S-" .. i] ~= part_of[bad] then assert.equal(3, n[tostring(i)], "S-" .. i) end
    end
    local failed = assert(store:query(('SELECT name, error FROM "%s".projections WHERE name LIKE '
      .. "'rm_gfail/%%' AND error IS NOT NULL"):format(schema)))
    assert.equal(1, #failed)
    assert.equal("rm_gfail/" .. part_of[bad], failed[1].name)
    assert.matches("tick refused", failed[1].error.message)
    assert.equal(2, failed[1].error.version)
  end)

  it("refuses a different partition count for an existing group, and memory stores", function()
    local P = assert(load(PROJECTION:format(schema) .. " return P"))()
    assert(es.projector(store, { P }, { group = { partitions = 8, member = "a" } }):migrate())
    local ok, err = es.projector(store, { P }, { group = { partitions = 4, member = "b" } }):migrate()
    assert.is_nil(ok)
    assert.matches("8 partitions", tostring(err))
    assert.has_error(function()
      es.projector(assert(es.open("memory:")), { P }, { group = { partitions = 2 } })
    end)
    assert.has_error(function() es.projector(store, { P }, { group = { partitions = 0 } }) end)
  end)
end)
