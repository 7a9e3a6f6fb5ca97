-- Smoke test: the module loads under this flavour and errors print well.
local es = require "eventsourcing"

describe("eventsourcing (smoke)", function()
  it("has a version string", function()
    assert.is_string(es._VERSION)
    assert.truthy(es._VERSION:match("%d+%.%d+"), "version looks like x.y: " .. es._VERSION)
  end)

  it("exposes the expected-version constants", function()
    assert.is_not_nil(es.ANY)
    assert.is_not_nil(es.NO_STREAM)
    assert.is_not_nil(es.STREAM_EXISTS)
  end)

  it("builds errors that print as 'kind: message'", function()
    local err = es.error("conflict", "stream Order-1 moved")
    assert.equal("conflict", err.kind)
    assert.equal("stream Order-1 moved", err.message)
    assert.equal("conflict: stream Order-1 moved", tostring(err))
    assert.is_true(es.is_error(err))
  end)

  it("loads the core built for this flavour", function()
    local core = require "eventsourcing.core"
    assert.is_table(core)
    local flavour = rawget(_G, "jit") and "luajit" or os.getenv("ES_LUA_FLAVOUR") or "lua5.4"
    local want = "build/" .. flavour .. "/"
    local path = assert(package.searchpath("eventsourcing.core", package.cpath))
    assert.truthy(path:find(want, 1, true), path)
  end)
end)
