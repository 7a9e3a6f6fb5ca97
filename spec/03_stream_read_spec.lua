-- Forward stream reads on PostgreSQL send their first page without asking
-- for the stream's version (a short page is the end; only a full one asks):
-- the bounds, the page edges (1,000 versions a page) and "events
-- appended after read() are not read" must hold as before.
local helpers = require "helpers"

describe("forward stream reads (postgresql)", function()
  local store, other

  before_each(function() store, other = helpers.open_pair() end)
  after_each(function()
    store:close()
    other:close()
  end)

  local function fill(stream, n)
    local evs = {}
    for i = 1, n do evs[i] = { type = "N", data = { i = i } } end
    assert(store:append(stream, evs))
  end

  local function versions(it)
    local out = {}
    for e in it do out[#out + 1] = e.version end
    return out
  end

  local function span(a, b)
    local out = {}
    for v = a, b do out[#out + 1] = v end
    return out
  end

  it("reads nothing from an empty stream, and from past the end", function()
    assert.same({}, versions(assert(store:read("Empty-1"))))
    fill("S-1", 3)
    assert.same({}, versions(assert(store:read("S-1", { from = 4 }))))
    assert.same({ 3 }, versions(assert(store:read("S-1", { from = 3 }))))
  end)

  it("keeps from, to and limit", function()
    fill("S-2", 10)
    assert.same(span(4, 7), versions(assert(store:read("S-2", { from = 4, to = 7 }))))
    assert.same(span(2, 4), versions(assert(store:read("S-2", { from = 2, limit = 3 }))))
    assert.same(span(1, 10), versions(assert(store:read("S-2", { to = 99 }))))
    assert.same({}, versions(assert(store:read("S-2", { from = 5, to = 4 }))))
  end)

  for _, n in ipairs { 999, 1000, 1001, 2000, 2500 } do
    it(("reads a stream of %d events whole, folds it and stops at its end"):format(n), function()
      fill("P-" .. n, n)
      assert.same(span(1, n), versions(assert(store:read("P-" .. n))))
      local state, version = store:fold("P-" .. n, { N = function(s, e)
        s.sum = s.sum + e.data.i
      end }, { sum = 0 })
      assert.equal(n, version)
      assert.equal(n * (n + 1) / 2, state.sum)
      assert.same(span(1001, n), versions(assert(store:read("P-" .. n, { from = 1001 }))))
    end)
  end

  it("does not read events appended after read(), past the first page", function()
    fill("L-1", 1500)
    local it = assert(store:read("L-1"))
    local first = it()
    assert.equal(1, first.version)
    assert(other:append("L-1", { { type = "N", data = { i = 1501 } } }))
    local n = 1
    for _ in it do n = n + 1 end
    assert.equal(1500, n)
    -- a fold after the append reads it
    assert.equal(1501, select(2, store:fold("L-1", { N = function() end }, {})))
  end)

  it("fails in read(), not in the loop, when the session is gone", function()
    fill("G-1", 2)
    local pid = assert(store:query("SELECT pg_backend_pid() AS pid"))[1].pid
    assert(other:query("SELECT pg_terminate_backend($1)", pid))
    local it, err
    for _ = 1, 50 do   -- the backend may take a moment to go
      it, err = store:read("G-1")
      if not it then break end
      it = nil
      os.execute("sleep 0.02")
    end
    assert.is_nil(it)
    assert.equal("connection", err.kind)
    -- and the next call reconnects
    assert.same({ 1, 2 }, versions(assert(store:read("G-1"))))
  end)
end)
