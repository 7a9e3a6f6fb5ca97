-- Failure paths of the Lua layer: every begun transaction ends, passing
-- database refusals are retried rather than stopping a projection, and the
-- memory store refuses or records exactly what PostgreSQL would.
local helpers = require "helpers"
local es = require "eventsourcing"

local function counter(on_extra)
  local on = { Inc = function(row) row.n = (row.n or 0) + 1 end }
  for k, f in pairs(on_extra or {}) do on[k] = f end
  return es.read_model { name = "rm_fp", columns = { id = "text", n = "bigint" }, on = on }
end

local Thing = es.aggregate {
  name = "Thing",
  initial = function() return { n = 0 } end,
  apply = { Inc = function(s) s.n = s.n + 1 end, Poison = function() end },
  decide = {
    Inc = function() return { type = "Inc" } end,
    Poison = function() return { type = "Poison" } end,
    Nothing = function() return nil end,
  },
}

for _, entry in ipairs(helpers.stores()) do
  describe("failure paths (" .. entry.name .. ")", function()
    local store
    before_each(function() store = helpers.open(entry) end)
    after_each(function() store:close() end)

    it("records a row that cannot be stored as the projection's failure, and the store goes on", function()
      local rm = counter { Poison = function(row) row.n = 0 / 0 end }
      local p = es.projector(store, { rm })
      assert(p:migrate())
      assert(store:append("Thing-1", { { type = "Inc" }, { type = "Poison" }, { type = "Inc" } }))
      p:catch_up()
      local st = assert(p:status())[1]
      assert.truthy(st.error, "the failure is recorded")
      assert.equal("Poison", st.error.type)
      assert.equal(1, assert(rm:get(store, "1")).n)       -- the event before it is applied
      -- nothing was left open: the store takes new work at once
      assert(store:append("Thing-2", { type = "Inc" }))
      if store:kind() == "postgresql" then assert(store:begin()); assert(store:commit()) end
    end)

    it("a repository whose inline read model refuses a row stores nothing and goes on", function()
      local rm = counter { Poison = function(row) row.n = 0 / 0 end }
      if store:kind() == "postgresql" then assert(rm:migrate(store)) end
      local repo = es.repository(store, { read_models = { rm } })
      assert(repo:execute(Thing, "1", "Inc", {}))
      local r, err = repo:execute(Thing, "1", "Poison", {})
      assert.is_nil(r)
      assert.equal("invalid", err.kind)
      assert.equal(1, store:version("Thing-1"))            -- nothing of it stored
      assert(repo:execute(Thing, "1", "Inc", {}))
      assert.equal(2, assert(rm:get(store, "1")).n)
    end)

    it("a command that changes nothing still says where the stream is", function()
      local repo = es.repository(store)
      local r1 = assert(repo:execute(Thing, "9", "Inc", {}))
      local r2 = assert(repo:execute(Thing, "9", "Nothing", {}))
      assert.equal(0, #r2.events)
      assert.equal(r1.version, r2.version)
      assert.equal(r1.position, r2.position)
    end)

    it("finds rows whose column is null, as SQL's IS NULL does", function()
      local rm = es.read_model { name = "rm_null", columns = { id = "text", tag = "text", at = "timestamptz" },
        on = { Tag = function(row, e) row.tag = e.data.tag; row.at = e.data.at end } }
      local p = es.projector(store, { rm })
      assert(p:migrate())
      assert(store:append("T-a", { type = "Tag", data = { tag = "x", at = "2026-01-15T10:00:00Z" } }))
      assert(store:append("T-b", { type = "Tag", data = { at = "2026-01-15T12:00:00+02:00" } }))
      p:catch_up()
      local rows = assert(rm:find(store, { tag = es.json.null }))
      assert.equal(1, #rows)
      assert.equal("b", rows[1].id)
      -- instants come back in one form on both stores
      assert.equal("2026-01-15T10:00:00.000000Z", assert(rm:get(store, "a")).at)
      assert.equal("2026-01-15T10:00:00.000000Z", assert(rm:get(store, "b")).at)
    end)

    -- PostgreSQL rolls a failed batch back and applies the prefix again in
    -- the recording transaction; a memory store cannot roll back
    local memory_only = entry.name == "memory" and it or function() end
    memory_only("a failing custom projection applies the events before the failure once", function()
      local seen = {}
      local proj = es.projection { name = "fp_custom", on = {
        Inc = function(e) seen[#seen + 1] = e.version end,
        Poison = function() error("boom") end,
      } }
      local p = es.projector(store, { proj })
      assert(store:append("Thing-1", { { type = "Inc" }, { type = "Inc" }, { type = "Poison" } }))
      p:catch_up()
      assert.same({ 1, 2 }, seen)
      assert.truthy(assert(p:status())[1].error)
    end)
  end)
end

describe("failure paths (postgresql only)", function()
  it("a lock timeout delays a projection instead of stopping it", function()
    local url = helpers.database_url()
    local store, schema = helpers.open({ name = "postgresql", url = url })
    local rm = counter()
    local p = es.projector(store, { rm })
    assert(p:migrate())
    assert(store:append("Thing-1", { type = "Inc" }))
    local other = assert(es.open(url, { schema = schema }))
    assert(other:begin())
    assert(other:query(('LOCK TABLE "%s".rm_fp IN ACCESS EXCLUSIVE MODE'):format(schema)))
    local timed = assert(es.open(url, { schema = schema, lock_timeout = 200 }))
    local p2 = es.projector(timed, { rm })
    local n, err = p2:catch_up()
    assert.is_nil(n)
    assert.equal("55P03", err.sqlstate)
    assert(other:rollback())
    assert.is_nil(assert(p2:status())[1].error)      -- not marked failed
    assert.equal(1, assert(p2:catch_up()))
    assert.equal(1, assert(rm:get(store, "1")).n)
    other:close(); timed:close(); store:close()
  end)
end)
