-- es.workflow: subscriptions that execute commands, on both stores.
-- Correlation/causation and trace, exactly-once on replay (derived ids),
-- rejections, retries, dead letters, timers.
local es = require "eventsourcing"
local helpers = require "helpers"
local workflow = require "eventsourcing.workflow"

-- Every PostgreSQL test gets a fresh schema (helpers.open), memory ones a
-- fresh store.
local open_store = helpers.open

-- A source aggregate (Pings) and a target aggregate (Counter: every Add
-- appends, so it is NOT idempotent by itself; Limited refuses past 2).
local Source = es.aggregate {
  name = "Source",
  apply = { Ping = function() end, Boom = function() end },
  decide = {
    Ping = function(_, c) return { type = "Ping", data = { target = c.target, n = c.n or 1 } } end,
    Boom = function(_, c) return { type = "Boom", data = { target = c.target } } end,
  },
}

local Counter = es.aggregate {
  name = "Counter",
  initial = function() return { n = 0 } end,
  apply = { Added = function(s, e) s.n = s.n + e.data.n end },
  decide = {
    Add = function(_, c) return { type = "Added", data = { n = c.n or 1 } } end,
    AddLimited = function(s, c)
      if s.n + (c.n or 1) > 2 then return nil, "limit reached" end
      return { type = "Added", data = { n = c.n or 1 } }
    end,
  },
}

local function events_of(store, stream)
  local list = {}
  for e in assert(store:read(stream)) do list[#list + 1] = e end
  return list
end

for _, entry in ipairs(helpers.stores()) do
  describe("es.workflow (" .. entry.name .. ")", function()
    local store, repo

    before_each(function()
      store = open_store(entry)
      repo = es.repository(store)
    end)
    after_each(function() if store then store:close() end end)

    local function ping(id, target, n)
      return assert(repo:execute(Source, id, "Ping", { target = target, n = n }))
    end

    it("name-based ids: SHA-1 and UUIDv5 match RFC test vectors; derived ids are stable", function()
      assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", workflow.sha1("abc"))
      assert.equal("886313e1-3b8a-5372-9b90-0c9aee199e5d",
        workflow.uuid5("6ba7b810-9dad-11d1-80b4-00c04fd430c8", "python.org"))
      local a = workflow.derive_id("w", "e1", 1, 1)
      assert.equal(a, workflow.derive_id("w", "e1", 1, 1))
      assert.not_equal(a, workflow.derive_id("w", "e1", 2, 1))
      assert.not_equal(a, workflow.derive_id("w2", "e1", 1, 1))
      assert.truthy(a:match("^%x+%-%x+%-5%x+%-[89ab]%x+%-%x+$"))
    end)

    it("validates definitions", function()
      assert.has_error(function() es.workflow { name = "bad name", on = {} } end)
      assert.has_error(function() es.workflow { name = "x", on = { A = 1 } } end)
      assert.has_error(function() es.workflow.runner(store, { {} }) end)
    end)

    it("reacts to events with commands carrying correlation and causation; trace follows the chain", function()
      local wf = es.workflow { name = "ping-counter", on = {
        Ping = function(e, ctx)
          local r = ctx:execute(Counter, e.data.target, "Add", { n = e.data.n })
          assert(r and #r.events == 1)
        end,
      } }
      local runner = es.workflow.runner(store, { wf })
      local p = ping("s1", "c1", 2)
      ping("s2", "c1", 3)
      local n = assert(runner:catch_up())
      assert.equal(2, n)
      local state = assert(repo:load(Counter, "c1"))
      assert.equal(5, state.n)
      local evs = events_of(store, "Counter-c1")
      assert.equal(2, #evs)
      local ping_event = p.events[1]
      assert.equal(ping_event.metadata.correlation_id, evs[1].metadata.correlation_id)
      assert.equal(ping_event.id, evs[1].metadata.causation_id)
      assert.equal("ping-counter", evs[1].metadata.workflow)
      assert.equal(workflow.derive_id("ping-counter\0" .. ping_event.id, "", 1, 1), evs[1].id)
      local trace = assert(es.workflow.trace(store, ping_event.metadata.correlation_id))
      assert.equal(2, #trace)
      assert.equal("Ping", trace[1].type)
      assert.equal("Added", trace[2].type)
      assert.equal(ping_event.id, trace[2].metadata.causation_id)
      -- nothing new: nothing happens
      assert.equal(0, (runner:catch_up()))
      local st = assert(runner:status())
      assert.equal(2, st[1].handled)
    end)

    it("replaying (reset checkpoint) appends nothing twice, even on a newer state", function()
      local wf = es.workflow { name = "replay", on = {
        Ping = function(e, ctx) ctx:execute(Counter, e.data.target, "Add", { n = 1 }) end,
      } }
      local runner = es.workflow.runner(store, { wf })
      ping("s1", "c1"); ping("s2", "c1")
      assert(runner:catch_up())
      -- someone else moves the counter on: a re-decision lands on new versions
      assert(repo:execute(Counter, "c1", "Add", { n = 10 }))
      assert(runner:reset("replay"))
      assert(runner:catch_up())
      assert.equal(3, #events_of(store, "Counter-c1"))
      assert.equal(12, (repo:load(Counter, "c1")).n)
      assert.equal(2, runner.stats.already_done)
      -- and a fresh runner (another process) replaying sees the same
      local r2 = es.workflow.runner(store, { wf })
      assert(r2:reset("replay"))
      assert(r2:catch_up())
      assert.equal(3, #events_of(store, "Counter-c1"))
    end)

    it("records refused commands and goes on", function()
      local results = {}
      local wf = es.workflow { name = "limited", on = {
        Ping = function(e, ctx)
          local r, err = ctx:execute(Counter, e.data.target, "AddLimited", { n = 1 })
          results[#results + 1] = r and "ok" or err.kind
        end,
      } }
      local runner = es.workflow.runner(store, { wf })
      for i = 1, 4 do ping("s" .. i, "c1") end
      assert.equal(4, (runner:catch_up()))
      assert.same({ "ok", "ok", "rejected", "rejected" }, results)
      local rej = assert(es.workflow.rejections(store, "limited"))
      assert.equal(2, #rej)
      assert.equal("AddLimited", rej[1].command)
      assert.equal("limit reached", rej[1].reason)
      assert.equal("Counter", rej[1].aggregate)
      assert.equal(2, (repo:load(Counter, "c1")).n)
    end)

    it("retries a failing event with backoff, then dead-letters it; retry_dead_letters runs it again", function()
      local broken, calls = true, 0
      local flaky = 0
      local wf = es.workflow { name = "dl", on = {
        Boom = function(e, ctx)
          calls = calls + 1
          if broken then error("boom for " .. e.data.target) end
          ctx:execute(Counter, e.data.target, "Add", { n = 100 })
        end,
        Ping = function(e, ctx)
          if e.data.n == 7 and flaky < 1 then flaky = flaky + 1; error("transient") end
          ctx:execute(Counter, e.data.target, "Add", { n = e.data.n })
        end,
      } }
      local logs = {}
      local runner = es.workflow.runner(store, { wf }, { max_attempts = 3, backoff = 0.01,
        log = function(l) logs[#logs + 1] = l end })
      ping("s1", "c1", 1)
      assert(repo:execute(Source, "s2", "Boom", { target = "c2" }))
      ping("s3", "c1", 7)          -- fails once, then works
      ping("s4", "c1", 1)
      assert(runner:catch_up())
      assert.equal(3, calls)
      assert.equal(9, (repo:load(Counter, "c1")).n)     -- the events after the dead one ran
      assert.equal(0, (repo:load(Counter, "c2")).n)
      assert.equal(1, runner.stats.dead_lettered)
      local dl = assert(es.workflow.dead_letters(store, "dl"))
      assert.equal(1, #dl)
      assert.equal("Boom", dl[1].type)
      assert.equal("Source-s2", dl[1].stream)
      assert.equal(3, dl[1].attempts)
      assert.truthy(tostring(dl[1].error):find("boom for c2", 1, true))
      assert.truthy(#logs >= 3)
      -- still broken: the dead letter stays, attempts grow
      local r = assert(runner:retry_dead_letters())
      assert.same({ retried = 0, failed = 1 }, r)
      assert.equal(4, assert(es.workflow.dead_letters(store, "dl"))[1].attempts)
      broken = false
      r = assert(runner:retry_dead_letters())
      assert.same({ retried = 1, failed = 0 }, r)
      assert.equal(0, #assert(es.workflow.dead_letters(store, "dl")))
      assert.equal(100, (repo:load(Counter, "c2")).n)
      -- exactly once: running the (former) dead letter's event again changes nothing
      assert(runner:reset("dl"))
      assert(runner:catch_up())
      assert.equal(100, (repo:load(Counter, "c2")).n)
      assert.equal(9, (repo:load(Counter, "c1")).n)
    end)

    it("timers fire once when due, survive a new runner, and can be cancelled", function()
      -- on Citus each append is a hop more: a longer delay keeps the timer
      -- from coming due before the checks that it is pending
      local delay = helpers.distributed() and 1 or 0.2
      local wf = es.workflow { name = "timers", on = {
        Ping = function(e, ctx)
          ctx:schedule(delay, Counter, e.data.target, "Add", { n = e.data.n }, "t:" .. e.stream)
          if e.data.n == 5 then ctx:cancel("t:" .. e.stream) end
        end,
        Boom = function(e, ctx) ctx:cancel("t:Source-" .. e.data.target) end,
      } }
      local opts = { aggregates = { Counter = Counter } }
      local runner = es.workflow.runner(store, { wf }, opts)
      ping("s1", "c1", 1)
      ping("s2", "c1", 5)          -- scheduled and cancelled at once
      ping("s3", "c1", 20)
      local n, fired = runner:catch_up()
      assert.equal(3, n)
      assert.equal(0, fired)
      local pending = assert(es.workflow.timers(store))
      assert.equal(2, #pending)
      assert.equal("Add", pending[1].command)
      assert(repo:execute(Source, "s4", "Boom", { target = "s3" }))   -- cancels s3's timer
      assert(runner:catch_up())
      assert.equal(1, #assert(es.workflow.timers(store)))
      assert.is_true(runner:next_timer() <= delay + 0.05)
      workflow.sleep(delay + 0.1)
      local r2 = es.workflow.runner(store, { wf }, opts)      -- "after a restart"
      n, fired = r2:catch_up()
      assert.equal(0, n)
      assert.equal(1, fired)
      assert.equal(0, (r2:run_timers()))
      assert.equal(1, (repo:load(Counter, "c1")).n)
      local evs = events_of(store, "Counter-c1")
      assert.equal("t:Source-s1", evs[1].metadata.timer)
      assert.equal(0, #assert(es.workflow.timers(store)))
      -- cancel_timer by key, outside a workflow
      local ok, removed = es.workflow.cancel_timer(store, "nope")
      assert.is_true(ok)
      assert.is_false(removed)
    end)

    it("schedule needs a registered aggregate", function()
      local wf = es.workflow { name = "unregistered", on = {
        Ping = function(e, ctx) ctx:schedule(1, Counter, e.data.target, "Add", {}) end,
      } }
      local runner = es.workflow.runner(store, { wf }, { max_attempts = 1 })
      ping("s1", "c1")
      assert(runner:catch_up())
      local dl = assert(es.workflow.dead_letters(store, "unregistered"))
      assert.equal(1, #dl)
      assert.truthy(tostring(dl[1].error):find("not registered", 1, true))
    end)

    it("run() follows live and fires timers on time", function()
      local wf = es.workflow { name = "live", on = {
        Ping = function(e, ctx) ctx:schedule(0.2, Counter, e.data.target, "Add", { n = 1 }) end,
      } }
      local runner = es.workflow.runner(store, { wf }, { aggregates = { Counter = Counter } })
      ping("s1", "c1")
      local t0 = workflow.now()
      runner:run { poll = 0.05, stop = function()
        return (repo:load(Counter, "c1")).n == 1 or workflow.now() - t0 > 5
      end }
      assert.equal(1, (repo:load(Counter, "c1")).n)
      assert.is_true(workflow.now() - t0 >= 0.15)
    end)
  end)
end
