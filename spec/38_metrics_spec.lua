-- GET /metrics and the access log (issue 14 section 4): the exposition
-- parses under a strict parser (spec/prometheus.lua) and counts what the
-- spec did; checkpoint lag of a workflow and a projection; access log
-- lines are JSON objects whose request id is the events' correlation id.
local helpers = require "helpers"
local http = require "http_client"
local es = require "eventsourcing"
local prom = require "prometheus"

local ALICE = "alice-token-0123456789"
local ADMIN = "admin-token-0123456789"

describe("the prometheus parser", function()
  it("refuses what the format does not allow", function()
    local good = "# TYPE a_total counter\na_total{x=\"1\"} 3\n"
    assert.is_table(prom.parse(good))
    for _, bad in ipairs {
      "a 1",                                             -- no final line feed
      "1a 1\n", "a{1x=\"y\"} 1\n", "a{x=y} 1\n", 'a{x="\\t"} 1\n',
      "a one\n", "a 1 2.5\n",
      "a 1\n# TYPE a counter\n",                         -- TYPE after samples
      "# TYPE a counter\n# TYPE a counter\n",
      "a 1\nb 1\na{x=\"1\"} 1\n",                         -- split family
      "a 1\na 1\n",                                      -- duplicate
      "# TYPE a counter\na -1\n",
      '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 0\nh_count 1\n',
      '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 0\nh_count 1\n',
      '# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 0\nh_count 1\n',
    } do
      assert.is_nil(prom.parse(bad), bad)
    end
  end)
end)

describe("GET /metrics and the access log", function()
  local srv, store, schema

  setup(function()
    schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    package.path = "examples/?.lua;" .. package.path
    assert(require("orders.service").migrate(store))
    srv = http.start_server { database_url = helpers.database_url(), schema = schema,
      threads = 4, decode = es.json.decode }
  end)

  teardown(function()
    if srv then srv:stop() end
    if store then store:close() end
  end)

  local function scrape(opts)
    local r = srv:request("GET", "/metrics", opts or { token = ADMIN })
    assert.are.equal(200, r.status, r.body)
    assert.is_truthy(r.headers["content-type"]:find("text/plain; version=0.0.4", 1, true))
    local fams, err = prom.parse(r.body)
    assert(fams, tostring(err) .. "\n" .. r.body)
    return fams, r.body
  end

  local function requests(f, route, method, status)
    return prom.value(f, "es_http_requests_total", "es_http_requests_total",
      { route = route, method = method, status = tostring(status) }) or 0
  end

  it("admin token or a loopback client without credentials; customers get 403", function()
    assert.are.equal(403, srv:request("GET", "/metrics", { token = ALICE }).status)
    assert.are.equal(401, srv:request("GET", "/metrics", { token = "nope-nope-nope" }).status)
    assert.are.equal(405, srv:request("POST", "/metrics", { token = ADMIN, body = "{}" }).status)
    scrape { token = ADMIN }
    scrape {}   -- the spec's curl is a loopback client
  end)

  it("counts requests by route and status, their latency, appends", function()
    local f0 = scrape()
    local created0 = requests(f0, "/orders", "POST", 201)
    local items0 = requests(f0, "/orders/{id}/items", "POST", 200)
    local bad0 = requests(f0, "/orders/{id}/items", "POST", 400)
    local appended0 = prom.value(f0, "es_appended_events_total", "es_appended_events_total") or 0
    local r = srv:request("POST", "/orders", { token = ALICE, body = "{}" })
    local id = r.json.id
    for i = 1, 3 do
      assert.are.equal(200, srv:request("POST", "/orders/" .. id .. "/items", { token = ALICE,
        body = ('{"product_id":"m%d","quantity":1,"unit_price":5}'):format(i) }).status)
    end
    assert.are.equal(400, srv:request("POST", "/orders/" .. id .. "/items", { token = ALICE,
      body = "{" }).status)
    local f = scrape()
    assert.are.equal(created0 + 1, requests(f, "/orders", "POST", 201))
    assert.are.equal(items0 + 3, requests(f, "/orders/{id}/items", "POST", 200))
    assert.are.equal(bad0 + 1, requests(f, "/orders/{id}/items", "POST", 400))
    assert.are.equal(appended0 + 4, prom.value(f, "es_appended_events_total", "es_appended_events_total"))
    -- the histogram counts every request of its route
    local count = prom.value(f, "es_http_request_duration_seconds",
      "es_http_request_duration_seconds_count", { route = "/orders/{id}/items", method = "POST" })
    assert.are.equal(requests(f, "/orders/{id}/items", "POST", 200)
      + requests(f, "/orders/{id}/items", "POST", 400), count)
    for _, name in ipairs { "es_append_conflicts_total", "es_http_vm_pool_wait_seconds",
                            "es_http_thread_pool_wait_seconds", "es_http_vm_pool_timeouts_total" } do
      assert.is_table(f[name], name)
    end
    assert.are.equal(1, prom.value(f, "es_database_up", "es_database_up"))
  end)

  it("checkpoint lag in events and seconds, and dead letters, per workflow and projection", function()
    local workflows = require "orders.workflows"
    local runner = workflows.runner(store, { read_models = false, draft_ttl = false })
    assert(runner:catch_up())
    local counted = 0
    local projector = es.projector(store, { es.projection { name = "spec_metrics",
      on = { OrderCreated = function() counted = counted + 1 end } } })
    assert(projector:catch_up())
    local f = scrape()
    local wf = { kind = "workflow", name = "order-fulfilment" }
    local pj = { kind = "projection", name = "spec_metrics" }
    assert.are.equal(0, prom.value(f, "es_checkpoint_lag_events", "es_checkpoint_lag_events", wf))
    assert.are.equal(0, prom.value(f, "es_checkpoint_lag_events", "es_checkpoint_lag_events", pj))
    assert.are.equal(0, prom.value(f, "es_dead_letters", "es_dead_letters", wf))
    srv:request("POST", "/orders", { token = ALICE, body = "{}" })
    srv:request("POST", "/orders", { token = ALICE, body = "{}" })
    http.sleep(1.1)
    f = scrape()
    assert.are.equal(2, prom.value(f, "es_checkpoint_lag_events", "es_checkpoint_lag_events", wf))
    assert.are.equal(2, prom.value(f, "es_checkpoint_lag_events", "es_checkpoint_lag_events", pj))
    assert.is_true(prom.value(f, "es_checkpoint_lag_seconds", "es_checkpoint_lag_seconds", wf) >= 1)
    assert(projector:catch_up())
    f = scrape()
    assert.are.equal(0, prom.value(f, "es_checkpoint_lag_events", "es_checkpoint_lag_events", pj))
    assert.are.equal(0, prom.value(f, "es_checkpoint_lag_seconds", "es_checkpoint_lag_seconds", pj))
  end)

  it("access log: one JSON object per request; X-Request-Id becomes the correlation id", function()
    local rid = "spec-req-" .. os.time()
    local r = srv:request("POST", "/orders", { token = ALICE, body = "{}",
      headers = { "X-Request-Id: " .. rid } })
    assert.are.equal(201, r.status)
    assert.are.equal(rid, r.headers["x-request-id"])
    local ev
    for e in assert(store:read("Order-" .. r.json.id)) do ev = e end
    assert.are.equal(rid, ev.metadata.correlation_id)
    -- generated when absent or not a sane token, one per request
    local a = srv:request("GET", "/health").headers["x-request-id"]
    local b = srv:request("GET", "/health", { headers = { "X-Request-Id: has space" } }).headers["x-request-id"]
    assert.is_truthy(a:match("^%x+$"), a)
    assert.is_truthy(b:match("^%x+$"), b)
    assert.are_not.equal(a, b)
    -- the service's routes make their own (api.lua): 32 hex digits, one
    -- per request, the events' correlation id too
    local seen, last_id = {}, nil
    for i = 1, 3 do
      local c = srv:request("POST", "/orders", { token = ALICE, body = "{}",
        headers = i == 3 and { "X-Request-Id: has space" } or nil })
      assert.are.equal(201, c.status, c.body)
      local cid = c.headers["x-request-id"]
      assert.is_truthy(cid:match("^" .. ("%x"):rep(32) .. "$"), cid)
      assert.is_nil(seen[cid], cid)
      seen[cid], last_id = true, cid
      local first
      for e in assert(store:read("Order-" .. c.json.id)) do first = first or e end
      assert.are.equal(cid, first.metadata.correlation_id)
    end
    -- lines wait in nginx's buffer up to a second (nginx.sh's
    -- ES_HTTP_ACCESS_LOG_FLUSH): wait for the last request's
    local log
    for _ = 1, 40 do
      log = http.read_file(srv.prefix .. "/logs/access.log") or ""
      if log:find(last_id, 1, true) then break end
      http.sleep(0.1)
    end
    local found = 0
    for line in log:gmatch("[^\n]+") do
      local entry = es.json.decode(line)
      assert.is_table(entry, line)
      for _, k in ipairs { "time", "request_id", "method", "uri", "route", "status", "duration" } do
        assert.is_not_nil(entry[k], k .. " in " .. line)
      end
      if entry.request_id == rid then
        found = found + 1
        assert.are.equal(201, entry.status)
        assert.are.equal("/orders", entry.route)
      end
    end
    assert.are.equal(1, found)
  end)
end)

-- Each worker sums its counts in its own table and adds them to the shared
-- dict every metrics.FLUSH seconds (metrics.lua): with two workers, the
-- counts of both reach /metrics, those of the worker not serving the
-- scrape within a moment.
describe("GET /metrics with two nginx workers", function()
  local srv, store

  setup(function()
    local schema = helpers.fresh_schema()
    store = assert(es.open(helpers.database_url(), { schema = schema }))
    package.path = "examples/?.lua;" .. package.path
    assert(require("orders.service").migrate(store))
    srv = http.start_server { database_url = helpers.database_url(), schema = schema,
      threads = 2, decode = es.json.decode, env = { ES_HTTP_WORKERS = "2" } }
  end)

  teardown(function()
    if srv then srv:stop() end
    if store then store:close() end
  end)

  local function count(route, method, status)
    local r = srv:request("GET", "/metrics", { token = ADMIN })
    assert.are.equal(200, r.status, r.body)
    local f = assert(prom.parse(r.body))
    return prom.value(f, "es_http_requests_total", "es_http_requests_total",
      { route = route, method = method, status = tostring(status) }) or 0,
      prom.value(f, "es_appended_events_total", "es_appended_events_total") or 0
  end

  it("counts every request of both workers, within a second", function()
    local n0, a0 = count("/orders", "POST", 201)
    -- concurrent requests until both workers answered some (a request
    -- id's first 24 digits are its worker's, api.lua)
    local N, workers, seen = 0, 0, {}
    for _ = 1, 20 do
      local pending = {}
      for i = 1, 6 do
        pending[i] = srv:start_request("POST", "/orders", { token = ALICE, body = "{}" })
      end
      for _, p in ipairs(pending) do
        local r = p.finish()
        assert.are.equal(201, r.status, r.body)
        N = N + 1
        local w = r.headers["x-request-id"]:sub(1, 24)
        if not seen[w] then seen[w], workers = true, workers + 1 end
      end
      if workers >= 2 then break end
    end
    assert.are.equal(2, workers)
    -- one scrape (one worker's flush) after the other's timer ran
    http.sleep(1)
    local n, a = count("/orders", "POST", 201)
    assert.are.equal(n0 + N, n)
    assert.are.equal(a0 + N, a)
    -- and no more later: nothing is added twice
    http.sleep(0.3)
    assert.are.equal(n0 + N, (count("/orders", "POST", 201)))
  end)
end)
