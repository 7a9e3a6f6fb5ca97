-- The OpenAPI document (issue 14 section 5), examples/orders/http/openapi.json,
-- kept true: it is served at GET /openapi.json; every documented
-- (method, path, status) has a scenario here that produces it on a real
-- server, whose body must match the documented schema (spec/json_schema.lua)
-- and carry the documented required headers; every scenario is documented;
-- every route template nginx knows is a documented path; and a method a
-- path does not document answers 404 or 405 there.
local helpers = require "helpers"
local http = require "http_client"
local es = require "eventsourcing"
local schema_check = require "json_schema"

local ALICE = "alice-token-0123456789"
local BOB = "bob-token-0123456789"
local ADMIN = "admin-token-0123456789"
local DOC_PATH = "examples/orders/http/openapi.json"
local METHODS = { "GET", "POST", "PUT", "PATCH", "DELETE" }

describe("openapi.json", function()
  local srv, store, schema, doc

  setup(function()
    doc = assert(es.json.decode(assert(http.read_file(DOC_PATH))))
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    package.path = "examples/?.lua;" .. package.path
    assert(require("orders.service").migrate(store))
    srv = http.start_server { database_url = helpers.database_url(), schema = schema,
      threads = 4, max_retries = 0, decode = es.json.decode }
  end)

  teardown(function()
    if srv then srv:stop() end
    if store then store:close() end
  end)

  local function req(method, path, opts) return srv:request(method, path, opts) end
  local function body(t) return es.json.encode(t) end

  local function new_order(token, items)
    local r = req("POST", "/orders", { token = token or ALICE, body = "{}" })
    assert.are.equal(201, r.status, r.body)
    for _, p in ipairs(items or {}) do
      assert.are.equal(200, req("POST", "/orders/" .. r.json.id .. "/items", { token = token or ALICE,
        body = body { product_id = p, quantity = 1, unit_price = 10 } }).status)
    end
    return r.json.id
  end

  local function placed_order()
    local id = new_order(ALICE, { "p1" })
    assert.are.equal(200, req("POST", "/orders/" .. id .. "/place", { token = ALICE }).status)
    return id
  end

  local UNKNOWN = "00000000-0000-7000-8000-000000000000"

  -- a command that waits on the order stream's next version, which the
  -- spec's open transaction holds: with no retries it ends in 409
  local function conflict(id)
    assert(store:begin())
    local ok, err = pcall(function()
      assert(store:append("Order-" .. id, { { type = "ItemAdded",
        data = { product_id = "first", quantity = 1, unit_price = 1 },
        metadata = { schema_version = 2 } } }, { expected_version = 1 }))
      local p = srv:start_request("POST", "/orders/" .. id .. "/items", { token = ALICE,
        body = body { product_id = "late", quantity = 1, unit_price = 1 } })
      http.sleep(0.3)
      assert(store:commit())
      return p.finish()
    end)
    if not ok then store:rollback(); error(err, 0) end
    return err
  end

  local function items(id) return "/orders/" .. id .. "/items" end
  local ITEM = body { product_id = "p9", quantity = 1, unit_price = 5 }

  -- "METHOD path-template status" -> function returning a response
  local S = {
    ["GET /health 200"] = function() return req("GET", "/health") end,
    ["GET /openapi.json 200"] = function() return req("GET", "/openapi.json") end,
    ["GET /metrics 200"] = function() return req("GET", "/metrics", { token = ADMIN }) end,
    ["GET /metrics 401"] = function() return req("GET", "/metrics", { token = "nope-nope-nope" }) end,
    ["GET /metrics 403"] = function() return req("GET", "/metrics", { token = ALICE }) end,

    ["POST /orders 201"] = function() return req("POST", "/orders", { token = ALICE, body = "{}" }) end,
    ["POST /orders 400"] = function() return req("POST", "/orders", { token = ALICE, body = "{" }) end,
    ["POST /orders 401"] = function() return req("POST", "/orders", { body = "{}" }) end,
    ["POST /orders 403"] = function()
      return req("POST", "/orders", { token = ALICE, body = '{"customer_id":"bob"}' })
    end,
    ["POST /orders 412"] = function()
      return req("POST", "/orders", { token = ALICE, body = "{}", headers = { 'If-Match: "1"' } })
    end,
    ["POST /orders 413"] = function()
      return req("POST", "/orders", { token = ALICE, body = string.rep(" ", 70 * 1024) .. "{}" })
    end,
    ["POST /orders 422"] = function()
      local k = "openapi-" .. os.time()
      req("POST", "/orders", { token = ALICE, body = "{}", headers = { "Idempotency-Key: " .. k } })
      return req("POST", "/orders", { token = ALICE, body = '{"customer_id":"alice"}',
        headers = { "Idempotency-Key: " .. k } })
    end,

    ["GET /orders 200"] = function() new_order(); return req("GET", "/orders", { token = ALICE }) end,
    ["GET /orders 400"] = function() return req("GET", "/orders?status=lost", { token = ALICE }) end,
    ["GET /orders 401"] = function() return req("GET", "/orders") end,
    ["GET /orders 403"] = function() return req("GET", "/orders?customer_id=bob", { token = ALICE }) end,

    ["GET /orders/{id} 200"] = function() return req("GET", "/orders/" .. placed_order(), { token = ALICE }) end,
    ["GET /orders/{id} 400"] = function()
      return req("GET", "/orders/" .. new_order() .. "?version=0", { token = ALICE })
    end,
    ["GET /orders/{id} 401"] = function() return req("GET", "/orders/" .. UNKNOWN) end,
    ["GET /orders/{id} 403"] = function() return req("GET", "/orders/" .. new_order(), { token = BOB }) end,
    ["GET /orders/{id} 404"] = function() return req("GET", "/orders/" .. UNKNOWN, { token = ALICE }) end,

    ["POST /orders/{id}/items 200"] = function()
      return req("POST", items(new_order()), { token = ALICE, body = ITEM })
    end,
    ["POST /orders/{id}/items 400"] = function()
      return req("POST", items(new_order()), { token = ALICE, body = '{"colour":"red"}' })
    end,
    ["POST /orders/{id}/items 401"] = function() return req("POST", items(UNKNOWN), { body = ITEM }) end,
    ["POST /orders/{id}/items 403"] = function()
      return req("POST", items(new_order()), { token = BOB, body = ITEM })
    end,
    ["POST /orders/{id}/items 404"] = function()
      return req("POST", items(UNKNOWN), { token = ALICE, body = ITEM })
    end,
    ["POST /orders/{id}/items 409"] = function() return conflict(new_order()) end,
    ["POST /orders/{id}/items 412"] = function()
      return req("POST", items(new_order()), { token = ALICE, body = ITEM, headers = { 'If-Match: "7"' } })
    end,
    ["POST /orders/{id}/items 422"] = function()
      return req("POST", items(placed_order()), { token = ALICE, body = ITEM })
    end,

    ["DELETE /orders/{id}/items/{product_id} 200"] = function()
      return req("DELETE", items(new_order(ALICE, { "p1" })) .. "/p1", { token = ALICE })
    end,
    ["DELETE /orders/{id}/items/{product_id} 401"] = function()
      return req("DELETE", items(UNKNOWN) .. "/p1")
    end,
    ["DELETE /orders/{id}/items/{product_id} 403"] = function()
      return req("DELETE", items(new_order(ALICE, { "p1" })) .. "/p1", { token = BOB })
    end,
    ["DELETE /orders/{id}/items/{product_id} 404"] = function()
      return req("DELETE", items(UNKNOWN) .. "/p1", { token = ALICE })
    end,
    ["DELETE /orders/{id}/items/{product_id} 412"] = function()
      return req("DELETE", items(new_order(ALICE, { "p1" })) .. "/p1", { token = ALICE,
        headers = { 'If-Match: "1"' } })
    end,
    ["DELETE /orders/{id}/items/{product_id} 422"] = function()
      return req("DELETE", items(new_order()) .. "/p1", { token = ALICE })
    end,

    -- a body that says it is not JSON: 415 before anything is done
    ["POST /orders 415"] = function()
      return req("POST", "/orders", { token = ALICE, body = "{}", headers = { "Content-Type: text/plain" } })
    end,
    ["POST /orders/{id}/items 415"] = function()
      return req("POST", "/orders/" .. new_order() .. "/items", { token = ALICE,
        body = '{"product_id":"p","quantity":1,"unit_price":1}', headers = { "Content-Type: text/plain" } })
    end,
    ["POST /orders/{id}/place 415"] = function()
      return req("POST", "/orders/" .. new_order(ALICE, { "p1" }) .. "/place", { token = ALICE, body = "{}",
        headers = { "Content-Type: multipart/form-data; boundary=x" } })
    end,
    ["POST /orders/{id}/cancel 415"] = function()
      return req("POST", "/orders/" .. new_order() .. "/cancel", { token = ALICE, body = "{}",
        headers = { "Content-Type: text/plain" } })
    end,
    ["POST /stock/{product_id}/receive 415"] = function()
      return req("POST", "/stock/p1/receive", { token = ADMIN, body = '{"quantity":1}',
        headers = { "Content-Type: text/csv" } })
    end,

    ["POST /orders/{id}/place 200"] = function()
      return req("POST", "/orders/" .. new_order(ALICE, { "p1" }) .. "/place", { token = ALICE })
    end,
    ["POST /orders/{id}/place 400"] = function()
      return req("POST", "/orders/" .. new_order(ALICE, { "p1" }) .. "/place", { token = ALICE, body = "{" })
    end,
    ["POST /orders/{id}/place 401"] = function() return req("POST", "/orders/" .. UNKNOWN .. "/place") end,
    ["POST /orders/{id}/place 403"] = function()
      return req("POST", "/orders/" .. new_order(ALICE, { "p1" }) .. "/place", { token = BOB })
    end,
    ["POST /orders/{id}/place 404"] = function()
      return req("POST", "/orders/" .. UNKNOWN .. "/place", { token = ALICE })
    end,
    ["POST /orders/{id}/place 412"] = function()
      return req("POST", "/orders/" .. new_order(ALICE, { "p1" }) .. "/place", { token = ALICE,
        headers = { 'If-Match: "1"' } })
    end,
    ["POST /orders/{id}/place 422"] = function()
      return req("POST", "/orders/" .. new_order() .. "/place", { token = ALICE })
    end,

    ["POST /orders/{id}/cancel 200"] = function()
      return req("POST", "/orders/" .. placed_order() .. "/cancel", { token = ALICE,
        body = '{"reason":"changed my mind"}' })
    end,
    ["POST /orders/{id}/cancel 400"] = function()
      return req("POST", "/orders/" .. new_order() .. "/cancel", { token = ALICE, body = '{"reason":1}' })
    end,
    ["POST /orders/{id}/cancel 401"] = function() return req("POST", "/orders/" .. UNKNOWN .. "/cancel") end,
    ["POST /orders/{id}/cancel 403"] = function()
      return req("POST", "/orders/" .. new_order() .. "/cancel", { token = BOB })
    end,
    ["POST /orders/{id}/cancel 404"] = function()
      return req("POST", "/orders/" .. UNKNOWN .. "/cancel", { token = ALICE })
    end,
    ["POST /orders/{id}/cancel 412"] = function()
      return req("POST", "/orders/" .. new_order() .. "/cancel", { token = ALICE, headers = { 'If-Match: "5"' } })
    end,

    ["GET /orders/{id}/history 200"] = function()
      return req("GET", "/orders/" .. placed_order() .. "/history", { token = ALICE })
    end,
    ["GET /orders/{id}/history 401"] = function() return req("GET", "/orders/" .. UNKNOWN .. "/history") end,
    ["GET /orders/{id}/history 403"] = function()
      return req("GET", "/orders/" .. new_order() .. "/history", { token = BOB })
    end,
    ["GET /orders/{id}/history 404"] = function()
      return req("GET", "/orders/" .. UNKNOWN .. "/history", { token = ALICE })
    end,

    ["GET /orders/{id}/events 200"] = function()
      return req("GET", "/orders/" .. new_order() .. "/events", { token = ALICE, timeout = 1,
        headers = { "Accept: text/event-stream" } })
    end,
    ["GET /orders/{id}/events 400"] = function()
      return req("GET", "/orders/" .. new_order() .. "/events", { token = ALICE,
        headers = { "Accept: text/event-stream", "Last-Event-ID: x" } })
    end,
    ["GET /orders/{id}/events 401"] = function()
      return req("GET", "/orders/" .. UNKNOWN .. "/events", { headers = { "Accept: text/event-stream" } })
    end,
    ["GET /orders/{id}/events 403"] = function()
      return req("GET", "/orders/" .. new_order() .. "/events", { token = BOB,
        headers = { "Accept: text/event-stream" } })
    end,
    ["GET /orders/{id}/events 404"] = function()
      return req("GET", "/orders/" .. UNKNOWN .. "/events", { token = ALICE,
        headers = { "Accept: text/event-stream" } })
    end,
    ["GET /orders/{id}/events 406"] = function()
      return req("GET", "/orders/" .. new_order() .. "/events", { token = ALICE })
    end,
    ["GET /events 200"] = function()
      return req("GET", "/events", { token = ALICE, timeout = 1, headers = { "Accept: text/event-stream" } })
    end,
    ["GET /events 400"] = function()
      return req("GET", "/events", { token = ADMIN, headers = { "Accept: text/event-stream" } })
    end,
    ["GET /events 401"] = function() return req("GET", "/events", { headers = { "Accept: text/event-stream" } }) end,
    ["GET /events 403"] = function()
      return req("GET", "/events?customer_id=bob", { token = ALICE, headers = { "Accept: text/event-stream" } })
    end,
    ["GET /events 406"] = function() return req("GET", "/events", { token = ALICE }) end,

    ["GET /stock/{product_id} 200"] = function() return req("GET", "/stock/p1", { token = BOB }) end,
    ["GET /stock/{product_id} 401"] = function() return req("GET", "/stock/p1") end,
    ["POST /stock/{product_id}/receive 200"] = function()
      return req("POST", "/stock/p1/receive", { token = ADMIN, body = '{"quantity":3}' })
    end,
    ["POST /stock/{product_id}/receive 400"] = function()
      return req("POST", "/stock/p1/receive", { token = ADMIN, body = '{"quantity":0}' })
    end,
    ["POST /stock/{product_id}/receive 401"] = function()
      return req("POST", "/stock/p1/receive", { body = '{"quantity":3}' })
    end,
    ["POST /stock/{product_id}/receive 403"] = function()
      return req("POST", "/stock/p1/receive", { token = ALICE, body = '{"quantity":3}' })
    end,
  }

  local function documented()
    local list = {}
    for path, ops in pairs(doc.paths) do
      for method, op in pairs(ops) do
        for status, resp in pairs(op.responses) do
          list[#list + 1] = { key = ("%s %s %s"):format(method:upper(), path, status),
                              status = tonumber(status), resp = resp }
        end
      end
    end
    table.sort(list, function(a, b) return a.key < b.key end)
    return list
  end

  it("is an OpenAPI 3.1 document, served at GET /openapi.json", function()
    assert.are.equal("3.1.0", doc.openapi)
    assert.is_string(doc.info.title)
    local r = req("GET", "/openapi.json")
    assert.are.equal(200, r.status)
    assert.is_truthy(r.headers["content-type"]:find("application/json", 1, true))
    assert.are.same(doc, r.json)
    -- the validator can say no
    local order = { ["$ref"] = "#/components/schemas/Order" }
    assert.is_nil(schema_check.validate(doc, order, es.json.decode("{}")))
    assert.is_nil(schema_check.validate(doc, order, es.json.decode(
      '{"id":"x","customer_id":"c","status":"lost","items":[],"total":0,"version":1,"created_at":"t"}')))
    assert.is_nil(schema_check.validate(doc, order, es.json.decode(
      '{"id":"x","customer_id":"c","status":"draft","items":[],"total":0,"version":1,"created_at":"t","x":1}')))
    assert.is_nil(schema_check.validate(doc, order, es.json.decode(
      '{"id":"x","customer_id":"c","status":"draft","items":[{}],"total":0.5,"version":1,"created_at":"t"}')))
    assert.is_true(schema_check.validate(doc, order, es.json.decode(
      '{"id":"x","customer_id":"c","status":"draft","items":[],"total":0,"version":1,"created_at":"t"}')))
  end)

  it("every documented status is what a real request gets, with the documented body and headers", function()
    local checked = 0
    for _, d in ipairs(documented()) do
      local scenario = S[d.key]
      assert.is_function(scenario, "no scenario for the documented " .. d.key)
      local r = scenario()
      assert.are.equal(d.status, r.status, d.key .. ": " .. r.body)
      local content = d.resp.content
      if content and content["application/json"] then
        assert.is_truthy((r.headers["content-type"] or ""):find("application/json", 1, true), d.key)
        assert.is_not_nil(r.json, d.key .. ": not JSON: " .. r.body)
        local ok, err = schema_check.validate(doc, content["application/json"].schema, r.json)
        assert(ok, d.key .. ": " .. tostring(err) .. "\n" .. r.body)
      elseif content then
        local ctype = next(content)
        assert.is_truthy((r.headers["content-type"] or ""):find(ctype, 1, true), d.key)
      end
      for name, h in pairs(d.resp.headers or {}) do
        if h.required then assert.is_string(r.headers[name:lower()], d.key .. ": header " .. name) end
      end
      checked = checked + 1
    end
    assert.is_true(checked > 50, checked .. " statuses")
  end)

  it("every scenario is documented", function()
    local keys = {}
    for _, d in ipairs(documented()) do keys[d.key] = true end
    for k in pairs(S) do assert.is_true(keys[k] == true, "not documented: " .. k) end
  end)

  it("every route nginx knows is documented, and undocumented methods answer 404 or 405", function()
    local conf = assert(http.read_file("examples/orders/http/nginx.conf"))
    local map = conf:match("map %$uri %$es_route {(.-)}%s*\n%s*#")
    assert.is_string(map)
    local n = 0
    for template in map:gmatch('"[^"]*" "([^"]+)";') do
      if template ~= "other" then
        n = n + 1
        assert.is_table(doc.paths[template], "route " .. template .. " is not in openapi.json")
      end
    end
    assert.is_true(n >= 10, n .. " routes")
    local id = new_order(ALICE, { "p1" })
    for path, ops in pairs(doc.paths) do
      local concrete = path:gsub("{id}", id):gsub("{product_id}", "p1")
      for _, m in ipairs(METHODS) do
        if not ops[m:lower()] then
          local r = req(m, concrete, { token = ADMIN, body = m ~= "GET" and "{}" or nil })
          assert.is_true(r.status == 404 or r.status == 405,
            ("%s %s answers %d but is not documented"):format(m, path, r.status))
        end
      end
    end
  end)
end)
