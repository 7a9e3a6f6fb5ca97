-- Read-ahead on PostgreSQL: read_all's prefetch and fold's next page must
-- give exactly what plain reads give, whatever other calls come between.
local helpers = require "helpers"

describe("read-ahead (postgresql)", function()
  local store

  before_each(function()
    store = helpers.open({ name = "postgresql", url = helpers.database_url() })
    local evs = {}
    for i = 1, 25 do evs[i] = { type = i % 2 == 0 and "Even" or "Odd", data = { i = i } } end
    assert(store:append("Num-1", evs))
    assert(store:append("Other-1", { type = "Odd", data = { i = 0 } }))
  end)
  after_each(function() store:close() end)

  local function positions(batch)
    local out = {}
    for i, e in ipairs(batch) do out[i] = e.position end
    return out
  end

  local function page_all(opts, between)
    local all, after = {}, nil
    while true do
      local o = {}
      for k, v in pairs(opts) do o[k] = v end
      o.after = after
      local batch, cp = assert(store:read_all(o))
      if #batch == 0 then return all end
      for _, p in ipairs(positions(batch)) do all[#all + 1] = p end
      after = cp
      if between then between() end
    end
  end

  it("pages through the same events with and without prefetch", function()
    local plain = page_all({ limit = 4 })
    assert.equal(26, #plain)
    assert.same(plain, page_all({ limit = 4, prefetch = true }))
    assert.same(page_all({ limit = 3, types = { "Odd" } }),
                page_all({ limit = 3, types = { "Odd" }, prefetch = true }))
    assert.same(page_all({ limit = 5, category = "Num" }),
                page_all({ limit = 5, category = "Num", prefetch = true }))
  end)

  it("lets other calls run while a batch is on its way", function()
    local seen = page_all({ limit = 4, prefetch = true }, function()
      assert.equal(25, assert(store:version("Num-1")))
      assert(store:query("SELECT 1 AS one"))
      assert(store:begin()); assert(store:commit())
    end)
    assert.equal(26, #seen)
  end)

  it("gives the same large batches, bigger than the socket's buffer, with other calls between", function()
    -- a batch ahead is read by a thread of the store while the caller works;
    -- every other call waits for it first and leaves it for the next read_all
    local pad = ("x"):rep(1000)
    for s = 1, 4 do
      local evs = {}
      for i = 1, 1000 do evs[i] = { type = "Big", data = { i = i, pad = pad } } end
      assert(store:append("Big-" .. s, evs))
    end
    local plain = page_all({ limit = 1500 })
    local calls = 0
    local ahead = page_all({ limit = 1500, prefetch = true }, function()
      calls = calls + 1
      if calls % 2 == 0 then assert(store:query("SELECT 1 AS one")) end
    end)
    assert.equal(4026, #plain)
    assert.same(plain, ahead)
    local b = assert(store:read_all({ limit = 1500, prefetch = true, types = { "Big" } }))
    assert.equal(pad, b[1500].data.pad)
    assert.equal(500, b[1500].data.i)
  end)

  it("does not hand out a batch made for another request", function()
    local b1, cp1 = assert(store:read_all({ limit = 4, prefetch = true }))
    assert.equal(4, #b1)
    -- ask for something else: the batch fetched ahead must not answer it
    local b2 = assert(store:read_all({ after = cp1, limit = 2 }))
    assert.same({ b1[4].position + 1, b1[4].position + 2 }, positions(b2))
    local b3 = assert(store:read_all({ after = cp1, limit = 4, types = { "Even" } }))
    for _, e in ipairs(b3) do assert.equal("Even", e.type) end
  end)

  it("sees events appended after the batch ahead was asked for", function()
    local b1, cp1 = assert(store:read_all({ limit = 26, prefetch = true }))
    assert.equal(26, #b1)
    assert(store:append("Num-2", { type = "Odd" }))
    local b2 = assert(store:read_all({ after = cp1, limit = 26 }))
    assert.equal(1, #b2)
    assert.equal("Num-2", b2[1].stream)
  end)

  it("keeps the session usable when a fold handler fails half way", function()
    local evs = {}
    for i = 1, 2500 do evs[i] = { type = "Tick", data = { i = i } } end
    assert(store:append("Long-1", evs))
    local ok = pcall(store.fold, store, "Long-1", {
      Tick = function(n, e) if e.data.i == 1500 then error("boom") end return n + 1 end,
    }, 0)
    assert.is_false(ok)
    collectgarbage(); collectgarbage()   -- the cursor's page ahead is collected
    assert.equal(2500, assert(store:version("Long-1")))
    assert.equal(2500, (store:fold("Long-1", { Tick = function(n) return n + 1 end }, 0)))
  end)
end)
