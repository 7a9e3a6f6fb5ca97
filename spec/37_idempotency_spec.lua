-- Idempotency-Key on every POST and DELETE (issue 14 section 2): the same
-- key and request returns the first response (status, body, ETag) and
-- appends nothing; the same key with another request is a 422; keys are
-- per principal, kept in PostgreSQL (they survive a restart), expire after
-- ES_HTTP_IDEMPOTENCY_TTL seconds, and racing retries append once.
local helpers = require "helpers"
local http = require "http_client"
local es = require "eventsourcing"

local ALICE = "alice-token-0123456789"
local BOB = "bob-token-0123456789"
local ADMIN = "admin-token-0123456789"

describe("Idempotency-Key", function()
  local srv, store, schema
  local n = 0

  local function key()
    n = n + 1
    return ("k-%d-%d"):format(os.time(), n)
  end

  local function start(env)
    return http.start_server { database_url = helpers.database_url(), schema = schema,
      threads = 4, decode = es.json.decode, env = env }
  end

  setup(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    package.path = "examples/?.lua;" .. package.path
    assert(require("orders.service").migrate(store))
    srv = start()
  end)

  teardown(function()
    if srv then srv:stop() end
    if store then store:close() end
  end)

  local function post(path, token, body, k, extra)
    local headers = { "Idempotency-Key: " .. k }
    for _, h in ipairs(extra or {}) do headers[#headers + 1] = h end
    return srv:request("POST", path, { token = token, body = body, headers = headers })
  end

  local function events_of(stream)
    local list = {}
    for e in assert(store:read(stream)) do list[#list + 1] = e end
    return list
  end

  local function same_response(a, b)
    assert.are.equal(a.status, b.status)
    assert.are.equal(a.body, b.body)
    assert.are.equal(a.headers["etag"], b.headers["etag"])
    assert.are.equal(a.headers["location"], b.headers["location"])
    assert.is_nil(a.headers["idempotent-replayed"])
    assert.are.equal("true", b.headers["idempotent-replayed"])
  end

  it("POST /orders twice with one key: one order, the same response", function()
    local k = key()
    local a = post("/orders", ALICE, "{}", k)
    assert.are.equal(201, a.status, a.body)
    local b = post("/orders", ALICE, "{}", k)
    same_response(a, b)
    assert.are.equal(1, #events_of("Order-" .. a.json.id))
    -- without a key, a new order each time
    local c = srv:request("POST", "/orders", { token = ALICE, body = "{}" })
    assert.are_not.equal(a.json.id, c.json.id)
  end)

  it("commands on an order: replayed, never appended twice; another body is a 422", function()
    local id = post("/orders", ALICE, "{}", key()).json.id
    local k = key()
    local body = '{"product_id":"p1","quantity":2,"unit_price":100}'
    local a = post("/orders/" .. id .. "/items", ALICE, body, k)
    assert.are.equal(200, a.status, a.body)
    assert.are.equal('"2"', a.headers["etag"])
    for _ = 1, 3 do same_response(a, post("/orders/" .. id .. "/items", ALICE, body, k)) end
    assert.are.equal(2, #events_of("Order-" .. id))
    local r = post("/orders/" .. id .. "/items", ALICE, '{"product_id":"p1","quantity":3,"unit_price":100}', k)
    assert.are.equal(422, r.status, r.body)
    assert.are.equal("invalid", r.json.error.kind)
    assert.is_truthy(r.json.error.message:find("another request", 1, true), r.body)
    -- the same body on another path is another request too
    r = post("/orders/" .. id .. "/place", ALICE, body, k)
    assert.are.equal(422, r.status, r.body)
    assert.are.equal(2, #events_of("Order-" .. id))
    -- DELETE too
    k = key()
    local d1 = srv:request("DELETE", "/orders/" .. id .. "/items/p1",
      { token = ALICE, headers = { "Idempotency-Key: " .. k } })
    assert.are.equal(200, d1.status, d1.body)
    local d2 = srv:request("DELETE", "/orders/" .. id .. "/items/p1",
      { token = ALICE, headers = { "Idempotency-Key: " .. k } })
    same_response(d1, d2)
    assert.are.equal(3, #events_of("Order-" .. id))
  end)

  it("a refused command's response is kept too (422 again, nothing appended)", function()
    local id = post("/orders", ALICE, "{}", key()).json.id
    local k = key()
    local a = post("/orders/" .. id .. "/place", ALICE, "", k)
    assert.are.equal(422, a.status, a.body)
    same_response(a, post("/orders/" .. id .. "/place", ALICE, "", k))
    assert.are.equal(1, #events_of("Order-" .. id))
  end)

  it("keys belong to their principal", function()
    local k = key()
    local a = post("/orders", ALICE, "{}", k)
    local b = post("/orders", BOB, "{}", k)
    assert.are.equal(201, b.status, b.body)
    assert.are_not.equal(a.json.id, b.json.id)
    assert.are.equal("bob", b.json.customer_id)
    assert.is_nil(b.headers["idempotent-replayed"])
  end)

  it("POST /stock/{id}/receive: received once", function()
    local k, p = key(), "idem-p-" .. os.time()
    local a = post("/stock/" .. p .. "/receive", ADMIN, '{"quantity":4}', k)
    assert.are.equal(200, a.status, a.body)
    same_response(a, post("/stock/" .. p .. "/receive", ADMIN, '{"quantity":4}', k))
    assert.are.equal(4, srv:request("GET", "/stock/" .. p, { token = ADMIN }).json.on_hand)
  end)

  it("bad keys are refused with 400 and store nothing", function()
    local before = #store:query(('SELECT 1 FROM "%s".events'):format(schema))
    for _, bad in ipairs { string.rep("x", 201), "a b", "\xc3\xa9" } do
      local r = post("/orders", ALICE, "{}", bad)
      assert.are.equal(400, r.status, r.body)
      assert.are.equal("invalid", r.json.error.kind)
    end
    local r = srv:request("POST", "/orders", { token = ALICE, body = "{}",
      headers = { "Idempotency-Key: a", "Idempotency-Key: b" } })
    assert.are.equal(400, r.status, r.body)
    assert.are.equal(before, #store:query(('SELECT 1 FROM "%s".events'):format(schema)))
  end)

  it("racing retries of one request append once", function()
    local id = post("/orders", ALICE, "{}", key()).json.id
    local k = key()
    local body = '{"product_id":"race","quantity":1,"unit_price":5}'
    local pending = {}
    for i = 1, 8 do
      pending[i] = srv:start_request("POST", "/orders/" .. id .. "/items",
        { token = ALICE, body = body, headers = { "Idempotency-Key: " .. k } })
    end
    local first
    for i = 1, 8 do
      local r = pending[i]:finish()
      assert.are.equal(200, r.status, r.body)
      first = first or r.body
      assert.are.equal(first, r.body)
    end
    local added = 0
    for _, e in ipairs(events_of("Order-" .. id)) do
      if e.type == "ItemAdded" then added = added + 1 end
    end
    assert.are.equal(1, added)
  end)

  it("keys survive a restart; after the TTL a retry still appends nothing", function()
    local k = key()
    local body = '{"product_id":"p9","quantity":1,"unit_price":100}'
    local id = post("/orders", ALICE, "{}", key()).json.id
    local a = post("/orders/" .. id .. "/items", ALICE, body, k)
    assert.are.equal(200, a.status, a.body)
    srv:stop()
    srv = start { ES_HTTP_IDEMPOTENCY_TTL = "1" }
    same_response(a, post("/orders/" .. id .. "/items", ALICE, body, k))
    -- a key made with a TTL of 1 s expires
    local k2 = key()
    local b = post("/orders/" .. id .. "/items", ALICE, '{"product_id":"p10","quantity":1,"unit_price":1}', k2)
    assert.are.equal(200, b.status, b.body)
    http.sleep(1.5)
    local r = post("/orders/" .. id .. "/items", ALICE, '{"product_id":"p10","quantity":1,"unit_price":1}', k2)
    assert.are.equal(422, r.status, r.body)
    assert.is_truthy(r.json.error.message:find("expired", 1, true), r.body)
    assert.are.equal(3, #events_of("Order-" .. id))
    -- the expired key may name a new request
    r = post("/orders/" .. id .. "/items", ALICE, '{"product_id":"p11","quantity":1,"unit_price":1}', k2)
    assert.are.equal(200, r.status, r.body)
    assert.are.equal(4, #events_of("Order-" .. id))
    -- expired keys are purged (the service does it every 100 requests per thread)
    local k3 = key()
    assert.are.equal(200, post("/orders/" .. id .. "/items", ALICE,
      '{"product_id":"p12","quantity":1,"unit_price":1}', k3).status)
    http.sleep(1.5)
    local idem = require "orders.http.idempotency"
    local function expired()
      return #assert(store:query(('SELECT 1 FROM "%s".http_idempotency WHERE expires_at <= now()')
        :format(schema)))
    end
    assert.is_true(expired() >= 1)
    assert.is_true(assert(idem.purge(store)) >= 1)
    assert.are.equal(0, expired())
  end)
end)
