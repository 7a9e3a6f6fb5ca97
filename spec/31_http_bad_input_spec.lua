-- Bad input over HTTP, every endpoint: bodies that are not JSON or not an
-- object, wrong types, 1 MB strings, 100,000-element arrays, nesting 1,001
-- deep, invalid UTF-8, NUL escapes, numbers beyond 2^53 and beyond a
-- double, unknown fields, wrong content types; SQL text, NUL bytes and
-- invalid UTF-8 in every path segment and query parameter. Each answers a
-- client error (4xx, never 5xx) in the error shape, and no stored byte
-- changes (a digest of every table of the schema, before and after).
package.path = "examples/?.lua;" .. package.path

local helpers = require "helpers"
local http = require "http_client"
local es = require "eventsourcing"

local ALICE = "alice-token-0123456789"
local ADMIN = "admin-token-0123456789"
local SQL = "x'); DROP TABLE events; --"
local SQL_PATH = "x%27%29%3B%20DROP%20TABLE%20events%3B%20--"

local function nested(depth) return ("["):rep(depth) .. ("]"):rep(depth) end

describe("HTTP bad input (nginx, PostgreSQL)", function()
  local store, schema, srv, id, before

  setup(function()
    store, schema = helpers.open({ name = "postgresql", url = helpers.database_url() })
    assert(require("orders.service").migrate(store))
    srv = http.start_server { database_url = helpers.database_url(), schema = schema,
                              decode = es.json.decode }
    local r = srv:request("POST", "/orders", { token = ALICE, body = "{}" })
    assert.are.equal(201, r.status, r.body)
    id = r.json.id
    r = srv:request("POST", "/orders/" .. id .. "/items", { token = ALICE,
      body = '{"product_id":"p1","quantity":1,"unit_price":100}' })
    assert.are.equal(200, r.status, r.body)
    -- the service creates what it keeps on first use (idempotency keys)
    r = srv:request("POST", "/orders/" .. id .. "/items", { token = ALICE,
      headers = { "Idempotency-Key: warm-up" },
      body = '{"product_id":"p2","quantity":1,"unit_price":100}' })
    assert.are.equal(200, r.status, r.body)
    before = helpers.schema_digest(store, schema)
  end)
  teardown(function()
    if srv then srv:stop() end
    if store then store:close() end
  end)

  local function refused(method, path, opts)
    local r = srv:request(method, path, opts)
    assert.is_true(r.status >= 400 and r.status < 500,
      ("%s %s answered %d: %s"):format(method, path:sub(1, 80), r.status, (r.body or ""):sub(1, 200)))
    if r.status ~= 404 and r.status ~= 405 and r.status ~= 414 and r.status ~= 413 then
      assert.is_table(r.json and r.json.error, ("no error object: %s"):format((r.body or ""):sub(1, 200)))
      assert.is_string(r.json.error.kind)
      assert.is_string(r.json.error.message)
    end
    return r
  end

  after_each(function()
    assert.equal(before, helpers.schema_digest(store, schema), "stored data changed")
  end)

  local function bodies(valid)
    local mb = ("x"):rep(1024 * 1024)
    local list = {
      "not json", "", "[]", "null", "42", '"a string"', nested(1001),
      '{"product_id":' .. nested(1001) .. '}',
      '{"product_id":"' .. mb .. '","quantity":1,"unit_price":1}',
      '{"product_id":[' .. ("1,"):rep(99999) .. '1],"quantity":1,"unit_price":1}',
      '{"product_id":"a\\u0000b","quantity":1,"unit_price":1}',
      '{"product_id":"\255\254","quantity":1,"unit_price":1}',
      '{"product_id":"p","quantity":9007199254740993,"unit_price":1}',
      '{"product_id":"p","quantity":1e400,"unit_price":1}',
      '{"product_id":"p","quantity":-1,"unit_price":1}',
      '{"product_id":"p","quantity":"1","unit_price":1}',
      '{"product_id":5,"quantity":1,"unit_price":1}',
      '{"product_id":"p","quantity":1.5,"unit_price":1}',
      '{"customer_id":{"$ne":null}}',
      '{"reason":' .. nested(50) .. '}',
      '{"quantity":' .. ("9"):rep(400) .. '}',
    }
    for _, b in ipairs(valid or {}) do list[#list + 1] = b end
    return list
  end

  it("POST /orders/{id}/items refuses every bad body", function()
    for _, b in ipairs(bodies { '{"product_id":"p","quantity":1,"unit_price":1,"evil":1}' }) do
      refused("POST", "/orders/" .. id .. "/items", { token = ALICE, body = b })
    end
  end)

  it("POST /orders, /place, /cancel and /stock/{id}/receive refuse bad bodies", function()
    for _, b in ipairs { "not json", "[]", "42", nested(1001), '{"customer_id":5}',
                         '{"customer_id":"' .. ("x"):rep(1024 * 1024) .. '"}', '{"customer_id":"\255"}',
                         '{"customer_id":"bob"}', '{"customer_id":"a\\u0000"}' } do
      refused("POST", "/orders", { token = ALICE, body = b })
    end
    for _, b in ipairs { "not json", "[]", nested(1001), '{"reason":5}', '{"reason":"\255"}',
                         '{"reason":"' .. ("x"):rep(1024 * 1024) .. '"}' } do
      refused("POST", "/orders/" .. id .. "/cancel", { token = ALICE, body = b })
    end
    for _, b in ipairs { "not json", "[]", nested(1001), '{"x":1}' } do
      refused("POST", "/orders/" .. id .. "/place", { token = ALICE, body = b })
    end
    for _, b in ipairs { "not json", "{}", '{"quantity":-5}', '{"quantity":"5"}', '{"quantity":1e400}',
                         '{"quantity":9007199254740993}', '{"quantity":1.5}', nested(1001) } do
      refused("POST", "/stock/p1/receive", { token = ADMIN, body = b })
    end
  end)

  it("refuses SQL text, NUL bytes, invalid UTF-8 and huge segments in every path", function()
    local segs = { SQL_PATH, "a%00b", "%FF%FE", ("x"):rep(5000), "..", "%2e%2e" }
    for _, s in ipairs(segs) do
      refused("GET", "/orders/" .. s, { token = ALICE })
      refused("GET", "/orders/" .. s .. "/history", { token = ALICE })
      refused("POST", "/orders/" .. s .. "/items", { token = ALICE,
        body = '{"product_id":"p","quantity":1,"unit_price":1}' })
      refused("DELETE", "/orders/" .. id .. "/items/" .. s, { token = ALICE })
      refused("POST", "/orders/" .. s .. "/place", { token = ALICE })
      refused("POST", "/orders/" .. s .. "/cancel", { token = ALICE, body = "{}" })
      if s ~= SQL_PATH then   -- a product id is any text: see below
        refused("POST", "/stock/" .. s .. "/receive", { token = ADMIN, body = '{"quantity":1}' })
      end
    end
  end)

  it("refuses bad query parameters", function()
    local bad = {
      "/orders?customer_id=" .. SQL_PATH, "/orders?limit=abc", "/orders?limit=-1", "/orders?limit=100000",
      "/orders?after=" .. SQL_PATH, "/orders?status=" .. SQL_PATH, "/orders?customer_id=a%00b",
      "/orders?customer_id=%FF", "/orders/" .. "ID" .. "?at=" .. SQL_PATH, "/orders/ID?version=-1",
      "/orders/ID?version=abc", "/orders/ID?version=99999999999999999999999", "/orders/ID?at=%FF",
      "/orders/ID?unknown=1", "/events?customer_id=" .. SQL_PATH,
    }
    for _, path in ipairs(bad) do
      refused("GET", (path:gsub("ID", id)), { token = ALICE })
    end
  end)

  it("refuses wrong content types, missing bodies and wrong tokens without touching anything", function()
    refused("POST", "/orders/" .. id .. "/items", { token = ALICE,
      headers = { "Content-Type: text/plain" }, body = '{"product_id":"p","quantity":1,"unit_price":1}' })
    refused("POST", "/orders/" .. id .. "/items", { token = ALICE })
    refused("POST", "/orders/" .. id .. "/items", { token = "x'; DROP TABLE events; --",
      body = '{"product_id":"p","quantity":1,"unit_price":1}' })
    refused("POST", "/orders/" .. id .. "/items", { token = ALICE,
      headers = { "Idempotency-Key: " .. ("k"):rep(201) }, body = '{"product_id":"p","quantity":1,"unit_price":1}' })
    refused("POST", "/orders/" .. id .. "/items", { token = ALICE,
      headers = { "If-Match: " .. SQL }, body = '{"product_id":"p","quantity":1,"unit_price":1}' })
    refused("POST", "/stock/p1/receive", { token = ALICE, body = '{"quantity":1}' })
  end)
end)
