-- fold over a long stream keeps memory flat: events are handed to the
-- handler one by one, page by page, never collected into an array.
local es = require "eventsourcing"
local helpers = require "helpers"

local URL = helpers.database_url()   -- fails loudly when not configured

local fresh_schema = helpers.fresh_schema

local N = 200000
local BATCH = 1000
local SAMPLE_EVERY = 10000
local BOUND_KB = 2048            -- live Lua memory above the start
local RSS_BOUND_KB = 8 * 1024    -- process growth (C side: result pages;
                                 -- one result of the whole stream is ~45 MB)

local function rss_kb()
  local f = io.open("/proc/self/status")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local function sanitized()
  return (os.getenv("LD_PRELOAD") or ""):find("asan") or os.getenv("ASAN_OPTIONS")
end

local function fill(store, stream)
  local batch = {}
  for b = 0, N / BATCH - 1 do
    for j = 1, BATCH do
      batch[j] = { type = "Tick", data = { n = b * BATCH + j } }
    end
    local r, err = store:append(stream, batch, { expected_version = b * BATCH })
    assert(r, tostring(err))
  end
end

local targets = {
  { name = "postgresql", url = URL },
  { name = "memory", url = "memory:" },
}

for _, t in ipairs(targets) do
  describe("fold memory (" .. t.name .. ")", function()
    local store, stream

    setup(function()
      local err
      store, err = es.open(t.url, t.name == "postgresql" and { schema = fresh_schema() } or nil)
      assert(store, tostring(err))
      assert(store:migrate())
      stream = "Counter-1"
      fill(store, stream)
    end)

    teardown(function()
      if store then store:close() end
    end)

    it(("folds %d events with live Lua memory < %d KB above the start"):format(N, BOUND_KB), function()
      collectgarbage()
      collectgarbage()
      local base = collectgarbage("count")
      local rss0 = rss_kb()
      local samples, peak, rss_peak = 0, 0, 0
      local handlers = {
        Tick = function(state, e)
          state.count = state.count + 1
          state.sum = state.sum + e.data.n
          if state.count % SAMPLE_EVERY == 0 then
            collectgarbage()
            local grow = collectgarbage("count") - base
            if grow > peak then peak = grow end
            local r = rss_kb()
            if r and rss0 and r - rss0 > rss_peak then rss_peak = r - rss0 end
            samples = samples + 1
          end
          return state
        end,
      }
      local state, version = store:fold(stream, handlers, { count = 0, sum = 0 })
      assert(state, tostring(version))
      assert.equal(N, state.count)
      assert.equal(N * (N + 1) / 2, state.sum)
      assert.equal(N, version)
      assert.equal(N / SAMPLE_EVERY, samples)
      io.stderr:write(("\n  fold %s: %d events, live Lua memory peak +%.0f KB, RSS peak +%d KB\n")
        :format(t.name, N, peak, rss_peak))
      assert.is_true(peak < BOUND_KB,
        ("live Lua memory grew by %.0f KB during the fold (bound %d KB)"):format(peak, BOUND_KB))
      if not sanitized() then
        assert.is_true(rss_peak < RSS_BOUND_KB,
          ("process memory grew by %d KB during the fold (bound %d KB)"):format(rss_peak, RSS_BOUND_KB))
      end
    end)

    it("folds a range (from/to) with the same memory behaviour and the right state", function()
      local handlers = {
        Tick = function(state, e) state.count = state.count + 1; state.sum = state.sum + e.data.n; return state end,
      }
      local state, version = store:fold(stream, handlers, { count = 0, sum = 0 },
                                        { from = 1001, to = 150000 })
      assert(state, tostring(version))
      assert.equal(149000, state.count)
      assert.equal((1001 + 150000) * 149000 / 2, state.sum)
      assert.equal(150000, version)
    end)
  end)
end

-- read_all hands back a batch as a Lua table: the rows it came from are
-- freed when the batch is built, not when the collector gets to the
-- cursor's userdata. With the collector stopped, 30 batches of 5,000
-- events of 1 KB each held about 300 MB of C memory before that.
describe("read_all memory (postgresql)", function()
  it("frees a batch's rows as soon as the batch is built", function()
    if sanitized() then pending("process memory is not measured under a sanitizer"); return end
    local store = assert(es.open(URL, { schema = fresh_schema() }))
    assert(store:migrate())
    for k = 0, 4 do
      local evs = {}
      for i = 1, 1000 do evs[i] = { type = "T", data = { pad = ("x"):rep(1000), i = i } } end
      assert(store:append("Big-1", evs, { expected_version = k * 1000 }))
    end
    collectgarbage()
    collectgarbage("stop")
    local ok, err = pcall(function()
      local r0, l0 = rss_kb(), collectgarbage("count")
      for _ = 1, 30 do assert(store:read_all({ limit = 5000 })) end
      local c_held = (rss_kb() - r0) - (collectgarbage("count") - l0)
      io.stderr:write(("\n  read_all: 30 batches of 5,000 events with the collector stopped: C memory +%.0f KB\n")
        :format(c_held))
      assert.is_true(c_held < 64 * 1024, ("C memory grew by %.0f KB"):format(c_held))
    end)
    collectgarbage("restart")
    store:close()
    assert(ok, err)
  end)
end)
