-- Read models: definitions, handlers, queries, inline updates, the order read model.
local helpers = require "helpers"
local es = require "eventsourcing"


local function counter_model(name)
  return es.read_model {
    name = name or "rm_counter",
    columns = { id = "text", n = "bigint", label = "text", at = "timestamptz",
                tags = "jsonb", score = "double precision" },
    indexes = { "label", { "label", "n" } },
    on = {
      Inc = function(row, e)
        row.n = (row.n or 0) + 1
        row.at = e.recorded_at
        row.label = e.data.label or row.label
      end,
      Tag = function(row, e)
        row.tags = row.tags or es.json.array {}
        row.tags[#row.tags + 1] = e.data.tag
      end,
      Replace = function(_, e) return { n = 100, label = e.data.label } end,
      Gone = function() return es.read_model.DELETE end,
    },
  }
end

describe("es.read_model definitions", function()
  it("validates names, columns, types and indexes", function()
    local function def(over)
      local d = { name = "rm_x", columns = { id = "text" }, on = {} }
      for k, v in pairs(over) do d[k] = v end
      return d
    end
    assert.has_error(function() es.read_model(def { name = "Bad-Name" }) end)
    assert.has_error(function() es.read_model(def { name = ("a"):rep(64) }) end)
    assert.has_error(function() es.read_model(def { name = 'x"; DROP TABLE y; --' }) end)
    assert.has_error(function() es.read_model(def { columns = { id = "text", ["x y"] = "text" } }) end)
    assert.has_error(function() es.read_model(def { columns = { id = "text", x = "text; DROP" } }) end)
    assert.has_error(function() es.read_model(def { columns = { uid = "text" } }) end) -- key missing
    assert.has_error(function() es.read_model(def { indexes = { "nope" } }) end)
    assert.has_error(function() es.read_model(def { on = { A = 1 } }) end)
    for _, ff in ipairs({ 5, 101, 50.5, "50", true }) do
      assert.has_error(function() es.read_model(def { fillfactor = ff }) end,
        "es.read_model rm_x: fillfactor must be an integer from 10 to 100")
    end
    assert.equal(70, es.read_model(def { fillfactor = 70 }).fillfactor)
    local rm = es.read_model(def { columns = { id = "uuid", amount = "numeric(12, 2)", n = "int8" } })
    assert.equal("uuid", rm.types.id)
    assert.equal("numeric(12,2)", rm.types.amount)
    assert.equal("bigint", rm.types.n)
    assert.equal("id", rm.columns[1])
  end)
end)

for _, entry in ipairs(helpers.stores()) do
  describe("read models on the " .. entry.name .. " store", function()
    local store, rm, projector
    before_each(function()
      store = helpers.open(entry)
      rm = counter_model()
      projector = es.projector(store, { rm }, { batch_size = 4 })
    end)
    after_each(function() store:close() end)

    it("creates rows from a new table holding the key, updates them in place and skips unknown types", function()
      assert(store:append("Counter-a", { { type = "Inc", data = { label = "x" } },
        { type = "Unknown" }, { type = "Inc" }, { type = "Tag", data = { tag = "t1" } } }))
      assert(store:append("Counter-b", { type = "Inc", data = { label = "y" } }))
      -- 4: the Unknown event is skipped in SQL (catch_up counts events handled)
      assert.equal(4, projector:catch_up())
      local a = rm:get(store, "a")
      assert.same({ "t1" }, a.tags)
      assert.equal(2, a.n)
      assert.equal("x", a.label)
      assert.equal("a", a.id)
      assert.equal(1, rm:get(store, "b").n)
      assert.is_nil(rm:get(store, "zzz"))
      assert.equal(0, projector:catch_up())
    end)

    it("stores timestamps as ISO-8601 UTC strings like recorded_at", function()
      assert(store:append("Counter-t", { type = "Inc" }))
      projector:catch_up()
      local e
      for ev in store:read("Counter-t") do e = ev end
      assert.equal(e.recorded_at, rm:get(store, "t").at)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%dZ$", rm:get(store, "t").at)
    end)

    it("deletes rows when a handler returns DELETE, and replaces them when it returns a table", function()
      assert(store:append("Counter-a", { { type = "Inc" }, { type = "Gone" } }))
      assert(store:append("Counter-b", { { type = "Inc" }, { type = "Replace", data = { label = "r" } } }))
      assert(store:append("Counter-c", { { type = "Inc" } }))
      projector:catch_up()
      assert.is_nil(rm:get(store, "a"))
      assert.same({ 100, "r", "b" }, { rm:get(store, "b").n, rm:get(store, "b").label, rm:get(store, "b").id })
      -- delete then recreate within one batch, and delete of a row from an earlier batch
      assert(store:append("Counter-c", { { type = "Gone" }, { type = "Inc" } }))
      assert(store:append("Counter-b", { type = "Gone" }))
      projector:catch_up()
      assert.equal(1, rm:get(store, "c").n)
      assert.is_nil(rm:get(store, "b"))
    end)

    it("uses key_of to map events to rows and skips events it maps to nil", function()
      local by_customer = es.read_model {
        name = "rm_by_customer",
        columns = { customer = "text", orders = "integer" },
        key = "customer",
        key_of = function(e) return e.data.customer end,
        on = { Created = function(row) row.orders = (row.orders or 0) + 1 end },
      }
      local p = es.projector(store, { by_customer })
      assert(store:append("Order-1", { type = "Created", data = { customer = "c1" } }))
      assert(store:append("Order-2", { type = "Created", data = { customer = "c1" } }))
      assert(store:append("Order-3", { type = "Created", data = {} }))
      p:catch_up()
      assert.equal(2, by_customer:get(store, "c1").orders)
    end)

    it("finds rows by equality with keyset paging in both directions", function()
      for i = 1, 9 do
        local evs = {}
        for _ = 1, i % 4 do evs[#evs + 1] = { type = "Inc", data = { label = i % 2 == 0 and "even" or "odd" } } end
        if #evs == 0 then evs = { { type = "Tag", data = { tag = "x" } } } end  -- row with n = NULL
        assert(store:append(("Counter-k%d"):format(i), evs))
      end
      projector:catch_up()
      local function collect(where, opts)
        local ids, after, pages = {}, nil, 0
        repeat
          opts.after = after
          local rows, nxt = rm:find(store, where, opts)
          assert.is_table(rows)
          for _, r in ipairs(rows) do ids[#ids + 1] = r.id .. ":" .. tostring(r.n) end
          after, pages = nxt, pages + 1
        until not after
        return ids, pages
      end
      local asc, pages = collect({}, { order_by = "n", limit = 2 })
      assert.same({ "k1:1", "k5:1", "k9:1", "k2:2", "k6:2", "k3:3", "k7:3", "k4:nil", "k8:nil" }, asc)
      assert.equal(5, pages)
      local desc = collect({}, { order_by = "n", desc = true, limit = 3 })
      assert.same({ "k8:nil", "k4:nil", "k7:3", "k3:3", "k6:2", "k2:2", "k9:1", "k5:1", "k1:1" }, desc)
      local odd = collect({ label = "odd" }, { order_by = "n", limit = 1 })
      assert.same({ "k1:1", "k5:1", "k9:1", "k3:3", "k7:3" }, odd)
      local by_key = collect({}, { limit = 4 })
      assert.equal(9, #by_key)
      assert.equal("k1:1", by_key[1])
      local rows, err = rm:find(store, {}, { order_by = "n", after = "garbage!" })
      assert.is_nil(rows)
      assert.equal("invalid", err.kind)
      assert.has_error(function() rm:find(store, { ["n; drop"] = 1 }) end)
      assert.has_error(function() rm:find(store, {}, { order_by = "nope" }) end)
    end)

    it("keeps hostile values as data", function()
      local evil = [[x'); DROP TABLE rm_counter; --"]]
      assert(store:append("Counter-q", { type = "Inc", data = { label = evil } }))
      projector:catch_up()
      assert.equal(evil, rm:get(store, "q").label)
      local rows = rm:find(store, { label = evil })
      assert.equal(1, #rows)
    end)

    it("applies inline read models with the appending transaction", function()
      assert(projector:migrate())
      local function append_inline(stream, events)
        if entry.name == "memory" then
          local res = assert(store:append(stream, events))
          local evs = {}
          for i, e in ipairs(events) do
            evs[i] = { stream = stream, type = e.type, data = e.data or {}, version = res.version - #events + i }
          end
          return es.read_model.apply_inline(store, { rm }, evs)
        end
        assert(store:begin())
        local res, err = store:append(stream, events)
        if not res then store:rollback(); return nil, err end
        local first = res.version - #events + 1
        local evs = {}
        for i, e in ipairs(events) do
          evs[i] = { stream = stream, type = e.type, data = e.data or {}, version = first + i - 1 }
        end
        local ok, aerr = es.read_model.apply_inline(store, { rm }, evs)
        if not ok then store:rollback(); return nil, aerr end
        assert(store:commit())
        return true
      end
      assert(append_inline("Counter-i", { { type = "Inc", data = { label = "l" } }, { type = "Inc" } }))
      local row = rm:get(store, "i")
      assert.equal(2, row.n)
      assert.matches("Z$", row.at)
      -- a failing handler: the caller rolls back; nothing is left behind (PostgreSQL)
      local bad = es.read_model { name = "rm_bad", columns = { id = "text" },
        on = { Inc = function() error("boom") end } }
      if entry.name ~= "memory" then
        assert(bad:migrate(store))
        assert(store:begin())
        assert(store:append("Counter-j", { type = "Inc" }))
        local ok, err = es.read_model.apply_inline(store, { rm, bad },
          { { stream = "Counter-j", type = "Inc", data = {}, version = 1 } })
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.equal("rm_bad", err.read_model)
        assert.matches("boom", err.message)
        assert(store:rollback())
        assert.is_nil(rm:get(store, "j"))
        assert.equal(0, store:version("Counter-j"))
      end
    end)
  end)
end

describe("read models on PostgreSQL", function()
  local store, schema
  before_each(function() store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() }) end)
  after_each(function() store:close() end)

  it("writes a row touched many times in a batch once, with one upsert", function()
    local rm = counter_model()
    local p = es.projector(store, { rm }, { batch_size = 1000 })
    assert(p:migrate())
    assert(store:query(([[CREATE TABLE "%s".writes (n int)]]):format(schema)))
    assert(store:query(([[CREATE FUNCTION "%s".count_write() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN INSERT INTO "%s".writes VALUES (1); RETURN NEW; END $$]]):format(schema, schema)))
    assert(store:query(([[CREATE TRIGGER w BEFORE INSERT OR UPDATE ON "%s".rm_counter
      FOR EACH ROW EXECUTE FUNCTION "%s".count_write()]]):format(schema, schema)))
    local evs = {}
    for i = 1, 50 do evs[i] = { type = "Inc" } end
    assert(store:append("Counter-hot", evs))
    assert(store:append("Counter-cold", { type = "Inc" }))
    assert.equal(51, p:catch_up())
    assert.equal(50, rm:get(store, "hot").n)
    assert.equal(2, store:query(([[SELECT count(*) AS n FROM "%s".writes]]):format(schema))[1].n)
  end)

  -- A few upserts go as one typed parameter per column, more as JSON
  -- (json_populate_recordset): both must store the same values.
  it("stores a row written alone or with a few as it stores the same row in a large batch", function()
    local rm = es.read_model { name = "rm_typed", columns = {
      id = "text", t = "text", t2 = "text", j = "jsonb", j2 = "jsonb", j3 = "jsonb", num = "numeric",
      f = "double precision", r = "real", i = "bigint", b = "boolean", ts = "timestamptz",
      d = "date", u = "uuid", gone = "text" },
      on = { Set = function(row, e) for k, v in pairs(e.data) do row[k] = v end end } }
    assert(rm:migrate(store))
    local values = { t = 0.1, t2 = true, j = "a \"string\"", j2 = { a = { 1, 2.5 } }, j3 = 7,
      num = 0.1, f = 0.1, r = 0.1, i = 2.0, b = true, ts = "2026-01-15T10:00:00.123456Z",
      d = "2026-01-15", u = "0b9c6c1e-8d6f-4c3e-9a55-7c1f0e2d3b4a", gone = es.json.null }
    local function apply(events)
      for i, e in ipairs(events) do
        e.version, e.recorded_at, e.type, e.data = i, "2026-01-15T10:00:00Z", "Set", e.data or values
      end
      assert(store:begin())
      local ok, err = es.read_model.apply_inline(store, { rm }, events)
      if ok then assert(store:commit()) else store:rollback() end
      return ok, err
    end
    assert(apply { { stream = "T-alone" } })
    assert(apply { { stream = "T-few1" }, { stream = "T-few2" } })
    local batch = {}
    for i = 1, rm._TYPED_MAX + 1 do batch[i] = { stream = "T-many" .. i } end
    assert(apply(batch))
    local rows = assert(store:query(([[SELECT id, t, t2, j::text AS j, j2::text AS j2, j3::text AS j3,
      num::text AS num, f::text AS f, r::text AS r, i, b, ts::text AS ts, d::text AS d, u::text AS u,
      gone IS NULL AS gone FROM "%s".rm_typed ORDER BY id]]):format(schema)))
    assert.equal(rm._TYPED_MAX + 4, #rows)
    local alone = rows[1]
    assert.equal("alone", alone.id)
    for i = 2, #rows do
      rows[i].id = "alone"
      assert.same(rows[i], alone)
    end
    assert.same({ "0.1", "true", '"a \\"string\\""', "0.1", 2, true },
      { alone.t, alone.t2, alone.j, alone.num, alone.i, alone.b })
    -- values no JSON can hold are refused alone as in a batch, and nothing is stored
    for _, bad in ipairs { 0 / 0, math.huge, print } do
      local ok, err = apply { { stream = "T-alone", data = { f = bad } } }
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.matches("rm_typed: a row cannot be stored", err.message, 1, true)
    end
    -- a string that is not UTF-8 in a jsonb column: refused, never NULL
    -- (alone and with a few, as in a large batch)
    for _, n in ipairs { 1, 2, rm._TYPED_MAX + 1 } do
      local evs = {}
      for i = 1, n do evs[i] = { stream = i == 1 and "T-alone" or ("T-few" .. i), data = { j = "caf\xe9" } } end
      local ok, err = apply(evs)
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.matches("rm_typed: a row cannot be stored", err.message, 1, true)
    end
    -- text PostgreSQL cannot hold: refused by the session or the server
    for _, bad in ipairs { "a\0b", "\xff\xfe" } do
      local ok, err = apply { { stream = "T-alone", data = { t = bad } } }
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
    end
    assert.same(alone, assert(store:query(([[SELECT id, t, t2, j::text AS j, j2::text AS j2, j3::text AS j3,
      num::text AS num, f::text AS f, r::text AS r, i, b, ts::text AS ts, d::text AS d, u::text AS u,
      gone IS NULL AS gone FROM "%s".rm_typed WHERE id = 'alone']]):format(schema)))[1])
  end)

  it("keeps a json column's text as written; it cannot be the key, be indexed or order rows", function()
    local function def(over)
      local d = { name = "rm_json", columns = { id = "text", doc = "json", label = "text" },
        on = { Set = function(row, e) row.doc, row.label = e.data.doc, e.data.label end } }
      for k, v in pairs(over or {}) do d[k] = v end
      return d
    end
    assert.has_error(function() es.read_model(def { key = "doc" }) end,
      'es.read_model rm_json: key column "doc" is json, which has no equality: use text or jsonb')
    assert.has_error(function() es.read_model(def { indexes = { { "label", "doc" } } }) end,
      'es.read_model rm_json: index 1 names column "doc", which is json (no btree index): use jsonb')
    local rm = es.read_model(def())
    assert.equal("json", rm.types.doc)
    assert(rm:migrate(store))
    assert.equal("json", store:query(([[SELECT format_type(atttypid, atttypmod) AS t FROM pg_attribute
      WHERE attrelid = '"%s".rm_json'::regclass AND attname = 'doc']]):format(schema))[1].t)
    local function apply(events)
      for i, e in ipairs(events) do e.version, e.recorded_at, e.type = i, "2026-01-15T10:00:00Z", "Set" end
      assert(store:begin())
      local ok, err = es.read_model.apply_inline(store, { rm }, events)
      if ok then assert(store:commit()) else store:rollback() end
      return ok, err
    end
    -- one row (typed parameters) and a batch (JSON rows): the same text
    local doc = { b = es.json.array { 1, 2.5 }, a = "x" }
    assert(apply { { stream = "J-one", data = { doc = doc, label = "l" } } })
    local batch = {}
    for i = 1, rm._TYPED_MAX + 1 do batch[i] = { stream = "J-many" .. i, data = { doc = doc, label = "l" } } end
    assert(apply(batch))
    local texts = assert(store:query(([[SELECT DISTINCT doc::text AS t FROM "%s".rm_json]]):format(schema)))
    assert.same({ { t = es.json.encode(doc) } }, texts)
    assert.same(doc, rm:get(store, "one").doc)
    -- find compares a json column as jsonb: spacing and key order aside
    assert(store:query(([[INSERT INTO "%s".rm_json VALUES ('raw', '{ "b": [1, 2.5],  "a": "x" }', 'l')]])
      :format(schema)))
    local rows = assert(rm:find(store, { doc = { a = "x", b = { 1, 2.5 } }, label = "l" }, { limit = 50 }))
    assert.equal(rm._TYPED_MAX + 3, #rows)
    assert.equal(rm._TYPED_MAX + 3, #assert(rm:find(store, { doc = { b = { 1, 2.5 }, a = "x" } }, { limit = 50 })))
    assert.same(doc, rm:get(store, "raw").doc)
    assert.equal(0, #assert(rm:find(store, { doc = { a = "y" } })))
    assert.has_error(function() rm:find(store, {}, { order_by = "doc" }) end,
      'read_model:find: order_by "doc" is a json column of rm_json, which has no order')
    -- a string that is not UTF-8, or holds a NUL byte (json would keep
    -- \u0000, jsonb, which find compares it as, cannot hold it): refused
    -- alone, with a few and in a batch, the rows kept as they were
    for _, bad in ipairs { "caf\xe9", "a\0b", { s = "a\0b" } } do
      for _, n in ipairs { 1, 2, rm._TYPED_MAX + 1 } do
        local evs = {}
        for i = 1, n do
          evs[i] = { stream = i == 1 and "J-one" or ("J-many" .. i), data = { doc = bad, label = "m" } }
        end
        local ok, err = apply(evs)
        assert.is_nil(ok)
        assert.equal("invalid", err.kind)
        assert.matches("rm_json: a row cannot be stored", err.message, 1, true)
      end
    end
    assert.equal("l", rm:get(store, "one").label)
    -- and by COPY (a rebuild's new rows)
    local ok, err = store:copy_rows("rm_json", rm.columns, { { id = "c1", doc = { s = "a\0b" }, label = "c" } },
      { json = { "doc" } })
    assert.is_nil(ok)
    assert.matches("a string contains a NUL byte", err.message, 1, true)
    -- a backslash before "u0000" is no NUL: kept
    assert(apply { { stream = "J-one", data = { doc = { s = "\\u0000" }, label = "n" } } })
    assert.equal("\\u0000", rm:get(store, "one").doc.s)
    assert(store:copy_rows("rm_json", rm.columns, { { id = "c2", doc = { s = "\\u0000" }, label = "c" } },
      { json = { "doc" } }))
    assert.is_nil(rm:get(store, "c1"))
    assert.equal("\\u0000", rm:get(store, "c2").doc.s)
  end)

  it("creates the table with the key as primary key and the declared indexes", function()
    local rm = counter_model()
    assert(es.projector(store, { rm }):migrate())
    local idx = store:query([[SELECT indexname FROM pg_indexes WHERE schemaname = $1
      AND tablename = 'rm_counter' ORDER BY indexname]], schema)
    local names = {}
    for _, r in ipairs(idx) do names[#names + 1] = r.indexname end
    assert.same({ "rm_counter_label_idx", "rm_counter_label_n_idx", "rm_counter_pkey" }, names)
    assert(es.projector(store, { rm }):migrate())     -- idempotent
  end)
end)

for _, entry in ipairs(helpers.stores()) do
  describe("the order read model on the " .. entry.name .. " store", function()
    local orders_rm = require "orders.read_model"
    local store
    before_each(function() store = helpers.open(entry) end)
    after_each(function() store:close() end)

    it("projects the Order aggregate's events and answers get_order / list_orders", function()
      local v2 = { schema_version = 2 }     -- as the repository writes ItemAdded
      local function order(id, customer, extra)
        local evs = { { type = "OrderCreated", data = { order_id = id, customer_id = customer } },
          { type = "ItemAdded", data = { product_id = "p1", quantity = 2, unit_price = 1250 }, metadata = v2 },
          { type = "ItemAdded", data = { product_id = "p2", quantity = 1, unit_price = 499 }, metadata = v2 },
          { type = "ItemAdded", data = { product_id = "p1", quantity = 1, unit_price = 1250 }, metadata = v2 } }
        for _, e in ipairs(extra or {}) do evs[#evs + 1] = e end
        assert(store:append("Order-" .. id, evs))
      end
      order("o1", "c1")
      order("o2", "c1", { { type = "ItemRemoved", data = { product_id = "p2", quantity = 1, unit_price = 499 } },
        { type = "OrderPlaced", data = { total = 3750, item_count = 1 } } })
      order("o3", "c1", { { type = "OrderCancelled",
        data = { reason = "changed my mind", previous_status = "draft" } } })
      order("o4", "c2")
      -- a v1 ItemAdded (price as a decimal string), upcast by the read model
      assert(store:append("Order-o4", { type = "ItemAdded",
        data = { product_id = "p9", quantity = 1, price = "0.99" },
        metadata = { schema_version = 1 } }))
      local p = es.projector(store, { orders_rm.Orders })
      assert.equal(20, p:catch_up())
      local o1 = assert(orders_rm.get_order(store, "o1"))
      assert.same({ { product_id = "p1", quantity = 3, unit_price = 1250 },
                    { product_id = "p2", quantity = 1, unit_price = 499 } }, o1.items)
      assert.same({ "c1", "draft", 2, 4249, 4 }, { o1.customer_id, o1.status, o1.item_count, o1.total, o1.version })
      local o2 = orders_rm.get_order(store, "o2")
      assert.same({ "placed", 3750, 1 }, { o2.status, o2.total, o2.item_count })
      assert.matches("Z$", o2.placed_at)
      local o3 = orders_rm.get_order(store, "o3")
      assert.same({ "cancelled", "changed my mind" }, { o3.status, o3.cancel_reason })
      assert.equal(4249 + 99, orders_rm.get_order(store, "o4").total)
      local none, err = orders_rm.get_order(store, "nope")
      assert.is_nil(none)
      assert.equal("not_found", err.kind)

      local page1, nxt = orders_rm.list_orders(store, "c1", { limit = 2 })
      assert.equal(2, #page1)
      assert.is_string(nxt)
      local page2, nxt2 = orders_rm.list_orders(store, "c1", { limit = 2, after = nxt })
      assert.equal(1, #page2)
      assert.is_nil(nxt2)
      -- newest first: created_at descending, then id descending
      local all = { page1[1], page1[2], page2[1] }
      for i = 2, 3 do
        assert.is_true(all[i - 1].created_at > all[i].created_at
          or (all[i - 1].created_at == all[i].created_at and all[i - 1].id > all[i].id))
      end
      local placed = orders_rm.list_orders(store, "c1", { status = "placed" })
      assert.equal(1, #placed)
      assert.equal("o2", placed[1].id)
      assert.equal(0, #orders_rm.list_orders(store, "c9"))
      local q = orders_rm.queries(store)
      assert.equal("o1", q.get_order("o1").id)
      assert.equal(3, #q.list_orders("c1"))
    end)
  end)
end
