-- The repository's state cache (opts.cache) against both stores: a
-- command starts from the state the last one left, and a state that is
-- behind its stream (another writer went first) never decides anything:
-- the append's expected version refuses it and the stream is read, and a
-- refusal or a no-op is decided again from the stream.
package.path = "examples/?.lua;" .. package.path

local es = require "eventsourcing"
local helpers = require "helpers"

local counter, add = helpers.counter, helpers.add
-- commands that went in one round trip: none on Citus, where an append
-- and the statement behind it take two
local function trips(n) return helpers.distributed() and 0 or n end

describe("es.state_cache", function()
  it("keeps at most about twice its size, the entries read last", function()
    local c = es.state_cache { size = 2 }
    c:set("a", "1"); c:set("b", "2")
    c:set("c", "3")                 -- a and b move to the older half
    assert.equal("1", c:get("a"))   -- read: back in the newer half
    c:set("d", "4")                 -- newer half full again: b goes
    assert.is_nil(c:get("b"))
    assert.equal("1", c:get("a"))
    assert.equal("4", c:get("d"))
    c:delete("a")
    assert.is_nil(c:get("a"))
  end)

  it("refuses bad options, and a repository refuses a cache without get and set", function()
    assert.has_error(function() es.state_cache { size = 0 } end,
      "es.state_cache: size must be a positive integer")
    assert.has_error(function() es.state_cache("x") end, "es.state_cache: opts must be a table")
    assert.has_error(function() es.repository(es.open("memory:"), { cache = {} }) end,
      "es.repository: cache must have get and set methods (es.state_cache{...})")
  end)
end)

for _, entry in ipairs(helpers.stores()) do
  describe("repository state cache (" .. entry.name .. ")", function()
    local store, schema

    before_each(function()
      store, schema = helpers.open(entry)
    end)
    after_each(function()
      if store then store:close() end
    end)

    -- another writer without a cache: memory shares the store
    local function other()
      local s2, own = helpers.second_store(entry, store, schema)
      return es.repository(s2), function() if own then s2:close() end end
    end

    it("starts the next command from the state the last one left, without a read", function()
      local A = counter()
      local repo = es.repository(store, { cache = es.state_cache() })
      local plain = es.repository(store)
      assert(add(repo, A, "a", 1))
      assert.equal(1, repo.stats.loads)
      local r = assert(add(repo, A, "a", 2))
      assert(add(repo, A, "a", 3))
      assert.equal(1, repo.stats.loads, "no stream read after the first command")
      assert.equal(2, repo.stats.cache_hits)
      assert.equal(2, r.version)
      local state, version = plain:load(A, "a")
      assert.equal(3, version)
      assert.same({ 1, 2, 3 }, state.log)
      assert.equal(6, state.n)
    end)

    it("reads the stream when another writer went first: no event lost, doubled or out of order", function()
      local A = counter()
      local repo = es.repository(store, { cache = es.state_cache(), max_retries = 0 })
      local writer, done = other()
      assert(add(repo, A, "b", 1))
      assert(add(writer, A, "b", 10))          -- the cache is now one behind
      local r = assert(add(repo, A, "b", 100))
      assert.equal(3, r.version)
      assert.equal(111, r.state.n)
      assert.equal(1, repo.stats.cache_stale)
      assert.equal(0, repo.stats.retries, "not counted in max_retries")
      assert(add(repo, A, "b", 1000))          -- and the cache is right again
      assert.equal(2, repo.stats.cache_hits)
      local state, version = writer:load(A, "b")
      assert.equal(4, version)
      assert.same({ 1, 10, 100, 1000 }, state.log)
      done()
    end)

    it("refuses only what the stream's head refuses", function()
      local A = counter()
      local repo = es.repository(store, { cache = es.state_cache() })
      local writer, done = other()
      assert(add(repo, A, "c", 1))
      assert(add(writer, A, "c", 8))
      -- the cache says 1 < 4 (refused); the stream has 9
      local r = assert(repo:execute(A, "c", "Take", { by = 4 }))
      assert.equal(3, r.version)
      assert.equal(5, r.state.n)
      assert(add(writer, A, "c", 3))
      -- the cache says 5 + 5 <= 10; the stream says 8 + 5 > 10
      local err
      r, err = add(repo, A, "c", 5, { max = 10 })
      assert.is_nil(r)
      assert.equal("rejected", err.kind)
      assert.equal(4, store:version("Counter-c"))
      done()
    end)

    it("answers a no-op and the caller's expected version from the stream", function()
      local A = counter()
      local repo = es.repository(store, { cache = es.state_cache() })
      local writer, done = other()
      assert(add(repo, A, "d", 1))
      assert(add(writer, A, "d", 2))
      local r = assert(repo:execute(A, "d", "Noop", {}))
      assert.equal(2, r.version, "the stream's version, not the cache's")
      r = assert(repo:execute(A, "d", "Add", { by = 3 }, { expected_version = 2 }))
      assert.equal(3, r.version)
      local _, err = repo:execute(A, "d", "Add", { by = 3 }, { expected_version = 2 })
      assert.equal("conflict", err.kind)
      assert.equal(3, err.actual)
      done()
    end)

    it("keeps text: what a command's rules or its caller do to a state never reaches the next", function()
      local A = counter()
      local repo = es.repository(store, { cache = es.state_cache() })
      local r = assert(add(repo, A, "e", 1))
      r.state.n = 1000                          -- the caller's copy
      local _, err = add(repo, A, "e", 1, { max = 0, hook = function(s) s.log[1] = 50 end })
      assert.equal("rejected", err.kind)
      r = assert(add(repo, A, "e", 2))
      assert.equal(3, r.state.n)
      assert.same({ 1, 2 }, r.state.log)
    end)

    it("ignores an entry it cannot read and does not cache a state JSON cannot hold", function()
      local cache = es.state_cache()
      local A = counter()
      local repo = es.repository(store, { cache = cache })
      assert(add(repo, A, "f", 1))
      cache:set("1 Counter-f", "7 0 {not json")
      assert.equal(2, assert(add(repo, A, "f", 1)).version)
      cache:set("1 Counter-f", "garbage")
      assert.equal(3, assert(add(repo, A, "f", 1)).version)
      assert.equal(0, repo.stats.cache_hits)

      local B = counter { unencodable = true }
      local repo2 = es.repository(store, { cache = es.state_cache() })
      assert(add(repo2, B, "g", 1))
      assert(add(repo2, B, "g", 1))
      assert.equal(0, repo2.stats.cache_hits)
      assert.equal(2, repo2.stats.loads)
    end)

    it("keeps the stream's head after a refusal found the cached state behind", function()
      local cache = es.state_cache()
      local A = counter()
      local repo = es.repository(store, { cache = cache })
      local writer, done = other()
      assert(add(repo, A, "r", 1))
      assert(add(writer, A, "r", 8))
      -- refused from the cache (1 < 50), and from the stream (9 < 50)
      local _, err = repo:execute(A, "r", "Take", { by = 50 })
      assert.equal("rejected", err.kind)
      assert.equal(1, repo.stats.cache_stale)
      assert.equal("2 0 ", cache:get("1 Counter-r"):sub(1, 4))
      _, err = repo:execute(A, "r", "Take", { by = 50 })   -- the head now: nothing stale
      assert.equal("rejected", err.kind)
      assert.equal(1, repo.stats.cache_stale)
      assert.equal(2, repo.stats.cache_hits)
      done()
    end)

    it("does not cache a state JSON would give back otherwise", function()
      -- an empty table without a shape comes back an object: t[#t + 1]
      -- would then set the key "1" instead of appending
      local Tags = es.aggregate {
        name = "Tags",
        initial = function() return { tags = {} } end,
        apply = {
          Created = function(s) s.created = true end,
          Tagged = function(s, e) s.tags[#s.tags + 1] = e.data.tag end,
        },
        decide = {
          Create = function() return { type = "Created" } end,
          Tag = function(s, c)
            for _, t in ipairs(s.tags) do
              if t == c.tag then return nil, "already tagged " .. t end
            end
            if #s.tags >= 2 then return nil, "at most 2 tags" end
            return { type = "Tagged", data = { tag = c.tag } }
          end,
        },
      }
      local cache = es.state_cache()
      local repo = es.repository(store, { cache = cache })
      assert(repo:execute(Tags, "t", "Create", {}))
      assert.is_nil(cache:get("1 Tags-t"), "tags = {} is not cached")
      assert(repo:execute(Tags, "t", "Tag", { tag = "a" }))
      local _, err = repo:execute(Tags, "t", "Tag", { tag = "a" })
      assert.equal("already tagged a", err.message)
      assert(repo:execute(Tags, "t", "Tag", { tag = "b" }))
      _, err = repo:execute(Tags, "t", "Tag", { tag = "c" })
      assert.equal("at most 2 tags", err.message)
      assert.same({ "a", "b" }, repo:load(Tags, "t").tags)
      assert.equal(3, store:version("Tags-t"))
    end)

    it("does not take a stream that reached the cached version with other events for "
      .. "its state (a restore from a backup, or a cache given to two stores)", function()
      local A = counter()
      local cache = es.state_cache()
      local repo = es.repository(store, { cache = cache, max_retries = 0 })
      assert(add(repo, A, "z", 1))
      assert(add(repo, A, "z", 2))               -- cached: version 2, n = 3
      -- the same stream as a restore leaves it: version 2, other events
      local restored, rschema = helpers.open(entry)
      assert(add(es.repository(restored), A, "z", 10))
      assert(add(es.repository(restored), A, "z", 20))
      local repo2 = es.repository(restored, { cache = cache, max_retries = 0 })
      local r = assert(add(repo2, A, "z", 100))
      assert.equal(3, r.version)
      assert.equal(130, r.state.n, "decided from the stream, not the cached state")
      assert.equal(1, repo2.stats.cache_hits)
      assert.equal(1, repo2.stats.cache_stale)
      assert.equal(0, repo2.stats.retries, "not counted in max_retries")
      local state = es.repository(restored):load(A, "z")
      assert.same({ 10, 20, 100 }, state.log)
      -- the state kept now is the restored stream's
      assert(add(repo2, A, "z", 1000))
      assert.equal(2, repo2.stats.cache_hits)
      assert.equal(1, repo2.stats.cache_stale)
      if rschema then assert(restored:query('DROP SCHEMA "' .. rschema .. '" CASCADE')) end
      restored:close()
    end)

    it("still saves snapshots every snapshot_every events", function()
      if not store.save_snapshot then return end
      local A = counter { snapshot_every = 3, snapshot_version = 1 }
      local repo = es.repository(store, { cache = es.state_cache() })
      for i = 1, 7 do assert(add(repo, A, "h", i)) end
      assert.equal(2, repo.stats.snapshots_saved)
      local snap = store:load_snapshot("Counter-h", { schema_version = 1 })
      assert.equal(6, snap.version)
      assert.equal(21, snap.state.n)
    end)
  end)
end

describe("a state cache inside the caller's transaction (postgresql)", function()
  it("is neither read nor written there: a rolled back command leaves nothing behind", function()
    local store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    local store2 = assert(es.open(helpers.database_url(), { schema = schema }))
    local A = counter()
    local cache = es.state_cache()
    local repo = es.repository(store, { cache = cache })
    assert(repo:execute(A, "x", "Add", { by = 10 }))            -- cached at version 1
    assert.is_false(store:in_transaction())
    assert(store:begin())
    assert.is_true(store:in_transaction())
    local r = assert(repo:execute(A, "x", "Add", { by = 1000 }))
    assert.equal(2, r.version)
    assert(store:rollback())
    assert.is_false(store:in_transaction())
    assert.is_false(es.open("memory:"):in_transaction())
    assert.equal("1 0 ", cache:get("1 Counter-x"):sub(1, 4))
    assert(es.repository(store2):execute(A, "x", "Add", { by = 5 }))   -- version 2: n = 15
    local _, err = repo:execute(A, "x", "Take", { by = 500 })
    assert.equal("rejected", err.kind)
    assert.equal(15, repo:load(A, "x").n)
    store2:close()
    store:close()
  end)
end)

describe("the order service with a state cache and its inline read model (postgresql)", function()
  local service = require "orders.service"
  local function row_key(id)
    return require("eventsourcing.repository")._row_key(service.read_models[1], "Order-" .. id)
  end
  local store, store2

  before_each(function()
    local schema
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    assert(service.migrate(store))
    store2 = assert(es.open(helpers.database_url(), { schema = schema }))
  end)
  after_each(function()
    store:close()
    store2:close()
  end)

  it("lets go of an order an idempotent request changed (repo:forget)", function()
    local idem = require "orders.http.idempotency"
    local Order = require "orders.order"
    assert(idem.migrate(store))
    local cache = es.state_cache()
    local svc = service.new(store, { cache = cache })
    local repo = svc.repository
    local id = assert(svc.create_order({ customer_id = "c1" }, { user = "u" }))
    assert.is_string(cache:get("1 Order-" .. id))
    assert.is_string(cache:get(row_key(id)))
    local status = idem.run(store, { principal = "customer:c1", key = "k-1", method = "POST",
      path = "/orders/" .. id .. "/items", body = "{}" }, function(ctx)
      assert(ctx.execute(repo, Order, id, "AddItem",
        { product_id = "p1", quantity = 1, unit_price = 100 }))
      return 200, "{}"
    end)
    assert.equal(200, status)
    assert.is_nil(cache:get("1 Order-" .. id), "forgotten")
    assert.is_nil(cache:get(row_key(id)), "its row too")
    assert(svc.add_item { order_id = id, product_id = "p2", quantity = 1, unit_price = 100 })
    assert.equal(0, repo.stats.cache_stale, "read, not met behind")
    assert.equal(3, store:version("Order-" .. id))
    repo:forget(Order, id)
    assert.is_nil(cache:get("1 Order-" .. id))
    es.repository(store):forget(Order, id)   -- no cache: nothing to do
  end)

  -- the row as the service shows it, without what differs between orders
  local function shown(svc, id)
    local o = assert(svc.get_order(id))
    o.id, o.created_at, o.placed_at, o.cancelled_at = nil, nil, nil, nil
    return o
  end

  it("runs a command whose read model row it holds in one round trip, "
    .. "and leaves the row the two round trips leave", function()
    local cached = service.new(store, { cache = es.state_cache() })
    local plain = service.new(store2)
    local a = assert(cached.create_order({ customer_id = "c1" }, { user = "u" }))
    local b = assert(plain.create_order({ customer_id = "c1" }, { user = "u" }))
    local steps = {
      { "add_item", { product_id = "p1", quantity = 2, unit_price = 250 } },
      { "add_item", { product_id = "p2", quantity = 1, unit_price = 1000 } },
      { "add_item", { product_id = "p1", quantity = 3, unit_price = 250 } },
      { "remove_item", { product_id = "p2" } },
      { "add_item", { product_id = "p3", quantity = 1, unit_price = 5 } },
    }
    for _, step in ipairs(steps) do
      for _, pair in ipairs({ { cached, a }, { plain, b } }) do
        local args = { order_id = pair[2] }
        for k, v in pairs(step[2]) do args[k] = v end
        assert(pair[1][step[1]](args))
      end
      assert.same(shown(plain, b), shown(cached, a))
    end
    -- the first command (OrderCreated reads recorded_at) went the long way
    assert.equal(trips(#steps), cached.repository.stats.one_trips)
    assert.equal(trips(0), plain.repository.stats.one_trips)
    assert.equal(6, store:version("Order-" .. a))
  end)

  it("goes the two round trips when a handler reads what only the append gives", function()
    local cached = service.new(store, { cache = es.state_cache() })
    local id = assert(cached.create_order({ customer_id = "c1" }, { user = "u" }))
    assert(cached.add_item { order_id = id, product_id = "p1", quantity = 1, unit_price = 100 })
    assert.equal(trips(1), cached.repository.stats.one_trips)
    assert(cached.place_order { order_id = id })   -- OrderPlaced: placed_at = recorded_at
    assert.equal(trips(1), cached.repository.stats.one_trips)
    local placed = cached.repository:history(require("orders.order"), id)[3]
    local row = assert(cached.get_order(id))
    assert.equal(placed.recorded_at, row.placed_at)
    assert.equal("placed", row.status)
  end)

  it("records its transaction for a rebuild that is running", function()
    local cached = service.new(store, { cache = es.state_cache() })
    local id = assert(cached.create_order({ customer_id = "c1" }, { user = "u" }))
    local s = '"' .. store:schema() .. '"'
    assert(store2:query("INSERT INTO " .. s .. ".read_model_rebuilds (id, name, txid, pid) "
      .. "VALUES ('r1', 'rm_orders', pg_current_xact_id(), pg_backend_pid())"))
    assert(cached.add_item { order_id = id, product_id = "p1", quantity = 1, unit_price = 100 })
    assert.equal(trips(1), cached.repository.stats.one_trips)
    local recorded = assert(store2:query("SELECT count(*) AS n FROM " .. s
      .. ".read_model_rebuild_writes WHERE id = 'r1'"))[1].n
    assert.equal(1, recorded)
  end)

  it("goes the long way when a handler fails on the row it holds, and refuses what the long way refuses",
    function()
    local cache = es.state_cache()
    local cached = service.new(store, { cache = cache })
    local id = assert(cached.create_order({ customer_id = "c1" }, { user = "u" }))
    -- a row the handlers cannot work with, at the right version
    local created = cached.repository:history(require("orders.order"), id)[1]
    cache:set(row_key(id), '1 ' .. created.id .. ' {"id": "' .. id .. '", "items": [7]}')
    assert(cached.add_item { order_id = id, product_id = "p1", quantity = 1, unit_price = 100 })
    assert.equal(trips(0), cached.repository.stats.one_trips)
    local row = assert(cached.get_order(id))
    assert.equal(100, row.total)
    assert.equal(1, #row.items)
    -- the row it keeps after that is the one the long way wrote
    assert(cached.add_item { order_id = id, product_id = "p2", quantity = 1, unit_price = 50 })
    assert.equal(trips(1), cached.repository.stats.one_trips)
    assert.equal(150, assert(cached.get_order(id)).total)
  end)

  it("keeps neither state nor row of an order restored from a backup that others wrote on since", function()
    local cached = service.new(store, { cache = es.state_cache() })
    local plain = service.new(store2)
    local id = assert(cached.create_order({ customer_id = "c1" }, { user = "u" }))
    local s = '"' .. store:schema() .. '"'
    -- the backup: the order as created
    assert(store2:query("CREATE TABLE " .. s .. ".backup AS SELECT * FROM " .. s
      .. ".rm_orders WHERE id = $1", id))
    assert(cached.add_item { order_id = id, product_id = "p1", quantity = 1, unit_price = 100 })
    assert.equal(trips(1), cached.repository.stats.one_trips)
    -- restored: the item's event and row are gone; another service adds its own
    assert(store2:query("DELETE FROM " .. s .. ".events WHERE stream = $1 AND version > 1",
      "Order-" .. id))
    assert(store2:query("DELETE FROM " .. s .. ".rm_orders WHERE id = $1", id))
    assert(store2:query("INSERT INTO " .. s .. ".rm_orders SELECT * FROM " .. s .. ".backup"))
    assert(plain.add_item { order_id = id, product_id = "p2", quantity = 2, unit_price = 100 })
    assert.equal(2, store:version("Order-" .. id))
    -- the cache holds version 2 with p1: neither decides nor is written
    assert(cached.add_item { order_id = id, product_id = "p3", quantity = 3, unit_price = 100 })
    assert.equal(1, cached.repository.stats.cache_stale)
    assert.equal(trips(1), cached.repository.stats.one_trips)
    local row = assert(plain.get_order(id))
    local products = {}
    for _, item in ipairs(row.items) do products[#products + 1] = item.product_id end
    table.sort(products)
    assert.same({ "p2", "p3" }, products)
    assert.equal(500, row.total)
    assert.equal(3, store:version("Order-" .. id))
    -- from there on the cache is the stream's again: one round trip
    assert(cached.add_item { order_id = id, product_id = "p4", quantity = 1, unit_price = 1 })
    assert.equal(trips(2), cached.repository.stats.one_trips)
    assert.equal(501, assert(plain.get_order(id)).total)
  end)

  it("writes the row from the stream's head after another writer went first", function()
    local cached = service.new(store, { cache = es.state_cache() })
    local plain = service.new(store2)
    local id = assert(cached.create_order({ customer_id = "c1" }, { user = "u" }))
    assert(cached.add_item { order_id = id, product_id = "p1", quantity = 1, unit_price = 100 })
    assert(plain.add_item { order_id = id, product_id = "p2", quantity = 2, unit_price = 100 })
    assert(cached.add_item { order_id = id, product_id = "p3", quantity = 3, unit_price = 100 })
    assert.equal(1, cached.repository.stats.cache_stale)
    local row = assert(plain.get_order(id))
    assert.equal(600, row.total)
    assert.equal(3, #row.items)
    assert.equal(4, store:version("Order-" .. id))
  end)
end)
