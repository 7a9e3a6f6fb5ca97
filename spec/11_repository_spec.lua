-- The repository against both stores: execute (metadata, no-ops,
-- rejections, retry on conflict with two writers), snapshots, time travel
-- and upcasting.
package.path = "examples/?.lua;" .. package.path

local es = require "eventsourcing"
local helpers = require "helpers"
local Order = require "orders.order"

-- A store spy: forwards every method, counts calls, and counts the events
-- that fold hands to apply handlers.
local function spy_store(store)
  local spy = { calls = {}, folded = 0 }
  return setmetatable(spy, { __index = function(_, k)
    local v = store[k]
    if type(v) ~= "function" then return v end
    return function(_, ...)
      spy.calls[k] = (spy.calls[k] or 0) + 1
      if k == "fold" then
        local stream, handlers, initial, opts = ...
        local counting = setmetatable({}, { __index = function(_, t)
          local h = handlers[t]
          return function(s, e) spy.folded = spy.folded + 1; return h(s, e) end
        end })
        return v(store, stream, counting, initial, opts)
      end
      return v(store, ...)
    end
  end }), spy
end

local counter, add = helpers.counter, helpers.add

for _, entry in ipairs(helpers.stores()) do
  describe("repository (" .. entry.name .. ")", function()
    local store, schema

    before_each(function()
      store, schema = helpers.open(entry)
    end)
    after_each(function()
      if store then store:close() end
    end)

    -- a second connection to the same data (memory: the same store)
    local function second_store() return helpers.second_store(entry, store, schema) end

    describe("execute", function()
      it("appends the decided events and returns version, position, events, state", function()
        local A = counter()
        local repo = es.repository(store)
        local r = assert(add(repo, A, "a", 2))
        assert.equal(1, r.version)
        assert.is_number(r.position)
        assert.equal(1, #r.events)
        assert.equal("Added", r.events[1].type)
        assert.equal(2, r.state.n)
        r = assert(add(repo, A, "a", 3))
        assert.equal(2, r.version)
        assert.equal(5, r.state.n)
        assert.equal(2, store:version("Counter-a"))
        local state, version = repo:load(A, "a")
        assert.equal(5, state.n)
        assert.equal(2, version)
      end)

      it("adds correlation_id, causation_id and the caller's metadata", function()
        local repo = es.repository(store, { metadata = { service = "spec" } })
        local A = counter()
        local r = assert(repo:execute(A, "m", "Add", { by = 1 }, { metadata = { user = "alice" } }))
        local e = repo:history(A, "m")[1]
        assert.equal("alice", e.metadata.user)
        assert.equal("spec", e.metadata.service)
        assert.equal("Add", e.metadata.command)
        assert.matches("^%x+%-%x+%-%x+%-%x+%-%x+$", e.metadata.correlation_id)
        assert.equal(e.metadata.correlation_id, e.metadata.causation_id)
        assert.same(r.events[1].metadata, e.metadata)
        assert(repo:execute(A, "m", "Add", { by = 1 },
          { metadata = { user = "bob", correlation_id = "corr-1", causation_id = "cause-1" } }))
        e = repo:history(A, "m")[2]
        assert.equal("corr-1", e.metadata.correlation_id)
        assert.equal("cause-1", e.metadata.causation_id)
        assert.equal("bob", e.metadata.user)
      end)

      it("writes the current schema version into the metadata of versioned types", function()
        local repo = es.repository(store)
        assert(repo:execute(Order, "s1", "CreateOrder", { order_id = "s1", customer_id = "c" }))
        assert(repo:execute(Order, "s1", "AddItem", { product_id = "p", quantity = 1, unit_price = 5 }))
        local trail = repo:history(Order, "s1")
        assert.is_nil(trail[1].metadata.schema_version)
        assert.equal(2, trail[2].metadata.schema_version)
      end)

      it("appends nothing for a no-op and succeeds", function()
        local repo = es.repository(store)
        local A = counter()
        assert(add(repo, A, "n", 1))
        local r = assert(repo:execute(A, "n", "Noop", {}))
        assert.same({}, r.events)
        assert.equal(1, r.version)
        assert.equal(1, r.state.n)
        assert.equal(1, store:version("Counter-n"))
      end)

      it("returns the store's error when a no-op cannot read where the stream is", function()
        if entry.name == "memory" then return end
        local repo = es.repository(store)
        local A = counter()
        assert(add(repo, A, "nr", 1))
        local timed = assert(es.open(entry.url, { schema = schema, lock_timeout = 200 }))
        local other = assert(es.open(entry.url, { schema = schema }))
        local locked = false
        local B = es.aggregate {
          name = "Counter", initial = function() return { n = 0 } end,
          apply = { Added = function(s, e) s.n = s.n + e.data.by end },
          decide = { Peek = function()
            -- the fold is done; from here on the events table is locked
            assert(other:begin())
            assert(other:query(("LOCK TABLE %q.events IN ACCESS EXCLUSIVE MODE"):format(schema)))
            locked = true
            return nil
          end },
        }
        local r, err = es.repository(timed):execute(B, "nr", "Peek", {})
        other:rollback()
        timed:close(); other:close()
        assert.is_true(locked)
        assert.is_nil(r)
        assert.equal("database", err.kind, tostring(err))
      end)

      it("returns a rejection as nil, err (kind rejected) and appends nothing", function()
        local repo = es.repository(store)
        local A = counter()
        local r, err = add(repo, A, "r", 5, { max = 3 })
        assert.is_nil(r)
        assert.equal("rejected", err.kind)
        assert.equal("over the maximum", err.message)
        assert.equal(0, store:version("Counter-r"))
      end)

      it("honours the caller's expected_version", function()
        local repo = es.repository(store)
        local A = counter()
        assert(repo:execute(A, "e", "Add", { by = 1 }, { expected_version = es.NO_STREAM }))
        local r, err = repo:execute(A, "e", "Add", { by = 1 }, { expected_version = es.NO_STREAM })
        assert.is_nil(r)
        assert.equal("conflict", err.kind)
        assert.equal(1, err.actual)
        assert(repo:execute(A, "e", "Add", { by = 1 }, { expected_version = 1 }))
        r, err = repo:execute(A, "e", "Add", { by = 1 }, { expected_version = 1 })
        assert.is_nil(r)
        assert.equal("conflict", err.kind)
        assert(repo:execute(A, "e", "Add", { by = 1 }, { expected_version = es.STREAM_EXISTS }))
        assert.equal(3, store:version("Counter-e"))
      end)

      it("raises for an unknown command and for a bad id", function()
        local repo = es.repository(store)
        assert.has_error(function() repo:execute(counter(), "x", "Fly", {}) end)
        assert.has_error(function() repo:execute(counter(), "", "Add", { by = 1 }) end)
        assert.has_error(function() repo:execute(counter(), "a\nb", "Add", { by = 1 }) end)
      end)

      it("names an event type without an apply handler found in a stream", function()
        local repo = es.repository(store)
        assert(store:append("Counter-u", { type = "Mystery", data = {} }))
        local ok, err = pcall(repo.load, repo, counter(), "u")
        assert.is_false(ok)
        assert.truthy(tostring(err):find("no apply handler for event type 'Mystery'", 1, true),
          tostring(err))
      end)
    end)

    describe("two writers", function()
      it("reloads and decides again when another writer appended in between", function()
        local store2, own = second_store()
        local A = counter()
        local repo1, repo2 = es.repository(store), es.repository(store2)
        assert(add(repo1, A, "w", 1))
        local decided = 0
        local r = assert(add(repo1, A, "w", 10, { hook = function(s)
          decided = decided + 1
          if decided == 1 then
            assert.equal(1, s.n)
            assert(add(repo2, A, "w", 100))       -- the other writer wins the race
          else
            assert.equal(101, s.n, "the retry sees the other writer's event")
          end
        end }))
        assert.equal(2, decided)
        assert.equal(1, repo1.stats.retries)
        assert.equal(3, r.version)
        assert.equal(111, r.state.n)
        local state = repo2:load(A, "w")
        assert.same({ 1, 100, 10 }, state.log)
        if own then store2:close() end
      end)

      it("decides with the new state: a rule can reject on the retry", function()
        local store2, own = second_store()
        local A = counter()
        local repo1, repo2 = es.repository(store), es.repository(store2)
        local first = true
        local r, err = add(repo1, A, "x", 5, { max = 10, hook = function()
          if first then first = false; assert(add(repo2, A, "x", 8)) end
        end })
        assert.is_nil(r)
        assert.equal("rejected", err.kind)
        assert.equal(8, repo1:load(A, "x").n)
        if own then store2:close() end
      end)

      it("gives up after max_retries and returns the conflict", function()
        local store2, own = second_store()
        local A = counter()
        local repo1, repo2 = es.repository(store, { max_retries = 2 }), es.repository(store2)
        local decided = 0
        local r, err = add(repo1, A, "g", 1, { hook = function()
          decided = decided + 1
          assert(add(repo2, A, "g", 100))           -- always one step ahead
        end })
        assert.is_nil(r)
        assert.equal("conflict", err.kind)
        assert.equal(3, decided, "one try and two retries")
        assert.equal(3, store:version("Counter-g"))
        if own then store2:close() end
      end)
    end)

    describe("snapshots", function()
      it("the store supports snapshots", function()
        assert.is_function(store.save_snapshot)
        assert.is_function(store.load_snapshot)
      end)

      it("saves one once snapshot_every events accrued since the last", function()
        local A = counter { snapshot_every = 3 }
        local repo = es.repository(store)
        assert(add(repo, A, "s", 1))
        assert(add(repo, A, "s", 1))
        assert.is_nil(store:load_snapshot("Counter-s"))
        assert(add(repo, A, "s", 1))
        local snap = assert(store:load_snapshot("Counter-s"))
        assert.equal(3, snap.version)
        assert.equal(1, snap.schema_version)
        assert.equal(3, snap.state.n)
        assert(add(repo, A, "s", 1))
        assert(add(repo, A, "s", 1))
        assert.equal(3, store:load_snapshot("Counter-s").version)
        assert(add(repo, A, "s", 1))
        snap = store:load_snapshot("Counter-s")
        assert.equal(6, snap.version)
        assert.same({ 1, 1, 1, 1, 1, 1 }, snap.state.log)
        assert.equal(2, repo.stats.snapshots_saved)
      end)

      it("loads from the newest snapshot and folds only the events after it", function()
        local A = counter { snapshot_every = 5 }
        local repo = es.repository(store)
        for i = 1, 7 do assert(add(repo, A, "f", i)) end
        assert.equal(5, store:load_snapshot("Counter-f").version)
        local spy, counts = spy_store(store)
        local state, version = es.repository(spy):load(A, "f")
        assert.equal(7, version)
        assert.equal(28, state.n)
        assert.same({ 1, 2, 3, 4, 5, 6, 7 }, state.log)
        assert.equal(2, counts.folded, "only events 6 and 7 were folded")
        assert.equal(1, counts.calls.load_snapshot)
        -- the same state as a full fold, after the JSON round trip
        local full = es.repository(store, { snapshots = false }):load(A, "f")
        assert.same(full, state)
        assert.equal(es.json.encode(full.log), es.json.encode(state.log))
      end)

      it("skips the snapshot query of a stream it saw short, and still sees a longer one right", function()
        local A = counter { snapshot_every = 4 }
        local spy, counts = spy_store(store)
        local repo = es.repository(spy)
        assert(add(repo, A, "k", 1))
        assert(add(repo, A, "k", 2))
        -- the first load asked; the second knew the stream had no snapshot
        assert.equal(1, counts.calls.load_snapshot)
        local state, version = repo:load(A, "k")
        assert.equal(2, version)
        assert.equal(3, state.n)
        assert.equal(1, counts.calls.load_snapshot)
        -- another writer takes it past snapshot_every (and snapshots it)
        local other = es.repository(store)
        for i = 3, 6 do assert(add(other, A, "k", i)) end
        assert.equal(4, store:load_snapshot("Counter-k").version)
        state, version = repo:load(A, "k")
        assert.equal(6, version)
        assert.equal(21, state.n)
        assert.same({ 1, 2, 3, 4, 5, 6 }, state.log)
        -- long now: the snapshot is asked for again
        local folded = counts.folded
        state = repo:load(A, "k")
        assert.equal(21, state.n)
        assert.equal(2, counts.calls.load_snapshot)
        assert.equal(2, counts.folded - folded, "only events 5 and 6 were folded")
      end)

      it("ignores a snapshot with another snapshot_version and rebuilds from events", function()
        local repo = es.repository(store)
        for i = 1, 4 do assert(add(repo, counter { snapshot_every = 2 }, "v", i)) end
        assert.equal(4, store:load_snapshot("Counter-v").version)
        local spy, counts = spy_store(store)
        local A2 = counter { snapshot_every = 2, snapshot_version = 2 }
        local state, version = es.repository(spy):load(A2, "v")
        assert.equal(4, version)
        assert.equal(10, state.n)
        assert.equal(4, counts.folded, "all four events folded")
        -- the next execute saves a snapshot of the new version
        assert(add(es.repository(store), A2, "v", 5))
        assert.equal(4, store:load_snapshot("Counter-v").version, "the old one is still there")
        local snap = store:load_snapshot("Counter-v", { schema_version = 2 })
        assert.equal(2, snap.schema_version)
        assert.equal(5, snap.version)
      end)

      it("time travel to a version before the snapshot still works", function()
        local A = counter { snapshot_every = 3 }
        local repo = es.repository(store)
        for i = 1, 7 do assert(add(repo, A, "t", i)) end
        assert.equal(6, store:load_snapshot("Counter-t").version)
        local spy, counts = spy_store(store)
        local state, version = es.repository(spy):load(A, "t", { version = 2 })
        assert.equal(2, version)
        assert.same({ 1, 2 }, state.log)
        assert.equal(2, counts.folded)
        state, version = es.repository(spy):load(A, "t", { version = 4 })
        assert.equal(4, version)
        assert.equal(10, state.n)
      end)

      it("repository option snapshots = false neither saves nor uses them", function()
        local A = counter { snapshot_every = 1 }
        local repo = es.repository(store, { snapshots = false })
        assert(add(repo, A, "o", 1))
        assert.is_nil(store:load_snapshot("Counter-o"))
      end)
    end)

    describe("time travel", function()
      local function make(repo, id, n)
        local A = counter()
        for i = 1, n do
          assert(add(repo, A, id, i))
          -- keep recorded_at strictly increasing between our events
          local before = repo:history(A, id)[i].recorded_at
          local t0 = os.clock()
          while os.clock() - t0 < 0.002 do end
          assert.is_string(before)
        end
        return A
      end

      it("loads the state as of a version", function()
        local repo = es.repository(store)
        local A = make(repo, "tv", 4)
        local state, version = repo:load(A, "tv", { version = 2 })
        assert.equal(2, version)
        assert.same({ 1, 2 }, state.log)
        state, version = repo:load(A, "tv", { version = 0 })
        assert.equal(0, version)
        assert.equal(0, state.n)
        state, version = repo:load(A, "tv", { version = 99 })
        assert.equal(4, version)
        assert.equal(10, state.n)
      end)

      it("loads the state as of an instant (events recorded before it)", function()
        local repo = es.repository(store)
        local A = make(repo, "ti", 4)
        local trail = repo:history(A, "ti")
        for i, e in ipairs(trail) do
          local expect = 0
          for _, o in ipairs(trail) do if o.recorded_at < e.recorded_at then expect = o.version end end
          local state, version = repo:load(A, "ti", { at = e.recorded_at })
          assert.equal(expect, version, "before event " .. i)
          assert.equal(expect, #state.log)
        end
        local state, version = repo:load(A, "ti", { at = "1999-01-01T00:00:00Z" })
        assert.equal(0, version)
        assert.equal(0, state.n)
        state, version = repo:load(A, "ti", { at = "2999-01-01T00:00:00Z" })
        assert.equal(4, version)
        assert.equal(10, state.n)
      end)

      it("gives the initial state and version 0 for an unknown id", function()
        local state, version = es.repository(store):load(Order, "nobody")
        assert.equal(0, version)
        assert.equal("none", state.status)
      end)
    end)

    describe("upcasting", function()
      local function v1_events(id)
        assert(store:append(Order:stream(id), {
          { type = "OrderCreated", data = { order_id = id, customer_id = "c1" } },
          -- v1 shapes: no schema_version at all, and an explicit 1
          { type = "ItemAdded", data = { product_id = "p1", quantity = 2, price = "12.50" } },
          { type = "ItemAdded", data = { product_id = "p2", quantity = 1, price = "0.99" },
            metadata = { schema_version = 1 } },
        }))
      end

      it("reads ItemAdded v1 (price \"12.50\") as v2 (unit_price 1250)", function()
        v1_events("u1")
        local repo = es.repository(store)
        local state = repo:load(Order, "u1")
        assert.same({ { product_id = "p1", quantity = 2, unit_price = 1250 },
                      { product_id = "p2", quantity = 1, unit_price = 99 } }, state.items)
        assert.equal(2599, state.total)
        -- mixing with new v2 events, through execute
        assert(repo:execute(Order, "u1", "AddItem", { product_id = "p1", quantity = 1, unit_price = 1250 }))
        local r = assert(repo:execute(Order, "u1", "PlaceOrder", {}))
        assert.equal(3849, r.state.total)
      end)

      it("never rewrites stored events; history shows the current shape (raw on request)", function()
        v1_events("u2")
        local repo = es.repository(store)
        local trail = repo:history(Order, "u2")
        assert.same({ product_id = "p1", quantity = 2, unit_price = 1250 }, trail[2].data)
        local raw = repo:history(Order, "u2", { raw = true })
        assert.equal("12.50", raw[2].data.price)
        local stored = {}
        for e in store:read("Order-u2") do stored[#stored + 1] = e end
        assert.equal("12.50", stored[2].data.price)
        assert.is_nil(stored[2].data.unit_price)
      end)
    end)

    describe("history", function()
      it("gives every event with type, data, metadata, recorded_at, version, position, id", function()
        local repo = es.repository(store)
        local A = counter()
        assert(repo:execute(A, "h", "Add", { by = 1 }, { metadata = { user = "u1" } }))
        assert(repo:execute(A, "h", "Add", { by = 2 }, { metadata = { user = "u2" } }))
        local trail = repo:history(A, "h")
        assert.equal(2, #trail)
        for i, e in ipairs(trail) do
          assert.equal(i, e.version)
          assert.equal("Added", e.type)
          assert.equal("u" .. i, e.metadata.user)
          assert.equal(i, e.data.by)
          assert.matches("^%d%d%d%d%-%d%d%-%d%dT", e.recorded_at)
          assert.is_number(e.position)
          assert.is_string(e.id)
        end
        assert.same({}, repo:history(A, "nothing"))
      end)
    end)
  end)
end
