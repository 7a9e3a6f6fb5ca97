-- bin/eventsourcing as a process against the throwaway PostgreSQL: output,
-- exit codes (0 success, 1 failure, 2 usage), one-line errors, backups.
local helpers = require "helpers"
local cli = require "cli_helpers"
local es = require "eventsourcing"

local json = es.json
local url = helpers.database_url()
local run = cli.run

-- A schema with some orders (through the service, tables by es.migrate).
local function orders_schema(n)
  local schema = helpers.fresh_schema()
  local store = assert(es.open(url, { schema = schema }))
  assert(es.migrate(store, cli.app()))
  local svc = require("orders.service").new(store)
  local ids = {}
  for i = 1, n or 4 do
    local id = assert(svc:create_order({ customer_id = "c" .. (i % 2) }))
    assert(svc:add_item { order_id = id, product_id = "p1", quantity = i, unit_price = 250 })
    if i % 2 == 0 then assert(svc:place_order { order_id = id }) end
    ids[i] = id
  end
  return schema, store, ids
end

local function all_events(store)
  local out, after = {}, nil
  repeat
    local batch, cp = assert(store:read_all({ after = after, limit = 1000 }))
    for _, e in ipairs(batch) do
      out[#out + 1] = json.encode({ e.id, e.stream, e.version, e.type, e.data, e.metadata, e.recorded_at })
    end
    after = cp
  until #batch == 0
  return out
end

describe("eventsourcing (command line)", function()
  it("prints help for itself and every command, exit 0", function()
    local commands = { "", "migrate", "stats", "streams", "read", "tail", "export", "import", "verify",
      "projections", "workflows" }
    for _, a in ipairs { "list", "status", "rebuild", "reset", "pause", "resume", "retry" } do
      commands[#commands + 1] = "projections " .. a
    end
    for _, a in ipairs { "status", "dead-letters", "retry", "discard", "timers" } do
      commands[#commands + 1] = "workflows " .. a
    end
    for _, c in ipairs(commands) do
      local args = c .. " --help"
      local r = run(args)
      assert.are.equal(0, r.code, args)
      assert.matches("Usage: eventsourcing " .. c, r.stdout, 1, true)
    end
  end)

  it("runs once installed by make install, away from the checkout", function()
    local w = helpers.workdir("es-cli-install")
    local dest = w.dir .. "/root"
    assert.is_true(helpers.sh(("make -s install DESTDIR=%s PREFIX=/usr >%s/make.log 2>&1")
      :format(dest, w.dir)), helpers.read_file(w.dir .. "/make.log"))
    local schema = orders_schema(1)
    local cmd = ("cd / && env LUA_PATH=%s LUA_CPATH=%s lua5.4 %s/usr/bin/eventsourcing --db %s --schema %s "
      .. "streams 2>&1; echo $?"):format(
      helpers.shell_quote(dest .. "/usr/share/lua/5.4/?.lua;" .. dest .. "/usr/share/lua/5.4/?/init.lua;;"),
      helpers.shell_quote(dest .. "/usr/lib/lua/5.4/?.so;;"), dest, helpers.shell_quote(url), schema)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    assert.matches('"stream":"Order%-', out)
    assert.matches("\n0\n$", out)
    w:remove()
  end)

  it("answers usage errors with exit 2 and one line, never a traceback", function()
    for _, args in ipairs { "", "read", "frobnicate", "streams --limit x", "read S --at yesterday",
                            "--schema 'Bad-Name' stats" } do
      local r = run(args, { db = url })
      assert.are.equal(2, r.code, args)
      assert.are.equal(1, cli.lines(r.stderr), args .. ": " .. r.stderr)
      assert.matches("^eventsourcing: ", r.stderr)
      assert.is_nil(r.stderr:find("traceback", 1, true))
    end
    local r = run("stats", { db = false })
    assert.are.equal(2, r.code)
    assert.matches("ES_DATABASE_URL", r.stderr)
  end)

  it("fails with exit 1 and one line when the database cannot be reached", function()
    local r = run("stats", { db = "host=/nonexistent dbname=x connect_timeout=2" })
    assert.are.equal(1, r.code)
    assert.are.equal(1, cli.lines(r.stderr))
    assert.matches("connection", r.stderr)
  end)

  it("migrate --app creates the app's tables; the missing-table error names es.migrate", function()
    local schema = helpers.fresh_schema()
    local store = assert(es.open(url, { schema = schema }))
    assert(store:migrate())
    local svc = require("orders.service").new(store)
    local id, err = svc:create_order({ customer_id = "c1" })
    assert.is_nil(id)
    assert.matches("es.migrate(store, app)", err.message, 1, true)
    local r = run("migrate --json", { schema = schema, app = true })
    assert.are.equal(0, r.code, r.stderr)
    local out = json.decode(r.stdout)
    assert.are.same({ "rm_orders" }, out.read_models)
    assert.are.same({ "order-fulfilment" }, out.workflows)
    assert.truthy(svc:create_order({ customer_id = "c1" }))
    assert.are.equal(0, run("migrate", { schema = schema, app = true }).code)   -- idempotent
  end)

  it("stats, streams, read and tail print NDJSON when piped", function()
    local schema, store, ids = orders_schema(4)
    local r = run("stats", { schema = schema })
    assert.are.equal(0, r.code, r.stderr)
    local s = json.decode(r.stdout)
    assert.are.equal(10, s.events)
    assert.are.equal(4, s.streams)
    assert.are.equal("Order", s.categories[1].category)
    assert.is_true(s.size_bytes > 0)
    r = run("streams --category Order --limit 3", { schema = schema })
    assert.are.equal(3, cli.lines(r.stdout))
    r = run("read Order-" .. ids[2] .. " --backward", { schema = schema })
    local evs = cli.ndjson(r.stdout)
    assert.are.same({ 3, 2, 1 }, { evs[1].version, evs[2].version, evs[3].version })
    assert.are.equal("OrderPlaced", evs[1].type)
    r = run("read Order-" .. ids[2] .. " --from 2 --to 2", { schema = schema })
    assert.are.equal("ItemAdded", cli.ndjson(r.stdout)[1].type)
    local first = evs[3].recorded_at
    r = run("read Order-" .. ids[2] .. " --at " .. first, { schema = schema })
    assert.are.equal(0, cli.lines(r.stdout))          -- nothing recorded before the first event
    r = run("read Order-nope", { schema = schema })
    assert.are.equal(1, r.code)
    assert.matches("does not exist", r.stderr)
    r = run("tail --limit 3", { schema = schema })
    evs = cli.ndjson(r.stdout)
    assert.are.equal(3, #evs)
    assert.are.equal(store:version("Order-" .. ids[4]), evs[3].version)
    r = run("tail --type OrderPlaced", { schema = schema })
    assert.are.equal(2, #cli.ndjson(r.stdout))
  end)

  it("prints aligned tables on a terminal", function()
    local schema, _, ids = orders_schema(2)
    local r = cli.run_tty("read Order-" .. ids[1], { schema = schema })
    local header = r.stdout:match("^[^\r\n]+")
    assert.matches("^POSITION%s+STREAM%s+VERSION%s+TYPE", header)
    local col = header:find("TYPE", 1, true)
    for line in r.stdout:gmatch("[^\r\n]+") do
      if not line:find("POSITION", 1, true) then
        assert.matches("^%u", line:sub(col))    -- every type starts under TYPE
      end
    end
  end)

  it("tail --follow prints events as they are committed until interrupted", function()
    local schema, store = orders_schema(1)
    local w = helpers.workdir("es-cli-follow")
    local proc = cli.spawn("tail --follow --poll 0.05 --limit 1", { schema = schema }, w.dir)
    local ok = cli.wait_for(function() return cli.lines(helpers.read_file(proc.out) or "") >= 1 end, 10)
    assert.is_true(ok, "the last event never came")
    assert(store:append("Note-1", { { type = "Noted", data = { n = 1 } } }))
    assert(store:append("Note-1", { { type = "Noted", data = { n = 2 } } }))
    ok = cli.wait_for(function() return cli.lines(helpers.read_file(proc.out) or "") >= 3 end, 10)
    assert.is_true(ok, "followed events never came: " .. tostring(helpers.read_file(proc.out)))
    local code = proc:interrupt()
    local evs = cli.ndjson(helpers.read_file(proc.out))
    assert.are.same({ 1, 2 }, { evs[2].data.n, evs[3].data.n })
    assert.are.equal(0, code, helpers.read_file(proc.err))
    w:remove()
  end)

  describe("export and import", function()
    it("copy every event between schemas: identical read_all, idempotent", function()
      local a, sa = orders_schema(5)
      local w = helpers.workdir("es-cli-export")
      local file = w.dir .. "/backup.ndjson"
      local r = run("export", { schema = a, stdout = file })
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("exported 12 events", r.stderr)
      local b = helpers.fresh_schema()
      assert.are.equal(0, run("migrate", { schema = b }).code)
      r = run("import --json", { schema = b, stdin = file })
      assert.are.equal(0, r.code, r.stderr)
      assert.are.same({ lines = 12, imported = 12, present = 0 }, json.decode(r.stdout))
      local sb = assert(es.open(url, { schema = b }))
      local before = all_events(sb)
      assert.are.same(all_events(sa), before)
      r = run("import --json", { schema = b, stdin = file })
      assert.are.same({ lines = 12, imported = 0, present = 12 }, json.decode(r.stdout))
      assert.are.same(before, all_events(sb))
      -- the stored JSON text comes back byte for byte
      local r2 = run("export", { schema = b })
      assert.are.equal(cli.strip_positions(helpers.read_file(file)), cli.strip_positions(r2.stdout))
      w:remove()
    end)

    it("export --category and --after select events; a bad checkpoint is refused", function()
      local a, sa = orders_schema(2)
      assert(sa:append("Note-1", { { type = "Noted", data = {} } }))
      local r = run("export --category Note", { schema = a })
      assert.are.equal(1, cli.lines(r.stdout))
      local lines = cli.ndjson(run("export", { schema = a }).stdout)
      r = run("export --after " .. lines[#lines - 1].checkpoint, { schema = a })
      assert.are.equal(lines[#lines].id, cli.ndjson(r.stdout)[1].id)
      r = run("export --after yesterday", { schema = a })
      assert.are.equal(1, r.code)
      assert.matches("checkpoint", r.stderr)
    end)

    it("stops at a stream whose versions disagree and imports nothing of it", function()
      local a = orders_schema(2)
      local w = helpers.workdir("es-cli-import")
      local file = w.dir .. "/backup.ndjson"
      run("export", { schema = a, stdout = file })
      local b = helpers.fresh_schema()
      local sb = assert(es.open(url, { schema = b }))
      assert(sb:migrate())
      local first = cli.ndjson(helpers.read_file(file))[1]
      assert(sb:append(first.stream, { { type = "Other", data = {} } }))   -- version 1, another id
      local r = run("import", { schema = b, stdin = file })
      assert.are.equal(1, r.code)
      assert.are.equal(1, cli.lines(r.stderr))
      assert.matches("disagree", r.stderr)
      assert.are.equal(1, sb:version(first.stream))
      assert.are.equal(1, #all_events(sb))               -- nothing else either: one transaction
      -- a line that is not an event: also nothing imported, line number given
      local bad = w.dir .. "/bad.ndjson"
      local f = assert(io.open(bad, "w"))
      f:write(helpers.read_file(file), '{"id":"x"}\n')
      f:close()
      local c = helpers.fresh_schema()
      assert.are.equal(0, run("migrate", { schema = c }).code)
      r = run("import", { schema = c, stdin = bad })
      assert.are.equal(1, r.code)
      assert.matches("line %d+: id must be a UUID", r.stderr)
      assert.are.equal(0, #all_events(assert(es.open(url, { schema = c }))))
      w:remove()
    end)

    it("refuses an id the store has elsewhere, and \\u0000, naming the line", function()
      local a = orders_schema(1)
      local lines = cli.ndjson(run("export", { schema = a }).stdout)
      local b = helpers.fresh_schema()
      local sb = assert(es.open(url, { schema = b }))
      assert(sb:migrate())
      assert(sb:append("Elsewhere-1", { { id = lines[2].id, type = "Other", data = {} } }))
      local w = helpers.workdir("es-cli-ids")
      local file = w.dir .. "/backup.ndjson"
      run("export", { schema = a, stdout = file })
      local r = run("import", { schema = b, stdin = file })
      assert.are.equal(1, r.code)
      assert.matches("line 2: event id " .. lines[2].id .. " is already stream Elsewhere-1 version 1",
        r.stderr, 1, true)
      assert.are.equal(0, sb:version(lines[1].stream))
      local f = assert(io.open(file, "w"))
      f:write('{"id":"01a22963-115b-794a-9814-11c617abf2fc","stream":"S-1","version":1,"type":"T",'
        .. '"data":{"x":"a\\u0000b"},"metadata":{},"recorded_at":"2026-01-01T00:00:00Z"}\n')
      f:close()
      r = run("import", { schema = b, stdin = file })
      assert.are.equal(1, r.code)
      assert.matches("line 1: \\u0000 cannot be stored", r.stderr, 1, true)
      w:remove()
    end)
  end)

  describe("verify", function()
    it("passes on a sound store and reports each broken invariant with exit 1", function()
      local a, sa, ids = orders_schema(3)
      local r = run("verify --app " .. cli.app_path(), { schema = a })
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      assert.are.equal(5, cli.lines(r.stdout))
      assert(sa:query(('UPDATE "%s".rm_orders SET total = 1 WHERE id = $1'):format(a), ids[1]))
      assert(sa:query(('UPDATE "%s".events SET category = \'Wrong\' WHERE stream = $1 AND version = 2'):format(a),
        "Order-" .. ids[2]))
      r = run("verify --app " .. cli.app_path(), { schema = a })
      assert.are.equal(1, r.code)
      local failed = {}
      for _, c in ipairs(cli.ndjson(r.stdout)) do
        if not c.ok then failed[c.name] = table.concat(c.problems, "\n") end
      end
      assert.matches(("stream Order-%s version 2: category \"Wrong\""):format(ids[2]),
        failed["categories agree with the stream names"], 1, true)
      assert.matches(ids[1] .. ": total: table 1, rebuild 250",
        failed["read model rm_orders equals a rebuild"], 1, true)
      assert.is_nil(failed["dense versions per stream"])
      -- the scratch table is gone
      local left = assert(sa:query("SELECT count(*) AS n FROM pg_tables WHERE schemaname = $1 "
        .. "AND tablename LIKE '%verify%'", a))
      assert.are.equal(0, left[1].n)
    end)

    it("passes on a read model kept inline that was rebuilt and written past its checkpoint", function()
      local a, sa, ids = orders_schema(2)
      local r = run("projections rebuild rm_orders --app " .. cli.app_path(), { schema = a })
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      -- inline commands after the rebuild moved the checkpoint
      local svc = require("orders.service").new(sa)
      local id = assert(svc:create_order({ customer_id = "c9" }))
      assert(svc:add_item { order_id = id, product_id = "p2", quantity = 3, unit_price = 10 })
      assert(svc:add_item { order_id = ids[1], product_id = "p3", quantity = 1, unit_price = 5 })
      r = run("verify --app " .. cli.app_path(), { schema = a })
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      -- a broken row still fails, against both bases
      assert(sa:query(('UPDATE "%s".rm_orders SET total = 1 WHERE id = $1'):format(a), id))
      r = run("verify --app " .. cli.app_path(), { schema = a })
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      assert.matches("nor does it equal a replay of the whole log", r.stdout, 1, true)
    end)

    it("finds a gap in a stream's versions", function()
      local a, sa, ids = orders_schema(1)
      assert(sa:query(('DELETE FROM "%s".events WHERE stream = $1 AND version = 1'):format(a), "Order-" .. ids[1]))
      local r = cli.run_tty("verify", { schema = a })
      assert.are.equal(1, r.code)
      assert.matches("FAIL  dense versions per stream", r.stdout, 1, true)
      assert.matches("1 events with versions 2..2", r.stdout, 1, true)
    end)
  end)

  describe("projections", function()
    it("status and rebuild with plain progress lines when not on a terminal", function()
      local a = orders_schema(3)
      local r = run("projections status", { schema = a, app = true })
      assert.are.equal(0, r.code, r.stderr)
      local st = cli.ndjson(r.stdout)[1]
      assert.are.equal("rm_orders", st.name)
      assert.are.equal("running", st.state)
      assert.are.equal(7, st.lag_events)
      r = run("projections rebuild rm_orders", { schema = a, app = true })
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("rebuild rm_orders: 7/7 events", r.stderr, 1, true)
      assert.is_nil(r.stderr:find("\r", 1, true))
      assert.are.equal(7, json.decode(r.stdout).events)
      st = cli.ndjson(run("projections status", { schema = a, app = true }).stdout)[1]
      assert.are.equal(0, st.lag_events)
      r = run("projections rebuild nope", { schema = a, app = true })
      assert.are.equal(1, r.code)
      assert.matches("no projection named nope %(the app has: rm_orders%)", r.stderr)
      r = run("projections list", { schema = a })
      assert.are.equal(2, r.code)
      assert.matches("needs --app FILE", r.stderr, 1, true)
    end)

    it("draws a bar on a terminal", function()
      local a = orders_schema(2)
      local r = cli.run_tty("projections rebuild rm_orders", { schema = a, app = true })
      assert.are.equal(0, r.code)
      assert.matches("rebuild rm_orders %[#+%] 100%% 5/5 events", r.stdout)
    end)
  end)

  describe("workflows", function()
    it("lists, retries and discards dead letters, lists timers", function()
      local w = helpers.workdir("es-cli-wf")
      local flag = w.dir .. "/fail"
      local app = cli.failing_app(w.dir, flag)
      local schema = helpers.fresh_schema()
      local store = assert(es.open(url, { schema = schema }))
      local def = assert(dofile(app))
      assert(es.migrate(store, def))
      helpers.sh("touch " .. flag)
      assert(store:append("Job-1", { { type = "JobPosted", data = {} } }))
      assert(store:append("Job-2", { { type = "JobPosted", data = {} } }))
      local runner = es.workflow.runner(store, def.workflows, { aggregates = def.aggregates,
        max_attempts = 1, backoff = 0 })
      assert(runner:catch_up())
      local r = run("workflows dead-letters", { schema = schema })
      local dls = cli.ndjson(r.stdout)
      assert.are.equal(2, #dls)
      assert.are.equal("jobs", dls[1].workflow)
      assert.matches("refusing on purpose", dls[1].error)
      os.remove(flag)
      r = run("workflows retry " .. dls[1].event_id, { schema = schema, app = app })
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal(1, store:version("Done-Job-1"))
      r = run("workflows discard " .. dls[2].event_id, { schema = schema })
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal(0, cli.lines(run("workflows dead-letters", { schema = schema }).stdout))
      assert.are.equal(0, store:version("Done-Job-2"))
      r = run("workflows discard " .. dls[2].event_id, { schema = schema })
      assert.are.equal(1, r.code)
      assert.matches("no dead letter with id", r.stderr)
      r = run("workflows timers", { schema = schema })
      local timers = cli.ndjson(r.stdout)
      assert.are.equal(1, #timers)
      assert.are.equal("remind:Job-1", timers[1].key)
      r = run("workflows status", { schema = schema, app = app })
      local st = cli.ndjson(r.stdout)[1]
      assert.are.equal("jobs", st.name)
      assert.are.equal(0, st.dead_letters)
      w:remove()
    end)

    it("retries a timer's dead letter by putting the timer back, due now", function()
      local w = helpers.workdir("es-cli-timer")
      local flag = w.dir .. "/fail"
      local app = cli.timer_app(w.dir, flag)
      local schema = helpers.fresh_schema()
      local store = assert(es.open(url, { schema = schema }))
      local def = assert(dofile(app))
      assert(es.migrate(store, def))
      helpers.sh("touch " .. flag)
      assert(store:append("Job-1", { { type = "JobPosted", data = {} } }))
      local runner = es.workflow.runner(store, def.workflows, { aggregates = def.aggregates,
        max_attempts = 1, backoff = 0 })
      assert(runner:catch_up())
      assert(runner:run_timers())
      local dls = cli.ndjson(run("workflows dead-letters later", { schema = schema }).stdout)
      assert.are.equal(1, #dls)
      assert.matches("timer refusing on purpose", dls[1].error)
      assert.are.equal(0, cli.lines(run("workflows timers", { schema = schema }).stdout))
      os.remove(flag)
      local r = run("workflows retry " .. dls[1].event_id, { schema = schema, app = app })
      assert.are.equal(0, r.code, r.stderr)
      local timers = cli.ndjson(run("workflows timers", { schema = schema }).stdout)
      assert.are.equal("go:Job-1", timers[1].key)
      assert.are.equal(0, cli.lines(run("workflows dead-letters", { schema = schema }).stdout))
      assert.are.equal(1, runner:run_timers())
      assert.are.equal(1, store:version("Flaky-Job-1"))
      w:remove()
    end)
  end)
end)
