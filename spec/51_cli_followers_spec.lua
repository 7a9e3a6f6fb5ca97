-- bin/eventsourcing's projection controls that need the follower engine's
-- projector:pause / resume / reset (with state = "paused" in status rows).
local helpers = require "helpers"
local cli = require "cli_helpers"
local es = require "eventsourcing"

local url = helpers.database_url()
local run = cli.run

describe("eventsourcing projections pause | resume | reset", function()
  local w, app, schema, store, def

  before_each(function()
    w = helpers.workdir("es-cli-followers")
    app = cli.notes_app(w.dir)
    schema = helpers.fresh_schema()
    store = assert(es.open(url, { schema = schema }))
    def = assert(dofile(app))
    assert.are.equal(0, run("migrate", { schema = schema, app = app }).code)
    for i = 1, 3 do assert(store:append("Note-" .. (i % 2), { { type = "Noted", data = {} } })) end
  end)

  after_each(function()
    store:close()
    w:remove()
  end)

  local function status()
    return cli.ndjson(run("projections status", { schema = schema, app = app }).stdout)[1]
  end

  local function catch_up()
    return assert(es.projector(store, def.read_models):catch_up())
  end

  it("pause stops a projection until resume", function()
    local r = run("projections pause rm_notes", { schema = schema, app = app })
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("paused", status().state)
    catch_up()
    assert.is_nil(def.read_models[1]:get(store, "1"))
    assert.are.equal(3, status().lag_events)
    r = run("projections resume rm_notes", { schema = schema, app = app })
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("running", status().state)
    catch_up()
    assert.are.equal(2, def.read_models[1]:get(store, "1").n)
    assert.are.equal(0, status().lag_events)
  end)

  it("reset clears the rows and starts again from the first event", function()
    catch_up()
    assert.are.equal(0, status().lag_events)
    local r = run("projections reset rm_notes", { schema = schema, app = app })
    assert.are.equal(0, r.code, r.stderr)
    assert.is_nil(def.read_models[1]:get(store, "1"))
    assert.are.equal(3, status().lag_events)
    catch_up()
    assert.are.equal(2, def.read_models[1]:get(store, "1").n)
    assert.are.equal(1, def.read_models[1]:get(store, "0").n)
  end)

  it("status without --app reads the ledger: the same checkpoint, lag and state", function()
    catch_up()
    assert(store:append("Note-1", { { type = "Noted", data = {} } }))
    assert.are.equal(0, run("projections pause rm_notes", { schema = schema, app = app }).code)
    local r = run("projections status", { schema = schema })
    assert.are.equal(0, r.code, r.stderr)
    local bare, full = cli.ndjson(r.stdout)[1], status()
    assert.are.equal("rm_notes", bare.name)
    assert.are.equal(full.checkpoint, bare.checkpoint)
    assert.are.equal(1, bare.lag_events)
    assert.are.equal(full.lag_events, bare.lag_events)
    assert.are.equal("paused", bare.state)
    -- no runner ever migrated here: a clear error, exit 1
    r = run("workflows status", { schema = schema })
    assert.are.equal(1, r.code)
    assert.matches("has no workflows ledger", r.stderr, 1, true)
    -- the other actions still need the app's definitions
    r = run("projections pause rm_notes", { schema = schema })
    assert.are.equal(2, r.code)
    assert.matches("needs --app", r.stderr, 1, true)
  end)

  it("refuses an unknown name with exit 1 before touching anything", function()
    local r = run("projections pause nope", { schema = schema, app = app })
    assert.are.equal(1, r.code)
    assert.matches("no projection named nope", r.stderr)
    assert.are.equal("running", status().state)
  end)
end)
